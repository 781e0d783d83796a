"""benchmarks/block_traffic_cpu.py (a script of the repository, loaded from its path) counts what it
claims: fewer elementwise bytes for sfgrpo's fused block than for diffusers', and LoRA adapters that
add peft's full-size passes to diffusers' block but (almost) nothing to the fused one."""

import pytest
import torch

import benchmark_scripts

pytest.importorskip("peft")
pytest.importorskip("diffusers")


def test_fused_block_and_fused_lora_cut_elementwise_traffic():
    from diffusers.models.attention import JointTransformerBlock

    script = benchmark_scripts.load("block_traffic_cpu")
    torch.manual_seed(0)
    block = JointTransformerBlock(dim=64, num_attention_heads=2, attention_head_dim=32, context_pre_only=False,
                                  qk_norm="rms_norm", use_dual_attention=True).to(torch.bfloat16).requires_grad_(False)
    inputs = dict(hidden_states=torch.randn(1, 32, 64, dtype=torch.bfloat16, requires_grad=True),
                  encoder_hidden_states=torch.randn(1, 8, 64, dtype=torch.bfloat16, requires_grad=True),
                  temb=torch.randn(1, 64, dtype=torch.bfloat16))
    group = "elementwise / norms"
    plain = {fused: script.measure(block, inputs, fused) for fused in (False, True)}
    assert plain[True].bytes[group] * 2 < plain[False].bytes[group]
    script.add_lora(block, 4)
    lora = {fused: script.measure(block, inputs, fused, autocast=True) for fused in (False, True)}
    added = {fused: lora[fused].bytes[group] - plain[fused].bytes[group] for fused in (False, True)}
    # peft: casts, the scaling product and sums at full size; fused: the adapters' small casts only
    assert added[True] * 4 < added[False]
    assert lora[True].kernels["matmul / attention"] == lora[False].kernels["matmul / attention"]
    assert all(g is not None for g in lora[True].outputs)  # LoRA gradients reached the adapters


def test_fused_flux_blocks_cut_the_attention_rotation_traffic():
    """FLUX.1's double and single blocks at small width: the fused twins (norms, tails, QK-norm +
    rotation) move far fewer elementwise bytes than diffusers', and without the fused attention
    (its digest unverified) most of the saving is gone."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from sfgrpo.models import fused_attention, fused_norms

    script = benchmark_scripts.load("block_traffic_cpu")
    tables = script.flux_rotary_tables(16, 4, axes_dim=(8, 12, 12))
    group = "elementwise / norms"
    for cls in (FluxTransformerBlock, FluxSingleTransformerBlock):
        torch.manual_seed(0)
        block = cls(dim=64, num_attention_heads=2, attention_head_dim=32).to(torch.bfloat16).requires_grad_(False)
        inputs = dict(hidden_states=torch.randn(1, 16, 64, dtype=torch.bfloat16, requires_grad=True),
                      encoder_hidden_states=torch.randn(1, 4, 64, dtype=torch.bfloat16, requires_grad=True),
                      temb=torch.randn(1, 64, dtype=torch.bfloat16))
        counts = {fused: script.measure(block, inputs, fused, constants=dict(image_rotary_emb=tables))
                  for fused in (False, True)}
        assert counts[True].bytes[group] * 2 < counts[False].bytes[group], cls.__name__
        assert script.largest_difference(counts[False], counts[True]) < 0.05
        verified, swaps = fused_attention._VERIFIED, fused_norms._SWAPS
        try:
            fused_norms.unfuse_norms(block)
            fused_attention._VERIFIED, fused_norms._SWAPS = {"apply_rotary_emb": {"0": "0"}}, None
            without = script.measure(block, inputs, True, constants=dict(image_rotary_emb=tables))
            assert "FusedFluxAttention" not in {type(m).__name__ for m in block.modules()}
        finally:
            fused_attention._VERIFIED, fused_norms._SWAPS = verified, swaps
            fused_norms.unfuse_norms(block)
        assert without.bytes[group] > 1.5 * counts[True].bytes[group], cls.__name__
