// CPU advantage engine.
//
// Layout first (sequential, O(N)): one pass numbers the groups with a hash table and checks every
// row for NaN/inf, a counting sort then lists the rows of each group in ascending row order (CSR).
// Then every group is handled on its own: statistics in two passes (mean, then squared
// deviations: no cancellation), then its rows' advantages. Groups are spread over threads in
// contiguous ranges, but each group is always summed by one thread in row order, so the result
// is bitwise the same for any thread count.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <thread>
#include <vector>

#include "group_index.h"
#include "sfgrpo/advantage_math.h"
#include "sfgrpo/advantages.h"

namespace sfgrpo {
namespace {

using math::FirstMoments;

// Below this many values per thread, starting a thread costs more than it saves.
constexpr int64_t kValuesPerThread = int64_t{1} << 16;
constexpr int kMaxThreads = 32;

struct GroupLayout {
  std::vector<int64_t> ids;      // [G] the id of each dense group (first-appearance order)
  std::vector<int64_t> offsets;  // [G + 1] rows[offsets[g] .. offsets[g + 1]) belong to group g
  std::vector<int64_t> rows;     // [N] row numbers, grouped, ascending within a group
  std::vector<uint8_t> finite;   // [N] 1: every reward of the row is finite
  int64_t nonfinite_rows = 0;

  int64_t groups() const { return static_cast<int64_t>(ids.size()); }
};

template <typename T>
GroupLayout build_layout(const AdvantageProblem& p, const T* rewards, const int64_t* group_ids) {
  GroupLayout layout;
  const int64_t n = p.rows;
  layout.finite.resize(n);
  std::vector<int64_t> group_of(n);
  std::vector<int64_t> group_size;
  GroupIndex index;
  for (int64_t i = 0; i < n; ++i) {
    const bool finite = math::row_is_finite(rewards + i * p.width, p.width, p.gains);
    layout.finite[i] = finite;
    layout.nonfinite_rows += !finite;
    const int64_t g = index.insert(group_ids[i]);
    group_of[i] = g;
    if (g == static_cast<int64_t>(group_size.size())) group_size.push_back(0);
    ++group_size[g];
  }
  layout.ids = index.ids();
  const int64_t groups = layout.groups();
  layout.offsets.assign(groups + 1, 0);
  std::partial_sum(group_size.begin(), group_size.end(), layout.offsets.begin() + 1);
  std::vector<int64_t> cursor(layout.offsets.begin(), layout.offsets.end() - 1);
  layout.rows.resize(n);
  for (int64_t i = 0; i < n; ++i) layout.rows[cursor[group_of[i]]++] = i;
  return layout;
}

// Mean, std and the all-equal flag of one statistic (one group, or the batch; pooled or one
// column).
struct Moments {
  double mean = 0.0;
  double std = 0.0;
  bool all_equal = true;
};

// Per-worker scratch, sized once per worker.
struct Scratch {
  explicit Scratch(int64_t columns) : column(columns), squares(columns) {}
  std::vector<FirstMoments> column;  // first moments of each column
  std::vector<double> squares;       // squared deviations of each column
};

// Statistics of the rows row_at(0 .. count-1), one per stat column, into `moments`. Returns how
// many of the rows are finite. Sums run per column over the rows in the given order (independent
// dependency chains, so the loop is not bound by add latency); a pooled statistic then merges
// the columns in column order. The order is fixed by the input alone.
template <typename T, typename RowAt>
int64_t measure(const AdvantageProblem& p, const T* rewards, const uint8_t* finite, int64_t count,
                RowAt row_at, Scratch& scratch, Moments* moments) {
  const int64_t columns = p.columns();
  FirstMoments* column = scratch.column.data();
  double* squares = scratch.squares.data();
  std::fill(column, column + columns, FirstMoments{});
  std::fill(squares, squares + columns, 0.0);
  int64_t finite_rows = 0;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t i = row_at(k);
    if (!finite[i]) continue;
    ++finite_rows;
    const T* row = rewards + i * p.width;
    for (int64_t c = 0; c < columns; ++c) {
      if (math::column_counted(p.column_mask, c)) column[c].add(math::value_at(row, c, p.gains));
    }
  }
  FirstMoments pooled;
  if (p.pooled) {
    for (int64_t c = 0; c < columns; ++c) pooled.merge(column[c]);
    moments[0].mean = pooled.mean();
  } else {
    for (int64_t c = 0; c < columns; ++c) moments[c].mean = column[c].mean();
  }
  for (int64_t k = 0; k < count; ++k) {
    const int64_t i = row_at(k);
    if (!finite[i]) continue;
    const T* row = rewards + i * p.width;
    for (int64_t c = 0; c < columns; ++c) {
      if (!math::column_counted(p.column_mask, c)) continue;
      const double d = math::value_at(row, c, p.gains) - moments[p.pooled ? 0 : c].mean;
      squares[c] += d * d;
    }
  }
  if (p.pooled) {
    double total = 0.0;
    for (int64_t c = 0; c < columns; ++c) total += squares[c];
    moments[0].std = math::std_from(total, pooled.count, p.ddof);
    moments[0].all_equal = pooled.all_equal();
  } else {
    for (int64_t c = 0; c < columns; ++c) {
      moments[c].std = math::std_from(squares[c], column[c].count, p.ddof);
      moments[c].all_equal = column[c].all_equal();
    }
  }
  return finite_rows;
}

// Everything a worker needs, shared read-only by all workers.
template <typename T>
struct Job {
  const AdvantageProblem& p;
  const T* rewards;
  const GroupLayout& layout;
  const Moments* batch;  // [stat_columns] batch statistics when p.global_std, else nullptr
  const std::vector<int64_t>* rank;  // [G] position of each group in the sorted stats, or nullptr
  const GroupStatsBuffers& stats;
  T* out;
};

// Statistics and advantages of the groups [first_group, last_group).
template <typename T>
void normalize_groups(const Job<T>& job, int64_t first_group, int64_t last_group) {
  const AdvantageProblem& p = job.p;
  const GroupLayout& layout = job.layout;
  const int64_t columns = p.columns();
  const int64_t stat_columns = p.stat_columns();
  Scratch scratch(columns);
  std::vector<Moments> group(stat_columns);
  std::vector<double> divisor(stat_columns);
  std::vector<double> scale(stat_columns);
  std::vector<uint8_t> zero(stat_columns);
  for (int64_t g = first_group; g < last_group; ++g) {
    const int64_t* rows = layout.rows.data() + layout.offsets[g];
    const int64_t count = layout.offsets[g + 1] - layout.offsets[g];
    const int64_t size = measure(p, job.rewards, layout.finite.data(), count,
                                 [rows](int64_t k) { return rows[k]; }, scratch, group.data());
    for (int64_t s = 0; s < stat_columns; ++s) {
      const Moments& spread = job.batch ? job.batch[s] : group[s];
      divisor[s] = spread.std;
      scale[s] = math::inverse_spread(spread.std, p);
      zero[s] = spread.all_equal || size <= 1;
    }
    for (int64_t k = 0; k < count; ++k) {
      const int64_t i = rows[k];
      const T* row = job.rewards + i * p.width;
      T* out = job.out + i * columns;
      const bool finite = layout.finite[i];
      for (int64_t c = 0; c < columns; ++c) {
        const int64_t s = p.pooled ? 0 : c;
        const bool keep = finite && !zero[s] && math::column_counted(p.column_mask, c);
        out[c] = keep ? static_cast<T>(math::standardize(math::value_at(row, c, p.gains),
                                                          group[s].mean, scale[s], p))
                      : T(0);
      }
    }
    if (job.stats.requested()) {
      const int64_t at = (*job.rank)[g];
      job.stats.group_ids[at] = layout.ids[g];
      job.stats.size[at] = size;
      for (int64_t s = 0; s < stat_columns; ++s) {
        job.stats.mean[at * stat_columns + s] = group[s].mean;
        job.stats.std[at * stat_columns + s] = divisor[s];
        job.stats.zero_std[at * stat_columns + s] = zero[s];
      }
    }
  }
}

int pick_threads(int requested, int64_t values, int64_t groups) {
  int64_t threads = requested;
  if (threads <= 0) {
    // hardware_concurrency() reads /sys on Linux (microseconds): ask once per process.
    static const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
    threads = std::min(cores, values / kValuesPerThread);
  }
  threads = std::min<int64_t>(threads, kMaxThreads);
  return static_cast<int>(std::max<int64_t>(1, std::min(threads, groups)));
}

}  // namespace

