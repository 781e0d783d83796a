// Advantage engine: group-normalised advantages on raw pointers. Plain C++ (and CUDA): no torch,
// no Python. The Python side (sfgrpo/ops/advantages.py) validates every tensor before calling in.
#pragma once
#include <cstddef>
#include <cstdint>

// Methods of the plain structs below are callable from device code too.
#if defined(__CUDACC__)
#define SFGRPO_HD __host__ __device__ __forceinline__
#define SFGRPO_UNROLL _Pragma("unroll")  // fixed-count loops over register arrays: no local memory
#else
#define SFGRPO_HD inline
#define SFGRPO_UNROLL
#endif

namespace sfgrpo {

// One normalisation problem. `rewards` is a row-major, contiguous [rows, width] matrix; the values
// that get normalised are either its columns (Flow-GRPO, `gains == false`) or the differences of
// consecutive columns (stepwise gains, `gains == true`, columns = width - 1).
struct AdvantageProblem {
  int64_t rows = 0;
  int64_t width = 0;
  bool gains = false;
  // true: one mean/std per group over all its unmasked columns (the paper's joint normalisation);
  // false: one mean/std per (group, column) (per-step normalisation, or K reward columns).
  bool pooled = false;
  // Divide by the std of the whole batch (same pooling) instead of the group's (Flow-GRPO's
  // global_std); the mean stays the group's.
  bool global_std = false;
  int ddof = 0;  // 0: population std, 1: unbiased
  double eps = 0.0;
  bool clip = false;
  double clip_value = 0.0;
  // [columns] 0/1 or nullptr. Masked columns stay out of every statistic and get advantage 0.
  // A host pointer for the CPU engine, a device pointer for the CUDA engine.
  const uint8_t* column_mask = nullptr;

  SFGRPO_HD int64_t columns() const { return gains ? width - 1 : width; }
  SFGRPO_HD int64_t stat_columns() const { return pooled ? 1 : columns(); }
};

// Optional per-group statistics. Buffers are padded to `rows` groups (the real count G <= rows is
// returned); row g describes the g-th smallest group id. All pointers null = no statistics.
struct GroupStatsBuffers {
  int64_t* group_ids = nullptr;  // [rows]
  double* mean = nullptr;        // [rows, stat_columns]
  double* std = nullptr;         // [rows, stat_columns], the std that was divided by
  int64_t* size = nullptr;       // [rows], finite samples of the group
  uint8_t* zero_std = nullptr;   // [rows, stat_columns], 1: advantages of that group/column are 0

  SFGRPO_HD bool requested() const { return group_ids != nullptr; }
};

struct AdvantageCounts {
  int64_t groups = 0;
  int64_t nonfinite_rows = 0;
};

// Semantics shared by both engines (they match sfgrpo.reference):
// - a row with any NaN/inf reward is left out of the statistics and gets advantage 0 (the caller
//   turns a non-zero `nonfinite_rows` into an error when that is its policy);
// - advantage = (value - group mean) / (std + eps), std with `ddof`; 0 when the group has at most
//   one finite row, or when all its counted values are equal (max == min, exact), or when the
//   column is masked; then clamped to [-clip, clip] and rounded to T;
// - sums that depend only on the input (never on the thread count, the launch or the scheduling):
//   the CPU adds doubles in row order, CUDA adds 64-bit fixed-point integers (any order, the same
//   bits), so each engine's results are bitwise reproducible.

// CPU. `num_threads` <= 0 picks a count from the problem size; any count gives the same bits.
template <typename T>
AdvantageCounts advantages_cpu(const AdvantageProblem& problem, const T* rewards,
                               const int64_t* group_ids, T* out, const GroupStatsBuffers& stats,
                               int num_threads);

// The CUDA engine's algorithm (fixed_point_advantages.h) run sequentially on host memory: the
// bits the GPU produces, for tests without a GPU. `as_launched` false: phases 1 and 2 without the
// kernel's blocks and shared-memory staging (warp by warp, every atomic to the global accumulator),
// a reference the launch must not change a bit of. `max_blocks` > 0 caps the grid as the
// cooperative single launch does (fewer blocks, more grid-stride rounds: the same bits).
template <typename T>
AdvantageCounts advantages_cuda_emulated(const AdvantageProblem& problem, const T* rewards,
                                         const int64_t* group_ids, T* out, const GroupStatsBuffers& stats,
                                         bool as_launched = true, int max_blocks = 0);

// Maps arbitrary int64 group ids to dense indices 0..G-1 in order of first appearance.
// Writes out[i] for i < n and returns G. O(n) expected (open-addressing hash table).
int64_t dense_group_index_cpu(const int64_t* ids, int64_t n, int64_t* out);

// Per-step gains of stepwise credit assignment: rewards is row-major [n, steps + 1],
// gains is [n, steps] with gains[i, k] = rewards[i, k + 1] - rewards[i, k].
template <typename T>
void row_gains_cpu(const T* rewards, int64_t n, int64_t steps, T* gains);

#ifdef SFGRPO_WITH_CUDA
// Scratch memory the CUDA engine needs for `problem`, with or without per-group statistics (the
// caller allocates it, e.g. from torch's caching allocator, so the engine itself never calls
// cudaMalloc).
size_t advantages_cuda_workspace_bytes(const AdvantageProblem& problem, bool with_stats);

// CUDA: every pointer is device memory; everything is enqueued on `stream` (a cudaStream_t) with
// no host synchronisation. `counts` (device, 2 x int64) receives {groups, nonfinite rows}.
template <typename T>
void advantages_cuda(const AdvantageProblem& problem, const T* rewards, const int64_t* group_ids,
                     T* out, const GroupStatsBuffers& stats, int64_t* counts, void* workspace,
                     size_t workspace_bytes, void* stream);

// Same as row_gains_cpu on device memory, enqueued on `stream` (a cudaStream_t); no host sync.
template <typename T>
void row_gains_cuda(const T* rewards, int64_t n, int64_t steps, T* gains, void* stream);
#endif

}  // namespace sfgrpo
