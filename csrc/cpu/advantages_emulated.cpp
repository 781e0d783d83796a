// The CUDA advantage engine's phases (sfgrpo/fixed_point_advantages.h) run sequentially on the
// host: the same code, warp by warp (the 32 lanes of a warp as arrays, the warp collectives and
// the run-segmented reductions on those arrays, plain read-modify-writes for the atomics), and
// phases 1 and 2 in the kernel's launch geometry, block by block with the kernel's shared-memory
// staging and flush (sfgrpo/fixed_point_blocks.h), so the device algorithm is tested without a GPU
// and, on a GPU, its results must be these bits. Not a production path (the CPU engine,
// advantages.cpp, is faster on a CPU).
#include <algorithm>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "sfgrpo/advantages.h"
#include "sfgrpo/fixed_point_advantages.h"
#include "sfgrpo/fixed_point_blocks.h"

namespace sfgrpo {
namespace {

// What memory holds before anything writes it (the device's is undefined): a step that reads a
// word before it is cleared gets garbage here too.
constexpr uint64_t kUnwritten = 0x5a5a5a5a5a5a5a5aULL;

// Phase 1 (kInsert) or 2 as warp_rows_kernel runs it, or (`max_blocks` > 0) as the cooperative
// single launch does, its grid capped at max_blocks: every block of the grid in turn, `staged` and
// the block's part of `stages` standing for its shared memory. The single launch's blocks keep their
// shared memory from phase to phase when one round covers the batch (`persistent`: `stages` is then
// the grid's, kept by the caller for phases 2 and 3); separate kernels do not (phase 2 finds NaNs
// there). Not `as_launched`: warp by warp over the rows, no staging of accumulators or rows.
template <bool kInsert, typename T>
void run_warp_rows(const fixed::Args<T>& a, bool as_launched, int max_blocks, bool persistent, std::vector<T>& stages) {
  if (!as_launched) {
    for (int64_t base = 0; base < a.p.rows; base += fixed::kWarpSize) {
      if (kInsert) {
        fixed::insert_warp(a, base, fixed::global_rows(a, base));
      } else {
        fixed::moments_warp(a, base, fixed::global_rows(a, base));
      }
    }
    return;
  }
  const int batch_words = fixed::staged_batch_words(a.p, kInsert);
  std::vector<uint64_t> staged(fixed::staged_words(batch_words));
  const size_t stage_values = static_cast<size_t>(fixed::stage_bytes(a.p, sizeof(T))) / sizeof(T);
  const unsigned blocks = static_cast<unsigned>(fixed::grid_blocks(a.p.rows, max_blocks));
  const bool kept = !kInsert && persistent;  // else one block's stage stands for each in turn
  if (!kept) {
    // garbage until a warp copies its rows there: a phase that read a row it did not stage would get
    // NaNs, not the rewards
    stages.assign(stage_values * (persistent ? blocks : 1), T(0));
    std::memset(stages.data(), 0xff, stages.size() * sizeof(T));
  }
  for (unsigned b = 0; b < blocks; ++b) {
    std::fill(staged.begin(), staged.end(), kUnwritten);
    T* stage = stage_values == 0 ? nullptr : stages.data() + (persistent ? b * stage_values : 0);
    if (!persistent && b > 0) std::memset(stage, 0xff, stage_values * sizeof(T));
    fixed::warp_rows_block<kInsert>(a, batch_words, staged.data(), stage, kept, fixed::Block{b, blocks});
  }
}

}  // namespace

template <typename T>
AdvantageCounts advantages_cuda_emulated(const AdvantageProblem& p, const T* rewards, const int64_t* group_ids,
                                         T* out, const GroupStatsBuffers& stats, bool as_launched,
                                         int max_blocks) {
  AdvantageCounts counts;
  if (p.rows == 0) return counts;
  fixed::check_width(p, "sfgrpo advantages_cuda_emulated");  // as the device engine
  const int64_t n = p.rows;
  const size_t stat_columns = static_cast<size_t>(p.stat_columns());
  const int64_t slots = fixed::table_slots(n);
  // zeroed like the device's memset; the moment sums hold garbage until their claimer zeroes them
  std::vector<uint64_t> counters(2, 0), batch_range(stat_columns * fixed::kRangeWords, 0),
      batch_moments(stat_columns * fixed::kMomentWords, 0), range(n * stat_columns * fixed::kRangeWords, 0),
      moments(n * stat_columns * fixed::kMomentWords, kUnwritten);
  std::vector<uint32_t> table(slots, 0), size(n, 0);
  std::vector<int32_t> row_rep(n), claim_reps(n), sorted_reps(n);
  std::vector<int64_t> claim_ids(n), sorted_ids(n);

  fixed::Workspace w;
  w.slots = slots;
  w.counters = counters.data();
  w.batch_range = batch_range.data();
  w.batch_moments = batch_moments.data();
  w.table = table.data();
  w.size = size.data();
  w.range = range.data();
  w.moments = moments.data();
  w.row_rep = row_rep.data();
  if (stats.requested()) {
    w.claim_ids = claim_ids.data();
    w.claim_reps = claim_reps.data();
    w.sorted_ids = sorted_ids.data();
    w.sorted_reps = sorted_reps.data();
  }
  const fixed::Args<T> a{p, rewards, group_ids, out, stats, nullptr, w};

  // the rows staged in shared memory: the single launch's (max_blocks > 0) outlive phase 1 when one
  // round covers the batch, and phases 2 and 3 read them there
  const int64_t stage_values = fixed::stage_bytes(p, sizeof(T)) / static_cast<int64_t>(sizeof(T));
  const int blocks = fixed::grid_blocks(n, max_blocks);
  const bool persistent = as_launched && max_blocks > 0 && stage_values > 0 &&
                          fixed::one_round(n, fixed::Block{0, static_cast<unsigned>(blocks)});
  std::vector<T> stages;
  run_warp_rows<true>(a, as_launched, max_blocks, persistent, stages);
  const int64_t groups = static_cast<int64_t>(counters[0]);
  if (stats.requested()) {  // the device sorts the claims by id with CUB
    std::vector<int64_t> order(groups);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return claim_ids[x] < claim_ids[y]; });
    for (int64_t j = 0; j < groups; ++j) {
      sorted_ids[j] = claim_ids[order[j]];
      sorted_reps[j] = claim_reps[order[j]];
    }
  }
  run_warp_rows<false>(a, as_launched, max_blocks, persistent, stages);
  if (fixed::finalized(p)) {
    for (int64_t base = 0; base < n; base += fixed::kWarpSize) fixed::finalize_warp(a, base);  // any order
  }
  for (int64_t base = 0; base < n; base += fixed::kWarpSize) {  // any order: no atomics
    // one round: block base / 256's stage
    const T* kept = persistent ? stages.data() + base / fixed::kThreads * stage_values : nullptr;
    fixed::write_warp(a, base, fixed::kept_or_global_rows(a, base, kept));
  }
  if (stats.requested()) {
    for (int64_t j = 0; j < groups; ++j) fixed::write_stats_row(a, j);
  }
  counts.groups = groups;
  counts.nonfinite_rows = static_cast<int64_t>(counters[1]);
  return counts;
}

template AdvantageCounts advantages_cuda_emulated<float>(const AdvantageProblem&, const float*, const int64_t*,
                                                         float*, const GroupStatsBuffers&, bool, int);
template AdvantageCounts advantages_cuda_emulated<double>(const AdvantageProblem&, const double*, const int64_t*,
                                                          double*, const GroupStatsBuffers&, bool, int);

}  // namespace sfgrpo
