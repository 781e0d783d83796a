// CUDA advantage engine: the phases of sfgrpo/fixed_point_advantages.h, one kernel each, all on
// the caller's stream, nothing waits for the device. Without per-group statistics a call is one
// memset and three kernels (insert, moments, write): no sort, no scan, no host-visible group
// count. Values are summed as 64-bit fixed-point integers, so the atomics give the same bits in any
// order (and the same bits as the host emulation of the same code,
// csrc/cpu/advantages_emulated.cpp).
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
#include "sfgrpo/fixed_point_blocks.h"

namespace sfgrpo {
namespace {

using fixed::blocks_for;
using fixed::kThreads;

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
// Phases 1 and 2: warps of 32 consecutive rows in a grid-stride loop, their common accumulators
// staged in shared memory per block (sfgrpo/fixed_point_blocks.h, which the host emulation runs
// too).
template <typename T, bool kInsert>
__global__ void __launch_bounds__(kThreads) warp_rows_kernel(fixed::Args<T> a, int batch_words) {
  extern __shared__ unsigned long long staged[];  // fixed::staged_words(batch_words)
  fixed::warp_rows_block<kInsert>(a, batch_words, reinterpret_cast<uint64_t*>(staged),
                                  fixed::Block{blockIdx.x, gridDim.x});
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

static void check_rows(const AdvantageProblem& p) {
  // row indices are 32-bit in the hash table and CUB's sort; checked before the sort's size query
  if (p.rows > INT32_MAX - 1) throw std::invalid_argument("sfgrpo advantages_cuda: more than 2^31 - 2 rows");
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
  const bool with_stats = stats.requested();
  Carved c = carve(p, workspace, with_stats);
  if (c.total_bytes > workspace_bytes) {
    throw std::invalid_argument("sfgrpo advantages_cuda: workspace too small (" + std::to_string(workspace_bytes) +
                                " < " + std::to_string(c.total_bytes) + " bytes)");
  }
  // one memset and three kernels (plus the claims' sort with statistics); no host synchronisation
  check(cudaMemsetAsync(workspace, 0, c.zeroed_bytes, stream), "clearing the accumulators");
  const fixed::Args<T> args{p, rewards, group_ids, out, stats, counts, c.w};
  const int blocks = blocks_for(p.rows);
  const int insert_batch = fixed::staged_batch_words(p, true);
  warp_rows_kernel<T, true><<<blocks, kThreads, sizeof(uint64_t) * fixed::staged_words(insert_batch), stream>>>(
      args, insert_batch);
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
  warp_rows_kernel<T, false><<<blocks, kThreads, sizeof(uint64_t) * fixed::staged_words(moments_batch), stream>>>(
      args, moments_batch);
  check(cudaGetLastError(), "moments kernel launch");
  write_kernel<T><<<blocks, kThreads, 0, stream>>>(args);
  check(cudaGetLastError(), "write_kernel launch");
}

template void advantages_cuda<float>(const AdvantageProblem&, const float*, const int64_t*, float*,
                                     const GroupStatsBuffers&, int64_t*, void*, size_t, void*);
template void advantages_cuda<double>(const AdvantageProblem&, const double*, const int64_t*, double*,
                                      const GroupStatsBuffers&, int64_t*, void*, size_t, void*);

}  // namespace sfgrpo
