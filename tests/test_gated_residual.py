"""Fused gated residual `h + gate * y` and its fusion with the MLP branch's adaLN
(`gated_residual_layer_norm_modulate`): the reference against diffusers' JointTransformerBlock bit
for bit (forward and gradients), the Triton kernels (interpreter on CPU, real on CUDA) against the
reference forward (h_out bit for bit) and backward, in-place reads of chunked embeddings, opcheck,
torch.compile, bad and empty inputs."""

import copy

import pytest
import torch
from diffusers.models.attention import JointTransformerBlock

import sfgrpo
from sfgrpo import functional as F
from sfgrpo import reference as ref
from sfgrpo.kernels import gated_residual as kernels
from sfgrpo.ops.gated_residual import (gated_residual_backward_op, gated_residual_layer_norm_modulate_backward_op,
                                       gated_residual_layer_norm_modulate_op, gated_residual_op)
from norm_grads import DEVICE, KERNEL_SHAPES, assert_gradients_close, upcast  # tests/ helper

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# normed rounded once from fp32 math: half an ulp of the storage dtype, plus fp32 noise
FWD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (8e-3, 8e-3), torch.float16: (1e-3, 1e-3)}


def _inputs(batch, rows, channels, dtype, seed=0, chunked=True, two_d=False, dtypes=None):
    """h, y ([B, N, C], or [B, C] when two_d) and gate, scale, shift as diffusers makes them: chunks
    of a [B, 6C] embedding (row stride 6C) when chunked. `dtypes` (h, y, emb) for mixed precision."""
    g = torch.Generator().manual_seed(seed)
    h_dtype, y_dtype, emb_dtype = dtypes or (dtype, dtype, dtype)
    shape = (batch, channels) if two_d else (batch, rows, channels)
    # an offset mean and spread per row: the variance of h_out must not be trivially 1
    h = (3.0 + 2.0 * torch.randn(shape, generator=g)).to(h_dtype).to(DEVICE)
    y = torch.randn(shape, generator=g).to(y_dtype).to(DEVICE)
    emb = (0.5 * torch.randn(batch, 6 * channels, generator=g)).to(emb_dtype).to(DEVICE)
    if chunked:
        gate, shift, scale = emb.chunk(6, dim=1)[2:5]
    else:
        gate, shift, scale = (emb[:, i * channels:(i + 1) * channels].clone() for i in range(3))
    return h, y, gate, scale, shift


# ------------------------------------------------------------------------ reference vs diffusers
def _block_forward(block, hidden_states, encoder_hidden_states, temb, **kwargs):
    """diffusers' JointTransformerBlock.forward (no dual attention, no context_pre_only) with its
    gated residuals, norm2 and MLP modulation replaced by sfgrpo's fused ops."""
    norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
        encoder_hidden_states, emb=temb)
    attn_output, context_attn_output = block.attn(hidden_states=norm_hidden_states,
                                                  encoder_hidden_states=norm_encoder_hidden_states)
    hidden_states, norm_hidden_states = F.gated_residual_layer_norm_modulate(
        hidden_states, attn_output, gate_msa, scale_mlp, shift_mlp, **kwargs)
    hidden_states = F.gated_residual(hidden_states, block.ff(norm_hidden_states), gate_mlp, **kwargs)
    encoder_hidden_states, norm_encoder_hidden_states = F.gated_residual_layer_norm_modulate(
        encoder_hidden_states, context_attn_output, c_gate_msa, c_scale_mlp, c_shift_mlp, **kwargs)
    encoder_hidden_states = F.gated_residual(encoder_hidden_states, block.ff_context(norm_encoder_hidden_states),
                                             c_gate_mlp, **kwargs)
    return encoder_hidden_states, hidden_states


