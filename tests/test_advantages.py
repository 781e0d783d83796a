"""The advantage engine (native C++ on CPU, CUDA when a GPU is present) against the reference and
against plain numpy loops written from the SPEC (§4 stepwise gains, §7 Flow-GRPO)."""

import os
import socket

import numpy as np
import pytest
import torch

import sfgrpo
from sfgrpo import _native
from sfgrpo import functional as F
from sfgrpo import reference as ref
from sfgrpo.ops import advantages as adv_ops

from advantage_oracles import (  # tests/ is on sys.path (conftest)
    assert_matches,
    numpy_gain_advantages,
    numpy_group_advantages,
    random_layout,
    rewards_for,
)

pytestmark = pytest.mark.skipif(not _native.available(), reason="sfgrpo._C is not built")

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def flow_grpo_tracker(prompts, rewards, global_std):
    """Flow-GRPO's PerPromptStatTracker.update (type 'grpo'), restated: numpy masks per prompt."""
    prompts = np.array(prompts)
    rewards = np.array(rewards, dtype=np.float64)
    advantages = np.zeros_like(rewards)
    for prompt in np.unique(prompts):
        mine = rewards[prompts == prompt]
        spread = np.std(rewards) if global_std else np.std(mine)
        advantages[prompts == prompt] = (mine - np.mean(mine)) / (spread + 1e-4)
    return advantages


@pytest.fixture(autouse=True)
def _native_backend(monkeypatch):
    monkeypatch.delenv("SFGRPO_BACKEND", raising=False)
    monkeypatch.delenv(adv_ops.THREADS_ENV, raising=False)
    adv_ops.set_num_threads(None)
    yield
    adv_ops.set_num_threads(None)


# --------------------------------------------------------------------------- gain advantages
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", ["joint", "per_step"])
@pytest.mark.parametrize("seed", [0, 1])
def test_gain_advantages_match_numpy_loop_and_reference(dtype, normalize, seed):
    ids = random_layout(300, seed=seed)
    rewards = rewards_for(ids, 11, dtype, seed)
    got = F.gain_advantages(rewards, ids, normalize=normalize, backend="native")
    assert got.shape == (300, 10)
    assert_matches(got, numpy_gain_advantages(rewards, ids, normalize=normalize), dtype)
    assert_matches(got, ref.gain_advantages(rewards, ids, normalize=normalize), dtype)
    assert got.abs().sum() > 0


@pytest.mark.parametrize("normalize", ["joint", "per_step"])
def test_gain_advantages_step_mask_clip_eps(normalize):
    ids = random_layout(200, seed=3)
    rewards = rewards_for(ids, 9, torch.float64, 3)
    step_mask = torch.tensor([False, True, True, False, True, True, True, False])
    kwargs = dict(normalize=normalize, eps=0.3, clip=0.8, step_mask=step_mask)
    got = F.gain_advantages(rewards, ids, backend="native", **kwargs)
    assert_matches(got, numpy_gain_advantages(rewards, ids, **kwargs), torch.float64)
    assert torch.equal(got[:, ~step_mask], torch.zeros(200, 3, dtype=torch.float64))
    assert got.abs().max() == pytest.approx(0.8)


def test_gain_advantages_all_steps_masked_and_degenerate_groups():
    ids = torch.tensor([4, 4, 4, -1, 9, 9])
    rewards = torch.randn(6, 5, dtype=torch.float64)
    rewards[4:] = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])  # group 9: every gain is 1
    none = F.gain_advantages(rewards, ids, step_mask=torch.zeros(4, dtype=torch.bool), backend="native")
    assert torch.equal(none, torch.zeros(6, 4, dtype=torch.float64))
    got, stats = F.gain_advantages(rewards, ids, return_stats=True, backend="native")
    assert torch.equal(got[3:], torch.zeros(3, 4, dtype=torch.float64))  # a group of one, all-equal gains
    assert stats.group_ids.tolist() == [-1, 4, 9]
    assert stats.zero_std.tolist() == [True, False, True]
    assert stats.size.tolist() == [1, 3, 2]


