// CUDA advantage engine: the phases of sfgrpo/fixed_point_advantages.h, all on the caller's
// stream, nothing waits for the device. Without per-group statistics a call is ONE cooperative
// launch: the accumulators cleared, then phases 1 (insert), 2 (moments), 2b (finalize, only with
// several statistics per group) and 3 (write) with a grid-wide barrier between each, in a grid no
// larger than what the device runs at once. A call's host cost is its launches (a few us each,
// more on a slow host), so one launch instead of a memset and three kernels is most of the call on
// 1M gains. Where a cooperative launch is not available (the device refuses it, a CUDA-graph
// capture is under way, SFGRPO_ADVANTAGES_COOPERATIVE=0), the same phases run as a memset and
// three kernels (four with phase 2b). Either way no sort, no scan, no host-visible group count.
// Values are summed as 64-bit fixed-point integers, so the atomics give the same bits in any order
// and any grid size (and the same bits as the host emulation of the same code,
// csrc/cpu/advantages_emulated.cpp).
//
// Per-group statistics are reported in ascending id order: then the groups' first rows (claimed
// in phase 1) are sorted by id with CUB between phases 1 and 2 (the multi-kernel path).
#include <cuda_runtime.h>

#include <cooperative_groups.h>
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "sfgrpo/advantages.h"
#include "sfgrpo/fixed_point_advantages.h"
#include "sfgrpo/fixed_point_blocks.h"

namespace sfgrpo {
namespace {

using fixed::blocks_for;
using fixed::kThreads;

// Resident blocks per SM the kernels are compiled for (at most 80 registers a thread): 3 x 132 SMs
// (an H100) hold the 391 blocks of 100k rows at once, so the cooperative launch's grid is not cut
// to what fits and no phase runs a second round of blocks.
constexpr int kMinBlocksPerSM = 3;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("sfgrpo advantages_cuda: ") + what + ": " + cudaGetErrorString(err));
  }
}

// ------------------------------------------------------------------------------ workspace
struct Carved {
  fixed::Workspace w;
  size_t zeroed_bytes = 0;  // the accumulators at the start of the workspace
  int64_t* sorted_ids = nullptr;
  int32_t* sorted_reps = nullptr;
  void* cub_temp = nullptr;
  size_t cub_bytes = 0;
  size_t total_bytes = 0;
};

size_t sort_temp_bytes(int64_t n) {
  size_t bytes = 0;
  check(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int64_t*>(nullptr),
                                        static_cast<int64_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                        static_cast<int32_t*>(nullptr), static_cast<int>(n)),
        "radix sort size query");
  return bytes;
}

// Carves the workspace into aligned pieces; with base == nullptr it only measures. The pieces for
// per-group statistics (claims, their sorted copy, CUB's scratch) only `with_stats`: the CUB size
// query costs host time that a call without statistics does not spend.
Carved carve(const AdvantageProblem& p, void* base, bool with_stats) {
  const int64_t n = p.rows;
  const int64_t stat_columns = p.stat_columns();
  Carved c;
  size_t at = 0;
  auto take = [&](size_t bytes) -> void* {
    at = (at + 255) / 256 * 256;
    void* ptr = base ? static_cast<char*>(base) + at : nullptr;
    at += bytes;
    return ptr;
  };
  fixed::Workspace& w = c.w;
  w.slots = fixed::table_slots(n);
  // zeroed: counters and batch accumulators share the first 256 bytes when they fit
  w.counters = static_cast<uint64_t*>(take(sizeof(uint64_t) * (2 + stat_columns * (fixed::kRangeWords + fixed::kMomentWords))));
  w.batch_range = w.counters ? w.counters + 2 : nullptr;
  w.batch_moments = w.batch_range ? w.batch_range + stat_columns * fixed::kRangeWords : nullptr;
  w.table = static_cast<uint32_t*>(take(sizeof(uint32_t) * w.slots));
  w.size = static_cast<uint32_t*>(take(sizeof(uint32_t) * n));
  w.range = static_cast<uint64_t*>(take(sizeof(uint64_t) * n * stat_columns * fixed::kRangeWords));
  c.zeroed_bytes = at;
  w.moments = static_cast<uint64_t*>(take(sizeof(uint64_t) * n * stat_columns * fixed::kMomentWords));
  w.row_rep = static_cast<int32_t*>(take(sizeof(int32_t) * n));
  if (with_stats) {
    w.claim_ids = static_cast<int64_t*>(take(sizeof(int64_t) * n));
    w.claim_reps = static_cast<int32_t*>(take(sizeof(int32_t) * n));
    c.sorted_ids = static_cast<int64_t*>(take(sizeof(int64_t) * n));
    c.sorted_reps = static_cast<int32_t*>(take(sizeof(int32_t) * n));
    w.sorted_ids = c.sorted_ids;
    w.sorted_reps = c.sorted_reps;
    c.cub_bytes = sort_temp_bytes(n);
    c.cub_temp = take(c.cub_bytes);
  }
  c.total_bytes = at + 256;
  return c;
}

