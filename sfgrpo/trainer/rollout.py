"""Rollouts and clean estimates: the sampling half of an iteration.

`rollout` runs T stochastic steps from one shared initial noise per group and stores what the
update needs (states, samples, old log-probs) plus the guided velocities, which the look-ahead
reuses for its first Euler sub-step. `clean_estimates` turns every stored state into an estimate
of the final image, batched over all N x T states. All math goes through `sfgrpo.functional`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from sfgrpo import functional
from sfgrpo.distributed import TrajectoryNoise

# whatever the backbone's encode_prompts returns: a tensor or a tuple of `[B, ...]` tensors (or None
# for an absent part); a tuple type with a `concat_rows` method concatenates itself (text padded to
# different lengths)
Condition = Any


def select_rows(cond: Condition, rows: Tensor | slice) -> Condition:
    if cond is None:  # an absent part (a text mask where nothing is padded)
        return None
    if isinstance(cond, Tensor):
        return cond[rows]
    return type(cond)(select_rows(c, rows) for c in cond)


def repeat_rows(cond: Condition, times: int) -> Condition:
    """`[B, ...]` -> `[times * B, ...]` (block repeat, matching a `[T, B]` -> `[T * B]` flatten)."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond.repeat((times,) + (1,) * (cond.ndim - 1))
    return type(cond)(repeat_rows(c, times) for c in cond)


def concat_rows(first: Condition, second: Condition) -> Condition:
    if first is None and second is None:
        return None
    if isinstance(first, Tensor):
        return torch.cat([first, second])
    if hasattr(first, "concat_rows"):
        return first.concat_rows(second)
    return type(first)(concat_rows(a, b) for a, b in zip(first, second))


@dataclass
class GuidedModel:
    """The backbone's velocity with classifier-free guidance and optional autocast."""

    model: Any
    guidance_scale: float
    autocast_dtype: torch.dtype | None = None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.model.device.type, dtype=self.autocast_dtype)

    def __call__(self, x: Tensor, t: Tensor, cond: Condition, null_cond: Condition, return_uncond: bool = False,
                 split: bool = False):
        """The guided velocity; with `return_uncond`, `(velocity, unconditional velocity or None)`.
        The two CFG branches run as one batched forward, or with `split` as two forwards of the
        batch's own size: the conditional one then has the exact shape (and so the exact bits) of
        `with_constant_uncond`'s, which keeps an update's on-policy ratio exactly 1."""
        with self.autocast():
            if self.guidance_scale == 1.0:
                v = self.model.velocity(x, t, cond).float()
                return (v, None) if return_uncond else v
            if split:
                v_uncond = self.model.velocity(x, t, null_cond).float()
                v_cond = self.model.velocity(x, t, cond).float()
            else:
                both = self.model.velocity(torch.cat([x, x]), torch.cat([t, t]), concat_rows(null_cond, cond)).float()
                v_uncond, v_cond = both.chunk(2)
        v = self.combine(v_cond, v_uncond)
        return (v, v_uncond) if return_uncond else v

    def combine(self, v_cond: Tensor, v_uncond: Tensor) -> Tensor:
        """Classifier-free guidance: the backbone's own rule when its pipeline has one
        (`combine_guidance`: Qwen-Image rescales the result), else `uncond + scale (cond - uncond)`."""
        rule = getattr(self.model, "combine_guidance", None)
        if rule is not None:
            return rule(v_cond, v_uncond, self.guidance_scale)
        return v_uncond + self.guidance_scale * (v_cond - v_uncond)

    def with_constant_uncond(self, x: Tensor, t: Tensor, cond: Condition, null_cond: Condition,
                             v_uncond: Tensor | None = None) -> Tensor:
        """The guided velocity with the unconditional branch as a constant, Flow-GRPO's update (it
        detaches that branch). Its forward runs without autograd, so the backward covers only the
        conditional half of the batch: a third less backbone work per update step, half the
        activations; or it is not run at all when the caller passes `v_uncond` (the rollout's, while
        the weights are still the rollout's). Same value as `__call__` (the two halves may round
        differently from one batched forward on some backends)."""
        if self.guidance_scale == 1.0:
            return self(x, t, cond, null_cond)
        with self.autocast():
            if v_uncond is None:
                with torch.no_grad():
                    v_uncond = self.model.velocity(x, t, null_cond).float()
            v_cond = self.model.velocity(x, t, cond).float()
        return self.combine(v_cond, v_uncond)


