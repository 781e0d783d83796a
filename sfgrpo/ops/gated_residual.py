"""Custom ops `sfgrpo::gated_residual` and `sfgrpo::gated_residual_layer_norm_modulate` (+ backwards).

The elementwise tail of diffusers' SD3 / FLUX transformer blocks: `h + gate[b] * y` (the attention
or MLP output gated into the residual stream), and the same fused with the following norm2 and
MLP modulation, `(h_out, layer_norm_modulate(h_out, scale, shift))` (reference.gated_residual,
reference.gated_residual_layer_norm_modulate). The ops take h, y as `[B, N, C]` with unit last
stride and gate / scale / shift as `[B, C]` with unit last stride and any row stride
(`sfgrpo.functional` reshapes and validates); the fused op also takes the normed output's dtype and
whether autocast was on at the call, as `sfgrpo::layer_norm_modulate` does (its reference
implementation is reused for that half, so the autocast handling is the same).

Per device (`sfgrpo.backend`, op name "gated_residual" for both): CUDA tensors run the Triton
kernels (`sfgrpo.kernels.gated_residual`), CPU tensors the reference, the `triton` backend on CPU
the kernels in Triton's interpreter. Rows wider than the kernels' MAX_C and float64 run the
reference whatever the backend.

In eager mode the ops' dispatch layers are skipped: the kernels run directly, inside a lean
autograd.Function when a gradient is needed; the reference path is the expression itself under
autograd (bit-exact forward and backward of diffusers' code) and, on CPU under torch.compile,
traced as it is.

The fused backward reads the saved h_out instead of recomputing it (see kernels/gated_residual.py:
h_out is alive anyway as the next block's input, and its bits are what the LayerNorm read).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sfgrpo import backend, reference
from sfgrpo.ops import layer_norm_modulate as layer_norm_modulate_ops

OP_NAME = "gated_residual"
backend.register_op(OP_NAME, "triton")


def residual_dtype(h: Tensor, y: Tensor, gate: Tensor) -> torch.dtype:
    """The eager expression's dtype: promote(h, promote(gate, y))."""
    return torch.promote_types(h.dtype, torch.promote_types(gate.dtype, y.dtype))


# ------------------------------------------------------------------------ implementations
class _Reference:
    """The reference expressions (under the caller's autocast state for the norm), and their
    backward written out op for op (autograd's formulas: the op's implementation runs below
    autograd). `scale` None: the plain gated residual."""

    @staticmethod
    def forward(h, y, gate, scale, shift, eps, normed_dtype, autocast):
        h_out = reference.gated_residual(h, y, gate).contiguous()  # contiguous like the kernels' (and the fake's)
        if scale is None:
            return h_out, None
        return h_out, layer_norm_modulate_ops._Reference.forward(h_out, scale, shift, eps, normed_dtype, autocast)

    @staticmethod
    def backward(g_out, g_normed, h_out, y, gate, scale, shift, eps, normed_dtype, autocast, h_dtype,
                 need_dh, need_dy, need_dgate, need_dscale, need_dshift):
        total, dscale, dshift = g_out, None, None
        if g_normed is not None:
            # the gradient reaching h_out through norm2: autograd adds it to g_out in h_out's dtype
            dx, dscale, dshift = layer_norm_modulate_ops._Reference.backward(
                g_normed, h_out, scale, shift, eps, normed_dtype, autocast, need_dh or need_dy or need_dgate,
                need_dscale, need_dshift)
            if dx is not None:
                total = dx if total is None else total + dx
        if total is None:  # neither output reached the loss: zero gradients
            total = torch.zeros_like(h_out)
        dh, dy, dgate = reference.gated_residual_backward(total, y, gate, h_dtype, need_dh, need_dy, need_dgate)
        return dh, dy, dgate, dscale, dshift  # dscale, dshift None without g_normed, as autograd's


