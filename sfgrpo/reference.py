"""Plain-PyTorch reference of every formula in the SPEC: the CPU path and the test oracle.

Conventions (SPEC §1): `x_t = (1 - t) x0 + t x1`, t = 1 is noise, t = 0 is data, the network
predicts `v ~ x1 - x0`. Latents have any rank; dim 0 is the batch. Per-row quantities (t, t',
noise level) are a Python float, a 0-d tensor or a `[B]` tensor. All math runs in float32
whatever the storage dtype (bf16 storage overflows and loses the mean otherwise).

Each function here implements exactly one formula; the fused kernels must match them.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

SDE_TYPES = ("sde", "cps", "ddim", "ode")
LOGPROB_CONVENTIONS = ("gaussian", "flow_grpo")
REDUCTIONS = ("mean", "sum")
KL_CONVENTIONS = ("exact", "flow_grpo")
NONFINITE_POLICIES = ("error", "drop")

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------- per-row helpers
def row_values(value: float | Tensor, batch: int, device: torch.device | str) -> Tensor:
    """A per-row quantity as a float32 `[batch]` tensor (scalars are broadcast)."""
    if isinstance(value, Tensor):
        value = value.to(device=device, dtype=torch.float32)
        if value.ndim == 0:
            return value.expand(batch)
        if value.shape != (batch,):
            raise ValueError(f"per-row value must be a scalar or have shape [{batch}], got {tuple(value.shape)}")
        return value
    return torch.full((batch,), float(value), dtype=torch.float32, device=device)


def per_row(value: float | Tensor, like: Tensor) -> Tensor:
    """A per-row quantity shaped `[B, 1, ..., 1]` to broadcast against `like`."""
    rows = row_values(value, like.shape[0], like.device)
    return rows.reshape((like.shape[0],) + (1,) * (like.ndim - 1))


def _reduce_rows(values: Tensor, reduction: str) -> Tensor:
    dims = tuple(range(1, values.ndim))
    if reduction == "mean":
        return values.mean(dim=dims) if dims else values
    if reduction == "sum":
        return values.sum(dim=dims) if dims else values
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _elements_per_row(x: Tensor) -> int:
    return math.prod(x.shape[1:])


# --------------------------------------------------------------------------- Tweedie (SPEC §2)
def tweedie_x0(x: Tensor, v: Tensor, t: float | Tensor) -> Tensor:
    """Clean estimate `x0_hat = x_t - t v` (float32)."""
    return x.float() - per_row(t, x) * v.float()


def tweedie_x1(x: Tensor, v: Tensor, t: float | Tensor) -> Tensor:
    """Noise estimate `x1_hat = x_t + (1 - t) v` (float32)."""
    return x.float() + (1.0 - per_row(t, x)) * v.float()


# ------------------------------------------------------------------------ SDE step (SPEC §3)
class StepCoefficients(NamedTuple):
    """Per-row scalars of one step: `mean = c_x * x + c_v * v`, `x' = mean + std * eps`.

    `std_dev_t` is what Flow-GRPO calls std_dev_t: `sigma_t` for `sde` (without sqrt(-dt)),
    the per-step std otherwise. Its KL convention divides by it.
    """

    c_x: Tensor
    c_v: Tensor
    std: Tensor
    std_dev_t: Tensor


def sde_coefficients(
    sde_type: str,
    t: Tensor,
    t_next: Tensor,
    noise_level: Tensor,
    sigma_max: Tensor | None = None,
) -> StepCoefficients:
    """Coefficients of every SDE type as functions of per-row `[B]` float32 t, t', a.

    `sigma_max` is the `t~` that replaces t = 1 in `sde`'s `sqrt(t / (1 - t~))` (Flow-GRPO uses
    the grid's second entry); by default the row's own t', which is that entry when stepping from
    t = 1 along a grid.
    """
    dt = t_next - t
    if sde_type == "sde":
        t_tilde = torch.where(t >= 1.0, t_next if sigma_max is None else sigma_max, t)
        sigma_t = noise_level * torch.sqrt(t / (1.0 - t_tilde))
        correction = sigma_t**2 / (2.0 * t)
        # mean = x + dt * (v + sigma_t^2 / (2 t) * x1_hat), x1_hat = x + (1 - t) v
        c_x = 1.0 + dt * correction
        c_v = dt * (1.0 + correction * (1.0 - t))
        std = sigma_t * torch.sqrt(-dt)
        return StepCoefficients(c_x, c_v, std, sigma_t)
    if sde_type in ("cps", "ddim"):
        if sde_type == "cps":
            std = t_next * torch.sin(noise_level * (math.pi / 2.0))
        else:  # the paper's DDIM-inspired noise form (unverified, SPEC §3)
            std = noise_level * t_next * torch.sqrt(1.0 - t)
        # mean = (1 - t') x0_hat + sqrt(t'^2 - s^2) x1_hat with x0_hat = x - t v, x1_hat = x + (1 - t) v
        keep = torch.sqrt(torch.clamp(t_next**2 - std**2, min=0.0))
        c_x = (1.0 - t_next) + keep
        c_v = keep * (1.0 - t) - t * (1.0 - t_next)
        return StepCoefficients(c_x, c_v, std, std)
    if sde_type == "ode":
        zero = torch.zeros_like(t)
        return StepCoefficients(torch.ones_like(t), dt, zero, zero)
    raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")


def _check_conventions(sde_type: str, convention: str, reduction: str) -> None:
    if convention not in LOGPROB_CONVENTIONS:
        raise ValueError(f"log-prob convention must be one of {LOGPROB_CONVENTIONS}, got {convention!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _uses_bare_squares(sde_type: str, convention: str) -> bool:
    """Flow-GRPO's log-prob for the CPS-form means is `-(x' - mean)^2`: no constants, no 1/(2 s^2)."""
    return convention == "flow_grpo" and sde_type in ("cps", "ddim")


def log_prob_from_squares(
    sum_sq: Tensor, std: Tensor, elements: int, *, sde_type: str = "sde", convention: str = "gaussian",
    reduction: str = "mean",
) -> Tensor:
    """Per-row log-prob from the row's `sum((x' - mean)^2)` over its `elements` values (the form every
    implementation reduces to). Rows with std = 0 have no density and get 0 (never NaN), except under
    Flow-GRPO's bare-squares convention, which has no std in it: `-(x' - mean)^2` is finite for every
    row and is what Flow-GRPO computes (e.g. on the last `cps` step, t' = 0)."""
    _check_conventions(sde_type, convention, reduction)
    scale = 1.0 / elements if reduction == "mean" else 1.0
    if _uses_bare_squares(sde_type, convention):
        return -sum_sq * scale
    has_density = std > 0
    safe_std = torch.where(has_density, std, torch.ones_like(std))
    count = 1.0 if reduction == "mean" else float(elements)
    log_prob = -sum_sq * scale / (2.0 * safe_std**2) - count * (torch.log(safe_std) + LOG_SQRT_2PI)
    return torch.where(has_density, log_prob, 0.0)


def gaussian_log_prob(
    sample: Tensor,
    mean: Tensor,
    std: Tensor,
    *,
    sde_type: str = "sde",
    convention: str = "gaussian",
    reduction: str = "mean",
) -> Tensor:
    """Per-row log-prob of `sample` under N(mean, std^2 I) (`std` is `[B]`).

    `gaussian`: exact density, `-(x'-mean)^2/(2 s^2) - log s - log sqrt(2 pi)` reduced per row.
    `flow_grpo`: what Flow-GRPO's code computes: the exact density for `sde`, `-(x'-mean)^2` for the
    CPS-form means (`cps`, `ddim`), for every row. Rows with std = 0 have no density and get 0
    (never NaN) under `gaussian`, and under `flow_grpo` for `sde`.
    """
    sum_sq = _reduce_rows((sample.float() - mean.float()) ** 2, "sum")
    return log_prob_from_squares(
        sum_sq, std, _elements_per_row(sample), sde_type=sde_type, convention=convention, reduction=reduction
    )


def kl_std(coefficients: StepCoefficients, convention: str = "exact") -> Tensor:
    """The std the KL divides by: the step's std (`exact`), or Flow-GRPO's std_dev_t (`flow_grpo`;
    for `sde` that is sigma_t, missing the sqrt(-dt) factor, as Flow-GRPO's code does)."""
    if convention not in KL_CONVENTIONS:
        raise ValueError(f"KL convention must be one of {KL_CONVENTIONS}, got {convention!r}")
    return coefficients.std if convention == "exact" else coefficients.std_dev_t


def kl_from_squares(sum_sq: Tensor, std: Tensor, elements: int, reduction: str = "mean") -> Tensor:
    """Per-row KL `reduce((mean - mean_ref)^2) / (2 s^2)` from the row's sum of squares; 0 without noise."""
    scale = 1.0 / elements if reduction == "mean" else 1.0
    safe = torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std > 0, sum_sq * scale / (2.0 * safe**2), 0.0)


def gaussian_kl(
    mean: Tensor,
    mean_ref: Tensor,
    coefficients: StepCoefficients,
    *,
    convention: str = "exact",
    reduction: str = "mean",
) -> Tensor:
    """Per-row KL between N(mean, s^2) and N(mean_ref, s^2): `reduce((mean - mean_ref)^2) / (2 s^2)`
    (`s` chosen by `kl_std`). Rows with no noise get 0."""
    sum_sq = _reduce_rows((mean.float() - mean_ref.float()) ** 2, "sum")
    return kl_from_squares(sum_sq, kl_std(coefficients, convention), _elements_per_row(mean), reduction)


def log_prob_grad_scale(
    grad_log_prob: Tensor, std: Tensor, elements: int, *, sde_type: str = "sde", convention: str = "gaussian",
    reduction: str = "mean",
) -> Tensor:
    """Per-row `k` with `dL/dmean = k (x' - mean)` from `dL/dlogp`: `g / (s^2 D_r)`, or `2 g / D_r` for
    Flow-GRPO's bare-squares log-prob (`D_r` = elements for the mean reduction, 1 for the sum)."""
    scale = 1.0 / elements if reduction == "mean" else 1.0
    if _uses_bare_squares(sde_type, convention):  # no std in it: a gradient on every row
        return 2.0 * grad_log_prob.float() * scale
    safe = torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std > 0, grad_log_prob.float() * scale / safe**2, 0.0)


