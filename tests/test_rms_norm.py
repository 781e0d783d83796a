"""Fused RMSNorm: the reference against diffusers' RMSNorm (bit for bit), the Triton kernels (the
interpreter on CPU, real on CUDA) against the reference, gradients, layouts (no copy of a
transposed QK view), the registered ops (opcheck, torch.compile) and bad inputs."""

import pytest
import torch

import sfgrpo
from sfgrpo import functional as F
from sfgrpo import reference as ref
from sfgrpo.ops import rms_norm as ops
from norm_grads import (DEVICE, ULP, assert_calls_agree_bitwise, assert_compiled_gradients_match, norm_weight,  # tests/ helper
                        row_inputs)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WEIGHTS = [None, torch.float32, torch.bfloat16]
_x, _w = row_inputs, norm_weight


def _qk_view(B=2, N=5, H=3, D=64, dtype=torch.float32):
    """What diffusers' SD3 joint-attention processor hands to norm_q: [B, H, N, D], transposed."""
    return _x((B, N, H * D), dtype).view(B, N, H, D).transpose(1, 2)


def _close(got, expected, dtype, roundings=1):
    """Within `roundings` ulps of `dtype` (two with a half weight: x * rsqrt rounded to it, then
    the product)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    tol = roundings * (ULP[dtype] if dtype != torch.float32 else 2e-6)
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


# -------------------------------------------------------------------- reference == diffusers
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wdtype", WEIGHTS)
def test_reference_is_diffusers_rmsnorm_bit_for_bit(dtype, wdtype):
    from diffusers.models.normalization import RMSNorm

    x = _x((2, 3, 7, 64), dtype).cpu()
    module = RMSNorm(64, eps=1e-6, elementwise_affine=wdtype is not None)
    if wdtype is not None:
        module.weight = torch.nn.Parameter(_w(64, wdtype).cpu())
    with torch.no_grad():
        expected = module(x)
        got = ref.rms_norm(x, module.weight, 1e-6)
        via_api = sfgrpo.rms_norm(x, module.weight, 1e-6)  # CPU tensors: the reference path
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert via_api.dtype == expected.dtype and torch.equal(via_api, expected)


@pytest.mark.parametrize("wdtype", WEIGHTS)
def test_autocast_gives_the_autocast_dtype(wdtype):
    x = _x((4, 3, 64), torch.float32).cpu()
    w = _w(64, wdtype)
    w = None if w is None else w.cpu()
    plain = ref.rms_norm(x, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ref.rms_norm(x, w)
        via_api = F.rms_norm(x, w)
    assert got.dtype == via_api.dtype == torch.bfloat16
    assert torch.equal(got, plain.to(torch.bfloat16)) and torch.equal(via_api, got)  # rounded once


# ------------------------------------------------------------------- kernels vs reference
SHAPES = [(5, 1), (3, 7), (2, 3, 64), (2, 2, 5, 128), (3, 1536), (2, 3072), (70, 64)]


# fp16 storage on the rank-3 shape only: it takes the bf16 path with another cast
FORWARD_CASES = [(shape, dtype) for shape in SHAPES for dtype in DTYPES if dtype != torch.float16 or len(shape) == 3]


@pytest.mark.parametrize("shape,dtype", FORWARD_CASES, ids=str)
@pytest.mark.parametrize("wdtype", WEIGHTS)
def test_kernel_forward_matches_reference(shape, dtype, wdtype):
    x, w = _x(shape, dtype), _w(shape[-1], wdtype)
    half_w = wdtype in (torch.bfloat16, torch.float16)
    _close(F.rms_norm(x, w, backend="triton"), ref.rms_norm(x, w), wdtype if half_w else dtype, 2 if half_w else 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wdtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_kernel_rounds_exactly_like_the_reference(dtype, wdtype):
    """Quarter-integers: every sum of squares is exact in fp32, whatever its order, so the kernel
    must give the reference's bits (the rsqrt, the rounding to the weight's dtype, the products)."""
    g = torch.Generator().manual_seed(3)
    for D in (7, 64, 3072):
        x = (torch.randint(-16, 17, (9, D), generator=g) * 0.25).to(dtype).to(DEVICE)
        w = _w(D, wdtype)
        got = F.rms_norm(x, w, 1e-5, backend="triton").cpu()
        # the CPU reference: torch's CUDA rsqrt is rsqrtf (2 ulp), its CPU one 1 / sqrt correctly rounded
        expected = ref.rms_norm(x.cpu(), None if w is None else w.cpu(), 1e-5)
        assert got.dtype == expected.dtype and torch.equal(got, expected), (D, dtype, wdtype)


def test_kernel_layouts_transposed_view_and_non_dense_slice():
    w = _w(64, torch.bfloat16)
    q = _qk_view(dtype=torch.bfloat16)
    assert not q.is_contiguous() and ops.rows_in_memory_order(q)
    out = F.rms_norm(q, w, backend="triton")
    assert out.stride() == q.stride()  # empty_like kept the permuted layout
    _close(out, ref.rms_norm(q, w), torch.bfloat16, 2)
    assert torch.equal(out, F.rms_norm(q.contiguous(), w, backend="triton"))
    big = _x((4, 6, 96), torch.float32)
    for sliced in (big[..., :64], big[:, ::2, :64], _x((4, 64, 6), torch.float32).transpose(-1, -2)):
        assert not ops.rows_in_memory_order(sliced)
        _close(F.rms_norm(sliced, w.float(), backend="triton"), ref.rms_norm(sliced, w.float()), torch.float32)


def test_eps_zero_padding_rows_keep_dweight_finite():
    # 70 rows: the last tile is mostly padding, whose 1 / rms is 1 / sqrt(0) = inf with eps = 0
    x, w = _x((70, 64), torch.float32), _w(64, torch.float32).requires_grad_()
    F.rms_norm(x, w, 0.0, backend="triton").sum().backward()
    expected = ref.rms_norm_backward(torch.ones_like(x), x, w.detach(), 0.0, need_dx=False)[1]
    assert torch.isfinite(w.grad).all()
    torch.testing.assert_close(w.grad, expected, rtol=1e-5, atol=1e-5)


def test_non_contiguous_weight():
    x = _x((5, 64), torch.float32)
    w = _w(128, torch.float32)[::2]
    w.requires_grad_()
    F.rms_norm(x, w, backend="triton").sum().backward()
    expected = ref.rms_norm_backward(torch.ones_like(x), x, w.detach(), need_dx=False)[1]
    torch.testing.assert_close(w.grad, expected, rtol=1e-5, atol=1e-5)
    _close(F.rms_norm(x, w.detach(), backend="triton"), ref.rms_norm(x, w.detach()), torch.float32)


def test_transposed_view_is_not_copied(monkeypatch):
    from sfgrpo.kernels import rms_norm as kernels

    seen = []
    for name in ("_FWD", "_BWD"):
        launcher = getattr(kernels, name)
        original = launcher.with_constexprs

        def spy(grid, args, constexprs, _original=original, **options):
            seen.append([a.data_ptr() for a in args if isinstance(a, torch.Tensor)])
            return _original(grid, args, constexprs, **options)

        monkeypatch.setattr(launcher, "with_constexprs", spy)
    q = _qk_view().requires_grad_()
    w = _w(64, torch.float32).requires_grad_()
    out = F.rms_norm(q, w, backend="triton")
    assert seen[0][0] == q.data_ptr()
    dy = torch.randn_like(out)  # empty_like: the same layout as q
    out.backward(dy)
    assert seen[1][0] == q.data_ptr() and seen[1][2] == dy.data_ptr()  # x, dy read in place


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wdtype", WEIGHTS)
@pytest.mark.parametrize("shape", [(3, 7), (2, 2, 5, 128), (2, 3072), (150, 64)], ids=str)
def test_kernel_gradients_match_autograd_through_the_reference(dtype, wdtype, shape):
    x, w = _x(shape, dtype), _w(shape[-1], wdtype)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    grads = {}
    for name, fn in (("triton", lambda a, b: F.rms_norm(a, b, backend="triton")), ("autograd", ref.rms_norm)):
        xg = x.detach().clone().requires_grad_()
        wg = None if w is None else w.detach().clone().requires_grad_()
        out = fn(xg, wg)
        out.backward(dy.to(out.dtype))
        grads[name] = (xg.grad, None if wg is None else wg.grad)
    formula = ref.rms_norm_backward(dy.to(ref.rms_norm(x, w).dtype), x, w)
    low = dtype != torch.float32 or wdtype not in (None, torch.float32)
    for got, expected, exact in zip(grads["triton"], grads["autograd"], formula):
        if expected is None:
            assert got is None
            continue
        assert got.dtype == expected.dtype
        scale = expected.float().abs().max().item() + 1e-6
        # autograd through the reference rounds every intermediate to the storage dtype
        tol = 3e-2 if low else 1e-5
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol * scale)
        # against the fp32 formula the kernel is off by its own output rounding only
        tight = 2 * ULP[got.dtype] if got.dtype != torch.float32 else 1e-5
        torch.testing.assert_close(got.float(), exact.float(), rtol=tight, atol=tight * scale)


def test_gradient_with_another_layout_than_x_and_weight_only():
    q = _qk_view(D=128).requires_grad_()
    w = _w(128, torch.float32).requires_grad_()
    dy = torch.randn(q.shape, device=DEVICE)  # contiguous: not q's layout
    assert dy.stride() != q.stride()
    results = []
    for backend in ("triton", "reference"):
        q.grad = w.grad = None
        F.rms_norm(q, w, backend=backend).backward(dy)
        results.append((q.grad.clone(), w.grad.clone()))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # only the weight needs a gradient: no dx is computed
    x = _x((33, 64), torch.bfloat16)
    w16 = _w(64, torch.bfloat16).requires_grad_()
    F.rms_norm(x, w16, backend="triton").float().sum().backward()
    expected = ref.rms_norm_backward(torch.ones(33, 64, dtype=torch.bfloat16, device=DEVICE), x, w16.detach(), need_dx=False)[1]
    torch.testing.assert_close(w16.grad.float(), expected.float(), rtol=2 * ULP[torch.bfloat16], atol=1e-2)


class _JointGradient(torch.autograd.Function):
    """Identity whose backward hands back a given gradient as it is laid out (what the attention's
    backward gives the concatenated q)."""

    @staticmethod
    def forward(ctx, joint, grad):
        ctx.grad = grad
        return joint.view_as(joint)

    @staticmethod
    def backward(ctx, _):
        return ctx.grad, None


@pytest.mark.parametrize("batch", [1, 3])
def test_joint_attention_gradient_slices_are_read_in_place(batch, monkeypatch):
    """SD3's processor norms q of each stream ([B, H, N, D] views of [B, N, H, D] memory), then
    concatenates the streams: the norm's incoming gradient is a slice of the joint gradient, whose
    batch stride is the joint sequence's. The kernels read it through a row map, no copy."""
    copies = []

    def like(grad, x, original=ops._like):
        if not ops._same_layout(grad, x):
            copies.append(grad.shape)
        return original(grad, x)

    monkeypatch.setattr(ops, "_like", like)
    image, text = _qk_view(B=batch, N=7, H=3, D=64), _qk_view(B=batch, N=4, H=3, D=64)
    w = _w(64, torch.float32)  # fp32 throughout: the fused fp32 backward against autograd's to rounding
    joint_grad = _x((batch, 11, 3, 64), torch.float32, seed=9).transpose(1, 2)  # [B, H, N, D] of [B, N, H, D]
    grads = []
    for norm in (lambda q, w: F.rms_norm(q, w, backend="triton"), ref.rms_norm):
        leaves = [t.detach().clone().requires_grad_() for t in (image, text, w)]
        joint = torch.cat([norm(leaves[0], leaves[2]), norm(leaves[1], leaves[2])], dim=2)
        _JointGradient.apply(joint, joint_grad).sum().backward()
        grads.append([t.grad for t in leaves])
    assert copies == []
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)
    if batch > 1:  # the map: x's memory-order rows (b, n, h) -> the joint gradient's, two strides
        assert ops.row_map(joint_grad[:, :, 7:], text) == ((1, batch, 12), (0, 11 * 3 * 64, 64))


