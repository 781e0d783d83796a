// CPU fused SDE step (see sfgrpo/sde_step.h). Each (row, chunk) work item streams its inputs once
// in blocks of kBlock values: a block is first converted to fp32 scratch arrays (one switch per
// block, so the arithmetic loops below stay branch-free and vectorisable), then every requested
// output is formed from those arrays. Per-row sums of squares are fp64, added per chunk and then
// over chunks in order.
#include "sfgrpo/sde_step.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

// The streaming loops are compiled twice on x86-64 GCC, for AVX2 and for the baseline, and the
// loader picks one for the CPU at hand. With FP contraction off (CMakeLists.txt) both clones do
// the same IEEE operations in the same order: the same bits on every CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SFGRPO_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SFGRPO_CPU_CLONES
#endif

namespace sfgrpo {
namespace {

constexpr int64_t kBlock = 256;
constexpr int64_t kChunk = int64_t{1} << 16;  // elements per work item (fixed: deterministic sums)
// Threads are started per call (no pool): only worth it for a few milliseconds of work each.
constexpr int64_t kValuesPerThread = int64_t{1} << 18;
// Independent fp64 accumulators per sum: the additions of one lane form a chain, the lanes do not,
// so the loop vectorises and pipelines; lanes are combined in a fixed order (same bits always).
constexpr int kLanes = 8;
constexpr int kMaxThreads = 64;
constexpr double kLogSqrt2Pi = 0.91893853320467274178;  // log(sqrt(2 pi))
constexpr float kHalfPi = 1.57079632679489661923f;

// ------------------------------------------------------------------------- storage conversion
inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float value) {
  const uint32_t bits = float_bits(value);
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // stays a quiet NaN
  const uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);  // to nearest, ties to even
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return bits_float(float_bits(magnitude) | sign);
  }
  if (exponent == 31) return bits_float(sign | 0x7F800000u | (mantissa << 13));  // inf / NaN
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t float_to_fp16(float value) {
  uint32_t bits = float_bits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  bits &= 0x7FFFFFFFu;
  if (bits >= 0x7F800000u) return sign | (bits > 0x7F800000u ? 0x7E00u : 0x7C00u);  // NaN / inf
  if (bits >= 0x477FF000u) return sign | 0x7C00u;  // rounds past the largest half (65504): inf
  if (bits < 0x38800000u) {
    // Below the smallest normal half (2^-14): adding 0.5 puts the value's 2^-24 units in the low
    // mantissa bits of a float near 0.5, and the addition rounds them to nearest even for us.
    const float shifted = bits_float(bits) + 0.5f;
    return sign | static_cast<uint16_t>(float_bits(shifted) - 0x3F000000u);
  }
  const uint32_t odd = (bits >> 13) & 1u;
  bits += 0xC8000FFFu + odd;  // rebias the exponent (127 -> 15) and round to nearest even
  return sign | static_cast<uint16_t>(bits >> 13);
}

// Values [offset, offset + n) of a latent -> fp32.
inline void load(const Latent& latent, int64_t offset, int64_t n, float* out) {
  switch (latent.type) {
    case Storage::kFloat32: {
      const float* src = static_cast<const float*>(latent.data) + offset;
      std::copy(src, src + n, out);
      break;
    }
    case Storage::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(latent.data) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(src[i]);
      break;
    }
    case Storage::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(latent.data) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_float(src[i]);
      break;
    }
    case Storage::kFloat64: {
      const double* src = static_cast<const double*>(latent.data) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(src[i]);
      break;
    }
  }
}

// fp32 values -> [offset, offset + n) of a latent, rounded to its storage type.
inline void store(const MutableLatent& latent, int64_t offset, int64_t n, const float* values) {
  switch (latent.type) {
    case Storage::kFloat32:
      std::copy(values, values + n, static_cast<float*>(latent.data) + offset);
      break;
    case Storage::kBFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(latent.data) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(values[i]);
      break;
    }
    case Storage::kFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(latent.data) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = float_to_fp16(values[i]);
      break;
    }
    case Storage::kFloat64: {
      double* dst = static_cast<double*>(latent.data) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<double>(values[i]);
      break;
    }
  }
}

inline Latent as_input(const MutableLatent& latent) { return Latent{latent.data, latent.type}; }

