"""Swapping a module's class in place for a fused twin (a subclass with another forward) and back:
what `fused_norms` and `fused_lora` do, and the checks a twin makes before it reads a submodule's
weights instead of calling it. Parameters, buffers, hooks and state-dict keys stay with the
module object; only the forward changes."""

from __future__ import annotations

from torch import nn


def swap_in(model: nn.Module, twin_of) -> int:
    """Every module of `model` for which `twin_of(module)` names a class gets that class; returns
    how many."""
    count = 0
    for module in model.modules():
        twin = twin_of(module)
        if twin is not None:
            module.__class__ = twin
            count += 1
    return count


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


def unhooked(module: nn.Module) -> bool:
    """No hooks and no instance-level forward (diffusers' hook registry, accelerate and group
    offloading wrap `forward`; layerwise casting and offloading hooks change the weights around
    it): reading the module's weights is what calling it computes. What a fused twin checks before
    it reads a submodule's weights instead of calling it."""
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def global_module_hooks() -> bool:
    """Whether forward hooks are registered for every module (torch.nn.modules.module's globals):
    calling a module would run them, reading its weights would not."""
    from torch.nn.modules import module as module_impl

    return bool(getattr(module_impl, "_global_forward_hooks", None)
                or getattr(module_impl, "_global_forward_pre_hooks", None))
