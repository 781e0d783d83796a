"""Custom ops `sfgrpo::qk_norm_rope` and `sfgrpo::qk_norm_rope_backward` (torch.library).

FLUX attention's per-head RMSNorm of q / k followed by diffusers' rotary embedding
(`reference.qk_norm_rope`), or the rotation alone. x is `[B, N, H, D]` with any strides whose
channel stride is 1 (read in place: a slice of a joint sequence, a transposed view); other layouts
are copied once. cos / sin `[N, D]`, channel stride 1. The output is a new contiguous
`[B, N, H, D]` tensor, dx too. The caller (`sfgrpo.functional.qk_norm_rope`) decides the
intermediate and output dtypes, so the op itself never looks at autocast state.

Per device (`sfgrpo.backend`): CUDA tensors run the Triton kernels (`sfgrpo.kernels.qk_norm_rope`),
CPU tensors the reference (torch's rms_norm and diffusers' rotation, op for op), the `triton`
backend on CPU the kernels in Triton's interpreter. Head dims wider than the kernels' tile run the
reference everywhere. In eager mode the kernels run directly, inside a lean autograd.Function when
a gradient is needed (as `rms_norm` does); the reference path runs the reference under autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sfgrpo import backend, reference

OP_NAME = "qk_norm_rope"
backend.register_op(OP_NAME, "triton")


def _unit_channel_stride(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin as the kernels read them: channel stride 1 and one row stride for both (a table
    sliced from a wider one, or a broadcast row, is copied once: tables are [N, D], small)."""
    cos, sin = _unit_channel_stride(cos), _unit_channel_stride(sin)
    if cos.shape[0] > 1 and cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def _contiguous_out(y: Tensor) -> Tensor:
    return y if y.is_contiguous() else y.contiguous()


# ------------------------------------------------------------------------- implementations
class _Reference:
    """The CPU path: the reference, its outputs contiguous (what the fake impls promise)."""

    @staticmethod
    def forward(x, cos, sin, weight, eps, norm_dtype, out_dtype):
        return _contiguous_out(reference.qk_norm_rope(x, cos, sin, weight, eps, out_dtype=out_dtype))

    @staticmethod
    def backward(g, x, cos, sin, weight, eps, need_dx, need_dw):
        dx, dw = reference.qk_norm_rope_backward(g, x, cos, sin, weight, eps, need_dx, need_dw)
        return (None if dx is None else _contiguous_out(dx)), dw


def _implementation(x: Tensor, backend_name: Optional[str]):
    if backend.resolve_backend(OP_NAME, x.device, backend_name) == "triton":
        kernels = backend.kernel_module("qk_norm_rope")
        if x.shape[-1] <= kernels.MAX_D:
            return kernels
    return _Reference


def _eps(eps: float, normalize: bool) -> Optional[float]:
    return eps if normalize else None


# ------------------------------------------------------------------------------ forward
@torch.library.custom_op("sfgrpo::qk_norm_rope", mutates_args=())
def qk_norm_rope_op(x: Tensor, cos: Tensor, sin: Tensor, weight: Optional[Tensor], eps: float, normalize: bool,
                    norm_dtype: torch.dtype, out_dtype: torch.dtype, backend_name: Optional[str]) -> Tensor:
    """-> rotate(rms_norm(x)) (or rotate(x)), contiguous `[B, N, H, D]` in `out_dtype`."""
    x, (cos, sin) = _unit_channel_stride(x), _tables(cos, sin)
    return _implementation(x, backend_name).forward(x, cos, sin, weight, _eps(eps, normalize), norm_dtype, out_dtype)


@qk_norm_rope_op.register_fake
def _(x, cos, sin, weight, eps, normalize, norm_dtype, out_dtype, backend_name):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("sfgrpo::qk_norm_rope_backward", mutates_args=())
def qk_norm_rope_backward_op(g: Tensor, x: Tensor, cos: Tensor, sin: Tensor, weight: Optional[Tensor], eps: float,
                             normalize: bool, need_dx: bool, need_dw: bool,
                             backend_name: Optional[str]) -> tuple[Tensor, Tensor]:
    """-> (dx contiguous, dweight); empty where not needed (custom ops return tensors)."""
    dx, dw = _backward(g, x, cos, sin, weight, _eps(eps, normalize), need_dx, need_dw,
                       _implementation(x, backend_name))
    return (dx if dx is not None else x.new_empty((0,)),
            dw if dw is not None else x.new_empty((0,), dtype=torch.float32))


