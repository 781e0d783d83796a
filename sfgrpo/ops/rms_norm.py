"""Custom ops `sfgrpo::rms_norm` and `sfgrpo::rms_norm_backward` (torch.library).

`x` of any rank normalised over its last dim. Layout: when x's rows lie one after another in memory
(the last dim has stride 1 and x is dense under some order of its other dims: contiguous, or the
`q.view(B, N, H, D).transpose(1, 2)` that diffusers' attention processors hand to `norm_q`) the
kernels run over memory in order with no copy and the output takes x's strides; any other layout
is copied once with `.contiguous()`. Incoming gradients with another layout than x are read in
place by the kernels when three strides address their rows (the slice of the attention's joint
gradient a QK norm gets back), else copied once into x's layout. The output dtype is decided by
the caller (`sfgrpo.functional.rms_norm`: diffusers' rule, or the autocast dtype) and passed in,
so the op itself never looks at autocast state.

Per device (`sfgrpo.backend`): CUDA tensors run the Triton kernels (`sfgrpo.kernels.rms_norm`),
CPU tensors the reference (`sfgrpo.reference.rms_norm`, diffusers' code), the `triton` backend on
CPU the kernels in Triton's interpreter. Rows wider than the kernels' one tile (D > MAX_D) run the
reference on every device.

In eager mode `rms_norm` skips the op's dispatch layers (as `sde_step` does): the kernels directly,
inside a lean autograd.Function when a gradient is needed; the reference path runs diffusers' own
expressions under autograd (bit-exact forward and backward, traced as they are by torch.compile).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sfgrpo import backend, reference

OP_NAME = "rms_norm"
backend.register_op(OP_NAME, "triton")


# ------------------------------------------------------------------------------- layouts
def rows_in_memory_order(x: Tensor) -> bool:
    """Whether row r of x (over its last dim) is the r-th run of D elements in memory: the last dim
    has stride 1 and the other dims (size-1 ones aside, their strides mean nothing) are dense in
    some order, each stride the product of the sizes inside it."""
    if x.is_contiguous():
        return True
    D = x.shape[-1]
    if D != 1 and x.stride(-1) != 1:
        return False
    expected = D
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride()[:-1], x.shape[:-1]) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _rows(x: Tensor) -> Tensor:
    return x if rows_in_memory_order(x) else x.contiguous()


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return all(sa == sb for sa, sb, size in zip(a.stride(), b.stride(), a.shape) if size != 1)


def row_map(grad: Tensor, x: Tensor):
    """How the kernels read `grad` (x's shape, another layout) row by row without a copy: x's rows
    are in memory order (`rows_in_memory_order`); returns ((S0, S1, S2), (ST0, ST1, ST2)) such that
    x's row r is grad's row at (r // (S1 S2)) ST0 + (r // S2 % S1) ST1 + (r % S2) ST2, or None when
    grad's rows need more than three strides (or its last dim is not unit-stride). The incoming
    gradient of a QK norm is such a slice: the attention's joint gradient narrowed to one stream."""
    if grad.shape[-1] > 1 and grad.stride(-1) != 1:
        return None
    dims = sorted((d for d in range(x.ndim - 1) if x.shape[d] != 1), key=x.stride, reverse=True)
    merged: list[list[int]] = []  # [size, stride], outermost first
    for d in dims:
        size, stride = x.shape[d], grad.stride(d)
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if len(merged) > 3:
        return None
    merged = [[1, 0]] * (3 - len(merged)) + merged
    return tuple(m[0] for m in merged), tuple(m[1] for m in merged)


def _like(grad: Tensor, x: Tensor) -> Tensor:
    """`grad` laid out like x (x already in memory-order rows): itself, or one copy."""
    if _same_layout(grad, x):
        return grad
    return torch.empty_like(x, dtype=grad.dtype).copy_(grad)


# ------------------------------------------------------------------------- implementations
class _Reference:
    """The CPU path: the reference, its outputs laid out as the kernels' (`empty_like(x)`), which
    is what the fake impls promise."""

    @staticmethod
    def forward(x: Tensor, weight: Optional[Tensor], eps: float, out_dtype: torch.dtype) -> Tensor:
        y = reference.rms_norm(x, weight, eps, out_dtype=out_dtype)
        return y if _same_layout(y, x) else torch.empty_like(x, dtype=out_dtype).copy_(y)

    @staticmethod
    def backward(dy, x, weight, eps, need_dx, need_dw):
        dx, dw = reference.rms_norm_backward(dy, x, weight, eps, need_dx, need_dw)
        if dx is not None and not _same_layout(dx, x):
            dx = torch.empty_like(x).copy_(dx)
        return dx, dw


def _implementation(x: Tensor, backend_name: Optional[str]):
    if backend.resolve_backend(OP_NAME, x.device, backend_name) == "triton":
        kernels = backend.kernel_module("rms_norm")
        if x.shape[-1] <= kernels.MAX_D:
            return kernels
    return _Reference


# ------------------------------------------------------------------------------ forward
@torch.library.custom_op("sfgrpo::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, weight: Optional[Tensor], eps: float, out_dtype: torch.dtype,
                backend_name: Optional[str]) -> Tensor:
    """-> x normalised over its last dim, in `out_dtype`, laid out like `_rows(x)`."""
    x = _rows(x)
    return _implementation(x, backend_name).forward(x, weight, eps, out_dtype)


@rms_norm_op.register_fake
def _(x, weight, eps, out_dtype, backend_name):
    return torch.empty_like(_rows(x), dtype=out_dtype)


@torch.library.custom_op("sfgrpo::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], eps: float, need_dx: bool,
                         need_dw: bool, backend_name: Optional[str]) -> tuple[Tensor, Tensor]:
    """-> (dx laid out like `_rows(x)`, dweight); empty where not needed (custom ops return tensors)."""
    dx, dw = _backward(dy, x, weight, eps, need_dx, need_dw, _implementation(x, backend_name))
    return (dx if dx is not None else x.new_empty((0,)),
            dw if dw is not None else x.new_empty((0,), dtype=torch.float32))


@rms_norm_backward_op.register_fake
def _(dy, x, weight, eps, need_dx, need_dw, backend_name):
    dx = torch.empty_like(_rows(x)) if need_dx else x.new_empty((0,))
    dw = torch.empty_like(weight) if (need_dw and weight is not None) else x.new_empty((0,), dtype=torch.float32)
    return dx, dw


def _backward(dy, x, weight, eps, need_dx, need_dw, implementation):
    x = _rows(x)
    need_dw = need_dw and weight is not None
    if implementation is not _Reference and not _same_layout(dy, x):
        rows = row_map(dy, x)
        if rows is not None:  # read in place (a slice of the attention's joint gradient): no copy
            return implementation.backward(dy, x, weight, eps, need_dx, need_dw, dy_rows=rows)
    return implementation.backward(_like(dy, x), x, weight, eps, need_dx, need_dw)


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, weight, eps, _, backend_name = inputs
    ctx.save_for_backward(x, weight)
    ctx.options = (eps, backend_name)


def _op_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    eps, backend_name = ctx.options
    need_dx, need_dw = ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1]
    dx, dw = rms_norm_backward_op(dy, x, weight, eps, need_dx, need_dw, backend_name)
    return dx if need_dx else None, dw if need_dw else None, None, None, None


rms_norm_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerRmsNorm(torch.autograd.Function):
    """The op's forward and backward without its dispatch layers; `call` is (eps, out_dtype, the
    implementation module), so backward runs the implementation the forward ran."""

    @staticmethod
    def forward(ctx, x, weight, call):
        eps, out_dtype, implementation = call
        ctx.save_for_backward(x, weight)
        ctx.call = call
        return implementation.forward(_rows(x), weight, eps, out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        eps, _, implementation = ctx.call
        need_dx, need_dw = ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1]
        dx, dw = _backward(dy, x, weight, eps, need_dx, need_dw, implementation)
        return dx, dw, None


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float, out_dtype: torch.dtype,
             backend_name: Optional[str]) -> Tensor:
    """Runs `sfgrpo::rms_norm` (same arguments): the registered op when compiling, else the
    implementation directly, inside a lean autograd.Function when a gradient is needed."""
    if torch.compiler.is_compiling():
        if backend.traced_reference(x.device, backend_name):
            return reference.rms_norm(x, weight, eps, out_dtype=out_dtype)
        return rms_norm_op(x, weight, eps, out_dtype, backend_name)
    implementation = _implementation(x, backend_name)
    if implementation is _Reference:
        # diffusers' own code under autograd: the same forward and backward bits as the module it
        # replaces (the op's written-out fp32 backward is for the registered op only)
        return reference.rms_norm(x, weight, eps, out_dtype=out_dtype)
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return _EagerRmsNorm.apply(x, weight, (eps, out_dtype, implementation))
    return implementation.forward(_rows(x), weight, eps, out_dtype)