def guided_in_chunks(guided: GuidedModel, x: Tensor, t: Tensor, cond: Condition, null_cond: Condition,
                     batch_size: int | None, return_uncond: bool = False, split: bool = False):
    """`guided(x, t, cond, null_cond)` with at most `batch_size` rows per network call (None: one
    call). With `return_uncond`, `(velocity, unconditional velocity or None)`."""
    if batch_size is None or batch_size >= x.shape[0]:
        return guided(x, t, cond, null_cond, return_uncond, split)
    parts = []
    for start in range(0, x.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        parts.append(guided(x[rows], t[rows], select_rows(cond, rows), select_rows(null_cond, rows), return_uncond,
                            split))
    if not return_uncond:
        return torch.cat(parts)
    v, v_uncond = zip(*parts)
    return torch.cat(v), None if v_uncond[0] is None else torch.cat(v_uncond)


@dataclass
class Rollout:
    """A batch of N trajectories of T steps. Row n belongs to group `group_ids[n]`."""

    prompts: list
    group_ids: Tensor  # [N] int64
    cond: Condition  # [N, ...]
    null_cond: Condition  # [N, ...]
    states: Tensor  # [T, N, ...]: x before step k (states[0] = the shared initial noise)
    samples: Tensor  # [T, N, ...]: x after step k (samples[-1] = final latents)
    log_probs: Tensor  # [T, N] float32, old log-probs of the samples
    velocities: Tensor  # [T, N, ...] float32 guided velocities at the states
    # [T, N, ...] float32 unconditional velocities (rollouts asked to keep them, with CFG), else None
    uncond_velocities: Tensor | None = None
    row_groups: list[int] | None = None  # host copy of group_ids (None: unknown on the host)
    shared_initial: bool = True  # all rows of a group start from one noise

    @property
    def final(self) -> Tensor:
        return self.samples[-1]

    def group_starts(self) -> "GroupStarts | None":
        """The first row of each group among these rows, and for every row the index of its group's
        first row among them (device tensors, built from the host copy: no device->host sync).
        All rows of a group start from one shared noise, so anything computed from the initial
        state alone (its clean estimate, decoded image and reward) is computed once per group.
        None without a host copy of the groups."""
        if self.row_groups is None or not self.shared_initial:
            return None
        return _group_starts(tuple(self.row_groups), self.group_ids.device)


class GroupStarts(NamedTuple):
    rows: list[int]  # host: the first row of each group, in row order
    firsts: Tensor  # the same rows on the device
    position: Tensor  # [N]: for each row, its group's index in `rows`


# A process rolls out the same rows every iteration: host->device copies of its group tables are
# made once (a pageable copy synchronises the host with the device), not every iteration.
@functools.lru_cache(maxsize=16)
def _device_ids(values: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=16)
def _group_starts(row_groups: tuple[int, ...], device: torch.device) -> GroupStarts:
    firsts, slot_of, position = [], {}, []
    for row, group in enumerate(row_groups):
        if group not in slot_of:
            slot_of[group] = len(firsts)
            firsts.append(row)
        position.append(slot_of[group])
    return GroupStarts(firsts, _device_ids(tuple(firsts), device), _device_ids(tuple(position), device))


@torch.no_grad()
def rollout(
    guided: GuidedModel,
    prompts: list,
    group_size: int,
    steps: "StepTable",
    *,
    sde_type: str,
    logprob: str,
    generator: torch.Generator | None = None,
    noise: TrajectoryNoise | None = None,
    rows: Sequence[int] | None = None,
    batch_size: int | None = None,
    keep_uncond: bool = False,
    shared_initial_noise: bool = True,
) -> Rollout:
    """Samples `group_size` trajectories per prompt, all trajectories of a group starting from the
    same initial noise, so every difference within a group comes from the SDE's noise (or, with
    `shared_initial_noise=False`, each from a noise of its own, as Flow-GRPO's code samples).

    Noise comes from `generator` (a stream: what is drawn depends on what was drawn before) or from
    `noise` (stateless, a function of the global trajectory index: what the trainer uses). With
    `noise`, `rows` picks which trajectories of the global batch (row j = prompt j // group_size)
    this process rolls out: a rank's share of a data-parallel batch (default: all of them).
    `batch_size`: trajectories per network call (None: all at once); the SDE step stays one call.
    `keep_uncond`: also store the unconditional velocities (CFG), for an update that treats them as
    constants (`GuidedModel.with_constant_uncond`); the two branches then run as separate forwards,
    so that the update's conditional forward reproduces the rollout's bit for bit.
    """
    model = guided.model
    if (generator is None) == (noise is None):
        raise ValueError("rollout needs exactly one of generator (a stream) or noise (stateless)")
    rows = list(range(len(prompts) * group_size)) if rows is None else list(rows)
    if generator is not None and rows != list(range(len(prompts) * group_size)):
        raise ValueError("rows needs stateless noise (noise=TrajectoryNoise(...))")
    n = len(rows)
    row_groups = [j // group_size for j in rows]
    expanded = [prompts[g] for g in row_groups]
    group_ids = _device_ids(tuple(row_groups), model.device)
    cond = model.encode_prompts(expanded)
    null_cond = model.null_condition(n)
    if noise is not None and shared_initial_noise:
        x = noise.initial(row_groups, model.latent_shape).to(model.device)
    elif noise is not None:
        x = noise.initial_per_trajectory(rows, model.latent_shape).to(model.device)
    elif shared_initial_noise:
        shared = functional_noise((len(prompts), *model.latent_shape), generator, model.device)
        x = shared.repeat_interleave(group_size, dim=0)
    else:
        x = functional_noise((n, *model.latent_shape), generator, model.device)
    states, samples, log_probs, velocities, uncond_velocities = [], [], [], [], []
    for k in range(steps.num_steps):
        t_row = torch.full((n,), steps.t[k], device=model.device)
        v, v_uncond = guided_in_chunks(guided, x, t_row, cond, null_cond, batch_size, return_uncond=True,
                                       split=keep_uncond)
        if keep_uncond and v_uncond is not None:
            uncond_velocities.append(v_uncond)
        out = functional.sde_step(
            x, v, steps.t[k], steps.t_next[k], steps.noise_level[k], sde_type=sde_type, generator=generator,
            noise=None if noise is None else noise.step(rows, k, x.shape[1:]).to(x.device),
            logprob=logprob, sigma_max=steps.sigma_max,
        )
        states.append(x)
        samples.append(out.prev_sample)
        log_probs.append(out.log_prob)
        velocities.append(v)
        x = out.prev_sample
    return Rollout(
        prompts=expanded, group_ids=group_ids, cond=cond, null_cond=null_cond, states=torch.stack(states),
        samples=torch.stack(samples), log_probs=torch.stack(log_probs), velocities=torch.stack(velocities),
        uncond_velocities=torch.stack(uncond_velocities) if uncond_velocities else None, row_groups=row_groups,
        shared_initial=shared_initial_noise,
    )


def functional_noise(shape: tuple, generator: torch.Generator, device) -> Tensor:
    """Standard normal initial noise drawn from the run's generator (diffusers' randn_tensor rule)."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


@functools.lru_cache(maxsize=16)
def most_groups_per_process(batch_size: int, group_size: int, world_size: int) -> int:
    """The largest number of distinct groups any process's share of the batch holds (host
    arithmetic: every process computes the same number without communicating)."""
    from sfgrpo.distributed import shard_rows

    return max(len({row // group_size for row in shard_rows(batch_size, rank, world_size)})
               for rank in range(world_size))


@torch.no_grad()
def clean_estimates(guided: GuidedModel, batch: Rollout, steps: "StepTable", lookahead_steps: int,
                    batch_size: int | None = None, initial_rows: int | None = None) -> Tensor:
    """`[T, N, ...]` estimates of the final image from every stored state, T' Euler sub-steps each.

    All states go through the network together (`batch_size` rows per call, when given); the first
    sub-step reuses the rollout's velocity, so T' = 1 (the Tweedie estimate) costs no network call
    at all. The initial state is shared by a group's rows: its estimate is computed once per group
    (a tenth of the look-ahead's network calls at T = 10). `initial_rows` pads that part to a fixed
    number of rows (repeats, discarded): processes of a sharded model then make the same number of
    network calls (collectives) even when their shares hold different numbers of groups.
    """
    num_steps, n = batch.states.shape[:2]
    starts = batch.group_starts()
    firsts = None if starts is None else starts.firsts
    if firsts is not None and initial_rows is not None and initial_rows > len(firsts):
        firsts = torch.cat([firsts, firsts[-1:].expand(initial_rows - len(firsts))])
    head = n if firsts is None else len(firsts)
    flat = pack_columns(batch.states, firsts)
    # filled on the device: no host->device copy
    t_rows = torch.cat([torch.full((head,), steps.t[0], device=flat.device)]
                       + [torch.full((n,), t, device=flat.device) for t in steps.t[1:num_steps]])
    first_cond, first_null = (batch.cond, batch.null_cond) if firsts is None else \
        (select_rows(batch.cond, firsts), select_rows(batch.null_cond, firsts))
    cond = concat_rows(first_cond, repeat_rows(batch.cond, num_steps - 1))
    null_cond = concat_rows(first_null, repeat_rows(batch.null_cond, num_steps - 1))

    def velocity_fn(state: Tensor, t: Tensor) -> Tensor:
        return guided_in_chunks(guided, state, t, cond, null_cond, batch_size)

    estimates = functional.ode_lookahead(flat, t_rows, velocity_fn, lookahead_steps,
                                         v=pack_columns(batch.velocities, firsts))
    if starts is not None:  # padding rows (after the real first rows) are never indexed
        estimates = estimates[unpack_index(starts, head, num_steps)]
    return estimates.reshape(batch.states.shape)


def pack_columns(columns: Tensor, firsts: Tensor | None) -> Tensor:
    """`[K, N, ...]` -> the rows to compute: column 0 at the rows `firsts` only (None: all), then
    columns 1.. whole (flattened column by column)."""
    head = columns[0] if firsts is None else columns[0][firsts]
    return torch.cat([head, columns[1:].flatten(0, 1)])


def unpack_index(starts: GroupStarts, head_rows: int, columns: int) -> Tensor:
    """For each of the `columns x N` rows (flattened like `flatten(0, 1)`), the row of
    `pack_columns(..., firsts)` holding its value, `head_rows` = len(firsts)."""
    n = len(starts.position)
    return torch.cat([starts.position, head_rows + torch.arange((columns - 1) * n, device=starts.position.device)])


@dataclass(frozen=True)
class StepTable:
    """Host-side per-step constants of the sampling grid, fixed for a run (no device syncs)."""

    t: list[float]
    t_next: list[float]
    noise_level: list[float]
    sigma_max: float
    trained: list[int]  # indices of the steps the update trains

    @property
    def num_steps(self) -> int:
        return len(self.t)

    @classmethod
    def build(cls, sigmas: Tensor, sde_type: str, noise_level: float, train_last_step: bool) -> "StepTable":
        t, t_next = sigmas[:-1].tolist(), sigmas[1:].tolist()
        sigma_max = float(sigmas[1])
        levels = [noise_level] * len(t)
        # a step is trainable when it has a density: ask the SDE step itself for its std
        probe = torch.zeros(len(t), 1)
        std = functional.sde_step(
            probe, probe, torch.tensor(t), torch.tensor(t_next), torch.tensor(levels), sde_type=sde_type,
            noise=probe, sigma_max=sigma_max,
        ).std
        if sde_type in ("cps", "ddim"):  # std in [0, t']: the mean keeps sqrt(t'^2 - std^2) of x1_hat
            for k in range(len(t)):
                if not 0.0 <= float(std[k]) <= t_next[k] * (1.0 + 1e-6):  # (functional.sde_step's tolerance)
                    raise ValueError(f"noise_level {noise_level} does not fit {sde_type!r} at step {k} (t = {t[k]:.6g}, "
                                     f"t' = {t_next[k]:.6g}): its std {float(std[k]):.6g} must be in [0, t']")
        trained = [k for k in range(len(t)) if float(std[k]) > 0 and (train_last_step or k < len(t) - 1)]
        if not trained:
            raise ValueError(f"no trainable step: every step of this {sde_type!r} schedule is deterministic")
        return cls(t, t_next, levels, sigma_max, trained)