// ---------------------------------------------------------------------------------- kernels
// The block's shared memory: the staged accumulator words, then (`staged_rows`) the rows' stage.
template <typename T>
__device__ T* row_stage(unsigned long long* shared, int words, bool staged_rows) {
  return staged_rows ? reinterpret_cast<T*>(shared + words) : nullptr;
}

// The launch's side of that layout: bytes of shared memory for `batch_words` staged words and a
// stage of `stage_bytes` (0: rows read from global memory).
static size_t block_shared_bytes(int batch_words, int64_t stage_bytes) {
  return sizeof(uint64_t) * fixed::staged_words(batch_words) + static_cast<size_t>(stage_bytes);
}

// Phases 1 and 2: warps of 32 consecutive rows in a grid-stride loop, their common accumulators
// and rows staged in shared memory per block (sfgrpo/fixed_point_blocks.h, which the host emulation
// runs too).
template <typename T, bool kInsert>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    warp_rows_kernel(fixed::Args<T> a, int batch_words, bool staged_rows) {
  // fixed::staged_words(batch_words) words, then fixed::stage_bytes when staged_rows
  extern __shared__ unsigned long long staged[];
  fixed::warp_rows_block<kInsert>(a, batch_words, reinterpret_cast<uint64_t*>(staged),
                                  row_stage<T>(staged, fixed::staged_words(batch_words), staged_rows),
                                  false, fixed::Block{blockIdx.x, gridDim.x});
}

// Phase 2b (fixed::finalized problems only): the statistics of the groups that the block's warps of
// rows claimed.
template <typename T>
__device__ void finalize_rows(const fixed::Args<T>& a) {
  const fixed::Block block{blockIdx.x, gridDim.x};
  for (int64_t base = fixed::block::first_warp(block); base < a.p.rows; base = fixed::block::next_warp(block, base)) {
    fixed::finalize_warp(a, base);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) finalize_kernel(fixed::Args<T> a) {
  finalize_rows(a);
}

// Phase 3: the advantages of the block's warps of rows (a coalesced tile each), then the statistics
// rows (ids sorted) in a grid-stride loop, and the counts.
template <typename T>
__device__ void write_rows(const fixed::Args<T>& a, const T* kept_stage) {
  const fixed::Block block{blockIdx.x, gridDim.x};
  for (int64_t base = fixed::block::first_warp(block); base < a.p.rows; base = fixed::block::next_warp(block, base)) {
    fixed::write_warp(a, base, fixed::kept_or_global_rows(a, base, kept_stage));
  }
  const int64_t groups = static_cast<int64_t>(a.w.counters[0]);
  if (a.stats.requested()) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < groups; j += stride) {
      fixed::write_stats_row(a, j);
    }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    a.counts[0] = groups;
    a.counts[1] = static_cast<int64_t>(a.w.counters[1]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) write_kernel(fixed::Args<T> a) {
  write_rows(a, static_cast<const T*>(nullptr));
}

// The whole call without statistics in one cooperative launch (every block resident, so the grid
// barrier can wait for all of them): clear the accumulators (what the multi-kernel path's memset
// clears), then the three phases, each reading what the previous one wrote. The barrier orders
// memory too (cooperative_groups: writes before grid.sync() are visible to every thread after it).
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    single_launch_kernel(fixed::Args<T> a, uint64_t* zeroed, int64_t zeroed_words, int insert_batch,
                         int moments_batch, bool staged_rows) {
  // fixed::staged_words(max of the two batches), then fixed::stage_bytes when staged_rows
  extern __shared__ unsigned long long staged[];
  T* stage = row_stage<T>(staged, fixed::staged_words(max(insert_batch, moments_batch)), staged_rows);
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // 16-byte stores (the workspace starts 256-byte aligned), the odd last word on its own
  uint4* zeroed_pairs = reinterpret_cast<uint4*>(zeroed);
  for (int64_t k = first; k < zeroed_words / 2; k += stride) zeroed_pairs[k] = make_uint4(0, 0, 0, 0);
  if (first == 0 && zeroed_words % 2 != 0) zeroed[zeroed_words - 1] = 0;
  grid.sync();
  const fixed::Block block{blockIdx.x, gridDim.x};
  fixed::warp_rows_block<true>(a, insert_batch, reinterpret_cast<uint64_t*>(staged), stage, false, block);
  grid.sync();
  // one round: each warp's stage still holds its rows, phase 2 reads them without copying them again
  const bool kept = stage != nullptr && fixed::one_round(a.p.rows, block);
  fixed::warp_rows_block<false>(a, moments_batch, reinterpret_cast<uint64_t*>(staged), stage, kept, block);
  grid.sync();
  if (fixed::finalized(a.p)) {
    finalize_rows(a);
    grid.sync();
  }
  write_rows(a, kept ? stage : nullptr);  // the staged rows again, for the tile's loads
}

// Claims past the last group sort last: the largest key, and (the sort is stable) after any real
// group whose id is that key too.
__global__ void pad_claims_kernel(fixed::Workspace w, int64_t n) {
  const int64_t groups = static_cast<int64_t>(w.counters[0]);
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (j >= groups) {
      w.claim_ids[j] = LLONG_MAX;
      w.claim_reps[j] = -1;
    }
  }
}

}  // namespace

