"""Custom ops `sfgrpo::sde_step` and `sfgrpo::sde_step_backward` (torch.library).

Both take latents flattened to `[B, D]` (contiguous; `sde_step` below flattens them, except for the
eager Triton path, which reads contiguous latents of any rank; `sfgrpo.functional.sde_step`
validates) and, for t, t', the noise level and sigma_max, per-row float32 `[B]` tensors on the
latents' device or 0-d float32 CPU tensors (one value for every row). Outputs that
were not requested are returned as empty tensors (custom ops cannot return None), and so is the
sample when scoring a given one (an op may not return its own input).

In eager mode `sde_step` skips the op's dispatch layers (their Python costs as much as the kernels
on training-size latents): it takes Python numbers for the step values as they are, returns None
for what was not asked for, and runs the implementation directly when nothing needs a gradient.

Per device: CPU tensors run the C++ kernels of `sfgrpo._C` (`_sde_step_native`), or the
plain-PyTorch implementation (`_sde_step_torch`, the formulas of `sfgrpo.reference` computing only
what was asked for) with the `reference` backend or without the compiled module, or the Triton
kernels in Triton's interpreter when the `triton` backend is forced; CUDA tensors run the Triton
kernels. `sfgrpo.backend` decides.
"""

from __future__ import annotations

import math
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


def _or_empty(outputs: tuple, like: Tensor, first_dtype: torch.dtype) -> tuple:
    """The implementations' None outputs as fresh empty tensors (a custom op returns tensors, none
    aliasing another): the first in `first_dtype`, the rest float32."""
    return tuple(
        out if out is not None else _empty(like, first_dtype if i == 0 else torch.float32)
        for i, out in enumerate(outputs)
    )


def _row_tensor(value):
    """A step value for the registered op: numbers become 0-d float32 CPU tensors."""
    return value if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float32)


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
    outputs = _implementation(x.device, backend_name).forward(
        x, v, t, t_next, noise_level, sigma_max, prev_sample, noise, v_ref, seed, seed_offset, use_philox,
        sde_type, logprob, reduction, kl, write_mean, write_x0, write_x1)
    return _or_empty(outputs, x, x.dtype)


def _implementation(device: torch.device, backend_name: Optional[str]):
    chosen = backend.resolve_backend(OP_NAME, device, backend_name)
    if chosen == "triton":
        return backend.kernel_module("sde_step")
    return _sde_step_native if chosen == "native" else _sde_step_torch


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
    outputs = _implementation(x.device, backend_name).backward(
        x, v, sample, v_ref, t, t_next, noise_level, sigma_max, grad_log_prob, grad_kl, grad_mean, grad_x0,
        grad_x1, sde_type, logprob, reduction, kl, need_dv_ref, need_dx)
    return _or_empty(outputs, x, torch.float32)


@sde_step_backward_op.register_fake
def _(x, v, sample, v_ref, t, t_next, noise_level, sigma_max, grad_log_prob, grad_kl, grad_mean,
      grad_x0, grad_x1, sde_type, logprob, reduction, kl, need_dv_ref, need_dx, backend_name):
    dv_ref = torch.empty_like(v_ref) if (need_dv_ref and v_ref is not None) else _empty(x)
    return torch.empty_like(v), dv_ref, torch.empty_like(x) if need_dx else _empty(x)


# ----------------------------------------------------------------------------- autograd
_ROWS = slice(2, 6)  # t, t_next, noise_level, sigma_max among the forward's inputs


def _setup_context(ctx, inputs, output):
    (x, v, t, t_next, noise_level, sigma_max, prev_sample, noise, v_ref, seed, seed_offset,
     use_philox, sde_type, logprob, reduction, kl, write_mean, write_x0, write_x1,
     backend_name) = inputs
    sample = output[0] if prev_sample is None else prev_sample
    rows = (t, t_next, noise_level, sigma_max)
    # step values that are numbers (eager calls) stay on ctx: only tensors can be saved. The two
    # common cases (all numbers, all tensors) skip the per-value bookkeeping of a mix
    row_tensors = [r for r in rows if isinstance(r, Tensor)]
    ctx.save_for_backward(x, v, sample, v_ref, *row_tensors)
    if not row_tensors:
        ctx.row_numbers = rows
    elif len(row_tensors) == len(rows):
        ctx.row_numbers = None
    else:
        ctx.row_numbers = tuple(None if isinstance(r, Tensor) else r for r in rows)
    ctx.options = (sde_type, logprob, reduction, kl, backend_name)
    ctx.has_v_ref = v_ref is not None
    # outputs without a gradient (the std rows always, often the KL) stay None in the backward
    # instead of zero tensors: each would be a fill kernel per backward, read by nothing
    ctx.set_materialize_grads(False)


def _nonempty(grad: Tensor | None) -> Tensor | None:
    return grad if grad is not None and grad.numel() > 0 else None


