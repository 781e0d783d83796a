// The CUDA advantage engine's algorithm, written once for the device and for a sequential host
// emulation (csrc/cpu/advantages_emulated.cpp) that runs the same code on the CPU, so its logic
// (warp-level aggregation included) is tested without a GPU, and gives the GPU's bits.
//
// No sort and no scan: rows find their group in a hash table, and every statistic is built from
// sums of integers. Each value v of a (group, statistic) accumulator is converted to the 64-bit
// fixed-point deviation x = round((v - c) * 2^k) from a centre c (the midpoint of the
// accumulator's [lo, hi]), with k chosen from the accumulator's range and size so that
// |x| <= 2^(62 - ceil(log2 n)) (n values): the sum of x fits in 64 bits and the sum of x^2 in 128
// (kept as two 64-bit limb sums). Integer addition is associative, so atomics give the same bits
// in any order: the result depends only on the input, not on the scheduling, the launch, the warp
// aggregation or the order of the rows. The statistics then follow from these exact sums:
//   mean = c + S1 / (n 2^k),   sum of squared deviations = (n S2 - S1^2) / (n 4^k),
// the second in exact 128-bit integer arithmetic (no cancellation). Resolution: a deviation is
// rounded to 2^-(62 - ceil(log2 n)) of the group's half-range, far finer than a double-precision
// two-pass computation resolves it.
//
// Phases (one kernel each, a grid-wide barrier between them):
//  1. insert:  the first row of each run of equal ids in a warp looks the id up (linear probing,
//     atomicCAS on a 32-bit slot holding 1 + the claiming row: the claimer is the group's
//     representative r, and the others compare their id with ids[r], no waiting). Finite rows
//     count themselves into size[r] and widen [lo, hi] of each statistic (atomicMax on
//     order-preserving integer encodings of doubles); the claimer zeroes its group's moment sums.
//  2. moments: each finite row adds its S1 and S2 parts (fixed point, scales from [lo, hi], n).
//  2b. finalize, only with several statistics per group (per step, or several reward columns):
//     each (group, statistic)'s mean and std once, written over its moment sums.
//  3. write:   advantages = (value - mean) / (std + eps), clipped, a warp's rows as one coalesced
//     tile; statistics rows when asked.
// Within a warp, consecutive rows of one group (the usual layout: a prompt's samples side by side)
// combine their integer parts with a segmented shuffle reduction first: one atomic per run, not
// one per row. Accumulators are indexed by the representative's row number, so their size is the
// batch's, never the table's. Zeroed by one memset per call: the hash table (4 bytes per slot),
// size (4 bytes per row) and the ranges (16 bytes per row and statistic; one statistic when
// pooled, T per step); the moment sums (24 bytes per row and statistic) are zeroed by the claimer.
// With global_std the batch is one more accumulator, fed one atomic per block (its warps combine in
// shared memory first: sfgrpo/fixed_point_blocks.h, which also runs phases 1 and 2 block by block).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "sfgrpo/advantage_math.h"
#include "sfgrpo/advantages.h"

#if defined(__CUDACC__)
#include <cuda_pipeline.h>  // cp.async (sm_80 and later: every architecture the build targets)
#endif

namespace sfgrpo {
namespace fixed {

#if !defined(__CUDA_ARCH__)
using std::isfinite;  // the device pass has CUDA's own
#endif

constexpr int kWarpSize = 32;

// Rewards per row the engine takes: a warp's 32 rows then hold at most 2^30 values, so phase 3
// indexes them with 32-bit integers, with room for the rounds past the end (2^25 = 33M steps per
// trajectory: no training run comes close).
constexpr int64_t kMaxWidth = int64_t{1} << 25;

// The engines' (the device's and its emulation's) refusal of wider rows; `engine` names the caller.
inline void check_width(const AdvantageProblem& p, const char* engine) {
  if (p.width > kMaxWidth) throw std::invalid_argument(std::string(engine) + ": rows of more than 2^25 rewards");
}

// ------------------------------------------------------------------------------- bit helpers
SFGRPO_HD int leading_zeros64(uint64_t x) {  // x != 0
#if defined(__CUDA_ARCH__)
  return __clzll(static_cast<long long>(x));
#elif defined(__GNUC__)
  return __builtin_clzll(x);
#else
  int n = 0;
  while (!(x & (uint64_t{1} << 63))) x <<= 1, ++n;
  return n;
#endif
}

SFGRPO_HD int leading_zeros32(uint32_t x) {  // x != 0
#if defined(__CUDA_ARCH__)
  return __clz(static_cast<int>(x));
#else
  return leading_zeros64(x) - 32;
#endif
}

SFGRPO_HD int trailing_zeros32(uint32_t x) {  // x != 0
#if defined(__CUDA_ARCH__)
  return __ffs(static_cast<int>(x)) - 1;
#elif defined(__GNUC__)
  return __builtin_ctz(x);
#else
  int n = 0;
  while (!(x & 1u)) x >>= 1, ++n;
  return n;
#endif
}

SFGRPO_HD int popcount32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#elif defined(__GNUC__)
  return __builtin_popcount(x);
#else
  int n = 0;
  for (; x; x &= x - 1) ++n;
  return n;
#endif
}

// The position of the n-th set bit of `mask`, counting from 0 (n < popcount32(mask)): a binary
// search on the halves' popcounts.
SFGRPO_HD int nth_set_bit(uint32_t mask, int n) {
  int position = 0;
  for (int half = 16; half > 0; half >>= 1) {
    const int below = popcount32(mask & ((1u << half) - 1));
    if (n >= below) {
      n -= below;
      mask >>= half;
      position += half;
    }
  }
  return position;
}

// The smallest b with n <= 2^b (0 for n <= 1).
SFGRPO_HD int ceil_log2(uint64_t n) { return n <= 1 ? 0 : 64 - leading_zeros64(n - 1); }

// Lane masks: the lanes above `lane`, the lanes at or below it, lanes [lane, lane + span].
SFGRPO_HD uint32_t lanes_above(int lane) { return lane >= kWarpSize - 1 ? 0u : (~0u << (lane + 1)); }
SFGRPO_HD uint32_t lanes_up_to(int lane) { return ~0u >> (kWarpSize - 1 - lane); }
SFGRPO_HD uint32_t lanes_below(int lane) { return lane == 0 ? 0u : lanes_up_to(lane - 1); }

// ------------------------------------------------------------------------------- doubles
// The IEEE-754 bits of v.
SFGRPO_HD uint64_t double_bits(double v) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(v));
#else
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
#endif
}

// The double whose IEEE-754 bits these are.
SFGRPO_HD double double_from_bits(uint64_t bits) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(bits));
#else
  double v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

// 2^e for -1022 <= e <= 1023 (a normal double, built from its bits).
SFGRPO_HD double pow2(int e) { return double_from_bits(static_cast<uint64_t>(e + 1023) << 52); }