@qk_norm_rope_backward_op.register_fake
def _(g, x, cos, sin, weight, eps, normalize, need_dx, need_dw, backend_name):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    need_dw = need_dw and normalize and weight is not None
    dw = torch.empty_like(weight) if need_dw else x.new_empty((0,), dtype=torch.float32)
    return dx, dw


def _backward(g, x, cos, sin, weight, eps, need_dx, need_dw, implementation):
    x, g, (cos, sin) = _unit_channel_stride(x), _unit_channel_stride(g), _tables(cos, sin)
    return implementation.backward(g, x, cos, sin, weight, eps, need_dx,
                                   need_dw and eps is not None and weight is not None)


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, cos, sin, weight, eps, normalize, _, _, backend_name = inputs
    ctx.save_for_backward(x, cos, sin, weight)
    ctx.options = (eps, normalize, backend_name)


def _op_backward(ctx, g):
    x, cos, sin, weight = ctx.saved_tensors
    eps, normalize, backend_name = ctx.options
    need_dx = ctx.needs_input_grad[0]
    need_dw = normalize and weight is not None and ctx.needs_input_grad[3]
    dx, dw = qk_norm_rope_backward_op(g, x, cos, sin, weight, eps, normalize, need_dx, need_dw, backend_name)
    return dx if need_dx else None, None, None, dw if need_dw else None, None, None, None, None, None


qk_norm_rope_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerQkNormRope(torch.autograd.Function):
    """The op's forward and backward without its dispatch layers; `call` is (eps or None,
    norm_dtype, out_dtype, the implementation module), so backward runs what the forward ran."""

    @staticmethod
    def forward(ctx, x, weight, cos, sin, call):
        eps, norm_dtype, out_dtype, implementation = call
        x, (cos, sin) = _unit_channel_stride(x), _tables(cos, sin)
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.call = call
        return implementation.forward(x, cos, sin, weight, eps, norm_dtype, out_dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight, cos, sin = ctx.saved_tensors
        eps, _, _, implementation = ctx.call
        need_dx = ctx.needs_input_grad[0]
        need_dw = eps is not None and weight is not None and ctx.needs_input_grad[1]
        dx, dw = _backward(g, x, cos, sin, weight, eps, need_dx, need_dw, implementation)
        return dx, dw, None, None, None


def qk_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, weight: Optional[Tensor], eps: Optional[float],
                 norm_dtype: torch.dtype, out_dtype: torch.dtype, backend_name: Optional[str]) -> Tensor:
    """Runs `sfgrpo::qk_norm_rope` (eps None: the rotation only): the registered op when compiling,
    else the implementation directly, inside a lean autograd.Function when a gradient is needed."""
    normalize = eps is not None
    if torch.compiler.is_compiling():
        if backend.traced_reference(x.device, backend_name):
            return reference.qk_norm_rope(x, cos, sin, weight, eps, out_dtype=out_dtype)
        return qk_norm_rope_op(x, cos, sin, weight, float(eps or 0.0), normalize, norm_dtype, out_dtype,
                               backend_name)
    implementation = _implementation(x, backend_name)
    if implementation is _Reference:
        # torch's and diffusers' own expressions under autograd: the bits of the modules replaced
        return reference.qk_norm_rope(x, cos, sin, weight, eps, out_dtype=out_dtype)
    if torch.is_grad_enabled() and (x.requires_grad or (normalize and weight is not None and weight.requires_grad)):
        return _EagerQkNormRope.apply(x, weight, cos, sin, (eps, norm_dtype, out_dtype, implementation))
    return implementation.forward(_unit_channel_stride(x), *_tables(cos, sin), weight, eps, norm_dtype, out_dtype)