def kl_grad_scale(grad_kl: Tensor, std: Tensor, elements: int, reduction: str = "mean") -> Tensor:
    """Per-row `k` with `dL/dmean = k (mean - mean_ref)` from `dL/dKL`: `g / (s_kl^2 D_r)`."""
    scale = 1.0 / elements if reduction == "mean" else 1.0
    safe = torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std > 0, grad_kl.float() * scale / safe**2, 0.0)


class SdeStepOutput(NamedTuple):
    prev_sample: Tensor  # x', in the storage dtype of x
    log_prob: Tensor  # [B] float32
    mean: Tensor  # float32, shape of x
    std: Tensor  # [B] float32 per-step std
    std_dev_t: Tensor  # [B] float32 (Flow-GRPO's std_dev_t)
    x0_hat: Tensor  # float32 Tweedie clean estimate
    x1_hat: Tensor  # float32 Tweedie noise estimate
    kl: Tensor | None  # [B] float32 when v_ref was given


def draw_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise drawn like diffusers' `randn_tensor(..., dtype=float32)`.

    A CPU generator with CUDA latents draws on the CPU and moves, as diffusers does, so the same
    generator gives the same sample on every device.
    """
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(like.device)


def sde_step(
    x: Tensor,
    v: Tensor,
    t: float | Tensor,
    t_next: float | Tensor,
    noise_level: float | Tensor = 0.7,
    *,
    sde_type: str = "sde",
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    logprob: str = "gaussian",
    reduction: str = "mean",
    v_ref: Tensor | None = None,
    kl: str = "exact",
    sigma_max: float | Tensor | None = None,
) -> SdeStepOutput:
    """One step `t -> t'` of the chosen SDE: sample x' (or score the given `prev_sample`).

    Sampling rounds x' to the storage dtype of `x` *before* computing the log-prob, so scoring the
    stored sample later gives bit-identical log-probs (on-policy ratio exactly 1). The sample is
    data, not a function of v (as in Flow-GRPO, `prev_sample.detach()`): gradients reach `v`
    (and `x`, `v_ref`) through the mean and the Tweedie estimates only.
    """
    if x.shape != v.shape:
        raise ValueError(f"x and v must have the same shape, got {tuple(x.shape)} and {tuple(v.shape)}")
    if x.ndim < 1:
        raise ValueError("latents need a batch dimension")
    batch, device = x.shape[0], x.device
    t_row = row_values(t, batch, device)
    t_next_row = row_values(t_next, batch, device)
    level_row = row_values(noise_level, batch, device)
    sigma_max_row = None if sigma_max is None else row_values(sigma_max, batch, device)
    coeffs = sde_coefficients(sde_type, t_row, t_next_row, level_row, sigma_max_row)

    shape = (batch,) + (1,) * (x.ndim - 1)
    xf, vf = x.float(), v.float()
    mean = coeffs.c_x.reshape(shape) * xf + coeffs.c_v.reshape(shape) * vf
    if prev_sample is None:
        if noise is None:
            noise = draw_noise(x, generator)
        elif noise.shape != x.shape:
            raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
        prev_sample = (mean + coeffs.std.reshape(shape) * noise.float()).to(x.dtype).detach()
    elif prev_sample.shape != x.shape:
        raise ValueError(f"prev_sample must have the shape of x {tuple(x.shape)}, got {tuple(prev_sample.shape)}")
    else:
        prev_sample = prev_sample.detach()

    log_prob = gaussian_log_prob(
        prev_sample, mean, coeffs.std, sde_type=sde_type, convention=logprob, reduction=reduction
    )
    kl_value = None
    if v_ref is not None:
        if v_ref.shape != x.shape:
            raise ValueError(f"v_ref must have the shape of x {tuple(x.shape)}, got {tuple(v_ref.shape)}")
        mean_ref = coeffs.c_x.reshape(shape) * xf + coeffs.c_v.reshape(shape) * v_ref.float()
        kl_value = gaussian_kl(mean, mean_ref, coeffs, convention=kl, reduction=reduction)
    return SdeStepOutput(
        prev_sample=prev_sample,
        log_prob=log_prob,
        mean=mean,
        std=coeffs.std,
        std_dev_t=coeffs.std_dev_t,
        x0_hat=tweedie_x0(x, v, t_row),
        x1_hat=tweedie_x1(x, v, t_row),
        kl=kl_value,
    )


def sde_step_vjp(
    x: Tensor,
    v: Tensor,
    prev_sample: Tensor,
    t: Tensor,
    coefficients: StepCoefficients,
    *,
    grad_log_prob: Tensor | None = None,
    grad_kl: Tensor | None = None,
    grad_mean: Tensor | None = None,
    grad_x0: Tensor | None = None,
    grad_x1: Tensor | None = None,
    v_ref: Tensor | None = None,
    sde_type: str = "sde",
    logprob: str = "gaussian",
    reduction: str = "mean",
    kl: str = "exact",
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Backward of `sde_step` in closed form (SPEC §3): returns float32 (dv, dv_ref, dx).

    With `D_r` = elements per row (mean reduction) or 1 (sum), per row
    `k_lp = g_logp / (s^2 D_r)` (`2 g_logp / D_r` for Flow-GRPO's cps/ddim log-prob) and
    `k_kl = g_kl / (s_kl^2 D_r)`; then
    `dv = c_v (k_lp (x' - mean) + g_mean + k_kl (mean - mean_ref)) - t g_x0 + (1 - t) g_x1`,
    `dv_ref = -c_v k_kl (mean - mean_ref)`, `dx = c_x (k_lp (x' - mean) + g_mean) + g_x0 + g_x1`
    (the KL's x-terms cancel). Rows without noise contribute no log-prob / KL gradient.
    """
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    c_x, c_v = coefficients.c_x.reshape(shape), coefficients.c_v.reshape(shape)
    xf, vf = x.float(), v.float()
    mean = c_x * xf + c_v * vf
    on_mean = torch.zeros_like(mean)
    elements = _elements_per_row(x)
    if grad_log_prob is not None:
        k_lp = log_prob_grad_scale(grad_log_prob, coefficients.std, elements, sde_type=sde_type, convention=logprob,
                                   reduction=reduction)
        on_mean = on_mean + k_lp.reshape(shape) * (prev_sample.float() - mean)
    if grad_mean is not None:
        on_mean = on_mean + grad_mean.float()
    dv = c_v * on_mean
    dx = c_x * on_mean
    dv_ref = None
    if grad_kl is not None and v_ref is not None:
        k_kl = kl_grad_scale(grad_kl, kl_std(coefficients, kl), elements, reduction).reshape(shape)
        on_kl = k_kl * (mean - (c_x * xf + c_v * v_ref.float()))
        dv = dv + c_v * on_kl
        dv_ref = -c_v * on_kl
    t_col = per_row(t, x)
    if grad_x0 is not None:
        dv = dv - t_col * grad_x0.float()
        dx = dx + grad_x0.float()
    if grad_x1 is not None:
        dv = dv + (1.0 - t_col) * grad_x1.float()
        dx = dx + grad_x1.float()
    return dv, dv_ref, dx


