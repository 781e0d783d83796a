"""The advantage engine as torch.library custom ops (namespace `sfgrpo`), backed by `sfgrpo._C`.

Ops (CPU and CUDA kernels, fake impls, opcheck-clean, torch.compile(fullgraph=True)-friendly):

- `sfgrpo::gain_advantages(rewards, group_ids, normalize, eps, clip, step_mask, nonfinite)`
  -> advantages `[N, T]`
- `sfgrpo::group_advantages(rewards, group_ids, std, eps, unbiased, clip, nonfinite)`
  -> advantages of the rewards' shape (`[N]` or `[N, K]`)
- `sfgrpo::gain_advantages_with_stats` / `sfgrpo::group_advantages_with_stats`: the same plus
  per-group statistics. The number of groups G depends on the data, so the statistics come
  padded to N rows (zeros past G) with G as a 0-d int64 tensor; `gain_advantages(...,
  return_stats=True)` below slices them into a `GroupStats`.

Advantages are constants of the policy-gradient loss: the ops have an autograd registration that
marks their outputs non-differentiable (like `argmax`), so `rewards.requires_grad` never makes
them part of a graph.

NaN/inf policy: the native code always leaves rows with a non-finite reward out of the
statistics with advantage 0 and counts them. `nonfinite="drop"` stops there (no host sync on
CUDA); `nonfinite="error"` turns a non-zero count into a ValueError, which on CUDA costs one
device->host sync to read the count.

Threads (CPU): `set_num_threads(n)` or SFGRPO_NUM_THREADS caps the worker threads (0/unset:
chosen from the problem size). Any thread count gives bitwise identical results.

`sfgrpo.functional.gain_advantages` / `group_advantages` are the public entry points: they
validate, choose the backend (`sfgrpo.backend`) and call `gain_advantages` / `group_advantages`
here when it is `native`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from sfgrpo import _native, alloc, backend
from sfgrpo.reference import NONFINITE_POLICIES, GroupStats, raise_nonfinite
from sfgrpo.reference import gains as gains_of
from sfgrpo.scratch import stream_scratch

NORMALIZE_MODES = ("joint", "per_step")
STD_MODES = ("group", "global")
NATIVE_DTYPES = (torch.float32, torch.float64)
THREADS_ENV = "SFGRPO_NUM_THREADS"
_INF = float("inf")

backend.register_op("gain_advantages", "native")
backend.register_op("group_advantages", "native")


# ------------------------------------------------------------------------------ thread knob
def _threads_from_env() -> int:
    value = (backend.environ_get(THREADS_ENV) or "").strip()
    if not value:
        return 0
    try:
        threads = int(value)
    except ValueError:
        raise ValueError(f"{THREADS_ENV} must be an integer, got {value!r}") from None
    return max(threads, 0)


_num_threads: int | None = None  # None: follow the environment


def set_num_threads(threads: int | None) -> None:
    """Caps the CPU worker threads of the native engine (None or 0: automatic)."""
    global _num_threads
    if threads is not None and (not isinstance(threads, int) or threads < 0):
        raise ValueError(f"threads must be a non-negative int or None, got {threads!r}")
    _num_threads = threads


def get_num_threads() -> int:
    """The thread cap in force: 0 means chosen from the problem size."""
    return _threads_from_env() if _num_threads is None else _num_threads


# ------------------------------------------------------------------------------- validation
def _check_common(rewards: Tensor, group_ids: Tensor, eps: float, clip: float | None, nonfinite: str,
                  native_only: bool) -> torch.Size:
    """Checks what both ops take alike; returns `rewards.shape` (read once: each read builds a Size)."""
    if not isinstance(rewards, Tensor) or not isinstance(group_ids, Tensor):
        raise TypeError("rewards and group_ids must be tensors")
    dtype = rewards.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"rewards must be a floating-point tensor (float32 or float64), got {dtype}")
    if native_only and dtype not in NATIVE_DTYPES:
        raise TypeError(f"the native advantage ops take float32 or float64 rewards, got {dtype}")
    if group_ids.dtype != torch.int64:
        raise TypeError(f"group_ids must be int64, got {group_ids.dtype} (convert with group_ids.long())")
    shape, ids_shape = rewards.shape, group_ids.shape
    if not shape or len(ids_shape) != 1 or ids_shape[0] != shape[0]:
        n = shape[0] if shape else "?"
        raise ValueError(f"group_ids must be [N] with N = rewards.shape[0] = {n}, got {tuple(ids_shape)}")
    device = rewards.device
    if group_ids.device != device:
        raise ValueError(f"group_ids is on {group_ids.device} but rewards on {device}")
    if native_only and backend.eager_device_type(device) not in ("cpu", "cuda"):
        raise ValueError(f"the native advantage ops run on CPU and CUDA tensors, got {device}")
    # NaN fails both comparisons; a bool is an int (True: 1.0)
    if not isinstance(eps, (int, float)) or not 0.0 <= eps < _INF:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if clip is not None and (not isinstance(clip, (int, float)) or not clip > 0.0):
        raise ValueError(f"clip must be None or a number > 0, got {clip!r}")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    return shape


def check_gain_inputs(rewards: Tensor, group_ids: Tensor, *, normalize: str, eps: float, clip: float | None,
                      step_mask: Tensor | None, nonfinite: str, native_only: bool = False) -> None:
    """Clear errors for every malformed input of `gain_advantages`, before any kernel runs."""
    shape = _check_common(rewards, group_ids, eps, clip, nonfinite, native_only)
    if len(shape) != 2 or shape[1] < 2:
        raise ValueError(f"rewards must be [N, T+1] with T >= 1, got {tuple(shape)}")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be 'joint' or 'per_step', got {normalize!r}")
    if step_mask is not None:
        steps = shape[1] - 1
        if not isinstance(step_mask, Tensor) or step_mask.dtype != torch.bool or step_mask.shape != (steps,):
            got = f"{step_mask.dtype} {tuple(step_mask.shape)}" if isinstance(step_mask, Tensor) else type(step_mask)
            raise ValueError(f"step_mask must be a bool tensor of shape [{steps}], got {got}")
        if native_only and step_mask.device != rewards.device:
            raise ValueError(f"step_mask is on {step_mask.device} but rewards on {rewards.device}")


def check_group_inputs(rewards: Tensor, group_ids: Tensor, *, std: str, eps: float, clip: float | None,
                       nonfinite: str, native_only: bool = False) -> None:
    """Clear errors for every malformed input of `group_advantages`, before any kernel runs."""
    shape = _check_common(rewards, group_ids, eps, clip, nonfinite, native_only)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] < 1):
        raise ValueError(f"rewards must be [N] or [N, K] with K >= 1, got {tuple(shape)}")
    if std not in STD_MODES:
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")


# ----------------------------------------------------------------------------- native call
class _Problem(NamedTuple):
    gains: bool  # normalise consecutive-column differences
    pooled: bool  # one statistic per group over all columns
    global_std: bool  # divide by the batch's std
    ddof: int
    eps: float
    clip: float | None


class _PaddedStats(NamedTuple):
    group_ids: Tensor  # [N] int64, first G rows used
    mean: Tensor  # [N, S] float64
    std: Tensor  # [N, S] float64
    size: Tensor  # [N] int64
    zero_std: Tensor  # [N, S] bool
    num_groups: Tensor  # [] int64


def _padded_stats(rows: int, stat_columns: int, device: torch.device) -> _PaddedStats:
    # zeros, not empty: the padding past G must be deterministic (opcheck compares runs)
    return _PaddedStats(
        group_ids=torch.zeros(rows, dtype=torch.int64, device=device),
        mean=torch.zeros(rows, stat_columns, dtype=torch.float64, device=device),
        std=torch.zeros(rows, stat_columns, dtype=torch.float64, device=device),
        size=torch.zeros(rows, dtype=torch.int64, device=device),
        zero_std=torch.zeros(rows, stat_columns, dtype=torch.bool, device=device),
        num_groups=torch.zeros((), dtype=torch.int64, device=device),
    )


def _raise_nonfinite(rewards: Tensor, gains: bool) -> None:
    """The engine counted rows left out of the statistics: name them. As the engines do, a gain row is
    finite when each of its gains is, computed in the rewards' (compute) dtype."""
    values = gains_of(rewards) if gains else rewards.reshape(rewards.shape[0], -1)
    raise_nonfinite(torch.isfinite(values).all(dim=1), gains)