@pytest.mark.parametrize("mode", ["fp32", "bf16", "autocast"])
def test_reference_path_is_diffusers_joint_block_bit_for_bit(mode):
    """On CPU the functions run the expressions under autograd: the whole SD3 block, forward and every
    gradient (inputs and parameters), is bit-identical to diffusers'."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    block = JointTransformerBlock(dim=64, num_attention_heads=2, attention_head_dim=32).to(dtype)
    fused = copy.deepcopy(block)
    h, c, temb = torch.randn(2, 9, 64, dtype=dtype), torch.randn(2, 5, 64, dtype=dtype), torch.randn(2, 64, dtype=dtype)
    results = []
    for module, ours in ((block, False), (fused, True)):
        hi, ci = h.clone().requires_grad_(), c.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            enc, hid = (_block_forward if ours else type(module).forward)(module, hi, ci, temb)
        (hid.float().square().sum() + enc.float().sum()).backward()
        results.append([hid, enc, hi.grad, ci.grad, *(p.grad for p in module.parameters())])
    for i, (a, b) in enumerate(zip(*results)):
        assert a.dtype == b.dtype and torch.equal(a, b), i


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (h, y, gate) dtypes: uniform, h fp32 with bf16 gate and attention output (mixed precision), an fp32
# gate (fp32 product), and fp16 / bf16 mixes
MIXED = [(F32,) * 3, (BF16,) * 3, (F32, BF16, BF16), (BF16, BF16, F32), (F16, BF16, F16), (BF16, F16, F16)]


@pytest.mark.parametrize("dtypes", MIXED, ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gated_residual_is_the_expression_bit_for_bit(dtypes, backend):
    """Both backends, mixed precision included (h fp32 with a bf16 gate and attention output): the
    product rounded to promote(gate, y), the sum to promote(h, product), as eager torch does; the
    fused op's h_out too."""
    h, y, gate, scale, shift = _inputs(3, 7, 64, None, seed=5, dtypes=dtypes)
    expected = h + gate.unsqueeze(1) * y
    got = F.gated_residual(h, y, gate, backend=backend)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    h_out, normed = F.gated_residual_layer_norm_modulate(h, y, gate, scale, shift, backend=backend)
    assert h_out.dtype == expected.dtype and torch.equal(h_out, expected)
    expected_normed = ref.layer_norm_modulate(expected, scale, shift)
    assert normed.dtype == expected_normed.dtype
    if backend == "reference":
        assert torch.equal(normed, expected_normed)
    else:  # fp32 math on h_out as rounded (the expression rounds (1 + scale) and each product to its dtypes)
        rtol, atol = FWD_TOL[torch.bfloat16 if torch.bfloat16 in dtypes else min(dtypes, key=lambda d: d.itemsize)]
        torch.testing.assert_close(normed.float(), ref.layer_norm_modulate(*upcast(expected, scale, shift)),
                                   rtol=rtol, atol=atol)


def test_reference_two_d_broadcasts_gate_per_sample():
    h, y, gate, scale, shift = _inputs(3, 1, 16, torch.float32, two_d=True)
    assert torch.equal(ref.gated_residual(h, y, gate), h + gate * y)
    _, normed = ref.gated_residual_layer_norm_modulate(h, y, gate, scale, shift)
    assert torch.equal(normed, torch.nn.functional.layer_norm(h + gate * y, (16,), eps=1e-6) * (1 + scale) + shift)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_under_autocast_normed_takes_the_autocast_dtype(backend):
    h, y, gate, scale, shift = _inputs(2, 4, 32, torch.float32)
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        h_out, normed = F.gated_residual_layer_norm_modulate(h, y, gate, scale, shift, backend=backend)
        expected_out, expected_normed = ref.gated_residual_layer_norm_modulate(h, y, gate, scale, shift)
    # elementwise ops are not autocast's: h_out stays fp32 (and exact); normed in bf16
    assert h_out.dtype == torch.float32 and torch.equal(h_out, expected_out)
    assert normed.dtype == torch.bfloat16 == expected_normed.dtype
    torch.testing.assert_close(normed.float(), expected_normed.float(), rtol=8e-3, atol=8e-3)


