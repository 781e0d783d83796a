"""Scratch buffers kept per (device, stream) and reused by every launch on that stream.

A training step is host-bound on small and medium latents: every `torch.empty` on the GPU and every
memset launch is host time. Kernels' scratch (partial sums, ticket counters, the advantage engine's
workspace) is only used within the launches of one call, and launches on one stream run in order,
so one buffer per (device, stream, purpose), grown when too small, can serve every call. A call
being captured into a CUDA graph gets a fresh buffer instead: the graph may replay on any stream,
next to eager launches that would share the buffer.
"""

from __future__ import annotations

import torch

from sfgrpo.backend import eager_device_type

# (purpose, dtype, zeroed, stream key) -> (buffer, its numel): the size kept next to the buffer,
# since Tensor.numel() is a call on every lookup
_HELD: dict[tuple, tuple[torch.Tensor, int]] = {}


def _stream_key(device: torch.device):
    """None while the current stream is capturing a CUDA graph (no reuse), else the stream's key.
    Off CUDA (CPU tensors; Triton's interpreter) every launch has run when the call returns.
    torch._C's functions directly: torch.cuda's wrappers add a Python call each."""
    if eager_device_type(device) != "cuda":
        return device
    if torch._C._cuda_isCurrentStreamCapturing():
        return None
    index = device.index
    return index, torch._C._cuda_getCurrentRawStream(index)


def stream_scratch(purpose: str, device: torch.device, numel: int, dtype: torch.dtype,
                   zeroed: bool = False) -> torch.Tensor:
    """At least `numel` elements of `dtype` on `device` for the current stream's launches: the held
    buffer itself, which may be longer (a slice would cost a view's creation, ~1.5 us, on every
    call; kernels index within what they need). `zeroed`: zero when first allocated; the caller's
    kernels must leave them zero (e.g. ticket counters that the last program resets), since a
    reused buffer is not cleared again."""
    stream = _stream_key(device)
    if stream is None:
        return (torch.zeros if zeroed else torch.empty)(numel, dtype=dtype, device=device)
    key = (purpose, dtype, zeroed, stream)
    held = _HELD.get(key)
    if held is not None and held[1] >= numel:
        return held[0]
    size = numel if held is None else max(numel, 2 * held[1])  # grow geometrically
    buffer = (torch.zeros if zeroed else torch.empty)(size, dtype=dtype, device=device)
    _HELD[key] = buffer, size
    return buffer


def release() -> None:
    """Drops every held buffer (their memory goes back to torch's allocator)."""
    _HELD.clear()