def test_row_map_gives_up_on_layouts_three_strides_cannot_address():
    x = _x((2, 3, 4, 5, 8), torch.float32)
    g = _x((2, 3, 4, 5, 16), torch.float32)[..., ::2]  # channel stride 2
    assert ops.row_map(g, x) is None
    g = _x((4, 2, 6, 3, 8), torch.float32).permute(1, 3, 0, 2, 4)[:, :, :, :5]  # four strided row dims
    assert ops.row_map(g, x) is None


def test_wider_rows_than_one_tile_run_the_reference():
    from sfgrpo.kernels import rms_norm as kernels

    x, w = _x((2, kernels.MAX_D + 8), torch.float32), _w(kernels.MAX_D + 8, torch.float32)
    assert torch.equal(F.rms_norm(x, w, backend="triton"), ref.rms_norm(x, w))


# ------------------------------------------------------------------ registered ops, compile
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    q = _qk_view(D=64).detach().requires_grad_()
    w = _w(64, torch.bfloat16).requires_grad_()
    torch.library.opcheck(ops.rms_norm_op, (q, w, 1e-6, torch.bfloat16, backend))
    torch.library.opcheck(ops.rms_norm_op, (_x((3, 7), torch.float16), None, 1e-5, torch.float16, backend))
    dy = torch.randn(q.shape, device=DEVICE)
    torch.library.opcheck(ops.rms_norm_backward_op, (dy, q.detach(), w.detach(), 1e-6, True, True, backend))


