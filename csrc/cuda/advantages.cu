// CUDA advantage engine: the phases of sfgrpo/fixed_point_advantages.h, one kernel each, all on
// the caller's stream, nothing waits for the device. Without per-group statistics a call is one
// memset and four kernels: no sort, no scan, no host-visible group count. Values are summed as
// 64-bit fixed-point integers, so the atomics give the same bits in any order (and the same bits
// as the host emulation of the same code, csrc/cpu/advantages_emulated.cpp).
//
// Per-group statistics are reported in ascending id order: then the groups' first rows (claimed
// in phase 1) are sorted by id with CUB between phases 1 and 2.
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>

#include <climits>
#include <stdexcept>
#include <string>

#include "sfgrpo/advantages.h"
#include "sfgrpo/fixed_point_advantages.h"

namespace sfgrpo {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("sfgrpo advantages_cuda: ") + what + ": " + cudaGetErrorString(err));
  }
}

int blocks_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks);
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

// Carves the workspace into aligned pieces; with base == nullptr it only measures.
Carved carve(const AdvantageProblem& p, void* base) {
  const int64_t n = p.rows;
  const int64_t accumulators = (n + 1) * p.stat_columns();
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
  w.keys = static_cast<uint64_t*>(take(sizeof(uint64_t) * (w.slots + 1)));
  w.slot_rep = static_cast<uint32_t*>(take(sizeof(uint32_t) * (w.slots + 1)));
  w.counters = static_cast<uint64_t*>(take(sizeof(uint64_t) * 2));
  w.size = static_cast<uint32_t*>(take(sizeof(uint32_t) * n));
  w.hi = static_cast<uint64_t*>(take(sizeof(uint64_t) * accumulators));
  w.lo = static_cast<uint64_t*>(take(sizeof(uint64_t) * accumulators));
  w.sum = static_cast<uint64_t*>(take(sizeof(uint64_t) * accumulators));
  w.squares = static_cast<uint64_t*>(take(sizeof(uint64_t) * accumulators));
  c.zeroed_bytes = at;
  w.row_rep = static_cast<int32_t*>(take(sizeof(int32_t) * n));
  w.finite = static_cast<uint8_t*>(take(n));
  w.claim_ids = static_cast<int64_t*>(take(sizeof(int64_t) * n));
  w.claim_reps = static_cast<int32_t*>(take(sizeof(int32_t) * n));
  c.sorted_ids = static_cast<int64_t*>(take(sizeof(int64_t) * n));
  c.sorted_reps = static_cast<int32_t*>(take(sizeof(int32_t) * n));
  w.sorted_ids = c.sorted_ids;
  w.sorted_reps = c.sorted_reps;
  c.cub_bytes = sort_temp_bytes(n);
  c.cub_temp = take(c.cub_bytes);
  c.total_bytes = at + 256;
  return c;
}

// ---------------------------------------------------------------------------------- kernels
enum class Phase { kInsert, kSum, kSquares };

// Phases 1-3: grid-stride loops in which every lane of a warp runs the same iterations (the
// phases reduce across the warp for the batch statistics); lanes past the last row are inactive.
template <typename T, Phase kPhase>
__global__ void __launch_bounds__(kThreads) rows_kernel(fixed::Args<T> a) {
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < a.p.rows;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const bool active = i < a.p.rows;
    if (kPhase == Phase::kInsert) {
      fixed::insert_row(a, i, active);
    } else if (kPhase == Phase::kSum) {
      fixed::sum_row(a, i, active);
    } else {
      fixed::squares_row(a, i, active);
    }
  }
}

// Advantages of every row, the statistics rows (ids sorted) and the counts.
template <typename T>
__global__ void __launch_bounds__(kThreads) write_kernel(fixed::Args<T> a) {
  const int64_t groups = static_cast<int64_t>(a.w.counters[0]);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.p.rows; i += stride) {
    fixed::write_row(a, i);
    if (a.stats.requested() && i < groups) fixed::write_stats_row(a, i);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    a.counts[0] = groups;
    a.counts[1] = static_cast<int64_t>(a.w.counters[1]);
  }
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

size_t advantages_cuda_workspace_bytes(const AdvantageProblem& p) {
  if (p.rows == 0) return 0;
  return carve(p, nullptr).total_bytes;
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
  if (p.rows > INT32_MAX - 1) throw std::invalid_argument("sfgrpo advantages_cuda: more than 2^31 - 2 rows");
  Carved c = carve(p, workspace);
  if (c.total_bytes > workspace_bytes) {
    throw std::invalid_argument("sfgrpo advantages_cuda: workspace too small (" + std::to_string(workspace_bytes) +
                                " < " + std::to_string(c.total_bytes) + " bytes)");
  }
  if (!stats.requested()) {  // nothing to claim in order
    c.w.claim_ids = nullptr;
    c.w.claim_reps = nullptr;
  }
  check(cudaMemsetAsync(workspace, 0, c.zeroed_bytes, stream), "clearing the accumulators");
  const fixed::Args<T> args{p, rewards, group_ids, out, stats, counts, c.w};
  const int blocks = blocks_for(p.rows);
  rows_kernel<T, Phase::kInsert><<<blocks, kThreads, 0, stream>>>(args);
  check(cudaGetLastError(), "insert kernel launch");
  if (stats.requested()) {
    pad_claims_kernel<<<blocks, kThreads, 0, stream>>>(c.w, p.rows);
    check(cudaGetLastError(), "pad_claims_kernel launch");
    size_t cub_bytes = c.cub_bytes;
    check(cub::DeviceRadixSort::SortPairs(c.cub_temp, cub_bytes, c.w.claim_ids, c.sorted_ids, c.w.claim_reps,
                                          c.sorted_reps, static_cast<int>(p.rows), 0, 64, stream),
          "radix sort of the group ids");
  }
  rows_kernel<T, Phase::kSum><<<blocks, kThreads, 0, stream>>>(args);
  check(cudaGetLastError(), "sum kernel launch");
  rows_kernel<T, Phase::kSquares><<<blocks, kThreads, 0, stream>>>(args);
  check(cudaGetLastError(), "squares kernel launch");
  write_kernel<T><<<blocks, kThreads, 0, stream>>>(args);
  check(cudaGetLastError(), "write_kernel launch");
}

template void advantages_cuda<float>(const AdvantageProblem&, const float*, const int64_t*, float*,
                                     const GroupStatsBuffers&, int64_t*, void*, size_t, void*);
template void advantages_cuda<double>(const AdvantageProblem&, const double*, const int64_t*, double*,
                                      const GroupStatsBuffers&, int64_t*, void*, size_t, void*);

}  // namespace sfgrpo
