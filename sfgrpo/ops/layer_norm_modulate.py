"""Custom ops `sfgrpo::layer_norm_modulate` and `sfgrpo::layer_norm_modulate_backward`.

adaLN modulation `layer_norm(x) * (1 + scale[b]) + shift[b]` (reference.layer_norm_modulate). The
ops take x as `[B, N, C]` with unit last stride and scale / shift as `[B, C]` with unit last stride
and any row stride (`sfgrpo.functional.layer_norm_modulate` reshapes and validates), plus the
output dtype and whether autocast was on at the call: the op runs the expression under exactly
that autocast state whatever the state around it (compiled graphs, the backward), so the
reference path is bit-identical to the eager expression under the caller's autocast, and its
backward to autograd's through that expression (reference.layer_norm_modulate_backward).

Per device (`sfgrpo.backend`): CUDA tensors run the Triton kernels, CPU tensors the reference, the
`triton` backend on CPU the kernels in Triton's interpreter. Rows wider than the kernels' MAX_C and
float64 run the reference whatever the backend (the kernels store fp32 / bf16 / fp16 only).

In eager mode the op's dispatch layers are skipped, as for the SDE step: the kernels run directly,
inside a lean autograd.Function when a gradient is needed; the reference path is the expression
itself under autograd (and, on CPU under torch.compile, traced as it is).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sfgrpo import backend, reference

OP_NAME = "layer_norm_modulate"
backend.register_op(OP_NAME, "triton")


# ------------------------------------------------------------------------ implementations
class _Reference:
    """The reference expression under the caller's autocast state, and autograd's backward of it."""

    @staticmethod
    def forward(x, scale, shift, eps, out_dtype, autocast):
        with torch.autocast(x.device.type, dtype=out_dtype if autocast else None, enabled=autocast):
            # contiguous like the kernels' output (and the fake's); a no-op for the contiguous x
            # that functional passes unless its rows are strided
            return reference.layer_norm_modulate(x, scale, shift, eps).to(out_dtype).contiguous()

    @staticmethod
    def backward(grad, x, scale, shift, eps, out_dtype, autocast, need_dx, need_dscale, need_dshift):
        # autograd's own bits (reference.layer_norm_modulate_backward): under autocast LayerNorm
        # ran on x cast to the dtype autocast picks for it on this device (fp32 on CUDA, the
        # autocast dtype on CPU), which a one-element probe reads off the autocast policy
        x_ln = x
        if autocast:
            with torch.autocast(x.device.type, dtype=out_dtype):
                x_ln = x.to(torch.nn.functional.layer_norm(x.new_zeros(1), (1,)).dtype)
        dx, dscale, dshift = reference.layer_norm_modulate_backward(
            grad, x_ln, scale, shift, eps, need_dx, need_dscale, need_dshift)
        return None if dx is None else dx.to(x.dtype), dscale, dshift


class _Kernels:
    """The Triton kernels (fp32 math); dscale / dshift come back as fp32 and take the inputs' dtype here."""

    @staticmethod
    def forward(x, scale, shift, eps, out_dtype, autocast):
        kernels = backend.kernel_module("layer_norm_modulate")
        return kernels.forward(x, scale, shift, eps, out_dtype)

    @staticmethod
    def backward(grad, x, scale, shift, eps, out_dtype, autocast, need_dx, need_dscale, need_dshift):
        kernels = backend.kernel_module("layer_norm_modulate")
        dx, dscale, dshift = kernels.backward(grad, x, scale, eps, need_dx, need_dscale, need_dshift)
        return (dx, None if dscale is None else dscale.to(scale.dtype),
                None if dshift is None else dshift.to(shift.dtype))


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernels_run(op_name: str, tensors, out_dtypes, backend_name: Optional[str]) -> bool:
    """Whether the Triton kernels of a row-in-registers op (this one, the gated residual) run on
    `tensors` (the first one `[..., C]`; None entries ignored): the backend picks Triton, and the
    rows fit a program's registers and every dtype is one the kernels store; else the reference,
    with no error (wider rows, float64)."""
    if backend.resolve_backend(op_name, tensors[0].device, backend_name) != "triton":
        return False
    kernels = backend.kernel_module("layer_norm_modulate")
    if not kernels.supports(tensors[0].shape[-1]):
        return False
    for dtype in out_dtypes:  # loops, not all() over generators: this runs on every call
        if dtype not in _KERNEL_DTYPES:
            return False
    for tensor in tensors:
        if tensor is not None and tensor.dtype not in _KERNEL_DTYPES:
            return False
    return True


def _implementation(x: Tensor, scale: Tensor, shift: Tensor, out_dtype: torch.dtype, backend_name: Optional[str]):
    return _Kernels if kernels_run(OP_NAME, (x, scale, shift), (out_dtype,), backend_name) else _Reference


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _contiguous(like: Tensor) -> Tensor:
    """A fake output of `like`'s shape and dtype, contiguous (not `empty_like`: that keeps the
    strides of a dense permuted input, which the kernels' and the reference's outputs do not)."""
    return like.new_empty(like.shape)


