"""Public tensor-level API: what the trainer, the compat layer and outside trainers call.

Each function validates its inputs, then runs the op through the backend chosen by
`sfgrpo.backend` (fused kernels on CUDA, reference / C++ on CPU). The trainer holds no math of
its own: everything numerical it does goes through here.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch
from torch import Tensor

from sfgrpo import reference
from sfgrpo.backend import device_type, resolve_backend
from sfgrpo.gather import gather_batch
from sfgrpo.ops import advantages as advantage_ops
from sfgrpo.ops import gated_residual as gated_residual_ops
from sfgrpo.ops import layer_norm_modulate as layer_norm_modulate_ops
from sfgrpo.ops import lora_linear as lora_linear_ops
from sfgrpo.ops import qk_norm_rope as qk_norm_rope_ops
from sfgrpo.ops import rms_norm as rms_norm_ops
from sfgrpo.ops import sde_step as sde_step_ops
from sfgrpo.reference import VelocityFn
from sfgrpo.schedules import step_count


class StepResult(NamedTuple):
    """Outputs of `sde_step`. Fields that were not asked for are None (kernels skip writing them)."""

    prev_sample: Tensor  # x' in the storage dtype of x (the given sample when scoring)
    log_prob: Tensor  # [B] float32
    std: Tensor  # [B] float32 per-step std
    std_dev_t: Tensor  # [B] float32, Flow-GRPO's std_dev_t
    mean: Tensor | None  # float32, when return_mean
    x0_hat: Tensor | None  # float32 Tweedie clean estimate, when return_x0_hat
    x1_hat: Tensor | None  # float32 Tweedie noise estimate, when return_x1_hat
    kl: Tensor | None  # [B] float32, when v_ref is given


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_latent(name: str, tensor: Tensor, shape: torch.Size, device: torch.device) -> None:
    """`tensor` is a latent like x (of `shape` on `device`). x's own shape and device are passed in,
    read once: each Tensor.shape / .device builds a new Python object (~0.3 us apiece)."""
    if tensor.shape != shape:
        raise ValueError(f"{name} must have the shape of x {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but x is on {device}")
    _check_float(name, tensor)


def _check_float(name: str, tensor: Tensor) -> None:
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {tensor.dtype}")


def _float32(value: float, compiling: bool) -> float:
    """A Python number rounded to float32 (to nearest, as torch.tensor(value, dtype=float32) does).
    Under torch.compile (`compiling`) the number passes as it is (dynamo cannot trace `struct`; it
    may also be a symbolic float): the op's kernels take it as float32, which rounds it the same way."""
    if compiling:
        return value
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(float(value)))[0]
    except OverflowError:  # beyond float32's range
        return math.copysign(math.inf, value)


_FLOAT32 = struct.Struct("f")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _wrap_int64(value: int) -> int:
    """A Philox seed or counter offset beyond int64 as the op's int (int64): modulo 2^64, two's
    complement (Philox takes their 64 bits, so -1 and 2^64 - 1 draw the same noise). Such values
    ran eagerly on the native and reference backends (modulo 2^64) but failed in Triton's launcher
    and under torch.compile (the op's schema is int64)."""
    return (value - _INT64_MIN) % 2**64 + _INT64_MIN


def _step_value(value: float | Tensor, batch: int, device: torch.device, compiling: bool) -> float | Tensor:
    """A per-row step value for the op: a Python number stays a number, rounded to float32 (one
    value for every row: the kernels take it by value, nothing is built on the device); a tensor
    becomes float32 `[B]` on the latents' device."""
    if isinstance(value, Tensor):
        # already what the op takes (the common per-row case): itself, without the ~1-2 us of a
        # Tensor.to and a .contiguous that would both return it anyway
        if value.dtype == torch.float32 and value.shape == (batch,) and value.device == device and value.is_contiguous():
            return value
        return reference.row_values(value, batch, device).contiguous()
    return _float32(value, compiling)


