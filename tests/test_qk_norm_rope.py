"""Fused QK RMSNorm + rotary embedding: the reference against torch.nn.RMSNorm + diffusers'
apply_rotary_emb (bit for bit), the Triton kernels (the interpreter on CPU, real on CUDA) against
the reference, gradients, layouts (slices of a joint sequence read in place), autocast, the
registered ops (opcheck, torch.compile) and bad inputs."""

import pytest
import torch

import sfgrpo
from sfgrpo import functional as F
from sfgrpo import reference as ref
from sfgrpo.ops import qk_norm_rope as ops
from norm_grads import (DEVICE, ULP, assert_calls_agree_bitwise, assert_compiled_gradients_match, norm_weight,  # tests/ helper
                        row_inputs)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (norm, weight dtype): the rotation alone, or the norm without / with an fp32 or bf16 weight
NORMS = [(False, None), (True, None), (True, torch.float32), (True, torch.bfloat16)]
_x, _w = row_inputs, norm_weight


def _tables(N, D, seed=2):
    """FLUX's layout: each angle repeated for the two channels of its pair (repeat_interleave)."""
    g = torch.Generator().manual_seed(seed)
    angles = (torch.rand(N, D // 2, generator=g) * 20).repeat_interleave(2, dim=1)
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


def _close(got, expected, dtype, roundings=2):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    tol = roundings * (ULP[dtype] if dtype != torch.float32 else 2e-6)
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


# ------------------------------------------------------------------ reference == torch + diffusers
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize,wdtype", NORMS, ids=str)
def test_reference_is_torch_rmsnorm_then_diffusers_rotation_bit_for_bit(dtype, wdtype, normalize):
    from diffusers.models.embeddings import apply_rotary_emb

    x = _x((2, 6, 3, 64), dtype).cpu()
    cos, sin = (t.cpu() for t in _tables(6, 64))
    norm = torch.nn.RMSNorm(64, eps=1e-6, elementwise_affine=wdtype is not None)
    if wdtype is not None:
        norm.weight = torch.nn.Parameter(_w(64, wdtype).cpu())
    with torch.no_grad():
        expected = apply_rotary_emb(norm(x) if normalize else x, (cos, sin), sequence_dim=1)
        eps = 1e-6 if normalize else None
        got = ref.qk_norm_rope(x, cos, sin, norm.weight, eps)
        via_api = sfgrpo.qk_norm_rope(x, cos, sin, norm.weight if normalize else None, eps)  # CPU: the reference
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert via_api.dtype == expected.dtype and torch.equal(via_api, expected)


# ------------------------------------------------------------------------- kernels == reference
FORWARD_CASES = [((1, 1, 1, 2), torch.float32), ((2, 5, 3, 128), torch.float32), ((2, 5, 3, 128), torch.bfloat16),
                 ((1, 7, 2, 64), torch.float16), ((2, 3, 4, 96), torch.bfloat16), ((1, 40, 24, 128), torch.bfloat16),
                 ((3, 1, 1, 6), torch.float32)]


@pytest.mark.parametrize("shape,dtype", FORWARD_CASES, ids=str)
@pytest.mark.parametrize("normalize,wdtype", NORMS, ids=str)
def test_kernel_forward_matches_reference(shape, dtype, wdtype, normalize):
    B, N, H, D = shape
    x, w, (cos, sin) = _x(shape, dtype), _w(D, wdtype), _tables(N, D)
    eps = 1e-6 if normalize else None
    got = F.qk_norm_rope(x, cos, sin, w, eps, backend="triton")
    expected = ref.qk_norm_rope(x, cos, sin, w, eps)
    assert got.is_contiguous()
    # the fp32 sum of squares in another order can move the norm's rounding by one ulp, then the
    # rotation's: two roundings of the storage dtype
    _close(got, expected, dtype)


def test_kernel_rotation_alone_is_exact():
    """Without the norm the kernel computes diffusers' products and sum in fp32 in the same order
    (no FMA): the same bits."""
    for dtype in DTYPES:
        x, (cos, sin) = _x((2, 9, 3, 128), dtype), _tables(9, 128)
        assert torch.equal(F.qk_norm_rope(x, cos, sin, backend="triton"), ref.qk_norm_rope(x, cos, sin))


def test_layouts_joint_sequence_slices_and_head_major_views():
    """A slice of a joint [B, N_txt + N_img, H, D] sequence (batch stride larger than the slice) and
    a [B, H, N, D] tensor seen as [B, N, H, D] are read in place and give the contiguous answer."""
    joint = _x((2, 11, 3, 64), torch.bfloat16)
    image = joint[:, 4:]
    assert not image.is_contiguous()
    cos, sin = _tables(7, 64)
    w = _w(64, torch.bfloat16)
    got = F.qk_norm_rope(image, cos, sin, w, 1e-6, backend="triton")
    assert torch.equal(got, F.qk_norm_rope(image.contiguous(), cos, sin, w, 1e-6, backend="triton"))
    heads_first = _x((2, 3, 7, 64), torch.float32).transpose(1, 2)
    got = F.qk_norm_rope(heads_first, cos, sin, w, 1e-6, backend="triton")
    assert torch.equal(got, F.qk_norm_rope(heads_first.contiguous(), cos, sin, w, 1e-6, backend="triton"))
    # a channel stride other than 1 is copied once, same numbers
    strided = _x((2, 7, 3, 128), torch.float32)[..., ::2]
    torch.testing.assert_close(F.qk_norm_rope(strided, cos, sin, w, 1e-6, backend="triton"),
                               ref.qk_norm_rope(strided, cos, sin, w, 1e-6), rtol=2e-6, atol=2e-6)


def _oracle_grads(x, cos, sin, w, eps, g):
    """dx, dweight by autograd through the reference in float64, for the same incoming gradient."""
    xg = x.detach().double().requires_grad_()
    wg = None if w is None else w.detach().double().requires_grad_()
    y = ref.qk_norm_rope(xg, cos.double(), sin.double(), wg, eps)
    grads = torch.autograd.grad(y, [xg] + ([wg] if wg is not None else []), g.double())
    return grads[0], (grads[1] if wg is not None else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize,wdtype", NORMS, ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 1, 2), (2, 5, 3, 128), (2, 40, 24, 64)], ids=str)
def test_kernel_gradients_match_autograd_through_the_reference(dtype, wdtype, normalize, shape):
    B, N, H, D = shape
    x, w, (cos, sin) = _x(shape, dtype), _w(D, wdtype), _tables(N, D)
    eps = 1e-6 if normalize else None
    xg = x.clone().requires_grad_()
    wg = None if w is None else w.clone().requires_grad_()
    y = F.qk_norm_rope(xg, cos, sin, wg, eps, backend="triton")
    g = _x(y.shape, y.dtype, seed=5)
    y.backward(g)
    dx, dw = _oracle_grads(x, cos, sin, w, eps, g)
    # fp32 storage: the fused fp32 backward against fp64; bf16: the rounding of the stored results
    tol = 2e-5 if dtype == torch.float32 else 2 * ULP[torch.bfloat16]
    torch.testing.assert_close(xg.grad.double(), dx.to(xg.grad.dtype).double(), rtol=tol, atol=tol * dx.abs().max().item())
    if wg is not None:
        wtol = 2e-5 if wdtype == torch.float32 else 2 * ULP[torch.bfloat16]
        torch.testing.assert_close(wg.grad.double(), dw.to(wg.grad.dtype).double(), rtol=wtol,
                                   atol=wtol * dw.abs().max().item())


def test_tables_with_different_row_strides():
    """sin a slice of a wider table, or one broadcast row: the kernels read both tables with one row
    stride, so such a pair is made alike first; forward and gradients stay the reference's."""
    x, w = _x((2, 5, 3, 64), torch.float32), _w(64, torch.float32)
    cos, sin = _tables(5, 64)
    wide_sin = torch.cat([sin, sin], dim=1)[:, :64]
    for pair in ((cos, wide_sin), (cos, sin[:1].expand(5, 64)), (cos[:1].expand(5, 64), sin)):
        xg, rg = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = F.qk_norm_rope(xg, *pair, w, 1e-6, backend="triton")
        expected = ref.qk_norm_rope(rg, *pair, w, 1e-6)
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
        g = _x(got.shape, torch.float32, seed=4)
        got.backward(g)
        expected.backward(g)
        torch.testing.assert_close(xg.grad, rg.grad, rtol=2e-5, atol=2e-5)


def test_gradient_of_a_joint_slice_and_weight_only():
    """The incoming gradient as a slice of a joint gradient (what the cat's backward hands over);
    a weight-only backward (x frozen) writes no dx."""
    x, w, (cos, sin) = _x((2, 5, 3, 64), torch.float32), _w(64, torch.float32), _tables(5, 64)
    joint_grad = _x((2, 9, 3, 64), torch.float32, seed=7)
    g = joint_grad[:, 4:]
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.qk_norm_rope(xg, cos, sin, wg, 1e-6, backend="triton").backward(g)
    dx, dw = _oracle_grads(x, cos, sin, w, 1e-6, g)
    torch.testing.assert_close(xg.grad.double(), dx, rtol=2e-5, atol=2e-5)
    wonly = w.clone().requires_grad_()
    F.qk_norm_rope(x, cos, sin, wonly, 1e-6, backend="triton").backward(g)
    torch.testing.assert_close(wonly.grad.double(), dw, rtol=2e-5, atol=2e-5 * dw.abs().max().item())


def test_autocast_writes_the_autocast_dtype():
    x, w, (cos, sin) = _x((2, 5, 3, 64), torch.float32), _w(64, torch.float32), _tables(5, 64)
    plain = ref.qk_norm_rope(x, cos, sin, w, 1e-6)
    for backend in ("reference", "triton"):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = F.qk_norm_rope(x, cos, sin, w, 1e-6, backend=backend)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), plain, rtol=2 * ULP[torch.bfloat16], atol=2 * ULP[torch.bfloat16])


def test_wider_heads_than_one_tile_run_the_reference():
    from sfgrpo.kernels import qk_norm_rope as kernels

    D = kernels.MAX_D + 8
    x, w, (cos, sin) = _x((1, 2, 1, D), torch.float32), _w(D, torch.float32), _tables(2, D)
    assert torch.equal(F.qk_norm_rope(x, cos, sin, w, 1e-6, backend="triton"), ref.qk_norm_rope(x, cos, sin, w, 1e-6))


def test_zero_rows_and_eps_zero_keep_dweight_finite():
    """A row of zeros with eps = 0 is NaN in torch too (0 / 0); rows that are only padding must not
    poison dweight: with eps = 0 and non-zero rows everything stays finite."""
    x, w, (cos, sin) = _x((1, 3, 5, 64), torch.float32), _w(64, torch.float32), _tables(3, 64)
    wg = w.clone().requires_grad_()
    F.qk_norm_rope(x, cos, sin, wg, 0.0, backend="triton").sum().backward()
    assert torch.isfinite(wg.grad).all()


# ------------------------------------------------------------------ registered ops, compile
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    x = _x((2, 5, 3, 64), torch.float32)[:, 1:].requires_grad_()
    cos, sin = _tables(4, 64)
    w = _w(64, torch.bfloat16).requires_grad_()
    torch.library.opcheck(ops.qk_norm_rope_op, (x, cos, sin, w, 1e-6, True, torch.float32, torch.float32, backend))
    torch.library.opcheck(ops.qk_norm_rope_op, (_x((1, 4, 2, 8), torch.float16), cos[:, :8], sin[:, :8], None, 0.0,
                                                False, torch.float16, torch.float16, backend))
    g = torch.randn(x.shape, device=DEVICE)
    torch.library.opcheck(ops.qk_norm_rope_backward_op, (g, x.detach(), cos, sin, w.detach(), 1e-6, True, True, True,
                                                         backend))


@pytest.mark.parametrize("normalize,wdtype", NORMS, ids=str)
def test_reference_backward_matches_autograd(normalize, wdtype):
    """The op's written-out CPU backward (custom ops run below autograd) against autograd in fp64."""
    x, w, (cos, sin) = _x((2, 5, 3, 64), torch.float32), _w(64, wdtype), _tables(5, 64)
    eps = 1e-6 if normalize else None
    g = _x((2, 5, 3, 64), torch.float32, seed=5)
    dx, dw = ref.qk_norm_rope_backward(g, x, cos, sin, w, eps)
    odx, odw = _oracle_grads(x, cos, sin, w, eps, g)
    torch.testing.assert_close(dx.double(), odx, rtol=2e-5, atol=2e-5)
    if w is not None:
        torch.testing.assert_close(dw.double(), odw.to(dw.dtype).double(), rtol=1e-2 if wdtype != torch.float32 else 2e-5,
                                   atol=1e-5 * odw.abs().max().item() + (1e-2 if wdtype != torch.float32 else 0))
    else:
        assert dw is None


def test_eager_fast_path_equals_the_registered_op():
    x, w, (cos, sin) = _x((2, 5, 3, 64), torch.float32), _w(64, torch.float32), _tables(5, 64)
    assert_calls_agree_bitwise(
        [lambda x, w: ops.qk_norm_rope(x, cos, sin, w, 1e-6, torch.float32, torch.float32, "triton"),
         lambda x, w: ops.qk_norm_rope_op(x, cos, sin, w, 1e-6, True, torch.float32, torch.float32, "triton")], x, w)


@pytest.mark.parametrize("backend", [None, "triton"])  # None on CPU: the reference traced; triton: the op
def test_torch_compile_fullgraph_has_no_graph_break(backend):
    cos, sin = _tables(5, 64)

    def loss_fn(x, w):
        return F.qk_norm_rope(x, cos, sin, w, 1e-6, backend=backend).square().mean()

    x, w = _x((2, 5, 3, 64), torch.float32), _w(64, torch.float32)
    assert_compiled_gradients_match(loss_fn, x, w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_cuda_forward_backward_have_no_host_sync(backend):
    x = _x((2, 256, 8, 128), torch.bfloat16).requires_grad_()
    w = _w(128, torch.bfloat16).requires_grad_()
    cos, sin = _tables(256, 128)
    F.qk_norm_rope(x, cos, sin, w, 1e-6, backend=backend).float().square().sum().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        F.qk_norm_rope(x, cos, sin, w, 1e-6, backend=backend).float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---------------------------------------------------------------------- errors, empty input
def test_bad_inputs_give_clear_errors():
    x, (cos, sin) = _x((2, 5, 3, 64), torch.float32), _tables(5, 64)
    with pytest.raises(ValueError, match=r"\[B, N, H, D\]"):
        F.qk_norm_rope(x[0], cos, sin)
    with pytest.raises(ValueError, match="must be even"):
        F.qk_norm_rope(x[..., :63], cos[:, :63], sin[:, :63])
    with pytest.raises(ValueError, match=r"cos must be \[N, D\] = \[5, 64\]"):
        F.qk_norm_rope(x, cos[:4], sin)
    with pytest.raises(ValueError, match=r"sin must be \[N, D\]"):
        F.qk_norm_rope(x, cos, sin[None])
    with pytest.raises(TypeError, match="x must be float32"):
        F.qk_norm_rope(x.double(), cos, sin)
    with pytest.raises(TypeError, match="cos must be float32"):
        F.qk_norm_rope(x, cos.double(), sin)
    with pytest.raises(ValueError, match="needs eps"):
        F.qk_norm_rope(x, cos, sin, _w(64, torch.float32))
    with pytest.raises(ValueError, match=r"weight must have shape \[D\]"):
        F.qk_norm_rope(x, cos, sin, _w(32, torch.float32), 1e-6)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        F.qk_norm_rope(x, cos, sin, None, -1.0)
    with pytest.raises(ValueError, match="gives none to the rotation tables"):
        F.qk_norm_rope(x, cos.clone().requires_grad_(), sin)
    with pytest.raises(ValueError, match="not one of"):
        F.qk_norm_rope(x, cos, sin, backend="cuda-graphs")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="cos is on meta"):
            F.qk_norm_rope(x, cos.to("meta"), sin)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_input(backend):
    for shape in ((0, 4, 2, 64), (2, 0, 3, 64)):
        x = torch.zeros(shape, device=DEVICE, requires_grad=True)
        cos, sin = _tables(shape[1], 64)
        w = torch.ones(64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        out = F.qk_norm_rope(x, cos, sin, w, 1e-6, backend=backend)
        assert out.shape == x.shape and out.dtype == torch.float32
        out.sum().backward()
        assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
