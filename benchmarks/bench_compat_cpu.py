"""CPU benchmark (pytest-benchmark): the Flow-GRPO drop-in `sde_step_with_logprob` against the
original formulation, sampling and scoring forward + backward, at two latent sizes.

    pytest benchmarks/bench_compat_cpu.py --benchmark-enable --benchmark-columns=median,ops
"""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sfgrpo.bench import flow_grpo_code as fg

from sfgrpo.compat import flow_grpo as compat

SHAPES = {"b8_16x32x32": (8, 16, 32, 32), "b16_16x64x64": (16, 16, 64, 64)}


@pytest.fixture(scope="module")
def scheduler():
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(10)
    return s


def _step(impl, scheduler):
    if impl == "compat":
        return lambda *a, **k: compat.sde_step_with_logprob(scheduler, *a, **k)
    return lambda *a, **k: fg.sde_step_with_logprob(scheduler.sigmas, scheduler.timesteps, *a, **k)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["compat", "flow_grpo"])
def test_sample(benchmark, scheduler, shape, impl):
    dims = SHAPES[shape]
    x, v = torch.randn(dims), torch.randn(dims)
    ts = scheduler.timesteps[3].expand(dims[0])
    step = _step(impl, scheduler)
    benchmark(lambda: step(v, ts, x, 0.7, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["compat", "flow_grpo"])
def test_score_forward_backward(benchmark, scheduler, shape, impl):
    dims = SHAPES[shape]
    x, v = torch.randn(dims), torch.randn(dims)
    ts = scheduler.timesteps[3].expand(dims[0])
    sample = compat.sde_step_with_logprob(scheduler, v, ts, x)[0]
    step = _step(impl, scheduler)

    def run():
        vg = v.detach().requires_grad_()
        step(vg, ts, x, 0.7, prev_sample=sample)[1].sum().backward()

    benchmark(run)
