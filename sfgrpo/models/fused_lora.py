"""sfgrpo's fused LoRA linear inside a peft-adapted model.

peft's `lora.Linear.forward` runs the base layer, then `lora_B(lora_A(dropout(x))) * scaling`
after casting x to the adapter's dtype, and adds the two: under bf16 autocast with fp32 adapters
(how sfgrpo and Flow-GRPO train LoRA) that is x cast to fp32 and back, the scaling product and the
sum as full-size kernels of their own, and in the backward the scaled gradient, the casts and the
sum of the two input gradients: ~5x the base Linear's own memory traffic on a DiT's attention
projections. `fuse_lora` swaps every plain `lora.Linear` for a subclass whose forward runs
`sfgrpo.lora_linear` (the adapter's products accumulated inside the GEMMs, no full-size pass
besides them) whenever it computes what peft computes:

- one active adapter, vanilla LoRA (no DoRA or other variant, no LoRA bias), dropout off, not
  merged, adapters enabled, a plain `nn.Linear` base with `fan_in_fan_out` off, no extra arguments;
- no hooks or wrapped forwards on the base layer, the adapters or the dropout, and no global module
  hooks (diffusers' layerwise casting and offloading work that way: calling the module is then not
  reading its weights), every weight on the input's device;
- under `torch.autocast` for the input's device with no float64 tensor (every GEMM in the autocast
  dtype, as peft's run there), or with x, the base weight and bias and the adapter in one dtype.

Anything else (and every call with SFGRPO_BACKEND=reference: the plain-PyTorch loop the
benchmarks compare against) runs peft's own forward. Parameters, state-dict keys, adapters and
peft's API are unchanged; `unfuse_lora` swaps back. The fused sum is rounded once, at the end of
the GEMM, where peft rounds after each op: results agree to rounding, not bit for bit.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from sfgrpo import functional as F
from sfgrpo.backend import device_type, requested_backend
from sfgrpo.models.class_swap import global_module_hooks, swap_back, swap_in, swapped_count, unhooked
from sfgrpo.reference import autocast_dtype

__all__ = ["fuse_lora", "unfuse_lora", "fused_lora_count"]


class _FusedLora:
    """Mixin of the swapped class: the peft class it replaces, for `unfuse_lora`."""

    peft_class: type


@functools.lru_cache(maxsize=None)
def _fused_class():
    """The fused subclass of peft's `lora.Linear`, built once, on first use (peft is optional)."""
    from peft.tuners.lora import Linear

    class FusedLoraLinear(_FusedLora, Linear):
        peft_class = Linear

        def forward(self, x, *args, **kwargs):
            adapter = _fusable_adapter(self, x) if not (args or kwargs) else None
            if adapter is None or requested_backend() == "reference":
                return super().forward(x, *args, **kwargs)
            base = self.base_layer
            return F.lora_linear(x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                 self.scaling[adapter])

    # importable by this name (`__getattr__` below): pickling a fused model finds the class
    FusedLoraLinear.__module__, FusedLoraLinear.__qualname__ = __name__, "FusedLoraLinear"
    return FusedLoraLinear


_AUTOCAST_ELIGIBLE = (torch.float32, torch.bfloat16, torch.float16)  # what autocast casts (not float64)


def _fusable_adapter(layer, x) -> str | None:
    """The name of the one adapter the fused forward would apply in place of peft's, or None when
    peft's forward must run: only where the fused forward computes what peft's would."""
    if layer.disable_adapters or layer.merged or getattr(layer, "fan_in_fan_out", False):
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    adapter = active[0]
    if adapter not in layer.lora_A or adapter in getattr(layer, "lora_variant", {}):
        return None
    if getattr(layer, "use_dora", {}).get(adapter, False) or not isinstance(layer.lora_dropout[adapter], nn.Identity):
        return None
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[adapter], layer.lora_B[adapter]
    if type(base) is not nn.Linear or lora_b.bias is not None or not isinstance(x, torch.Tensor):
        return None
    if not (unhooked(base) and unhooked(lora_a) and unhooked(lora_b) and unhooked(layer.lora_dropout[adapter])):
        return None
    if global_module_hooks():
        return None
    tensors = [x, base.weight, lora_a.weight, lora_b.weight] + ([base.bias] if base.bias is not None else [])
    if any(t.device != x.device for t in tensors):  # offloaded or meta weights: peft's path moves them
        return None
    dtypes = {t.dtype for t in tensors}
    if autocast_dtype(device_type(x.device)) is not None:
        # autocast casts every one of these to its dtype, as the fused op does; float64 it leaves alone
        return adapter if dtypes <= set(_AUTOCAST_ELIGIBLE) else None
    return adapter if len(dtypes) == 1 and dtypes <= set(_AUTOCAST_ELIGIBLE + (torch.float64,)) else None


def __getattr__(name: str):
    if name == "FusedLoraLinear":
        return _fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fuse_lora(model: nn.Module) -> int:
    """Swaps, in place, every peft `lora.Linear` (exactly that class) in `model` for its fused twin;
    returns how many were swapped. Idempotent; a model without peft adapters (or without peft
    installed) is left alone."""
    try:
        from peft.tuners.lora import Linear
    except ImportError:
        return 0
    fused = _fused_class()
    return swap_in(model, lambda module: fused if type(module) is Linear else None)


def unfuse_lora(model: nn.Module) -> int:
    """Undoes `fuse_lora`; returns how many modules were swapped back."""
    return swap_back(model, _FusedLora, "peft_class")


def fused_lora_count(model: nn.Module) -> int:
    """How many of `model`'s LoRA layers run sfgrpo's fused LoRA linear."""
    return swapped_count(model, _FusedLora)
