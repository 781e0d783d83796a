"""CPU benchmark (pytest-benchmark): one LoRA-adapted Linear, peft's `lora.Linear` against the same
layer swapped by `sfgrpo.models.fused_lora.fuse_lora` (`sfgrpo.lora_linear`), forward (the rollout)
and forward + backward to the adapters and the input (a LoRA update), on an SD3.5-M attention
projection at 512 px (1,024 image tokens x 1,536 channels, r 32): fp32, and bf16 weights with fp32
adapters under bf16 autocast (the trainer's setting).

    pytest benchmarks/bench_lora_cpu.py --benchmark-enable --benchmark-columns=min,median,rounds
"""

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

TOKENS, CHANNELS, RANK = 1024, 1536, 32


def _layers(setting: str):
    from peft import LoraConfig, inject_adapter_in_model

    from sfgrpo.models.fused_lora import fuse_lora

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = nn.Linear(CHANNELS, CHANNELS)

        def forward(self, x):
            return self.to_q(x)

    torch.manual_seed(0)
    plain = Holder()
    if setting == "bf16-autocast":
        plain = plain.bfloat16()
    plain.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["to_q"]), plain)
    for name, p in plain.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # fp32 adapters, as the trainer keeps them
            p.requires_grad_(True)
    fused = copy.deepcopy(plain)
    fuse_lora(fused)
    return {"peft": plain, "fused": fused}


@pytest.mark.parametrize("setting", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("impl", ["peft", "fused"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_lora_layer(benchmark, setting, impl, mode):
    layer = _layers(setting)[impl]
    dtype = torch.bfloat16 if setting == "bf16-autocast" else torch.float32
    x = torch.randn(TOKENS, CHANNELS, dtype=dtype, requires_grad=mode != "forward")
    grad = torch.randn(TOKENS, CHANNELS, dtype=dtype)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "bf16-autocast"):
            if mode == "forward":
                with torch.no_grad():
                    return layer(x)
            y = layer(x)
        y.backward(grad)
        layer.zero_grad(set_to_none=True)
        x.grad = None

    benchmark(run)
