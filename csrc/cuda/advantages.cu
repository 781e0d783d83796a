// CUDA advantage engine: everything is enqueued on the caller's stream, nothing waits for the
// device, and no float is ever accumulated with atomics, so results are bitwise reproducible.
//
//  1. prepare:  row numbers 0..N-1, per-row finiteness (an integer atomic counts bad rows)
//  2. sort:     stable radix sort of (group id, row) pairs (CUB): rows grouped by ascending id,
//               ascending row order inside a group. Without per-group statistics the groups'
//               order does not matter, only the rows' order inside each group: ids are first
//               hashed to slots of a table of ~2N entries (lock-free linear probing), and the
//               (slot, row) pairs are sorted on the slot's ~log2(2N) bits (3 radix passes for
//               100k rows instead of 8 for 64-bit ids); the slot numbers may differ from run to
//               run, but every group still holds its rows in ascending order, so the advantages
//               are the same bits either way
//  3. segments: head flags + inclusive scan + scatter -> CSR offsets and G, left on the device
//  4. batch:    (global std only) one block reduces the whole batch in a fixed order
//  5. groups:   one warp per group (grid-stride over G, read from device memory): two-pass
//               statistics with a fixed lane order and butterfly reductions, then the advantages;
//               groups with more than kWarpGroupValues values are queued instead and
//  6. large:    one 1024-thread block per queued group, same two passes, block-wide reductions
//
// A group always takes the same path (decided by its size), and each path reduces in a fixed
// order, so the result never depends on scheduling.
//
// G is data-dependent, so kernels are sized by N (an upper bound) and read G on the device.
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <climits>
#include <stdexcept>
#include <string>

#include "sfgrpo/advantage_math.h"
#include "sfgrpo/advantages.h"

