"""Custom ops `sfgrpo::sde_step` and `sfgrpo::sde_step_backward` (torch.library).

Both take latents flattened to `[B, D]` (contiguous; `sfgrpo.functional.sde_step` reshapes and
validates) and, for t, t', the noise level and sigma_max, per-row float32 `[B]` tensors on the
latents' device or 0-d float32 CPU tensors (one value for every row). Outputs that
were not requested are returned as empty tensors (custom ops cannot return None), and so is the
sample when scoring a given one (an op may not return its own input).

Per device: CPU tensors run the C++ kernels of `sfgrpo._C` (`_sde_step_native`), or the
plain-PyTorch implementation (`_sde_step_torch`, the formulas of `sfgrpo.reference` computing only
what was asked for) with the `reference` backend or without the compiled module, or the Triton
kernels in Triton's interpreter when the `triton` backend is forced; CUDA tensors run the Triton
kernels. `sfgrpo.backend` decides.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sfgrpo import backend
from sfgrpo.ops import _sde_step_native, _sde_step_torch

OP_NAME = "sde_step"
backend.register_op(OP_NAME, "triton", cpu_family="native")

_EMPTY_SHAPE = (0,)


def _empty(like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return like.new_empty(_EMPTY_SHAPE, dtype=dtype)


# ------------------------------------------------------------------------------ forward
@torch.library.custom_op("sfgrpo::sde_step", mutates_args=())
def sde_step_op(
    x: Tensor,
    v: Tensor,
    t: Tensor,
    t_next: Tensor,
    noise_level: Tensor,
    sigma_max: Tensor,
    prev_sample: Optional[Tensor],
    noise: Optional[Tensor],
    v_ref: Optional[Tensor],
    seed: int,
    seed_offset: int,
    use_philox: bool,
    sde_type: str,
    logprob: str,
    reduction: str,
    kl: str,
    write_mean: bool,
    write_x0: bool,
    write_x1: bool,
    backend_name: Optional[str],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (sample, log_prob, std, std_dev_t, mean, x0_hat, x1_hat, kl)."""
    return _run_forward(x, v, t, t_next, noise_level, sigma_max, prev_sample, noise, v_ref, seed, seed_offset,
                        use_philox, sde_type, logprob, reduction, kl, write_mean, write_x0, write_x1, backend_name)


def _implementation(device: torch.device, backend_name: Optional[str]):
    chosen = backend.resolve_backend(OP_NAME, device, backend_name)
    if chosen == "triton":
        from sfgrpo.kernels import sde_step as kernels

        return kernels
    return _sde_step_native if chosen == "native" else _sde_step_torch


def _run_forward(*args):
    *args, backend_name = args
    return _implementation(args[0].device, backend_name).forward(*args)


def _run_backward(*args):
    *args, backend_name = args
    return _implementation(args[0].device, backend_name).backward(*args)


@sde_step_op.register_fake
def _(x, v, t, t_next, noise_level, sigma_max, prev_sample, noise, v_ref, seed, seed_offset,
      use_philox, sde_type, logprob, reduction, kl, write_mean, write_x0, write_x1, backend_name):
    batch = x.shape[0]
    full = lambda flag: x.new_empty(x.shape, dtype=torch.float32) if flag else _empty(x)  # noqa: E731
    rows = lambda: x.new_empty((batch,), dtype=torch.float32)  # noqa: E731
    sample = x.new_empty(x.shape) if prev_sample is None else _empty(x, x.dtype)
    return (sample, rows(), rows(), rows(), full(write_mean), full(write_x0), full(write_x1),
            rows() if v_ref is not None else _empty(x))


