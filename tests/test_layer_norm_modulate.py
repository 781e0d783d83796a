"""Fused adaLN modulation `layer_norm(x) * (1 + scale) + shift`: the reference against diffusers'
blocks bit for bit, the Triton kernels (interpreter on CPU, real on CUDA) against the reference
forward and backward, in-place reads of chunked embeddings, opcheck, torch.compile, bad and empty
inputs."""

import copy

import pytest
import torch
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero

import sfgrpo
from sfgrpo import functional as F
from sfgrpo import reference as ref
from sfgrpo.kernels import layer_norm_modulate as kernels
from sfgrpo.ops.layer_norm_modulate import layer_norm_modulate_backward_op, layer_norm_modulate_op
from norm_grads import DEVICE, KERNEL_SHAPES, assert_gradients_close, upcast  # tests/ helper

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# y rounded once from fp32 math: half an ulp of the storage dtype, plus fp32 noise
FWD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (8e-3, 8e-3), torch.float16: (1e-3, 1e-3)}


def _inputs(batch, rows, channels, dtype, seed=0, chunked=True, two_d=False):
    """x ([B, N, C], or [B, C] when two_d) and scale, shift as diffusers makes them: chunks of a
    [B, 6C] embedding (row stride 6C) when chunked."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, channels) if two_d else (batch, rows, channels)
    # an offset mean and spread per row: the variance must not be trivially 1
    x = (3.0 + 2.0 * torch.randn(shape, generator=g)).to(dtype).to(DEVICE)
    emb = (0.5 * torch.randn(batch, 6 * channels, generator=g)).to(dtype).to(DEVICE)
    if chunked:
        shift, scale = emb.chunk(6, dim=1)[:2]
    else:
        shift, scale = emb[:, :channels].clone(), emb[:, channels:2 * channels].clone()
    return x, scale, shift


# ------------------------------------------------------------------------ reference vs diffusers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_diffusers_ada_layer_norm_zero_bit_for_bit(dtype):
    torch.manual_seed(0)
    block = AdaLayerNormZero(64).to(dtype)
    x, temb = torch.randn(2, 9, 64, dtype=dtype), torch.randn(2, 64, dtype=dtype)
    expected, *_ = block(x, emb=temb)
    shift, scale = block.linear(block.silu(temb)).chunk(6, dim=1)[:2]
    got = F.layer_norm_modulate(x, scale, shift)  # CPU: the reference
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert torch.equal(ref.layer_norm_modulate(x, scale, shift), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_diffusers_ada_layer_norm_continuous_bit_for_bit(dtype):
    torch.manual_seed(1)
    block = AdaLayerNormContinuous(48, 32, elementwise_affine=False, eps=1e-6).to(dtype)
    x, cond = torch.randn(3, 5, 48, dtype=dtype), torch.randn(3, 32, dtype=dtype)
    expected = block(x, cond)
    scale, shift = block.linear(block.silu(cond).to(dtype)).chunk(2, dim=1)
    assert torch.equal(F.layer_norm_modulate(x, scale, shift, 1e-6), expected)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_path_gradients_are_autograds_bits(dtype, autocast):
    """The op's CPU backward (written out: it runs below autograd) gives exactly the gradients that
    autograd computes through diffusers' block, down to the adaLN linear's weight."""
    torch.manual_seed(3)
    block = AdaLayerNormZero(48).to(dtype)
    fused = copy.deepcopy(block)
    x, temb = torch.randn(2, 7, 48, dtype=dtype), torch.randn(2, 48, dtype=dtype)
    grad = torch.randn(2, 7, 48, dtype=dtype)
    results = []
    for module, ours in ((block, False), (fused, True)):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if ours:
                shift, scale = module.linear(module.silu(temb)).chunk(6, dim=1)[:2]
                y = F.layer_norm_modulate(xi, scale, shift)
            else:
                y = module(xi, emb=temb)[0].to(torch.bfloat16 if autocast else dtype)
        y.backward(grad.to(y.dtype))
        results.append((y, xi.grad, module.linear.weight.grad, module.linear.bias.grad))
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), *results):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_reference_under_autocast_gives_the_autocast_dtype(x_dtype):
    torch.manual_seed(2)
    block = AdaLayerNormZero(32)
    x, temb = torch.randn(2, 4, 32, dtype=x_dtype), torch.randn(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, *_ = block(x, emb=temb)
        shift, scale = block.linear(block.silu(temb)).chunk(6, dim=1)[:2]
        got = F.layer_norm_modulate(x, scale, shift)
    # diffusers' result, cast once to the autocast dtype (it may come out float32: scale * fp32)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected.to(torch.bfloat16))
    # fp32 x and bf16 scale promote to fp32 without autocast
    assert F.layer_norm_modulate(x.float(), scale, shift).dtype == torch.float32


# ------------------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_kernel_forward_matches_reference(shape, dtype):
    batch, rows, channels, two_d = shape
    x, scale, shift = _inputs(batch, rows, channels, dtype, seed=channels + rows, chunked=channels != 64, two_d=two_d)
    got = F.layer_norm_modulate(x, scale, shift, backend="triton")
    expected = ref.layer_norm_modulate(*upcast(x, scale, shift))
    assert got.shape == x.shape and got.dtype == dtype
    rtol, atol = FWD_TOL[dtype]
    torch.testing.assert_close(got.float(), expected, rtol=rtol, atol=atol)


def test_kernel_forward_promotes_like_the_expression():
    x, scale, shift = _inputs(2, 3, 64, torch.bfloat16)
    got = F.layer_norm_modulate(x, scale.float(), shift, backend="triton")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.layer_norm_modulate(*upcast(x, scale, shift)), rtol=1e-5, atol=1e-5)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):  # the autocast dtype, rounded once
        got = F.layer_norm_modulate(x.float(), scale.float(), shift, backend="triton")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.layer_norm_modulate(*upcast(x, scale, shift)), rtol=8e-3, atol=8e-3)


BWD_SHAPES = [(3, 5, 7, False), (1, 77, 64, False), (3, 1, 64, True), (3, 77, 1536, False), (1, 5, 3072, False)]
# which inputs require grad: LoRA (x only, the adaLN linear frozen), full fine-tune, and no dx
GRAD_MODES = {"lora": (True, False, False), "full": (True, True, True), "modulation_only": (False, True, True),
              "scale_only": (True, True, False)}


# every shape and dtype with LoRA's and a full fine-tune's flags; the other flag sets in fp32; the
# reference path (its flags only drop outputs) with both
BWD_CASES = [(shape, dtype, mode, "triton") for shape in BWD_SHAPES for dtype in (torch.float32, torch.bfloat16)
             for mode in ("lora", "full")]
BWD_CASES += [(shape, torch.float32, mode, "triton") for shape in BWD_SHAPES if shape[2] != 1536
              for mode in ("modulation_only", "scale_only")]
BWD_CASES += [(shape, dtype, mode, "reference") for shape in BWD_SHAPES for dtype in (torch.float32, torch.bfloat16)
              for mode in ("lora", "full")]


@pytest.mark.parametrize("shape, dtype, mode, backend", BWD_CASES, ids=str)
def test_backward_matches_autograd_through_the_reference(shape, dtype, mode, backend):
    """The kernels' backward, and the reference path's written-out formulas (the op's backward on
    CPU), against autograd through the reference expression in fp32."""
    batch, rows, channels, two_d = shape
    x, scale, shift = _inputs(batch, rows, channels, dtype, seed=7 * channels + rows, two_d=two_d)
    needs = GRAD_MODES[mode]
    ours = [t.detach().clone().requires_grad_(need) for t, need in zip((x, scale, shift), needs)]
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    F.layer_norm_modulate(*ours, backend=backend).backward(grad)
    truth = [t.requires_grad_(need) for t, need in zip(upcast(x, scale, shift), needs)]
    ref.layer_norm_modulate(*truth).backward(grad.float())
    assert_gradients_close(("dx", "dscale", "dshift"), ours, truth, needs, dtype, 1e-5 if dtype == torch.float32 else 2e-2)


def test_kernel_backward_is_deterministic_across_chunks():
    x, scale, shift = _inputs(2, 77, 64, torch.float32)
    grads = []
    for _ in range(2):
        s = scale.detach().clone().requires_grad_()
        F.layer_norm_modulate(x, s, shift, backend="triton").sum().backward()
        grads.append(s.grad)
    assert kernels.launch_config(2, 77, 64)[1] > 1  # really split over several programs
    assert torch.equal(*grads)


def test_launches_without_partials_run_shorter_programs(monkeypatch):
    """Forwards and input-only backwards write no per-program dscale / dshift partials: more, shorter
    programs (PLAIN_*, from the H100 sweep); a backward with partials keeps the long ones."""
    plain, with_partials = kernels.launch_config(16, 1357, 1536, False), kernels.launch_config(16, 1357, 1536, True)
    assert (plain[0], with_partials[0]) == (11, 43) and plain[2:] == with_partials[2:]
    asked = []
    real = kernels.launch_config
    monkeypatch.setattr(kernels, "launch_config", lambda *args: asked.append(args[3]) or real(*args))  # (B, N, C, partials)
    x, scale, shift = _inputs(2, 9, 64, torch.float32)
    F.layer_norm_modulate(x.requires_grad_(), scale, shift, backend="triton").sum().backward()
    assert asked == [False, False]
    F.layer_norm_modulate(x, scale.detach().clone().requires_grad_(), shift, backend="triton").sum().backward()
    assert asked[2:] == [False, True]


def test_chunked_scale_and_shift_are_read_in_place(monkeypatch):
    x, scale, shift = _inputs(3, 5, 64, torch.bfloat16)
    assert scale.stride() == (6 * 64, 1) and not scale.is_contiguous()
    seen = []
    real = kernels.forward

    def spy(x_, scale_, shift_, *args):
        seen.append((scale_.data_ptr(), scale_.stride(), shift_.data_ptr(), shift_.stride()))
        return real(x_, scale_, shift_, *args)

    monkeypatch.setattr(kernels, "forward", spy)
    got = F.layer_norm_modulate(x, scale, shift, backend="triton")
    assert seen == [(scale.data_ptr(), scale.stride(), shift.data_ptr(), shift.stride())]
    torch.testing.assert_close(got.float(), ref.layer_norm_modulate(*upcast(x, scale, shift)), rtol=8e-3, atol=8e-3)


def test_wider_rows_than_the_kernel_holds_run_the_reference():
    x, scale, shift = _inputs(1, 2, kernels.MAX_C + 1, torch.float32)
    expected = ref.layer_norm_modulate(x, scale, shift)
    assert torch.equal(F.layer_norm_modulate(x, scale, shift, backend="triton"), expected)


def test_float64_runs_the_reference_on_every_backend():
    x, scale, shift = _inputs(2, 3, 16, torch.float64)
    expected = ref.layer_norm_modulate(x, scale, shift)
    for backend in ("reference", "triton"):
        got = F.layer_norm_modulate(x, scale, shift, backend=backend)
        assert got.dtype == torch.float64 and torch.equal(got, expected)


def test_non_contiguous_x_and_scale_equal_contiguous():
    x, scale, shift = _inputs(3, 6, 64, torch.float32, chunked=False)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # strided batch
    st = scale.t().contiguous().t()  # channels not adjacent: made contiguous once
    a = F.layer_norm_modulate(xt, st, shift, backend="triton")
    b = F.layer_norm_modulate(x, scale, shift, backend="triton")
    assert torch.equal(a, b)


# ------------------------------------------------------------------- custom op, compile, errors
def _op_args(backend, needs=(True, True, True)):
    x, scale, shift = _inputs(2, 3, 16, torch.float32)
    x, scale, shift = (t.detach().clone().requires_grad_(n) for t, n in zip((x, scale, shift), needs))
    return x, scale, shift, 1e-6, torch.float32, False, backend


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    torch.library.opcheck(layer_norm_modulate_op, _op_args(backend))
    torch.library.opcheck(layer_norm_modulate_op, _op_args(backend, needs=(True, False, False)))
    x, scale, shift, eps, dtype, autocast, _ = _op_args(backend)
    grad = torch.randn_like(x)
    for needs in ((True, True, True), (True, False, False)):
        torch.library.opcheck(layer_norm_modulate_backward_op,
                              (grad, x.detach(), scale.detach(), shift.detach(), eps, dtype, autocast, *needs, backend))



@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backward_op_outputs_match_the_fake_for_permuted_inputs(backend):
    """x dense but not contiguous (its batch dim inside the tokens'), the gradient too: the real
    outputs must have the strides the fake promises (compiled graphs trust the fake's)."""
    x, scale, shift, eps, dtype, autocast, _ = _op_args(backend)
    x = x.detach().transpose(0, 1).contiguous().transpose(0, 1)
    grad = torch.randn_like(x).transpose(0, 1).contiguous().transpose(0, 1)
    assert not x.is_contiguous() and not grad.is_contiguous()
    torch.library.opcheck(layer_norm_modulate_backward_op,
                          (grad, x, scale.detach(), shift.detach(), eps, dtype, autocast, True, True, True, backend))


def test_row_offsets_past_int32_in_one_sample():
    """A strided x whose last row starts 2^31 + 32 elements into its sample (a token stride of
    2^30 + 16: the batch inside the tokens, or a sample of > 2^31 elements): 32-bit row offsets
    wrapped negative and read outside x (a segfault in the interpreter). 4 GiB of address space,
    three rows of it touched."""
    channels, stride = 16, 2**30 + 16
    base = torch.empty(2 * stride + channels, dtype=torch.bfloat16, device=DEVICE)
    x = base.as_strided((1, 3, channels), (0, stride, 1))
    x.copy_(torch.randn(1, 3, channels).to(torch.bfloat16))
    scale, shift = (torch.randn(1, channels, device=DEVICE) for _ in range(2))
    x.requires_grad_()
    y = F.layer_norm_modulate(x, scale, shift, backend="triton")
    dense = x.detach().contiguous().requires_grad_()
    expected = F.layer_norm_modulate(dense, scale, shift, backend="triton")
    assert torch.equal(y, expected)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(dx, torch.autograd.grad(expected, dense, torch.ones_like(expected))[0])

def test_eager_fast_path_equals_the_registered_op():
    x, scale, shift, *rest = _op_args("triton")
    eager = F.layer_norm_modulate(x, scale, shift, backend="triton")
    eager.square().sum().backward()
    eager_grads = [t.grad.clone() for t in (x, scale, shift)]
    for t in (x, scale, shift):
        t.grad = None
    op = layer_norm_modulate_op(x, scale, shift, *rest)
    op.square().sum().backward()
    assert torch.equal(eager, op)
    assert all(torch.equal(a, t.grad) for a, t in zip(eager_grads, (x, scale, shift)))


@pytest.mark.parametrize("backend", [None, "triton"])  # None on CPU: the reference traced; triton: the op
def test_torch_compile_fullgraph_has_no_graph_break(backend):
    x = _inputs(2, 5, 32, torch.float32)[0]

    def loss_fn(x, emb):
        shift, scale = emb.chunk(6, dim=1)[:2]
        return F.layer_norm_modulate(x, scale, shift, backend=backend).square().mean()

    emb = torch.randn(2, 6 * 32, device=DEVICE)
    x1, e1 = x.detach().clone().requires_grad_(), emb.clone().requires_grad_()
    x2, e2 = x.detach().clone().requires_grad_(), emb.clone().requires_grad_()
    torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x1, e1).backward()
    loss_fn(x2, e2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(e1.grad, e2.grad)
    # and inductor compiles it (around the op, which is opaque to it)
    torch.testing.assert_close(torch.compile(loss_fn, fullgraph=True)(x, emb), loss_fn(x, emb))


def test_torch_compile_under_autocast_gives_the_eager_bits():
    def modulate(x, emb):
        shift, scale = emb.chunk(6, dim=1)[:2]
        return F.layer_norm_modulate(x, scale, shift)

    x, emb = torch.randn(2, 5, 32, device=DEVICE), torch.randn(2, 6 * 32, device=DEVICE)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        compiled = torch.compile(modulate, fullgraph=True, backend="aot_eager")(x, emb)
        eager = modulate(x, emb)
    assert compiled.dtype == torch.bfloat16 and torch.equal(compiled, eager)


def test_top_level_export():
    assert sfgrpo.layer_norm_modulate is F.layer_norm_modulate


def test_bad_inputs_give_clear_errors():
    x, scale, shift = _inputs(2, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="at least 2 dims"):
        F.layer_norm_modulate(x[0, 0], scale, shift)
    with pytest.raises(ValueError, match=r"scale must have shape \[B, C\] = \[2, 8\]"):
        F.layer_norm_modulate(x, scale[:, :4], shift)
    with pytest.raises(ValueError, match="shift must have shape"):
        F.layer_norm_modulate(x, scale, shift[:1])
    with pytest.raises(ValueError, match="shift must have shape"):
        F.layer_norm_modulate(x, scale, shift[:, None])
    with pytest.raises(ValueError, match="scale is on meta"):
        F.layer_norm_modulate(x, scale.to("meta"), shift)
    with pytest.raises(TypeError, match="x must be float32, bfloat16, float16 or float64"):
        F.layer_norm_modulate(x.int(), scale, shift)
    with pytest.raises(TypeError, match="scale must be a tensor"):
        F.layer_norm_modulate(x, 1.0, shift)
    for eps in (-1e-6, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eps must be finite and >= 0"):
            F.layer_norm_modulate(x, scale, shift, eps)
    with pytest.raises(TypeError, match="eps must be a number"):
        F.layer_norm_modulate(x, scale, shift, torch.tensor(1e-6))
    with pytest.raises(ValueError, match="SFGRPO_BACKEND|backend argument"):
        F.layer_norm_modulate(x, scale, shift, backend="cuda-ish")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", [(0, 4, 8), (2, 0, 8), (2, 3, 0), (0, 8)], ids=str)
def test_empty_inputs(shape, backend):
    batch, channels = shape[0], shape[-1]
    x = torch.zeros(shape, device=DEVICE, requires_grad=True)
    scale = torch.zeros(batch, channels, device=DEVICE, requires_grad=True)
    shift = torch.zeros(batch, channels, device=DEVICE, requires_grad=True)
    y = F.layer_norm_modulate(x, scale, shift, backend=backend)
    assert y.shape == shape and y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.shape == shape
    # sums over no rows are zero
    assert torch.equal(scale.grad, torch.zeros_like(scale)) and torch.equal(shift.grad, torch.zeros_like(shift))
