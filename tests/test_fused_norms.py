"""sfgrpo.models.fused_norms: diffusers' adaLN modulations and QK RMSNorms swapped for sfgrpo's fused
ops inside real transformer architectures (SD3.5-M's and FLUX.1's blocks at small width)."""

import copy

import pytest
import torch
from torch import nn

from sfgrpo.bench import configs
from sfgrpo.models import fused_norms
from sfgrpo.models.fused_norms import fuse_norms, fused_norm_count, unfuse_norms
from norm_grads import DEVICE  # tests/ helper: where the Triton kernels run (the interpreter without a GPU)

pytest.importorskip("diffusers")
from diffusers.models.attention import JointTransformerBlock  # noqa: E402
from diffusers.models.normalization import (  # noqa: E402
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    RMSNorm,
    SD35AdaLayerNormZeroX,
)


def _sd3_inputs(model, batch=2, grid=8, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return dict(
        hidden_states=torch.randn(batch, c.in_channels, grid, grid, generator=g),
        encoder_hidden_states=torch.randn(batch, tokens, c.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
        timestep=torch.tensor([700.0, 300.0][:batch]),
    )


def _flux_inputs(model, batch=2, grid=4, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    image = grid * grid
    ids = torch.zeros(image, 3)
    ids[:, 1] = torch.arange(grid).repeat_interleave(grid)
    ids[:, 2] = torch.arange(grid).repeat(grid)
    return dict(
        hidden_states=torch.randn(batch, image, c.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, tokens, c.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.7, 0.3][:batch]),
        img_ids=ids, txt_ids=torch.zeros(tokens, 3), guidance=torch.full((batch,), 3.5),
    )


ARCHITECTURES = {"sd35m-small": _sd3_inputs, "flux1-dev-small": _flux_inputs}


def _to_device(value):
    """Modules (in place), tensors and dicts / tuples of them on DEVICE."""
    if isinstance(value, dict):
        return {k: _to_device(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_to_device(v) for v in value)
    return value.to(DEVICE)


def _pair(name):
    original = configs.random_transformer(name, seed=1)
    fused = copy.deepcopy(original)
    return original, fused


def _kinds(model):
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, fused_norms._Fused)})


def test_sd35_blocks_get_every_norm_swapped():
    original, fused = _pair("sd35m-small")
    before = {n: type(m) for n, m in original.named_modules()}
    count = fuse_norms(fused)
    expected = sum(type(m) in (AdaLayerNormZero, AdaLayerNormZeroSingle, SD35AdaLayerNormZeroX,
                               AdaLayerNormContinuous, RMSNorm, JointTransformerBlock) for m in original.modules())
    assert count == expected == fused_norm_count(fused) > 0
    # SD3.5-M: the dual-attention block's norm1 (x2 modulations), the context norms, QK RMSNorms
    # of both streams and of the second attention, the output norm, the blocks' residual tails
    assert _kinds(fused) == ["FusedAdaLayerNormContinuous", "FusedAdaLayerNormZero", "FusedJointTransformerBlock",
                             "FusedRMSNorm", "FusedSD35AdaLayerNormZeroX"]
    assert fuse_norms(fused) == 0  # idempotent: nothing left to swap
    # same modules, parameters and state-dict keys: checkpoints and LoRA targets are unaffected
    assert list(fused.state_dict()) == list(original.state_dict())
    assert [n for n, _ in fused.named_modules()] == list(before)
    assert unfuse_norms(fused) == count and fused_norm_count(fused) == 0
    assert {n: type(m) for n, m in fused.named_modules()} == before


def test_flux_swaps_the_modulations_blocks_and_attention():
    original, fused = _pair("flux1-dev-small")
    fuse_norms(fused)
    assert _kinds(fused) == ["FusedAdaLayerNormContinuous", "FusedAdaLayerNormZero", "FusedAdaLayerNormZeroSingle",
                             "FusedFluxAttention", "FusedFluxSingleTransformerBlock", "FusedFluxTransformerBlock"]
    # the QK norms stay torch.nn.RMSNorm modules (their weights): the fused attention reads them
    assert any(type(m) is nn.RMSNorm for m in fused.modules())