class _Kernels:
    """The Triton kernels (fp32 math); dgate / dscale / dshift come back as fp32 partial sums' totals
    and take their inputs' dtypes here."""

    @staticmethod
    def forward(h, y, gate, scale, shift, eps, normed_dtype, autocast):
        kernels = backend.kernel_module("gated_residual")
        return kernels.forward(h, y, gate, scale, shift, eps, residual_dtype(h, y, gate), normed_dtype)

    @staticmethod
    def backward(g_out, g_normed, h_out, y, gate, scale, shift, eps, normed_dtype, autocast, h_dtype,
                 need_dh, need_dy, need_dgate, need_dscale, need_dshift, y_dtype=None, gate_dtype=None):
        """y is read only for dgate and gate only for dy (the eager path saves them only then, and
        passes their dtypes); h_out only with g_normed."""
        kernels = backend.kernel_module("gated_residual")
        y_dtype = y.dtype if y_dtype is None else y_dtype
        gate_dtype = gate.dtype if gate_dtype is None else gate_dtype
        if g_out is None and g_normed is None:  # neither output reached the loss: all zero
            g_out = torch.zeros_like(h_out)
        dh, dy, dgate, dscale, dshift = kernels.backward(
            g_out, g_normed, h_out, y, gate, scale, eps, h_dtype, y_dtype, need_dh, need_dy, need_dgate, need_dscale,
            need_dshift)
        if need_dh and dh is None:  # total is g_out: dh is g_out itself, or its cast
            dh = g_out if g_out.dtype == h_dtype else g_out.to(h_dtype)
        # dscale, dshift None without g_normed (normed did not reach the loss), as autograd's
        return (dh, dy, dgate.to(gate_dtype) if need_dgate else None,
                dscale.to(scale.dtype) if dscale is not None else None,
                dshift.to(shift.dtype) if dshift is not None else None)