def _check_step_numbers(sde_type: str, t, t_next, noise_level, sigma_max) -> None:
    """Clear errors for step values given as Python numbers, which cost nothing to check (a tensor
    would have to be read back: a host sync). Out of range, the formulas give NaN or inf in every
    output instead: `sde` divides by t and by 1 - sigma_max, and takes sqrt(t - t')."""
    number = (int, float)
    if isinstance(t, number) and not 0.0 < t <= 1.0:
        raise ValueError(f"t must be in (0, 1], got {t}")
    if isinstance(t_next, number):
        upper = t if isinstance(t, number) else 1.0
        if not 0.0 <= t_next <= upper:
            raise ValueError(f"t_next must be in [0, t] (t = {upper}), got {t_next}")
    if isinstance(noise_level, number) and not 0.0 <= noise_level < math.inf:
        raise ValueError(f"noise_level must be a finite number >= 0, got {noise_level}")
    if sde_type == "sde" and isinstance(sigma_max, number) and not 0.0 <= sigma_max < 1.0:
        raise ValueError(f"sigma_max must be in [0, 1) (the sde step divides by 1 - sigma_max), got {sigma_max}")
    if sde_type == "sde" and sigma_max is None and isinstance(t_next, number) and t_next >= 1.0:
        # the default sigma_max is t_next: a step that ends at t' = 1 would divide by zero
        raise ValueError(f"the sde step needs sigma_max < 1: it defaults to t_next = {t_next}; pass sigma_max")
    if sde_type == "cps" and isinstance(noise_level, number) and noise_level > 1.0:
        raise ValueError(f"noise_level must be in [0, 1] for cps (std = t' sin(a pi / 2): levels in (1, 2] repeat "
                         f"those of 2 - a, beyond 2 the std is negative or vanishes), got {noise_level}")
    if sde_type == "ddim" and isinstance(noise_level, number) and isinstance(t, number) and noise_level * math.sqrt(1.0 - t) > 1.0 + 1e-6:
        raise ValueError(f"noise_level {noise_level} is too large for ddim at t = {t}: std = a t' sqrt(1 - t) would "
                         f"exceed t' (the mean keeps sqrt(t'^2 - std^2) of x1_hat); a must be <= {1 / math.sqrt(1 - t):.6g}")


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
    seed: int | None = None,
    seed_offset: int = 0,
    logprob: str = "gaussian",
    reduction: str = "mean",
    v_ref: Tensor | None = None,
    kl: str = "exact",
    sigma_max: float | Tensor | None = None,
    return_mean: bool = False,
    return_x0_hat: bool = False,
    return_x1_hat: bool = False,
    backend: str | None = None,
) -> StepResult:
    """One SDE step t -> t' (SPEC §3) in one fused pass: samples x' (or scores the given
    `prev_sample`) and returns the per-row log-prob, optionally the mean, the Tweedie estimates and
    the KL to the reference velocity `v_ref`.

    Latents have any rank (dim 0 is the batch) and fp32/bf16/fp16 storage; math is fp32. `t`,
    `t_next`, `noise_level`, `sigma_max` are floats or per-row `[B]` tensors (kept on the device:
    no host syncs; numbers go to the kernels by value, so a captured CUDA graph replays the numbers
    it was captured with: pass tensors to change them between replays). Noise, when sampling: `noise` (eps) if given; else in-kernel Philox from `seed`
    (fast and reproducible, not bit-equal to torch.randn; a call uses Philox counters
    `seed_offset .. seed_offset + B * ceil(D / 4) - 1`, 4 normals each, so steps that share a seed
    take disjoint counter ranges, `reference.philox_step_noise` gives the same noise; any Python
    integers, taken modulo 2^64); else
    `torch.randn(generator=...)` drawn like diffusers' `randn_tensor` (bit-compatible sampling),
    with torch's global RNG when no source is given (`ode` needs none).
    Gradients flow to `v` (and `x`, `v_ref` when they require grad) through the mean and the
    Tweedie estimates; the sample is data. Step values given as numbers are range-checked
    (0 < t <= 1, 0 <= t' <= t, noise level >= 0, sigma_max in [0, 1), for `sde` its default
    t' < 1, for `cps` a noise level <= 1, for `ddim` a std a t' sqrt(1 - t) <= t'); tensors are not
    (that would sync): there the caller guarantees it.
    """
    if sde_type not in reference.SDE_TYPES:
        raise ValueError(f"sde_type must be one of {reference.SDE_TYPES}, got {sde_type!r}")
    if logprob not in reference.LOGPROB_CONVENTIONS:
        raise ValueError(f"logprob must be one of {reference.LOGPROB_CONVENTIONS}, got {logprob!r}")
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")
    if kl not in reference.KL_CONVENTIONS:
        raise ValueError(f"kl must be one of {reference.KL_CONVENTIONS}, got {kl!r}")
    if x.ndim < 1:
        raise ValueError("x needs a batch dimension")
    shape, device = x.shape, x.device
    _check_float("x", x)
    _check_latent("v", v, shape, device)
    batch = shape[0]
    if batch > 0 and math.prod(shape[1:]) == 0:
        raise ValueError(f"x has no elements per row (shape {tuple(shape)})")
    sources = (prev_sample is not None) + (noise is not None) + (generator is not None) + (seed is not None)
    if sources > 1:
        raise ValueError("give at most one of prev_sample (scoring), noise, generator, seed")
    for name, tensor in (("prev_sample", prev_sample), ("noise", noise), ("v_ref", v_ref)):
        if tensor is not None:
            _check_latent(name, tensor, shape, device)
    if generator is not None:
        noise = reference.draw_noise(x, generator)
    elif sources == 0:  # sampling with no noise source given
        # the deterministic step needs none (zeros); the others draw from torch's global RNG, as
        # diffusers' randn_tensor does without a generator
        noise = torch.zeros_like(x, dtype=torch.float32) if sde_type == "ode" else reference.draw_noise(x)
    compiling = torch.compiler.is_compiling()
    if not compiling:  # numbers may be symbolic under compile
        _check_step_numbers(sde_type, t, t_next, noise_level, sigma_max)
    t_row = _step_value(t, batch, device, compiling)
    t_next_row = _step_value(t_next, batch, device, compiling)
    level_row = _step_value(noise_level, batch, device, compiling)
    sigma_max_row = t_next_row if sigma_max is None else _step_value(sigma_max, batch, device, compiling)
    use_philox = seed is not None
    seed, seed_offset = int(seed) if use_philox else 0, int(seed_offset)
    if not (_INT64_MIN <= seed <= _INT64_MAX and _INT64_MIN <= seed_offset <= _INT64_MAX):  # (rare: no call otherwise)
        seed, seed_offset = _wrap_int64(seed), _wrap_int64(seed_offset)
    outputs = sde_step_ops.sde_step(  # latents as given: the op flattens them where it must
        x, v, t_row, t_next_row, level_row, sigma_max_row,
        prev_sample if prev_sample is None or prev_sample.dtype == x.dtype else prev_sample.to(x.dtype),
        noise, v_ref,
        seed, seed_offset, use_philox,
        sde_type, logprob, reduction, kl, return_mean, return_x0_hat, return_x1_hat, backend,
    )
    sample, log_prob, std, std_dev_t, mean, x0_hat, x1_hat, kl_value = outputs
    return StepResult(
        prev_sample=prev_sample if prev_sample is not None else _shaped(sample, shape),
        log_prob=log_prob,
        std=std,
        std_dev_t=std_dev_t,
        mean=_shaped(mean, shape) if return_mean else None,
        x0_hat=_shaped(x0_hat, shape) if return_x0_hat else None,
        x1_hat=_shaped(x1_hat, shape) if return_x1_hat else None,
        kl=kl_value if v_ref is not None else None,
    )


