"""sfgrpo.lora_linear (the fused LoRA linear) against peft's expression, and sfgrpo.models.fused_lora
inside peft-adapted diffusers transformers (SD3.5-M's and FLUX.1's architectures at small width)."""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sfgrpo import functional as F
from sfgrpo import reference as ref
from sfgrpo.ops.lora_linear import lora_linear_op

peft = pytest.importorskip("peft")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the op on CUDA when there is one (cuBLAS)


def _inputs(shape=(3, 7, 24), out=20, rank=4, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    weight = (torch.randn(out, shape[-1], generator=g) / shape[-1] ** 0.5).to(dtype)
    b = torch.randn(out, generator=g).to(dtype) if bias else None
    lora_a = (torch.randn(rank, shape[-1], generator=g) / shape[-1] ** 0.5).to(dtype)
    lora_b = torch.randn(out, rank, generator=g).to(dtype)
    return tuple(t.to(DEVICE) if t is not None else None for t in (x, weight, b, lora_a, lora_b))


def _grads(fn, inputs, scaling, wanted=(0, 1, 2, 3, 4), seed=1):
    leaves = [t.detach().clone().requires_grad_(i in wanted) if t is not None else None for i, t in enumerate(inputs)]
    y = fn(*leaves, scaling)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, y.dtype)
    y.backward(g)
    return y.detach(), [t.grad if t is not None and i in wanted else None for i, t in enumerate(leaves)]


