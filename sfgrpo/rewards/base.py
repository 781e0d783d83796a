"""Reward registry, spec parsing and output validation."""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import torch
from torch import Tensor

RawReward = Callable[[Tensor, Sequence], object]

_REGISTRY: dict[str, RawReward] = {}


class RewardError(ValueError):
    """A reward function returned something unusable (wrong shape, NaN/inf, not numbers)."""


def register_reward(name: str):
    """Decorator: make `fn(images, prompts)` available as `name`."""

    def decorate(fn: RawReward) -> RawReward:
        _REGISTRY[name] = fn
        return fn

    return decorate


def list_rewards() -> list[str]:
    return sorted(_REGISTRY)


class RewardFunction:
    """A named reward with validated output: float32 `[B]` on the images' device."""

    def __init__(self, name: str, fn: RawReward):
        self.name, self.fn = name, fn

    def __call__(self, images: Tensor, prompts: Sequence) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts")
        raw = self.fn(images, prompts)
        try:
            scores = torch.as_tensor(raw if not hasattr(raw, "__array__") or isinstance(raw, Tensor) else raw.__array__())
        except Exception as err:  # noqa: BLE001 - anything that is not numbers
            raise RewardError(f"reward {self.name!r} returned {type(raw).__name__}, not numbers: {err}") from err
        scores = scores.to(device=images.device, dtype=torch.float32)
        if scores.shape != (images.shape[0],):
            raise RewardError(
                f"reward {self.name!r} must return one score per image, shape [{images.shape[0]}], "
                f"got shape {tuple(scores.shape)}"
            )
        if not bool(torch.isfinite(scores).all()):
            bad = (~torch.isfinite(scores)).nonzero().flatten()[:8].tolist()
            raise RewardError(f"reward {self.name!r} returned NaN or inf for image(s) {bad}")
        return scores

    def __repr__(self) -> str:
        return f"RewardFunction({self.name!r})"


def _product(names: list[str], parts: list[RewardFunction]) -> RawReward:
    def product(images: Tensor, prompts: Sequence) -> Tensor:
        score = parts[0](images, prompts)
        for part in parts[1:]:
            score = score * part(images, prompts)
        return score

    return product


def get_reward(spec: str | Callable | RewardFunction) -> RewardFunction:
    """Resolves a name, a `a*b` product, `module:function`, or a callable."""
    if isinstance(spec, RewardFunction):
        return spec
    if callable(spec):
        return RewardFunction(getattr(spec, "__name__", "custom"), spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a reward is a name, 'a*b', 'module:function' or a callable, got {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot load reward function {spec!r}: {err}") from err
        if not callable(fn):
            raise ValueError(f"reward {spec!r} is not callable")
        return RewardFunction(spec, fn)
    names = [name.strip() for name in spec.split("*")]
    unknown = [name for name in names if name not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known: {list_rewards()} (or 'module:function')")
    if len(names) == 1:
        return RewardFunction(spec, _REGISTRY[spec])
    parts = [RewardFunction(name, _REGISTRY[name]) for name in names]
    return RewardFunction(spec, _product(names, parts))