def _shaped(output: Tensor, shape: torch.Size) -> Tensor:
    """An op output in the caller's shape: itself when it already is (the eager Triton paths; no view,
    so no extra autograd node), else a view of its `[B, D]` / `[B, N, C]` (a reshape costs ~1-2 us of
    host time per call)."""
    return output if output.shape == shape else output.reshape(shape)


def ode_lookahead(
    x: Tensor, t: float | Tensor, velocity_fn: VelocityFn, num_steps: int = 1, *, v: Tensor | None = None
) -> Tensor:
    """Clean-image estimate after `num_steps` Euler sub-steps to t = 0 (SPEC §4.2); see
    `reference.ode_lookahead`. `t` is in [0, 1] (a number is checked; a `[B]` tensor is not: that
    would sync); `v` and every velocity that `velocity_fn` returns must have x's shape (a
    broadcastable one, such as one row for the whole batch, is an error, not a silent broadcast)."""
    num_steps = step_count(num_steps)  # numpy / torch integers too, as the schedules take them
    if isinstance(t, (int, float)) and not torch.compiler.is_compiling() and not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    if v is not None:
        _check_latent("v", v, x.shape, x.device)

    def velocity_of(state: Tensor, t_row: Tensor) -> Tensor:
        velocity = velocity_fn(state, t_row)
        if not isinstance(velocity, Tensor) or velocity.shape != x.shape:
            got = tuple(velocity.shape) if isinstance(velocity, Tensor) else type(velocity).__name__
            raise ValueError(f"velocity_fn returned {got} for a state of shape {tuple(x.shape)}: it must return x's shape")
        return velocity

    return reference.ode_lookahead(x, t, velocity_of, num_steps, v=v)


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
    gather: bool = False,
    process_group=None,
    backend: str | None = None,
):
    """Stepwise-Flow-GRPO advantages `[N, T]` from stepwise rewards `[N, T+1]` (SPEC §4).

    Column k of `rewards` is the reward of the clean estimate after k sampling steps; the gains
    `rewards[:, k+1] - rewards[:, k]` credit step k and are normalised `(g - mean) / (std + eps)`
    (population std) over all N_g x T gains of each group (`normalize="joint"`, the paper) or per
    (group, step) (`"per_step"`). `group_ids` (int64 `[N]`, any values, any order) names the
    groups. `step_mask` (bool `[T]`) leaves steps out of the statistics with advantage 0; `clip`
    clamps to [-clip, clip]. A group of one trajectory, or one whose gains are all equal, gets 0.
    NaN/inf rewards (or finite ones whose gain overflows the dtype) raise, or with `nonfinite="drop"`
    their trajectory is left out with advantage 0. `return_stats=True` returns
    `(advantages, GroupStats)` (groups in ascending id order).

    `gather=True` (or a `process_group`) all-gathers the batch over torch.distributed first, so
    groups may be spread over ranks: every rank gets the same statistics and its own rows back.
    Output has the rewards' dtype and carries no gradient. Runs the native engine (C++ / CUDA)
    unless the backend (`backend=`, SFGRPO_BACKEND) says `reference`.
    """
    advantage_ops.check_gain_inputs(
        rewards, group_ids, normalize=normalize, eps=eps, clip=clip, step_mask=step_mask, nonfinite=nonfinite
    )
    if step_mask is not None:
        step_mask = step_mask.to(rewards.device)
    rows = None
    if gather or process_group is not None:
        rewards, group_ids, rows = gather_batch(rewards, group_ids, process_group)
    if resolve_backend("gain_advantages", rewards.device, backend) == "reference":
        result = reference.gain_advantages(
            rewards, group_ids, normalize=normalize, eps=eps, clip=clip, step_mask=step_mask,
            nonfinite=nonfinite, return_stats=return_stats,
        )
    else:
        result = advantage_ops.gain_advantages(
            rewards, group_ids, normalize=normalize, eps=float(eps), clip=None if clip is None else float(clip),
            step_mask=step_mask, nonfinite=nonfinite, return_stats=return_stats, validated=True,
        )
    return _this_rank_rows(result, rows, return_stats)


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
    gather: bool = False,
    process_group=None,
    backend: str | None = None,
):
    """Flow-GRPO per-prompt advantages `(r - mean_group) / (std + eps)` (SPEC §4, §7).

    `rewards` is `[N]` (one reward per sample) or `[N, K]` (each column normalised on its own);
    `std="group"` divides by the group's std, `"global"` by the std of the whole batch (Flow-GRPO's
    `global_std`), population std unless `unbiased`. Groups of one sample, or whose rewards are
    all equal, get 0; `nonfinite`, `clip`, `return_stats`, `gather`/`process_group` and `backend`
    as in `gain_advantages`. Output has the rewards' shape and dtype and carries no gradient.
    """
    advantage_ops.check_group_inputs(rewards, group_ids, std=std, eps=eps, clip=clip, nonfinite=nonfinite)
    rows = None
    if gather or process_group is not None:
        rewards, group_ids, rows = gather_batch(rewards, group_ids, process_group)
    if resolve_backend("group_advantages", rewards.device, backend) == "reference":
        result = reference.group_advantages(
            rewards, group_ids, std=std, eps=eps, unbiased=unbiased, clip=clip, nonfinite=nonfinite,
            return_stats=return_stats,
        )
    else:
        result = advantage_ops.group_advantages(
            rewards, group_ids, std=std, eps=float(eps), unbiased=bool(unbiased),
            clip=None if clip is None else float(clip), nonfinite=nonfinite, return_stats=return_stats,
            validated=True,
        )
    return _this_rank_rows(result, rows, return_stats)


