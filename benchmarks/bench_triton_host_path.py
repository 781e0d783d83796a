"""CPU benchmark (pytest-benchmark) of the fused SDE step's host path: everything sfgrpo's Python does
per call on the way to a Triton kernel (validation, outputs, scratch, the direct launcher's
specialisation key), with the compiled kernel's runner replaced by a no-op so that it runs on CPU
tensors without a GPU. On a GPU, back-to-back calls on small and medium latents cost about this
plus Triton's own launcher (a few us) and torch's CUDA allocations: the part of the SDE-step
benchmark's back-to-back time that the kernels cannot reduce.

    pytest benchmarks/bench_triton_host_path.py --benchmark-enable --benchmark-columns=median,ops
"""

import pathlib
import sys

import pytest
import torch

from sfgrpo import functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the benchmarks' own modules
import host_path_stubs as stubs  # noqa: E402
from bench_norms_gpu import diffusers_modulate, diffusers_residual, diffusers_residual_norm2  # noqa: E402

SHAPES = {"flux_b16": (16, 4096, 64), "tiny_b4": (4, 16)}  # split rows (scratch, tickets) / one program per row


def _stubbed(monkeypatch, stub) -> None:
    from sfgrpo.kernels import _launch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(_launch.ENV_VAR, raising=False)
    try:
        stub(stubs.monkeypatch_patch(monkeypatch))
    except stubs.InterpreterOn as err:
        pytest.skip(str(err))


@pytest.fixture
def stubbed_launch(monkeypatch):
    """The Triton path on CPU tensors with every launch a no-op."""
    _stubbed(monkeypatch, stubs.stub_sde_step_launches)


@pytest.fixture(params=list(SHAPES))
def latents(request):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPES[request.param], generator=g).bfloat16()
    v = torch.randn(SHAPES[request.param], generator=g).bfloat16()
    return x, v


def test_sample_philox(benchmark, stubbed_launch, latents):
    x, v = latents
    benchmark(lambda: F.sde_step(x, v, 0.8, 0.7, seed=1))


def test_score_forward(benchmark, stubbed_launch, latents):
    x, v = latents
    sample = F.sde_step(x, v, 0.8, 0.7, seed=1).prev_sample
    benchmark(lambda: F.sde_step(x, v, 0.8, 0.7, prev_sample=sample))


def test_score_forward_backward(benchmark, stubbed_launch, latents):
    x, v = latents
    sample = F.sde_step(x, v, 0.8, 0.7, seed=1).prev_sample
    v = v.clone().requires_grad_()

    def step():
        F.sde_step(x, v, 0.8, 0.7, prev_sample=sample).log_prob.sum().backward()
        v.grad = None  # the launch is a no-op: dv is never written, and not accumulated here

    benchmark(step)


def _row_tensors(x):
    """t, t', noise level as per-row `[B]` float32 tensors, as the GPU benchmark and a trainer with
    per-row schedules pass them (the kernels read them from memory)."""
    batch = x.shape[0]
    return torch.full((batch,), 0.8), torch.full((batch,), 0.7), torch.full((batch,), 0.7)


def test_sample_philox_row_tensors(benchmark, stubbed_launch, latents):
    x, v = latents
    t, t_next, level = _row_tensors(x)
    benchmark(lambda: F.sde_step(x, v, t, t_next, level, seed=1, return_x0_hat=True))


def test_score_forward_backward_row_tensors(benchmark, stubbed_launch, latents):
    """bench_sde_step_gpu.py's `score` row: the per-row gradient handed to autograd (no loss ops)."""
    x, v = latents
    t, t_next, level = _row_tensors(x)
    sample = F.sde_step(x, v, t, t_next, level, seed=1).prev_sample
    weights = torch.randn(x.shape[0])

    def step():
        vg = v.detach().requires_grad_()
        torch.autograd.backward(F.sde_step(x, vg, t, t_next, level, prev_sample=sample).log_prob, weights)

    benchmark(step)


# ------------------------------------------------------------- the fused transformer norms
@pytest.fixture
def stubbed_norm_launch(monkeypatch):
    """The norm ops' Triton path on CPU tensors with every launch a no-op (the kernels' outputs are
    left unwritten: only the host work is timed)."""
    _stubbed(monkeypatch, stubs.stub_norm_launches)