# --------------------------------------------------------------------------- Philox noise
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57


def philox_uniform4(seed: int, counters: Tensor) -> Tensor:
    """`[*counters.shape, 4]` float32 uniforms in [0, 1) from Philox-4x32-10 (10 rounds, Triton's
    constants and word order: counter = the 64-bit value as (low word, high word, 0, 0), key = the
    64-bit seed's two words): output word w -> `fold(w) * 4.6566127342e-10` in float32, fold
    taking the word as int32 and x < 0 to ~x (Triton's `uint_to_uniform_float`)."""
    import numpy as np

    flat = counters.detach().cpu().reshape(-1).numpy().astype(np.int64).view(np.uint64)
    mask32 = np.uint64(0xFFFFFFFF)
    c0, c1 = flat & mask32, flat >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    seed64 = np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    k0, k1 = seed64 & mask32, (seed64 >> np.uint64(32)) & mask32
    round_a, round_b = np.uint64(_PHILOX_ROUND_A), np.uint64(_PHILOX_ROUND_B)
    for _ in range(10):
        prod_b, prod_a = round_b * c2, round_a * c0  # exact: both factors < 2^32
        c0, c1, c2, c3 = (
            ((prod_b >> np.uint64(32)) ^ c1 ^ k0) & mask32,
            prod_b & mask32,
            ((prod_a >> np.uint64(32)) ^ c3 ^ k1) & mask32,
            prod_a & mask32,
        )
        k0 = (k0 + np.uint64(_PHILOX_KEY_A)) & mask32
        k1 = (k1 + np.uint64(_PHILOX_KEY_B)) & mask32

    def to_uniform(word):
        signed = word.astype(np.uint32).view(np.int32)
        signed = np.where(signed < 0, ~signed, signed)
        return signed.astype(np.float32) * np.float32(4.6566127342e-10)

    uniforms = np.stack([to_uniform(c) for c in (c0, c1, c2, c3)], axis=-1)
    return torch.from_numpy(uniforms).reshape(*counters.shape, 4).to(counters.device)


