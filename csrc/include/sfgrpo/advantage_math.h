// The per-value formulas of the advantage engine, shared by the CPU and the CUDA code so both
// state them once. The engines differ in how they sum: the CPU in double in row order, CUDA in
// fixed point (fixed_point_advantages.h); results agree to the last few bits, not bitwise.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "sfgrpo/advantages.h"

namespace sfgrpo {
namespace math {

// The value normalised at (row, column): the reward itself or the gain of step `column`. A gain
// is computed in T, like the reference's `rewards[:, 1:] - rewards[:, :-1]`, then widened.
// value_of takes the loaded reward (and the next one, read only for gains).
template <typename T>
SFGRPO_HD double value_of(T reward, T next_reward, bool gains) {
  if (gains) {
    const T gain = next_reward - reward;
    return static_cast<double>(gain);
  }
  return static_cast<double>(reward);
}

template <typename T>
SFGRPO_HD double value_at(const T* row, int64_t column, bool gains) {
  return value_of(row[column], gains ? row[column + 1] : T(0), gains);
}

// Half the largest finite T (exact): the difference of two rewards within +-kHalfMax cannot overflow.
template <typename T>
constexpr T kHalfMax = std::numeric_limits<T>::max() / 2;

template <typename T>
SFGRPO_HD bool is_finite(T value) {
#if defined(__CUDA_ARCH__)
  return static_cast<bool>(isfinite(value));
#else
  return std::isfinite(value);
#endif
}

// Whether a row takes part in the statistics: every value normalised from it is finite. For gains
// that is each gain, computed in T as value_of does: a NaN/inf reward makes one NaN/inf, and so do
// finite rewards whose difference overflows T (+-3e38 in float), which would otherwise turn the
// statistics of the row's whole group into NaN. Only rewards beyond half of T's range can overflow:
// the gains are checked only then (rare), so that the common path loads each reward once.
template <typename T>
SFGRPO_HD bool row_is_finite(const T* row, int64_t width, bool gains) {
  bool finite = true, large = false;
  for (int64_t k = 0; k < width; ++k) {
    const T reward = row[k];
    finite &= is_finite(reward);
    large |= reward > kHalfMax<T> || reward < -kHalfMax<T>;
  }
  if (gains && finite && large) {
    for (int64_t k = 0; k + 1 < width; ++k) finite &= is_finite(static_cast<T>(row[k + 1] - row[k]));
  }
  return finite;
}

SFGRPO_HD bool column_counted(const uint8_t* column_mask, int64_t column) {
  return column_mask == nullptr || column_mask[column] != 0;
}

// First-pass sums of one statistic: how many values, their sum, smallest and largest.
struct FirstMoments {
  double count = 0.0;
  double sum = 0.0;
  double lo = INFINITY;
  double hi = -INFINITY;

  SFGRPO_HD void add(double v) {
    count += 1.0;
    sum += v;
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  SFGRPO_HD void merge(const FirstMoments& other) {
    count += other.count;
    sum += other.sum;
    lo = other.lo < lo ? other.lo : lo;
    hi = other.hi > hi ? other.hi : hi;
  }
  SFGRPO_HD double mean() const { return sum / (count > 1.0 ? count : 1.0); }
  // max == min is exact; a std computed from identical values need not be exactly 0.
  SFGRPO_HD bool all_equal() const { return !(count > 0.0 && hi > lo); }
};

// Population (ddof 0) or unbiased (ddof 1) std from the sum of squared deviations; the divisor
// never drops below 1, like the reference's clamp.
SFGRPO_HD double std_from(double squared_deviations, double count, int ddof) {
  const double dof = count - static_cast<double>(ddof);
  return sqrt(squared_deviations / (dof > 1.0 ? dof : 1.0));
}

// The factor 1 / (std + eps) that every value of a group is scaled by: one division per group
// instead of one per value (a division costs ~10x a multiplication). An infinite scale (std + eps
// == 0) only occurs for groups whose values are all equal, which get 0 anyway.
SFGRPO_HD double inverse_spread(double std, const AdvantageProblem& p) { return 1.0 / (std + p.eps); }

// (v - mean) / (std + eps) as (v - mean) * inverse_spread, clamped like torch.clamp (a NaN stays
// NaN).
SFGRPO_HD double standardize(double v, double mean, double scale, const AdvantageProblem& p) {
  double a = (v - mean) * scale;
  if (p.clip) a = a < -p.clip_value ? -p.clip_value : (a > p.clip_value ? p.clip_value : a);
  return a;
}

}  // namespace math
}  // namespace sfgrpo