def _gradients(ctx, grads, need_dx: bool, need_dv_ref: bool, run_backward) -> tuple:
    """-> (dx, dv, dv_ref), None where not needed."""
    g_sample, g_log_prob, g_std, g_std_dev_t, g_mean, g_x0, g_x1, g_kl = grads
    x, v, sample, v_ref, *row_tensors = ctx.saved_tensors
    numbers = ctx.row_numbers
    if numbers is None:
        t, t_next, noise_level, sigma_max = row_tensors
    elif not row_tensors:
        t, t_next, noise_level, sigma_max = numbers
    else:
        row_tensors = iter(row_tensors)
        t, t_next, noise_level, sigma_max = (next(row_tensors) if n is None else n for n in numbers)
    sde_type, logprob, reduction, kl, backend_name = ctx.options
    need_dv_ref = ctx.has_v_ref and need_dv_ref
    dv, dv_ref, dx = run_backward(
        x, v, sample, v_ref if ctx.has_v_ref else None, t, t_next, noise_level, sigma_max,
        _nonempty(g_log_prob), _nonempty(g_kl) if ctx.has_v_ref else None, _nonempty(g_mean),
        _nonempty(g_x0), _nonempty(g_x1), sde_type, logprob, reduction, kl, need_dv_ref, need_dx,
        backend_name,
    )
    return dx if need_dx else None, dv, dv_ref if need_dv_ref else None


def _op_gradients(ctx, *grads):
    dx, dv, dv_ref = _gradients(ctx, grads, ctx.needs_input_grad[0], ctx.needs_input_grad[8], sde_step_backward_op)
    return (dx, dv, None, None, None, None, None, None, dv_ref) + (None,) * 11


sde_step_op.register_autograd(_op_gradients, setup_context=_setup_context)


class _EagerSdeStep(torch.autograd.Function):
    """The same forward/backward as the custom op, without its dispatch layers. Autograd sees only
    the differentiable inputs (its per-argument bookkeeping costs); `call` is (the op's inputs with
    the implementation module in the backend name's place, so backward runs the one the forward
    ran). Outputs that were not asked for are None."""

    @staticmethod
    def forward(ctx, x, v, v_ref, call):
        implementation = call[-1]
        outputs = implementation.forward(*call[:-1], for_backward=True)
        _setup_context(ctx, call, outputs)
        ctx.mark_non_differentiable(*(out for out in (outputs[0], outputs[2], outputs[3]) if out is not None))
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        dx, dv, dv_ref = _gradients(ctx, grads, ctx.needs_input_grad[0], ctx.needs_input_grad[2],
                                    lambda *args: args[-1].backward(*args[:-1]))
        return dx, dv, dv_ref, None


_LATENTS = (0, 1, 6, 7, 8)  # x, v, prev_sample, noise, v_ref among the forward's inputs


def rows(x: Tensor) -> Tensor:
    """`[B, ...]` -> contiguous `[B, D]` (a copy only when the layout needs one). The contiguous
    case is a bare view (~0.8 us; reshape + contiguous ~1.5 us)."""
    if x.is_contiguous():
        if x.ndim == 2:
            return x
        if x.shape[0]:  # view(B, -1) cannot infer D of an empty batch
            return x.view(x.shape[0], -1)
    return x.reshape(x.shape[0], math.prod(x.shape[1:])).contiguous()


def _flattened(inputs: tuple) -> tuple:
    """The latents as contiguous `[B, D]`: what the registered op and the C++ / PyTorch
    implementations take."""
    inputs = list(inputs)
    for i in _LATENTS:
        if inputs[i] is not None:
            inputs[i] = rows(inputs[i])
    return tuple(inputs)


def _as_given(inputs: tuple, implementation) -> bool:
    """Whether `implementation` takes the latents as they are: the Triton kernels read any rank of
    contiguous latents, so the eager path skips the `[B, D]` views."""
    if not getattr(implementation, "ANY_RANK", False):
        return False
    for i in _LATENTS:
        if inputs[i] is not None and not inputs[i].is_contiguous():
            return False
    return True


def sde_step(*inputs):
    """Runs `sfgrpo::sde_step` (same arguments, latents of any rank; step values may also be Python
    numbers): the registered op when compiling, else the implementation directly, inside a lean
    autograd.Function when a gradient is needed. All call the same kernels. The outputs are `[B, D]`
    or, from the Triton kernels given contiguous latents, shaped like x."""
    if torch.compiler.is_compiling():
        inputs = _flattened(inputs)
        return sde_step_op(*inputs[:2], *(_row_tensor(r) for r in inputs[_ROWS]), *inputs[6:])
    implementation = _implementation(inputs[0].device, inputs[-1])
    if not _as_given(inputs, implementation):
        inputs = _flattened(inputs)
    x, v, v_ref = inputs[0], inputs[1], inputs[8]
    if torch.is_grad_enabled() and (v.requires_grad or x.requires_grad or (v_ref is not None and v_ref.requires_grad)):
        return _EagerSdeStep.apply(x, v, v_ref, (*inputs[:-1], implementation))
    return implementation.forward(*inputs[:-1])