def _this_rank_rows(result, rows: slice | None, return_stats: bool):
    """After a gather: this rank's rows of the advantages (the statistics are global)."""
    if rows is None:
        return result
    if return_stats:
        advantages, stats = result
        return advantages[rows], stats
    return result[rows]


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
    """PPO clipped surrogate + beta * KL (SPEC §4.5); see `reference.ppo_loss`.

    `log_prob`, `old_log_prob`, `advantages` and, when given, `kl` and `mask` (bool) share one shape
    and device; `clip_range` is a finite number > 0, `beta` one >= 0, and beta > 0 needs `kl`. An
    empty batch, or a mask without a True, gives a loss of 0."""
    _check_ppo_inputs(log_prob, old_log_prob, advantages, clip_range, kl, beta, mask)
    return reference.ppo_loss(log_prob, old_log_prob, advantages, clip_range, kl=kl, beta=beta, mask=mask)


def _check_ppo_inputs(log_prob, old_log_prob, advantages, clip_range, kl, beta, mask) -> None:
    tensors = {"log_prob": log_prob, "old_log_prob": old_log_prob, "advantages": advantages, "kl": kl, "mask": mask}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tensor.shape != log_prob.shape:
            raise ValueError(f"{name} must have log_prob's shape {tuple(log_prob.shape)}, got {tuple(tensor.shape)}")
        if tensor.device != log_prob.device:
            raise ValueError(f"{name} is on {tensor.device} but log_prob is on {log_prob.device}")
        if name != "mask" and not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True: trained), got {mask.dtype}")
    if torch.compiler.is_compiling():  # the numbers may be symbolic: checked eagerly only
        return
    for name, value, low_ok in (("clip_range", clip_range, False), ("beta", beta, True)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                (value >= 0 if low_ok else value > 0) and value < math.inf):
            raise ValueError(f"{name} must be a finite number {'>= 0' if low_ok else '> 0'}, got {value!r}")
    if beta > 0 and kl is None:
        raise ValueError("beta > 0 needs kl, the per-entry KL to the reference policy (sde_step(..., v_ref=...).kl)")


