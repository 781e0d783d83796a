"""CPU benchmark (pytest-benchmark) of the advantage engine's host path: what sfgrpo's Python does per
call on the way to the CUDA engine (validation, the output, the problem, the stream's workspace,
the pybind call's arguments), with the CUDA engine replaced by a no-op and the tensors on the meta
device (so the CUDA branch runs without a GPU), next to a real call of the C++ CPU engine on a
small batch. On a GPU the engine's launch (one cooperative launch) comes on top.

    pytest benchmarks/bench_advantages_host_path.py --benchmark-enable --benchmark-columns=median,ops
"""

import pytest
import torch

import sfgrpo
from sfgrpo import backend, functional
from sfgrpo.ops import advantages as advantage_ops

ROWS, STEPS = 100_000, 10  # the 1M-gains case of issue 5 (the meta tensors hold no data)


class _NoOpEngine:
    """Stands for sfgrpo._C.cuda: launches nothing."""

    def advantages(self, *args):
        return None

    def advantages_workspace_bytes(self, *args):
        return 4096


@pytest.fixture
def stubbed_cuda_engine(monkeypatch):
    monkeypatch.setattr(advantage_ops, "_cuda_engine", lambda: _NoOpEngine())
    monkeypatch.setattr(backend, "current_cuda_device", lambda: None)  # the meta tensors' device index
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 0, raising=False)
    # the backend table has no entry for the meta device: the native engine, as on CUDA
    monkeypatch.setattr(functional, "resolve_backend", lambda op, device, override=None: "native")


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
