// The CUDA advantage engine's phases (sfgrpo/fixed_point_advantages.h) run sequentially on the
// host: the same code, warp by warp (the 32 lanes of a warp as arrays, the warp collectives and
// the run-segmented reductions on those arrays, plain read-modify-writes for the atomics), so the
// device algorithm is tested without a GPU and, on a GPU, its results must be these bits. Not a
// production path (the CPU engine, advantages.cpp, is faster on a CPU).
#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "sfgrpo/advantages.h"
#include "sfgrpo/fixed_point_advantages.h"

namespace sfgrpo {

template <typename T>
AdvantageCounts advantages_cuda_emulated(const AdvantageProblem& p, const T* rewards, const int64_t* group_ids,
                                         T* out, const GroupStatsBuffers& stats) {
  AdvantageCounts counts;
  if (p.rows == 0) return counts;
  const int64_t n = p.rows;
  const size_t stat_columns = static_cast<size_t>(p.stat_columns());
  const int64_t slots = fixed::table_slots(n);
  // zeroed like the device's memset; the moment sums hold garbage until their claimer zeroes them
  std::vector<uint64_t> counters(2, 0), batch_range(stat_columns * fixed::kRangeWords, 0),
      batch_moments(stat_columns * fixed::kMomentWords, 0), range(n * stat_columns * fixed::kRangeWords, 0),
      moments(n * stat_columns * fixed::kMomentWords, 0x5a5a5a5a5a5a5a5aULL);
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

  for (int64_t base = 0; base < n; base += fixed::kWarpSize) fixed::insert_warp(a, base);
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
  for (int64_t base = 0; base < n; base += fixed::kWarpSize) fixed::moments_warp(a, base);
  for (int64_t i = 0; i < n; ++i) fixed::write_row(a, i);
  if (stats.requested()) {
    for (int64_t j = 0; j < groups; ++j) fixed::write_stats_row(a, j);
  }
  counts.groups = groups;
  counts.nonfinite_rows = static_cast<int64_t>(counters[1]);
  return counts;
}

template AdvantageCounts advantages_cuda_emulated<float>(const AdvantageProblem&, const float*, const int64_t*,
                                                         float*, const GroupStatsBuffers&);
template AdvantageCounts advantages_cuda_emulated<double>(const AdvantageProblem&, const double*, const int64_t*,
                                                          double*, const GroupStatsBuffers&);

}  // namespace sfgrpo