// ------------------------------------------------------------------------- single launch
// A/B switches, read per call: unset or anything but 0/false/no/off means on.
//   SFGRPO_ADVANTAGES_COOPERATIVE=0  the memset + kernels instead of the single cooperative launch
//   SFGRPO_ADVANTAGES_STAGE_ROWS=0   every phase reads the rows from global memory (as rows too wide
//                                    for the stage do) instead of staging them in shared memory
static bool switch_on(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr || !(value[0] == '0' || value[0] == 'f' || value[0] == 'F' || value[0] == 'n' ||
                               value[0] == 'N' || (value[0] == 'o' && value[1] == 'f'));
}

static bool single_launch_wanted() { return switch_on("SFGRPO_ADVANTAGES_COOPERATIVE"); }

// Shared memory for the rows' stage: 0 reads them from global memory (same bits either way).
template <typename T>
static int64_t row_stage_bytes(const AdvantageProblem& p) {
  return switch_on("SFGRPO_ADVANTAGES_STAGE_ROWS") ? fixed::stage_bytes(p, sizeof(T)) : 0;
}

static bool capturing(cudaStream_t stream) {
  // a graph replays what was captured, possibly next to other work: its calls take the plain launches
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    cudaGetLastError();
    return true;  // unknown: the launches that are always allowed
  }
  return status != cudaStreamCaptureStatusNone;
}

constexpr int kMaxDevices = 64;

// Shared memory of a single launch, in classes of kSharedStep bytes: the occupancy is asked once per
// device and class, for the class's largest size (a launch asks for at most 48 KiB: no opt-in).
constexpr size_t kSharedStep = 2048;
constexpr size_t kMaxShared = sizeof(uint64_t) * fixed::kMaxStagedWords + fixed::kMaxStageBytes;
static_assert(kMaxShared <= 48 * 1024, "a launch asking for more than 48 KiB of shared memory needs an opt-in");
constexpr int kSharedClasses = static_cast<int>((kMaxShared + kSharedStep - 1) / kSharedStep) + 1;

// Blocks of single_launch_kernel<T> that the current device runs at once with `shared` bytes of
// shared memory each, 0 when it does not do cooperative launches. Wide staged rows lower it on a
// GPU with little shared memory per SM (a launch's grid must be resident at once: fewer blocks take
// more grid-stride rounds); an H100's registers allow 3 blocks per SM whatever the stage.
template <typename T>
static int resident_blocks(size_t shared) {
  static std::atomic<int> known[kMaxDevices][kSharedClasses];  // 0: not asked yet, else blocks + 1
  int device = 0;
  check(cudaGetDevice(&device), "current device");
  const int size_class = static_cast<int>((shared + kSharedStep - 1) / kSharedStep);
  if (device < 0 || device >= kMaxDevices || size_class >= kSharedClasses) return 0;
  int cached = known[device][size_class].load(std::memory_order_relaxed);
  if (cached != 0) return cached - 1;
  int cooperative = 0, sms = 0, per_sm = 0;
  check(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device), "device attributes");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "device attributes");
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, single_launch_kernel<T>, kThreads,
                                                      std::min(size_class * kSharedStep, kMaxShared)),
        "occupancy query");
  const int blocks = cooperative ? per_sm * sms : 0;
  known[device][size_class].store(blocks + 1, std::memory_order_relaxed);
  return blocks;
}

// The call in one cooperative launch; false (nothing enqueued) when that is not possible here.
template <typename T>
static bool launch_single(const fixed::Args<T>& args, const Carved& c, cudaStream_t stream) {
  if (!single_launch_wanted() || capturing(stream)) return false;
  const fixed::Args<T> a = args;
  uint64_t* zeroed = reinterpret_cast<uint64_t*>(c.w.counters);  // the workspace's start
  int64_t zeroed_words = static_cast<int64_t>((c.zeroed_bytes + sizeof(uint64_t) - 1) / sizeof(uint64_t));
  int insert_batch = fixed::staged_batch_words(a.p, true);
  int moments_batch = fixed::staged_batch_words(a.p, false);
  const int64_t stage_bytes = row_stage_bytes<T>(a.p);
  bool staged_rows = stage_bytes > 0;
  const size_t shared = block_shared_bytes(std::max(insert_batch, moments_batch), stage_bytes);
  const int resident = resident_blocks<T>(shared);
  if (resident <= 0) return false;
  const int blocks = fixed::grid_blocks(a.p.rows, resident);
  void* params[] = {const_cast<fixed::Args<T>*>(&a), &zeroed, &zeroed_words, &insert_batch, &moments_batch,
                    &staged_rows};
  const cudaError_t err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(single_launch_kernel<T>),
                                                      dim3(blocks), dim3(kThreads), params, shared, stream);
  if (err == cudaSuccess) return true;
  cudaGetLastError();  // not a sticky error: the plain launches follow
  return false;
}

