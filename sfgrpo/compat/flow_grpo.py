"""Flow-GRPO drop-in: its public functions with identical signatures and results (SPEC §7), on
sfgrpo's fused step and native advantage engine.

    from sfgrpo.compat import flow_grpo
    flow_grpo.patch()     # every loaded Flow-GRPO module now calls the fused versions
    flow_grpo.unpatch()   # back to the originals

Numerically: `sde` and `cps` give Flow-GRPO's outputs up to float rounding (fp32 math, the same
sample for the same generator). Differences, all deliberate: no device->host sync (the sigma lookup
runs on the device from a table built once per schedule); an `sde` row with noise level 0 gets
log-prob 0 instead of Flow-GRPO's NaN/-inf; the `ddim` and `ode` step types exist too.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Union

import numpy as np
import torch

from sfgrpo import functional

__all__ = ["sde_step_with_logprob", "PerPromptStatTracker", "patch", "unpatch", "is_patched"]


# ------------------------------------------------------------------------- schedule lookup
class _ScheduleTable:
    """Device copies of a scheduler's timesteps and sigmas, built once per schedule."""

    def __init__(self, scheduler, device: torch.device):
        self.key = self.key_of(scheduler, device)
        self.timesteps = torch.as_tensor(scheduler.timesteps).to(device=device, dtype=torch.float32)
        self.sigmas = torch.as_tensor(scheduler.sigmas).to(device=device, dtype=torch.float32)
        if self.sigmas.numel() != self.timesteps.numel() + 1:
            raise ValueError(
                f"scheduler has {self.timesteps.numel()} timesteps but {self.sigmas.numel()} sigmas; "
                "expected one more sigma (the final 0, which scheduler.set_timesteps appends: call it first)"
            )
        if self.timesteps.numel() == 0:
            raise ValueError("scheduler has no timesteps: call scheduler.set_timesteps first")
        # diffusers' rule for a timestep that occurs more than once: its second occurrence. Which
        # position answers each value is decided here, once per schedule, on the device: position j
        # answers when it is the second occurrence of its value, or the only one
        same = self.timesteps[:, None] == self.timesteps[None, :]
        earlier = same.tril(diagonal=-1).sum(dim=1)  # occurrences of position j's value before j
        occurrences = same.sum(dim=1)
        self.answers = (earlier == (occurrences > 1).to(earlier.dtype)).to(torch.uint8)
        n = self.timesteps.numel()
        # what a lookup returns, gathered in one index: t, t', sigma_max, and the timestep itself
        # (to check the match)
        self.rows = torch.stack([self.sigmas[:n], self.sigmas[1:], self.sigmas[1].expand(n), self.timesteps])

    @staticmethod
    def key_of(scheduler, device):
        timesteps, sigmas = scheduler.timesteps, scheduler.sigmas
        return (id(timesteps), getattr(timesteps, "_version", None), id(sigmas), getattr(sigmas, "_version", None),
                len(timesteps), str(device))

    def lookup(self, timestep: torch.Tensor):
        """Per-row (t, t', sigma_max) by exact match of `timestep` in the table, diffusers' rule
        (the second match if there are two), all on the device: 7 small kernels, no host sync."""
        index = ((timestep[:, None] == self.timesteps[None, :]) * self.answers).argmax(dim=1)
        t, t_next, sigma_max, matched = self.rows.index_select(1, index).unbind(0)
        # a row without a match took position 0 (argmax of zeros): an asynchronous check, no host
        # sync, still a clear error for a timestep not in the schedule
        torch._assert_async((matched == timestep).all(), "sde_step_with_logprob: a timestep is not in scheduler.timesteps")
        return t, t_next, sigma_max


def _table(scheduler, device) -> _ScheduleTable:
    key = _ScheduleTable.key_of(scheduler, device)
    cached = getattr(scheduler, "_sfgrpo_schedule_table", None)
    if cached is None or cached.key != key:
        cached = _ScheduleTable(scheduler, device)
        try:
            scheduler._sfgrpo_schedule_table = cached
        except AttributeError:  # a scheduler that refuses attributes: rebuild each call
            pass
    return cached


