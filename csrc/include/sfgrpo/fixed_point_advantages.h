// The CUDA advantage engine's algorithm, written once for the device and for a sequential host
// emulation (csrc/cpu/advantages_emulated.cpp) that runs the same code on the CPU so its logic is
// tested without a GPU, and gives the GPU's bits.
//
// No sort and no scan: rows find their group in a hash table, and every statistic is a sum of
// integers. Each value is converted to 64-bit fixed point with a scale chosen per (group,
// statistic) from the group's largest magnitude and size, so the sum cannot overflow; integer
// addition is associative, so atomics give the same bits in any order: the result depends only on
// the input, not on the scheduling, the launch or even the order of the rows. Resolution: a value
// is rounded to 2^-(62 - ceil(log2 n)) of the group's largest |value| (n values), finer than the
// rounding of a double-precision running sum of the same values.
//
// Phases (one kernel each, a grid-wide barrier between them):
//  1. insert: rows claim their id's slot (linear probing, atomicCAS); the first row of a group
//     becomes its representative r and publishes r in the slot, the others read it. Finite rows
//     count themselves into size[r] and widen [lo, hi] of each statistic (atomicMax on
//     order-preserving integer encodings of doubles).
//  2. sum:    each finite row adds its values in fixed point, scaled from max(|lo|, |hi|).
//  3. squares: each adds its squared deviations from the mean, scaled from (hi - lo)^2.
//  4. write:  advantages = (value - mean) / (std + eps), clipped; statistics rows when asked.
// Accumulators are indexed by the representative's row number, so their size is the batch's,
// never the table's: 32 bytes per row and statistic (one statistic when pooled, T per-step), plus
// 12 bytes per hash slot, zeroed by one memset per call. With global_std the batch is one more accumulator (index `rows`), fed one
// atomic per warp on the device (integer sums: the warp's order does not matter either).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "sfgrpo/advantage_math.h"
#include "sfgrpo/advantages.h"

