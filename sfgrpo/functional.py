"""Public tensor-level API: what the trainer, the compat layer and outside trainers call.

Each function validates its inputs, then runs the op through the backend chosen by
`sfgrpo.backend` (fused kernels on CUDA, reference / C++ on CPU). The trainer holds no math of
its own: everything numerical it does goes through here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sfgrpo import reference
from sfgrpo.reference import VelocityFn


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
    return_mean: bool = False,
    return_x0_hat: bool = False,
    return_x1_hat: bool = False,
    backend: str | None = None,
) -> StepResult:
    """One SDE step t -> t' (SPEC §3): samples x' (or scores the given `prev_sample`) and returns
    the per-row log-prob, optionally the mean, the Tweedie estimates and the KL to `v_ref`.

    Gradients flow to `v` (and `v_ref` for the KL) only; `x` and `prev_sample` are treated as data.
    """
    del backend  # reference only until the fused kernels land
    out = reference.sde_step(
        x, v, t, t_next, noise_level, sde_type=sde_type, prev_sample=prev_sample, noise=noise,
        generator=generator, logprob=logprob, reduction=reduction, v_ref=v_ref, kl=kl, sigma_max=sigma_max,
    )
    return StepResult(
        prev_sample=out.prev_sample,
        log_prob=out.log_prob,
        std=out.std,
        std_dev_t=out.std_dev_t,
        mean=out.mean if return_mean else None,
        x0_hat=out.x0_hat if return_x0_hat else None,
        x1_hat=out.x1_hat if return_x1_hat else None,
        kl=out.kl,
    )


def ode_lookahead(
    x: Tensor, t: float | Tensor, velocity_fn: VelocityFn, num_steps: int = 1, *, v: Tensor | None = None
) -> Tensor:
    """Clean-image estimate after `num_steps` Euler sub-steps to t = 0 (SPEC §4.2)."""
    return reference.ode_lookahead(x, t, velocity_fn, num_steps, v=v)


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
    backend: str | None = None,
):
    """Stepwise advantages `[N, T]` from stepwise rewards `[N, T+1]`; see `reference.gain_advantages`."""
    del backend
    return reference.gain_advantages(
        rewards, group_ids, normalize=normalize, eps=eps, clip=clip, step_mask=step_mask,
        nonfinite=nonfinite, return_stats=return_stats,
    )


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
    backend: str | None = None,
):
    """Flow-GRPO per-prompt advantages; see `reference.group_advantages`."""
    del backend
    return reference.group_advantages(
        rewards, group_ids, std=std, eps=eps, unbiased=unbiased, clip=clip, nonfinite=nonfinite,
        return_stats=return_stats,
    )


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
    """PPO clipped surrogate + beta * KL (SPEC §4.5); see `reference.ppo_loss`."""
    return reference.ppo_loss(log_prob, old_log_prob, advantages, clip_range, kl=kl, beta=beta, mask=mask)