// ldexp(x, e): x * 2^e rounded once. A product with a normal power of two is exactly that (and a
// few instructions, where CUDA's ldexp is ~25 with its range checks); ldexp for the rest.
SFGRPO_HD double times_pow2(double x, int e) { return e >= -1022 && e <= 1023 ? x * pow2(e) : ldexp(x, e); }

// ------------------------------------------------------------------------- 128-bit integers
SFGRPO_HD uint64_t mul_hi(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#elif defined(__SIZEOF_INT128__)
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#else
  const uint64_t a0 = a & 0xffffffffu, a1 = a >> 32, b0 = b & 0xffffffffu, b1 = b >> 32;
  const uint64_t low = a0 * b0, mid1 = a1 * b0, mid2 = a0 * b1;
  const uint64_t carry = ((low >> 32) + (mid1 & 0xffffffffu) + (mid2 & 0xffffffffu)) >> 32;
  return a1 * b1 + (mid1 >> 32) + (mid2 >> 32) + carry;
#endif
}

// Unsigned 128-bit integer; arithmetic wraps modulo 2^128.
struct U128 {
  uint64_t lo = 0;
  uint64_t hi = 0;
};

SFGRPO_HD U128 mul_wide(uint64_t a, uint64_t b) { return U128{a * b, mul_hi(a, b)}; }

SFGRPO_HD U128 add(U128 a, U128 b) {
  const uint64_t lo = a.lo + b.lo;
  return U128{lo, a.hi + b.hi + (lo < a.lo ? 1u : 0u)};
}

SFGRPO_HD U128 sub(U128 a, U128 b) {
  return U128{a.lo - b.lo, a.hi - b.hi - (a.lo < b.lo ? 1u : 0u)};
}

SFGRPO_HD U128 mul(U128 a, uint64_t b) {  // modulo 2^128
  return U128{a.lo * b, mul_hi(a.lo, b) + a.hi * b};
}

SFGRPO_HD U128 shift_left(uint64_t v, int bits) {  // 0 <= bits <= 64
  if (bits == 0) return U128{v, 0};
  if (bits >= 64) return U128{0, v};
  return U128{v << bits, v >> (64 - bits)};
}

// The limbs of q: q mod 2^bits and q >> bits (1 <= bits <= 64; the caller knows q >> bits fits).
SFGRPO_HD void split(U128 q, int bits, uint64_t& low, uint64_t& high) {
  if (bits >= 64) {
    low = q.lo;
    high = q.hi;
  } else {
    low = q.lo & ((uint64_t{1} << bits) - 1);
    high = (q.hi << (64 - bits)) | (q.lo >> bits);
  }
}

// q rounded to the nearest double (ties to even), the same on the host and the device: the top 64
// bits with a sticky bit for the rest, one rounding conversion, an exact power-of-two scaling.
SFGRPO_HD double to_double(U128 q) {
  if (q.hi == 0) return static_cast<double>(q.lo);
  const int s = leading_zeros64(q.hi);
  const uint64_t top = s == 0 ? q.hi : ((q.hi << s) | (q.lo >> (64 - s)));
  const uint64_t rest = q.lo << s;  // s < 64
  return static_cast<double>(top | (rest != 0 ? 1u : 0u)) * pow2(64 - s);  // 1 <= 64 - s <= 64
}

// ------------------------------------------------------------------------------- atomics
// Device atomics when compiled for the GPU, plain read-modify-write in the (sequential) emulation.
SFGRPO_HD uint32_t atomic_cas(uint32_t* at, uint32_t expected, uint32_t desired) {
#if defined(__CUDA_ARCH__)
  return atomicCAS(reinterpret_cast<unsigned int*>(at), expected, desired);
#else
  const uint32_t old = *at;
  if (old == expected) *at = desired;
  return old;
#endif
}

SFGRPO_HD void atomic_add(uint64_t* at, uint64_t value) {
#if defined(__CUDA_ARCH__)
  atomicAdd(reinterpret_cast<unsigned long long*>(at), static_cast<unsigned long long>(value));
#else
  *at += value;  // wraps: two's complement sums of signed values
#endif
}

SFGRPO_HD void atomic_add(uint32_t* at, uint32_t value) {
#if defined(__CUDA_ARCH__)
  atomicAdd(reinterpret_cast<unsigned int*>(at), value);
#else
  *at += value;
#endif
}

SFGRPO_HD void atomic_max(uint64_t* at, uint64_t value) {
#if defined(__CUDA_ARCH__)
  atomicMax(reinterpret_cast<unsigned long long*>(at), static_cast<unsigned long long>(value));
#else
  if (value > *at) *at = value;
#endif
}

// ------------------------------------------------------------------------------ warp model
// The phases are written for a warp of 32 consecutive rows. Lanes<T> is one value per lane: on the
// device each thread holds its own lane's value, in the emulation an array holds all 32; `each`
// runs per-lane code (on the device for the calling lane, in the emulation for every lane in
// turn), and the collectives below (ballot, shuffles, reductions) are the warp intrinsics on the
// device and their definitions on the array in the emulation. Every lane of the warp calls every
// collective (warp-uniform control flow around them).
#if defined(__CUDA_ARCH__)
template <typename T>
struct Lanes {
  T value;
  __device__ __forceinline__ T& operator[](int) { return value; }
  __device__ __forceinline__ const T& operator[](int) const { return value; }
};
#else
template <typename T>
struct Lanes {
  T value[kWarpSize];
  T& operator[](int lane) { return value[lane]; }
  const T& operator[](int lane) const { return value[lane]; }
};
#endif