def test_eager_fast_path_equals_the_registered_op():
    q = _qk_view(D=64)
    w = _w(64, torch.float32)
    assert_calls_agree_bitwise([lambda q, w, call=call: call(q, w, 1e-6, torch.float32, "triton")
                                for call in (ops.rms_norm, ops.rms_norm_op)], q, w)


@pytest.mark.parametrize("backend", [None, "triton"])  # None on CPU: the reference traced; triton: the op
def test_torch_compile_fullgraph_has_no_graph_break(backend):
    def loss_fn(q, w):
        return F.rms_norm(q, w, 1e-6, backend=backend).square().mean()

    q = _qk_view(D=64)
    w = _w(64, torch.float32)
    assert_compiled_gradients_match(loss_fn, q, w)
    torch.testing.assert_close(torch.compile(loss_fn, fullgraph=True)(q, w), loss_fn(q, w))

    def under_autocast(q, w):  # the autocast dtype is read while tracing, no graph break either
        with torch.autocast(q.device.type, dtype=torch.bfloat16):
            return F.rms_norm(q, w)

    out = torch.compile(under_autocast, fullgraph=True, backend="aot_eager")(q, w)
    assert out.dtype == torch.bfloat16 and torch.equal(out, under_autocast(q, w))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_cuda_forward_backward_have_no_host_sync(backend):
    q = _qk_view(B=4, N=256, H=8, D=64, dtype=torch.bfloat16).requires_grad_()
    w = _w(64, torch.bfloat16).requires_grad_()
    F.rms_norm(q, w, backend=backend).float().square().sum().backward()  # warm-up (compiles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        F.rms_norm(q, w, backend=backend).float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---------------------------------------------------------------------- errors, empty input
