// Fused SDE step on the CPU: one pass over [B, D] latents computes the step's mean, the sample (or
// scores a stored one), the per-row Gaussian log-prob and KL, and the Tweedie estimates; one pass
// computes the backward. The same formulas as sfgrpo/reference.py and the Triton kernels
// (kernels/sde_step.py); the Python side (sfgrpo/_native.py) validates every tensor before calling
// in. No torch, no Python: raw pointers and sizes.
#pragma once
#include <cstdint>

namespace sfgrpo {

// Storage types of latents. Math is fp32 whatever the storage; per-row sums are fp64.
enum class Storage : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

enum class SdeType : int { kSde = 0, kCps = 1, kDdim = 2, kOde = 3 };

// A contiguous row-major [rows, elements] latent, or none (data == nullptr).
struct Latent {
  const void* data = nullptr;
  Storage type = Storage::kFloat32;
  bool present() const { return data != nullptr; }
};

struct MutableLatent {
  void* data = nullptr;
  Storage type = Storage::kFloat32;
  bool present() const { return data != nullptr; }
};

// A schedule value of each row: `per_row[row]`, or `value` for every row when per_row is null
// (a Python number: nothing to allocate for it).
struct RowValue {
  const float* per_row = nullptr;
  float value = 0.0f;
  float at(int64_t row) const { return per_row ? per_row[row] : value; }
};

struct SdeStepProblem {
  int64_t rows = 0;
  int64_t elements = 0;  // per row
  SdeType sde_type = SdeType::kSde;
  bool flow_grpo_logprob = false;  // Flow-GRPO's log-prob convention (bare squares for cps/ddim)
  bool sum_reduction = false;      // per-row sum instead of mean over the row's elements
  bool flow_grpo_kl = false;       // KL divides by std_dev_t instead of the step's std
  // Schedule values: per-row float32 [rows] arrays, or one value for every row.
  RowValue t, t_next, noise_level, sigma_max;
};

struct SdeForwardInputs {
  Latent x, v;
  Latent prev_sample;  // scoring: the stored sample; else sampling from `noise` or Philox
  Latent noise;        // eps (any storage type), when sampling
  Latent v_ref;        // reference velocity for the KL, optional
  // Sampling without `noise`: Philox-4x32-10 normals, 4 per counter, row r's element e from counter
  // philox_offset + r * ceil(elements / 4) + e / 4 (the Triton kernels' tl.randn4x layout).
  bool philox = false;
  uint64_t philox_seed = 0;
  uint64_t philox_offset = 0;
};

// Outputs; null pointers are not written. `sample` has x's storage type.
struct SdeForwardOutputs {
  MutableLatent sample;
  float* log_prob = nullptr;   // [rows]
  float* std = nullptr;        // [rows]
  float* std_dev_t = nullptr;  // [rows]
  float* mean = nullptr;       // [rows, elements]
  float* x0_hat = nullptr;     // [rows, elements]
  float* x1_hat = nullptr;     // [rows, elements]
  float* kl = nullptr;         // [rows], needs v_ref
};

struct SdeBackwardInputs {
  Latent x, v, sample, v_ref;
  // Upstream gradients (float32), null when that output got none.
  const float* grad_log_prob = nullptr;  // [rows]
  const float* grad_kl = nullptr;        // [rows]
  const float* grad_mean = nullptr;      // [rows, elements]
  const float* grad_x0 = nullptr;        // [rows, elements]
  const float* grad_x1 = nullptr;        // [rows, elements]
};

// dv is always written; dv_ref and dx when present.
struct SdeBackwardOutputs {
  MutableLatent dv, dv_ref, dx;
};

// Rows (and, for very long rows, fixed 64k-element chunks of a row) are spread over up to
// `num_threads` threads; every partial sum covers a fixed chunk and chunks are added in order, so
// the bits do not depend on the thread count.
void sde_step_forward_cpu(const SdeStepProblem& problem, const SdeForwardInputs& in,
                          const SdeForwardOutputs& out, int num_threads);
void sde_step_backward_cpu(const SdeStepProblem& problem, const SdeBackwardInputs& in,
                           const SdeBackwardOutputs& out, int num_threads);

// Storage conversion with torch's rounding (round to nearest even; NaN stays NaN), exposed for
// tests: `count` values from `src` to `dst`.
void convert_storage_cpu(Storage src_type, const void* src, Storage dst_type, void* dst,
                         int64_t count);

}  // namespace sfgrpo