// ------------------------------------------------------------------------- Philox noise
// Philox-4x32-10 with Triton's constants and word order (counter = low word, high word, 0, 0; key
// = the seed's two words), the four words -> four uniforms -> two Box-Muller pairs in the formula
// of the Triton kernels and sfgrpo.reference.philox_normal4 (radius -sqrt(max(-2 ln(2) log2 u1, 0)),
// angle 2 pi u2 - pi), the same values up to the last bits of log2f/cosf/sinf.
inline void philox_normals(uint64_t seed, uint64_t counter, float out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_b = uint64_t{0xCD9E8D57u} * c2;
    const uint64_t prod_a = uint64_t{0xD2511F53u} * c0;
    c0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const uint32_t words[4] = {c0, c1, c2, c3};
  float uniform[4];
  for (int j = 0; j < 4; ++j) {
    int32_t folded = static_cast<int32_t>(words[j]);
    if (folded < 0) folded = ~folded;
    uniform[j] = static_cast<float>(folded) * 4.6566127342e-10f;
  }
  for (int pair = 0; pair < 2; ++pair) {
    const float log2_u1 = std::log2(std::max(1.0e-7f, uniform[2 * pair]));
    const float radius = -std::sqrt(std::max(-1.3862943611198906f * log2_u1, 0.0f));
    const float angle = 6.283185307179586f * uniform[2 * pair + 1] - 3.141592653589793f;
    out[2 * pair] = radius * std::cos(angle);
    out[2 * pair + 1] = radius * std::sin(angle);
  }
}

// Normals for elements [begin, begin + n) of `row` (begin a multiple of 4).
inline void philox_block(const SdeForwardInputs& in, int64_t elements, int64_t row, int64_t begin, int64_t n,
                         float* out) {
  const uint64_t quads = static_cast<uint64_t>((elements + 3) / 4);
  uint64_t counter = in.philox_offset + static_cast<uint64_t>(row) * quads + static_cast<uint64_t>(begin / 4);
  float four[4];
  for (int64_t i = 0; i < n; i += 4, ++counter) {
    philox_normals(in.philox_seed, counter, four);
    for (int64_t j = 0; j < 4 && i + j < n; ++j) out[i + j] = four[j];
  }
}

// ------------------------------------------------------------------------- per-row coefficients
// mean = c_x x + c_v v; `std` the step's noise std, `std_dev_t` Flow-GRPO's std_dev_t. fp32, in the
// order of sfgrpo.reference.sde_coefficients.
struct RowCoefficients {
  float c_x = 1.0f, c_v = 0.0f, std = 0.0f, std_dev_t = 0.0f, t = 0.0f;
};

RowCoefficients coefficients(const SdeStepProblem& p, int64_t row) {
  const float t = p.t.at(row), t_next = p.t_next.at(row), level = p.noise_level.at(row);
  const float dt = t_next - t;
  RowCoefficients c;
  c.t = t;
  switch (p.sde_type) {
    case SdeType::kSde: {
      const float t_tilde = t >= 1.0f ? p.sigma_max.at(row) : t;
      const float sigma_t = level * std::sqrt(t / (1.0f - t_tilde));
      const float correction = sigma_t * sigma_t / (2.0f * t);
      c.c_x = 1.0f + dt * correction;
      c.c_v = dt * (1.0f + correction * (1.0f - t));
      c.std = sigma_t * std::sqrt(-dt);
      c.std_dev_t = sigma_t;
      break;
    }
    case SdeType::kCps:
    case SdeType::kDdim: {
      const float std = p.sde_type == SdeType::kCps ? t_next * std::sin(level * kHalfPi)
                                                     : level * t_next * std::sqrt(1.0f - t);
      const float keep = std::sqrt(std::max(t_next * t_next - std * std, 0.0f));
      c.c_x = (1.0f - t_next) + keep;
      c.c_v = keep * (1.0f - t) - t * (1.0f - t_next);
      c.std = std;
      c.std_dev_t = std;
      break;
    }
    case SdeType::kOde:
      c.c_x = 1.0f;
      c.c_v = dt;
      break;
  }
  return c;
}

// 1/D for the mean reduction, 1 for the sum.
inline double reduction_scale(const SdeStepProblem& p) {
  return p.sum_reduction ? 1.0 : 1.0 / static_cast<double>(p.elements);
}