# ----------------------------------------------------------------------------- backward
@torch.library.custom_op("sfgrpo::sde_step_backward", mutates_args=())
def sde_step_backward_op(
    x: Tensor,
    v: Tensor,
    sample: Tensor,
    v_ref: Optional[Tensor],
    t: Tensor,
    t_next: Tensor,
    noise_level: Tensor,
    sigma_max: Tensor,
    grad_log_prob: Optional[Tensor],
    grad_kl: Optional[Tensor],
    grad_mean: Optional[Tensor],
    grad_x0: Optional[Tensor],
    grad_x1: Optional[Tensor],
    sde_type: str,
    logprob: str,
    reduction: str,
    kl: str,
    need_dv_ref: bool,
    need_dx: bool,
    backend_name: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dv, dv_ref, dx) in the dtypes of v, v_ref, x (empty when not needed)."""
    return _run_backward(x, v, sample, v_ref, t, t_next, noise_level, sigma_max, grad_log_prob, grad_kl, grad_mean,
                         grad_x0, grad_x1, sde_type, logprob, reduction, kl, need_dv_ref, need_dx, backend_name)


@sde_step_backward_op.register_fake
def _(x, v, sample, v_ref, t, t_next, noise_level, sigma_max, grad_log_prob, grad_kl, grad_mean,
      grad_x0, grad_x1, sde_type, logprob, reduction, kl, need_dv_ref, need_dx, backend_name):
    dv_ref = torch.empty_like(v_ref) if (need_dv_ref and v_ref is not None) else _empty(x)
    return torch.empty_like(v), dv_ref, torch.empty_like(x) if need_dx else _empty(x)


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    (x, v, t, t_next, noise_level, sigma_max, prev_sample, noise, v_ref, seed, seed_offset,
     use_philox, sde_type, logprob, reduction, kl, write_mean, write_x0, write_x1,
     backend_name) = inputs
    sample = output[0] if prev_sample is None else prev_sample
    ctx.save_for_backward(x, v, sample, v_ref, t, t_next, noise_level, sigma_max)
    ctx.options = (sde_type, logprob, reduction, kl, backend_name)
    ctx.has_v_ref = v_ref is not None


def _nonempty(grad: Tensor | None) -> Tensor | None:
    return grad if grad is not None and grad.numel() > 0 else None


def _gradients(ctx, grads, run_backward):
    g_sample, g_log_prob, g_std, g_std_dev_t, g_mean, g_x0, g_x1, g_kl = grads
    x, v, sample, v_ref, t, t_next, noise_level, sigma_max = ctx.saved_tensors
    sde_type, logprob, reduction, kl, backend_name = ctx.options
    need_dv_ref = ctx.has_v_ref and ctx.needs_input_grad[8]
    need_dx = ctx.needs_input_grad[0]
    dv, dv_ref, dx = run_backward(
        x, v, sample, v_ref if ctx.has_v_ref else None, t, t_next, noise_level, sigma_max,
        _nonempty(g_log_prob), _nonempty(g_kl) if ctx.has_v_ref else None, _nonempty(g_mean),
        _nonempty(g_x0), _nonempty(g_x1), sde_type, logprob, reduction, kl, need_dv_ref, need_dx,
        backend_name,
    )
    return (dx if need_dx else None, dv, None, None, None, None, None, None,
            dv_ref if need_dv_ref else None) + (None,) * 11


sde_step_op.register_autograd(lambda ctx, *grads: _gradients(ctx, grads, sde_step_backward_op),
                              setup_context=_setup_context)


class _EagerSdeStep(torch.autograd.Function):
    """The same forward/backward as the custom op, without its dispatch layers: the op's Python
    machinery costs ~0.1-0.7 ms per call, as much as the kernels on realistic latents. Used in
    eager mode; under torch.compile the registered op runs (opaque, no graph break)."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = _run_forward(*inputs)
        _setup_context(ctx, inputs, outputs)
        ctx.mark_non_differentiable(outputs[0], outputs[2], outputs[3])
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        return _gradients(ctx, grads, _run_backward)


def sde_step(*inputs):
    """Runs `sfgrpo::sde_step` (same arguments): the registered op when compiling, the lean
    autograd.Function otherwise. Both call the same kernels."""
    if torch.compiler.is_compiling():
        return sde_step_op(*inputs)
    return _EagerSdeStep.apply(*inputs)
