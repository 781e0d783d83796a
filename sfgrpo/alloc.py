"""Fresh output tensors for the ops' eager hot paths, without `torch.empty`'s argument parsing.

`torch.empty(rows, dtype=..., device=...)` goes through torch's generic Python argument parser:
~9k CPU instructions per call here, 4-7 us per call on an H100's host, several times per op call.
Inductor's generated code allocates its buffers with the functions below instead (sizes, strides
and dtype as one plain tuple of arguments; ~4k instructions). `empty_strided_cuda` allocates on
the *current* CUDA device: `allocator(device)` hands it out only for tensors there.

Where a torch lacks them (they are private), or they fail the check below, the same calls go to
`torch.empty_strided`.
"""

from __future__ import annotations

from typing import Callable

import torch

from sfgrpo import backend

Allocator = Callable[[tuple, tuple, torch.dtype], torch.Tensor]


def empty_strided_on(device: str | torch.device) -> Allocator:
    """`torch.empty_strided` on `device` as an Allocator: where `allocator(device)` has none."""

    def empty_strided(size: tuple, stride: tuple, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty_strided(size, stride, dtype=dtype, device=device)

    return empty_strided


def _fast_cpu(guards) -> Allocator | None:
    """guards._empty_strided_cpu when it exists and one allocation gives what it should."""
    fast = getattr(guards, "_empty_strided_cpu", None)
    if fast is None:
        return None
    try:
        probe = fast((2, 3), (3, 1), torch.float64)
    except Exception:  # noqa: BLE001 - another signature: not ours to use
        return None
    ok = probe.shape == (2, 3) and probe.stride() == (3, 1) and probe.dtype == torch.float64 and probe.is_cpu
    return fast if ok else None


_GUARDS = getattr(getattr(torch._C, "_dynamo", None), "guards", None)
_FAST_CPU = _fast_cpu(_GUARDS)
empty_strided_cpu: Allocator = _FAST_CPU or empty_strided_on("cpu")
# trusted when its CPU sibling passed (the same argument parsing in torch); not probed here, which
# would create a CUDA context at import. The fallback allocates on the current CUDA device too.
empty_strided_cuda: Allocator = (getattr(_GUARDS, "_empty_strided_cuda", None) if _FAST_CPU else None) or empty_strided_on("cuda")


def allocator(device: torch.device) -> Allocator | None:
    """The fast allocator for tensors on `device`, None where only `torch.empty(..., device=)` will
    do (another device type, or a CUDA device that is not the current one)."""
    kind = backend.eager_device_type(device)
    if kind == "cpu":
        return empty_strided_cpu
    if kind == "cuda" and device.index == backend.current_cuda_device():
        return empty_strided_cuda
    return None