def philox_normal4(seed: int, counters: Tensor) -> Tensor:
    """`[*counters.shape, 4]` standard normals: the four uniforms of `philox_uniform4` -> two
    Box-Muller pairs (u1, u2), (u3, u4), in float32:

        radius = -sqrt(max(-2 ln(2) * log2(max(u1, 1e-7)), 0))  (= -sqrt(-2 ln u1))
        angle  = 2 pi u2 - pi                                    (in [-pi, pi))
        normals = radius * cos(angle), radius * sin(angle)      (= sqrt(-2 ln u1) (cos, sin)(2 pi u2))

    The formula of the Triton kernels' in-kernel Philox noise (and of the C++ kernels of
    `sfgrpo._C`). The angle lies in [-pi, pi) because that is where the GPU's approximate sin/cos
    keep their error bound, and the negated radius turns the shifted angle back into the textbook
    Box-Muller (the values of Triton's `tl.randn4x` up to float32 rounding). The clamp at 0 changes
    nothing here (log2 u1 < 0 for u1 < 1), but on the GPU lg2.approx may return a value just above 0
    for u1 within 2^-22 of 1, which would otherwise give a NaN.

    Triton's interpreter reproduces these bits. On the GPU the kernels use the hardware
    approximations (lg2.approx: 2^-22 absolute error on [0.5, 2], 2^-22 relative elsewhere;
    sin/cos.approx: 2^-21.41 absolute on [-pi, pi] by the CUDA guide, 2^-20.5 by the PTX ISA;
    sqrt.approx: 2^-23 relative), which bound their difference from these values by 7.5e-6
    wherever u1 <= 0.999 (99.9 % of the draws; median bound 1.3e-6) and by ~3.3e-7 / radius beyond,
    at most sqrt(2 ln(2) 2^-22) = 5.7e-4 as u1 -> 1 (the radius is then tiny, and lg2's absolute
    error near 1 dominates it). Statistically immaterial, and the sampling log-prob is always that of the
    stored sample. Not bit-equal to `torch.randn` (use a torch generator for diffusers
    compatibility).
    """
    import numpy as np

    uniforms = philox_uniform4(seed, counters).cpu().numpy().reshape(-1, 4)

    def box_muller(u1, u2):
        log2_u1 = np.log2(np.maximum(np.float32(1.0e-7), u1))
        radius = -np.sqrt(np.maximum(np.float32(-1.3862943611198906) * log2_u1, np.float32(0.0)))
        angle = np.float32(6.283185307179586) * u2 - np.float32(3.141592653589793)
        return radius * np.cos(angle), radius * np.sin(angle)

    n1, n2 = box_muller(uniforms[:, 0], uniforms[:, 1])
    n3, n4 = box_muller(uniforms[:, 2], uniforms[:, 3])
    normals = np.stack([n1, n2, n3, n4], axis=-1).astype(np.float32)
    return torch.from_numpy(normals).reshape(*counters.shape, 4).to(counters.device)


def philox_step_noise(seed: int, seed_offset: int, rows: int, elements: int, device=None) -> Tensor:
    """`[rows, elements]` in-kernel-Philox noise of one SDE step, as the kernels lay it out: row r
    uses counters `seed_offset + r * ceil(elements / 4) + q`, each giving the 4 normals of
    elements 4q .. 4q + 3. One call uses `rows * ceil(elements / 4)` counters."""
    quads = -(-elements // 4)
    counters = seed_offset + torch.arange(rows, dtype=torch.int64)[:, None] * quads + torch.arange(quads)[None, :]
    noise = philox_normal4(seed, counters).reshape(rows, quads * 4)[:, :elements].contiguous()
    device = None if device is None else torch.device(device)
    if device is None or device.type == "cpu":
        return noise
    if device.type == "cuda":
        # from pinned memory without blocking: a pageable host->device copy synchronises the host
        # (the reference backend's sampling step must not); torch's pinned allocator keeps the
        # buffer alive until the copy has run
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)


# --------------------------------------------------------------- ODE look-ahead (SPEC §4.2)
VelocityFn = Callable[[Tensor, Tensor], Tensor]