@pytest.mark.parametrize("normalize", ["joint", "per_step"])
@pytest.mark.parametrize("masked", [False, True])
def test_gain_stats_match_reference(normalize, masked):
    ids = random_layout(150, seed=5)
    rewards = rewards_for(ids, 7, torch.float32, 5)
    step_mask = torch.tensor([True, False, True, True, True, False]) if masked else None
    got, stats = F.gain_advantages(rewards, ids, normalize=normalize, step_mask=step_mask, return_stats=True,
                                   backend="native")
    expected, ref_stats = ref.gain_advantages(rewards, ids, normalize=normalize, step_mask=step_mask,
                                              return_stats=True)
    assert_matches(got, expected, torch.float32)
    assert torch.equal(stats.group_ids, ref_stats.group_ids)
    assert torch.equal(stats.size, ref_stats.size)
    assert torch.equal(stats.zero_std, ref_stats.zero_std)
    torch.testing.assert_close(stats.mean, ref_stats.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.std, ref_stats.std, rtol=1e-12, atol=1e-12)


def test_large_batch_matches_reference():
    ids = random_layout(100_000, max_group=24, seed=7)
    rewards = rewards_for(ids, 11, torch.float32, 7)
    for normalize in ("joint", "per_step"):
        got = F.gain_advantages(rewards, ids, normalize=normalize, backend="native")
        assert_matches(got, ref.gain_advantages(rewards, ids, normalize=normalize), torch.float32)
    flow = rewards[:, 0].contiguous()
    assert_matches(F.group_advantages(flow, ids, backend="native"), ref.group_advantages(flow, ids), torch.float32)


def test_one_large_group_and_all_singletons():
    rewards = rewards_for(torch.zeros(5000), 4, torch.float64, 11)
    one = torch.full((5000,), 77, dtype=torch.int64)
    assert_matches(F.gain_advantages(rewards, one, backend="native"), numpy_gain_advantages(rewards, one),
                   torch.float64)
    singletons = torch.randperm(5000) - 2500
    assert torch.equal(F.gain_advantages(rewards, singletons, backend="native"), torch.zeros(5000, 3, dtype=torch.float64))