_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def engine_args(rewards: Tensor, group_ids: Tensor, out: Tensor, problem: _Problem, mask: Tensor | None,
                stats: _PaddedStats | None, shape: tuple[int, int] | None = None) -> tuple:
    """The native engines' leading positional arguments (dtype, addresses of contiguous tensors, the
    problem, the statistics' addresses), in the bindings' order: positional arguments, because
    pybind11 matches keywords by name on every call (~1.4 us for these 14). `shape`: rewards' (rows,
    width) when the caller has read it already."""
    rows, width = rewards.shape if shape is None else shape
    return (
        _DTYPE_NAMES[rewards.dtype], rewards.data_ptr(), group_ids.data_ptr(), out.data_ptr(), rows, width,
        problem.gains, problem.pooled, problem.global_std, problem.ddof, problem.eps, problem.clip,
        0 if mask is None else mask.data_ptr(),
        None if stats is None else tuple(t.data_ptr() for t in stats[:5]),
    )


@functools.cache
def _cpu_engine():
    return _native.require("the native advantage ops").cpu


@functools.cache
def _cuda_engine():
    # cached: require_cuda asks the module for its build info (a dict) on every call
    return _native.require_cuda("the native advantage ops")


def _run_native(rewards: Tensor, group_ids: Tensor, problem: _Problem, column_mask: Tensor | None,
                nonfinite: str, with_stats: bool) -> tuple[Tensor, _PaddedStats | None]:
    """Runs the engine on `rewards` `[N, K]`, or `[N]` (which the engine takes as `[N, 1]`, given the
    sizes: no view in, none out); returns advantages `[N, columns]` or `[N]` (and padded stats)."""
    rewards = rewards.contiguous()
    group_ids = group_ids.contiguous()
    matrix = rewards.shape
    device = rewards.device
    if len(matrix) == 1:  # group_advantages' [N] rewards (gains always come as [N, T+1])
        rows = matrix[0]
        shape = rows, width = rows, 1
        columns = 1
        size, stride = (rows,), (1,)
    else:
        shape = rows, width = matrix
        columns = width - 1 if problem.gains else width
        size, stride = (rows, columns), (columns, 1)
    # on CUDA: None unless the tensors are on the current device (the launch below needs to know too)
    allocate = alloc.allocator(device)
    out = (allocate or alloc.empty_strided_on(device))(size, stride, rewards.dtype)
    stats = _padded_stats(rows, 1 if problem.pooled else columns, device) if with_stats else None
    if rows == 0:
        return out, stats
    mask = column_mask.contiguous().view(torch.uint8) if column_mask is not None else None
    args = engine_args(rewards, group_ids, out, problem, mask, stats, shape)
    if rewards.is_cpu:  # a bool attribute; device.type would build a string
        groups, nonfinite_rows = _cpu_engine().advantages(*args, get_num_threads())
        if stats is not None:
            stats.num_groups.fill_(groups)
        if nonfinite == "error" and nonfinite_rows:
            _raise_nonfinite(rewards, problem.gains)
        return out, stats
    # one buffer, the stream's (`_launch`): the engine's scratch, then {groups, nonfinite rows}
    scratch = _workspace_bytes(rows, width, problem.gains, problem.pooled, with_stats)
    if allocate is not None:  # the current device's: launch there
        buffer = _launch(args, scratch, device)
    else:  # kernels launch on the current device: switch only when the tensors live on another one
        with torch.cuda.device(device):
            buffer = _launch(args, scratch, device)
    if with_stats or nonfinite == "error":
        counts = buffer[scratch:scratch + 16].view(torch.int64)
        if stats is not None:
            stats.num_groups.copy_(counts[0])
        if nonfinite == "error" and bool(counts[1] != 0):  # the one device->host sync of this policy
            _raise_nonfinite(rewards, problem.gains)
    return out, stats