inline bool bare_squares(const SdeStepProblem& p) {
  return p.flow_grpo_logprob && (p.sde_type == SdeType::kCps || p.sde_type == SdeType::kDdim);
}

inline float kl_std(const SdeStepProblem& p, const RowCoefficients& c) {
  return p.flow_grpo_kl ? c.std_dev_t : c.std;
}

// ------------------------------------------------------------------------- work splitting
struct WorkItem {
  int64_t row, begin, end;  // elements [begin, end) of `row`
};

std::vector<WorkItem> work_items(const SdeStepProblem& p) {
  std::vector<WorkItem> items;
  const int64_t chunks = std::max<int64_t>(1, (p.elements + kChunk - 1) / kChunk);
  items.reserve(static_cast<size_t>(p.rows * chunks));
  for (int64_t row = 0; row < p.rows; ++row) {
    for (int64_t begin = 0; begin < p.elements; begin += kChunk) {
      items.push_back({row, begin, std::min(begin + kChunk, p.elements)});
    }
  }
  return items;
}

// Runs body(i) for i in [0, count), on up to `num_threads` threads in contiguous ranges.
template <typename Body>
void parallel_for(int64_t count, int64_t total_values, int num_threads, const Body& body) {
  const int64_t by_work = std::max<int64_t>(1, total_values / kValuesPerThread);
  const int threads = static_cast<int>(
      std::min<int64_t>({static_cast<int64_t>(std::max(num_threads, 1)), by_work, count,
                         static_cast<int64_t>(kMaxThreads)}));
  if (threads <= 1) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int w = 0; w < threads; ++w) {
    const int64_t begin = count * w / threads, end = count * (w + 1) / threads;
    pool.emplace_back([begin, end, &body] {
      for (int64_t i = begin; i < end; ++i) body(i);
    });
  }
  for (auto& thread : pool) thread.join();
}

// ------------------------------------------------------------------------- forward
struct Partial {
  double residual_sq = 0.0;  // sum (x' - mean)^2
  double kl_sq = 0.0;        // sum (mean - mean_ref)^2
};

// sum of values[i]^2 in fp64 over kLanes interleaved accumulators, combined pairwise in a fixed
// order: the bits depend only on the values and n.
inline double sum_of_squares(const float* values, int64_t n) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const double v = values[i + j];
      lanes[j] += v * v;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const double v = values[i];
    lanes[j] += v * v;
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

SFGRPO_CPU_CLONES Partial forward_item(const SdeStepProblem& p, const SdeForwardInputs& in,
                     const SdeForwardOutputs& out, const RowCoefficients& c, const WorkItem& item) {
  float x[kBlock], v[kBlock], mean[kBlock], sample[kBlock], other[kBlock];
  Partial partial;
  const bool sampling = !in.prev_sample.present();
  const float one_minus_t = 1.0f - c.t, minus_t = -c.t;
  for (int64_t begin = item.begin; begin < item.end; begin += kBlock) {
    const int64_t n = std::min(kBlock, item.end - begin);
    const int64_t offset = item.row * p.elements + begin;
    load(in.x, offset, n, x);
    load(in.v, offset, n, v);
    for (int64_t i = 0; i < n; ++i) mean[i] = x[i] * c.c_x + v[i] * c.c_v;
    if (sampling) {
      if (in.philox) {
        philox_block(in, p.elements, item.row, begin, n, other);
      } else {
        load(in.noise, offset, n, other);
      }
      for (int64_t i = 0; i < n; ++i) sample[i] = mean[i] + other[i] * c.std;
      if (out.sample.present()) {
        // the log-prob is that of the sample as stored, so scoring it later gives the same bits
        store(out.sample, offset, n, sample);
        load(as_input(out.sample), offset, n, sample);
      }
    } else {
      load(in.prev_sample, offset, n, sample);
    }
    for (int64_t i = 0; i < n; ++i) other[i] = sample[i] - mean[i];
    partial.residual_sq += sum_of_squares(other, n);
    if (in.v_ref.present()) {
      load(in.v_ref, offset, n, other);
      for (int64_t i = 0; i < n; ++i) other[i] = mean[i] - (x[i] * c.c_x + other[i] * c.c_v);
      partial.kl_sq += sum_of_squares(other, n);
    }
    if (out.mean != nullptr) std::copy(mean, mean + n, out.mean + offset);
    if (out.x0_hat != nullptr) {
      float* dst = out.x0_hat + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = x[i] + v[i] * minus_t;
    }
    if (out.x1_hat != nullptr) {
      float* dst = out.x1_hat + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = x[i] + v[i] * one_minus_t;
    }
  }
  return partial;
}

