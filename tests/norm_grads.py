"""Shared check of the fused norm ops' tests: gradients against autograd through the reference."""

import torch


def assert_gradients_close(names, ours, truth, needs, dtype, rtol, none_when_unused=False):
    """Each required input's gradient (`ours`, in `dtype`) against autograd's through the fp32
    reference (`truth`), with a tolerance relative to the gradient's magnitude (a LayerNorm's
    backward has cancellations); inputs that did not require a gradient have none, and with
    `none_when_unused` neither do those autograd left without one (an output that was not used)."""
    for name, a, b, need in zip(names, ours, truth, needs):
        if not need or (none_when_unused and b.grad is None):
            assert a.grad is None, name
            continue
        assert a.grad.dtype == dtype and a.grad.shape == a.shape, name
        atol = rtol * max(b.grad.abs().max().item(), 1e-6)
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