def _sd35_block_tensors():
    """An SD3.5-M block's image stream at 512 px, batch 8, bf16: x / residual, adaLN chunks, a QK view."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1024, 1536, generator=g).bfloat16()
    y = torch.randn(8, 1024, 1536, generator=g).bfloat16()
    shift, scale, gate = torch.randn(8, 6 * 1536, generator=g).bfloat16().chunk(6, dim=1)[:3]
    q = torch.randn(8, 1024, 24, 64, generator=g).bfloat16().transpose(1, 2)
    return x, y, shift, scale, gate, q, torch.ones(64, dtype=torch.bfloat16)


def test_rms_norm_host(benchmark, stubbed_norm_launch):
    *_, q, weight = _sd35_block_tensors()
    benchmark(lambda: F.rms_norm(q, weight, 1e-6))


def test_layer_norm_modulate_host(benchmark, stubbed_norm_launch):
    x, _, shift, scale, *_ = _sd35_block_tensors()
    benchmark(lambda: F.layer_norm_modulate(x, scale, shift))


def test_gated_residual_host(benchmark, stubbed_norm_launch):
    x, y, _, _, gate, *_ = _sd35_block_tensors()
    benchmark(lambda: F.gated_residual(x, y, gate))


def test_gated_residual_layer_norm_modulate_host(benchmark, stubbed_norm_launch):
    x, y, shift, scale, gate, *_ = _sd35_block_tensors()
    benchmark(lambda: F.gated_residual_layer_norm_modulate(x, y, gate, scale, shift))


def test_gated_residual_layer_norm_modulate_forward_backward_host(benchmark, stubbed_norm_launch):
    """With autograd (the update): forward, then the backward of both outputs."""
    x, y, shift, scale, gate, *_ = _sd35_block_tensors()
    y = y.clone().requires_grad_()
    grads = (torch.ones_like(x), torch.ones_like(x))

    def step():
        torch.autograd.backward(F.gated_residual_layer_norm_modulate(x, y, gate, scale, shift), grads)
        y.grad = None

    benchmark(step)


def _flux_query():
    """A FLUX.1 double block's image-stream q at 512 px, batch 4, bf16, with its rotation rows."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 1024, 24, 128, generator=g).bfloat16()
    angles = torch.rand(1024, 64, generator=g).repeat_interleave(2, dim=1)
    return q, torch.ones(128, dtype=torch.bfloat16), angles.cos(), angles.sin()


def test_qk_norm_rope_host(benchmark, stubbed_norm_launch):
    q, weight, cos, sin = _flux_query()
    benchmark(lambda: F.qk_norm_rope(q, cos, sin, weight, 1e-6))


def test_qk_norm_rope_forward_backward_host(benchmark, stubbed_norm_launch):
    q, weight, cos, sin = _flux_query()
    q = q.clone().requires_grad_()
    grad = torch.ones_like(q)

    def step():
        F.qk_norm_rope(q, cos, sin, weight, 1e-6).backward(grad)
        q.grad = None

    benchmark(step)


# ----------------------------------- the fused norm ops vs diffusers' expressions, host time only
# Tiny activations ([1, 4, 128]; a [1, 4, 2, 64] QK view), so that the CPU's arithmetic is negligible
# on both sides: the fused op with its launch stubbed (sfgrpo's Python, autograd.Function) against
# diffusers' eager expression (ATen's C++ dispatch and autograd nodes). On a GPU each ATen op also
# pays a CUDA launch (the fused op one per pass), so a ratio near 1 here favours the fused op there;
# when a model's step is bound by its host, this is the cost that decides (the H200 run, README).
_QK_NORM = torch.nn.RMSNorm(64, eps=1e-6)

_HOST_OPS = {
    "layer_norm_modulate": (lambda x, y, gate, scale, shift, q: F.layer_norm_modulate(x, scale, shift),
                            lambda x, y, gate, scale, shift, q: diffusers_modulate(x, scale, shift)),
    "gated_residual": (lambda x, y, gate, scale, shift, q: F.gated_residual(x, y, gate),
                       lambda x, y, gate, scale, shift, q: diffusers_residual(x, y, gate)),
    "gated_residual_layer_norm_modulate": (
        lambda x, y, gate, scale, shift, q: F.gated_residual_layer_norm_modulate(x, y, gate, scale, shift),
        lambda x, y, gate, scale, shift, q: diffusers_residual_norm2(x, y, gate, scale, shift)),
    "rms_norm": (lambda x, y, gate, scale, shift, q: F.rms_norm(q, _QK_NORM.weight, 1e-6),
                 lambda x, y, gate, scale, shift, q: _QK_NORM(q)),
}


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("implementation", ["fused", "diffusers"])
@pytest.mark.parametrize("op", list(_HOST_OPS))
def test_norm_host_vs_diffusers(benchmark, stubbed_norm_launch, op, implementation, backward):
    """Forward, or forward + backward with the activations requiring grad (frozen modulation and
    weights: a LoRA update's path through the norms)."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(1, 4, 128, generator=g).requires_grad_(backward) for _ in range(2))
    shift, scale, gate = torch.randn(1, 6 * 128, generator=g).chunk(6, dim=1)[:3]
    q = torch.randn(1, 4, 2, 64, generator=g).transpose(1, 2).requires_grad_(backward)
    _QK_NORM.weight.requires_grad_(False)
    fn = _HOST_OPS[op][implementation == "diffusers"]
    inputs = (x, y, gate, scale, shift, q)
    if not backward:
        benchmark(lambda: fn(*inputs))
        return

    def step():
        out = fn(*inputs)
        torch.autograd.backward([o.sum() for o in (out if isinstance(out, tuple) else (out,))])
        x.grad = y.grad = q.grad = None

    benchmark(step)
