"""sfgrpo.alloc: the ops' output allocation without torch.empty's argument parsing."""

import torch

from sfgrpo import alloc, backend


def test_allocators_give_the_asked_tensor():
    for allocate in (alloc.empty_strided_cpu, alloc.empty_strided_on("cpu")):
        for size, stride, dtype in (((5,), (1,), torch.float32), ((3, 4), (4, 1), torch.float64), ((0, 7), (7, 1), torch.float32)):
            out = allocate(size, stride, dtype)
            assert (out.shape, out.stride(), out.dtype, out.device.type) == (size, stride, dtype, "cpu")
            assert not out.requires_grad
    # this torch has Inductor's allocators: the fast one is in use
    assert alloc.empty_strided_cpu is torch._C._dynamo.guards._empty_strided_cpu


def test_allocator_per_device(monkeypatch):
    assert alloc.allocator(torch.device("cpu")) is alloc.empty_strided_cpu
    assert alloc.allocator(torch.device("meta")) is None
    # a CUDA tensor gets the CUDA allocator only on the current device (it allocates there)
    monkeypatch.setattr(backend, "current_cuda_device", lambda: 1)
    assert alloc.allocator(torch.device("cuda", 1)) is alloc.empty_strided_cuda
    assert alloc.allocator(torch.device("cuda", 0)) is None


def test_fast_allocator_is_refused_when_it_misbehaves():
    class Guards:
        @staticmethod
        def _empty_strided_cpu(size, stride, dtype):
            return torch.empty(size, dtype=torch.float32)  # ignores the dtype

    class Broken:
        @staticmethod
        def _empty_strided_cpu(*args):
            raise TypeError("another signature")

    assert alloc._fast_cpu(Guards) is None and alloc._fast_cpu(Broken) is None and alloc._fast_cpu(None) is None
    assert alloc._fast_cpu(torch._C._dynamo.guards) is torch._C._dynamo.guards._empty_strided_cpu
