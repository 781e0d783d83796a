"""sfgrpo.scratch: per-(device, stream) scratch reused by every launch on that stream."""

import torch

from sfgrpo import scratch


def test_reused_per_purpose_and_dtype_grown_when_too_small():
    scratch.release()
    a = scratch.stream_scratch("x", torch.device("cpu"), 10, torch.float32)
    assert a.shape == (10,) and a.dtype == torch.float32
    assert scratch.stream_scratch("x", torch.device("cpu"), 7, torch.float32).data_ptr() == a.data_ptr()
    assert scratch.stream_scratch("y", torch.device("cpu"), 7, torch.float32).data_ptr() != a.data_ptr()
    assert scratch.stream_scratch("x", torch.device("cpu"), 7, torch.int32).data_ptr() != a.data_ptr()
    grown = scratch.stream_scratch("x", torch.device("cpu"), 11, torch.float32)
    assert grown.shape[0] >= 11 and grown.data_ptr() != a.data_ptr()
    assert scratch.stream_scratch("x", torch.device("cpu"), 20, torch.float32).data_ptr() == grown.data_ptr()  # 2x


def test_zeroed_only_when_allocated():
    """Zero on allocation; after that the caller's kernels keep it zero (nothing clears it again)."""
    scratch.release()
    counters = scratch.stream_scratch("t", torch.device("cpu"), 4, torch.int32, zeroed=True)
    assert torch.equal(counters, torch.zeros(4, dtype=torch.int32))
    counters[1] = 5
    assert int(scratch.stream_scratch("t", torch.device("cpu"), 4, torch.int32, zeroed=True)[1]) == 5
    assert int(scratch.stream_scratch("t", torch.device("cpu"), 9, torch.int32, zeroed=True).abs().sum()) == 0
    scratch.release()
    assert not scratch._HELD