namespace sfgrpo {
namespace {

using math::FirstMoments;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kMaxBlocks = 4096;
constexpr int kBatchThreads = 1024;
// Groups with more values than this are normalised by a whole block instead of one warp.
constexpr int64_t kWarpGroupValues = 4096;
constexpr int kBlockTeamThreads = 1024;
constexpr int kMaxLargeBlocks = 1024;
constexpr unsigned kFullMask = 0xffffffffu;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("sfgrpo advantages_cuda: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

int blocks_for(int64_t items, int per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<int>(blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks);
}

// ------------------------------------------------------------------------------ workspace
struct Workspace {
  unsigned long long* table = nullptr;  // [slots] hash table of ids (hashed layout only)
  uint32_t* slot_keys = nullptr;        // [N] each row's slot (hashed layout only)
  uint32_t* slots_sorted = nullptr;     // [N]
  int32_t* rows_in = nullptr;      // [N] 0..N-1
  int64_t* keys_sorted = nullptr;  // [N]
  int32_t* rows_sorted = nullptr;  // [N]
  int32_t* heads = nullptr;        // [N] 1 where a new group starts in sorted order
  int32_t* segment = nullptr;      // [N] inclusive scan of heads: group number + 1
  int32_t* offsets = nullptr;      // [N + 1] CSR offsets (first G + 1 used)
  uint8_t* finite = nullptr;       // [N]
  double* batch = nullptr;         // [3 * stat_columns] batch mean, std, all-equal flag
  int32_t* large_groups = nullptr; // [N] groups queued for the block path
  int32_t* large_count = nullptr;  // [1] how many
  void* cub_temp = nullptr;
  size_t cub_bytes = 0;
  size_t total_bytes = 0;
};

constexpr unsigned long long kEmptySlot = ~0ULL;

// Hash-table size for n rows: a power of two >= 2n (load <= 1/2: short probes), plus one extra
// slot (index `slots`) for the one id equal to the empty marker.
int64_t hash_slots(int n) {
  int64_t slots = 64;
  while (slots < 2 * static_cast<int64_t>(n)) slots <<= 1;
  return slots;
}

int slot_bits(int64_t slots) {  // bits of the largest slot number, `slots` itself
  int bits = 1;
  while ((int64_t{1} << bits) <= slots) ++bits;
  return bits;
}

size_t cub_temp_bytes(int n) {
  size_t sort_bytes = 0;
  size_t slot_sort_bytes = 0;
  size_t scan_bytes = 0;
  check(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const int64_t*>(nullptr),
                                        static_cast<int64_t*>(nullptr),
                                        static_cast<const int32_t*>(nullptr),
                                        static_cast<int32_t*>(nullptr), n),
        "radix sort size query");
  check(cub::DeviceRadixSort::SortPairs(nullptr, slot_sort_bytes, static_cast<const uint32_t*>(nullptr),
                                        static_cast<uint32_t*>(nullptr),
                                        static_cast<const int32_t*>(nullptr),
                                        static_cast<int32_t*>(nullptr), n),
        "slot radix sort size query");
  check(cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, static_cast<const int32_t*>(nullptr),
                                      static_cast<int32_t*>(nullptr), n),
        "scan size query");
  size_t most = sort_bytes > scan_bytes ? sort_bytes : scan_bytes;
  return most > slot_sort_bytes ? most : slot_sort_bytes;
}

// Carves the workspace into aligned pieces; with base == nullptr it only measures.
Workspace carve(const AdvantageProblem& p, void* base) {
  const int n = static_cast<int>(p.rows);
  Workspace ws;
  size_t at = 0;
  auto take = [&](size_t bytes) -> void* {
    at = (at + 255) / 256 * 256;
    void* ptr = base ? static_cast<char*>(base) + at : nullptr;
    at += bytes;
    return ptr;
  };
  ws.table = static_cast<unsigned long long*>(take(sizeof(unsigned long long) * hash_slots(n)));
  ws.slot_keys = static_cast<uint32_t*>(take(sizeof(uint32_t) * n));
  ws.slots_sorted = static_cast<uint32_t*>(take(sizeof(uint32_t) * n));
  ws.rows_in = static_cast<int32_t*>(take(sizeof(int32_t) * n));
  ws.keys_sorted = static_cast<int64_t*>(take(sizeof(int64_t) * n));
  ws.rows_sorted = static_cast<int32_t*>(take(sizeof(int32_t) * n));
  ws.heads = static_cast<int32_t*>(take(sizeof(int32_t) * n));
  ws.segment = static_cast<int32_t*>(take(sizeof(int32_t) * n));
  ws.offsets = static_cast<int32_t*>(take(sizeof(int32_t) * (n + 1)));
  ws.finite = static_cast<uint8_t*>(take(n));
  ws.batch = static_cast<double*>(take(sizeof(double) * 3 * p.stat_columns()));
  ws.large_groups = static_cast<int32_t*>(take(sizeof(int32_t) * n));
  ws.large_count = static_cast<int32_t*>(take(sizeof(int32_t)));
  ws.cub_bytes = cub_temp_bytes(n);
  ws.cub_temp = take(ws.cub_bytes);
  ws.total_bytes = at + 256;
  return ws;
}

// ----------------------------------------------------------------- deterministic reductions
// xor butterflies: a + b == b + a bitwise, so after each level every lane of a pair holds the
// same bits and the final value is identical on all lanes and on every run.
__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}
__device__ __forceinline__ double warp_min(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmin(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}
__device__ __forceinline__ double warp_max(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Block-wide reductions (batch kernel, large groups): warps reduce, then warp 0 reduces the
// per-warp results in warp order. Every thread gets the result.
template <typename Op>
__device__ double block_reduce(double v, double identity, Op op, double* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : identity;
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
    if (lane == 0) scratch[32] = v;
  }
  __syncthreads();
  v = scratch[32];
  __syncthreads();  // scratch is reused by the next call
  return v;
}

struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct MinOp {
  __device__ double operator()(double a, double b) const { return fmin(a, b); }
};
struct MaxOp {
  __device__ double operator()(double a, double b) const { return fmax(a, b); }
};

// The threads that normalise one group together: a warp (prompt-sized groups) or a whole block
// (large groups). Element e of a group goes to thread e % size(); reductions have a fixed shape.
struct WarpTeam {
  __device__ int rank() const { return threadIdx.x & 31; }
  __device__ int size() const { return 32; }
  __device__ double sum(double v) const { return warp_sum(v); }
  __device__ double min(double v) const { return warp_min(v); }
  __device__ double max(double v) const { return warp_max(v); }
};

struct BlockTeam {
  double* scratch;  // 33 doubles of shared memory
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ double sum(double v) const { return block_reduce(v, 0.0, SumOp{}, scratch); }
  __device__ double min(double v) const { return block_reduce(v, INFINITY, MinOp{}, scratch); }
  __device__ double max(double v) const { return block_reduce(v, -INFINITY, MaxOp{}, scratch); }
};

template <typename Team>
__device__ __forceinline__ FirstMoments team_merge(const Team& team, FirstMoments m) {
  m.count = team.sum(m.count);
  m.sum = team.sum(m.sum);
  m.lo = team.min(m.lo);
  m.hi = team.max(m.hi);
  return m;
}

// ---------------------------------------------------------------------------------- kernels
// Row i's number and finiteness (an integer atomic counts bad rows: order does not matter).
template <typename T>
__device__ __forceinline__ void prepare_row(int i, const T* __restrict__ rewards, int64_t width,
                                            int32_t* __restrict__ rows, uint8_t* __restrict__ finite,
                                            unsigned long long* __restrict__ nonfinite_rows) {
  rows[i] = i;
  const bool ok = math::row_is_finite(rewards + i * width, width);
  finite[i] = ok;
  if (!ok) atomicAdd(nonfinite_rows, 1ULL);
}

template <typename T>
__global__ void prepare_rows_kernel(const T* __restrict__ rewards, int n, int64_t width,
                                    int32_t* __restrict__ rows, uint8_t* __restrict__ finite,
                                    unsigned long long* __restrict__ nonfinite_rows) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    prepare_row(i, rewards, width, rows, finite, nonfinite_rows);
  }
}