def ode_lookahead(
    x: Tensor,
    t: float | Tensor,
    velocity_fn: VelocityFn,
    num_steps: int = 1,
    *,
    v: Tensor | None = None,
) -> Tensor:
    """Clean-image estimate from state `x` at time t: `num_steps` Euler steps of the ODE to t = 0.

    The sub-steps are uniform in t per row. `velocity_fn(x, t_row)` gets the float32 state and a
    `[B]` time. If `v` (the rollout's velocity at (x, t)) is given the first sub-step reuses it,
    so `num_steps = 1` costs no network call and equals the Tweedie estimate `x - t v`.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t_row = row_values(t, x.shape[0], x.device)
    state = x.float()
    for k in range(num_steps):
        t_k = t_row * (1.0 - k / num_steps)
        t_k1 = t_row * (1.0 - (k + 1) / num_steps)
        velocity = v if (k == 0 and v is not None) else velocity_fn(state, t_k)
        state = state + per_row(t_k1 - t_k, state) * velocity.float()
    return state


# ----------------------------------------------------------------------- advantages (SPEC §4)
def gains(rewards: Tensor) -> Tensor:
    """`[N, T+1]` rewards of the clean estimates after k steps -> `[N, T]` per-step gains.

    `gains[:, k] = rewards[:, k+1] - rewards[:, k]` credits sampling step k; they telescope to
    `rewards[:, T] - rewards[:, 0]`.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [N, T+1] with T >= 1, got {tuple(rewards.shape)}")
    return rewards[:, 1:] - rewards[:, :-1]


class GroupStats(NamedTuple):
    """Per-group statistics for logging. Rows follow `group_ids`, the sorted distinct ids."""

    group_ids: Tensor  # [G] int64
    mean: Tensor  # [G] or [G, K] (float64)
    std: Tensor  # same shape as mean (float64), the std actually divided by
    size: Tensor  # [G] int64, finite samples counted in the statistics
    zero_std: Tensor  # same shape as mean, bool: every value equal -> advantages 0


def _check_group_inputs(rewards: Tensor, group_ids: Tensor) -> None:
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating-point tensor, got {rewards.dtype}")
    if group_ids.dtype != torch.int64:
        raise TypeError(f"group_ids must be int64, got {group_ids.dtype}")
    if group_ids.ndim != 1 or group_ids.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"group_ids must be [N] with N = rewards.shape[0] = {rewards.shape[0]}, got {tuple(group_ids.shape)}"
        )
    if group_ids.device != rewards.device:
        raise ValueError(f"group_ids is on {group_ids.device} but rewards on {rewards.device}")
    if rewards.is_meta:  # the groups, and so every output's size, come from the values
        raise ValueError("advantages depend on the rewards' and group ids' values: meta tensors (no data) cannot give them")


def _finite_rows(values: Tensor, nonfinite: str, gains: bool = False) -> Tensor:
    """Bool `[N]`: rows that take part in the statistics, those whose normalised `values` (the
    rewards, or their gains) are all finite. Raises on the others under 'error'. A NaN/inf reward
    makes a gain NaN/inf; so do finite rewards whose difference overflows the dtype (+-3e38 in
    float32), which would otherwise make the whole group's statistics NaN."""
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    finite = torch.isfinite(values).flatten(1).all(dim=1) if values.ndim > 1 else torch.isfinite(values)
    if nonfinite == "error" and not bool(finite.all()):
        raise_nonfinite(finite, gains)
    return finite


def raise_nonfinite(finite: Tensor, gains: bool) -> None:
    """The error for rows left out of the statistics (`finite` `[N]` bool, False there)."""
    bad = (~finite).nonzero().flatten()
    overflow = " (a gain that overflows the dtype counts as inf)" if gains else ""
    raise ValueError(
        f"rewards contain NaN or inf in {bad.numel()} sample(s) (first rows: {bad[:8].tolist()}){overflow}; "
        "pass nonfinite='drop' to leave them out of the statistics with advantage 0"
    )


def _segment_stats(values: Tensor, weight: Tensor, index: Tensor, num_groups: int, ddof: int):
    """Mean, std, count, all-equal flag per segment over dim 0 (float64).

    `weight` (0/1) is per row `[N]` or per entry (shape of `values`); weight-0 entries are left out.
    """
    tail = values.shape[1:]
    w = weight if weight.shape == values.shape else weight.reshape((-1,) + (1,) * len(tail)).expand_as(values)
    count = torch.zeros((num_groups,) + tail, dtype=torch.float64, device=values.device)
    count.index_add_(0, index, w)
    total = torch.zeros_like(count).index_add_(0, index, values * w)
    mean = total / count.clamp(min=1.0)
    centered = (values - mean[index]) * w
    var = torch.zeros_like(count).index_add_(0, index, centered**2) / (count - ddof).clamp(min=1.0)
    # all-equal test by max == min: exact, where a computed std of identical values may not be 0
    big = torch.finfo(torch.float64).max
    scatter_index = index.reshape((-1,) + (1,) * len(tail)).expand_as(values)
    hi = torch.full_like(count, -big).scatter_reduce_(0, scatter_index, torch.where(w > 0, values, -big), "amax")
    lo = torch.full_like(count, big).scatter_reduce_(0, scatter_index, torch.where(w > 0, values, big), "amin")
    return mean, var.sqrt(), count, hi <= lo


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std: str = "group",
    eps: float = 1e-4,
    unbiased: bool = False,
    clip: float | None = None,
    nonfinite: str = "error",
    return_stats: bool = False,
):
    """Flow-GRPO per-prompt advantages `(r - mean_group) / (std + eps)`.

    `rewards` is `[N]` or `[N, K]` (each column normalised on its own); `std="group"` uses the
    group's std, `"global"` the std of all (finite) rewards in the batch, population std unless
    `unbiased`. Defined results: a group of one sample, or a group whose rewards are all equal,
    gets advantage 0; with `nonfinite="drop"` samples with NaN/inf rewards are left out of the
    statistics and get 0. Output has the rewards' shape and dtype.
    """
    _check_group_inputs(rewards, group_ids)
    if std not in ("group", "global"):
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    if rewards.ndim not in (1, 2):
        raise ValueError(f"rewards must be [N] or [N, K], got {tuple(rewards.shape)}")
    finite = _finite_rows(rewards, nonfinite)
    values = torch.where(finite.reshape((-1,) + (1,) * (rewards.ndim - 1)), rewards, 0.0).double()
    unique, index = torch.unique(group_ids, return_inverse=True)
    ddof = 1 if unbiased else 0
    mean, group_std, count, all_equal = _segment_stats(values, finite.double(), index, unique.numel(), ddof)
    if std == "global":
        all_index = torch.zeros_like(index)
        _, global_std, _, global_equal = _segment_stats(values, finite.double(), all_index, 1, ddof)
        divisor = global_std.expand_as(mean)
        degenerate = global_equal.expand_as(mean) | (count <= 1)
    else:
        divisor = group_std
        degenerate = all_equal | (count <= 1)
    adv = (values - mean[index]) / (divisor[index] + eps)
    keep = finite.reshape((-1,) + (1,) * (rewards.ndim - 1)) & ~degenerate[index]
    adv = torch.where(keep, adv, 0.0)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    adv = adv.to(rewards.dtype)
    if not return_stats:
        return adv
    size = count if count.ndim == 1 else count[:, 0]
    return adv, GroupStats(unique, mean, divisor, size.long(), degenerate)