# ------------------------------------------------------------------------------ the op
@pytest.mark.parametrize("shape", [(3, 7, 24), (5, 24), (24,), (2, 3, 4, 24), (0, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_peft_expression_forward_and_every_gradient(shape, bias):
    inputs = _inputs(shape, bias=bias)
    y, grads = _grads(F.lora_linear, inputs, 0.75)
    y_ref, grads_ref = _grads(ref.lora_linear, inputs, 0.75)
    assert y.shape == y_ref.shape == (*shape[:-1], 20)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("dx", "dweight", "dbias", "dA", "dB"), grads, grads_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_frozen_base_gets_no_gradient_and_only_needed_gemms_run():
    """LoRA training: the base weight and bias are frozen, x may not need a gradient either."""
    inputs = _inputs()
    y, grads = _grads(F.lora_linear, inputs, 2.0, wanted=(3, 4))
    _, grads_ref = _grads(ref.lora_linear, inputs, 2.0, wanted=(3, 4))
    assert grads[:3] == [None, None, None]
    for a, b in zip(grads[3:], grads_ref[3:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_is_closer_to_fp32_than_peft_expression():
    """One rounding at the end of the GEMMs instead of one per op."""
    inputs = _inputs((4, 33, 64), out=48, rank=8)
    exact = ref.lora_linear(*(t.double() for t in inputs), 0.5)
    low = [t.bfloat16() for t in inputs]
    fused, peft_like = F.lora_linear(*low, 0.5), ref.lora_linear(*low, 0.5)
    assert fused.dtype == torch.bfloat16
    err_fused = (fused.double() - exact).abs().max()
    err_peft = (peft_like.double() - exact).abs().max()
    assert err_fused <= err_peft
    torch.testing.assert_close(fused.float(), peft_like.float(), atol=0.1, rtol=0.02)


def test_autocast_computes_in_the_autocast_dtype_with_fp32_adapters():
    """sfgrpo's and Flow-GRPO's setting: bf16 base, fp32 adapters, bf16 autocast. The output is the
    autocast dtype, the adapters' gradients fp32, like peft's under autocast."""
    x, weight, bias, lora_a, lora_b = _inputs((2, 9, 32), out=16, rank=4)
    x, weight, bias = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
    results = []
    for fn in (F.lora_linear, ref.lora_linear):
        a, b = lora_a.clone().requires_grad_(), lora_b.clone().requires_grad_()
        xg = x.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = fn(xg, weight, bias, a, b, 0.5)
        y.float().square().sum().backward()
        assert y.dtype == torch.bfloat16 and xg.grad.dtype == torch.bfloat16
        assert a.grad.dtype == b.grad.dtype == torch.float32
        results.append((y.float(), xg.grad.float(), a.grad, b.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.03)


def test_output_may_be_modified_in_place():
    inputs = [t.requires_grad_() for t in _inputs()]
    y = F.lora_linear(*inputs, 0.5)
    y.mul_(2.0)  # a view made inside a custom autograd.Function would refuse this
    y.sum().backward()
    leaves = [t.detach().clone().requires_grad_() for t in _inputs()]
    (2.0 * ref.lora_linear(*leaves, 0.5)).sum().backward()
    for got, want in zip(inputs, leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)


def test_backward_runs_gemms_and_no_full_size_elementwise_pass():
    """The point of the op: on `[M, out]` / `[M, in]` tensors only GEMMs, forward and backward (peft:
    the scaling product and the sum forward, the scaled gradient and the gradient sum backward)."""
    x, weight, bias, lora_a, lora_b = _inputs((4, 64, 32), out=48, rank=4)
    lora_a.requires_grad_(), lora_b.requires_grad_(), x.requires_grad_()
    full_sizes = {4 * 64 * 32, 4 * 64 * 48}
    ops = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() in full_sizes:
                ops.append(func.overloadpacket.__name__)
            return out

    grad = torch.randn(4, 64, 48, device=DEVICE)
    for fn, expected_extra in ((F.lora_linear, False), (ref.lora_linear, True)):
        ops.clear()
        with Recorder():
            y = fn(x, weight, bias, lora_a, lora_b, 0.5)
            torch.autograd.backward(y, grad)
        moves_nothing = ("view", "_unsafe_view", "t", "detach", "alias", "expand", "reshape", "empty", "empty_like")
        elementwise = [op for op in ops if op not in ("mm", "addmm", "addmm_") + moves_nothing]
        assert bool(elementwise) == expected_extra, ops
        x.grad = lora_a.grad = lora_b.grad = None


def test_opcheck():
    x, weight, bias, lora_a, lora_b = _inputs((6, 24))
    torch.library.opcheck(lora_linear_op, (x.requires_grad_(), weight, bias, lora_a.requires_grad_(),
                                           lora_b.requires_grad_(), 0.5))
    torch.library.opcheck(lora_linear_op, (x, weight, None, lora_a, lora_b, 2.0))


def test_torch_compile_fullgraph_has_no_graph_break():
    inputs = [t.requires_grad_() for t in _inputs()]

    def loss(x, weight, bias, a, b):
        return F.lora_linear(x, weight, bias, a, b, 0.5).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*inputs), inputs)
    want = torch.autograd.grad(loss(*inputs), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad, message", [
    (lambda i: (i[0][..., :5], *i[1:]), "do not chain"),
    (lambda i: (i[0], i[1], i[2][:3], *i[3:]), "bias must be"),
    (lambda i: (i[0], i[1], i[2], i[3], i[4][:, :2]), "do not chain"),
    (lambda i: (i[0].long(), *i[1:]), "floating-point"),
    (lambda i: (i[0], i[1].unsqueeze(0), *i[2:]), "must be"),
])
def test_bad_inputs_are_clear_errors(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        F.lora_linear(*bad(_inputs()), 0.5)
    with pytest.raises(TypeError, match="scaling"):
        F.lora_linear(*_inputs(), "0.5")
    for scaling in (float("nan"), float("inf")):  # would fill the output with NaN / inf
        with pytest.raises(ValueError, match="scaling must be finite"):
            F.lora_linear(*_inputs(), scaling)


# ------------------------------------------------------------- fused LoRA in peft models
def _adapted(name="sd35m-small", rank=4, dropout=0.0, seed=1, **lora):
    from peft import LoraConfig

    from sfgrpo.bench import configs

    transformer = configs.random_transformer(name, seed=seed)
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                       "add_v_proj", "to_add_out"], **lora))
    with torch.no_grad():  # non-zero B: gaussian init leaves it at 0, which would hide the adapter's path
        for name_, p in transformer.named_parameters():
            if "lora_B" in name_:
                p.normal_(0, 0.05)
    return transformer


def _run(transformer, inputs):
    out = transformer(**inputs, return_dict=False)[0]
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}
    transformer.zero_grad(set_to_none=True)
    return out.detach(), grads


def _lora_params(transformer):
    for n, p in transformer.named_parameters():
        p.requires_grad_("lora_" in n)


@pytest.mark.parametrize("name", ["sd35m-small", "flux1-dev-small"])
def test_fused_transformer_matches_peft(name):
    from test_fused_norms import ARCHITECTURES

    from sfgrpo.models.fused_lora import fuse_lora, fused_lora_count, unfuse_lora

    original = _adapted(name)
    _lora_params(original)
    fused = copy.deepcopy(original)
    keys = list(fused.state_dict())
    swapped = fuse_lora(fused)
    assert swapped == fused_lora_count(fused) > 0
    assert swapped == sum(isinstance(m, peft.tuners.lora.Linear) for m in original.modules())
    assert fuse_lora(fused) == 0 or fused_lora_count(fused) == swapped  # idempotent
    assert list(fused.state_dict()) == keys
    inputs = ARCHITECTURES[name](original)
    want_out, want_grads = _run(original, inputs)
    got_out, got_grads = _run(fused, inputs)
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == 2 * swapped
    for key in want_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], atol=1e-5, rtol=1e-4, msg=key)
    assert unfuse_lora(fused) == swapped and fused_lora_count(fused) == 0
    assert all(type(m) is peft.tuners.lora.Linear for m in fused.modules() if isinstance(m, peft.tuners.lora.Linear))