RMS_NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_rms_weight_and_eps(x: Tensor, weight: Tensor | None, eps) -> None:
    """An RMSNorm's weight ([D], x's device, a 2- or 4-byte float) and eps (finite, >= 0), for
    `rms_norm` and `qk_norm_rope`."""
    if weight is not None:
        if weight.shape != (x.shape[-1],):
            raise ValueError(f"weight must have shape [D] = [{x.shape[-1]}] (x's last dim), got {tuple(weight.shape)}")
        if weight.device != x.device:
            raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
        if weight.dtype not in RMS_NORM_DTYPES:
            raise TypeError(f"weight must be float32, bfloat16 or float16, got {weight.dtype}")
    if not torch.compiler.is_compiling():  # eps may be symbolic under compile: checked eagerly only
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps < math.inf:
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6, *, backend: str | None = None) -> Tensor:
    """diffusers' `RMSNorm` (the QK-norm of SD3.5 / FLUX attention) over the last dim of `x`, fused.

    Same numbers and dtype as `diffusers.models.normalization.RMSNorm.forward` (see
    `reference.rms_norm`): fp32 math; the output in the weight's dtype when it is half precision,
    float32 with a float32 weight, x's dtype without a weight; under `torch.autocast` for x's device
    the autocast dtype instead (the fp32 result rounded once). x of any rank and dtype
    float32 / bfloat16 / float16 (float64 is rejected: the kernels do not take it); weight `[D]`.
    x laid out with its rows consecutive in memory (contiguous, or a permuted view such as
    `q.view(B, N, H, D).transpose(1, 2)`) is read in place and the output takes its strides; other
    layouts are copied once. Gradients flow to x and weight (fused one-pass backward on CUDA).
    """
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError("x must be a tensor with at least one dimension (normalised over the last)")
    if x.dtype not in RMS_NORM_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    _check_rms_weight_and_eps(x, weight, eps)
    out_dtype = reference.rms_norm_output_dtype(x.dtype, None if weight is None else weight.dtype, device_type(x.device))
    return rms_norm_ops.rms_norm(x, weight, float(eps), out_dtype, backend)


