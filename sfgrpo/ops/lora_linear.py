"""Custom op `sfgrpo::lora_linear` (torch.library): a Linear layer with a LoRA adapter,
`x W^T + b + scaling * (x A^T) B^T`, with the adapter's product accumulated inside the GEMMs.

peft's LoRA forward is `base(x) + lora_B(lora_A(dropout(x))) * scaling`, after casting x to the
adapter's dtype: next to the base GEMM, full-size elementwise passes (x cast to fp32 and, under
autocast, back; the scaling product; the sum; and in the backward the scaled gradient and the sum
of the two input gradients), several times the base Linear's own traffic on a DiT's attention
projections. Here the adapter's output is added by the second GEMM itself (`addmm_` into the base
output, alpha = scaling) and in the backward the adapter's input gradient by the input-gradient
GEMM (`addmm_` into `grad @ W`): no full-size pass besides the GEMMs. The small `[M, r]` products
are the only extra tensors.

All tensors arrive in one dtype (the caller, `sfgrpo.functional.lora_linear`, casts to the compute
dtype: the autocast dtype, else x's), x as rows `[M, in]` (`lora_linear` below folds and unfolds
the leading dims outside the autograd node, so its output is not a view made inside one and may be
modified in place). The op returns `(y, h)` with the adapter's hidden `h = x A^T` `[M, r]` kept
for the backward (tiny; recomputing it would read x again). Plain ATen GEMMs on every device:
cuBLAS on CUDA, the CPU BLAS on CPU.

In eager mode `lora_linear` skips the op's dispatch layers (as the other ops do): the same
functions inside a lean autograd.Function.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
            scaling: float) -> tuple[Tensor, Tensor]:
    """x `[M, in]` -> (y `[M, out]`, h `[M, r]`)."""
    h = torch.mm(x, lora_a.t())
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    y.addmm_(h, lora_b.t(), alpha=scaling)  # the adapter's output, accumulated by the GEMM
    return y, h


def backward(grad: Optional[Tensor], x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, h: Tensor,
             scaling: float, need_dx: bool, need_dweight: bool, need_dbias: bool, need_da: bool, need_db: bool,
             grad_h: Optional[Tensor] = None):
    """-> (dx, dweight, dbias, dA, dB), None where not needed; plain ATen, traced as is under
    torch.compile. `grad` (of y) or `grad_h` (of h, for a caller of the op that reads h) may be
    None: no gradient through that output. Not differentiable itself (h is saved, not recomputed)."""
    dx = dweight = dbias = da = db = None
    if grad is None and grad_h is None:
        return dx, dweight, dbias, da, db
    if grad is None:
        grad = x.new_zeros((x.shape[0], weight.shape[0]))
    # the scaling rides in the GEMMs' alpha, not in kernels of their own. beta = 0 makes ATen ignore
    # the input (documented: NaN in it is not propagated), so eager passes an empty 0-d tensor (no
    # kernel); a traced graph gets a zero, because Inductor's Triton addmm epilogue computes
    # beta * input anyway (0 * garbage could be NaN)
    nothing = grad.new_zeros(()) if torch.compiler.is_compiling() else grad.new_empty(())
    gh = None
    if need_dx or need_da:
        gh = (torch.addmm(nothing, grad, lora_b, beta=0, alpha=scaling) if grad_h is None
              else torch.addmm(grad_h, grad, lora_b, alpha=scaling))  # dL/dh, [M, r]
    if need_dx:
        dx = torch.mm(grad, weight).addmm_(gh, lora_a)  # both input gradients summed by the GEMM
    if need_dweight:
        dweight = torch.mm(grad.t(), x)
    if need_dbias:
        dbias = grad.sum(0)
    if need_da:
        da = torch.mm(gh.t(), x)
    if need_db:
        db = torch.addmm(nothing, grad.t(), h, beta=0, alpha=scaling)
    return dx, dweight, dbias, da, db


# ------------------------------------------------------------------------------ the op
@torch.library.custom_op("sfgrpo::lora_linear", mutates_args=())
def lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                   scaling: float) -> tuple[Tensor, Tensor]:
    """-> (y, h): the layer's output and the adapter's hidden `x A^T` (for the backward)."""
    y, h = forward(x, weight, bias, lora_a, lora_b, scaling)
    return y, h


@lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    ctx.scaling = scaling
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)  # h's gradient (nothing reads h) stays None: no fill kernel


def _op_backward(ctx, grad, grad_h):
    # h is an output for this backward to save (`lora_linear` never reads it: grad_h is None then)
    x, weight, lora_a, lora_b, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dweight, dbias, da, db = backward(grad, x, weight, lora_a, lora_b, h, ctx.scaling, need[0], need[1],
                                         ctx.has_bias and need[2], need[3], need[4], grad_h=grad_h)
    return dx, dweight, dbias, da, db, None


lora_linear_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerLoraLinear(torch.autograd.Function):
    """The op's forward and backward without its dispatch layers."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        y, h = forward(x, weight, bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # h is saved, not recomputed: fail, never be wrong
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (*backward(grad, x, weight, lora_a, lora_b, h, ctx.scaling, need[0], need[1],
                          ctx.has_bias and need[2], need[3], need[4]), None)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                scaling: float) -> Tensor:
    """`sfgrpo::lora_linear` on x of any rank `[..., in]` -> `[..., out]`: the registered op when
    compiling, else the functions directly, inside a lean autograd.Function when a gradient is
    needed."""
    rows = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        y = lora_linear_op(rows, weight, bias, lora_a, lora_b, scaling)[0]
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b)):
        y = _EagerLoraLinear.apply(rows, weight, bias, lora_a, lora_b, scaling)
    else:
        y = forward(rows, weight, bias, lora_a, lora_b, scaling)[0]
    return y.view(*x.shape[:-1], weight.shape[0])