def test_reference_backend_and_unsupported_layers_run_peft_exactly(monkeypatch):
    """SFGRPO_BACKEND=reference (the benchmarks' plain-PyTorch loop), disabled adapters, dropout and
    mixed dtypes without autocast: peft's own forward, the same bits."""
    from test_fused_norms import ARCHITECTURES

    from sfgrpo.models.fused_lora import fuse_lora

    def same(original, fused, inputs):
        a, b = _run(original, inputs), _run(fused, inputs)
        assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])

    original = _adapted()
    _lora_params(original)
    fused = copy.deepcopy(original)
    fuse_lora(fused)
    inputs = ARCHITECTURES["sd35m-small"](original)
    monkeypatch.setenv("SFGRPO_BACKEND", "reference")
    same(original, fused, inputs)
    monkeypatch.delenv("SFGRPO_BACKEND")
    original.disable_adapters(), fused.disable_adapters()
    with torch.no_grad():
        assert torch.equal(original(**inputs, return_dict=False)[0], fused(**inputs, return_dict=False)[0])
    original.enable_adapters(), fused.enable_adapters()
    # dropout: peft's forward (training mode draws masks: same seed, same masks)
    original, fused = _adapted(dropout=0.1), _adapted(dropout=0.1)
    fuse_lora(fused)
    _lora_params(original), _lora_params(fused)
    torch.manual_seed(3)
    a = _run(original, inputs)
    torch.manual_seed(3)
    b = _run(fused, inputs)
    assert torch.equal(a[0], b[0])
    # fp32 adapters on a bf16 base without autocast: peft computes the adapter in fp32
    original = _adapted().to(torch.bfloat16)
    for n, p in original.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    _lora_params(original)
    fused = copy.deepcopy(original)
    fuse_lora(fused)
    low = {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}
    same(original, fused, low)


def test_dora_adapters_keep_peft_forward():
    from sfgrpo.models.fused_lora import fuse_lora

    original = _adapted(use_dora=True)
    fused = copy.deepcopy(original)
    fuse_lora(fused)
    x = torch.randn(2, 5, original.config.caption_projection_dim)
    layer = next(m for n, m in original.named_modules() if n.endswith("attn.to_q"))
    fused_layer = next(m for n, m in fused.named_modules() if n.endswith("attn.to_q"))
    assert torch.equal(layer(x), fused_layer(x))


def test_trainer_fuses_lora_by_default_and_flag_turns_it_off(tmp_path):
    import argparse

    from sfgrpo import Trainer, TrainerConfig
    from sfgrpo.models.fused_lora import fused_lora_count
    from sfgrpo.trainer.cli_args import add_config_arguments, config_from_args

    small = dict(group_size=2, num_steps=2, use_lora=True, lora_rank=2, prompts="0,1", output_dir=str(tmp_path))
    on = Trainer(TrainerConfig(**small))
    assert fused_lora_count(on.model.transformer) > 0
    off = Trainer(TrainerConfig(**small, fused_lora=False))
    assert fused_lora_count(off.model.transformer) == 0
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert config_from_args(parser.parse_args(["--no-fused-lora"])).fused_lora is False
    assert config_from_args(parser.parse_args([])).fused_lora is True


def test_adapted_fused_transformer_compiles_without_graph_break_under_autocast():
    from test_fused_norms import ARCHITECTURES

    from sfgrpo.models.fused_lora import fuse_lora
    from sfgrpo.models.fused_norms import fuse_norms

    model = _adapted()
    _lora_params(model)
    fuse_lora(model), fuse_norms(model)
    inputs = ARCHITECTURES["sd35m-small"](model)

    def velocity(**kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**kwargs, return_dict=False)[0]

    compiled = torch.compile(velocity, fullgraph=True, backend="aot_eager")
    got = compiled(**inputs)
    got.float().square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    assert torch.equal(got, velocity(**inputs))


def _one_layer(dtype=torch.float32, rank=4):
    """A peft-adapted single Linear (fused and plain copies), B non-zero."""
    from peft import LoraConfig, inject_adapter_in_model

    from sfgrpo.models.fused_lora import fuse_lora

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = nn.Linear(24, 20)

        def forward(self, x):
            return self.to_q(x)

    torch.manual_seed(0)
    plain = Holder().to(dtype)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["to_q"]), plain)
    with torch.no_grad():
        plain.to_q.lora_B["default"].weight.normal_(0, 0.1)
    fused = copy.deepcopy(plain)
    assert fuse_lora(fused) == 1
    return plain, fused