// splitmix64's finaliser: consecutive ids (the usual prompt numbering) spread over the table.
__device__ __forceinline__ unsigned long long mix_id(unsigned long long z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// prepare_rows_kernel's work plus each row's hash slot. Linear probing with atomicCAS on the
// 64-bit id: whichever of two colliding ids claims a slot first keeps it (the slot numbers vary
// between runs, the grouping does not). `table` holds kEmptySlot everywhere on entry.
template <typename T>
__global__ void hash_rows_kernel(const T* __restrict__ rewards, const int64_t* __restrict__ ids,
                                 int n, int64_t width, unsigned long long* __restrict__ table,
                                 unsigned long long mask, uint32_t* __restrict__ slot_keys,
                                 int32_t* __restrict__ rows, uint8_t* __restrict__ finite,
                                 unsigned long long* __restrict__ nonfinite_rows) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    prepare_row(i, rewards, width, rows, finite, nonfinite_rows);
    const unsigned long long id = static_cast<unsigned long long>(ids[i]);
    unsigned long long slot = mask + 1;  // the empty marker's own slot
    if (id != kEmptySlot) {
      slot = mix_id(id) & mask;
      while (true) {
        const unsigned long long seen = atomicCAS(table + slot, kEmptySlot, id);
        if (seen == kEmptySlot || seen == id) break;
        slot = (slot + 1) & mask;
      }
    }
    slot_keys[i] = static_cast<uint32_t>(slot);
  }
}

template <typename Key>
__global__ void segment_heads_kernel(const Key* __restrict__ keys, int n,
                                     int32_t* __restrict__ heads) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    heads[i] = (i == 0 || keys[i] != keys[i - 1]) ? 1 : 0;
  }
}

__global__ void segment_offsets_kernel(const int32_t* __restrict__ heads,
                                       const int32_t* __restrict__ segment, int n,
                                       int32_t* __restrict__ offsets, int64_t* __restrict__ groups) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    if (heads[i]) offsets[segment[i] - 1] = i;
    if (i == n - 1) {
      offsets[segment[i]] = n;
      *groups = segment[i];
    }
  }
}

