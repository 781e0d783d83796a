"""The backbone protocol: exactly what the trainer, the evaluation and the exporter use of a model.

`DigitsBackbone` (sfgrpo/models/digits.py) and the diffusers `PipelineBackbone`s
(sfgrpo/models/pipelines/) implement it; so can any flow model. Hand one to
`Trainer(config, model=...)`, or name a factory returning one as `backbone="package.module:factory"`
(`load_backbone`, `load_backbone_factory`). `check_backbone(obj)` says what is missing.

Conventions (those of `sfgrpo.functional` and of the diffusers flow-matching pipelines):

- latents are `[B, *latent_shape]`; `t` is a per-row float tensor `[B]` in [0, 1], t = 1 is pure
  noise and t = 0 data: x_t = (1 - t) x_0 + t noise;
- `velocity(x, t, cond)` predicts `v = noise - data`, of x's shape (cast to float32 by the caller);
- a *Condition* is what `encode_prompts` returns: a tensor or a tuple (or list) of tensors, possibly
  nested, each `[B, ...]` with one row per prompt (an element may be None: absent in both
  conditions a concatenation joins, it stays None). The trainer slices, repeats and concatenates
  conditions along dim 0 (`select_rows` / `repeat_rows` / `concat_rows` in sfgrpo/trainer/rollout.py,
  which rebuild containers as `type(cond)(generator)`: no dicts, no NamedTuples), and with CFG runs
  `velocity` on `cat([x, x])` with `concat_rows(null_condition(B), cond)`, so `null_condition` must
  return the same structure with the same trailing shapes -- or a tuple subclass with its own
  `concat_rows(other)` method (text padded to different lengths, see `PaddedText` in pipelines/qwen_image.py).

How the trainer holds the model (sfgrpo/trainer/trainer.py):

- `model.to(device).requires_grad_(False)`: both must return the backbone and cover every part of
  it; afterwards only `model.transformer` is trained (all of its parameters, or LoRA adapters);
- `model.transformer` is an `nn.Module` the trainer *replaces*: by a DDP wrapper (distributed
  runs) and, for the KL with full fine-tuning, temporarily by a frozen copy. `velocity` must
  therefore call `self.transformer(...)` anew each time and read nothing else from it at call
  time (a DDP wrapper hides the module's attributes);
- the trainer never calls `train()` / `eval()`: return the backbone in the mode to train in,
  normally eval (dropout would break the on-policy ratio of exactly 1, which needs `velocity` to be
  deterministic for a given batch);
- `dtype` is not read by the trainer (backbones use their own to cast inputs).

Optional members, used when present:

- `sampling_sigmas(num_steps) -> Tensor [num_steps + 1]` from 1 to 0: the sampling grid (else SD3's
  shifted grid with `--shift`; `--no-schedule-from-checkpoint` ignores it);
- `combine_guidance(v_cond, v_uncond, scale) -> Tensor`: the model's own classifier-free guidance
  rule (default `v_uncond + scale (v_cond - v_uncond)`);
- `default_lora_targets`: module names that get LoRA adapters when `lora_target_modules` is None;
- `unused_parameter_prefixes`: names (inside `.transformer`, ending with ".") of parameters the
  velocity never reads; the trainer keeps them frozen (DDP would wait for their gradients);
- `cfg_distilled`: True when the model samples without classifier-free guidance (a step-distilled
  checkpoint); the trainer then refuses a `guidance_scale` other than 1;
- `pipe`: a diffusers pipeline, only for exporting LoRA weights in its format.

What `.transformer` must support depends on the options: `--use-lora` calls diffusers'
`add_adapter` / `disable_adapters` / `enable_adapters` (any diffusers `ModelMixin` has them); a
full-weight export needs diffusers' `save_config`; activation checkpointing uses diffusers'
gradient checkpointing or wraps each block of every `nn.ModuleList` child, which are also FSDP's
units.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Condition = Any  # a tensor or a (nested) tuple/list of [B, ...] tensors, see the module docstring


class _BackboneCheck(type(Protocol)):
    # isinstance(obj, Backbone) as check_backbone decides: from Python 3.12 on, runtime protocols
    # look members up statically only (inspect.getattr_static), which misses nn.Module submodules
    # such as `transformer`, so the default check would depend on the Python version
    def __instancecheck__(cls, instance) -> bool:
        if cls is Backbone:
            return not _problems(instance)
        return super().__instancecheck__(instance)


@runtime_checkable
class Backbone(Protocol, metaclass=_BackboneCheck):
    """A flow model the trainer can fine-tune (see the module docstring for the conventions)."""

    transformer: nn.Module  # what trains: all its parameters, or its LoRA adapters

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent without the batch dimension (noise is drawn as `[B, *latent_shape]`)."""

    @property
    def device(self) -> torch.device:
        """Where inputs go (noise, timesteps); its type also picks the autocast device."""

    def encode_prompts(self, prompts: Sequence) -> Condition:
        """One conditioning row per prompt (prompts are `str`s, or `Prompt`s carrying metadata)."""

    def null_condition(self, batch: int) -> Condition:
        """`batch` rows of the classifier-free guidance negative, structured like `encode_prompts`'."""

    def velocity(self, x: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """`v = noise - data` at latents `x` `[B, ...]` and times `t` `[B]` in [0, 1] (t = 1 noise).
        Runs under `no_grad` (rollout, look-ahead) and with autograd (the update), inside
        `torch.autocast` with `--mixed-precision`."""

    def decode(self, latents: Tensor) -> Tensor:
        """Final latents -> float images `[B, C, H, W]` in [0, 1] (C = 3 for the learned rewards)."""

    def to(self, device: torch.device | str) -> Backbone:
        """Moves every part to `device`; returns the backbone."""

    def requires_grad_(self, requires_grad: bool = True) -> Backbone:
        """Sets it for every parameter; returns the backbone."""


REQUIRED = ("encode_prompts", "null_condition", "velocity", "decode", "latent_shape", "device", "transformer",
            "to", "requires_grad_")
METHODS = ("encode_prompts", "null_condition", "velocity", "decode", "to", "requires_grad_")
_MISSING = object()


def _has(obj: object, name: str) -> bool:
    # statically first, so a property is not evaluated (a `device` property may fail on a model
    # without parameters yet); hasattr then finds dynamic attributes such as nn.Module submodules.
    # A class that subclasses Backbone explicitly inherits its stubs: those do not count.
    found = inspect.getattr_static(obj, name, _MISSING)
    if found is not _MISSING:
        return found is not Backbone.__dict__.get(name, _MISSING)
    return hasattr(obj, name)


def _problems(obj: object) -> list[str]:
    missing = [name for name in REQUIRED if not _has(obj, name)]
    problems = [f"missing {', '.join(missing)}"] if missing else []
    problems += [f"{name} is not callable" for name in METHODS if _has(obj, name) and not callable(getattr(obj, name))]
    if _has(obj, "transformer") and not isinstance(obj.transformer, nn.Module):
        problems.append(f"transformer is a {type(obj.transformer).__name__}, not a torch.nn.Module")
    return problems


def check_backbone(obj: object) -> None:
    """Raises `TypeError` naming every member of `Backbone` that `obj` lacks (or has in an unusable
    form: a method that is not callable, a `transformer` that is not an `nn.Module`)."""
    problems = _problems(obj)
    if problems:
        raise TypeError(f"{type(obj).__name__} is not an sfgrpo backbone: {'; '.join(problems)} "
                        "(see sfgrpo.models.protocol.Backbone)")


# `package.module:factory`, the syntax of custom reward functions; anything else (a path such as
# `C:\models\sd3` or `runs/a:b`) is not a factory spec
FACTORY_SPEC = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def is_factory_spec(spec: str) -> bool:
    return FACTORY_SPEC.fullmatch(spec) is not None


def _call_factory(spec: str, factory, config):
    """`factory(config)` when it accepts one positional argument, else `factory()`."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read (some builtins): the documented form
        return factory(config)
    for arguments in ((config,), ()):
        try:
            signature.bind(*arguments)
        except TypeError:
            continue
        return factory(*arguments)
    raise TypeError(f"backbone {spec!r}: the factory must take the run's TrainerConfig as its one argument, "
                    f"or no argument; its signature is {signature}")


def load_backbone_factory(spec: str, config=None):
    """Imports `package.module:factory`, calls `factory(config)` (or `factory()` when it takes no
    argument) and returns the checked backbone. `config` is the run's `TrainerConfig` (None when
    there is none). Raises ValueError when the module or the attribute cannot be found, TypeError
    when the attribute is not callable, takes other arguments, or returns something not a backbone."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"backbone {spec!r}: cannot import module {module_name!r} ({err}), and it is not a "
                         "directory") from err
    factory = getattr(module, attribute, _MISSING)
    if factory is _MISSING:
        raise ValueError(f"backbone {spec!r}: module {module_name!r} has no attribute {attribute!r}")
    if not callable(factory):
        raise TypeError(f"backbone {spec!r}: {module_name}.{attribute} ({type(factory).__name__}) is not "
                        "callable; expected a factory returning a backbone")
    model = _call_factory(spec, factory, config)
    problems = _problems(model)
    if problems:
        raise TypeError(f"backbone {spec!r}: the factory returned a {type(model).__name__}, which is not an sfgrpo "
                        f"backbone: {'; '.join(problems)} (see sfgrpo.models.protocol.Backbone)")
    return model
