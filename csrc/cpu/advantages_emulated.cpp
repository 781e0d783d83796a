// The CUDA advantage engine's phases (sfgrpo/fixed_point_advantages.h) run sequentially on the
// host: the same code with plain read-modify-writes for the atomics, so the device algorithm is
// tested without a GPU and, on a GPU, its results must be these bits. Not a production path (the
// CPU engine, advantages.cpp, is faster on a CPU).
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
  const int64_t stat_columns = p.stat_columns();
  const int64_t slots = fixed::table_slots(n);
  const size_t accumulators = static_cast<size_t>((n + 1) * stat_columns);
  std::vector<uint64_t> keys(slots + 1, 0), counters(2, 0), hi(accumulators, 0), lo(accumulators, 0),
      sum(accumulators, 0), squares(accumulators, 0);
  std::vector<uint32_t> slot_rep(slots + 1, 0), size(n, 0);
  std::vector<int32_t> row_rep(n), claim_reps(n), sorted_reps(n);
  std::vector<uint8_t> finite(n);
  std::vector<int64_t> claim_ids(n), sorted_ids(n);

  fixed::Workspace w;
  w.slots = slots;
  w.keys = keys.data();
  w.slot_rep = slot_rep.data();
  w.counters = counters.data();
  w.size = size.data();
  w.hi = hi.data();
  w.lo = lo.data();
  w.sum = sum.data();
  w.squares = squares.data();
  w.row_rep = row_rep.data();
  w.finite = finite.data();
  if (stats.requested()) {
    w.claim_ids = claim_ids.data();
    w.claim_reps = claim_reps.data();
    w.sorted_ids = sorted_ids.data();
    w.sorted_reps = sorted_reps.data();
  }
  const fixed::Args<T> a{p, rewards, group_ids, out, stats, nullptr, w};

  for (int64_t i = 0; i < n; ++i) fixed::insert_row(a, i, true);
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
  for (int64_t i = 0; i < n; ++i) fixed::sum_row(a, i, true);
  for (int64_t i = 0; i < n; ++i) fixed::squares_row(a, i, true);
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