static void check_rows(const AdvantageProblem& p) {
  // row indices are 32-bit in the hash table and CUB's sort; checked before the sort's size query
  if (p.rows > INT32_MAX - 1) throw std::invalid_argument("sfgrpo advantages_cuda: more than 2^31 - 2 rows");
  fixed::check_width(p, "sfgrpo advantages_cuda");  // phase 3 indexes a warp's tile of rows in 32 bits
}

size_t advantages_cuda_workspace_bytes(const AdvantageProblem& p, bool with_stats) {
  if (p.rows == 0) return 0;
  check_rows(p);
  return carve(p, nullptr, with_stats).total_bytes;
}

template <typename T>
void advantages_cuda(const AdvantageProblem& p, const T* rewards, const int64_t* group_ids, T* out,
                     const GroupStatsBuffers& stats, int64_t* counts, void* workspace, size_t workspace_bytes,
                     void* stream_handle) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  if (p.rows == 0) {
    check(cudaMemsetAsync(counts, 0, 2 * sizeof(int64_t), stream), "clearing the counts");
    return;
  }
  check_rows(p);
  if (reinterpret_cast<uintptr_t>(workspace) % 256 != 0) {  // carve's pieces are 256-byte aligned from it
    throw std::invalid_argument("sfgrpo advantages_cuda: the workspace must be 256-byte aligned");
  }
  const bool with_stats = stats.requested();
  Carved c = carve(p, workspace, with_stats);
  if (c.total_bytes > workspace_bytes) {
    throw std::invalid_argument("sfgrpo advantages_cuda: workspace too small (" + std::to_string(workspace_bytes) +
                                " < " + std::to_string(c.total_bytes) + " bytes)");
  }
  const fixed::Args<T> args{p, rewards, group_ids, out, stats, counts, c.w};
  if (!with_stats && launch_single(args, c, stream)) return;
  // one memset and three or four kernels (plus the claims' sort with statistics); no host synchronisation
  check(cudaMemsetAsync(workspace, 0, c.zeroed_bytes, stream), "clearing the accumulators");
  const int blocks = blocks_for(p.rows);
  const int insert_batch = fixed::staged_batch_words(p, true);
  const int64_t stage_bytes = row_stage_bytes<T>(p);
  warp_rows_kernel<T, true>
      <<<blocks, kThreads, block_shared_bytes(insert_batch, stage_bytes), stream>>>(
          args, insert_batch, stage_bytes > 0);
  check(cudaGetLastError(), "insert kernel launch");
  if (with_stats) {
    pad_claims_kernel<<<blocks, kThreads, 0, stream>>>(c.w, p.rows);
    check(cudaGetLastError(), "pad_claims_kernel launch");
    size_t cub_bytes = c.cub_bytes;
    check(cub::DeviceRadixSort::SortPairs(c.cub_temp, cub_bytes, c.w.claim_ids, c.sorted_ids, c.w.claim_reps,
                                          c.sorted_reps, static_cast<int>(p.rows), 0, 64, stream),
          "radix sort of the group ids");
  }
  const int moments_batch = fixed::staged_batch_words(p, false);
  warp_rows_kernel<T, false>
      <<<blocks, kThreads, block_shared_bytes(moments_batch, stage_bytes), stream>>>(
          args, moments_batch, stage_bytes > 0);
  check(cudaGetLastError(), "moments kernel launch");
  if (fixed::finalized(p)) {
    finalize_kernel<T><<<blocks, kThreads, 0, stream>>>(args);
    check(cudaGetLastError(), "finalize_kernel launch");
  }
  write_kernel<T><<<blocks, kThreads, 0, stream>>>(args);
  check(cudaGetLastError(), "write_kernel launch");
}

template void advantages_cuda<float>(const AdvantageProblem&, const float*, const int64_t*, float*,
                                     const GroupStatsBuffers&, int64_t*, void*, size_t, void*);
template void advantages_cuda<double>(const AdvantageProblem&, const double*, const int64_t*, double*,
                                      const GroupStatsBuffers&, int64_t*, void*, size_t, void*);

}  // namespace sfgrpo