def qk_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, weight: Tensor | None = None, eps: float | None = None, *,
                 backend: str | None = None) -> Tensor:
    """FLUX attention's QK-norm and rotary embedding in one pass:
    `apply_rotary_emb(torch.nn.functional.rms_norm(x, (D,), weight, eps), (cos, sin), sequence_dim=1)`
    (diffusers' interleaved-pair rotation, `use_real_unbind_dim=-1`); `eps=None`: the rotation only.

    x `[B, N, H, D]` (batch, token, head, channel; D even), float32 / bfloat16 / float16, any strides
    with channel stride 1 read in place (a slice of a joint sequence); cos / sin `[N, D]` (row n the
    angles of token n; float32, or half precision; no gradient flows to them); weight `[D]`.
    Returns a contiguous `[B, N, H, D]` tensor in x's dtype (what torch's rms_norm and the rotation
    return; under torch.autocast for x's device the autocast dtype: it feeds attention). fp32
    math, rounded once after the norm (where torch's rms_norm rounds) and once at the end; on CPU
    (reference backend) torch's and diffusers' own expressions, the same bits as the modules.
    Gradients flow to x and weight (one-pass fused backward on CUDA).
    """
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a [B, N, H, D] tensor, got {tuple(x.shape) if isinstance(x, Tensor) else type(x)}")
    if x.dtype not in RMS_NORM_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    B, N, H, D = x.shape
    if D % 2:
        raise ValueError(f"the rotation pairs channels: x's last dim must be even, got {D}")
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, Tensor) or table.shape != (N, D):
            raise ValueError(f"{name} must be [N, D] = [{N}, {D}], got "
                             f"{tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__}")
        if table.dtype not in RMS_NORM_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {table.dtype}")
        if table.device != x.device:
            raise ValueError(f"{name} is on {table.device} but x is on {x.device}")
        if table.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires a gradient: qk_norm_rope gives none to the rotation tables")
    if eps is not None:
        _check_rms_weight_and_eps(x, weight, eps)
    elif weight is not None:
        raise ValueError("a weight needs eps (the norm): eps=None is the rotation alone")
    norm_dtype, out_dtype = reference.qk_norm_rope_dtypes(x.dtype, device_type(x.device))
    return qk_norm_rope_ops.qk_norm_rope(x, cos, sin, weight, None if eps is None else float(eps), norm_dtype,
                                         out_dtype, backend)


# ------------------------------------------------------------------ adaLN modulation (fused LayerNorm)
_MODULATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_norm_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


def _modulated_dtype(kind: str, x_dtype, scale_dtype, shift_dtype) -> tuple[bool, torch.dtype]:
    """(autocast on, output dtype) of a modulated LayerNorm on a `kind` device: the autocast dtype
    under autocast, else the eager expression's type promotion."""
    autocast = reference.autocast_dtype(kind)
    if autocast is not None:
        return True, autocast
    if x_dtype == scale_dtype == shift_dtype:  # the usual case: no promotion to ask torch for
        return False, x_dtype
    return False, torch.promote_types(torch.promote_types(x_dtype, scale_dtype), shift_dtype)


def _check_per_sample_inputs(x_name: str, x: Tensor, y: Tensor | None = None, **per_sample: Tensor) -> None:
    """Clear errors for the norm ops' inputs: `x` `[B, ..., C]`, `y` (the gated residual's other
    stream) of x's shape, each `per_sample` tensor `[B, C]`; all on x's device, in a float dtype
    (float64 runs the reference)."""
    named = ((x_name, x), *((("y", y),) if y is not None else ()), *per_sample.items())
    for name, tensor in named:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    shape, device = x.shape, x.device  # read once: each read builds a new object
    if len(shape) < 2:
        raise ValueError(f"{x_name} must be [B, ..., C] with at least 2 dims, got shape {tuple(shape)}")
    if y is not None and y.shape != shape:
        raise ValueError(f"y must have {x_name}'s shape {tuple(shape)}, got {tuple(y.shape)}")
    rows = (shape[0], shape[-1])
    for name, tensor in per_sample.items():
        if tensor.shape != rows:
            raise ValueError(f"{name} must have shape [B, C] = [{rows[0]}, {rows[1]}] to match {x_name} of shape "
                             f"{tuple(shape)}, got {tuple(tensor.shape)}")
    for name, tensor in named[1:]:
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but {x_name} is on {device}")
    for name, tensor in named:
        if tensor.dtype not in _MODULATE_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64 (float64 runs the reference), "
                            f"got {tensor.dtype}")