def test_float64_under_autocast_keeps_peft_forward():
    """Autocast leaves float64 alone, so peft computes in float64 there: so must the fused layer."""
    plain, fused = _one_layer(torch.float64)
    x = torch.randn(3, 24, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = plain(x), fused(x)
    assert got.dtype == want.dtype == torch.float64 and torch.equal(got, want)


def test_hooks_on_the_wrapped_modules_keep_peft_forward():
    """A hook on the base layer (diffusers' layerwise casting and offloading work through hooks and
    wrapped forwards) runs in peft's forward; the fused one reads the weights directly, so it must
    not run then."""
    plain, fused = _one_layer()
    x = torch.randn(3, 24)
    for model in (plain, fused):
        model.to_q.base_layer.register_forward_hook(lambda module, args, out: out * 0)
    assert torch.equal(fused(x), plain(x))
    plain, fused = _one_layer()
    for model in (plain, fused):
        original = model.to_q.lora_A["default"].forward
        model.to_q.lora_A["default"].forward = lambda t, original=original: 2 * original(t)
    assert torch.equal(fused(x), plain(x))


def test_mixed_bias_dtype_without_autocast_behaves_like_peft():
    plain, fused = _one_layer()
    for model in (plain, fused):
        model.to_q.base_layer.bias.data = model.to_q.base_layer.bias.data.double()
    x = torch.randn(3, 24)
    with pytest.raises(RuntimeError) as want:
        plain(x)
    with pytest.raises(RuntimeError) as got:
        fused(x)
    assert type(got.value) is type(want.value)


def test_double_backward_is_an_error_not_a_wrong_answer():
    x, weight, bias, lora_a, lora_b = (t.requires_grad_() if t is not None else t for t in _inputs())
    y = F.lora_linear(x, weight, bias, lora_a, lora_b, 0.5)
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    for wrt in (x, lora_a, lora_b):  # the first backward's graph ends at the op: no second-order terms
        with pytest.raises(RuntimeError):
            torch.autograd.grad(dx.square().sum(), wrt, retain_graph=True)


def test_registered_op_gradients_through_both_outputs():
    """`h` is an output of the registered op (saved for its backward); a caller that reads it gets
    its gradient too."""
    x, weight, bias, lora_a, lora_b = _inputs((6, 24))
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, lora_a, lora_b)]
    y, h = lora_linear_op(*leaves, 0.5)
    (y.square().sum() + 3.0 * h.sum()).backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, bias, lora_a, lora_b)]
    xr, wr, br, ar, bbr = ref_leaves
    (ref.lora_linear(xr, wr, br, ar, bbr, 0.5).square().sum() + 3.0 * (xr @ ar.t()).sum()).backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)


def test_fused_model_pickles_with_its_fused_classes():
    import io

    from sfgrpo.models.fused_norms import fuse_norms

    model = _adapted()
    fuse_norms(model)
    from sfgrpo.models.fused_lora import fuse_lora

    fuse_lora(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]


@pytest.mark.parametrize("mixed_precision, tolerance", [("no", 1e-5), ("bf16", 2e-2)])
def test_trainer_lora_iterations_match_peft(tmp_path, monkeypatch, mixed_precision, tolerance):
    """Two training iterations with the fused LoRA layers give the adapters peft's layers give (fp32:
    to rounding; bf16 autocast: to bf16 noise), and the fused path is the one that ran."""
    from sfgrpo import Trainer, TrainerConfig
    from sfgrpo import functional as functional_module

    calls = []
    fused_linear = functional_module.lora_linear
    monkeypatch.setattr(functional_module, "lora_linear", lambda *a, **k: calls.append(1) or fused_linear(*a, **k))
    adapters = {}
    for fused in (True, False):
        config = TrainerConfig(output_dir=str(tmp_path / str(fused)), backbone="tiny-random", reward="brightness",
                               iterations=2, prompts_per_iteration=2, group_size=3, num_steps=4, progress=False,
                               plots=False, use_lora=True, lora_rank=4, mixed_precision=mixed_precision,
                               fused_lora=fused, learning_rate=1e-3)
        trainer = Trainer(config)
        before = len(calls)
        for _ in range(2):
            trainer.train_iteration()
        assert (len(calls) > before) == fused
        adapters[fused] = {n: p.detach().clone() for n, p in trainer.trainable.items()}
    assert adapters[True].keys() == adapters[False].keys() and adapters[True]
    for name in adapters[True]:
        torch.testing.assert_close(adapters[True][name], adapters[False][name], atol=tolerance, rtol=tolerance,
                                   msg=name)