def _implementation(tensors, out_dtypes, backend_name: Optional[str]):
    if layer_norm_modulate_ops.kernels_run(OP_NAME, tensors, out_dtypes, backend_name):
        return _Kernels
    return _Reference


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _like(t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A fake output of t's shape, contiguous (not `empty_like`: that keeps the strides of a dense
    permuted input, which the real outputs, made contiguous by `_fresh`, do not)."""
    return t.new_empty(t.shape, dtype=t.dtype if dtype is None else dtype)


def _fresh(outputs, inputs) -> tuple:
    """A custom op may not return one of its inputs (nor a view of one) or one tensor twice; and
    its outputs are contiguous, as the fakes promise (dh is g_out cast, dy g_out times gate: they
    would otherwise take the incoming gradient's strides)."""
    result = []
    for out in outputs:
        out = out.contiguous()
        if any(out is t or (t is not None and out._is_view() and out._base is t) for t in inputs):
            out = out.clone()
        result.append(out)
    return tuple(result)


# ------------------------------------------------------------------- gated residual: op
@torch.library.custom_op("sfgrpo::gated_residual", mutates_args=())
def gated_residual_op(h: Tensor, y: Tensor, gate: Tensor, backend_name: Optional[str]) -> Tensor:
    """-> h + gate[:, None] * y, `[B, N, C]` contiguous in the expression's dtype."""
    return _implementation((h, y, gate), (), backend_name).forward(h, y, gate, None, None, 0.0, None, False)[0]


@gated_residual_op.register_fake
def _(h, y, gate, backend_name):
    return h.new_empty(h.shape, dtype=residual_dtype(h, y, gate))


@torch.library.custom_op("sfgrpo::gated_residual_backward", mutates_args=())
def gated_residual_backward_op(grad: Tensor, y: Tensor, gate: Tensor, h_dtype: torch.dtype, need_dh: bool,
                               need_dy: bool, need_dgate: bool,
                               backend_name: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dh, dy, dgate) in the dtypes and shapes of h, y, gate (empty when not needed)."""
    dh, dy, dgate, _, _ = _implementation((grad, y, gate), (h_dtype,), backend_name).backward(
        grad, None, None, y, gate, None, None, 0.0, None, False, h_dtype, need_dh, need_dy, need_dgate, False, False)
    return _fresh((_empty(y) if out is None else out for out in (dh, dy, dgate)), (grad, y, gate))


@gated_residual_backward_op.register_fake
def _(grad, y, gate, h_dtype, need_dh, need_dy, need_dgate, backend_name):
    return (_like(y, h_dtype) if need_dh else _empty(y), _like(y) if need_dy else _empty(y),
            _like(gate) if need_dgate else _empty(y))


def _residual_setup_context(ctx, inputs, output):
    h, y, gate, backend_name = inputs
    ctx.save_for_backward(y, gate)
    ctx.options = (h.dtype, backend_name)


def _residual_op_gradients(ctx, grad):
    y, gate = ctx.saved_tensors
    h_dtype, backend_name = ctx.options
    need = ctx.needs_input_grad[:3]
    dh, dy, dgate = gated_residual_backward_op(grad, y, gate, h_dtype, *need, backend_name)
    return dh if need[0] else None, dy if need[1] else None, dgate if need[2] else None, None


gated_residual_op.register_autograd(_residual_op_gradients, setup_context=_residual_setup_context)


# ------------------------------------------------- gated residual + LayerNorm modulate: op
@torch.library.custom_op("sfgrpo::gated_residual_layer_norm_modulate", mutates_args=())
def gated_residual_layer_norm_modulate_op(h: Tensor, y: Tensor, gate: Tensor, scale: Tensor, shift: Tensor,
                                          eps: float, out_dtype: torch.dtype, autocast: bool,
                                          backend_name: Optional[str]) -> tuple[Tensor, Tensor]:
    """-> (h_out in the expression's dtype, normed in `out_dtype`), both `[B, N, C]` contiguous."""
    return _implementation((h, y, gate, scale, shift), (out_dtype,), backend_name).forward(
        h, y, gate, scale, shift, eps, out_dtype, autocast)


@gated_residual_layer_norm_modulate_op.register_fake
def _(h, y, gate, scale, shift, eps, out_dtype, autocast, backend_name):
    return h.new_empty(h.shape, dtype=residual_dtype(h, y, gate)), h.new_empty(h.shape, dtype=out_dtype)


@torch.library.custom_op("sfgrpo::gated_residual_layer_norm_modulate_backward", mutates_args=())
def gated_residual_layer_norm_modulate_backward_op(
        g_out: Optional[Tensor], g_normed: Optional[Tensor], h_out: Tensor, y: Tensor, gate: Tensor, scale: Tensor,
        shift: Tensor, eps: float, out_dtype: torch.dtype, autocast: bool, h_dtype: torch.dtype, need_dh: bool,
        need_dy: bool, need_dgate: bool, need_dscale: bool, need_dshift: bool,
        backend_name: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dh, dy, dgate, dscale, dshift) in the dtypes and shapes of h, y, gate, scale, shift (empty
    when not needed). g_out / g_normed may be None (that output did not reach the loss)."""
    dh, dy, dgate, dscale, dshift = _implementation((h_out, y, gate, scale, shift), (out_dtype, h_dtype),
                                                    backend_name).backward(
        g_out, g_normed, h_out, y, gate, scale, shift, eps, out_dtype, autocast, h_dtype, need_dh, need_dy,
        need_dgate, need_dscale, need_dshift)
    # without g_normed the implementations give no dscale / dshift: zeros, the shapes the fake promises
    dscale = torch.zeros_like(scale) if need_dscale and dscale is None else dscale
    dshift = torch.zeros_like(shift) if need_dshift and dshift is None else dshift
    return _fresh((_empty(y) if out is None else out for out in (dh, dy, dgate, dscale, dshift)),
                  (g_out, g_normed, h_out, y, gate, scale, shift))


@gated_residual_layer_norm_modulate_backward_op.register_fake
def _(g_out, g_normed, h_out, y, gate, scale, shift, eps, out_dtype, autocast, h_dtype, need_dh, need_dy, need_dgate,
      need_dscale, need_dshift, backend_name):
    return (_like(y, h_dtype) if need_dh else _empty(y), _like(y) if need_dy else _empty(y),
            _like(gate) if need_dgate else _empty(y), _like(scale) if need_dscale else _empty(y),
            _like(shift) if need_dshift else _empty(y))


def _fused_setup_context(ctx, inputs, output):
    h, y, gate, scale, shift, eps, out_dtype, autocast, backend_name = inputs
    ctx.save_for_backward(output[0], y, gate, scale, shift)  # h_out, not h: see the module docstring
    ctx.options = (eps, out_dtype, autocast, h.dtype, backend_name)
    ctx.set_materialize_grads(False)


def _fused_op_gradients(ctx, g_out, g_normed):
    h_out, y, gate, scale, shift = ctx.saved_tensors
    eps, out_dtype, autocast, h_dtype, backend_name = ctx.options
    need = ctx.needs_input_grad[:5]
    grads = gated_residual_layer_norm_modulate_backward_op(g_out, g_normed, h_out, y, gate, scale, shift, eps,
                                                           out_dtype, autocast, h_dtype, *need, backend_name)
    return (*(g if n else None for g, n in zip(grads, need)), None, None, None, None)


gated_residual_layer_norm_modulate_op.register_autograd(_fused_op_gradients, setup_context=_fused_setup_context)


# ------------------------------------------------------------------------- eager fast paths
class _EagerGatedResidual(torch.autograd.Function):
    """The op's forward and backward without its dispatch layers (`implementation` is _Kernels)."""

    @staticmethod
    def forward(ctx, h, y, gate, implementation):
        need_dy, need_dgate = ctx.needs_input_grad[1:3]
        # y only for dgate, gate only for dy: LoRA with a frozen adaLN linear keeps no y alive
        ctx.save_for_backward(y if need_dgate else None, gate if need_dy else None)
        ctx.meta = (h.dtype, y.dtype, gate.dtype, implementation)
        return implementation.forward(h, y, gate, None, None, 0.0, None, False)[0]

    @staticmethod
    def backward(ctx, grad):
        y, gate = ctx.saved_tensors
        h_dtype, y_dtype, gate_dtype, implementation = ctx.meta
        need_dh, need_dy, need_dgate = ctx.needs_input_grad[:3]
        # ATen's `grad * gate` has y's dtype (or no dy is needed)
        dy_is_product = not need_dy or torch.promote_types(grad.dtype, gate.dtype) == y_dtype
        if not need_dgate and grad.dtype == h_dtype and dy_is_product:
            # nothing to reduce (the gate is frozen: LoRA, or a no-grad adaLN): dh is the incoming
            # gradient and dy = grad * gate one multiply, the kernel's own arithmetic (fp32, rounded
            # once to y's dtype) as one ATen op, without the kernel path's host work
            return grad if need_dh else None, grad * gate.unsqueeze(1) if need_dy else None, None, None
        dh, dy, dgate, _, _ = implementation.backward(grad, None, None, y, gate, None, None, 0.0, None, False, h_dtype,
                                                      need_dh, need_dy, need_dgate, False, False, y_dtype, gate_dtype)
        return dh, dy, dgate, None


def gated_residual(h: Tensor, y: Tensor, gate: Tensor, backend_name: Optional[str]) -> Tensor:
    """Runs `sfgrpo::gated_residual` (same arguments): the registered op when compiling, else the
    implementation directly, inside a lean autograd.Function when a gradient is needed."""
    if torch.compiler.is_compiling():
        if backend.traced_reference(h.device, backend_name):
            return reference.gated_residual(h, y, gate)
        return gated_residual_op(h, y, gate, backend_name)
    implementation = _implementation((h, y, gate), (), backend_name)
    if implementation is _Reference:
        return reference.gated_residual(h, y, gate)  # diffusers' expression under autograd
    if torch.is_grad_enabled() and (h.requires_grad or y.requires_grad or gate.requires_grad):
        return _EagerGatedResidual.apply(h, y, gate, implementation)
    return implementation.forward(h, y, gate, None, None, 0.0, None, False)[0]


class _EagerGatedResidualLayerNormModulate(torch.autograd.Function):
    """The fused op's forward and backward without its dispatch layers; `call` is (eps, out_dtype,
    autocast, implementation)."""

    @staticmethod
    def forward(ctx, h, y, gate, scale, shift, call):
        eps, out_dtype, autocast, implementation = call
        h_out, normed = implementation.forward(h, y, gate, scale, shift, eps, out_dtype, autocast)
        ctx.set_materialize_grads(False)  # a missing g_out / g_normed stays None: less traffic
        need_dy, need_dgate = ctx.needs_input_grad[1:3]
        # h_out (alive anyway: the next block's input), y only for dgate, gate only for dy
        ctx.save_for_backward(h_out, y if need_dgate else None, gate if need_dy else None, scale, shift)
        ctx.call = (*call, h.dtype, y.dtype, gate.dtype)
        return h_out, normed

    @staticmethod
    def backward(ctx, g_out, g_normed):
        h_out, y, gate, scale, shift = ctx.saved_tensors
        eps, out_dtype, autocast, implementation, h_dtype, y_dtype, gate_dtype = ctx.call
        grads = implementation.backward(g_out, g_normed, h_out, y, gate, scale, shift, eps, out_dtype, autocast,
                                        h_dtype, *ctx.needs_input_grad[:5], y_dtype, gate_dtype)
        return (*grads, None)


def gated_residual_layer_norm_modulate(h: Tensor, y: Tensor, gate: Tensor, scale: Tensor, shift: Tensor, eps: float,
                                       out_dtype: torch.dtype, autocast: bool,
                                       backend_name: Optional[str]) -> tuple[Tensor, Tensor]:
    """Runs `sfgrpo::gated_residual_layer_norm_modulate` (same arguments), as `gated_residual` does."""
    if torch.compiler.is_compiling():
        if backend.traced_reference(h.device, backend_name):
            return reference.gated_residual_layer_norm_modulate(h, y, gate, scale, shift, eps)
        return gated_residual_layer_norm_modulate_op(h, y, gate, scale, shift, eps, out_dtype, autocast, backend_name)
    tensors = (h, y, gate, scale, shift)
    implementation = _implementation(tensors, (out_dtype,), backend_name)
    if implementation is _Reference:
        return reference.gated_residual_layer_norm_modulate(h, y, gate, scale, shift, eps)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _EagerGatedResidualLayerNormModulate.apply(h, y, gate, scale, shift,
                                                          (eps, out_dtype, autocast, implementation))
    return implementation.forward(h, y, gate, scale, shift, eps, out_dtype, autocast)