def _token_rows(x: Tensor) -> Tensor:
    """x `[B, ..., C]` as `[B, N, C]` with unit last stride: a view when it can be one (the
    kernels read any batch and token strides)."""
    # Tensor.stride() then an index: stride(i) runs torch's argument parser (twice the cost)
    if x.ndim == 3 and x.stride()[-1] == 1:  # the blocks' activations: x itself (a reshape costs ~2 us)
        return x
    rows = x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])  # N from the shape: B may be 0
    return rows if rows.stride()[-1] == 1 else rows.contiguous()


def _channels_adjacent(t: Tensor) -> Tensor:
    """[B, C] read through its row stride (chunks of diffusers' [B, kC] embedding stay in place)."""
    return t if t.stride()[-1] == 1 else t.contiguous()


def layer_norm_modulate(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6, *,
                        backend: str | None = None) -> Tensor:
    """`layer_norm(x, (C,), eps) * (1 + scale[:, None]) + shift[:, None]` (LayerNorm without affine,
    then per-sample modulation: diffusers' AdaLayerNormZero and friends) in one pass over x.

    x is `[B, ..., C]` (usually `[B, N, C]`, also `[B, C]`), scale and shift `[B, C]`. They may be
    views with a row stride, such as `emb.chunk(6, dim=1)[i]`: read in place, no copy (other
    layouts are made contiguous once). Output dtype: the expression's type promotion of x, scale,
    shift; under torch.autocast for x's device, the autocast dtype (`reference.layer_norm_modulate`).
    CUDA tensors run the fused Triton kernels (fp32 math, one rounding of y; C up to
    kernels.layer_norm_modulate.MAX_C, wider rows and float64 run the reference), CPU tensors the
    reference, bit-identical to diffusers in the output and in the gradients. Gradients flow to x,
    scale and shift (dscale and dshift computed only when they require grad).
    """
    _check_per_sample_inputs("x", x, scale=scale, shift=shift)
    _check_norm_eps(eps)
    autocast, out_dtype = _modulated_dtype(device_type(x.device), x.dtype, scale.dtype, shift.dtype)
    y = layer_norm_modulate_ops.layer_norm_modulate(_token_rows(x), _channels_adjacent(scale),
                                                    _channels_adjacent(shift), float(eps), out_dtype, autocast, backend)
    return _shaped(y, x.shape)  # itself for [B, N, C] x (no view: no extra autograd node), else a view


# ------------------------------------------------- gated residual (+ the MLP branch's adaLN)
def gated_residual(h: Tensor, y: Tensor, gate: Tensor, *, backend: str | None = None) -> Tensor:
    """`h + gate.unsqueeze(1) * y`: diffusers' SD3 / FLUX blocks adding the gated attention or MLP
    output to the residual stream, in one pass.

    h and y are `[B, ..., C]` of one shape (usually `[B, N, C]`; `[B, C]` too: gate then broadcasts as
    `gate[:, None]` generalised to their rank), gate `[B, C]`, possibly a view with a row stride such
    as `emb.chunk(6, dim=1)[i]` (read in place, no copy). Output dtype and rounding are the eager
    expression's: the product rounded to promote(gate, y), the sum to promote(h, product); on
    CUDA (Triton kernels, fp32 math) bit-identical to it. CPU tensors run the expression itself;
    float64 and rows wider than kernels.gated_residual.MAX_C run the reference on every backend.
    Gradients: dh = g, dy = g * gate, dgate = the sum over the sample's rows of g * y (only the ones
    required)."""
    _check_per_sample_inputs("h", h, y, gate=gate)
    out = gated_residual_ops.gated_residual(_token_rows(h), _token_rows(y), _channels_adjacent(gate), backend)
    return _shaped(out, h.shape)