def _launch(args: tuple, scratch: int, device: torch.device) -> Tensor:
    """Enqueues the CUDA engine on the current stream; returns its scratch buffer (counts at `scratch`).
    The buffer is the stream's (sfgrpo.scratch): the engine clears what it needs itself."""
    buffer = stream_scratch("advantages.workspace", device, scratch + 16, torch.uint8)
    workspace = buffer.data_ptr()
    _cuda_engine().advantages(*args, workspace + scratch, workspace, scratch,
                              torch._C._cuda_getCurrentRawStream(device.index))
    return buffer


@functools.lru_cache(maxsize=256)
def _workspace_bytes(rows: int, width: int, gains: bool, pooled: bool, with_stats: bool) -> int:
    """Scratch bytes of the CUDA engine, a multiple of 16 (CUB's size query, for the statistics'
    sort, would run on the host on every call)."""
    scratch = _cuda_engine().advantages_workspace_bytes(rows, width, gains, pooled, with_stats)
    return -(-scratch // 16) * 16


# cached: a NamedTuple's construction is ~0.7 us of every call's host path, and training repeats the
# same few option sets
@functools.lru_cache(maxsize=64)
def _gain_problem(normalize: str, eps: float, clip: float | None) -> _Problem:
    return _Problem(gains=True, pooled=normalize == "joint", global_std=False, ddof=0, eps=eps, clip=clip)


@functools.lru_cache(maxsize=64)
def _group_problem(std: str, eps: float, unbiased: bool, clip: float | None) -> _Problem:
    return _Problem(gains=False, pooled=False, global_std=std == "global", ddof=int(unbiased), eps=eps, clip=clip)


# ------------------------------------------------------------------------------ custom ops
# Each op's body is a plain function too: eager calls run it directly (the registered op's Python
# dispatch layers cost more than the engine on prompt-sized batches); torch.compile sees the op.
def _gain_advantages_impl(rewards, group_ids, normalize, eps, clip, step_mask, nonfinite, with_stats):
    check_gain_inputs(rewards, group_ids, normalize=normalize, eps=eps, clip=clip, step_mask=step_mask,
                      nonfinite=nonfinite, native_only=True)
    return _gain_advantages_run(rewards, group_ids, normalize, eps, clip, step_mask, nonfinite, with_stats)


def _gain_advantages_run(rewards, group_ids, normalize, eps, clip, step_mask, nonfinite, with_stats):
    """The op's body after validation."""
    out, stats = _run_native(rewards, group_ids, _gain_problem(normalize, eps, clip), step_mask, nonfinite,
                             with_stats)
    return (out, *stats) if with_stats else out


def _group_advantages_impl(rewards, group_ids, std, eps, unbiased, clip, nonfinite, with_stats):
    check_group_inputs(rewards, group_ids, std=std, eps=eps, clip=clip, nonfinite=nonfinite, native_only=True)
    return _group_advantages_run(rewards, group_ids, std, eps, unbiased, clip, nonfinite, with_stats)


def _group_advantages_run(rewards, group_ids, std, eps, unbiased, clip, nonfinite, with_stats):
    """The op's body after validation."""
    out, stats = _run_native(rewards, group_ids, _group_problem(std, eps, unbiased, clip), None, nonfinite,
                             with_stats)
    return (out, *stats) if with_stats else out


@torch.library.custom_op("sfgrpo::gain_advantages", mutates_args=(), device_types=("cpu", "cuda"))
def gain_advantages_op(
    rewards: Tensor, group_ids: Tensor, normalize: str, eps: float, clip: Optional[float],
    step_mask: Optional[Tensor], nonfinite: str,
) -> Tensor:
    return _gain_advantages_impl(rewards, group_ids, normalize, eps, clip, step_mask, nonfinite, False)


@gain_advantages_op.register_fake
def _gain_advantages_fake(rewards, group_ids, normalize, eps, clip, step_mask, nonfinite):
    return rewards.new_empty((rewards.shape[0], rewards.shape[1] - 1))


@torch.library.custom_op("sfgrpo::gain_advantages_with_stats", mutates_args=(), device_types=("cpu", "cuda"))
def gain_advantages_with_stats_op(
    rewards: Tensor, group_ids: Tensor, normalize: str, eps: float, clip: Optional[float],
    step_mask: Optional[Tensor], nonfinite: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _gain_advantages_impl(rewards, group_ids, normalize, eps, clip, step_mask, nonfinite, True)


@gain_advantages_with_stats_op.register_fake
def _gain_advantages_with_stats_fake(rewards, group_ids, normalize, eps, clip, step_mask, nonfinite):
    rows, steps = rewards.shape[0], rewards.shape[1] - 1
    return (rewards.new_empty((rows, steps)), *_fake_stats(rewards, 1 if normalize == "joint" else steps))


@torch.library.custom_op("sfgrpo::group_advantages", mutates_args=(), device_types=("cpu", "cuda"))
def group_advantages_op(
    rewards: Tensor, group_ids: Tensor, std: str, eps: float, unbiased: bool, clip: Optional[float],
    nonfinite: str,
) -> Tensor:
    return _group_advantages_impl(rewards, group_ids, std, eps, unbiased, clip, nonfinite, False)


@group_advantages_op.register_fake
def _group_advantages_fake(rewards, group_ids, std, eps, unbiased, clip, nonfinite):
    return torch.empty_like(rewards, memory_format=torch.contiguous_format)


@torch.library.custom_op("sfgrpo::group_advantages_with_stats", mutates_args=(), device_types=("cpu", "cuda"))
def group_advantages_with_stats_op(
    rewards: Tensor, group_ids: Tensor, std: str, eps: float, unbiased: bool, clip: Optional[float],
    nonfinite: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _group_advantages_impl(rewards, group_ids, std, eps, unbiased, clip, nonfinite, True)


@group_advantages_with_stats_op.register_fake
def _group_advantages_with_stats_fake(rewards, group_ids, std, eps, unbiased, clip, nonfinite):
    columns = 1 if rewards.ndim == 1 else rewards.shape[1]
    return (torch.empty_like(rewards, memory_format=torch.contiguous_format), *_fake_stats(rewards, columns))


def _fake_stats(rewards: Tensor, stat_columns: int) -> tuple[Tensor, ...]:
    rows = rewards.shape[0]
    return (
        rewards.new_empty((rows,), dtype=torch.int64),
        rewards.new_empty((rows, stat_columns), dtype=torch.float64),
        rewards.new_empty((rows, stat_columns), dtype=torch.float64),
        rewards.new_empty((rows,), dtype=torch.int64),
        rewards.new_empty((rows, stat_columns), dtype=torch.bool),
        rewards.new_empty((), dtype=torch.int64),
    )


# Advantages are constants of the loss (no gradient flows into the rewards): mark every output
# non-differentiable so a `rewards` that requires grad simply yields plain tensors.
def _non_differentiable(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*(output if isinstance(output, tuple) else (output,)))


def _no_gradient(ctx, *grads):
    return (None,) * 7


for _op in (gain_advantages_op, gain_advantages_with_stats_op, group_advantages_op, group_advantages_with_stats_op):
    _op.register_autograd(_no_gradient, setup_context=_non_differentiable)


# ------------------------------------------------------------------ Python-level entry points
# Under torch.compile the registered op (traced as one node); in eager mode its body directly, where
# the op's Python dispatch layers cost more than the engine (the torch.ops lookups happen only when
# compiling: they are ~0.4 us of an eager call). float16 / bfloat16 rewards run in float32 and the
# result is cast back to their dtype. The two entry points mirror each other line for line rather
# than share a helper: one more call with its argument tuple was 2.1k instructions, 4 % of the
# 1M-gain call's host path (benchmarks/host_instructions.py).
def gain_advantages(rewards: Tensor, group_ids: Tensor, *, normalize: str, eps: float, clip: float | None,
                    step_mask: Tensor | None, nonfinite: str, return_stats: bool, validated: bool = False):
    """Runs `sfgrpo::gain_advantages[_with_stats]`; the same results as `reference.gain_advantages`.
    `validated`: the caller has checked the inputs with `check_gain_inputs` and resolved the native
    backend for their device (so they are CPU or CUDA tensors), with `step_mask` on that device."""
    dtype = rewards.dtype
    computed = rewards if dtype in NATIVE_DTYPES else rewards.float()
    if torch.compiler.is_compiling():
        ops = torch.ops.sfgrpo
        # not a bool index: dynamo before torch 2.13 refuses one (graph break)
        op = ops.gain_advantages_with_stats if return_stats else ops.gain_advantages
        out = op(computed, group_ids, normalize, eps, clip, step_mask, nonfinite)
    else:
        body = _gain_advantages_run if validated else _gain_advantages_impl
        out = body(computed, group_ids, normalize, eps, clip, step_mask, nonfinite, return_stats)
    if return_stats:
        return _with_stats(out, dtype, squeeze_columns=normalize == "joint")
    return out if computed is rewards else out.to(dtype)


def group_advantages(rewards: Tensor, group_ids: Tensor, *, std: str, eps: float, unbiased: bool,
                     clip: float | None, nonfinite: str, return_stats: bool, validated: bool = False):
    """Runs `sfgrpo::group_advantages[_with_stats]`; the same results as `reference.group_advantages`.
    `validated` as in `gain_advantages` (`check_group_inputs`)."""
    dtype = rewards.dtype
    computed = rewards if dtype in NATIVE_DTYPES else rewards.float()
    if torch.compiler.is_compiling():
        ops = torch.ops.sfgrpo
        op = ops.group_advantages_with_stats if return_stats else ops.group_advantages
        out = op(computed, group_ids, std, eps, unbiased, clip, nonfinite)
    else:
        body = _group_advantages_run if validated else _group_advantages_impl
        out = body(computed, group_ids, std, eps, unbiased, clip, nonfinite, return_stats)
    if return_stats:
        return _with_stats(out, dtype, squeeze_columns=rewards.ndim == 1)
    return out if computed is rewards else out.to(dtype)


def _with_stats(out: tuple, dtype: torch.dtype, squeeze_columns: bool) -> tuple[Tensor, GroupStats]:
    """(advantages in `dtype`, GroupStats) from an op's advantages and padded statistics."""
    adv, group_ids, mean, std, size, zero_std, num_groups = out
    groups = int(num_groups)  # statistics are for logging: one sync on CUDA is fine here

    def take(t: Tensor) -> Tensor:
        t = t[:groups]
        return t.squeeze(1) if squeeze_columns and t.ndim == 2 else t

    stats = GroupStats(take(group_ids), take(mean), take(std), take(size), take(zero_std))
    return (adv if adv.dtype == dtype else adv.to(dtype)), stats