def gain_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    normalize: str = "joint",
    eps: float = 1e-8,
    clip: float | None = None,
    step_mask: Tensor | None = None,
    nonfinite: str = "error",
    return_stats: bool = False,
):
    """Stepwise-Flow-GRPO advantages `[N, T]` from stepwise rewards `[N, T+1]` (SPEC §4).

    Gains `rewards[:, k+1] - rewards[:, k]` are normalised `(g - mean) / (std + eps)` with the
    population std taken jointly over all N_g x T gains of each group (`joint`, the paper) or per
    (group, step) (`per_step`, the ablation). `step_mask` `[T]` (bool) leaves steps that are not
    trained out of the statistics and gives them advantage 0. Groups of one trajectory, and groups
    whose gains are all equal, get 0; NaN/inf rewards (or finite ones whose gain overflows the
    dtype) raise, or with `nonfinite="drop"` their trajectory is left out and gets 0. Output has
    the rewards' dtype.
    """
    _check_group_inputs(rewards, group_ids)
    if normalize not in ("joint", "per_step"):
        raise ValueError(f"normalize must be 'joint' or 'per_step', got {normalize!r}")
    # float16 / bfloat16 rewards take their differences in float32, as the native engines do
    step_gains = gains(rewards.float() if rewards.dtype in (torch.float16, torch.bfloat16) else rewards)
    n, steps = step_gains.shape
    if step_mask is None:
        step_mask = torch.ones(steps, dtype=torch.bool, device=rewards.device)
    elif step_mask.shape != (steps,) or step_mask.dtype != torch.bool:
        raise ValueError(f"step_mask must be a bool tensor of shape [{steps}], got {step_mask.dtype} {tuple(step_mask.shape)}")
    step_mask = step_mask.to(rewards.device)
    finite = _finite_rows(step_gains, nonfinite, gains=True)
    values = torch.where(finite[:, None], step_gains, 0.0).double()
    unique, index = torch.unique(group_ids, return_inverse=True)
    groups = unique.numel()
    weight = (finite[:, None] & step_mask[None, :]).double()  # [N, T]
    trajectories = torch.zeros(groups, dtype=torch.float64, device=rewards.device).index_add_(
        0, index, finite.double()
    )
    if normalize == "joint":
        flat_index = index.repeat_interleave(steps)
        mean, std, count, all_equal = _segment_stats(values.reshape(-1), weight.reshape(-1), flat_index, groups, 0)
        row_mean, row_std, row_equal = mean[index, None], std[index, None], all_equal[index, None]
    else:
        mean, std, count, all_equal = _segment_stats(values, weight, index, groups, 0)
        row_mean, row_std, row_equal = mean[index], std[index], all_equal[index]
    adv = (values - row_mean) / (row_std + eps)
    degenerate_row = (trajectories <= 1)[index, None]
    keep = (weight > 0) & ~row_equal & ~degenerate_row
    adv = torch.where(keep, adv, 0.0)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    adv = adv.to(rewards.dtype)
    if not return_stats:
        return adv
    degenerate = all_equal | (trajectories <= 1).reshape((-1,) + (1,) * (all_equal.ndim - 1))
    return adv, GroupStats(unique, mean, std, trajectories.long(), degenerate)


# ------------------------------------------------------------------------- PPO loss (SPEC §4.5)
def ppo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float = 1e-4,
    *,
    kl: Tensor | None = None,
    beta: float = 0.0,
    mask: Tensor | None = None,
) -> Tensor:
    """`mean(max(-A r, -A clip(r, 1-eps, 1+eps))) + beta * mean(KL)`, r = exp(logp - logp_old).

    All inputs share one shape (e.g. `[N, T]` per trajectory and step); `mask` (bool, same shape)
    selects the trained entries. Returns a 0-d float32 loss; 0 when there is no entry to train (an
    empty batch, or a mask without a True).
    """
    if log_prob.shape != old_log_prob.shape or log_prob.shape != advantages.shape:
        raise ValueError(
            "log_prob, old_log_prob and advantages must share a shape, got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}"
        )
    ratio = torch.exp(log_prob.float() - old_log_prob.float())
    adv = advantages.float()
    per_entry = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range))
    if kl is not None:
        per_entry = per_entry + beta * kl.float()
    if mask is None:
        # the mean of no entry is 0, not NaN (a shape, so no sync); the sum keeps the graph
        return per_entry.mean() if per_entry.numel() else per_entry.sum()
    weight = mask.to(per_entry.dtype)
    return (per_entry * weight).sum() / weight.sum().clamp(min=1.0)