namespace warp {

template <typename F>
SFGRPO_HD void each(F&& f) {
#if defined(__CUDA_ARCH__)
  f(static_cast<int>(threadIdx.x & (kWarpSize - 1)));
#else
  for (int lane = 0; lane < kWarpSize; ++lane) f(lane);
#endif
}

SFGRPO_HD uint32_t ballot(const Lanes<bool>& p) {
#if defined(__CUDA_ARCH__)
  return __ballot_sync(0xffffffffu, p[0]);
#else
  uint32_t bits = 0;
  for (int lane = 0; lane < kWarpSize; ++lane) bits |= (p[lane] ? 1u : 0u) << lane;
  return bits;
#endif
}

SFGRPO_HD bool any(const Lanes<bool>& p) { return ballot(p) != 0; }

// The warp's lanes wait for each other (their shared-memory writes are then visible to one another).
SFGRPO_HD void sync() {
#if defined(__CUDA_ARCH__)
  __syncwarp();
#endif
}

// Lane l gets lane l - delta's value (l < delta: its own).
template <typename T>
SFGRPO_HD Lanes<T> shfl_up(const Lanes<T>& v, int delta) {
  Lanes<T> out;
#if defined(__CUDA_ARCH__)
  out[0] = __shfl_up_sync(0xffffffffu, v[0], delta);
#else
  for (int lane = 0; lane < kWarpSize; ++lane) out[lane] = v[lane >= delta ? lane - delta : lane];
#endif
  return out;
}

// Lane l gets lane l + delta's value (l + delta > 31: its own).
template <typename T>
SFGRPO_HD Lanes<T> shfl_down(const Lanes<T>& v, int delta) {
  Lanes<T> out;
#if defined(__CUDA_ARCH__)
  out[0] = __shfl_down_sync(0xffffffffu, v[0], delta);
#else
  for (int lane = 0; lane < kWarpSize; ++lane) out[lane] = v[lane + delta < kWarpSize ? lane + delta : lane];
#endif
  return out;
}

// Lane l gets lane src[l]'s value.
template <typename T>
SFGRPO_HD Lanes<T> shfl(const Lanes<T>& v, const Lanes<int>& src) {
  Lanes<T> out;
#if defined(__CUDA_ARCH__)
  out[0] = __shfl_sync(0xffffffffu, v[0], src[0]);
#else
  for (int lane = 0; lane < kWarpSize; ++lane) out[lane] = v[src[lane]];
#endif
  return out;
}

// The sum (maximum) over the warp, in every lane.
SFGRPO_HD uint64_t sum(const Lanes<uint64_t>& v) {
#if defined(__CUDA_ARCH__)
  uint64_t total = v[0];
  for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(0xffffffffu, total, offset);
  return total;
#else
  uint64_t total = 0;
  for (int lane = 0; lane < kWarpSize; ++lane) total += v[lane];
  return total;
#endif
}

SFGRPO_HD uint64_t maximum(const Lanes<uint64_t>& v) {
#if defined(__CUDA_ARCH__)
  uint64_t best = v[0];
  for (int offset = 16; offset > 0; offset >>= 1) {
    const uint64_t other = __shfl_xor_sync(0xffffffffu, best, offset);
    best = other > best ? other : best;
  }
  return best;
#else
  uint64_t best = 0;
  for (int lane = 0; lane < kWarpSize; ++lane) best = v[lane] > best ? v[lane] : best;
  return best;
#endif
}

// One atomic add of a warp-uniform `value` for the whole warp; every lane gets the old value.
SFGRPO_HD uint64_t fetch_add_once(uint64_t* at, uint64_t value) {
#if defined(__CUDA_ARCH__)
  unsigned long long old = 0;
  if ((threadIdx.x & (kWarpSize - 1)) == 0) old = atomicAdd(reinterpret_cast<unsigned long long*>(at), value);
  return __shfl_sync(0xffffffffu, old, 0);
#else
  const uint64_t old = *at;
  *at += value;
  return old;
#endif
}

// One atomic add (max) of a warp-uniform `value` for the whole warp, skipped when it is 0.
SFGRPO_HD void add_once(uint64_t* at, uint64_t value) {
  each([&](int lane) {
    if (lane == 0 && value != 0) atomic_add(at, value);
  });
}

SFGRPO_HD void max_once(uint64_t* at, uint64_t value) {
  each([&](int lane) {
    if (lane == 0 && value != 0) atomic_max(at, value);
  });
}

}  // namespace warp

// Runs: maximal stretches of consecutive active lanes with equal keys (the rows of one group side
// by side). Lanes past the batch's last row are runs of their own.
struct Runs {
  uint32_t heads = 0;  // warp-uniform: bit l is set when lane l starts a run
  Lanes<int> head;     // the lane that starts this lane's run
  Lanes<int> span;     // how many lanes follow this one in its run
};

template <typename K>
SFGRPO_HD Runs runs_of(const Lanes<K>& key, const Lanes<bool>& active) {
  const Lanes<K> before = warp::shfl_up(key, 1);
  Lanes<bool> starts;
  warp::each([&](int lane) { starts[lane] = !(active[lane] && lane > 0 && key[lane] == before[lane]); });
  Runs runs;
  runs.heads = warp::ballot(starts);
  warp::each([&](int lane) {
    const uint32_t next = runs.heads & lanes_above(lane);
    runs.span[lane] = (next != 0 ? trailing_zeros32(next) - 1 : kWarpSize - 1) - lane;
    runs.head[lane] = kWarpSize - 1 - leading_zeros32(runs.heads & lanes_up_to(lane));  // lane 0 is a head
  });
  return runs;
}

// The lanes of the run that starts at `lane`.
SFGRPO_HD uint32_t run_lanes(int lane, int span) {
  return (span >= kWarpSize - 1 ? ~0u : ((1u << (span + 1)) - 1)) << lane;
}

struct AddOp {
  SFGRPO_HD uint64_t operator()(uint64_t x, uint64_t y) const { return x + y; }
};

struct MaxOp {
  SFGRPO_HD uint64_t operator()(uint64_t x, uint64_t y) const { return x > y ? x : y; }
};

// Segmented reduction: afterwards the first lane of each run holds op over its run's values of
// each of the N lane vectors (the other lanes hold partial results). log2(longest run) shuffle
// steps, none when every run is one lane long. Integer sums and maxima: exact in any grouping.
template <int N, typename Op>
SFGRPO_HD void reduce_runs(const Runs& runs, Lanes<uint64_t> (&v)[N], Op op) {
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    Lanes<bool> more;  // lane + offset is still in this lane's run
    warp::each([&](int lane) { more[lane] = runs.span[lane] >= offset; });
    if (!warp::any(more)) break;
    for (int k = 0; k < N; ++k) {
      const Lanes<uint64_t> other = warp::shfl_down(v[k], offset);
      warp::each([&](int lane) {
        if (more[lane]) v[k][lane] = op(v[k][lane], other[lane]);
      });
    }
  }
}

// ------------------------------------------------------------------------- number formats
// Doubles as unsigned integers in the same order (larger double <-> larger integer); 0 is below
// every finite double's code, so a zeroed accumulator means "no value yet" for both bounds (the
// lower bound is stored complemented, so that atomicMax computes the minimum).
SFGRPO_HD uint64_t order_code(double v) {
  const uint64_t bits = double_bits(v);
  return (bits >> 63) ? ~bits : (bits | (uint64_t{1} << 63));
}

SFGRPO_HD double from_order_code(uint64_t code) {
  return double_from_bits((code >> 63) ? (code & ~(uint64_t{1} << 63)) : ~code);
}

// The smallest e with m < 2^e, for finite m > 0: from the exponent field of a normal m (CUDA's
// ilogb checks for zeros, infinities and subnormals first: ~30 instructions on the statistics'
// chain), ilogb for a subnormal one.
SFGRPO_HD int magnitude_exponent(double m) {
  const int biased = static_cast<int>((double_bits(m) >> 52) & 0x7ff);
  return biased != 0 ? biased - 1022 : ilogb(m) + 1;  // ilogb, not frexp: no address-taken local on the device
}