# ------------------------------------------------------------------------------ the step
def sde_step_with_logprob(
    scheduler,
    model_output: torch.FloatTensor,
    timestep: Union[float, torch.FloatTensor],
    sample: torch.FloatTensor,
    noise_level: float = 0.7,
    prev_sample: Optional[torch.FloatTensor] = None,
    generator: Optional[torch.Generator] = None,
    sde_type: Optional[str] = "sde",
    return_sqrt_dt: Optional[bool] = False,
):
    """Flow-GRPO's `sde_step_with_logprob`, fused. Returns `(prev_sample, log_prob [B],
    prev_sample_mean, std_dev_t [B,1,...])` (+ `sqrt(-dt)` `[B,1,...]` when `return_sqrt_dt`), all
    float32; `std_dev_t` is sigma_t for `sde` (without sqrt(-dt)) and the per-step std for `cps`."""
    from diffusers.utils.torch_utils import randn_tensor

    # the velocity in its storage dtype: the kernels read it as fp32 (exactly what .float() gives)
    # and write its gradient in that dtype with the rounding of .float()'s backward, without a cast
    # kernel and its backward per step
    sample = sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()
    batch, device = sample.shape[0], sample.device
    timestep = torch.as_tensor(timestep, device=device).to(torch.float32).reshape(-1)
    if timestep.numel() == 1:
        timestep = timestep.expand(batch)
    elif timestep.numel() != batch:
        raise ValueError(f"timestep must hold one value or one per row ({batch}), got {timestep.numel()}")
    t, t_next, sigma_max = _table(scheduler, device).lookup(timestep)
    noise = None
    if prev_sample is None:
        noise = randn_tensor(model_output.shape, generator=generator, device=device, dtype=torch.float32)
    out = functional.sde_step(
        sample, model_output, t, t_next, noise_level, sde_type=sde_type, prev_sample=prev_sample, noise=noise,
        logprob="flow_grpo", sigma_max=sigma_max, return_mean=True,
    )
    shape = (batch,) + (1,) * (sample.ndim - 1)
    result = (out.prev_sample, out.log_prob, out.mean, out.std_dev_t.reshape(shape))
    if return_sqrt_dt:
        return result + (torch.sqrt(t - t_next).reshape(shape),)
    return result


# ------------------------------------------------------------------------ advantages
class PerPromptStatTracker:
    """Flow-GRPO's per-prompt advantage tracker (same API and results) on sfgrpo's advantage engine.

    `update(prompts, rewards)` returns float64 advantages `(r - mean) / (std + 1e-4)` with the mean
    over every reward this tracker has seen for the prompt since the last `clear()`, and the std over
    those (population std) or, with `global_std`, over the whole current batch. `rewards` may be
    `[N]` or `[N, K]`. Types: `grpo` (default), `rwr`, `sft`, `dpo`.
    """

    def __init__(self, global_std: bool = False):
        self.global_std = global_std
        self.stats: dict = {}  # prompt -> float64 array of every reward seen since clear()
        self.history_prompts: set = set()

    def update(self, prompts, rewards, dists=None, type: str = "grpo"):  # noqa: A002 (Flow-GRPO's name)
        prompts = np.asarray(prompts)
        rewards = np.asarray(rewards, dtype=np.float64)
        if rewards.shape[:1] != prompts.shape[:1]:
            raise ValueError(f"got {prompts.shape[0]} prompts for {rewards.shape[0]} rewards")
        if type == "gardo":
            raise NotImplementedError("type='gardo' is not supported by sfgrpo's tracker; use Flow-GRPO's")
        if type not in ("grpo", "rwr", "sft", "dpo"):
            raise ValueError(f"unknown advantage type {type!r}")
        unique, ids, counts = np.unique(prompts, return_inverse=True, return_counts=True)
        ids = ids.reshape(-1)
        # rows of each prompt via one stable sort: O(N log N), not Flow-GRPO's O(N x prompts) masks
        rows_of = np.split(np.argsort(ids, kind="stable"), np.cumsum(counts)[:-1])
        history = []
        for gid, (prompt, rows) in enumerate(zip(unique.tolist(), rows_of)):
            previous = self.stats.get(prompt)
            if previous is not None and len(previous):
                history.append((gid, previous))
            current = rewards[rows]
            self.stats[prompt] = current if previous is None else np.concatenate([previous, current])
            self.history_prompts.add(hash(prompt))
        if type == "rwr":
            return rewards.copy()
        if type in ("sft", "dpo"):
            return self._rank_advantages(rewards, rows_of, type)
        mean, std = self._group_moments(rewards, ids, history)
        if self.global_std:
            std = np.broadcast_to(rewards.std(axis=0, keepdims=True), rewards.shape)
        else:
            std = std[ids]
        return (rewards - mean[ids]) / (std + 1e-4)

    @staticmethod
    def _group_moments(rewards, ids, history):
        """Per-prompt mean and population std over history + current rewards (advantage engine)."""
        values, groups = rewards, ids
        if history:
            values = np.concatenate([rewards] + [rows for _, rows in history])
            groups = np.concatenate([ids] + [np.full(len(rows), gid) for gid, rows in history])
        _, stats = functional.group_advantages(
            torch.from_numpy(np.ascontiguousarray(values)), torch.from_numpy(groups.astype(np.int64)), return_stats=True
        )
        # stats rows follow the sorted distinct ids, which are exactly 0..G-1 here
        return stats.mean.double().numpy(), stats.std.double().numpy()

    @staticmethod
    def _rank_advantages(rewards, rows_of, kind):
        advantages = np.zeros_like(rewards)
        for rows in rows_of:
            group = rewards[rows]
            if kind == "sft":
                advantages[rows] = (group == group.max()).astype(np.float64)
                continue
            if len(group) < 2:  # nothing to prefer over (Flow-GRPO would index out of range)
                continue
            best, worst = int(np.argmax(group)), int(np.argmin(group))
            if best == worst:  # all equal: Flow-GRPO marks positions 1 and 0
                worst, best = 0, 1
            result = np.zeros_like(group)
            result[best], result[worst] = 1.0, -1.0
            advantages[rows] = result
        return advantages

    def get_stats(self):
        avg_group_size = sum(len(v) for v in self.stats.values()) / len(self.stats) if self.stats else 0
        return avg_group_size, len(self.history_prompts)

    def clear(self):
        self.stats = {}