# ------------------------------------------------------------------------------------ autocast
def _autocast_device_types() -> frozenset[str]:
    names = ["cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "ipu", "maia", torch._C._get_privateuse1_backend_name()]
    known = set()
    for name in names:
        try:
            torch.is_autocast_enabled(name)  # the question asked later: it raises for unknown types
        except RuntimeError:
            continue
        known.add(name)
    return frozenset(known)


# the device types torch.autocast knows: torch.is_autocast_enabled raises for the others (meta
# tensors, say), where nothing runs under autocast. Read once: a constant set is cheap to test and
# transparent to torch.compile
AUTOCAST_DEVICE_TYPES = _autocast_device_types()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype torch.autocast runs ops in on `device_type` when it is active there, else None."""
    if device_type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


# ---------------------------------------------------------------- RMSNorm (QK-norm of SD3.5 / FLUX)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def rms_norm_output_dtype(x_dtype: torch.dtype, weight_dtype: torch.dtype | None, device_type: str) -> torch.dtype:
    """diffusers' RMSNorm output dtype: the weight's when it is half precision, float32 (promotion)
    for a float32 weight, x's without a weight; under torch.autocast for `device_type` the autocast
    dtype instead (the result feeds attention, which autocast casts to it anyway)."""
    autocast = autocast_dtype(device_type)
    if autocast is not None:
        return autocast
    if weight_dtype is None:
        return x_dtype
    if weight_dtype in _HALF_DTYPES:
        return weight_dtype
    return torch.promote_types(torch.float32, weight_dtype)


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6, *,
             out_dtype: torch.dtype | None = None) -> Tensor:
    """`diffusers.models.normalization.RMSNorm.forward` (non-NPU branch, no bias) op for op, so it
    gives diffusers' bits; the last cast goes to `out_dtype` (default `rms_norm_output_dtype`, x's
    dtype without a weight: diffusers' own cast), so under autocast the fp32 result is rounded once."""
    if out_dtype is None:
        out_dtype = rms_norm_output_dtype(x.dtype, None if weight is None else weight.dtype, x.device.type)
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    h = x * torch.rsqrt(variance + eps)
    if weight is not None:
        if weight.dtype in _HALF_DTYPES:
            h = h.to(weight.dtype)
        h = h * weight
    return h.to(out_dtype)


def rms_norm_backward(grad: Tensor, x: Tensor, weight: Tensor | None = None, eps: float = 1e-6,
                      need_dx: bool = True, need_dweight: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """(dx, dweight) of `rms_norm` in x's and the weight's dtypes (None where not needed), in
    fp32: dx = r (g - h mean(g h)) with r = 1 / rms(x), h = x r, g = grad * weight; dweight sums
    grad * h (h rounded to a half weight's dtype, as the forward multiplied it) over every row."""
    xf = x.to(torch.float32)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    h = xf * r
    gf = grad.to(torch.float32)
    dx = dweight = None
    if need_dx:
        g = gf if weight is None else gf * weight.to(torch.float32)
        dx = (r * (g - h * (g * h).mean(-1, keepdim=True))).to(x.dtype)
    if need_dweight and weight is not None:
        hw = h.to(weight.dtype).to(torch.float32) if weight.dtype in _HALF_DTYPES else h
        products = gf * hw
        dweight = (products[None] if x.ndim == 1 else products.flatten(0, -2)).sum(0).to(weight.dtype)
    return dx, dweight


# --------------------------------------------- QK RMSNorm + rotary embedding (qk_norm_rope)
def qk_norm_rope_dtypes(x_dtype: torch.dtype, device_type: str) -> tuple[torch.dtype, torch.dtype]:
    """(the dtype the normalised rows are rounded to, the output dtype) of `qk_norm_rope`.

    torch's `rms_norm` returns x's dtype whatever the weight's (the product in fp32, rounded once);
    the rotation keeps its input's dtype. Under torch.autocast for `device_type` the output is the
    autocast dtype (the result feeds attention, which autocast casts to it) and, on CUDA, the norm
    runs in fp32 (torch's autocast policy for rms_norm there: no intermediate rounding)."""
    norm_dtype = x_dtype
    autocast = autocast_dtype(device_type)
    if autocast is not None:
        return (torch.float32 if device_type == "cuda" else norm_dtype), autocast
    return norm_dtype, norm_dtype


def rotary_embedding(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """diffusers' `apply_rotary_emb(x, (cos, sin), sequence_dim=1)` (interleaved pairs,
    `use_real_unbind_dim=-1`: FLUX.1 / FLUX.2) op for op: x `[B, N, H, D]`, cos / sin `[N, D]`."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2).unbind(-1)  # diffusers: -1 (fails when empty)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def qk_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, weight: Tensor | None = None, eps: float | None = None, *,
                 out_dtype: torch.dtype | None = None) -> Tensor:
    """`apply_rotary_emb(torch.nn.functional.rms_norm(x, (D,), weight, eps), (cos, sin))`: what
    FLUX's attention does to q and k (`eps=None`: the rotation only), torch's and diffusers' own
    expressions, then cast to `out_dtype` (default: the expression's dtype). x `[B, N, H, D]`."""
    if eps is not None:
        x = torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    y = rotary_embedding(x, cos, sin)
    return y if out_dtype is None else y.to(out_dtype)


def qk_norm_rope_backward(grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, weight: Tensor | None,
                          eps: float | None, need_dx: bool = True,
                          need_dweight: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """(dx, dweight) of `qk_norm_rope` in x's and the weight's dtypes (None where not needed), in
    fp32 (written out: custom ops' implementations run below autograd). The rotation's transpose
    u = (g_even cos_even + g_odd sin_odd, g_odd cos_odd - g_even sin_even) per pair, then the
    norm's backward: dx = r (u w - h mean(u w h)), dweight = sum over rows of u h, h = x r."""
    need_dweight = need_dweight and eps is not None and weight is not None
    half = grad.shape[-1] // 2
    g_even, g_odd = grad.float().reshape(*grad.shape[:-1], half, 2).unbind(-1)
    cos_even, cos_odd = cos.float().reshape(1, cos.shape[0], 1, half, 2).unbind(-1)
    sin_even, sin_odd = sin.float().reshape(1, sin.shape[0], 1, half, 2).unbind(-1)
    u = torch.stack([g_even * cos_even + g_odd * sin_odd, g_odd * cos_odd - g_even * sin_even], -1).flatten(-2)
    if eps is None:
        return (u.to(x.dtype) if need_dx else None), None
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    h = xf * r
    dx = dweight = None
    if need_dx:
        gw = u if weight is None else u * weight.float()
        dx = (r * (gw - h * (gw * h).mean(-1, keepdim=True))).to(x.dtype)
    if need_dweight:
        dweight = (u * h).flatten(0, -2).sum(0).to(weight.dtype)
    return dx, dweight


# ------------------------------------------------------------- adaLN modulation (layer_norm_modulate)
def _per_sample_index(x: Tensor) -> tuple:
    """`[:, None]` generalised to x's rank: a `[B, C]` per-sample vector (scale, shift, gate) against
    `[B, ..., C]` x."""
    return (slice(None),) + (None,) * (x.ndim - 2)


def layer_norm_modulate(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6) -> Tensor:
    """`layer_norm(x, (C,), eps) * (1 + scale[:, None]) + shift[:, None]`, op for op what diffusers'
    AdaLayerNormZero / AdaLayerNormContinuous compute (the LayerNorm has no affine): x is
    `[B, ..., C]`, scale and shift `[B, C]` get a singleton dim for every dim of x between batch and
    channel. The output dtype is the expression's (type promotion of x, scale, shift); under
    torch.autocast active for x's device the expression runs as autocast runs it, then is cast
    once to the autocast dtype (in diffusers the result always feeds a Linear, which autocast
    casts to that dtype anyway)."""
    index = _per_sample_index(x)
    y = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[index]) + shift[index]
    autocast = autocast_dtype(x.device.type)
    return y if autocast is None else y.to(autocast)


def layer_norm_modulate_backward(
    grad: Tensor, x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6,
    need_dx: bool = True, need_dscale: bool = True, need_dshift: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dscale, dshift) of `layer_norm_modulate` (x `[B, N, C]`, scale / shift `[B, C]`) as
    autograd computes them through the expression, op for op, so the bits are autograd's: each
    product in the promoted dtype, summed over the broadcast rows, then cast to the input's dtype
    (the engine's order), and LayerNorm's own backward kernel with the forward's mean and rstd.
    Written out because the custom op's implementation runs below autograd. `grad` is cast to the
    expression's dtype first (the backward of a final autocast cast); None where not needed."""
    channels = x.shape[-1]
    h, mean, rstd = torch.native_layer_norm(x, (channels,), None, None, eps)
    gain = 1 + scale[:, None]
    product_dtype = torch.promote_types(h.dtype, gain.dtype)  # of h * gain
    grad = grad.to(torch.promote_types(product_dtype, shift.dtype))
    g_product = grad.to(product_dtype)
    dx = dscale = dshift = None
    if need_dx:
        g_h = (g_product * gain).to(h.dtype)
        dx = torch.ops.aten.native_layer_norm_backward(g_h, x, (channels,), mean, rstd, None, None,
                                                       [True, False, False])[0]
    if need_dscale:
        dscale = (g_product * h).sum(1).to(scale.dtype)
    if need_dshift:
        dshift = grad.sum(1).to(shift.dtype)
    return dx, dscale, dshift


# ------------------------------------------------------ gated residual (+ adaLN of the MLP branch)
def gated_residual(h: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """`h + gate.unsqueeze(1) * y`, op for op diffusers' JointTransformerBlock / FluxTransformerBlock
    (`attn_output = gate_msa.unsqueeze(1) * attn_output; hidden_states = hidden_states + attn_output`,
    and the same with gate_mlp and ff_output): the product in promote(gate, y), the sum in
    promote(h, product). Elementwise ops: autocast leaves them alone."""
    return h + gate[_per_sample_index(y)] * y


def gated_residual_layer_norm_modulate(h: Tensor, y: Tensor, gate: Tensor, scale: Tensor, shift: Tensor,
                                       eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(h_out, normed): `h_out = gated_residual(h, y, gate)`, then diffusers' norm2 (LayerNorm without
    affine) of the stored h_out and the MLP's modulation, `layer_norm_modulate(h_out, scale, shift)`
    (its output dtype, under autocast the autocast dtype)."""
    h_out = gated_residual(h, y, gate)
    return h_out, layer_norm_modulate(h_out, scale, shift, eps)


def gated_residual_backward(
    grad: Tensor, y: Tensor, gate: Tensor, h_dtype: torch.dtype,
    need_dh: bool = True, need_dy: bool = True, need_dgate: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dh, dy, dgate) of `gated_residual` (y `[B, N, C]`, gate `[B, C]`) as autograd computes them
    through the expression: dh = grad in h's dtype; the product's gradient in promote(gate, y), times
    gate (dy) or y summed over the rows (dgate), each cast to its input's dtype. Written out because
    the custom op's implementation runs below autograd. None where not needed."""
    g_product = grad.to(torch.promote_types(gate.dtype, y.dtype))
    dh = grad.to(h_dtype) if need_dh else None
    dy = (g_product * gate[:, None]).to(y.dtype) if need_dy else None
    dgate = (g_product * y).sum(1).to(gate.dtype) if need_dgate else None
    return dh, dy, dgate


# --------------------------------------------------------------------------- LoRA linear
def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scaling: float) -> Tensor:
    """A Linear layer with a LoRA adapter, as peft's `lora.Linear` computes it (dropout off):
    `base(x) + lora_B(lora_A(x)) * scaling`, every op in its own kernel."""
    return torch.nn.functional.linear(x, weight, bias) + torch.nn.functional.linear(
        torch.nn.functional.linear(x, lora_a), lora_b) * scaling