float row_log_prob(const SdeStepProblem& p, float std, double residual_sq) {
  const double scale = reduction_scale(p);
  // Flow-GRPO's bare squares have no std in them: defined on every row (its last cps step, t' = 0)
  if (bare_squares(p)) return static_cast<float>(-residual_sq * scale);
  if (!(std > 0.0f)) return 0.0f;  // no density: 0, never NaN
  const double s = std, count = p.sum_reduction ? static_cast<double>(p.elements) : 1.0;
  return static_cast<float>(-residual_sq * scale / (2.0 * s * s) - count * (std::log(s) + kLogSqrt2Pi));
}

float row_kl(const SdeStepProblem& p, float std, double kl_sq) {
  if (!(std > 0.0f)) return 0.0f;
  const double s = std;
  return static_cast<float>(kl_sq * reduction_scale(p) / (2.0 * s * s));
}

// ------------------------------------------------------------------------- backward
SFGRPO_CPU_CLONES void backward_item(const SdeStepProblem& p, const SdeBackwardInputs& in,
                   const SdeBackwardOutputs& out, const RowCoefficients& c, float k_log_prob,
                   float k_kl, const WorkItem& item) {
  float x[kBlock], v[kBlock], on_mean[kBlock], dv[kBlock], dx[kBlock], other[kBlock];
  const bool use_kl = in.grad_kl != nullptr && in.v_ref.present();
  const float kl_factor = k_kl * c.c_v, one_minus_t = 1.0f - c.t, minus_t = -c.t;
  for (int64_t begin = item.begin; begin < item.end; begin += kBlock) {
    const int64_t n = std::min(kBlock, item.end - begin);
    const int64_t offset = item.row * p.elements + begin;
    load(in.x, offset, n, x);
    load(in.v, offset, n, v);
    std::fill(on_mean, on_mean + n, 0.0f);
    if (in.grad_log_prob != nullptr) {  // dlogp/dmean = k (x' - mean)
      load(in.sample, offset, n, other);
      const float minus_k = -k_log_prob;
      for (int64_t i = 0; i < n; ++i) on_mean[i] = ((x[i] * c.c_x + v[i] * c.c_v) - other[i]) * minus_k;
    }
    if (in.grad_mean != nullptr) {
      const float* g = in.grad_mean + offset;
      for (int64_t i = 0; i < n; ++i) on_mean[i] += g[i];
    }
    for (int64_t i = 0; i < n; ++i) dv[i] = on_mean[i] * c.c_v;
    if (out.dx.present()) {
      for (int64_t i = 0; i < n; ++i) dx[i] = on_mean[i] * c.c_x;
    }
    if (use_kl) {  // dKL/dmean = k_kl (mean - mean_ref); mean_ref depends on v_ref only through c_v
      load(in.v_ref, offset, n, other);
      for (int64_t i = 0; i < n; ++i) {
        other[i] = ((x[i] * c.c_x + v[i] * c.c_v) - (x[i] * c.c_x + other[i] * c.c_v)) * kl_factor;
        dv[i] += other[i];
      }
    }
    if (in.grad_x0 != nullptr) {  // x0_hat = x - t v
      const float* g = in.grad_x0 + offset;
      for (int64_t i = 0; i < n; ++i) dv[i] += g[i] * minus_t;
      if (out.dx.present()) {
        for (int64_t i = 0; i < n; ++i) dx[i] += g[i];
      }
    }
    if (in.grad_x1 != nullptr) {  // x1_hat = x + (1 - t) v
      const float* g = in.grad_x1 + offset;
      for (int64_t i = 0; i < n; ++i) dv[i] += g[i] * one_minus_t;
      if (out.dx.present()) {
        for (int64_t i = 0; i < n; ++i) dx[i] += g[i];
      }
    }
    store(out.dv, offset, n, dv);
    if (out.dx.present()) store(out.dx, offset, n, dx);
    if (out.dv_ref.present()) {
      if (use_kl) {
        for (int64_t i = 0; i < n; ++i) other[i] = -other[i];
      } else {
        std::fill(other, other + n, 0.0f);
      }
      store(out.dv_ref, offset, n, other);
    }
  }
}