def _count_qk_norm_rope(monkeypatch):
    from sfgrpo import functional
    from sfgrpo.models import fused_attention

    calls = []
    original = functional.qk_norm_rope

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_attention.F, "qk_norm_rope", counted)
    return calls


def test_flux_attention_runs_one_fused_pass_per_stream_and_tensor(monkeypatch):
    """Triton backend: q and k of each stream through `qk_norm_rope` (4 calls in a double block, 2 in
    a single block); the reference backend (CPU default) runs diffusers' processor (no call)."""
    from sfgrpo.backend import ENV_VAR

    original, fused = _pair("flux1-dev-small")
    fuse_norms(fused)
    calls = _count_qk_norm_rope(monkeypatch)
    inputs = _flux_inputs(original, batch=1)
    assert torch.equal(fused(**inputs, return_dict=False)[0], original(**inputs, return_dict=False)[0])
    assert calls == []
    monkeypatch.setenv(ENV_VAR, "triton")
    fused.to(DEVICE)(**_to_device(inputs), return_dict=False)
    doubles, singles = len(fused.transformer_blocks), len(fused.single_transformer_blocks)
    assert len(calls) == 4 * doubles + 2 * singles


def test_flux_attention_falls_back_to_diffusers_processor(monkeypatch):
    """Another processor, extra attention kwargs or rotary tables of another form: diffusers' own
    processor runs (no fused call), with the same result as the unswapped module."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    from sfgrpo.backend import ENV_VAR

    monkeypatch.setenv(ENV_VAR, "triton")
    torch.manual_seed(0)
    attn = FluxAttention(query_dim=32, heads=2, dim_head=16, added_kv_proj_dim=32, bias=True, eps=1e-6).to(DEVICE)
    fused = copy.deepcopy(attn)
    assert fuse_norms(fused) == 1
    calls = _count_qk_norm_rope(monkeypatch)
    hidden, text = _to_device((torch.randn(1, 6, 32), torch.randn(1, 3, 32)))
    angles = torch.rand(9, 8, device=DEVICE).repeat_interleave(2, dim=1)
    tables = (angles.cos(), angles.sin())
    torch.testing.assert_close(fused(hidden, text, image_rotary_emb=tables)[0], attn(hidden, text, image_rotary_emb=tables)[0],
                               atol=2e-6, rtol=1e-5)
    assert len(calls) == 4

    class OtherProcessor(type(attn.processor)):  # a subclass may compute something else
        pass

    calls.clear()
    for module in (attn, fused):
        module.set_processor(OtherProcessor())
    assert torch.equal(fused(hidden, text, image_rotary_emb=tables)[0], attn(hidden, text, image_rotary_emb=tables)[0])
    fused.set_processor(type(attn.processor)())
    wrong_shape = (tables[0][:5], tables[1][:5])
    with pytest.raises(RuntimeError):  # diffusers' own error for tables that do not fit the tokens
        fused(hidden, text, image_rotary_emb=wrong_shape)
    with_grad = (tables[0].clone().requires_grad_(), tables[1])  # diffusers differentiates through them
    torch.testing.assert_close(fused(hidden, text, image_rotary_emb=with_grad)[0],
                               attn(hidden, text, image_rotary_emb=with_grad)[0])
    half = (tables[0].double(), tables[1].double())  # float64 tables: diffusers' fp64 rotation
    torch.testing.assert_close(fused(hidden, text, image_rotary_emb=half)[0], attn(hidden, text, image_rotary_emb=half)[0])
    complex_tables = torch.polar(torch.ones(9, 8, device=DEVICE), angles[:, ::2])
    with pytest.raises(Exception):  # diffusers' processor rejects it too: the fused path did not take it
        attn(hidden, text, image_rotary_emb=complex_tables)
    with pytest.raises(Exception):
        fused(hidden, text, image_rotary_emb=complex_tables)
    assert calls == []


def test_flux_attention_with_an_unverified_diffusers_keeps_its_processor(monkeypatch):
    from sfgrpo.models import fused_attention

    assert fused_attention.verified()
    monkeypatch.setattr(fused_attention, "_VERIFIED", {"apply_rotary_emb": {"0": "0"}})
    monkeypatch.setattr(fused_norms, "_SWAPS", None)
    _, fused = _pair("flux1-dev-small")
    fuse_norms(fused)
    assert "FusedFluxAttention" not in _kinds(fused) and "FusedFluxTransformerBlock" in _kinds(fused)
    assert "not verified" in fused_attention.support()["FluxAttention"]


def test_fused_flux_pickles_and_unfuses():
    import pickle

    original, fused = _pair("flux1-dev-small")
    fuse_norms(fused)
    restored = pickle.loads(pickle.dumps(fused))
    assert _kinds(restored) == _kinds(fused)
    unfuse_norms(restored)
    assert _kinds(restored) == [] and type(restored.transformer_blocks[0].attn) is type(original.transformer_blocks[0].attn)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_flux_triton_path_in_half_precision_is_close_to_diffusers(dtype, monkeypatch):
    """bf16 weights and activations: every fused kernel rounds once where diffusers rounds after each
    op; the whole FLUX.1-architecture output stays within bf16 noise of diffusers'."""
    from sfgrpo.backend import ENV_VAR

    original, fused = _pair("flux1-dev-small")
    original, fused = original.to(DEVICE, dtype), fused.to(DEVICE, dtype)
    fuse_norms(fused)
    inputs = {k: (v.to(dtype) if v.is_floating_point() and k != "timestep" else v)
              for k, v in _to_device(_flux_inputs(original, batch=1)).items()}
    expected = original(**inputs, return_dict=False)[0].float()
    monkeypatch.setenv(ENV_VAR, "triton")
    got = fused(**inputs, return_dict=False)[0].float()
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_is_bit_exact_on_cpu_forward_and_backward(name, dtype):
    """On CPU the ops run diffusers' own expressions: outputs and every parameter's gradient equal."""
    original, fused = _pair(name)
    original, fused = original.to(dtype), fused.to(dtype)
    assert fuse_norms(fused) > 0
    inputs = {k: (v.to(dtype) if v.is_floating_point() and k != "timestep" else v)
              for k, v in ARCHITECTURES[name](original).items()}
    outs = []
    for model in (original, fused):
        out = model(**inputs, return_dict=False)[0]
        out.float().square().mean().backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = outs
    assert torch.equal(a, b)
    assert grads_a.keys() == grads_b.keys()
    for key in grads_a:
        assert (grads_a[key] is None) == (grads_b[key] is None), key
        if grads_a[key] is not None:
            assert torch.equal(grads_a[key], grads_b[key]), key


