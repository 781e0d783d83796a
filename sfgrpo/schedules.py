"""Sampling schedules: decreasing grids `1 = t_0 > t_1 > ... > t_T = 0` (SPEC §1).

`sd3_sigmas` reproduces diffusers' `FlowMatchEulerDiscreteScheduler(shift=...).set_timesteps(T)`
(SD3/SD3.5's "shift 3" grid by default) by asking diffusers itself, so the grids stay identical
to what SD3 pipelines sample with. Any other decreasing grid works through `Schedule(sigmas)`.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import torch
from torch import Tensor


def validate_sigmas(sigmas: Tensor | list[float]) -> Tensor:
    """Checks a grid (strictly decreasing, within [0, 1], at least 2 entries); float32 copy."""
    grid = torch.as_tensor(sigmas, dtype=torch.float32).detach().cpu().clone()
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"a schedule needs a 1-d grid of at least 2 times, got shape {tuple(grid.shape)}")
    if not bool(torch.isfinite(grid).all()):
        raise ValueError("schedule contains NaN or inf")
    if float(grid[0]) > 1.0 or float(grid[-1]) < 0.0:
        raise ValueError(f"schedule times must lie in [0, 1], got {grid[0].item()} .. {grid[-1].item()}")
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError("schedule times must be strictly decreasing (t = 1 is noise, t = 0 is data)")
    return grid


def step_count(num_steps) -> int:
    """`num_steps` as an int >= 1: integers of Python, numpy and torch (anything with __index__)
    pass; a bool, a float or anything else is an error naming the value."""
    try:
        steps = operator.index(num_steps)
    except TypeError:
        steps = None
    if isinstance(num_steps, bool) or steps is None or steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    return steps


def sd3_sigmas(num_steps: int = 10, shift: float = 3.0) -> Tensor:
    """The SD3 shifted grid with `num_steps + 1` entries, ending at 0 (via diffusers)."""
    num_steps = step_count(num_steps)
    value = float(shift) if isinstance(shift, numbers.Real) and not isinstance(shift, bool) else None
    if value is None or not 0.0 < value < math.inf:
        # 0 divides by zero in the shift formula, a negative one reverses the grid
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    return validate_sigmas(scheduler.sigmas)


def uniform_sigmas(num_steps: int) -> Tensor:
    """`num_steps` equal steps from t = 1 to t = 0."""
    num_steps = step_count(num_steps)
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)


@dataclass(frozen=True)
class Schedule:
    """A validated grid with the per-step views the SDE step needs."""

    sigmas: Tensor

    def __post_init__(self):
        object.__setattr__(self, "sigmas", validate_sigmas(self.sigmas))

    @classmethod
    def sd3(cls, num_steps: int = 10, shift: float = 3.0) -> "Schedule":
        return cls(sd3_sigmas(num_steps, shift))

    @classmethod
    def uniform(cls, num_steps: int) -> "Schedule":
        return cls(uniform_sigmas(num_steps))

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def t(self) -> Tensor:
        """Start time of each step, `[T]`."""
        return self.sigmas[:-1]

    @property
    def t_next(self) -> Tensor:
        """End time of each step, `[T]`."""
        return self.sigmas[1:]

    @property
    def sigma_max(self) -> float:
        """The `t~` Flow-GRPO substitutes for t = 1 in the `sde` noise scale: the grid's 2nd entry."""
        return float(self.sigmas[1])

    @property
    def timesteps(self) -> Tensor:
        """diffusers' timesteps for the network: `1000 * t` per step (floats)."""
        return self.t * 1000.0
