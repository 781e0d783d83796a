"""Shared pieces of the fused norm ops' tests: the kernel shapes, the fp32 oracle inputs, gradients
against autograd through the reference."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# one ulp of each storage dtype: the kernels may differ from the reference only through the order
# of an fp32 sum, which moves a result by at most about one rounding
ULP = {torch.float32: 1.2e-7, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def row_inputs(shape, dtype, seed=0):
    """Normal values off zero (x 2 + 0.3) in `dtype` on the test device: the QK norms' inputs."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2 + 0.3).to(dtype).to(DEVICE)


def norm_weight(D, dtype, seed=1):
    """A `[D]` weight around 1 in `dtype` (None: no weight)."""
    if dtype is None:
        return None
    g = torch.Generator().manual_seed(seed)
    return (1 + 0.5 * torch.randn(D, generator=g)).to(dtype).to(DEVICE)


# (B, N, C, two_d) of the kernels-vs-reference tests: every C with both batch sizes; N = 77 splits a
# sample over several programs
KERNEL_SHAPES = [(1, 1, 1, False), (3, 5, 1, False), (3, 5, 7, False), (1, 77, 7, False), (3, 1, 64, True),
                 (1, 5, 64, False), (3, 77, 64, False), (3, 5, 1536, False), (1, 77, 1536, False), (3, 1, 1536, True),
                 (1, 5, 3072, False), (3, 1, 3072, True), (1, 3, 6144, False)]


def upcast(*tensors):
    """Detached fp32 copies: the reference's inputs, autograd's leaves."""
    return [t.detach().float() for t in tensors]


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


def _leaf_runs(calls, x, w, loss):
    """(output, x's gradient, w's gradient) of each call(x, w) on fresh leaf copies of x and w,
    through `loss(output)`."""
    runs = []
    for call in calls:
        xg, wg = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        out = call(xg, wg)
        loss(out).backward()
        runs.append((out.detach(), xg.grad, wg.grad))
    return runs


def assert_calls_agree_bitwise(calls, x, w):
    """Every call(x, w) -> y gives the same y and the same gradients of y.square().sum(), bit for bit
    (the eager fast path against the registered op: the same kernels)."""
    runs = _leaf_runs(calls, x, w, lambda out: out.square().sum())
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def assert_compiled_gradients_match(loss_fn, x, w):
    """torch.compile(loss_fn, fullgraph=True) (no graph break, or it raises) gives eager's gradients."""
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    (_, *a), (_, *b) = _leaf_runs((compiled, loss_fn), x, w, lambda loss: loss)
    for ours, eager in zip(a, b):
        torch.testing.assert_close(ours, eager)