# -------------------------------------------------------------------------- group advantages
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("columns", [None, 3])
def test_group_advantages_match_numpy_loop_and_reference(dtype, std, unbiased, columns):
    ids = random_layout(250, seed=2)
    rewards = rewards_for(ids, columns or 1, dtype, 2)
    if columns is None:
        rewards = rewards[:, 0].contiguous()
    kwargs = dict(std=std, unbiased=unbiased, clip=2.5, eps=1e-3)
    got, stats = F.group_advantages(rewards, ids, return_stats=True, backend="native", **kwargs)
    assert got.shape == rewards.shape
    assert_matches(got, numpy_group_advantages(rewards, ids, **kwargs), dtype)
    expected, ref_stats = ref.group_advantages(rewards, ids, return_stats=True, **kwargs)
    assert_matches(got, expected, dtype)
    for name in ("group_ids", "size", "zero_std"):
        assert torch.equal(getattr(stats, name), getattr(ref_stats, name)), name
    for name in ("mean", "std"):
        assert getattr(stats, name).shape == getattr(ref_stats, name).shape
        torch.testing.assert_close(getattr(stats, name), getattr(ref_stats, name), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("global_std", [False, True])
def test_group_advantages_equal_flow_grpo_tracker(global_std):
    ids = random_layout(400, max_group=16, seed=9, extreme_ids=False)
    rewards = rewards_for(ids, 1, torch.float64, 9)[:, 0].contiguous()
    prompts = [f"prompt {i}" for i in ids.tolist()]
    expected = flow_grpo_tracker(prompts, rewards.numpy(), global_std)
    got = F.group_advantages(rewards, ids, std="global" if global_std else "group", backend="native")
    # Flow-GRPO gives groups of one and all-equal groups 0 too (0 / (0 + 1e-4))
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("kind", ["gain", "group"])
def test_nonfinite_rewards_error_or_drop(kind):
    ids = random_layout(60, seed=4)
    rewards = rewards_for(ids, 5, torch.float64, 4)
    rewards[3, 1], rewards[17, 4] = float("nan"), float("-inf")
    if kind == "group":
        call, oracle = F.group_advantages, numpy_group_advantages
    else:
        call, oracle = F.gain_advantages, numpy_gain_advantages
    for backend in ("native", "reference"):
        with pytest.raises(ValueError, match=r"NaN or inf in 2 sample\(s\) \(first rows: \[3, 17\]\)"):
            call(rewards, ids, backend=backend)
    dropped = call(rewards, ids, nonfinite="drop", backend="native")
    assert torch.isfinite(dropped).all()
    assert torch.equal(dropped[[3, 17]], torch.zeros_like(dropped[[3, 17]]))
    assert_matches(dropped, oracle(rewards, ids), torch.float64)
    keep = torch.ones(60, dtype=torch.bool)
    keep[[3, 17]] = False
    torch.testing.assert_close(dropped[keep], call(rewards[keep], ids[keep], backend="native"), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gains_that_overflow_count_as_nonfinite(dtype):
    """Finite rewards whose difference overflows the dtype (a gain of +-inf) would turn their group's
    statistics into NaN: their rows raise, or are dropped like rows with NaN rewards, on both backends."""
    ids = random_layout(40, seed=5)
    rewards = rewards_for(ids, 5, dtype, 5)
    big = torch.finfo(dtype).max
    rewards[7, 2], rewards[7, 3] = big, -big  # gain 2: -inf
    rewards[21, 0], rewards[21, 1] = -big, 0.75 * big  # gain 0: +inf
    rewards[30, 3], rewards[30, 4] = big, 0.5 * big  # finite gains, at the edge of the range: kept
    keep = torch.ones(40, dtype=torch.bool)
    keep[[7, 21]] = False
    for backend in ("native", "reference"):
        with pytest.raises(ValueError, match=r"NaN or inf in 2 sample\(s\) \(first rows: \[7, 21\]\) \(a gain that overflows"):
            F.gain_advantages(rewards, ids, backend=backend)
        for normalize in ("joint", "per_step"):
            dropped = F.gain_advantages(rewards, ids, normalize=normalize, nonfinite="drop", backend=backend)
            assert torch.isfinite(dropped).all()
            assert torch.equal(dropped[[7, 21]], torch.zeros_like(dropped[[7, 21]]))
            alone = F.gain_advantages(rewards[keep], ids[keep], normalize=normalize, backend=backend)
            torch.testing.assert_close(dropped[keep], alone, rtol=0, atol=0)
    # Flow-GRPO's advantages of the same rewards are finite: nothing to leave out there
    assert torch.isfinite(F.group_advantages(rewards, ids, backend="native")).all()


# ----------------------------------------------------------------------- empty and bad input
def test_empty_batch():
    empty_ids = torch.zeros(0, dtype=torch.int64)
    for dtype in (torch.float32, torch.float64):
        adv, stats = F.gain_advantages(torch.zeros(0, 11, dtype=dtype), empty_ids, return_stats=True, backend="native")
        assert adv.shape == (0, 10) and adv.dtype == dtype
        assert stats.group_ids.shape == (0,) and stats.mean.shape == (0,)
        flow = F.group_advantages(torch.zeros(0, dtype=dtype), empty_ids, backend="native")
        assert flow.shape == (0,) and flow.dtype == dtype
        assert F.group_advantages(torch.zeros(0, 3, dtype=dtype), empty_ids, backend="native").shape == (0, 3)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_bad_inputs_raise_clear_errors(backend):
    r, ids = torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64)
    meta_error = (ValueError, r"meta tensors \(no data\)") if backend == "reference" else (RuntimeError, "device type 'meta'")
    cases = [
        (TypeError, "floating-point", lambda: F.gain_advantages(r.long(), ids, backend=backend)),
        (TypeError, "int64, got torch.int32", lambda: F.gain_advantages(r, ids.int(), backend=backend)),
        (ValueError, "group_ids must be", lambda: F.gain_advantages(r, torch.zeros(4, dtype=torch.int64), backend=backend)),
        (ValueError, "group_ids is on meta", lambda: F.gain_advantages(r, ids.to("meta"), backend=backend)),
        # both on meta: the reference names the problem (it used to fail in Tensor.item()), the native
        # backend refuses the device
        (*meta_error, lambda: F.gain_advantages(r.to("meta"), ids.to("meta"), backend=backend)),
        (*meta_error, lambda: F.group_advantages(r.to("meta"), ids.to("meta"), backend=backend)),
        (ValueError, r"\[N, T\+1\]", lambda: F.gain_advantages(torch.zeros(3, 1), ids, backend=backend)),
        (ValueError, r"\[N, T\+1\]", lambda: F.gain_advantages(torch.zeros(3), ids, backend=backend)),
        (ValueError, "step_mask", lambda: F.gain_advantages(r, ids, step_mask=torch.ones(3, dtype=torch.bool), backend=backend)),
        (ValueError, "step_mask", lambda: F.gain_advantages(r, ids, step_mask=torch.ones(4), backend=backend)),
        (ValueError, "normalize", lambda: F.gain_advantages(r, ids, normalize="global", backend=backend)),
        (ValueError, "nonfinite", lambda: F.gain_advantages(r, ids, nonfinite="ignore", backend=backend)),
        (ValueError, "eps", lambda: F.gain_advantages(r, ids, eps=-1.0, backend=backend)),
        (ValueError, "clip", lambda: F.gain_advantages(r, ids, clip=0.0, backend=backend)),
        (ValueError, "std must be", lambda: F.group_advantages(r, ids, std="batch", backend=backend)),
        (ValueError, r"\[N\] or \[N, K\]", lambda: F.group_advantages(torch.zeros(3, 2, 2), ids, backend=backend)),
        (TypeError, "int64", lambda: F.group_advantages(r[:, 0], ids.int(), backend=backend)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_ops_validate_direct_calls():
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.sfgrpo.gain_advantages(torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.int64),
                                         "joint", 1e-8, None, None, "error")
    with pytest.raises(ValueError, match="group_ids must be"):
        torch.ops.sfgrpo.group_advantages(torch.zeros(2), torch.zeros(3, dtype=torch.int64), "group", 1e-4, False,
                                          None, "error")


def test_non_contiguous_inputs():
    ids = random_layout(80, seed=6)
    rewards = rewards_for(ids, 12, torch.float32, 6)
    wide = torch.randn(12, 80).t()  # [80, 12], column-major
    wide.copy_(rewards)
    strided_ids = torch.stack([ids, ids], dim=1)[:, 0]  # stride 2
    assert not wide.is_contiguous() and not strided_ids.is_contiguous()
    expected = F.gain_advantages(rewards, ids, backend="native")
    assert torch.equal(F.gain_advantages(wide, strided_ids, backend="native"), expected)
    every_other = rewards_for(ids, 2, torch.float64, 1)[:, 0]  # stride 2
    assert torch.equal(F.group_advantages(every_other, ids, backend="native"),
                       F.group_advantages(every_other.contiguous(), ids, backend="native"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rewards_run_in_float32(dtype):
    """Gains of float16 / bfloat16 rewards are float32 differences on every backend (a bfloat16
    difference is rounded to 8 bits): the reference gives the native engine's result."""
    ids = random_layout(64, seed=8)
    rewards = rewards_for(ids, 5, torch.float32, 8).to(dtype)
    got = F.gain_advantages(rewards, ids, backend="native")
    assert got.dtype == dtype
    expected = F.gain_advantages(rewards.float(), ids, backend="native").to(dtype)
    assert torch.equal(got, expected)
    torch.testing.assert_close(F.gain_advantages(rewards, ids, backend="reference"), expected, rtol=0, atol=0)


def test_advantages_carry_no_gradient():
    ids = random_layout(20, seed=1)
    rewards = rewards_for(ids, 4, torch.float32, 1).requires_grad_()
    got = F.gain_advantages(rewards, ids, backend="native")
    assert not got.requires_grad
    flow, stats = F.group_advantages(rewards[:, 0], ids, backend="native", return_stats=True)
    assert not flow.requires_grad and not stats.mean.requires_grad


# ------------------------------------------------------------------------- backend selection
def test_backend_forcing_and_environment(monkeypatch):
    calls = []
    real = adv_ops.gain_advantages
    monkeypatch.setattr(adv_ops, "gain_advantages", lambda *a, **k: calls.append("native") or real(*a, **k))
    ids = random_layout(40, seed=2)
    rewards = rewards_for(ids, 6, torch.float64, 2)
    auto = F.gain_advantages(rewards, ids)
    assert calls == ["native"]  # auto on CPU tensors = the C++ engine
    reference = F.gain_advantages(rewards, ids, backend="reference")
    assert calls == ["native"]
    torch.testing.assert_close(auto, reference, rtol=1e-12, atol=1e-12)
    monkeypatch.setenv("SFGRPO_BACKEND", "reference")
    F.gain_advantages(rewards, ids)
    assert calls == ["native"]
    F.gain_advantages(rewards, ids, backend="native")
    assert calls == ["native", "native"]
    monkeypatch.setenv("SFGRPO_BACKEND", "native")
    F.gain_advantages(rewards, ids)
    assert calls == ["native"] * 3
    assert sfgrpo.backend.registered_ops()["gain_advantages"] == "native"
    assert sfgrpo.backend.registered_ops()["group_advantages"] == "native"


def test_environment_reader_follows_os_environ(monkeypatch):
    # the per-call environment reads (backend, thread cap) go through backend.environ_get
    name = "SFGRPO_TEST_ENVIRON_READER"
    monkeypatch.delenv(name, raising=False)
    assert sfgrpo.backend.environ_get(name) is None
    monkeypatch.setenv(name, "native ")
    assert sfgrpo.backend.environ_get(name) == os.environ.get(name) == "native "
    monkeypatch.setenv(name, "")
    assert sfgrpo.backend.environ_get(name) == ""
    monkeypatch.delenv(name)
    assert sfgrpo.backend.environ_get(name) is None
    monkeypatch.setenv(adv_ops.THREADS_ENV, "3")
    adv_ops.set_num_threads(None)
    assert adv_ops.get_num_threads() == 3


def test_entry_points_validate_unless_the_caller_did():
    # functional validates and passes validated=True; a direct call of the ops module validates itself
    r, ids = torch.zeros(3, 5), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="group_ids must be"):
        adv_ops.gain_advantages(r, ids, normalize="joint", eps=1e-8, clip=None, step_mask=None, nonfinite="drop",
                                return_stats=False)
    with pytest.raises(ValueError, match="group_ids must be"):
        adv_ops.group_advantages(r[:, 0], ids, std="group", eps=1e-4, unbiased=False, clip=None, nonfinite="drop",
                                 return_stats=False)


# ------------------------------------------------------------------------------ determinism
def test_same_bits_every_run_and_for_any_thread_count(monkeypatch):
    ids = random_layout(30_000, max_group=20, seed=12)
    rewards = rewards_for(ids, 11, torch.float32, 12) * 1e3 + 7.0  # large offsets stress the order
    flow = rewards[:, :3].contiguous()
    def run():
        joint, stats = F.gain_advantages(rewards, ids, return_stats=True, backend="native")
        per_step = F.gain_advantages(rewards, ids, normalize="per_step", backend="native")
        grouped = F.group_advantages(flow, ids, std="global", unbiased=True, backend="native")
        return joint, stats.mean, stats.std, per_step, grouped

    runs = []
    for threads in (1, 1, 2, 3, 7):
        adv_ops.set_num_threads(threads)
        runs.append(run())
    monkeypatch.setenv(adv_ops.THREADS_ENV, "5")
    adv_ops.set_num_threads(None)
    assert adv_ops.get_num_threads() == 5
    runs.append(run())
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="non-negative"):
        adv_ops.set_num_threads(-1)


def test_thread_split_with_one_giant_group_and_few_groups():
    g = torch.Generator().manual_seed(13)
    ids = torch.cat([torch.full((20_000,), -5), torch.arange(3_000) % 7])[torch.randperm(23_000, generator=g)]
    rewards = torch.randn(23_000, 5, generator=g, dtype=torch.float64)
    results = []
    for threads in (1, 4, 32):  # more threads than groups, and one group holding most rows
        adv_ops.set_num_threads(threads)
        results.append(F.gain_advantages(rewards, ids, normalize="per_step", backend="native"))
    assert all(torch.equal(results[0], other) for other in results[1:])
    torch.testing.assert_close(results[0], ref.gain_advantages(rewards, ids, normalize="per_step"),
                               rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- torch.library
def _op_samples():
    ids = random_layout(30, seed=3)
    rewards = rewards_for(ids, 5, torch.float32, 3)
    mask = torch.tensor([True, False, True, True])
    grad_rewards = rewards.clone().requires_grad_()
    return [
        (torch.ops.sfgrpo.gain_advantages.default, (rewards, ids, "joint", 1e-8, None, None, "error")),
        (torch.ops.sfgrpo.gain_advantages.default, (grad_rewards, ids, "per_step", 0.1, 1.5, mask, "drop")),
        (torch.ops.sfgrpo.gain_advantages_with_stats.default, (rewards.double(), ids, "joint", 1e-8, 2.0, mask, "error")),
        (torch.ops.sfgrpo.group_advantages.default, (rewards[:, 0].contiguous(), ids, "group", 1e-4, False, None, "error")),
        (torch.ops.sfgrpo.group_advantages.default, (grad_rewards, ids, "global", 1e-4, True, 3.0, "drop")),
        (torch.ops.sfgrpo.group_advantages_with_stats.default, (rewards.double(), ids, "global", 1e-4, False, None, "error")),
        (torch.ops.sfgrpo.gain_advantages.default, (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), "joint", 1e-8, None, None, "error")),
    ]


@pytest.mark.parametrize("index", range(7))
def test_opcheck(index):
    op, args = _op_samples()[index]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    ids = random_layout(64, seed=4)
    rewards = rewards_for(ids, 11, torch.float32, 4)
    flow = rewards[:, -1].contiguous()

    def loss_weights(rewards, ids, flow):
        stepwise = F.gain_advantages(rewards, ids, clip=5.0, nonfinite="drop", backend="native")
        per_prompt = F.group_advantages(flow, ids, std="global", backend="native")
        return stepwise * 2.0 + per_prompt[:, None]

    # aot_eager traces exactly what inductor gets (dynamo graph, fake tensors, functionalised
    # AOT graph) without spending seconds compiling C++ for two multiplications.
    compiled = torch.compile(loss_weights, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(rewards, ids, flow), loss_weights(rewards, ids, flow))
    shifted = rewards + 1.0
    torch.testing.assert_close(compiled(shifted, ids, flow), loss_weights(shifted, ids, flow))


# ------------------------------------------------------------------------------ distributed
def test_gather_without_process_group_is_a_clear_error():
    with pytest.raises(RuntimeError, match="init_process_group"):
        F.gain_advantages(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64), gather=True)


GATHER_ROWS, GATHER_SPLIT = 101, 38


def _gather_global_batch():
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(-3, 9, (GATHER_ROWS,), generator=g) * 1_000_003
    rewards = torch.randn(GATHER_ROWS, 7, generator=g, dtype=torch.float64)
    flow_rewards = torch.randn(GATHER_ROWS, generator=g, dtype=torch.float32)
    return rewards, flow_rewards, ids


def _gather_shard(rank):
    return slice(0, GATHER_SPLIT) if rank == 0 else slice(GATHER_SPLIT, GATHER_ROWS)


def _gather_rank(rank, world, out_dir, port):
    """One rank: an unequal share of the global batch (groups spread over both ranks), gather=True."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rewards, flow_rewards, ids = _gather_global_batch()
        rows = _gather_shard(rank)
        gain, gain_stats = F.gain_advantages(rewards[rows], ids[rows], gather=True, return_stats=True)
        flow, flow_stats = F.group_advantages(flow_rewards[rows], ids[rows], std="global",
                                              process_group=dist.group.WORLD, return_stats=True)
        torch.save({"gain": gain, "gain_stats": tuple(gain_stats), "flow": flow, "flow_stats": tuple(flow_stats)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_gather_two_gloo_processes_match_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children start with torch and sfgrpo already imported (spawn would re-import them)
    torch.multiprocessing.start_processes(_gather_rank, args=(2, str(tmp_path), port), nprocs=2,
                                          start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    rewards, flow_rewards, ids = _gather_global_batch()
    gain, gain_stats = F.gain_advantages(rewards, ids, return_stats=True)
    flow, flow_stats = F.group_advantages(flow_rewards, ids, std="global", return_stats=True)
    assert gain_stats.group_ids.numel() > 3
    for rank, got in enumerate(ranks):
        rows = _gather_shard(rank)
        assert torch.equal(got["gain"], gain[rows])
        assert torch.equal(got["flow"], flow[rows])
        for a, b in zip(got["gain_stats"], gain_stats):
            assert torch.equal(a, b)
        for a, b in zip(got["flow_stats"], flow_stats):
            assert torch.equal(a, b)
    assert ranks[0]["gain"].shape[0] == GATHER_SPLIT and ranks[1]["gain"].shape[0] == GATHER_ROWS - GATHER_SPLIT


# ------------------------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", ["joint", "per_step"])
def test_cuda_gain_advantages_match_cpu(dtype, normalize):
    ids = random_layout(20_000, max_group=24, seed=21)
    rewards = rewards_for(ids, 11, dtype, 21)
    step_mask = torch.tensor([False] + [True] * 9)
    expected, ref_stats = F.gain_advantages(rewards, ids, normalize=normalize, step_mask=step_mask, clip=4.0,
                                            return_stats=True, backend="native")
    got, stats = F.gain_advantages(rewards.cuda(), ids.cuda(), normalize=normalize, step_mask=step_mask, clip=4.0,
                                   return_stats=True, backend="native")
    assert got.device.type == "cuda"
    assert_matches(got.cpu(), expected, dtype)
    for a, b in zip(stats, ref_stats):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12)


@needs_cuda
@pytest.mark.parametrize("std", ["group", "global"])
def test_cuda_group_advantages_match_cpu(std):
    ids = random_layout(5000, seed=22)
    rewards = rewards_for(ids, 3, torch.float32, 22)
    rewards[7, 1] = float("nan")
    for r in (rewards, rewards[:, 0].contiguous()):
        expected = F.group_advantages(r, ids, std=std, unbiased=True, nonfinite="drop", backend="native")
        got = F.group_advantages(r.cuda(), ids.cuda(), std=std, unbiased=True, nonfinite="drop", backend="native")
        assert_matches(got.cpu(), expected, torch.float32)
    with pytest.raises(ValueError, match="NaN or inf"):
        F.group_advantages(rewards.cuda(), ids.cuda(), backend="native")


@needs_cuda
def test_cuda_deterministic_sync_free_and_empty():
    ids = random_layout(50_000, max_group=24, seed=23).cuda()
    rewards = rewards_for(ids.cpu(), 11, torch.float32, 23).cuda() * 100 + 3
    first = F.gain_advantages(rewards, ids, nonfinite="drop", backend="native")
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = F.gain_advantages(rewards, ids, nonfinite="drop", backend="native")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(first, second)
    one_group = F.gain_advantages(rewards, torch.zeros_like(ids), backend="native")
    assert_matches(one_group.cpu(), F.gain_advantages(rewards.cpu(), torch.zeros_like(ids).cpu(), backend="native"),
                   torch.float32)
    empty = F.gain_advantages(torch.zeros(0, 11, device="cuda"), torch.zeros(0, dtype=torch.int64, device="cuda"))
    assert empty.shape == (0, 10)


@needs_cuda
def test_cuda_graph_capture_replays_the_advantages():
    """Eager calls without statistics are one cooperative launch; under CUDA-graph capture the call
    takes the memset and three kernels (cooperative launches are not captured): both give the same
    bits, and replays after new rewards are copied in give those rewards' advantages."""
    ids = random_layout(30_000, max_group=24, seed=25).cuda()
    rewards = rewards_for(ids.cpu(), 11, torch.float32, 25).cuda()
    eager = F.gain_advantages(rewards, ids, nonfinite="drop", backend="native")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        F.gain_advantages(rewards, ids, nonfinite="drop", backend="native")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = F.gain_advantages(rewards, ids, nonfinite="drop", backend="native")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    other = rewards_for(ids.cpu(), 11, torch.float32, 26).cuda()
    rewards.copy_(other)
    graph.replay()
    assert torch.equal(captured, F.gain_advantages(other, ids, nonfinite="drop", backend="native"))


@needs_cuda
def test_cuda_opcheck():
    ids = random_layout(40, seed=24).cuda()
    rewards = rewards_for(ids.cpu(), 5, torch.float32, 24).cuda()
    torch.library.opcheck(torch.ops.sfgrpo.gain_advantages.default, (rewards, ids, "joint", 1e-8, None, None, "drop"))
    torch.library.opcheck(torch.ops.sfgrpo.group_advantages_with_stats.default,
                          (rewards.double(), ids, "global", 1e-4, False, None, "drop"))