# ------------------------------------------------------------------------------ forward
@torch.library.custom_op("sfgrpo::layer_norm_modulate", mutates_args=())
def layer_norm_modulate_op(x: Tensor, scale: Tensor, shift: Tensor, eps: float, out_dtype: torch.dtype,
                           autocast: bool, backend_name: Optional[str]) -> Tensor:
    """-> y `[B, N, C]` contiguous in `out_dtype`."""
    return _implementation(x, scale, shift, out_dtype, backend_name).forward(x, scale, shift, eps, out_dtype, autocast)


@layer_norm_modulate_op.register_fake
def _(x, scale, shift, eps, out_dtype, autocast, backend_name):
    return x.new_empty(x.shape, dtype=out_dtype)


# ----------------------------------------------------------------------------- backward
@torch.library.custom_op("sfgrpo::layer_norm_modulate_backward", mutates_args=())
def layer_norm_modulate_backward_op(grad: Tensor, x: Tensor, scale: Tensor, shift: Tensor, eps: float,
                                    out_dtype: torch.dtype, autocast: bool, need_dx: bool, need_dscale: bool,
                                    need_dshift: bool, backend_name: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx, dscale, dshift) in the dtypes and shapes of x, scale, shift (empty when not needed)."""
    outputs = _implementation(x, scale, shift, out_dtype, backend_name).backward(
        grad, x, scale, shift, eps, out_dtype, autocast, need_dx, need_dscale, need_dshift)
    # a fresh tensor each: a custom op may not return its input or one tensor twice; contiguous,
    # as the fake promises, whatever the layouts of x and grad
    return tuple(_empty(x) if out is None else out.contiguous() for out in outputs)


@layer_norm_modulate_backward_op.register_fake
def _(grad, x, scale, shift, eps, out_dtype, autocast, need_dx, need_dscale, need_dshift, backend_name):
    return (_contiguous(x) if need_dx else _empty(x), _contiguous(scale) if need_dscale else _empty(x),
            _contiguous(shift) if need_dshift else _empty(x))


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, scale, shift, eps, out_dtype, autocast, backend_name = inputs
    ctx.save_for_backward(x, scale, shift)
    ctx.options = (eps, out_dtype, autocast, backend_name)


def _op_gradients(ctx, grad):
    x, scale, shift = ctx.saved_tensors
    eps, out_dtype, autocast, backend_name = ctx.options
    need = ctx.needs_input_grad[:3]
    dx, dscale, dshift = layer_norm_modulate_backward_op(grad, x, scale, shift, eps, out_dtype, autocast, *need,
                                                         backend_name)
    return (dx if need[0] else None, dscale if need[1] else None, dshift if need[2] else None, None, None, None, None)


layer_norm_modulate_op.register_autograd(_op_gradients, setup_context=_setup_context)


class _EagerLayerNormModulate(torch.autograd.Function):
    """The op's forward and backward without its dispatch layers; `call` is (eps, out_dtype,
    autocast, implementation), so the backward runs what the forward ran."""

    @staticmethod
    def forward(ctx, x, scale, shift, call):
        eps, out_dtype, autocast, implementation = call
        ctx.save_for_backward(x, scale, shift)
        ctx.call = call
        return implementation.forward(x, scale, shift, eps, out_dtype, autocast)

    @staticmethod
    def backward(ctx, grad):
        x, scale, shift = ctx.saved_tensors
        eps, out_dtype, autocast, implementation = ctx.call
        return (*implementation.backward(grad, x, scale, shift, eps, out_dtype, autocast, *ctx.needs_input_grad[:3]),
                None)


def layer_norm_modulate(x: Tensor, scale: Tensor, shift: Tensor, eps: float, out_dtype: torch.dtype,
                        autocast: bool, backend_name: Optional[str]) -> Tensor:
    """Runs `sfgrpo::layer_norm_modulate` (same arguments): the registered op when compiling, else
    the implementation directly, inside a lean autograd.Function when a gradient is needed."""
    if torch.compiler.is_compiling():
        if backend.traced_reference(x.device, backend_name):
            return reference.layer_norm_modulate(x, scale, shift, eps)
        return layer_norm_modulate_op(x, scale, shift, eps, out_dtype, autocast, backend_name)
    implementation = _implementation(x, scale, shift, out_dtype, backend_name)
    if implementation is _Reference:
        # diffusers' expression under autograd: the module's own forward and backward bits (the
        # written-out backward above serves the registered op)
        return reference.layer_norm_modulate(x, scale, shift, eps)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad):
        return _EagerLayerNormModulate.apply(x, scale, shift, (eps, out_dtype, autocast, implementation))
    return implementation.forward(x, scale, shift, eps, out_dtype, autocast)