# ------------------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_kernel_forward_matches_reference(shape, dtype):
    batch, rows, channels, two_d = shape
    h, y, gate, scale, shift = _inputs(batch, rows, channels, dtype, seed=channels + rows, chunked=channels != 64,
                                       two_d=two_d)
    expected_out = ref.gated_residual(h, y, gate)  # eager torch in the storage dtype
    got = F.gated_residual(h, y, gate, backend="triton")
    assert got.shape == h.shape and got.dtype == dtype and torch.equal(got, expected_out)
    h_out, normed = F.gated_residual_layer_norm_modulate(h, y, gate, scale, shift, backend="triton")
    assert torch.equal(h_out, expected_out)
    # the LayerNorm reads h_out as rounded to its dtype
    expected = ref.layer_norm_modulate(*upcast(expected_out, scale, shift))
    assert normed.shape == h.shape and normed.dtype == dtype
    rtol, atol = FWD_TOL[dtype]
    torch.testing.assert_close(normed.float(), expected, rtol=rtol, atol=atol)


BWD_SHAPES = [(3, 5, 7, False), (1, 77, 64, False), (3, 1, 64, True), (3, 77, 1536, False), (1, 5, 3072, False),
              (2, 3, 6144, False)]
# which of (h, y, gate, scale, shift) require grad: LoRA (activations only, the adaLN linear
# frozen), full fine-tune, no dh, modulation only
GRAD_MODES = {"lora": (True, True, False, False, False), "full": (True, True, True, True, True),
              "no_dh": (False, True, True, True, False), "modulation_only": (False, False, True, True, True)}
# which outputs reach the loss: both, normed only (g_hout absent), h_out only (g_normed absent)
USES = ("both", "normed", "h_out")

BWD_CASES = [(shape, dtype, mode, "both") for shape in BWD_SHAPES for dtype in (torch.float32, torch.bfloat16)
             for mode in ("lora", "full")]
BWD_CASES += [(shape, torch.float32, mode, use) for shape in BWD_SHAPES if shape[2] < 1536
              for mode in GRAD_MODES for use in USES if (mode, use) not in (("lora", "both"), ("full", "both"))]
BWD_CASES += [(BWD_SHAPES[-1], torch.float32, "full", use) for use in ("normed", "h_out")]


def _loss(h_out, normed, use, seed):
    g = torch.Generator().manual_seed(seed)
    g_out, g_normed = (torch.randn(h_out.shape, generator=g).to(DEVICE) for _ in range(2))
    terms = []
    if use in ("both", "h_out"):
        terms.append((h_out.float() * g_out).sum())
    if use in ("both", "normed"):
        terms.append((normed.float() * g_normed).sum())
    return sum(terms)


@pytest.mark.parametrize("shape, dtype, mode, use", BWD_CASES, ids=str)
def test_fused_backward_matches_autograd_through_the_reference(shape, dtype, mode, use):
    batch, rows, channels, two_d = shape
    inputs = _inputs(batch, rows, channels, dtype, seed=7 * channels + rows, two_d=two_d)
    needs = GRAD_MODES[mode]
    ours = [t.detach().clone().requires_grad_(need) for t, need in zip(inputs, needs)]
    _loss(*F.gated_residual_layer_norm_modulate(*ours, backend="triton"), use, 3).backward()
    truth = [t.requires_grad_(need) for t, need in zip(upcast(*inputs), needs)]
    _loss(*ref.gated_residual_layer_norm_modulate(*truth), use, 3).backward()
    # normed unused: autograd leaves dscale / dshift None
    assert_gradients_close(("dh", "dy", "dgate", "dscale", "dshift"), ours, truth, needs, dtype,
                           1e-5 if dtype == torch.float32 else 2e-2, none_when_unused=True)


RES_BWD_CASES = [(shape, dtype, needs) for shape in BWD_SHAPES[:4] for dtype in (torch.float32, torch.bfloat16)
                 for needs in ((True, True, False), (True, True, True), (False, False, True), (False, True, False))]