// The elements of statistic s of a set of `count` rows: every (row, column) pair when pooled,
// column s of every row otherwise. Element e maps to (row k, column c).
struct ElementMap {
  int64_t per_row;
  int64_t fixed_column;
  __device__ __forceinline__ void locate(int64_t e, int64_t& k, int64_t& c) const {
    if (per_row == 1) {
      k = e;
      c = fixed_column;
    } else {
      k = e / per_row;
      c = e - k * per_row;
    }
  }
};

__device__ __forceinline__ ElementMap element_map(const AdvantageProblem& p, int64_t s) {
  return p.pooled ? ElementMap{p.columns(), 0} : ElementMap{1, s};
}

// Batch statistics for global_std: one block, fixed element-to-thread assignment.
template <typename T>
__global__ void __launch_bounds__(kBatchThreads) batch_moments_kernel(AdvantageProblem p, const T* __restrict__ rewards,
                                     const uint8_t* __restrict__ finite, double* __restrict__ batch) {
  __shared__ double scratch[33];
  const int64_t stat_columns = p.stat_columns();
  for (int64_t s = 0; s < stat_columns; ++s) {
    const ElementMap map = element_map(p, s);
    const int64_t elements = p.rows * map.per_row;
    FirstMoments first;
    for (int64_t e = threadIdx.x; e < elements; e += blockDim.x) {
      int64_t k, c;
      map.locate(e, k, c);
      if (!finite[k] || !math::column_counted(p.column_mask, c)) continue;
      first.add(math::value_at(rewards + k * p.width, c, p.gains));
    }
    first.count = block_reduce(first.count, 0.0, SumOp{}, scratch);
    first.sum = block_reduce(first.sum, 0.0, SumOp{}, scratch);
    first.lo = block_reduce(first.lo, INFINITY, MinOp{}, scratch);
    first.hi = block_reduce(first.hi, -INFINITY, MaxOp{}, scratch);
    const double mean = first.mean();
    double squares = 0.0;
    for (int64_t e = threadIdx.x; e < elements; e += blockDim.x) {
      int64_t k, c;
      map.locate(e, k, c);
      if (!finite[k] || !math::column_counted(p.column_mask, c)) continue;
      const double d = math::value_at(rewards + k * p.width, c, p.gains) - mean;
      squares += d * d;
    }
    squares = block_reduce(squares, 0.0, SumOp{}, scratch);
    if (threadIdx.x == 0) {
      batch[s] = mean;
      batch[stat_columns + s] = math::std_from(squares, first.count, p.ddof);
      batch[2 * stat_columns + s] = first.all_equal() ? 1.0 : 0.0;
    }
  }
}

// Everything the group kernels read, in one kernel argument.
template <typename T>
struct GroupArgs {
  AdvantageProblem p;
  const T* rewards;
  const int64_t* keys_sorted;  // sorted ids (only with per-group statistics)
  const int32_t* rows;     // row numbers grouped by ascending id, ascending inside a group
  const int32_t* offsets;  // CSR offsets
  const uint8_t* finite;
  const int64_t* group_count;
  const double* batch;  // batch statistics (global_std) or nullptr
  GroupStatsBuffers stats;
  T* out;
  int32_t* large_groups;  // queue of groups left to the block path
  int32_t* large_count;
};

