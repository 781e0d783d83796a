"""CPU benchmark (pytest-benchmark) of the advantage engine's host path: what sfgrpo's Python does per
call on the way to the CUDA engine (validation, the output, the problem, the stream's workspace,
the pybind call's arguments), with the CUDA engine replaced by a no-op and the tensors on the meta
device (so the CUDA branch runs without a GPU), next to a real call of the C++ CPU engine on a
small batch. On a GPU the engine's launch (one cooperative launch) comes on top.

    pytest benchmarks/bench_advantages_host_path.py --benchmark-enable --benchmark-columns=median,ops
"""

import pathlib
import sys

import pytest
import torch

import sfgrpo

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the benchmarks' own modules
import host_path_stubs as stubs  # noqa: E402

ROWS, STEPS = 100_000, 10  # the 1M-gains case of issue 5 (the meta tensors hold no data)


@pytest.fixture
def stubbed_cuda_engine(monkeypatch):
    stubs.stub_advantage_engine(stubs.monkeypatch_patch(monkeypatch))


def test_gain_advantages_cuda_path_python(benchmark, stubbed_cuda_engine):
    rewards = torch.empty(ROWS, STEPS + 1, device="meta")
    ids = torch.empty(ROWS, dtype=torch.int64, device="meta")
    benchmark(lambda: sfgrpo.gain_advantages(rewards, ids, nonfinite="drop"))


def test_group_advantages_cuda_path_python(benchmark, stubbed_cuda_engine):
    rewards = torch.empty(ROWS, device="meta")
    ids = torch.empty(ROWS, dtype=torch.int64, device="meta")
    benchmark(lambda: sfgrpo.group_advantages(rewards, ids, nonfinite="drop"))


def test_gain_advantages_cpu_small_batch(benchmark):
    """A real call on 4 prompts x 16 trajectories: the CPU engine's work is ~3 us of it."""
    rewards = torch.rand(64, STEPS + 1, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(64) // 16
    benchmark(lambda: sfgrpo.gain_advantages(rewards, ids, nonfinite="drop"))