@pytest.mark.parametrize("shape, dtype, needs", RES_BWD_CASES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_residual_backward_matches_autograd_through_the_reference(shape, dtype, needs, backend):
    batch, rows, channels, two_d = shape
    h, y, gate = _inputs(batch, rows, channels, dtype, seed=channels + 2 * rows, two_d=two_d)[:3]
    ours = [t.detach().clone().requires_grad_(need) for t, need in zip((h, y, gate), needs)]
    grad = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    F.gated_residual(*ours, backend=backend).backward(grad)
    truth = [t.requires_grad_(need) for t, need in zip(upcast(h, y, gate), needs)]
    ref.gated_residual(*truth).backward(grad.float())
    assert_gradients_close(("dh", "dy", "dgate"), ours, truth, needs, dtype, 1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("use", USES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_registered_ops_backward_on_both_backends(dtype, use):
    """The registered op's backward (what torch.compile runs): its written-out reference formulas and
    the kernels, with an absent g_hout / g_normed, against autograd through the expression."""
    inputs = _inputs(2, 5, 16, dtype, seed=11)
    truth = [t.requires_grad_() for t in upcast(*inputs)]
    _loss(*ref.gated_residual_layer_norm_modulate(*truth), use, 4).backward()
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    for backend in ("reference", "triton"):
        ours = [t.detach().clone().requires_grad_() for t in inputs]
        out_dtype = ref.gated_residual_layer_norm_modulate(*inputs)[1].dtype
        _loss(*gated_residual_layer_norm_modulate_op(*ours, 1e-6, out_dtype, False, backend), use, 4).backward()
        for name, a, b in zip(("dh", "dy", "dgate", "dscale", "dshift"), ours, truth):
            if b.grad is None:  # normed unused: the op's gradient is zero
                assert a.grad is None or not a.grad.any(), name
                continue
            assert a.grad.dtype == dtype, name
            atol = rtol * max(b.grad.abs().max().item(), 1e-6)
            torch.testing.assert_close(a.grad.float(), b.grad, rtol=rtol, atol=atol,
                                       msg=lambda m, name=name, backend=backend: f"{backend} {name}: {m}")


def test_kernel_backward_is_deterministic_across_chunks():
    h, y, gate, scale, shift = _inputs(2, 77, 64, torch.float32)
    grads = []
    for _ in range(2):
        g, s = gate.detach().clone().requires_grad_(), scale.detach().clone().requires_grad_()
        outs = F.gated_residual_layer_norm_modulate(h, y, g, s, shift, backend="triton")
        sum(o.square().sum() for o in outs).backward()
        grads.append((g.grad, s.grad))
    assert kernels.launch_config(2, 77, 64)[1] > 1  # really split over several programs
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_chunked_gate_scale_shift_are_read_in_place(monkeypatch):
    h, y, gate, scale, shift = _inputs(3, 5, 64, torch.bfloat16)
    assert gate.stride() == (6 * 64, 1) and not gate.is_contiguous()
    seen = []
    real = kernels.forward

    def spy(h_, y_, gate_, scale_, shift_, *args):
        seen.append(tuple((t.data_ptr(), t.stride()) for t in (h_, y_, gate_, scale_, shift_) if t is not None))
        return real(h_, y_, gate_, scale_, shift_, *args)

    monkeypatch.setattr(kernels, "forward", spy)
    F.gated_residual_layer_norm_modulate(h, y, gate, scale, shift, backend="triton")
    F.gated_residual(h, y, gate, backend="triton")
    assert seen[0] == tuple((t.data_ptr(), t.stride()) for t in (h, y, gate, scale, shift))
    assert seen[1] == tuple((t.data_ptr(), t.stride()) for t in (h, y, gate))


def test_strided_activations_equal_contiguous():
    h, y, gate, scale, shift = _inputs(3, 6, 64, torch.float32, chunked=False)
    ht = h.transpose(0, 1).contiguous().transpose(0, 1)  # strided batch: read in place
    yt = y.transpose(1, 2).contiguous().transpose(1, 2)  # channels not adjacent: copied once
    gt = gate.t().contiguous().t()
    a = F.gated_residual_layer_norm_modulate(ht, yt, gt, scale, shift, backend="triton")
    b = F.gated_residual_layer_norm_modulate(h, y, gate, scale, shift, backend="triton")
    assert all(torch.equal(x, z) for x, z in zip(a, b))
    assert torch.equal(F.gated_residual(ht, yt, gt, backend="triton"), b[0])


def test_wider_rows_than_the_kernel_holds_run_the_reference():
    h, y, gate, scale, shift = _inputs(1, 2, kernels.MAX_C + 1, torch.float32)
    expected = ref.gated_residual_layer_norm_modulate(h, y, gate, scale, shift)
    got = F.gated_residual_layer_norm_modulate(h, y, gate, scale, shift, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(F.gated_residual(h, y, gate, backend="triton"), expected[0])


def test_float64_runs_the_reference_on_every_backend():
    h, y, gate, scale, shift = _inputs(2, 3, 16, torch.float64)
    expected = ref.gated_residual_layer_norm_modulate(h, y, gate, scale, shift)
    for backend in ("reference", "triton"):
        got = F.gated_residual_layer_norm_modulate(h, y, gate, scale, shift, backend=backend)
        assert all(a.dtype == torch.float64 and torch.equal(a, b) for a, b in zip(got, expected))
        got = F.gated_residual(h, y, gate.float(), backend=backend)
        assert torch.equal(got, ref.gated_residual(h, y, gate.float()))


# ------------------------------------------------------------------- custom ops, compile, errors
def _op_inputs(needs=(True,) * 5):
    inputs = _inputs(2, 3, 16, torch.float32)
    return [t.detach().clone().requires_grad_(n) for t, n in zip(inputs, needs)]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    for needs in ((True,) * 5, (True, True, False, False, False)):
        h, y, gate, scale, shift = _op_inputs(needs)
        torch.library.opcheck(gated_residual_op, (h, y, gate, backend))
        torch.library.opcheck(gated_residual_layer_norm_modulate_op,
                              (h, y, gate, scale, shift, 1e-6, torch.float32, False, backend))
    h, y, gate, scale, shift = (t.detach() for t in _op_inputs())
    grad = torch.randn_like(h)
    h_out = h + gate[:, None] * y
    for needs in ((True, True, True), (True, True, False), (False, False, True)):
        torch.library.opcheck(gated_residual_backward_op, (grad, y, gate, torch.float32, *needs, backend))
    for g_out, g_normed in ((grad, grad * 0.5), (None, grad), (grad, None)):
        for needs in ((True,) * 5, (True, True, False, False, False), (False, False, True, True, True)):
            torch.library.opcheck(gated_residual_layer_norm_modulate_backward_op,
                                  (g_out, g_normed, h_out, y, gate, scale, shift, 1e-6, torch.float32, False,
                                   torch.float32, *needs, backend))



@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backward_ops_outputs_match_the_fake_for_permuted_inputs(backend):
    """y and the incoming gradients dense but not contiguous (batch inside tokens): the real
    outputs must have the strides the fakes promise (compiled graphs trust the fake's)."""
    permuted = lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)  # noqa: E731
    h, y, gate, scale, shift = (t.detach() for t in _op_inputs())
    y, grad = permuted(y), permuted(torch.randn_like(h))
    h_out = permuted(h + gate[:, None] * y)
    torch.library.opcheck(gated_residual_backward_op, (grad, y, gate, torch.float32, True, True, True, backend))
    for g_out, g_normed in ((grad, grad * 0.5), (grad, None)):
        torch.library.opcheck(gated_residual_layer_norm_modulate_backward_op,
                              (g_out, g_normed, h_out, y, gate, scale, shift, 1e-6, torch.float32, False,
                               torch.float32, True, True, True, True, True, backend))


@pytest.mark.parametrize("norm", [False, True])
def test_row_offsets_past_int32_in_one_sample(norm):
    """h and y strided so that their last row starts 2^31 + 32 elements into the sample (a token
    stride of 2^30 + 16): 32-bit row offsets wrapped negative and read outside them. 4 GiB of
    address space each, three rows touched; dgate reads y through the same offsets."""
    channels, stride = 16, 2**30 + 16
    strided = []
    for seed in range(2):
        base = torch.empty(2 * stride + channels, dtype=torch.bfloat16, device=DEVICE)
        t = base.as_strided((1, 3, channels), (0, stride, 1))
        t.copy_(torch.randn(1, 3, channels, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16))
        strided.append(t)
    h, y = strided
    gate, scale, shift = (torch.randn(1, channels, device=DEVICE) for _ in range(3))
    gate.requires_grad_()
    run = ((lambda h, y: F.gated_residual_layer_norm_modulate(h, y, gate, scale, shift, backend="triton")) if norm
           else (lambda h, y: (F.gated_residual(h, y, gate, backend="triton"),)))
    got, expected = run(h, y), run(h.contiguous(), y.contiguous())
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    grads = [torch.autograd.grad(out, gate, [torch.ones_like(o) for o in out])[0] for out in (got, expected)]
    assert torch.equal(*grads)

@pytest.mark.parametrize("dtypes", MIXED, ids=str)
def test_frozen_gate_backward_is_one_product_with_the_kernels_bits(dtypes, monkeypatch):
    """A frozen gate (LoRA, a no-grad adaLN): the eager backward hands back the incoming gradient as dh
    and `grad * gate` as dy, without the kernel, where that product has y's dtype (one dtype
    throughout); the same bits as the registered op's backward (the kernel) in every mix."""
    from sfgrpo.ops import gated_residual as ops

    h, y, gate, _, _ = _inputs(3, 7, 64, None, seed=9, dtypes=dtypes)
    h, y = h.requires_grad_(), y.requires_grad_()
    kernel_calls = []
    monkeypatch.setattr(kernels, "backward", lambda *a, f=kernels.backward: kernel_calls.append(1) or f(*a))
    results = []
    for eager in (True, False):
        h.grad = y.grad = None
        out = F.gated_residual(h, y, gate, backend="triton") if eager else ops.gated_residual_op(h, y, gate, "triton")
        out.backward(torch.linspace(-2, 3, out.numel(), device=DEVICE).reshape(out.shape).to(out.dtype))
        results.append((h.grad, y.grad))
        if eager:
            uniform = len(set(dtypes)) == 1
            assert kernel_calls == ([] if uniform else [1])
    for got, expected in zip(*results):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_eager_fast_path_equals_the_registered_op():
    h, y, gate, scale, shift = _op_inputs()
    results = []
    for eager in (True, False):
        for t in (h, y, gate, scale, shift):
            t.grad = None
        if eager:
            outs = F.gated_residual_layer_norm_modulate(h, y, gate, scale, shift, backend="triton")
        else:
            outs = gated_residual_layer_norm_modulate_op(h, y, gate, scale, shift, 1e-6, torch.float32, False, "triton")
        (outs[0].square().sum() + outs[1].square().sum()).backward()
        results.append([*outs, *(t.grad.clone() for t in (h, y, gate, scale, shift))])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("backend", [None, "triton"])  # None on CPU: the reference traced; triton: the ops
def test_torch_compile_fullgraph_has_no_graph_break(backend):
    h, y = _inputs(2, 5, 32, torch.float32)[:2]

    def loss_fn(h, y, emb):
        _, _, gate_msa, shift, scale, gate_mlp = emb.chunk(6, dim=1)
        h, normed = F.gated_residual_layer_norm_modulate(h, y, gate_msa, scale, shift, backend=backend)
        h = F.gated_residual(h, normed.tanh(), gate_mlp, backend=backend)
        return h.square().mean()

    emb = torch.randn(2, 6 * 32, device=DEVICE)
    args1 = [t.detach().clone().requires_grad_() for t in (h, y, emb)]
    args2 = [t.detach().clone().requires_grad_() for t in (h, y, emb)]
    torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*args1).backward()
    loss_fn(*args2).backward()
    for a, b in zip(args1, args2):
        torch.testing.assert_close(a.grad, b.grad)
    # and inductor compiles it (around the ops, which are opaque to it)
    torch.testing.assert_close(torch.compile(loss_fn, fullgraph=True)(h, y, emb), loss_fn(h, y, emb))


def test_torch_compile_under_autocast_gives_the_eager_bits():
    def fused(h, y, emb):
        gate, shift, scale = emb.chunk(6, dim=1)[2:5]
        return F.gated_residual_layer_norm_modulate(h, y, gate, scale, shift)

    h, y = torch.randn(2, 5, 32, device=DEVICE), torch.randn(2, 5, 32, device=DEVICE)
    emb = torch.randn(2, 192, device=DEVICE)
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")(h, y, emb)
        eager = fused(h, y, emb)
    assert compiled[1].dtype == torch.bfloat16 and all(torch.equal(a, b) for a, b in zip(compiled, eager))


def test_top_level_exports():
    assert sfgrpo.gated_residual is F.gated_residual
    assert sfgrpo.gated_residual_layer_norm_modulate is F.gated_residual_layer_norm_modulate
    assert "gated_residual" in sfgrpo.__all__ and "gated_residual_layer_norm_modulate" in sfgrpo.__all__


def test_bad_inputs_give_clear_errors():
    h, y, gate, scale, shift = _inputs(2, 3, 8, torch.float32)
    fused = F.gated_residual_layer_norm_modulate
    with pytest.raises(ValueError, match="at least 2 dims"):
        F.gated_residual(h[0, 0], y[0, 0], gate)
    with pytest.raises(ValueError, match=r"y must have h's shape \(2, 3, 8\)"):
        F.gated_residual(h, y[:, :2], gate)
    with pytest.raises(ValueError, match=r"gate must have shape \[B, C\] = \[2, 8\]"):
        F.gated_residual(h, y, gate[:, :4])
    with pytest.raises(ValueError, match="gate must have shape"):
        F.gated_residual(h, y, gate[:, None])
    with pytest.raises(ValueError, match="scale must have shape"):
        fused(h, y, gate, scale[:1], shift)
    with pytest.raises(ValueError, match="shift must have shape"):
        fused(h, y, gate, scale, shift[:, :7])
    with pytest.raises(ValueError, match="gate is on meta"):
        F.gated_residual(h, y, gate.to("meta"))
    with pytest.raises(ValueError, match="y is on meta"):
        fused(h, y.to("meta"), gate, scale, shift)
    with pytest.raises(TypeError, match="y must be float32, bfloat16, float16 or float64"):
        F.gated_residual(h, y.int(), gate)
    with pytest.raises(TypeError, match="shift must be float32"):
        fused(h, y, gate, scale, shift.long())
    with pytest.raises(TypeError, match="gate must be a tensor"):
        F.gated_residual(h, y, 0.5)
    for eps in (-1e-6, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eps must be finite and >= 0"):
            fused(h, y, gate, scale, shift, eps)
    with pytest.raises(TypeError, match="eps must be a number"):
        fused(h, y, gate, scale, shift, torch.tensor(1e-6))
    with pytest.raises(ValueError, match="SFGRPO_BACKEND|backend argument"):
        F.gated_residual(h, y, gate, backend="cuda-ish")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", [(0, 4, 8), (2, 0, 8), (2, 3, 0), (0, 8)], ids=str)
def test_empty_inputs(shape, backend):
    batch, channels = shape[0], shape[-1]
    h, y = (torch.zeros(shape, device=DEVICE, requires_grad=True) for _ in range(2))
    gate, scale, shift = (torch.zeros(batch, channels, device=DEVICE, requires_grad=True) for _ in range(3))
    out = F.gated_residual(h, y, gate, backend=backend)
    assert out.shape == shape and out.dtype == torch.float32
    h_out, normed = F.gated_residual_layer_norm_modulate(h, y, gate, scale, shift, backend=backend)
    assert h_out.shape == normed.shape == shape
    (out.sum() + h_out.sum() + normed.sum()).backward()
    assert h.grad.shape == y.grad.shape == shape
    # sums over no rows are zero
    for t in (gate, scale, shift):
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA matter")
def test_cuda_forward_and_backward_never_sync_the_host():
    inputs = _inputs(2, 77, 1536, torch.bfloat16)
    ours = [t.detach().clone().requires_grad_() for t in inputs]
    grads = [torch.randn_like(ours[0]) for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        h_out, normed = F.gated_residual_layer_norm_modulate(*ours)
        out = F.gated_residual(h_out, normed, ours[2])
        torch.autograd.backward((out, h_out, normed), grads)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(t.grad is not None for t in ours)