// Statistics in two passes, then the advantages (and the stats row) of group g, by one team.
template <typename T, typename Team>
__device__ void normalize_group(const Team& team, const GroupArgs<T>& a, int64_t g) {
  const AdvantageProblem& p = a.p;
  const int64_t columns = p.columns();
  const int64_t stat_columns = p.stat_columns();
  const int32_t* group_rows = a.rows + a.offsets[g];
  const int64_t count = a.offsets[g + 1] - a.offsets[g];
  const int rank = team.rank();
  const int stride = team.size();
  double size = 0.0;
  for (int64_t k = rank; k < count; k += stride) size += a.finite[group_rows[k]];
  size = team.sum(size);

  for (int64_t s = 0; s < stat_columns; ++s) {
    const ElementMap map = element_map(p, s);
    const int64_t elements = count * map.per_row;
    FirstMoments first;
    for (int64_t e = rank; e < elements; e += stride) {
      int64_t k, c;
      map.locate(e, k, c);
      const int64_t i = group_rows[k];
      if (!a.finite[i] || !math::column_counted(p.column_mask, c)) continue;
      first.add(math::value_at(a.rewards + i * p.width, c, p.gains));
    }
    first = team_merge(team, first);
    const double mean = first.mean();
    double squares = 0.0;
    for (int64_t e = rank; e < elements; e += stride) {
      int64_t k, c;
      map.locate(e, k, c);
      const int64_t i = group_rows[k];
      if (!a.finite[i] || !math::column_counted(p.column_mask, c)) continue;
      const double d = math::value_at(a.rewards + i * p.width, c, p.gains) - mean;
      squares += d * d;
    }
    squares = team.sum(squares);
    const double group_std = math::std_from(squares, first.count, p.ddof);
    const double divisor = a.batch ? a.batch[stat_columns + s] : group_std;
    const bool all_equal = a.batch ? a.batch[2 * stat_columns + s] != 0.0 : first.all_equal();
    const bool zero = all_equal || size <= 1.0;
    const double scale = math::inverse_spread(divisor, p);
    for (int64_t e = rank; e < elements; e += stride) {
      int64_t k, c;
      map.locate(e, k, c);
      const int64_t i = group_rows[k];
      const bool keep = a.finite[i] && !zero && math::column_counted(p.column_mask, c);
      a.out[i * columns + c] =
          keep ? static_cast<T>(math::standardize(
                     math::value_at(a.rewards + i * p.width, c, p.gains), mean, scale, p))
               : T(0);
    }
    if (a.stats.requested() && rank == 0) {
      a.stats.mean[g * stat_columns + s] = mean;
      a.stats.std[g * stat_columns + s] = divisor;
      a.stats.zero_std[g * stat_columns + s] = zero;
    }
  }
  if (a.stats.requested() && rank == 0) {
    a.stats.group_ids[g] = a.keys_sorted[a.offsets[g]];
    a.stats.size[g] = static_cast<int64_t>(size);
  }
}

// One warp per group (grid-stride over the G groups); large groups are queued for the blocks.
template <typename T>
__global__ void __launch_bounds__(kThreads) normalize_groups_kernel(GroupArgs<T> a) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t groups = *a.group_count;
  for (int64_t g = warp; g < groups; g += warps) {
    const int64_t values = static_cast<int64_t>(a.offsets[g + 1] - a.offsets[g]) * a.p.columns();
    if (values > kWarpGroupValues) {
      // an integer queue: its order varies, but each queued group is still reduced by exactly
      // one block in a fixed order
      if ((threadIdx.x & 31) == 0) a.large_groups[atomicAdd(a.large_count, 1)] = static_cast<int32_t>(g);
      continue;
    }
    normalize_group(WarpTeam{}, a, g);
  }
}

// One block per queued large group.
template <typename T>
__global__ void __launch_bounds__(kBlockTeamThreads) normalize_large_groups_kernel(GroupArgs<T> a) {
  __shared__ double scratch[33];
  const BlockTeam team{scratch};
  const int queued = *a.large_count;
  for (int j = blockIdx.x; j < queued; j += gridDim.x) normalize_group(team, a, a.large_groups[j]);
}

}  // namespace

size_t advantages_cuda_workspace_bytes(const AdvantageProblem& p) {
  if (p.rows == 0) return 0;
  return carve(p, nullptr).total_bytes;
}