# ---------------------------------------------------------------------------- patching
DEFAULT_MODULES = (
    "flow_grpo.diffusers_patch.sd3_sde_with_logprob",
    "flow_grpo.stat_tracking",
)
_REPLACEMENTS = {"sde_step_with_logprob": sde_step_with_logprob, "PerPromptStatTracker": PerPromptStatTracker}
_patched: list[tuple[object, str, object]] = []  # (module, attribute, original)
_originals: dict[str, list[object]] = {}


def patch(modules=None) -> list[str]:
    """Replaces Flow-GRPO's `sde_step_with_logprob` and `PerPromptStatTracker` with sfgrpo's, in the
    modules that define them and in every loaded module that imported them by name.

    `modules`: module objects or names that define the originals (default: Flow-GRPO's own
    modules). Idempotent; call again after importing more of the trainer to patch those too.
    Returns the patched `module.attribute` names."""
    sources = []
    for module in DEFAULT_MODULES if modules is None else modules:
        if isinstance(module, str):
            try:
                module = importlib.import_module(module)
            except ImportError as err:
                raise ImportError(
                    f"sfgrpo.compat.flow_grpo.patch: cannot import {module!r} ({err}); is Flow-GRPO installed? "
                    "Pass modules=[...] to patch other modules."
                ) from err
        sources.append(module)
    for module in sources:
        for name, replacement in _REPLACEMENTS.items():
            current = getattr(module, name, None)
            if current is not None and current is not replacement and current not in _originals.setdefault(name, []):
                _originals[name].append(current)
    done = []
    for module in list(sys.modules.values()) + [m for m in sources if m not in sys.modules.values()]:
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, replacement in _REPLACEMENTS.items():
            current = namespace.get(name)
            if current is not None and any(current is original for original in _originals.get(name, [])):
                _patched.append((module, name, current))
                setattr(module, name, replacement)
                done.append(f"{getattr(module, '__name__', module)}.{name}")
    return done


def unpatch() -> None:
    """Restores every attribute `patch()` replaced."""
    while _patched:
        module, name, original = _patched.pop()
        setattr(module, name, original)


def is_patched() -> bool:
    return bool(_patched)