template <typename T>
AdvantageCounts advantages_cpu(const AdvantageProblem& p, const T* rewards,
                               const int64_t* group_ids, T* out, const GroupStatsBuffers& stats,
                               int num_threads) {
  AdvantageCounts counts;
  if (p.rows == 0) return counts;
  const GroupLayout layout = build_layout(p, rewards, group_ids);
  counts.groups = layout.groups();
  counts.nonfinite_rows = layout.nonfinite_rows;

  std::vector<Moments> batch;
  if (p.global_std) {  // one sequential pass over the batch in row order
    batch.resize(p.stat_columns());
    Scratch scratch(p.columns());
    measure(p, rewards, layout.finite.data(), p.rows, [](int64_t k) { return k; }, scratch,
            batch.data());
  }
  std::vector<int64_t> rank;
  if (stats.requested()) {  // statistics are reported in ascending id order
    std::vector<int64_t> order(counts.groups);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](int64_t a, int64_t b) { return layout.ids[a] < layout.ids[b]; });
    rank.resize(counts.groups);
    for (int64_t k = 0; k < counts.groups; ++k) rank[order[k]] = k;
  }

  const Job<T> job{p, rewards, layout, p.global_std ? batch.data() : nullptr,
                   stats.requested() ? &rank : nullptr, stats, out};
  const int threads = pick_threads(num_threads, p.rows * p.columns(), counts.groups);
  if (threads == 1) {
    normalize_groups(job, 0, counts.groups);
    return counts;
  }
  // Contiguous group ranges holding about the same number of rows each.
  std::vector<int64_t> bounds(threads + 1, counts.groups);
  bounds[0] = 0;
  for (int t = 1; t < threads; ++t) {
    const int64_t target = p.rows * t / threads;
    bounds[t] = std::lower_bound(layout.offsets.begin(), layout.offsets.end(), target) -
                layout.offsets.begin();
    bounds[t] = std::clamp(bounds[t], bounds[t - 1], counts.groups);
  }
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) {
    workers.emplace_back(normalize_groups<T>, std::cref(job), bounds[t], bounds[t + 1]);
  }
  normalize_groups(job, bounds[0], bounds[1]);
  for (std::thread& w : workers) w.join();
  return counts;
}

template AdvantageCounts advantages_cpu<float>(const AdvantageProblem&, const float*,
                                               const int64_t*, float*, const GroupStatsBuffers&,
                                               int);
template AdvantageCounts advantages_cpu<double>(const AdvantageProblem&, const double*,
                                                const int64_t*, double*, const GroupStatsBuffers&,
                                                int);

}  // namespace sfgrpo