template <typename T>
void advantages_cuda(const AdvantageProblem& p, const T* rewards, const int64_t* group_ids, T* out,
                     const GroupStatsBuffers& stats, int64_t* counts, void* workspace,
                     size_t workspace_bytes, void* stream_handle) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  check(cudaMemsetAsync(counts, 0, 2 * sizeof(int64_t), stream), "clearing the counts");
  if (p.rows == 0) return;
  if (p.rows > INT32_MAX - 1) throw std::invalid_argument("sfgrpo advantages_cuda: more than 2^31 - 2 rows");
  const int n = static_cast<int>(p.rows);
  Workspace ws = carve(p, workspace);
  if (ws.total_bytes > workspace_bytes) {
    throw std::invalid_argument("sfgrpo advantages_cuda: workspace too small (" +
                                std::to_string(workspace_bytes) + " < " +
                                std::to_string(ws.total_bytes) + " bytes)");
  }

  check(cudaMemsetAsync(ws.large_count, 0, sizeof(int32_t), stream), "clearing the queue");
  auto* nonfinite = reinterpret_cast<unsigned long long*>(counts + 1);
  size_t cub_bytes = ws.cub_bytes;
  // Per-group statistics are reported in ascending id order: only then must the groups be
  // sorted by id; otherwise grouping by hash slot gives the same advantages with a short sort.
  const bool hashed = !stats.requested() && n < (1 << 30);  // slot numbers fit 32 bits
  if (hashed) {
    const int64_t slots = hash_slots(n);
    check(cudaMemsetAsync(ws.table, 0xFF, sizeof(unsigned long long) * slots, stream), "clearing the table");
    hash_rows_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        rewards, group_ids, n, p.width, ws.table, static_cast<unsigned long long>(slots - 1),
        ws.slot_keys, ws.rows_in, ws.finite, nonfinite);
    check(cudaGetLastError(), "hash_rows_kernel launch");
    check(cub::DeviceRadixSort::SortPairs(ws.cub_temp, cub_bytes, ws.slot_keys, ws.slots_sorted,
                                          ws.rows_in, ws.rows_sorted, n, 0, slot_bits(slots), stream),
          "slot radix sort");
    segment_heads_kernel<uint32_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        ws.slots_sorted, n, ws.heads);
  } else {
    prepare_rows_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        rewards, n, p.width, ws.rows_in, ws.finite, nonfinite);
    check(cudaGetLastError(), "prepare_rows_kernel launch");
    check(cub::DeviceRadixSort::SortPairs(ws.cub_temp, cub_bytes, group_ids, ws.keys_sorted,
                                          ws.rows_in, ws.rows_sorted, n, 0, 64, stream),
          "radix sort");
    segment_heads_kernel<int64_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        ws.keys_sorted, n, ws.heads);
  }
  check(cudaGetLastError(), "segment_heads_kernel launch");
  cub_bytes = ws.cub_bytes;
  check(cub::DeviceScan::InclusiveSum(ws.cub_temp, cub_bytes, ws.heads, ws.segment, n, stream),
        "scan");
  segment_offsets_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(ws.heads, ws.segment,
                                                                            n, ws.offsets, counts);
  check(cudaGetLastError(), "segment_offsets_kernel launch");

  const double* batch = nullptr;
  if (p.global_std) {
    batch_moments_kernel<T><<<1, kBatchThreads, 0, stream>>>(p, rewards, ws.finite, ws.batch);
    check(cudaGetLastError(), "batch_moments_kernel launch");
    batch = ws.batch;
  }
  GroupArgs<T> args{p,          rewards, hashed ? nullptr : ws.keys_sorted, ws.rows_sorted, ws.offsets,
                    ws.finite,  counts,  batch,          stats,          out,
                    ws.large_groups, ws.large_count};
  normalize_groups_kernel<T><<<blocks_for(n, kWarpsPerBlock), kThreads, 0, stream>>>(args);
  check(cudaGetLastError(), "normalize_groups_kernel launch");
  // At most values / (kWarpGroupValues + 1) groups can be large: no launch when none can be.
  const int64_t most_large = n * p.columns() / (kWarpGroupValues + 1);
  if (most_large > 0) {
    const int blocks = static_cast<int>(most_large < kMaxLargeBlocks ? most_large : kMaxLargeBlocks);
    normalize_large_groups_kernel<T><<<blocks, kBlockTeamThreads, 0, stream>>>(args);
    check(cudaGetLastError(), "normalize_large_groups_kernel launch");
  }
}

template void advantages_cuda<float>(const AdvantageProblem&, const float*, const int64_t*, float*,
                                     const GroupStatsBuffers&, int64_t*, void*, size_t, void*);
template void advantages_cuda<double>(const AdvantageProblem&, const double*, const int64_t*,
                                      double*, const GroupStatsBuffers&, int64_t*, void*, size_t,
                                      void*);

}  // namespace sfgrpo
