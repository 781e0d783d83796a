"""Reward registry, spec parsing and output validation."""

from __future__ import annotations

import importlib
import json
import math
import urllib.parse
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
        if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
            what = f"{type(images).__name__}" if not isinstance(images, Tensor) else \
                f"{images.dtype} of shape {tuple(images.shape)}"
            raise RewardError(f"reward {self.name!r} takes float images [N, C, H, W] in [0, 1], got {what}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts")
        if images.shape[0] == 0:  # nothing to score: no reward model needs to see an empty batch
            return torch.zeros(0, device=images.device)
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


def _mixture(terms: list[tuple[float, RewardFunction]]) -> RawReward:
    def mixture(images: Tensor, prompts: Sequence) -> Tensor:
        return sum(weight * part(images, prompts) for weight, part in terms)

    return mixture


# ---------------------------------------------------------------------- rewards with an argument
RewardFactory = Callable[..., RawReward]
_FACTORIES: dict[str, RewardFactory] = {}
_BUILT: dict[str, RewardFunction] = {}  # one instance per spec: a model is loaded once per process


def register_reward_factory(name: str):
    """Decorator: `factory(argument, **options) -> fn(images, prompts)` becomes the spec
    `name:argument` or `name:argument?key=value&key=value` (e.g. `clip_score:/models/clip`).
    Options arrive as strings; the factory converts them."""

    def decorate(factory: RewardFactory) -> RewardFactory:
        _FACTORIES[name] = factory
        return factory

    return decorate


def list_reward_factories() -> list[str]:
    return sorted(_FACTORIES)


def _from_factory(spec: str) -> RewardFunction:
    if spec not in _BUILT:
        name, _, rest = spec.partition(":")
        argument, _, query = rest.partition("?")
        options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
        _BUILT[spec] = RewardFunction(spec, _FACTORIES[name](argument, **options))
    return _BUILT[spec]


def _from_url(spec: str) -> RewardFunction:
    if spec not in _BUILT:
        from sfgrpo.rewards.http_client import HttpReward

        _BUILT[spec] = RewardFunction(spec, HttpReward.from_spec(spec))
    return _BUILT[spec]


def _single(spec: str) -> RewardFunction:
    """One reward: a URL, `factory:argument`, `module:function` or a registered name."""
    spec = spec.strip()
    if spec.startswith(("http://", "https://")):
        return _from_url(spec)
    if ":" in spec:
        prefix = spec.partition(":")[0]
        if prefix in _FACTORIES:
            return _from_factory(spec)
        module_name, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot load reward function {spec!r}: {err}") from err
        if not callable(fn):
            raise ValueError(f"reward {spec!r} is not callable")
        return RewardFunction(spec, fn)
    if spec not in _REGISTRY:
        raise ValueError(f"unknown reward(s) [{spec!r}]; known: {list_rewards()}, with an argument: "
                         f"{[f + ':...' for f in list_reward_factories()]} (or 'module:function', or a URL)")
    return RewardFunction(spec, _REGISTRY[spec])


def _as_weight(text: str) -> float | None:
    try:
        weight = float(text)
    except ValueError:
        return None
    return _finite_weight(weight, text)


def _finite_weight(weight: float, text) -> float:
    """A mixture weight; NaN / inf would turn every score into NaN / inf, reported only later as a
    reward that "returned NaN or inf" instead of the spec's mistake."""
    if not math.isfinite(weight):
        raise ValueError(f"reward weight {text!r} must be a finite number")
    return weight


def _term(text: str) -> tuple[float, RewardFunction]:
    """`0.7*pickscore:/p` -> (0.7, pickscore); `digit*darkness` -> (1, product)."""
    weight, specs = 1.0, []
    for factor in text.split("*"):
        number = _as_weight(factor.strip())
        if number is None:
            specs.append(factor.strip())
        else:
            weight *= number
    if not specs or not all(specs):
        raise ValueError(f"bad reward term {text!r}: expected [weight*]reward[*reward...]")
    parts = [_single(s) for s in specs]
    reward = parts[0] if len(parts) == 1 else RewardFunction("*".join(specs), _product(specs, parts))
    return weight, reward


def _mixture_spec(terms: list[tuple[float, RewardFunction]], name: str) -> RewardFunction:
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    return RewardFunction(name, _mixture(terms))


def get_reward(spec: str | dict | Callable | RewardFunction) -> RewardFunction:
    """Resolves a reward spec:

    - a registered name (`brightness`), a product `digit*darkness`, `module:function`;
    - `name:argument[?options]` for rewards that need one, e.g. a model path `clip_score:/models/clip`;
    - a URL `http://host:port/path[#options]`, a reward served by another process;
    - a weighted mixture `0.7*pickscore:/p + 0.3*aesthetic:/h?clip=/c`, or the same as a mapping
      `{"pickscore:/p": 0.7, "aesthetic:/h?clip=/c": 0.3}` (a dict, or its JSON text) -- the mapping
      form is needed when a path itself contains `+` or `*`;
    - a callable `fn(images, prompts)`.
    """
    if isinstance(spec, RewardFunction):
        return spec
    if isinstance(spec, dict):
        if not spec:
            raise ValueError("an empty reward mixture")
        terms = [(_finite_weight(float(weight), weight), _single(name)) for name, weight in spec.items()]
        return _mixture_spec(terms, " + ".join(f"{w}*{n}" for n, w in spec.items()))
    if callable(spec):
        return RewardFunction(getattr(spec, "__name__", "custom"), spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a reward is a name, 'a*b', 'module:function', 'name:path', a URL, a mixture "
                         f"or a callable, got {spec!r}")
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            mapping = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"reward mixture {spec!r} is not valid JSON: {err}") from err
        return get_reward(mapping)
    if spec.startswith(("http://", "https://")):  # a URL may contain '+' and '*' (query strings)
        if any(c.isspace() for c in spec):  # ... but no whitespace: 'URL + brightness' is a mixture
            raise ValueError(f"reward spec {spec!r}: a URL cannot contain whitespace; to mix a server's reward "
                             "with others use the mapping form, e.g. '{\"http://host/score\": 0.5, \"brightness\": 0.5}'")
        return _single(spec)
    return _mixture_spec([_term(term) for term in spec.split("+")], spec)
