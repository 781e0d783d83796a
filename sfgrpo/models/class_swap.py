"""Swapping a module's class in place for a fused twin (a subclass with another forward) and back:
what `fused_norms` and `fused_lora` do. Parameters, buffers, hooks and state-dict keys stay with the
module object; only the forward changes."""

from __future__ import annotations

from torch import nn


def swap_back(model: nn.Module, mixin: type, original: str) -> int:
    """Every module of `model` whose class has `mixin` gets its class attribute `original` (the
    class it replaced) back; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, mixin):
            module.__class__ = getattr(module, original)
            count += 1
    return count


def swapped_count(model: nn.Module, mixin: type) -> int:
    """How many of `model`'s modules run a swapped class with `mixin`."""
    return sum(isinstance(m, mixin) for m in model.modules())
