"""The CUDA advantage engine's algorithm (csrc/include/sfgrpo/fixed_point_advantages.h: hash
grouping, 64-bit fixed-point sums with integer atomics) through its sequential host emulation,
which runs the device code on the CPU: against the CPU engine and the SPEC's numpy loops, row-order
invariance, edge cases, the kernels' launch (blocks, shared-memory staging, grid-stride rounds). With
a GPU: the CUDA engine gives exactly the emulation's bits."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from sfgrpo import _native
from sfgrpo import functional as F
from sfgrpo.ops import advantages as adv_ops

from advantage_oracles import assert_matches, numpy_gain_advantages, numpy_group_advantages, random_layout, rewards_for

pytestmark = pytest.mark.skipif(not _native.available(), reason="sfgrpo._C is not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# the id whose mixed hash key is 0 (once the hash table's empty marker; an edge id still)
KEY_ZERO_ID = int(np.uint64(0x9E3779B97F4A7C15).astype(np.int64))


def run_engine(engine, rewards, ids, *, gains, pooled, global_std=False, ddof=0, eps=1e-8, clip=None, step_mask=None,
               stats=False, max_blocks=0):
    """(advantages, padded stats or None, groups, nonfinite rows) from the native engine `engine`:
    "emulated" (the CUDA engine's algorithm on the host, as the kernels are launched), "unlaunched"
    (the same phases warp by warp, without the launch's blocks and staging) or "cpu" (the CPU
    engine)."""
    rewards = rewards.reshape(rewards.shape[0], -1).contiguous()
    ids = ids.contiguous()
    rows, width = rewards.shape
    columns = width - 1 if gains else width
    out = torch.empty(rows, columns, dtype=rewards.dtype)
    padded = adv_ops._padded_stats(rows, 1 if pooled else columns, torch.device("cpu")) if stats else None
    problem = adv_ops._Problem(gains=gains, pooled=pooled, global_std=global_std, ddof=ddof, eps=eps, clip=clip)
    mask = None if step_mask is None else step_mask.contiguous().view(torch.uint8)
    args = adv_ops.engine_args(rewards, ids, out, problem, mask, padded)
    native = _native.require("test")
    if engine in ("emulated", "unlaunched"):
        groups, nonfinite = native.testing.advantages_cuda_emulated(*args, engine == "emulated", max_blocks)
    else:
        groups, nonfinite = native.cpu.advantages(*args, 0)
    return out, padded, groups, nonfinite


def emulated(rewards, ids, **problem):
    """(advantages, padded stats or None, groups, nonfinite rows) from the emulated CUDA engine."""
    return run_engine("emulated", rewards, ids, **problem)


def emulated_gain(rewards, ids, normalize="joint", **kw):
    return emulated(rewards, ids, gains=True, pooled=normalize == "joint", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", ["joint", "per_step"])
@pytest.mark.parametrize("max_group", [1, 3, 24, 300])
def test_gain_advantages_match_the_spec_and_the_cpu_engine(dtype, normalize, max_group):
    ids = random_layout(3000, max_group=max_group, seed=max_group)
    rewards = rewards_for(ids, 11, dtype, seed=5)
    step_mask = torch.tensor([False, True, True, False] + [True] * 6)
    got, stats, groups, nonfinite = emulated_gain(rewards, ids, normalize, clip=3.0, step_mask=step_mask, stats=True)
    expected = numpy_gain_advantages(rewards, ids, normalize=normalize, clip=3.0, step_mask=step_mask)
    assert_matches(got, expected, dtype)
    cpu, cpu_stats = F.gain_advantages(rewards, ids, normalize=normalize, clip=3.0, step_mask=step_mask,
                                       return_stats=True, backend="native")
    assert_matches(got, cpu, dtype)
    assert groups == cpu_stats.group_ids.numel() and nonfinite == 0
    assert torch.equal(stats.group_ids[:groups], cpu_stats.group_ids)
    assert torch.equal(stats.size[:groups], cpu_stats.size)
    assert torch.equal(stats.zero_std[:groups].reshape(cpu_stats.zero_std.shape), cpu_stats.zero_std)
    for name in ("mean", "std"):
        torch.testing.assert_close(getattr(stats, name)[:groups].reshape(getattr(cpu_stats, name).shape),
                                   getattr(cpu_stats, name), rtol=1e-12, atol=1e-12)


# Phase 3 stores a warp's 32 rows as one tile, 32 values a round and 4 rounds per batch of loads:
# widths that divide 32, that don't, of one column, wider than a warp; partial last warps and
# batches; a NaN row and a masked step inside the tile.
@pytest.mark.parametrize("normalize", ["joint", "per_step"])
@pytest.mark.parametrize("rows, steps", [(1, 1), (5, 1), (31, 2), (33, 3), (64, 7), (70, 10), (45, 31), (40, 32),
                                         (37, 33), (9, 130)])
def test_the_write_phase_tiles_every_width(normalize, rows, steps):
    ids = random_layout(rows, max_group=6, seed=rows + steps)
    rewards = rewards_for(ids, steps + 1, torch.float32, seed=steps)
    if rows > 4:
        rewards[3, steps // 2] = float("nan")
    step_mask = torch.ones(steps, dtype=torch.bool)
    step_mask[steps // 3] = steps == 1
    got, *_ = emulated_gain(rewards, ids, normalize, step_mask=step_mask)
    expected = numpy_gain_advantages(rewards, ids, normalize=normalize, step_mask=step_mask)
    assert_matches(got, expected, torch.float32)
    if rows > 4:
        assert torch.equal(got[3], torch.zeros(steps))


def test_rows_wider_than_2_to_the_25_are_refused():
    """Phase 3 indexes a warp's 32 rows in 32-bit integers: wider rows get a clear error, not a wrap."""
    rewards = torch.empty(1, 2**25 + 1)  # never written: refused before any access
    with pytest.raises(ValueError, match="2\\^25"):
        emulated_gain(rewards, torch.zeros(1, dtype=torch.int64))


@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("columns", [1, 3])
@pytest.mark.parametrize("unbiased", [False, True])
def test_group_advantages_match_the_spec_with_nonfinite_rows(std, columns, unbiased):
    ids = random_layout(4000, max_group=16, seed=columns)
    rewards = rewards_for(ids, columns, torch.float32, seed=7) * 5 + 2
    rewards[[3, 99, 1500], 0] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    got, _, _, nonfinite = emulated(rewards, ids, gains=False, pooled=False, global_std=std == "global",
                                    ddof=int(unbiased), eps=1e-4)
    expected = numpy_group_advantages(rewards, ids, std=std, unbiased=unbiased)
    assert nonfinite == 3
    assert_matches(got, expected.reshape(got.shape), torch.float32)
    assert torch.all(got[[3, 99, 1500]] == 0)


@pytest.mark.parametrize("normalize", ["joint", "per_step"])
@pytest.mark.parametrize("width", [11, 40])  # rows staged in shared memory / read from global memory
def test_gains_that_overflow_leave_their_rows_out(normalize, width):
    """Finite float32 rewards whose gain overflows (+-inf) count as non-finite rows, as in the CPU
    engine: advantage 0, out of the statistics (the others get the bits of a batch without them)."""
    ids = random_layout(500, max_group=16, seed=width)
    rewards = rewards_for(ids, width, torch.float32, seed=3)
    big = torch.finfo(torch.float32).max
    rewards[[40, 41], 5] = big
    rewards[[40, 41], 6] = torch.tensor([-big, big])  # row 40: gain 5 = -inf; row 41: gain 0, finite
    rewards[333, width - 2], rewards[333, width - 1] = -big, big  # the last gain: +inf
    got, _, _, nonfinite = emulated_gain(rewards, ids, normalize)
    assert nonfinite == 2 and torch.isfinite(got).all()
    assert torch.equal(got[[40, 333]], torch.zeros_like(got[[40, 333]]))
    keep = torch.ones(500, dtype=torch.bool)
    keep[[40, 333]] = False
    alone, *_ = emulated_gain(rewards[keep], ids[keep], normalize)
    assert torch.equal(got[keep], alone)
    cpu = F.gain_advantages(rewards, ids, normalize=normalize, nonfinite="drop", backend="native")
    assert_matches(got, cpu, torch.float32)


@pytest.mark.parametrize("normalize", ["joint", "per_step"])
def test_advantages_do_not_depend_on_the_row_order(normalize):
    # integer sums: the same bits in any order, so the device's atomics cannot change them either
    ids = random_layout(5000, max_group=24, seed=3)
    rewards = rewards_for(ids, 11, torch.float32, seed=3) * 100 + 3
    got, *_ = emulated_gain(rewards, ids, normalize)
    for seed in range(3):
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
        permuted, *_ = emulated_gain(rewards[perm], ids[perm], normalize)
        assert torch.equal(permuted, got[perm])


def test_statistics_do_not_change_the_advantages():
    ids = random_layout(2000, max_group=24, seed=4)
    rewards = rewards_for(ids, 11, torch.float32, seed=4)
    plain, *_ = emulated_gain(rewards, ids, "per_step")
    with_stats, *_ = emulated_gain(rewards, ids, "per_step", stats=True)
    assert torch.equal(plain, with_stats)


@pytest.mark.parametrize("ids", [
    [KEY_ZERO_ID] * 5 + [0] * 5 + [-1] * 5,
    [-(2**63), 2**63 - 1, KEY_ZERO_ID, 0, -1, 1, 2**32, -(2**32)] * 4,
])
def test_edge_ids_each_form_their_group(ids):
    ids = torch.tensor(ids)
    rewards = rewards_for(ids, 6, torch.float64, seed=8)
    got, stats, groups, _ = emulated_gain(rewards, ids, stats=True)
    cpu, cpu_stats = F.gain_advantages(rewards, ids, return_stats=True, backend="native")
    assert groups == len(set(ids.tolist()))
    assert torch.equal(stats.group_ids[:groups], cpu_stats.group_ids)
    assert_matches(got, cpu, torch.float64)


def test_one_huge_group_and_groups_of_one():
    ids = torch.cat([torch.zeros(30_000, dtype=torch.int64), torch.arange(1, 101)])
    rewards = rewards_for(ids, 11, torch.float32, seed=9)
    got, *_ = emulated_gain(rewards, ids)
    assert_matches(got, numpy_gain_advantages(rewards, ids), torch.float32)
    assert torch.all(got[30_000:] == 0)


def test_equal_values_give_zero():
    ids = torch.arange(12) // 4
    rewards = torch.zeros(12, 5, dtype=torch.float64)
    rewards[4:8] = 7.25  # group 1: all gains 0
    rewards[4:8, 1::2] = 1.0  # group 1: gains +-1, the same in every row, but not all equal
    rewards[8:] = 7.25  # group 2: all gains 0
    got, *_ = emulated_gain(rewards, ids)
    assert torch.all(got[:4] == 0) and torch.all(got[8:] == 0)
    torch.testing.assert_close(got[4:8].abs(), torch.full((4, 4), 1 / (1 + 1e-8), dtype=torch.float64))


@pytest.mark.parametrize("scale, offset", [(1e-30, 0.0), (1e30, 0.0), (1e-6, 1e6), (1.0, 1e12), (1e-300, 0.0)])
def test_at_least_as_accurate_as_double_precision_two_pass(scale, offset):
    # exact rational statistics as the yardstick: the fixed-point sums must not lose to numpy's
    # float64 mean/std, also far from 1 and with a spread tiny against the values (ill-conditioned)
    ids = random_layout(400, max_group=20, seed=10, extreme_ids=False)
    values = rewards_for(ids, 11, torch.float64, seed=10) * scale + offset
    got, *_ = emulated(values, ids, gains=False, pooled=True)
    exact = exact_pooled(values, ids)
    numpy_error = (numpy_pooled(values, ids) - exact).abs().max().item()
    assert (got - exact).abs().max().item() <= max(numpy_error, 1e-13)


def numpy_pooled(values, ids):
    """Each group's values normalised together ((v - mean) / (std + 1e-8), population std)."""
    v, idn = values.numpy(), ids.numpy()
    out = np.zeros_like(v)
    for gid in np.unique(idn):
        members = np.flatnonzero(idn == gid)
        block = v[members]
        if len(members) > 1 and block.max() != block.min():
            out[members] = (block - block.mean()) / (block.std() + 1e-8)
    return torch.from_numpy(out)


def exact_pooled(values, ids):
    """numpy_pooled with the mean and the variance in exact rational arithmetic."""
    v, idn = values.numpy(), ids.numpy()
    out = np.zeros_like(v)
    for gid in np.unique(idn):
        members = np.flatnonzero(idn == gid)
        block = v[members]
        if len(members) <= 1 or block.max() == block.min():
            continue
        exact = [Fraction(float(x)) for x in block.ravel()]
        mean = sum(exact) / len(exact)
        std = math.sqrt(sum((x - mean) ** 2 for x in exact) / len(exact))
        out[members] = np.array([float(x - mean) / (std + 1e-8) for x in exact]).reshape(block.shape)
    return torch.from_numpy(out)


@pytest.mark.parametrize("scale, offset", [(1e-3, 1e6), (1.0, 1e12), (1e5, -3e9), (1e-300, 0.0)])
def test_large_groups_stay_accurate(scale, offset):
    # thousands of values in one group (fewer fixed-point bits per value: headroom for the sum),
    # far from 0 with a small spread: still no less accurate than a float64 two-pass computation
    ids = torch.cat([torch.zeros(2500, dtype=torch.int64), torch.arange(1, 201) // 7 + 1])
    values = rewards_for(ids, 3, torch.float64, seed=14) * scale + offset
    got, *_ = emulated(values, ids, gains=False, pooled=True)
    exact = exact_pooled(values, ids)
    numpy_error = (numpy_pooled(values, ids) - exact).abs().max().item()
    assert (got - exact).abs().max().item() <= max(numpy_error, 1e-13)


# ------------------------------------------------------------------------- warp aggregation
# Rows of one group side by side in a warp add their integer parts together first (one atomic per
# run of equal ids, a segmented shuffle reduction): the same integer sums as row by row, so the
# same bits as any order of the rows. The emulation runs the warp code on 32-lane arrays.
WARP_LAYOUTS = ["groups_of_16", "groups_of_10", "long_runs", "alternating", "mixed_runs", "singletons", "one_group"]


def warp_layout(kind, rows=1007, seed=0):
    """Group ids in row order (not shuffled): runs of equal ids inside warps and across them; the
    row count leaves a partial last warp."""
    rng = np.random.default_rng(seed)
    if kind == "groups_of_16":  # two aligned runs per warp
        ids = np.arange(rows) // 16
    elif kind == "groups_of_10":  # runs that cross warp boundaries
        ids = np.arange(rows) // 10
    elif kind == "long_runs":  # groups of 33..300 consecutive rows: whole warps of one group
        ids = np.repeat(np.arange(rows), rng.integers(33, 301, size=rows))[:rows]
    elif kind == "alternating":  # every lane a run of its own, half the warp in each group
        ids = np.arange(rows) % 2
    elif kind == "mixed_runs":  # runs of 1..40 rows drawn from 12 groups: a group recurs in one warp
        ids = np.repeat(rng.integers(0, 12, size=rows), rng.integers(1, 41, size=rows))[:rows]
    elif kind == "singletons":
        ids = np.arange(rows) * 7919 - 10**15
    else:
        ids = np.zeros(rows)
    return torch.from_numpy(ids.astype(np.int64))


@pytest.mark.parametrize("layout", WARP_LAYOUTS)
def test_warp_runs_give_the_bits_of_scattered_rows(layout):
    ids = warp_layout(layout)
    rewards = rewards_for(ids, 11, torch.float64, seed=12) * 3 + 1
    rewards[[5, 32, 33, 63, 1006], [2, 0, 10, 4, 7]] = float("nan")  # inside runs, at a warp's first and last lane
    step_mask = torch.tensor([True, False] + [True] * 8)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(13))  # (almost) no runs left
    for normalize in ("joint", "per_step"):
        got, stats, groups, nonfinite = emulated_gain(rewards, ids, normalize, step_mask=step_mask, clip=4.0,
                                                      stats=True)
        scattered, scattered_stats, *_ = emulated_gain(rewards[perm], ids[perm], normalize, step_mask=step_mask,
                                                       clip=4.0, stats=True)
        assert torch.equal(scattered, got[perm])
        for name in ("group_ids", "size", "mean", "std", "zero_std"):
            assert torch.equal(getattr(scattered_stats, name), getattr(stats, name)), name
        assert groups == len(torch.unique(ids)) and nonfinite == 5
        expected = numpy_gain_advantages(rewards, ids, normalize=normalize, clip=4.0, step_mask=step_mask)
        assert_matches(got, expected, torch.float64)
    flat = rewards[:, -1].contiguous()
    for std in ("group", "global"):
        got, *_ = emulated(flat, ids, gains=False, pooled=False, global_std=std == "global", eps=1e-4)
        scattered, *_ = emulated(flat[perm], ids[perm], gains=False, pooled=False, global_std=std == "global",
                                 eps=1e-4)
        assert torch.equal(scattered, got[perm])
        assert_matches(got.reshape(-1), numpy_group_advantages(flat, ids, std=std), torch.float64)


WARP_PATTERNS = {
    "one_run": ([7] * 32, 32),
    "one_run_partial_warp": ([7] * 32, 20),
    "alternating": ([0, 1] * 16, 32),
    "pairs": [sum(([k, k] for k in range(16)), []), 31],
    "run_of_31": ([1] + [2] * 31, 32),
    "interrupted": ([3, 3, 4, 3, 3, 3] + list(range(100, 126)), 32),
    "distinct": (list(range(32)), 32),
    "nothing_active": ([5] * 32, 0),
}


@pytest.mark.parametrize("pattern", sorted(WARP_PATTERNS))
@pytest.mark.parametrize("maximum", [False, True])
def test_warp_runs_and_their_reduction(pattern, maximum):
    keys, active = WARP_PATTERNS[pattern]
    rng = np.random.default_rng(len(pattern))
    values = [int(v) for v in rng.integers(0, 2**64, size=32, dtype=np.uint64)]
    heads, head, span, reduced = _native.require("test").testing.warp_runs(keys, active, values, maximum)
    starts = [lane == 0 or lane >= active or keys[lane] != keys[lane - 1] for lane in range(32)]
    assert heads == sum(1 << lane for lane in range(32) if starts[lane])
    for lane in range(32):
        first = max(k for k in range(lane + 1) if starts[k])
        last = min([k for k in range(lane + 1, 32) if starts[k]], default=32) - 1
        assert (head[lane], span[lane]) == (first, last - lane)
        if lane == first:
            run = values[first:last + 1]
            assert reduced[lane] == (max(run) if maximum else sum(run) % 2**64)


def test_u128_to_double_rounds_to_nearest_even():
    rng = np.random.default_rng(15)
    cases = [0, 1, 2**53 + 1, 2**64 - 1, 2**64, 2**64 + 1, 2**128 - 1, 2**127, 3 << 100]
    for bits in (54, 64, 65, 90, 117, 128):  # ties, just below and above them, at every scale
        mantissa = int(rng.integers(2**52, 2**53)) << 1 | 1
        tie = (mantissa << (bits - 54)) if bits >= 54 else mantissa
        cases += [tie - 1, tie, tie + 1, tie + (1 << (bits - 54)) * 2]
    cases += [int(x) << int(s) for x, s in zip(rng.integers(1, 2**63, size=200), rng.integers(0, 65, size=200))]
    for x in cases:
        x %= 2**128
        assert _native.require("test").testing.u128_to_double(x >> 64, x & (2**64 - 1)) == float(x), x


# ------------------------------------------------------------------ launch geometry and staging
# The emulation runs phases 1 and 2 as warp_rows_kernel does, with the same code
# (sfgrpo/fixed_point_blocks.h): blocks of 256 rows (8 warps of 32), at most 4096 blocks, more rows
# in grid-stride rounds; per block, the accumulators that every warp adds to (the group and
# non-finite counts in phase 1 without statistics, the batch's range in phase 1 and moment sums in
# phase 2 with global_std) are staged words, cleared first and flushed at the end with one atomic
# each (a maximum for the range). Integer sums and maxima: the launch must not change a bit, so the
# tests compare it with the same phases run without it (warp by warp, no staging), and the exact
# counts with the CPU engine's. A block that clears, stages or flushes a word wrongly, or a round
# that skips rows, fails them (each such change to fixed_point_blocks.h was tried).
GRID_ROWS = 4096 * 256  # one grid-stride round


def launch(rows, columns=1, *, pooled=False, global_std=False):
    return _native.require("test").testing.advantages_launch(rows, columns, False, pooled, global_std)


def test_launch_geometry():
    for rows, blocks, rounds in [(1, 1, 1), (256, 1, 1), (257, 2, 1), (GRID_ROWS, 4096, 1), (GRID_ROWS + 1, 4096, 2),
                                 (3 * GRID_ROWS, 4096, 3)]:
        assert launch(rows) == {"threads": 256, "blocks": blocks, "rounds": rounds, "insert_batch_words": 0,
                                "moments_batch_words": 0, "stage_bytes_float32": 256 * 4,
                                "stage_bytes_float64": 256 * 8}


# Rows of at most 152 bytes (an odd number of values apart: width | 1) are staged in shared memory,
# 256 rows per block: with the 8 KiB of staged words, under the 48 KiB a launch may ask for.
@pytest.mark.parametrize("width, float32, float64", [
    (1, 4, 8), (2, 12, 24), (11, 44, 88), (18, 76, 152), (19, 76, 152), (20, 84, 0), (37, 148, 0), (38, 0, 0),
])
def test_rows_staged_in_shared_memory(width, float32, float64):
    got = launch(1000, width)
    assert (got["stage_bytes_float32"], got["stage_bytes_float64"]) == (256 * float32, 256 * float64)
    assert 8 * 1024 + 256 * max(float32, float64) <= 48 * 1024


@pytest.mark.parametrize("columns, pooled, words", [
    (3, False, (6, 9)),  # per column: the range {hi, lo} in phase 1, the moments {S1, S2 low, S2 high} in 2
    (11, True, (2, 3)),  # pooled: one statistic
    (340, False, (680, 1020)),  # the most statistics whose moments fit 1024 words with the 2 counts
    (341, False, (682, 0)),  # the moment sums stay global, the range is staged
    (511, False, (1022, 0)),  # the most whose range fits: 1024 words
    (512, False, (0, 0)),  # neither fits
])
def test_staged_batch_words(columns, pooled, words):
    got = launch(100, columns, pooled=pooled, global_std=True)
    assert (got["insert_batch_words"], got["moments_batch_words"]) == words
    assert launch(100, columns, pooled=pooled)["insert_batch_words"] == 0  # without global_std: nothing


def skewed_rewards(rows, columns, dtype, seed):
    """Exponential rewards far from 0: the batch's mean lies far from the middle of its range (the
    fixed-point centre), so each of the batch's moment words moves global_std's divisor past rounding,
    and a range word in the wrong place overflows the fixed-point sums."""
    g = torch.Generator().manual_seed(seed)
    return (torch.empty(rows, columns, dtype=torch.float64).exponential_(generator=g) * 3 + 100).to(dtype)


STAT_FIELDS = ("group_ids", "size", "mean", "std", "zero_std")


def assert_launch_is_exact(rewards, ids, nonfinite_rows, *, permute=True, **problem):
    """The emulation as launched (blocks, staged words, rounds) against the same phases without the
    launch: the same bits, as the device's integer sums promise; a staged word that a block clears,
    stages or flushes wrongly changes them, even below the rounding. Then against the CPU engine:
    the exact counts, the statistics' ids and sizes, and within rounding the rest. `permute`: the
    rows in another order (other blocks, warps and rounds) give the same bits too."""
    got, stats, groups, nonfinite = emulated(rewards, ids, **problem)
    flat, flat_stats, *flat_counts = run_engine("unlaunched", rewards, ids, **problem)
    assert flat_counts == [groups, nonfinite] and torch.equal(got, flat)
    cpu, cpu_stats, *cpu_counts = run_engine("cpu", rewards, ids, **problem)
    assert cpu_counts == [groups, nonfinite] == [len(torch.unique(ids)), nonfinite_rows]
    assert_matches(got, cpu, rewards.dtype)
    if stats is not None:
        for name in STAT_FIELDS:
            assert torch.equal(getattr(stats, name), getattr(flat_stats, name)), name
            if name in ("mean", "std"):
                torch.testing.assert_close(getattr(stats, name), getattr(cpu_stats, name), rtol=1e-12, atol=1e-12)
            else:
                assert torch.equal(getattr(stats, name), getattr(cpu_stats, name)), name
    if permute:
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(len(ids)))
        permuted, permuted_stats, *counts = emulated(rewards[perm], ids[perm], **problem)
        assert counts == [groups, nonfinite] and torch.equal(permuted, got[perm])
        for name in STAT_FIELDS if stats is not None else ():
            assert torch.equal(getattr(permuted_stats, name), getattr(stats, name)), name
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [19, 20, 37, 38, 64])
@pytest.mark.parametrize("normalize", ["joint", "per_step"])
def test_staged_and_global_rows_are_exact(width, dtype, normalize):
    # rows at and past the stage's limit (float64: 19 staged, 20 not; float32: 37, 38), 3 blocks with a
    # partial last warp, groups scattered over them, non-finite rows: staged or read from global
    # memory, the same bits as the phases run warp by warp, and the SPEC's advantages
    rows = 3 * 256 - 7
    ids = random_layout(rows, max_group=20, seed=width)
    rewards = rewards_for(ids, width, dtype, seed=width + 1)
    bad = [0, 31, 32, 300, rows - 1]
    rewards[bad, [0, width - 1, 1, width // 2, 2]] = float("nan")
    got = assert_launch_is_exact(rewards, ids, len(bad), gains=True, pooled=normalize == "joint", stats=True)
    assert_matches(got, numpy_gain_advantages(rewards, ids, normalize=normalize), dtype)


@pytest.mark.parametrize("stats", [False, True], ids=["staged_counts", "claims"])
@pytest.mark.parametrize("std", ["group", "global"])
def test_blocks_stage_exact_counts_and_batch_statistics(std, stats):
    # 20 blocks, the last with a partial last warp; groups of up to 24 rows scattered over the blocks;
    # non-finite rows in 4 blocks, at a block's first and last row. Without statistics phase 1 stages
    # the counts; with them its claims take their list index from the global count (not staged).
    rows = 20 * 256 - 19
    assert launch(rows)["blocks"] == 20
    ids = random_layout(rows, max_group=24, seed=40)
    rewards = skewed_rewards(rows, 3, torch.float64, seed=41)
    bad = [0, 255, 256, 2000, 2001, rows - 1]
    rewards[bad, [0, 1, 2, 0, 2, 1]] = torch.tensor([float("nan"), float("inf"), -float("inf")] * 2,
                                                    dtype=torch.float64)
    got = assert_launch_is_exact(rewards, ids, len(bad), gains=False, pooled=False, global_std=std == "global",
                                 eps=1e-4, stats=stats)
    assert_matches(got, numpy_group_advantages(rewards, ids, std=std), torch.float64)


def test_blocks_stage_pooled_gains_with_global_std():
    # the pooled batch statistic (2 staged range words, 3 moment words) over masked steps, 9 blocks
    ids = random_layout(2200, max_group=16, seed=43)
    rewards = skewed_rewards(2200, 8, torch.float64, seed=44).cumsum(dim=1)
    rewards[[3, 1500], 4] = float("nan")
    step_mask = torch.tensor([True, True, False, True, True, True, False])
    for stats in (False, True):
        assert_launch_is_exact(rewards, ids, 2, gains=True, pooled=True, global_std=True, step_mask=step_mask,
                               clip=4.0, stats=stats)


@pytest.mark.parametrize("columns", [340, 341, 512])
def test_global_std_with_more_statistics_than_shared_memory_holds(columns):
    # at the staging's limit: both phases staged (340), only the range (341), neither (512)
    rows = 600
    ids = random_layout(rows, max_group=12, seed=columns)
    rewards = skewed_rewards(rows, columns, torch.float64, seed=columns)
    rewards[[7, 300], [0, columns - 1]] = float("inf")
    assert_launch_is_exact(rewards, ids, 2, gains=False, pooled=False, global_std=True, eps=1e-4, stats=True)


def test_grid_stride_rounds():
    # more rows than one round: blocks 0..3 take a second one (block 3's with a partial warp); prompts of
    # 16 rows shuffled, so groups span rounds and blocks; non-finite rows in both rounds
    rows = GRID_ROWS + 3 * 256 + 40
    assert launch(rows, global_std=True) == {"threads": 256, "blocks": 4096, "rounds": 2, "insert_batch_words": 2,
                                             "moments_batch_words": 3, "stage_bytes_float32": 256 * 4,
                                             "stage_bytes_float64": 256 * 8}  # a warp restages its rows per round
    ids = (torch.arange(rows) // 16)[torch.randperm(rows, generator=torch.Generator().manual_seed(45))]
    rewards = skewed_rewards(rows, 1, torch.float64, seed=46)
    bad = [5, GRID_ROWS - 1, GRID_ROWS, rows - 1]
    rewards[bad] = float("nan")
    for stats in (False, True):
        assert_launch_is_exact(rewards, ids, len(bad), permute=False, gains=False, pooled=False, global_std=True,
                               eps=1e-4, stats=stats)


@pytest.mark.parametrize("global_std", [False, True])
@pytest.mark.parametrize("max_blocks", [1, 3, 396])
def test_a_capped_grid_gives_the_same_bits(max_blocks, global_std):
    # the cooperative single launch runs at most the blocks the device holds at once (an H100: 3 per
    # SM x 132) and its grid-stride loops take the rest: 1, 3 or 396 blocks over 2,000 to 120,000
    # rows give the bits of the full grid, counts and statistics included; 396 blocks over 2,000 rows
    # is one round, where phase 2 reads the rows each warp staged in phase 1 (a slice off by one row
    # fails here)
    for rows, seed in ((2000, 50), (120_000, 51)):
        ids = (torch.arange(rows) // 16)[torch.randperm(rows, generator=torch.Generator().manual_seed(seed))]
        rewards = skewed_rewards(rows, 5, torch.float64, seed=seed)
        rewards[[1, rows // 2, rows - 1], [0, 2, 4]] = float("nan")
        problem = dict(gains=True, pooled=True, global_std=global_std, eps=1e-6, clip=3.0)
        full, _, *full_counts = run_engine("emulated", rewards, ids, **problem)
        capped, _, *capped_counts = run_engine("emulated", rewards, ids, max_blocks=max_blocks, **problem)
        assert capped_counts == full_counts == [rows // 16, 3]
        assert torch.equal(capped, full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [2, 4, 11])
@pytest.mark.parametrize("gains, pooled", [(True, True), (True, False), (False, False)],
                         ids=["joint", "per_step", "columns"])
def test_single_launch_reads_the_rows_it_staged(gains, pooled, width, dtype):
    # the cooperative launch in one round (396 blocks over 3,000 rows) stages each warp's rows once, in
    # phase 1, and phases 2 and 3 read them there (an even width is staged width + 1 apart): the bits
    # of the separate kernels, which read the rewards, and the SPEC's advantages
    rows = 3000
    ids = random_layout(rows, max_group=16, seed=width)
    rewards = rewards_for(ids, width, dtype, seed=width + 7)
    rewards[[3, rows // 3], [0, width - 1]] = float("inf")
    problem = dict(gains=gains, pooled=pooled, eps=1e-6)
    full, _, *full_counts = run_engine("emulated", rewards, ids, **problem)
    single, _, *single_counts = run_engine("emulated", rewards, ids, max_blocks=396, **problem)
    assert single_counts == full_counts == [len(torch.unique(ids)), 2]
    assert torch.equal(single, full)
    if gains:
        expected = numpy_gain_advantages(rewards, ids, normalize="joint" if pooled else "per_step", eps=1e-6)
    else:
        expected = numpy_group_advantages(rewards, ids, eps=1e-6)
    assert_matches(single, expected, dtype)


# ------------------------------------------------------------------------------------- GPU
@needs_cuda
@pytest.mark.parametrize("layout", ["prompts", "random_ids", "edge_ids", "one_group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("single_launch", ["1", "0"])
def test_cuda_engine_gives_the_emulation_bits(layout, dtype, single_launch, monkeypatch):
    # "1": calls without statistics in one cooperative launch (grids capped at what the device holds
    # at once: 100k rows take several grid-stride rounds); "0": the memset and three kernels
    monkeypatch.setenv("SFGRPO_ADVANTAGES_COOPERATIVE", single_launch)
    g = torch.Generator().manual_seed(31)
    if layout == "prompts":  # prompt numbers, groups of 16, shuffled (the benchmark's layout)
        ids = (torch.arange(100_000) // 16)[torch.randperm(100_000, generator=g)]
    elif layout == "random_ids":
        ids = random_layout(60_000, max_group=24, seed=32)
    elif layout == "edge_ids":
        keys = torch.tensor([-1, 0, 2**63 - 1, -(2**63), 1, KEY_ZERO_ID, 64, 2**32])
        ids = keys[torch.randint(0, len(keys), (5000,), generator=g)]
    else:
        ids = torch.zeros(30_000, dtype=torch.int64)
    rewards = rewards_for(ids, 11, dtype, 33) * 10 + 1
    rewards[17, 3] = float("nan")
    step_mask = torch.tensor([False] + [True] * 9)
    for normalize in ("joint", "per_step"):
        expected, stats, groups, _ = emulated_gain(rewards, ids, normalize, step_mask=step_mask, clip=5.0, stats=True)
        got = F.gain_advantages(rewards.cuda(), ids.cuda(), normalize=normalize, step_mask=step_mask.cuda(),
                                clip=5.0, nonfinite="drop", backend="native")
        assert torch.equal(got.cpu(), expected)
        got_stats_run, got_stats = F.gain_advantages(
            rewards.cuda(), ids.cuda(), normalize=normalize, step_mask=step_mask.cuda(), clip=5.0, nonfinite="drop",
            return_stats=True, backend="native")
        assert torch.equal(got_stats_run.cpu(), expected)
        assert torch.equal(got_stats.group_ids.cpu(), stats.group_ids[:groups])
        assert torch.equal(got_stats.mean.cpu().reshape(-1), stats.mean[:groups].reshape(-1))
    for std in ("group", "global"):
        flat = rewards[:, -1].contiguous()
        expected, *_ = emulated(flat, ids, gains=False, pooled=False, global_std=std == "global", eps=1e-4)
        got = F.group_advantages(flat.cuda(), ids.cuda(), std=std, nonfinite="drop", backend="native")
        assert torch.equal(got.cpu().reshape(-1), expected.reshape(-1))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("single_launch", ["1", "0"])
@pytest.mark.parametrize("stage_rows", ["1", "0"])
def test_cuda_engine_staged_and_wide_rows_give_the_emulation_bits(stage_rows, single_launch, dtype, monkeypatch):
    # rows staged in shared memory (cp.async; the single launch reads them there in every phase) or
    # too wide for the stage (float64 from 20 rewards, float32 from 38), even and odd widths; per-step
    # statistics (phase 2b) and K reward columns. SFGRPO_ADVANTAGES_STAGE_ROWS=0 (the A/B switch)
    # reads every row from global memory: the same bits
    monkeypatch.setenv("SFGRPO_ADVANTAGES_COOPERATIVE", single_launch)
    monkeypatch.setenv("SFGRPO_ADVANTAGES_STAGE_ROWS", stage_rows)
    ids = (torch.arange(6_000) // 16)[torch.randperm(6_000, generator=torch.Generator().manual_seed(70))]
    for width in (2, 4, 19, 20, 38):
        rewards = rewards_for(ids, width, dtype, 71 + width) * 10 + 1
        rewards[[3, 2_999], [0, width - 1]] = float("inf")
        for normalize in ("joint", "per_step"):
            expected, *_ = emulated_gain(rewards, ids, normalize, clip=5.0)
            got = F.gain_advantages(rewards.cuda(), ids.cuda(), normalize=normalize, clip=5.0, nonfinite="drop",
                                    backend="native")
            assert torch.equal(got.cpu(), expected), (width, normalize)
        expected, *_ = emulated(rewards, ids, gains=False, pooled=False, eps=1e-4)
        got = F.group_advantages(rewards.cuda(), ids.cuda(), nonfinite="drop", backend="native")
        assert torch.equal(got.cpu(), expected), (width, "columns")


@needs_cuda
@pytest.mark.parametrize("single_launch", ["1", "0"])
def test_cuda_engine_runs_the_launch_asked_for_and_its_capped_grid_is_exact(single_launch, monkeypatch):
    # 300k rows need 1,172 blocks: the cooperative launch caps its grid at what the device holds at
    # once (an H100: 3 per SM x 132 = 396), so its warps take several grid-stride rounds on the
    # device (the other GPU tests' batches, 100k rows and less, fit one round of an H100's grid).
    # The profiler says which launch ran: a cooperative launch the device refuses falls back to the
    # memset + 3 kernels silently, and the bits alone would not show it.
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("SFGRPO_ADVANTAGES_COOPERATIVE", single_launch)
    rows = 300_000
    ids = (torch.arange(rows) // 16)[torch.randperm(rows, generator=torch.Generator().manual_seed(60))]
    rewards = rewards_for(ids, 11, torch.float32, 61) * 10 + 1
    rewards[[5, rows // 2, rows - 1], [0, 3, 10]] = float("nan")
    flat = rewards[:, -1].contiguous()
    expected, *_ = emulated_gain(rewards, ids, "joint", clip=5.0)
    expected_global, *_ = emulated(flat, ids, gains=False, pooled=False, global_std=True, eps=1e-4)
    rewards_d, ids_d, flat_d = rewards.cuda(), ids.cuda(), flat.cuda()
    F.gain_advantages(rewards_d, ids_d, clip=5.0, nonfinite="drop", backend="native")  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = F.gain_advantages(rewards_d, ids_d, clip=5.0, nonfinite="drop", backend="native")
        got_global = F.group_advantages(flat_d, ids_d, std="global", nonfinite="drop", backend="native")
        torch.cuda.synchronize()
    assert torch.equal(got.cpu(), expected)
    assert torch.equal(got_global.cpu().reshape(-1), expected_global.reshape(-1))
    names = [event.key for event in prof.key_averages()]
    if not any("_kernel" in name for name in names):
        pytest.skip(f"the profiler recorded no kernels ({names})")
    single = any("single_launch_kernel" in name for name in names)
    multi = any("warp_rows_kernel" in name for name in names)
    assert (single, multi) == ((True, False) if single_launch == "1" else (False, True)), names