def test_autocast_output_is_close_and_in_the_autocast_dtype():
    original, fused = _pair("sd35m-small")
    fuse_norms(fused)
    inputs = _sd3_inputs(original)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = original(**inputs, return_dict=False)[0]
        b = fused(**inputs, return_dict=False)[0]
    assert a.dtype == b.dtype
    # the fused modulations hand the next Linear what autocast would have cast it to
    torch.testing.assert_close(b.float(), a.float(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_triton_kernels_inside_the_transformer_match_diffusers(name, monkeypatch):
    """The Triton kernels on every swapped module of a whole forward and backward: compiled on a
    GPU, in Triton's interpreter on the CPU."""
    from sfgrpo.backend import ENV_VAR

    device = "cuda" if torch.cuda.is_available() else "cpu"
    original, fused = (m.to(device) for m in _pair(name))
    fuse_norms(fused)
    inputs = {k: v.to(device) for k, v in ARCHITECTURES[name](original, batch=1).items()}
    out_a = original(**inputs, return_dict=False)[0]
    out_a.square().mean().backward()
    if device == "cpu":
        monkeypatch.setenv(ENV_VAR, "triton")
    out_b = fused(**inputs, return_dict=False)[0]
    out_b.square().mean().backward()
    torch.testing.assert_close(out_b, out_a, atol=2e-5, rtol=2e-4)
    for (key, pa), (_, pb) in zip(original.named_parameters(), fused.named_parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, atol=2e-5, rtol=2e-3, msg=key)


def test_unsupported_configurations_keep_diffusers_forward():
    affine = AdaLayerNormContinuous(16, 16, elementwise_affine=True, eps=1e-6)
    with_bias = RMSNorm(8, eps=1e-6, elementwise_affine=True, bias=True)

    class Subclass(AdaLayerNormZero):  # may compute something else: exact classes only
        pass

    model = nn.ModuleList([affine, with_bias, Subclass(16), AdaLayerNormZero(16, norm_type="fp32_layer_norm")])
    assert fuse_norms(model) == 0



def test_float64_rms_norm_runs_diffusers_forward():
    """sfgrpo.rms_norm takes no float64 (the kernels store 2- and 4-byte floats only): a swapped
    RMSNorm in a float64 model (or fed float64) computes diffusers' forward instead of raising."""
    norm = RMSNorm(16, eps=1e-6).double()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    expected = norm(x)
    assert fuse_norms(norm) == 1
    assert torch.equal(norm(x), expected)
    weightless = RMSNorm(16, eps=1e-6, elementwise_affine=False)
    fuse_norms(weightless)
    assert torch.equal(weightless(x), RMSNorm.forward(weightless, x))

def test_trainer_fuses_by_default_and_the_flag_turns_it_off(tmp_path):
    from sfgrpo import Trainer, TrainerConfig
    from sfgrpo.trainer.cli_args import add_config_arguments, config_from_args

    small = dict(group_size=2, num_steps=2, prompts="0,1", output_dir=str(tmp_path))
    on = Trainer(TrainerConfig(**small))
    assert fused_norm_count(on.model) > 0  # the built-in digits backbone is a diffusers SD3 transformer
    off = Trainer(TrainerConfig(**small, fused_norms=False))
    assert fused_norm_count(off.model) == 0

    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert config_from_args(parser.parse_args(["--no-fused-norms"])).fused_norms is False
    assert config_from_args(parser.parse_args([])).fused_norms is True


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_fused_transformer_compiles_without_graph_breaks(name):
    """torch.compile(fullgraph=True) of a whole fused transformer (the trainer's --compile-backbone)."""
    original, fused = _pair(name)
    fuse_norms(fused)
    inputs = ARCHITECTURES[name](original)
    expected = original(**inputs, return_dict=False)[0]
    torch._dynamo.reset()
    got = torch.compile(fused, fullgraph=True)(**inputs, return_dict=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_block_whose_diffusers_source_is_not_verified_keeps_its_forward(monkeypatch):
    """Another diffusers release may compute something else in a block: its forward stays diffusers'
    (the norm modules inside are still fused)."""
    from sfgrpo.models import fused_blocks

    assert fused_blocks.verified(JointTransformerBlock)  # the installed diffusers is one checked
    monkeypatch.setattr(fused_blocks, "_VERIFIED", {})
    monkeypatch.setattr(fused_norms, "_SWAPS", None)
    _, fused = _pair("sd35m-small")
    fuse_norms(fused)
    assert "FusedJointTransformerBlock" not in _kinds(fused) and "FusedRMSNorm" in _kinds(fused)


def test_chunked_feed_forward_block_stays_exact():
    original, fused = _pair("sd35m-small")
    fuse_norms(fused)
    for model in (original, fused):
        for block in model.transformer_blocks:
            block.set_chunk_feed_forward(1, dim=1)  # divides both streams' token counts
    inputs = _sd3_inputs(original)
    assert torch.equal(original(**inputs, return_dict=False)[0], fused(**inputs, return_dict=False)[0])


@pytest.mark.parametrize("name,lora", [("sd35m-small", False), ("flux1-dev-small", True)])
def test_a_training_iteration_on_the_fused_kernels_matches_the_reference(tmp_path, monkeypatch, name, lora):
    """Rollout, look-ahead and update of an SD3.5-M-architecture backbone (full fine-tune) and of a
    FLUX.1-architecture one (LoRA: fused attention, the single blocks' split projection and the
    fused LoRA linear) with every fused op on the Triton kernels (Triton's interpreter on CPU,
    compiled on a GPU) against the same iteration on diffusers' and peft's expressions: same rewards
    and updated weights, to fp32 rounding."""
    if lora:
        pytest.importorskip("peft")
    from sfgrpo import Trainer, TrainerConfig
    from sfgrpo.backend import ENV_VAR
    from sfgrpo.bench.backbones import build_backbone

    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = {}
    fused_calls = _count_qk_norm_rope(monkeypatch)
    for backend in ("reference", "triton" if device == "cpu" else "auto"):
        monkeypatch.setenv(ENV_VAR, backend)
        fused_calls.clear()
        cfg = TrainerConfig(group_size=2, prompts_per_iteration=2, num_steps=3, reward="brightness", prompts="a,b",
                            output_dir=str(tmp_path / backend), mode="stepwise", seed=0, device=device,
                            use_lora=lora, lora_rank=4)
        trainer = Trainer(cfg, model=build_backbone(name, 64, text_tokens=8, device=device))
        assert fused_norm_count(trainer.model) > 0
        trained = [p for p in trainer.model.transformer.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in trained]
        stats = trainer.train_iteration()
        after = trained
        # FLUX's attention runs the fused QK-norm + rotation on the kernels only, never on the reference
        assert bool(fused_calls) == (name.startswith("flux") and backend != "reference")
        runs[backend] = (stats, torch.cat([(p.detach() - b).flatten() for p, b in zip(after, before)]))
    (stats_a, update_a), (stats_b, update_b) = runs.values()
    assert stats_b["reward_mean"] == pytest.approx(stats_a["reward_mean"], rel=1e-5)
    assert stats_b["advantage_abs_mean"] == pytest.approx(stats_a["advantage_abs_mean"], rel=1e-4, abs=1e-5)
    # Adam's first step is ~lr * sign(grad): a gradient within rounding of 0 may flip an element's
    # sign, so the updates are compared as a whole
    assert update_a.abs().max() > 0
    assert (update_b - update_a).norm() <= 1e-2 * update_a.norm()


def _flux2_pair(seed=0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    original = Flux2Transformer2DModel(in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32,
                                       axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    return original, copy.deepcopy(original)


def _flux2_inputs(batch=2, grid=4, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = grid * grid
    img_ids = torch.zeros(image, 4)
    img_ids[:, 1] = torch.arange(grid).repeat_interleave(grid)
    img_ids[:, 2] = torch.arange(grid).repeat(grid)
    txt_ids = torch.zeros(tokens, 4)
    txt_ids[:, 3] = torch.arange(tokens)
    return dict(hidden_states=torch.randn(batch, image, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, tokens, 24, generator=g),
                timestep=torch.tensor([0.7, 0.3][:batch]), img_ids=img_ids, txt_ids=txt_ids)


def test_flux2_attention_twins_match_diffusers(monkeypatch):
    """FLUX.2's double-stream Flux2Attention and single-stream Flux2ParallelSelfAttention: bit-exact on
    the reference path, and on the Triton kernels (the interpreter here) within fp32 rounding of
    diffusers' forward and every gradient, with q and k of each stream through one fused pass."""
    from sfgrpo.backend import ENV_VAR

    original, fused = _flux2_pair()
    fuse_norms(fused)
    assert {"FusedFlux2Attention", "FusedFlux2ParallelSelfAttention"} <= set(_kinds(fused))
    inputs = _flux2_inputs()
    assert torch.equal(fused(**inputs, return_dict=False)[0], original(**inputs, return_dict=False)[0])
    original, fused, inputs = _to_device((original, fused, inputs))
    expected = original(**inputs, return_dict=False)[0]
    expected.square().mean().backward()
    calls = _count_qk_norm_rope(monkeypatch)
    monkeypatch.setenv(ENV_VAR, "triton")
    got = fused(**inputs, return_dict=False)[0]
    got.square().mean().backward()
    assert len(calls) == 4 * len(fused.transformer_blocks) + 2 * len(fused.single_transformer_blocks)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-4)
    for (key, pa), (_, pb) in zip(original.named_parameters(), fused.named_parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, atol=2e-5, rtol=2e-3, msg=key)


def test_every_attention_twin_is_verified_and_reported():
    from sfgrpo.models import fused_attention

    report = fused_attention.support()
    assert set(report) == {"FluxAttention", "Flux2Attention", "Flux2ParallelSelfAttention"}
    for name in report:
        assert fused_attention.verified(name) and report[name].startswith("fused"), name


@pytest.mark.parametrize("bias", [True, False])
def test_split_projection_is_the_projection_of_the_concatenation(bias, monkeypatch):
    """FLUX's single block projects cat([attention, MLP]): the split projection gives the same
    output and input gradients without the concatenation, for a frozen nn.Linear off the
    reference path; anywhere else it declines (None) and the block concatenates."""
    from sfgrpo.backend import ENV_VAR
    from sfgrpo.models.fused_blocks import split_projection

    torch.manual_seed(0)
    linear = nn.Linear(8 + 32, 16, bias=bias, device=DEVICE).requires_grad_(False)
    first = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    second = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    monkeypatch.setenv(ENV_VAR, "reference")  # (the CPU's default)
    assert split_projection(linear, first, second) is None
    monkeypatch.setenv(ENV_VAR, "triton")
    got = split_projection(linear, first, second)
    expected = linear(torch.cat([first, second], dim=-1))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(expected)
    grads = torch.autograd.grad(got, (first, second), g)
    expected_grads = torch.autograd.grad(expected, (first, second), g)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = split_projection(linear, first, second)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    linear.weight.requires_grad_(True)  # a trained weight: diffusers' concatenation
    assert split_projection(linear, first, second) is None
    linear.weight.requires_grad_(False)
    assert split_projection(linear, first, second.double()) is None  # mixed dtypes, no autocast


@pytest.mark.parametrize("architecture", ["flux1", "flux2"])
def test_frozen_single_block_projections_are_split_and_match_diffusers(architecture, monkeypatch):
    """LoRA-style training (weights frozen, gradients to the inputs) of FLUX.1- and FLUX.2-architecture
    transformers on the Triton kernels: every single block projects its attention and MLP outputs
    without concatenating them, within fp32 rounding of diffusers' forward and input gradient."""
    from sfgrpo.backend import ENV_VAR
    from sfgrpo.models import fused_attention, fused_blocks

    if architecture == "flux1":
        (original, fused), module = _pair("flux1-dev-small"), fused_blocks
        inputs = _flux_inputs(original, batch=2)
    else:
        (original, fused), module = _flux2_pair(), fused_attention
        inputs = _flux2_inputs()
    for model in (original, fused):
        model.requires_grad_(False).to(DEVICE)
    inputs = _to_device(inputs)
    fuse_norms(fused)
    splits = []
    monkeypatch.setattr(module, "split_projection",
                        lambda *a, f=module.split_projection: splits.append(f(*a)) or splits[-1])
    results = []
    for model in (original, fused):
        if model is fused:
            monkeypatch.setenv(ENV_VAR, "triton")
        hidden = inputs["hidden_states"].clone().requires_grad_()
        out = model(**dict(inputs, hidden_states=hidden), return_dict=False)[0]
        out.square().mean().backward()
        results.append((out, hidden.grad))
    assert len(splits) == len(fused.single_transformer_blocks) and all(s is not None for s in splits)
    (a, ga), (b, gb) = results
    torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(gb, ga, atol=2e-5, rtol=2e-3)


def test_flux_attention_with_fused_projections_and_default_eps(monkeypatch):
    """diffusers' fuse_qkv_projections (its single blocks then hand back `(None,)` for the text
    stream) and a QK norm built with eps=None (torch's default: fp32's epsilon for bf16 inputs) run
    the twin with diffusers' results."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    from sfgrpo.backend import ENV_VAR

    original, fused = _pair("flux1-dev-small")
    fuse_norms(fused)
    for model in (original, fused):
        model.fuse_qkv_projections()
        model.to(DEVICE)
    inputs = _to_device(_flux_inputs(original, batch=1))
    expected = original(**inputs, return_dict=False)[0]
    monkeypatch.setenv(ENV_VAR, "triton")
    calls = _count_qk_norm_rope(monkeypatch)
    torch.testing.assert_close(fused(**inputs, return_dict=False)[0], expected, atol=2e-5, rtol=2e-4)
    assert len(calls) == 4 * len(fused.transformer_blocks) + 2 * len(fused.single_transformer_blocks)
    torch.manual_seed(0)
    attn = FluxAttention(query_dim=32, heads=2, dim_head=16, bias=True, eps=None, pre_only=True).to(DEVICE, torch.bfloat16)
    twin = copy.deepcopy(attn)
    assert fuse_norms(twin) == 1
    hidden = torch.randn(1, 6, 32, dtype=torch.bfloat16, device=DEVICE)
    angles = torch.rand(6, 8, device=DEVICE).repeat_interleave(2, dim=1)
    tables = (angles.cos(), angles.sin())
    got, want = twin(hidden, image_rotary_emb=tables).float(), attn(hidden, image_rotary_emb=tables).float()
    assert (got - want).abs().max() <= 0.005 * want.abs().max()  # the fp32 eps; bf16's would be ~3 % off


def test_hooked_norms_and_projections_keep_diffusers_calls(monkeypatch):
    """A hook on a QK norm or on the single block's projection (offloading and layerwise casting
    work through them) keeps diffusers' calls: the fused paths read weights only where calling the
    module would compute nothing else; float64 under autocast stays float64."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    from sfgrpo.backend import ENV_VAR
    from sfgrpo.models.fused_blocks import split_projection

    monkeypatch.setenv(ENV_VAR, "triton")
    torch.manual_seed(0)
    attn = FluxAttention(query_dim=32, heads=2, dim_head=16, bias=True, eps=1e-6, pre_only=True).to(DEVICE)
    twin = copy.deepcopy(attn)
    fuse_norms(twin)

    def halve_weight(module, args):  # stands for a hook that moves / casts the weight before the call
        with torch.no_grad():
            module.weight.fill_(0.5)

    for module in (attn, twin):
        module.norm_q.register_forward_pre_hook(halve_weight)
    calls = _count_qk_norm_rope(monkeypatch)
    hidden = torch.randn(1, 6, 32, device=DEVICE)
    angles = torch.rand(6, 8, device=DEVICE).repeat_interleave(2, dim=1)
    tables = (angles.cos(), angles.sin())
    assert torch.equal(twin(hidden, image_rotary_emb=tables), attn(hidden, image_rotary_emb=tables))
    assert calls == []
    linear = nn.Linear(40, 16, device=DEVICE).requires_grad_(False)
    first, second = torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 3, 32, device=DEVICE)
    assert split_projection(linear, first, second) is not None
    handle = linear.register_forward_hook(lambda module, args, out: out)
    assert split_projection(linear, first, second) is None
    handle.remove()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert split_projection(linear.double(), first.double(), second.double()) is None


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_fused_transformer_runs_on_meta_tensors_like_diffusers(name):
    """A transformer on the meta device (shape inference, deferred initialisation) runs with its norms
    fused as diffusers' runs: same output shape and dtype, no data. (torch.autocast knows no meta device:
    asking it whether it was active there used to fail inside every fused norm.)"""
    original, fused = _pair(name)
    assert fuse_norms(fused) > 0
    inputs = {k: v.to("meta") for k, v in ARCHITECTURES[name](original).items()}
    outs = [model.to("meta")(**inputs, return_dict=False)[0] for model in (original, fused)]
    assert outs[1].is_meta and outs[1].shape == outs[0].shape and outs[1].dtype == outs[0].dtype