// ------------------------------------------------------------------------------- layout
constexpr uint64_t kKeyMix = 0x9E3779B97F4A7C15ULL;

// splitmix64's finaliser: consecutive ids (the usual prompt numbering) spread over the table.
SFGRPO_HD uint64_t mix_key(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Hash-table size for n rows: a power of two >= 2n (load <= 1/2: short probes).
inline int64_t table_slots(int64_t rows) {
  int64_t slots = 64;
  while (slots < 2 * rows) slots <<= 1;
  return slots;
}

// Per accumulator and statistic: the range {hi, lo} and the moment sums {S1, S2 mod 2^L, S2 >> L}.
constexpr int kRangeWords = 2;
constexpr int kMomentWords = 3;

// Pointers into the engine's scratch memory.
struct Workspace {
  int64_t slots = 0;
  // zeroed before phase 1
  uint64_t* counters = nullptr;       // [2] groups, rows with a NaN/inf reward
  uint64_t* batch_range = nullptr;    // [S][2] global_std: the batch's range
  uint64_t* batch_moments = nullptr;  // [S][3] and moment sums
  uint32_t* table = nullptr;          // [slots] 0: empty, else 1 + the claiming (representative) row
  uint32_t* size = nullptr;           // [rows] finite rows per representative
  uint64_t* range = nullptr;          // [rows][S][2] order code of the largest value, complemented
                                      // order code of the smallest
  // zeroed by the claimer in phase 1
  uint64_t* moments = nullptr;        // [rows][S][3] fixed-point moment sums per representative
  // written before being read
  int32_t* row_rep = nullptr;         // [rows] the row's representative; ~rep for a non-finite row
  int64_t* claim_ids = nullptr;       // [rows] statistics only: ids in order of claim, then padding
  int32_t* claim_reps = nullptr;      // [rows]
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
  int64_t* counts;  // {groups, nonfinite rows}, written by phase 3
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

// The fixed-point format of one accumulator (a group's or the batch's statistic s), derived from
// its final [lo, hi] and count: identical in every phase that uses it.
struct Scales {
  uint64_t count = 0;   // counted values
  bool any = false;     // count > 0
  bool equal = true;    // no values, or all equal (max == min, exact)
  double center = 0.0;  // c: values are summed as deviations from it
  int shift = 0;        // k: x = round((v - c) * 2^k)
  double factor = 0.0;  // 2^k when that is a normal double, else 0 (then ldexp)
  int split = 64;       // S2 is kept as S2 mod 2^split and S2 >> split
};

// From the accumulator's range words {hi, ~lo} (order codes).
SFGRPO_HD Scales scales_from(uint64_t hi_code, uint64_t lo_code, uint64_t count) {
  Scales sc;
  sc.count = count;
  if (count == 0 || hi_code == 0) return sc;
  const double hi = from_order_code(hi_code);
  const double lo = from_order_code(~lo_code);
  sc.any = true;
  sc.equal = !(hi > lo);
  double center = hi;
  if (!sc.equal) {  // the midpoint (no overflow: halves first), kept inside [lo, hi]
    center = 0.5 * hi + 0.5 * lo;
    center = center < lo ? lo : (center > hi ? hi : center);
  }
  sc.center = center;
  // |v - c| <= bound for every v in [lo, hi] (rounding is monotonic); bound <= max(|lo|, |hi|) is
  // finite
  const double above = hi - center;
  const double below = center - lo;
  const double bound = above > below ? above : below;
  const int headroom = ceil_log2(count);
  sc.split = 64 - headroom;
  sc.shift = bound == 0.0 ? 0 : 62 - headroom - magnitude_exponent(bound);
  sc.factor = sc.shift >= -1022 && sc.shift <= 1023 ? pow2(sc.shift) : 0.0;
  return sc;
}

SFGRPO_HD Scales scales_of(const uint64_t* range, uint64_t count) { return scales_from(range[0], range[1], count); }

// round((v - c) * 2^k): a power-of-two product is exact or rounded once, like ldexp.
SFGRPO_HD int64_t to_fixed(double v, const Scales& sc) {
  const double d = v - sc.center;
  return llrint(sc.factor != 0.0 ? d * sc.factor : ldexp(d, sc.shift));
}

// One row's (or value's) part of an accumulator's moment sums: S1 and S2 over its values.
struct Moments {
  uint64_t sum = 0;  // two's complement
  U128 squares;

  SFGRPO_HD void add_value(double v, const Scales& sc) {
    const int64_t x = to_fixed(v, sc);
    sum += static_cast<uint64_t>(x);
    const uint64_t magnitude = x < 0 ? uint64_t{0} - static_cast<uint64_t>(x) : static_cast<uint64_t>(x);
    squares = add(squares, mul_wide(magnitude, magnitude));
  }
};

// The accumulator's mean and sum of squared deviations from its moment sums (`moments`: {S1,
// S2 low limb, S2 high limb}). |S1| <= n 2^(62 - h) <= 2^62 and n S2 <= 2^124: exact in 128 bits.
SFGRPO_HD double mean_of(const Scales& sc, const uint64_t* moments) {
  if (!sc.any) return 0.0;
  const double s1 = static_cast<double>(static_cast<int64_t>(moments[0]));
  return sc.center + times_pow2(s1, -sc.shift) / static_cast<double>(sc.count);
}

SFGRPO_HD double squared_deviations(const Scales& sc, const uint64_t* moments) {
  if (sc.equal) return 0.0;
  const U128 s2 = add(U128{moments[1], 0}, shift_left(moments[2], sc.split));
  const int64_t s1 = static_cast<int64_t>(moments[0]);
  const uint64_t magnitude = s1 < 0 ? uint64_t{0} - static_cast<uint64_t>(s1) : static_cast<uint64_t>(s1);
  const U128 numerator = sub(mul(s2, sc.count), mul_wide(magnitude, magnitude));  // n S2 - S1^2 >= 0
  return times_pow2(to_double(numerator) / static_cast<double>(sc.count), -2 * sc.shift);
}

SFGRPO_HD double std_of(const Scales& sc, const uint64_t* moments, int ddof) {
  if (sc.equal) return 0.0;
  return math::std_from(squared_deviations(sc, moments), static_cast<double>(sc.count), ddof);
}

// ------------------------------------------------------------------------------- warp rows
// A warp's tile: the values of its rows as one contiguous block (rows x columns <= 2^30: the engine
// takes rows of at most kMaxWidth rewards, so the tile's arithmetic is 32-bit), and each lane's place
// in it, (row, column) of the lane's next value; a round moves every lane 32 values on. Phase 3
// stores the advantages tile by tile; the rows' staging (fixed_point_blocks.h) copies the rewards'.
template <typename T>
struct Tile {
  const T* rewards;  // the tile's first row
  T* out;            // phase 3: the advantages' tile
  int values;        // rows x columns
  int columns;
  int width;         // rewards per row
  int round_rows;    // 32 / columns
  int round_columns;  // 32 % columns

  SFGRPO_HD void start(Lanes<int>& row, Lanes<int>& column) const {
    warp::each([&](int lane) {
      row[lane] = lane / columns;
      column[lane] = lane % columns;
    });
  }
  SFGRPO_HD void advance(Lanes<int>& row, Lanes<int>& column) const {
    warp::each([&](int lane) {
      column[lane] += round_columns;
      row[lane] += round_rows;
      if (column[lane] >= columns) {
        column[lane] -= columns;
        row[lane] += 1;
      }
    });
  }
};

// Where the phases read the warp's rows: lane l's row at first + l * stride (phase 3 reads them as a
// tile). The rewards themselves (stride = width), or the warp's copy of them in shared memory
// (fixed_point_blocks.h),
// `pending` while its copies may still be in flight: a phase calls wait() before it reads a row,
// after its first loads of other data are issued (they then wait for memory with the copies).
template <typename T>
struct WarpRows {
  const T* first;
  int64_t stride;
  bool pending = false;

  SFGRPO_HD const T* row(int lane) const { return first + lane * stride; }
  SFGRPO_HD void wait() const {
#if defined(__CUDA_ARCH__)
    if (pending) {
      __pipeline_wait_prior(0);  // this lane's copies have landed
      __syncwarp();              // and every lane's
    }
#endif
  }
};

template <typename T>
SFGRPO_HD WarpRows<T> global_rows(const Args<T>& a, int64_t base) {
  return WarpRows<T>{a.rewards + base * a.p.width, a.p.width};
}

// ------------------------------------------------------------------------------- phase 1
// The group of id (row i, the first of its run): claims a slot or finds the one holding the id.
// Returns the representative row; `claimed` when it is row i.
template <typename T>
SFGRPO_HD int32_t find_group(const Args<T>& a, int64_t i, int64_t id, bool& claimed) {
  const Workspace& w = a.w;
  const uint64_t mask = static_cast<uint64_t>(w.slots) - 1;
  const uint32_t mine = static_cast<uint32_t>(i) + 1;
  uint64_t slot = mix_key(static_cast<uint64_t>(id) ^ kKeyMix) & mask;
  while (true) {  // ends: at most `rows` of the >= 2 rows slots are ever taken
    // one CAS, no read of the slot first: a warp's lanes that claim and lanes that find would wait
    // for memory one more time (the read, then the claimers' CAS); a slot is written once
    const uint32_t seen = atomic_cas(w.table + slot, 0u, mine);
    if (seen == 0) {
      claimed = true;
      return static_cast<int32_t>(i);
    }
    if (a.ids[seen - 1] == id) {
      claimed = false;
      return static_cast<int32_t>(seen - 1);
    }
    slot = (slot + 1) & mask;
  }
}

// The order codes {hi, ~lo} of the row's counted values of statistic s; {0, 0} when it has none.
template <typename T>
SFGRPO_HD void row_range(const AdvantageProblem& p, const T* row, int64_t s, uint64_t& hi, uint64_t& lo) {
  int64_t first, last;
  stat_columns_of(p, s, first, last);
  bool any = false;
  double low = 0.0, high = 0.0;
  for (int64_t c = first; c < last; ++c) {
    if (!math::column_counted(p.column_mask, c)) continue;
    const double v = math::value_at(row, c, p.gains);
    low = any && low < v ? low : v;
    high = any && high > v ? high : v;
    any = true;
  }
  hi = any ? order_code(high) : 0;
  lo = any ? ~order_code(low) : 0;
}

// Phase 1 for the warp's rows base .. base + 31, their rewards read from `rows`.
template <typename T>
SFGRPO_HD void insert_warp(const Args<T>& a, int64_t base, const WarpRows<T>& rows) {
  const AdvantageProblem& p = a.p;
  const Workspace& w = a.w;
  const int64_t stat_columns = p.stat_columns();
  Lanes<bool> active, finite;
  Lanes<int64_t> id;
  warp::each([&](int lane) {
    const int64_t i = base + lane;
    active[lane] = i < p.rows;
    id[lane] = active[lane] ? a.ids[i] : 0;
  });
  rows.wait();
  warp::each([&](int lane) {
    finite[lane] = active[lane] && math::row_is_finite(rows.row(lane), p.width, p.gains);
  });
  const Runs runs = runs_of(id, active);

  // the first row of each run looks the id up; the run's other rows take its answer
  Lanes<int> rep;
  Lanes<bool> claimed;
  warp::each([&](int lane) {
    claimed[lane] = false;
    rep[lane] = 0;
    if (active[lane] && runs.head[lane] == lane) rep[lane] = find_group(a, base + lane, id[lane], claimed[lane]);
  });
  rep = warp::shfl(rep, runs.head);

  const uint32_t claims = warp::ballot(claimed);
  if (w.claim_ids != nullptr) {  // statistics: each claim gets a slot in the list to sort
    if (claims != 0) {
      const uint64_t first = warp::fetch_add_once(w.counters, static_cast<uint64_t>(popcount32(claims)));
      warp::each([&](int lane) {
        if (!claimed[lane]) return;
        const uint64_t g = first + static_cast<uint64_t>(popcount32(claims & lanes_below(lane)));
        w.claim_ids[g] = id[lane];
        w.claim_reps[g] = rep[lane];
      });
    }
  } else {
    warp::add_once(w.counters, static_cast<uint64_t>(popcount32(claims)));
  }
  Lanes<bool> bad;
  warp::each([&](int lane) { bad[lane] = active[lane] && !finite[lane]; });
  warp::add_once(w.counters + 1, static_cast<uint64_t>(popcount32(warp::ballot(bad))));

  const uint32_t finite_lanes = warp::ballot(finite);
  warp::each([&](int lane) {
    if (!active[lane]) return;
    const int64_t i = base + lane;
    w.row_rep[i] = finite[lane] ? rep[lane] : ~rep[lane];
    if (claimed[lane]) {  // phase 2 accumulates into these
      uint64_t* sums = w.moments + i * stat_columns * kMomentWords;
      for (int64_t k = 0; k < stat_columns * kMomentWords; ++k) sums[k] = 0;
    }
    if (runs.head[lane] == lane) {
      const int n = popcount32(finite_lanes & run_lanes(lane, runs.span[lane]));
      if (n != 0) atomic_add(w.size + rep[lane], static_cast<uint32_t>(n));
    }
  });

  for (int64_t s = 0; s < stat_columns; ++s) {
    Lanes<uint64_t> codes[2];  // {hi, ~lo}
    warp::each([&](int lane) {
      codes[0][lane] = 0;
      codes[1][lane] = 0;
      if (finite[lane]) row_range(p, rows.row(lane), s, codes[0][lane], codes[1][lane]);
    });
    if (p.global_std) {
      warp::max_once(w.batch_range + s * kRangeWords, warp::maximum(codes[0]));
      warp::max_once(w.batch_range + s * kRangeWords + 1, warp::maximum(codes[1]));
    }
    reduce_runs(runs, codes, MaxOp{});
    warp::each([&](int lane) {
      if (!active[lane] || runs.head[lane] != lane) return;
      uint64_t* range = w.range + (static_cast<int64_t>(rep[lane]) * stat_columns + s) * kRangeWords;
      if (codes[0][lane] != 0) atomic_max(range, codes[0][lane]);
      if (codes[1][lane] != 0) atomic_max(range + 1, codes[1][lane]);
    });
  }
}

// ------------------------------------------------------------------------------- phase 2
// Finite rows of the batch (the global-std accumulator's rows).
SFGRPO_HD uint64_t batch_rows(const AdvantageProblem& p, const Workspace& w) {
  return static_cast<uint64_t>(p.rows) - w.counters[1];
}

// The row's moment sums of statistic s in the format `sc`.
template <typename T>
SFGRPO_HD Moments row_moments(const AdvantageProblem& p, const T* row, int64_t s, const Scales& sc) {
  int64_t first, last;
  stat_columns_of(p, s, first, last);
  Moments m;
  for (int64_t c = first; c < last; ++c) {
    if (math::column_counted(p.column_mask, c)) m.add_value(math::value_at(row, c, p.gains), sc);
  }
  return m;
}

// The limbs {S1, S2 mod 2^L, S2 >> L} of a row's part. Each limb of each part is at most its
// accumulator's total, so the accumulators' 64-bit sums cannot overflow.
SFGRPO_HD void limbs_of(const Moments& m, const Scales& sc, uint64_t& s1, uint64_t& low, uint64_t& high) {
  s1 = m.sum;
  split(m.squares, sc.split, low, high);
}

// Phase 2 reads each group's ranges kRangeChunk statistics at a time, all before the chunk's first
// atomic: the compiler cannot move a load past an atomic (they may alias), so a range read per
// statistic would wait for memory once per statistic. The first chunk's are read with the group sizes,
// before the rows' copies are waited for.
constexpr int kRangeChunk = 4;

// Phase 2 for the warp's rows base .. base + 31, their rewards read from `rows`.
template <typename T>
SFGRPO_HD void moments_warp(const Args<T>& a, int64_t base, const WarpRows<T>& rows) {
  const AdvantageProblem& p = a.p;
  const Workspace& w = a.w;
  const int64_t stat_columns = p.stat_columns();
  Lanes<bool> active, finite;
  Lanes<int> rep;
  Lanes<uint32_t> rows_of_group;
  Lanes<uint64_t> hi[kRangeChunk], lo[kRangeChunk];  // statistics s .. s + kRangeChunk - 1 (at s: [0])
  const auto gather_ranges = [&](int64_t first) {
    warp::each([&](int lane) {
      const uint64_t* range = w.range + (static_cast<int64_t>(rep[lane]) * stat_columns + first) * kRangeWords;
      SFGRPO_UNROLL
      for (int k = 0; k < kRangeChunk; ++k) {
        const bool wanted = finite[lane] && first + k < stat_columns;
        hi[k][lane] = wanted ? range[k * kRangeWords] : 0;
        lo[k][lane] = wanted ? range[k * kRangeWords + 1] : 0;
      }
    });
  };
  warp::each([&](int lane) {
    const int64_t i = base + lane;
    active[lane] = i < p.rows;
    // (no L1 prefetch of the row's rewards here: tried on an H100, 2026-11-27, it took fewer stalls on
    // the moment loop's loads but more on this load, 8.6 -> 9.0 us for the phase)
    const int32_t packed = active[lane] ? w.row_rep[i] : 0;
    finite[lane] = active[lane] && packed >= 0;
    rep[lane] = packed >= 0 ? packed : ~packed;
    rows_of_group[lane] = finite[lane] ? w.size[rep[lane]] : 0;
  });
  gather_ranges(0);
  rows.wait();
  const Runs runs = runs_of(rep, active);
  const uint64_t batch = p.global_std ? batch_rows(p, w) : 0;

  for (int64_t s = 0; s < stat_columns; ++s) {
    if (s % kRangeChunk == 0 && s > 0) {
      gather_ranges(s);
    } else if (s > 0) {  // the next statistic's range to the front
      SFGRPO_UNROLL
      for (int k = 0; k + 1 < kRangeChunk; ++k) {
        hi[k] = hi[k + 1];
        lo[k] = lo[k + 1];
      }
    }
    const int64_t per_row = values_per_row(p, s);
    Lanes<uint64_t> parts[kMomentWords];
    warp::each([&](int lane) {
      for (int k = 0; k < kMomentWords; ++k) parts[k][lane] = 0;
      if (!finite[lane]) return;
      const Scales sc = scales_from(hi[0][lane], lo[0][lane], uint64_t{rows_of_group[lane]} * per_row);
      if (!sc.any || sc.equal) return;  // all values equal: the statistic needs no sums
      const Moments m = row_moments(p, rows.row(lane), s, sc);
      limbs_of(m, sc, parts[0][lane], parts[1][lane], parts[2][lane]);
      if (p.global_std) parts[1][lane] = parts[2][lane] = 0;  // the group's std is not used
    });
    if (p.global_std) {
      Lanes<uint64_t> batch_parts[kMomentWords];
      const Scales sc = scales_of(w.batch_range + s * kRangeWords, batch * per_row);
      warp::each([&](int lane) {
        for (int k = 0; k < kMomentWords; ++k) batch_parts[k][lane] = 0;
        if (!finite[lane] || !sc.any || sc.equal) return;
        const Moments m = row_moments(p, rows.row(lane), s, sc);
        limbs_of(m, sc, batch_parts[0][lane], batch_parts[1][lane], batch_parts[2][lane]);
      });
      for (int k = 0; k < kMomentWords; ++k) {
        warp::add_once(w.batch_moments + s * kMomentWords + k, warp::sum(batch_parts[k]));
      }
    }
    reduce_runs(runs, parts, AddOp{});
    warp::each([&](int lane) {
      if (!active[lane] || runs.head[lane] != lane) return;
      uint64_t* sums = w.moments + (static_cast<int64_t>(rep[lane]) * stat_columns + s) * kMomentWords;
      for (int k = 0; k < kMomentWords; ++k) {
        if (parts[k][lane] != 0) atomic_add(sums + k, parts[k][lane]);
      }
    });
  }
}

// ---------------------------------------------------------------------------- phases 2b, 3
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
  const uint32_t rows = w.size[r];
  const int64_t at = r * stat_columns + s;
  const Scales sc = scales_of(w.range + at * kRangeWords, uint64_t{rows} * per_row);
  GroupStat g;
  g.mean = mean_of(sc, w.moments + at * kMomentWords);
  bool equal = sc.equal;
  if (p.global_std) {
    const Scales batch = scales_of(w.batch_range + s * kRangeWords, batch_rows(p, w) * per_row);
    g.divisor = std_of(batch, w.batch_moments + s * kMomentWords, p.ddof);
    equal = batch.equal;
  } else {
    g.divisor = std_of(sc, w.moments + at * kMomentWords, p.ddof);
  }
  g.zero = equal || rows <= 1;
  return g;
}

// ------------------------------------------------------------------------------- phase 2b
// With several statistics per group (one per step, or per reward column), phase 3 would compute
// one per value: a warp's rounds each wait for the ~800-instruction chain of group_stat in turn
// (10 chains per warp at 10 steps). Phase 2b computes each (group, statistic) once instead: a
// warp takes the groups its rows claimed (a group's representative is the row that claimed it),
// spreads their (group, statistic) pairs over its lanes (groups of 16 and 10 steps: 20 pairs, one
// chain per warp) and writes each result over the group's moment sums, which nothing else reads
// after phase 2. Phase 3 then gathers each value's statistic. With one statistic per group (joint,
// one reward column) the phase is skipped: phase 3 computes it once per row, in parallel lanes, in
// the time this phase would take, without its grid barrier.
SFGRPO_HD bool finalized(const AdvantageProblem& p) { return p.stat_columns() > 1; }

// A finalized statistic's words (over its moment sums): the mean, the scale 1 / (divisor + eps) and
// the divisor, whose sign bit (free: a divisor is >= 0) is set when the advantages are 0.
constexpr uint64_t kSignBit = uint64_t{1} << 63;

SFGRPO_HD uint64_t* final_words(const Workspace& w, int64_t stat_columns, int64_t r, int64_t s) {
  return w.moments + (r * stat_columns + s) * kMomentWords;
}

SFGRPO_HD void store_final(uint64_t* words, const GroupStat& g, const AdvantageProblem& p) {
  words[0] = double_bits(g.mean);
  words[1] = double_bits(math::inverse_spread(g.divisor, p));
  words[2] = double_bits(g.divisor) | (g.zero ? kSignBit : 0);
}

// The statistic (as write_stats_row reports it) and its scale.
SFGRPO_HD GroupStat final_stat(const uint64_t* words) {
  GroupStat g;
  g.mean = double_from_bits(words[0]);
  g.divisor = double_from_bits(words[2] & ~kSignBit);
  g.zero = (words[2] & kSignBit) != 0;
  return g;
}

SFGRPO_HD double final_scale(const uint64_t* words) { return double_from_bits(words[1]); }

// Phase 2b for the groups that the warp's rows base .. base + 31 claimed.
template <typename T>
SFGRPO_HD void finalize_warp(const Args<T>& a, int64_t base) {
  const AdvantageProblem& p = a.p;
  const int64_t stat_columns = p.stat_columns();
  Lanes<bool> claimer;
  warp::each([&](int lane) {
    const int64_t i = base + lane;
    const int32_t packed = i < p.rows ? a.w.row_rep[i] : -1;
    claimer[lane] = i < p.rows && (packed >= 0 ? packed : ~packed) == i;
  });
  const uint32_t claims = warp::ballot(claimer);
  const int64_t pairs = popcount32(claims) * stat_columns;
  for (int64_t first = 0; first < pairs; first += kWarpSize) {
    warp::each([&](int lane) {
      const int64_t e = first + lane;
      if (e >= pairs) return;
      const int64_t r = base + nth_set_bit(claims, static_cast<int>(e / stat_columns));
      const int64_t s = e % stat_columns;
      store_final(final_words(a.w, stat_columns, r, s), group_stat(a, r, s), p);
    });
  }
}

// ------------------------------------------------------------------------------- phase 3
// Phase 3 for the warp's rows base .. base + 31. Their advantages are one contiguous tile of `out`
// (rows x columns values) that consecutive lanes store value by value, so each store of the warp
// covers 32 consecutive values (one row per lane spread every store over 32 rows: 32 partial
// sectors). Where each value's statistic comes from (StatSource): pooled, computed once per row by
// the row's lane and shuffled to the lanes that store the row's values; finalized (phase 2b),
// gathered per value; otherwise (one statistic per group, not pooled: one value per row) computed
// by each value's lane.
// The tile's rewards (and finalized statistics) are loaded kRounds rounds of 32 values ahead of
// their stores: the compiler cannot move a load above a store to `out` (which, for all it knows,
// may alias them), so a loop of load-then-store would wait for memory once per round; the first
// rounds' loads are issued before the row statistics' gathers, so both wait for memory together.
// Computed per value, one round at a time: the statistic's arithmetic next to 8 loaded values
// would need more registers than the kernels can have and keep their blocks resident (the
// cooperative launch's grid).
enum class StatSource { kRow, kFinal, kValue };
constexpr int kPooledRounds = 4;
constexpr int kFinalRounds = 3;

// Bits of a row's flags in phase 3.
constexpr int kRowFinite = 1;  // the row counts: every reward finite
constexpr int kRowZero = 2;    // pooled: its group's advantages are all 0

// The per-row part of phase 3 for the warp's rows: each lane's representative and flags, and, when
// pooled, its group's mean and 1 / (std + eps).
struct RowStats {
  Lanes<int> rep, flags;
  Lanes<double> mean, scale;
};

template <typename T>
SFGRPO_HD RowStats row_stats(const Args<T>& a, int64_t base) {
  const AdvantageProblem& p = a.p;
  RowStats rows;
  warp::each([&](int lane) {
    const int64_t i = base + lane;
    const int32_t packed = i < p.rows ? a.w.row_rep[i] : -1;  // past the batch: not finite
    rows.rep[lane] = packed >= 0 ? packed : ~packed;
    rows.flags[lane] = packed >= 0 ? kRowFinite : 0;
    rows.mean[lane] = 0.0;
    rows.scale[lane] = 0.0;
    if (p.pooled && packed >= 0) {
      const GroupStat g = group_stat(a, rows.rep[lane], 0);
      rows.mean[lane] = g.mean;
      rows.scale[lane] = math::inverse_spread(g.divisor, p);  // once per row, not per value
      if (g.zero) rows.flags[lane] |= kRowZero;
    }
  });
  return rows;
}

// Up to kRounds rounds of the tile's values from `first` on: each value's reward (and the next, for
// a gain) and its (row, column); the cursor (row, column) moves past them. With finalized
// statistics also each value's {mean, scale, zero} (gather_final).
template <int kRounds, StatSource kSource, typename T>
struct TileRound {
  static constexpr int kStats = kSource == StatSource::kFinal ? kRounds : 0;
  Lanes<T> left[kRounds], right[kRounds];
  Lanes<int> row[kRounds], column[kRounds];
  Lanes<double> mean[kStats > 0 ? kStats : 1], scale[kStats > 0 ? kStats : 1];
  Lanes<bool> zero[kStats > 0 ? kStats : 1];

  SFGRPO_HD void load(const Tile<T>& tile, bool gains, int first, Lanes<int>& at_row, Lanes<int>& at_column) {
    SFGRPO_UNROLL
    for (int k = 0; k < kRounds; ++k) {
      row[k] = at_row;
      column[k] = at_column;
      warp::each([&](int lane) {
        const bool valid = first + k * kWarpSize + lane < tile.values;
        // 64-bit: a lane past the tile's end may stand on a row whose offset needs more than 31 bits
        const T* at = tile.rewards + static_cast<int64_t>(at_row[lane]) * tile.width + at_column[lane];
        left[k][lane] = valid ? at[0] : T(0);
        right[k][lane] = valid && gains ? at[1] : T(0);
      });
      tile.advance(at_row, at_column);
    }
  }

  // The loaded rounds' finalized statistics: each value's row's representative from its lane, then
  // one gather per value (all rounds' before any store).
  SFGRPO_HD void gather_final(const Args<T>& a, const Tile<T>& tile, const RowStats& rows, int first) {
    SFGRPO_UNROLL
    for (int k = 0; k < kStats; ++k) {
      Lanes<int> source;
      warp::each([&](int lane) { source[lane] = first + k * kWarpSize + lane < tile.values ? row[k][lane] : 0; });
      const Lanes<int> rep = warp::shfl(rows.rep, source);
      warp::each([&](int lane) {
        mean[k][lane] = 0.0;
        scale[k][lane] = 0.0;
        zero[k][lane] = true;
        if (first + k * kWarpSize + lane >= tile.values) return;
        const uint64_t* words = final_words(a.w, a.p.stat_columns(), rep[lane], column[k][lane]);
        const GroupStat g = final_stat(words);
        mean[k][lane] = g.mean;
        scale[k][lane] = final_scale(words);
        zero[k][lane] = g.zero;
      });
    }
  }
};

// The advantages of the rounds that `loaded` holds.
template <int kRounds, StatSource kSource, typename T>
SFGRPO_HD void store_rounds(const Args<T>& a, const Tile<T>& tile, const RowStats& rows,
                            const TileRound<kRounds, kSource, T>& loaded, int first) {
  const AdvantageProblem& p = a.p;
  constexpr int kStats = TileRound<kRounds, kSource, T>::kStats;
  SFGRPO_UNROLL
  for (int k = 0; k < kRounds; ++k) {
    const int round_first = first + k * kWarpSize;
    if (round_first >= tile.values) continue;  // warp-uniform (no break: the loop must unroll)
    Lanes<int> source;
    warp::each([&](int lane) { source[lane] = round_first + lane < tile.values ? loaded.row[k][lane] : 0; });
    const Lanes<int> row_flags = warp::shfl(rows.flags, source);
    Lanes<int> row_rep;
    Lanes<double> row_mean, row_scale;
    if (kSource == StatSource::kRow) {
      row_mean = warp::shfl(rows.mean, source);
      row_scale = warp::shfl(rows.scale, source);
    } else if (kSource == StatSource::kValue) {
      row_rep = warp::shfl(rows.rep, source);
    }
    warp::each([&](int lane) {
      const int e = round_first + lane;
      if (e >= tile.values) return;
      const int c = loaded.column[k][lane];
      double advantage = 0.0;
      if ((row_flags[lane] & kRowFinite) && math::column_counted(p.column_mask, c)) {
        const double value = math::value_of(loaded.left[k][lane], loaded.right[k][lane], p.gains);
        if (kSource == StatSource::kRow) {
          if (!(row_flags[lane] & kRowZero)) advantage = math::standardize(value, row_mean[lane], row_scale[lane], p);
        } else if (kSource == StatSource::kFinal) {
          const int j = kStats > 0 ? k : 0;  // (the other sources hold no statistics to index)
          if (!loaded.zero[j][lane]) advantage = math::standardize(value, loaded.mean[j][lane], loaded.scale[j][lane], p);
        } else {
          const GroupStat g = group_stat(a, row_rep[lane], c);
          if (!g.zero) advantage = math::standardize(value, g.mean, math::inverse_spread(g.divisor, p), p);
        }
      }
      tile.out[e] = static_cast<T>(advantage);
    });
  }
}

template <int kRounds, StatSource kSource, typename T>
SFGRPO_HD void write_tile(const Args<T>& a, int64_t base, const WarpRows<T>& source) {
  const AdvantageProblem& p = a.p;
  const int columns = static_cast<int>(p.columns());
  const int tile_rows = static_cast<int>(p.rows - base < kWarpSize ? p.rows - base : kWarpSize);
  const Tile<T> tile{source.first, a.out + base * columns, tile_rows * columns, columns,
                     static_cast<int>(source.stride), kWarpSize / columns, kWarpSize % columns};
  Lanes<int> row, column;
  tile.start(row, column);
  TileRound<kRounds, kSource, T> loaded;
  loaded.load(tile, p.gains, 0, row, column);  // in flight with row_stats' gathers
  const RowStats rows = row_stats(a, base);
  for (int first = 0;;) {
    if (kSource == StatSource::kFinal) loaded.gather_final(a, tile, rows, first);
    store_rounds<kRounds, kSource>(a, tile, rows, loaded, first);
    first += kWarpSize * kRounds;
    if (first >= tile.values) break;
    loaded.load(tile, p.gains, first, row, column);
  }
}

// Phase 3 for the warp's rows base .. base + 31, their rewards read from `source` (the rewards, or
// the cooperative launch's stage, which still holds them when one round covers the batch).
template <typename T>
SFGRPO_HD void write_warp(const Args<T>& a, int64_t base, const WarpRows<T>& source) {
  if (a.p.pooled) {
    write_tile<kPooledRounds, StatSource::kRow>(a, base, source);
  } else if (finalized(a.p)) {
    write_tile<kFinalRounds, StatSource::kFinal>(a, base, source);
  } else {
    write_tile<1, StatSource::kValue>(a, base, source);
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
    const GroupStat g = finalized(a.p) ? final_stat(final_words(w, stat_columns, r, s)) : group_stat(a, r, s);
    a.stats.mean[j * stat_columns + s] = g.mean;
    a.stats.std[j * stat_columns + s] = g.divisor;
    a.stats.zero_std[j * stat_columns + s] = g.zero;
  }
}

}  // namespace fixed
}  // namespace sfgrpo