def test_bad_inputs_give_clear_errors():
    x = _x((3, 64), torch.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \[D\]"):
        F.rms_norm(x, torch.ones(32, device=DEVICE))
    with pytest.raises(ValueError, match=r"weight must have shape \[D\]"):
        F.rms_norm(x, torch.ones(1, 64, device=DEVICE))
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        F.rms_norm(x.double())
    with pytest.raises(TypeError, match="weight must be float32"):
        F.rms_norm(x, torch.ones(64, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        F.rms_norm(x, eps=-1e-6)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        F.rms_norm(x, eps=float("inf"))
    with pytest.raises(ValueError, match="at least one dimension"):
        F.rms_norm(torch.tensor(1.0))
    with pytest.raises(ValueError, match="not one of"):
        F.rms_norm(x, backend="cuda-graphs")
    if DEVICE == "cpu" and torch.device("meta"):
        with pytest.raises(ValueError, match="weight is on meta"):
            F.rms_norm(x, torch.ones(64, device="meta"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_input(backend):
    for shape in ((0, 64), (2, 0, 3, 128)):
        x = torch.zeros(shape, device=DEVICE, requires_grad=True)
        w = torch.ones(shape[-1], device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        out = F.rms_norm(x, w, backend=backend)
        assert out.shape == x.shape and out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