// Per-row k with dL/dmean = k (x' - mean) from dL/dlogp (sfgrpo.reference.log_prob_grad_scale).
float log_prob_grad_scale(const SdeStepProblem& p, float grad, float std) {
  const float scale = static_cast<float>(reduction_scale(p));
  if (bare_squares(p)) return 2.0f * grad * scale;  // every row, std = 0 too (see row_log_prob)
  if (!(std > 0.0f)) return 0.0f;
  return grad * scale / (std * std);
}

// Per-row k with dL/dmean = k (mean - mean_ref) from dL/dKL (sfgrpo.reference.kl_grad_scale).
float kl_grad_scale(const SdeStepProblem& p, float grad, float std) {
  if (!(std > 0.0f)) return 0.0f;
  return grad * static_cast<float>(reduction_scale(p)) / (std * std);
}

}  // namespace

void sde_step_forward_cpu(const SdeStepProblem& p, const SdeForwardInputs& in,
                          const SdeForwardOutputs& out, int num_threads) {
  std::vector<RowCoefficients> rows(static_cast<size_t>(p.rows));
  for (int64_t r = 0; r < p.rows; ++r) rows[r] = coefficients(p, r);
  const std::vector<WorkItem> items = work_items(p);
  std::vector<Partial> partials(items.size());
  parallel_for(static_cast<int64_t>(items.size()), p.rows * p.elements, num_threads, [&](int64_t i) {
    partials[i] = forward_item(p, in, out, rows[items[i].row], items[i]);
  });
  // items are in (row, chunk) order: add each row's chunks in order
  size_t i = 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    Partial total;
    for (; i < items.size() && items[i].row == r; ++i) {
      total.residual_sq += partials[i].residual_sq;
      total.kl_sq += partials[i].kl_sq;
    }
    const RowCoefficients& c = rows[r];
    if (out.log_prob != nullptr) out.log_prob[r] = row_log_prob(p, c.std, total.residual_sq);
    if (out.kl != nullptr) out.kl[r] = row_kl(p, kl_std(p, c), total.kl_sq);
    if (out.std != nullptr) out.std[r] = c.std;
    if (out.std_dev_t != nullptr) out.std_dev_t[r] = c.std_dev_t;
  }
}

void sde_step_backward_cpu(const SdeStepProblem& p, const SdeBackwardInputs& in,
                           const SdeBackwardOutputs& out, int num_threads) {
  std::vector<RowCoefficients> rows(static_cast<size_t>(p.rows));
  std::vector<float> k_log_prob(static_cast<size_t>(p.rows), 0.0f), k_kl(static_cast<size_t>(p.rows), 0.0f);
  for (int64_t r = 0; r < p.rows; ++r) {
    rows[r] = coefficients(p, r);
    if (in.grad_log_prob != nullptr) k_log_prob[r] = log_prob_grad_scale(p, in.grad_log_prob[r], rows[r].std);
    if (in.grad_kl != nullptr) k_kl[r] = kl_grad_scale(p, in.grad_kl[r], kl_std(p, rows[r]));
  }
  const std::vector<WorkItem> items = work_items(p);
  parallel_for(static_cast<int64_t>(items.size()), p.rows * p.elements, num_threads, [&](int64_t i) {
    const int64_t r = items[i].row;
    backward_item(p, in, out, rows[r], k_log_prob[r], k_kl[r], items[i]);
  });
}

void convert_storage_cpu(Storage src_type, const void* src, Storage dst_type, void* dst,
                         int64_t count) {
  float block[kBlock];
  const Latent from{src, src_type};
  const MutableLatent to{dst, dst_type};
  for (int64_t begin = 0; begin < count; begin += kBlock) {
    const int64_t n = std::min(kBlock, count - begin);
    load(from, begin, n, block);
    store(to, begin, n, block);
  }
}

}  // namespace sfgrpo