def gated_residual_layer_norm_modulate(h: Tensor, y: Tensor, gate: Tensor, scale: Tensor, shift: Tensor,
                                       eps: float = 1e-6, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """`(h_out, normed)` with `h_out = gated_residual(h, y, gate)` and
    `normed = layer_norm_modulate(h_out, scale, shift, eps)`: diffusers' residual update followed by
    norm2 (LayerNorm without affine) and the MLP's adaLN modulation, in one pass that reads h, y (and
    the gate, scale, shift rows) and writes h_out and normed.

    Shapes as `gated_residual`, scale and shift `[B, C]` (row-strided views read in place). h_out has
    gated_residual's dtype and bits; the LayerNorm reads h_out as rounded to that dtype (what norm2
    reads); normed has layer_norm_modulate's dtype (promote(h_out, scale, shift), under
    torch.autocast the autocast dtype). One-pass backward: total = g_h_out + the LayerNorm-modulate
    gradient w.r.t. h_out (either output may be unused), dh = total, dy = total * gate, and dgate,
    dscale, dshift as sums over the sample's rows, each only when required."""
    _check_per_sample_inputs("h", h, y, gate=gate, scale=scale, shift=shift)
    _check_norm_eps(eps)
    h_out_dtype = torch.promote_types(h.dtype, torch.promote_types(gate.dtype, y.dtype))
    autocast, out_dtype = _modulated_dtype(device_type(h.device), h_out_dtype, scale.dtype, shift.dtype)
    h_out, normed = gated_residual_ops.gated_residual_layer_norm_modulate(
        _token_rows(h), _token_rows(y), _channels_adjacent(gate), _channels_adjacent(scale), _channels_adjacent(shift),
        float(eps), out_dtype, autocast, backend)
    return _shaped(h_out, h.shape), _shaped(normed, h.shape)


# ------------------------------------------------------------------------------ LoRA linear
_LORA_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scaling: float) -> Tensor:
    """A Linear layer with a LoRA adapter, `x W^T + b + scaling * (x A^T) B^T` (peft's `lora.Linear`
    with dropout off), with no full-size pass besides the GEMMs: the adapter's output is accumulated
    into the base output by the second GEMM, and in the backward the adapter's input gradient into
    the base's by the input-gradient GEMM (peft adds casts, the scaling product and the sums as
    kernels of their own).

    x `[..., in]`, weight `[out, in]`, bias `[out]` or None, lora_a `[r, in]`, lora_b `[out, r]`.
    Computes in the autocast dtype under `torch.autocast` for x's device (what peft's GEMMs run in
    there), else in x's dtype; the weights are cast to it (small casts, except a base weight stored
    in another dtype, which autocast would cast too; float64 ones as well, which autocast would
    leave alone: `fuse_lora` keeps peft's forward for those). Gradients flow to every input that
    requires one, in its own dtype. The result equals `reference.lora_linear` up to rounding: the sum is
    rounded once, at the end of the GEMM, not after each op."""
    tensors = dict(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b)
    if bias is not None:
        tensors["bias"] = bias
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _LORA_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16, float64), "
                            f"got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    if x.ndim < 1 or weight.ndim != 2 or lora_a.ndim != 2 or lora_b.ndim != 2:
        raise ValueError("x must be [..., in], weight [out, in], lora_a [r, in], lora_b [out, r]; got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(lora_a.shape)}, {tuple(lora_b.shape)}")
    (out_features, in_features), rank = weight.shape, lora_a.shape[0]
    if x.shape[-1] != in_features or lora_a.shape[1] != in_features or lora_b.shape != (out_features, rank):
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_a "
                         f"{tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)} "
                         "(want [..., in], [out, in], [r, in], [out, r])")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must be [out] = [{out_features}], got {tuple(bias.shape)}")
    if not torch.compiler.is_compiling():
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
            raise TypeError(f"scaling must be a number, got {type(scaling).__name__}")
        if not math.isfinite(scaling):  # NaN / inf would silently fill the output with them
            raise ValueError(f"scaling must be finite, got {scaling}")
    dtype = reference.autocast_dtype(device_type(x.device)) or x.dtype

    def cast(t):
        return t if t is None or t.dtype == dtype else t.to(dtype)

    return lora_linear_ops.lora_linear(cast(x), cast(weight), cast(bias), cast(lora_a), cast(lora_b), float(scaling))