namespace sfgrpo {
namespace fixed {

#if !defined(__CUDA_ARCH__)
using std::isfinite;  // the device pass has CUDA's own
#endif

// ------------------------------------------------------------------------------- atomics
// Device atomics when compiled for the GPU, plain read-modify-write in the (sequential) emulation.
SFGRPO_HD uint64_t atomic_cas(uint64_t* at, uint64_t expected, uint64_t desired) {
#if defined(__CUDA_ARCH__)
  return atomicCAS(reinterpret_cast<unsigned long long*>(at), expected, desired);
#else
  const uint64_t old = *at;
  if (old == expected) *at = desired;
  return old;
#endif
}

SFGRPO_HD uint64_t atomic_add(uint64_t* at, uint64_t value) {
#if defined(__CUDA_ARCH__)
  return atomicAdd(reinterpret_cast<unsigned long long*>(at), value);
#else
  const uint64_t old = *at;
  *at = old + value;  // wraps: two's complement sums of signed values
  return old;
#endif
}

// Accumulation into a group's counters: on the device, the lanes of a warp that hit the same
// address combine their values first (one atomic per address per warp: rows of one group often
// sit next to each other, and one huge group would otherwise serialise on a single address).
// Integer sums and maxima: the combining order cannot change the result.
#if defined(__CUDA_ARCH__)
template <typename V, typename Op>
__device__ __forceinline__ void combine_with_peers(V* at, V value, Op op) {
  const unsigned peers = __match_any_sync(__activemask(), reinterpret_cast<unsigned long long>(at));
  V total = value;
  bool first = true;
  for (unsigned rest = peers; rest != 0; rest &= rest - 1) {  // every peer runs the same loop
    const V other = __shfl_sync(peers, value, __ffs(rest) - 1);
    total = first ? other : op(total, other);
    first = false;
  }
  if ((threadIdx.x & 31) == __ffs(peers) - 1) op.atomic(at, total);
}

struct AddOp {
  template <typename V>
  __device__ V operator()(V x, V y) const { return x + y; }
  __device__ void atomic(unsigned long long* at, unsigned long long v) const { atomicAdd(at, v); }
  __device__ void atomic(unsigned int* at, unsigned int v) const { atomicAdd(at, v); }
};

struct MaxOp {
  __device__ unsigned long long operator()(unsigned long long x, unsigned long long y) const { return x > y ? x : y; }
  __device__ void atomic(unsigned long long* at, unsigned long long v) const { atomicMax(at, v); }
};
#endif

SFGRPO_HD void group_add(uint64_t* at, uint64_t value) {
#if defined(__CUDA_ARCH__)
  combine_with_peers(reinterpret_cast<unsigned long long*>(at), static_cast<unsigned long long>(value), AddOp{});
#else
  *at += value;
#endif
}

SFGRPO_HD void group_add(uint32_t* at, uint32_t value) {
#if defined(__CUDA_ARCH__)
  combine_with_peers(reinterpret_cast<unsigned int*>(at), static_cast<unsigned int>(value), AddOp{});
#else
  *at += value;
#endif
}

SFGRPO_HD void group_max(uint64_t* at, uint64_t value) {
#if defined(__CUDA_ARCH__)
  combine_with_peers(reinterpret_cast<unsigned long long*>(at), static_cast<unsigned long long>(value), MaxOp{});
#else
  if (value > *at) *at = value;
#endif
}

// A slot's representative: published once by the claiming row, read (waited for) by the others.
SFGRPO_HD void publish(uint32_t* at, uint32_t value) {
#if defined(__CUDA_ARCH__)
  atomicExch(reinterpret_cast<unsigned int*>(at), value);
#else
  *at = value;
#endif
}

SFGRPO_HD uint32_t wait_published(uint32_t* at) {
#if defined(__CUDA_ARCH__)
  // the claimer publishes right after its CAS; independent thread scheduling (sm_70+) lets it run
  // even when it shares this warp
  // bounded: should the claimer never publish (a bug), fail the launch instead of hanging the GPU
  uint32_t value;
  for (uint32_t spins = 0; (value = atomicAdd(reinterpret_cast<unsigned int*>(at), 0u)) == 0u; ++spins) {
    if (spins == (1u << 26)) __trap();
  }
  return value;
#else
  return *at;  // sequential: the claimer ran first
#endif
}

// The sum (max) of `value` over the warp's lanes added (maxed) into *at: one atomic per warp on
// the device. Every lane of the warp must call it (inactive lanes pass 0).
SFGRPO_HD void warp_add(uint64_t* at, uint64_t value) {
#if defined(__CUDA_ARCH__)
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if ((threadIdx.x & 31) == 0 && value != 0) atomicAdd(reinterpret_cast<unsigned long long*>(at), value);
#else
  *at += value;
#endif
}

SFGRPO_HD void warp_max(uint64_t* at, uint64_t value) {
#if defined(__CUDA_ARCH__)
  for (int offset = 16; offset > 0; offset >>= 1) {
    const uint64_t other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = other > value ? other : value;
  }
  if ((threadIdx.x & 31) == 0 && value != 0) atomicMax(reinterpret_cast<unsigned long long*>(at), value);
#else
  if (value > *at) *at = value;
#endif
}

// ------------------------------------------------------------------------- number formats
// Doubles as unsigned integers in the same order (larger double <-> larger integer); 0 is below
// every finite double's code, so a zeroed accumulator means "no value yet" for both bounds (the
// lower bound is stored complemented, so that atomicMax computes the minimum).
SFGRPO_HD uint64_t order_code(double v) {
  uint64_t bits;
#if defined(__CUDA_ARCH__)
  bits = static_cast<uint64_t>(__double_as_longlong(v));
#else
  std::memcpy(&bits, &v, sizeof bits);
#endif
  return (bits >> 63) ? ~bits : (bits | (uint64_t{1} << 63));
}

SFGRPO_HD double from_order_code(uint64_t code) {
  const uint64_t bits = (code >> 63) ? (code & ~(uint64_t{1} << 63)) : ~code;
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(bits));
#else
  double v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

SFGRPO_HD int ceil_log2(uint64_t n) {
  int bits = 0;
  while (bits < 63 && (uint64_t{1} << bits) < n) ++bits;
  return bits;
}

// The smallest e with m < 2^e, for finite m >= 0 (0 for m == 0).
SFGRPO_HD int magnitude_exponent(double m) {
  return m == 0.0 ? 0 : ilogb(m) + 1;  // ilogb, not frexp: no address-taken local on the device
}

SFGRPO_HD int64_t to_fixed(double v, int shift) { return llrint(ldexp(v, shift)); }

SFGRPO_HD double from_fixed(uint64_t sum, int shift) {
  return ldexp(static_cast<double>(static_cast<int64_t>(sum)), -shift);
}

// ------------------------------------------------------------------------------- layout
constexpr uint64_t kKeyMix = 0x9E3779B97F4A7C15ULL;  // key = id ^ kKeyMix; key 0 marks an empty slot

// splitmix64's finaliser: consecutive ids (the usual prompt numbering) spread over the table.
SFGRPO_HD uint64_t mix_key(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Hash-table size for n rows: a power of two >= 2n (load <= 1/2: short probes). One more slot,
// index `slots`, belongs to the one id whose key is 0.
inline int64_t table_slots(int64_t rows) {
  int64_t slots = 64;
  while (slots < 2 * rows) slots <<= 1;
  return slots;
}

// Pointers into the engine's scratch memory.
struct Workspace {
  int64_t slots = 0;
  // zeroed before phase 1
  uint64_t* keys = nullptr;       // [slots + 1]
  uint32_t* slot_rep = nullptr;   // [slots + 1] 1 + the slot's representative row
  uint64_t* counters = nullptr;   // [2] groups, rows with a NaN/inf reward
  uint32_t* size = nullptr;       // [rows] finite rows per representative
  uint64_t* hi = nullptr;         // [(rows + 1) * S] order codes of the largest value
  uint64_t* lo = nullptr;         // [(rows + 1) * S] complemented order codes of the smallest
  uint64_t* sum = nullptr;        // [(rows + 1) * S] fixed-point sums
  uint64_t* squares = nullptr;    // [(rows + 1) * S] fixed-point sums of squared deviations
  // written before being read
  int32_t* row_rep = nullptr;     // [rows]
  uint8_t* finite = nullptr;      // [rows]
  int64_t* claim_ids = nullptr;   // [rows] statistics only: ids in order of claim, then padding
  int32_t* claim_reps = nullptr;  // [rows]
  const int64_t* sorted_ids = nullptr;   // [rows] the claims sorted by id (statistics only)
  const int32_t* sorted_reps = nullptr;  // [rows]
};

// Everything the phases read, in one kernel argument.
template <typename T>
struct Args {
  AdvantageProblem p;
  const T* rewards;
  const int64_t* ids;
  T* out;
  GroupStatsBuffers stats;
  int64_t* counts;  // {groups, nonfinite rows}, written by phase 4
  Workspace w;
};

// Counted values per row of statistic s: every unmasked column when pooled, else 1 or 0.
SFGRPO_HD int64_t values_per_row(const AdvantageProblem& p, int64_t s) {
  if (!p.pooled) return math::column_counted(p.column_mask, s) ? 1 : 0;
  int64_t counted = 0;
  for (int64_t c = 0; c < p.columns(); ++c) counted += math::column_counted(p.column_mask, c);
  return counted;
}

// Columns of statistic s: [first, last).
SFGRPO_HD void stat_columns_of(const AdvantageProblem& p, int64_t s, int64_t& first, int64_t& last) {
  first = p.pooled ? 0 : s;
  last = p.pooled ? p.columns() : s + 1;
}

// The fixed-point scales of one accumulator (a group's or the batch's statistic s), derived from
// its final [lo, hi] and count: identical in every phase that uses them.
struct Scales {
  double n = 0.0;          // counted values
  bool equal = true;       // no values, or all equal (max == min, exact)
  bool spread_finite = true;
  int shift = 0;           // sum: value * 2^shift
  int square_shift = 0;    // squares: d^2 * 2^square_shift
};

SFGRPO_HD Scales scales_of(const Workspace& w, int64_t acc, int64_t stat_columns, int64_t s, uint64_t count) {
  Scales sc;
  sc.n = static_cast<double>(count);
  const int64_t at = acc * stat_columns + s;
  if (count == 0 || w.hi[at] == 0) return sc;
  const double hi = from_order_code(w.hi[at]);
  const double lo = from_order_code(~w.lo[at]);
  const int headroom = ceil_log2(count);
  sc.equal = !(hi > lo);
  const double largest = fabs(lo) > fabs(hi) ? fabs(lo) : fabs(hi);
  sc.shift = 62 - magnitude_exponent(largest) - headroom;
  // |value - mean| <= spread + the mean's rounding error, which is below largest * 2^(headroom - 61)
  // (fixed-point sum) + largest * 2^-52 (conversion and division); the bound is generous
  const double spread = hi - lo;
  const double deviation_bound = spread + ldexp(largest, headroom - 50);
  sc.spread_finite = isfinite(deviation_bound);
  sc.square_shift = sc.spread_finite ? 62 - 2 * magnitude_exponent(deviation_bound) - headroom : 0;
  return sc;
}

SFGRPO_HD double mean_of(const Workspace& w, int64_t acc, int64_t stat_columns, int64_t s, const Scales& sc) {
  if (sc.n == 0.0) return 0.0;
  return from_fixed(w.sum[acc * stat_columns + s], sc.shift) / sc.n;
}

SFGRPO_HD double std_of(const Workspace& w, int64_t acc, int64_t stat_columns, int64_t s, const Scales& sc,
                        int ddof) {
  if (sc.equal) return 0.0;
  if (!sc.spread_finite) return INFINITY;
  return math::std_from(from_fixed(w.squares[acc * stat_columns + s], sc.square_shift), sc.n, ddof);
}

// ------------------------------------------------------------------------------- phase 1
// The row's group: claims the id's slot or finds it; returns the representative row.
template <typename T>
SFGRPO_HD int64_t find_group(const Args<T>& a, int64_t i) {
  const Workspace& w = a.w;
  const uint64_t key = static_cast<uint64_t>(a.ids[i]) ^ kKeyMix;
  uint64_t slot;
  bool claimed;
  if (key == 0) {  // the id that would read as an empty slot has a slot of its own
    slot = static_cast<uint64_t>(w.slots);
    claimed = atomic_cas(w.keys + slot, 0, 1) == 0;
  } else {
    const uint64_t mask = static_cast<uint64_t>(w.slots) - 1;
    slot = mix_key(key) & mask;
    while (true) {
      const uint64_t seen = atomic_cas(w.keys + slot, 0, key);
      if (seen == 0 || seen == key) {
        claimed = seen == 0;
        break;
      }
      slot = (slot + 1) & mask;
    }
  }
  if (!claimed) return static_cast<int64_t>(wait_published(w.slot_rep + slot)) - 1;
  publish(w.slot_rep + slot, static_cast<uint32_t>(i + 1));
  const uint64_t g = atomic_add(w.counters, uint64_t{1});
  if (w.claim_ids != nullptr) {
    w.claim_ids[g] = a.ids[i];
    w.claim_reps[g] = static_cast<int32_t>(i);
  }
  return i;
}

// [lo, hi] of the row's counted values of statistic s; false when it has none.
template <typename T>
SFGRPO_HD bool row_range(const AdvantageProblem& p, const T* row, int64_t s, double& lo, double& hi) {
  int64_t first, last;
  stat_columns_of(p, s, first, last);
  bool any = false;
  for (int64_t c = first; c < last; ++c) {
    if (!math::column_counted(p.column_mask, c)) continue;
    const double v = math::value_at(row, c, p.gains);
    lo = any && lo < v ? lo : v;
    hi = any && hi > v ? hi : v;
    any = true;
  }
  return any;
}

// `active` is false for the lanes past the last row (they still take part in warp reductions).
template <typename T>
SFGRPO_HD void insert_row(const Args<T>& a, int64_t i, bool active) {
  const AdvantageProblem& p = a.p;
  const Workspace& w = a.w;
  const int64_t stat_columns = p.stat_columns();
  const T* row = a.rewards + i * p.width;
  bool finite = false;
  if (active) {
    finite = math::row_is_finite(row, p.width);
    w.finite[i] = finite;
    if (!finite) atomic_add(w.counters + 1, uint64_t{1});
    const int64_t r = find_group(a, i);
    w.row_rep[i] = static_cast<int32_t>(r);
    if (finite) {
      group_add(w.size + r, 1u);
      for (int64_t s = 0; s < stat_columns; ++s) {
        double lo = 0.0, hi = 0.0;
        if (!row_range(p, row, s, lo, hi)) continue;
        group_max(w.hi + r * stat_columns + s, order_code(hi));
        group_max(w.lo + r * stat_columns + s, ~order_code(lo));
      }
    }
  }
  if (p.global_std) {  // uniform across the warp: every lane reaches the reductions
    const int64_t batch = p.rows * stat_columns;
    for (int64_t s = 0; s < stat_columns; ++s) {
      double lo = 0.0, hi = 0.0;
      const bool any = finite && row_range(p, row, s, lo, hi);
      warp_max(w.hi + batch + s, any ? order_code(hi) : 0);
      warp_max(w.lo + batch + s, any ? ~order_code(lo) : 0);
    }
  }
}

// ------------------------------------------------------------------------------- phase 2
// Finite rows of the batch (the global-std accumulator's rows).
SFGRPO_HD uint64_t batch_rows(const AdvantageProblem& p, const Workspace& w) {
  return static_cast<uint64_t>(p.rows) - w.counters[1];
}

// Phases 2 and 3: every finite row adds its counted values (kSquares: their squared deviations
// from the mean) of each statistic, in fixed point, to its group's accumulator, and with
// global_std to the batch's. The row's own sum is exact: each term is below 2^62 / n and the row
// has at most n of them.
template <bool kSquares, typename T>
SFGRPO_HD int64_t row_fixed(const AdvantageProblem& p, const T* row, int64_t s, double mean, int shift) {
  int64_t first, last;
  stat_columns_of(p, s, first, last);
  int64_t total = 0;
  for (int64_t c = first; c < last; ++c) {
    if (!math::column_counted(p.column_mask, c)) continue;
    double v = math::value_at(row, c, p.gains);
    if (kSquares) {
      const double d = v - mean;
      v = d * d;
    }
    total += to_fixed(v, shift);
  }
  return total;
}

// The row's part of accumulator (acc, s) holding `count` values; false when it adds nothing
// (no values; for the squares also all values equal, whose std is 0, or an infinite spread).
template <bool kSquares, typename T>
SFGRPO_HD bool row_part(const Args<T>& a, const T* row, int64_t acc, int64_t s, uint64_t count, int64_t& part) {
  const int64_t stat_columns = a.p.stat_columns();
  const Scales sc = scales_of(a.w, acc, stat_columns, s, count);
  if (kSquares ? (sc.equal || !sc.spread_finite) : sc.n == 0.0) return false;
  const double mean = kSquares ? mean_of(a.w, acc, stat_columns, s, sc) : 0.0;
  part = row_fixed<kSquares>(a.p, row, s, mean, kSquares ? sc.square_shift : sc.shift);
  return true;
}

template <bool kSquares, typename T>
SFGRPO_HD void accumulate_row(const Args<T>& a, int64_t i, bool active) {
  const AdvantageProblem& p = a.p;
  const Workspace& w = a.w;
  const int64_t stat_columns = p.stat_columns();
  uint64_t* target = kSquares ? w.squares : w.sum;
  const T* row = a.rewards + i * p.width;
  const bool finite = active && w.finite[i];
  if (finite) {
    const int64_t r = w.row_rep[i];
    for (int64_t s = 0; s < stat_columns; ++s) {
      int64_t part = 0;
      if (row_part<kSquares>(a, row, r, s, uint64_t{w.size[r]} * values_per_row(p, s), part)) {
        group_add(target + r * stat_columns + s, static_cast<uint64_t>(part));
      }
    }
  }
  if (p.global_std) {  // uniform across the warp: every lane reaches the reduction
    const uint64_t rows = batch_rows(p, w);
    for (int64_t s = 0; s < stat_columns; ++s) {
      int64_t part = 0;
      if (!(finite && row_part<kSquares>(a, row, p.rows, s, rows * values_per_row(p, s), part))) part = 0;
      warp_add(target + p.rows * stat_columns + s, static_cast<uint64_t>(part));
    }
  }
}

template <typename T>
SFGRPO_HD void sum_row(const Args<T>& a, int64_t i, bool active) {
  accumulate_row<false>(a, i, active);
}

template <typename T>
SFGRPO_HD void squares_row(const Args<T>& a, int64_t i, bool active) {
  accumulate_row<true>(a, i, active);
}

// ------------------------------------------------------------------------------- phase 4
// A group's statistic s as the advantages use it.
struct GroupStat {
  double mean = 0.0;
  double divisor = 0.0;  // the group's std, or the batch's with global_std
  bool zero = true;      // advantages 0: all values equal, or at most one finite row
};

template <typename T>
SFGRPO_HD GroupStat group_stat(const Args<T>& a, int64_t r, int64_t s) {
  const AdvantageProblem& p = a.p;
  const Workspace& w = a.w;
  const int64_t stat_columns = p.stat_columns();
  const int64_t per_row = values_per_row(p, s);
  const Scales sc = scales_of(w, r, stat_columns, s, uint64_t{w.size[r]} * per_row);
  GroupStat g;
  g.mean = mean_of(w, r, stat_columns, s, sc);
  bool equal = sc.equal;
  if (p.global_std) {
    const Scales batch = scales_of(w, p.rows, stat_columns, s, batch_rows(p, w) * per_row);
    g.divisor = std_of(w, p.rows, stat_columns, s, batch, p.ddof);
    equal = batch.equal;
  } else {
    g.divisor = std_of(w, r, stat_columns, s, sc, p.ddof);
  }
  g.zero = equal || w.size[r] <= 1;
  return g;
}

template <typename T>
SFGRPO_HD void write_row(const Args<T>& a, int64_t i) {
  const AdvantageProblem& p = a.p;
  const Workspace& w = a.w;
  const int64_t columns = p.columns();
  const T* row = a.rewards + i * p.width;
  T* out = a.out + i * columns;
  const bool finite = w.finite[i];
  const int64_t r = w.row_rep[i];
  GroupStat g;
  bool have = false;  // pooled: one statistic for the whole row
  for (int64_t c = 0; c < columns; ++c) {
    if (!finite || !math::column_counted(p.column_mask, c)) {
      out[c] = T(0);
      continue;
    }
    if (!p.pooled || !have) {
      g = group_stat(a, r, p.pooled ? 0 : c);
      have = true;
    }
    out[c] = g.zero ? T(0)
                    : static_cast<T>(math::standardize(math::value_at(row, c, p.gains), g.mean,
                                                       math::inverse_spread(g.divisor, p), p));
  }
}

// Statistics row j (< groups): the j-th smallest id.
template <typename T>
SFGRPO_HD void write_stats_row(const Args<T>& a, int64_t j) {
  const Workspace& w = a.w;
  const int64_t stat_columns = a.p.stat_columns();
  const int64_t r = w.sorted_reps[j];
  a.stats.group_ids[j] = w.sorted_ids[j];
  a.stats.size[j] = w.size[r];
  for (int64_t s = 0; s < stat_columns; ++s) {
    const GroupStat g = group_stat(a, r, s);
    a.stats.mean[j * stat_columns + s] = g.mean;
    a.stats.std[j * stat_columns + s] = g.divisor;
    a.stats.zero_std[j * stat_columns + s] = g.zero;
  }
}

}  // namespace fixed
}  // namespace sfgrpo
