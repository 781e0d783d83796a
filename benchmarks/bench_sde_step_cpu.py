"""CPU benchmark (pytest-benchmark) of the SDE step on CPU tensors: sfgrpo's C++ kernels (`sfgrpo`,
the default), its plain-PyTorch path (`sfgrpo-reference`) and the Flow-GRPO formulation, sampling
and scoring forward + backward, on a tiny latent (8x16x2x2: the per-call overhead), a small
(8x16x32x32) and an SD3.5-M-sized (8x16x128x128) one.

    pytest benchmarks/bench_sde_step_cpu.py --benchmark-enable --benchmark-columns=median,ops
"""

import pytest
import torch

from sfgrpo.bench import flow_grpo_code as fg

from sfgrpo import functional as F
from sfgrpo.schedules import Schedule

SHAPES = {"tiny": (8, 16, 2, 2), "small": (8, 16, 32, 32), "sd35m": (8, 16, 128, 128)}
STEP = 3
IMPLS = {"sfgrpo": None, "sfgrpo-reference": "reference", "flow_grpo": None}


@pytest.fixture(scope="module", params=list(SHAPES))
def setup(request):
    torch.manual_seed(0)
    shape = SHAPES[request.param]
    schedule = Schedule.sd3(10)
    x, v = torch.randn(shape), torch.randn(shape)
    t = schedule.t[STEP].expand(shape[0]).contiguous()
    tn = schedule.t_next[STEP].expand(shape[0]).contiguous()
    sample = F.sde_step(x, v, t, tn, 0.7, seed=0).prev_sample
    return schedule, x, v, t, tn, sample


@pytest.mark.parametrize("impl", list(IMPLS))
def test_sample(benchmark, setup, impl):
    schedule, x, v, t, tn, _ = setup
    timestep = schedule.timesteps[STEP].expand(x.shape[0])
    if impl != "flow_grpo":
        benchmark(lambda: F.sde_step(x, v, t, tn, 0.7, generator=torch.Generator().manual_seed(0), return_x0_hat=True,
                                     backend=IMPLS[impl]))
    else:
        benchmark(lambda: fg.sde_step_with_logprob(schedule.sigmas, schedule.timesteps, v, timestep, x, 0.7,
                                                   generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_score_forward_backward(benchmark, setup, impl):
    schedule, x, v, t, tn, sample = setup
    timestep = schedule.timesteps[STEP].expand(x.shape[0])

    def run():
        vg = v.detach().requires_grad_()
        if impl != "flow_grpo":
            log_prob = F.sde_step(x, vg, t, tn, 0.7, prev_sample=sample, backend=IMPLS[impl]).log_prob
        else:
            log_prob = fg.sde_step_with_logprob(schedule.sigmas, schedule.timesteps, vg, timestep, x, 0.7,
                                                prev_sample=sample)[1]
        log_prob.sum().backward()

    benchmark(run)
