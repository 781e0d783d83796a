"""benchmarks/block_traffic_cpu.py (a script of the repository, loaded from its path) counts what it
claims: fewer elementwise bytes for sfgrpo's fused block than for diffusers', and LoRA adapters that
add peft's full-size passes to diffusers' block but (almost) nothing to the fused one."""

import importlib.util
import pathlib

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("diffusers")
SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "block_traffic_cpu.py"


def test_fused_block_and_fused_lora_cut_elementwise_traffic():
    from diffusers.models.attention import JointTransformerBlock

    spec = importlib.util.spec_from_file_location("block_traffic_cpu", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
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
