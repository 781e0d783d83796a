"""CPU benchmark (pytest-benchmark) of the SDE step's CPU path (the reference) against the
Flow-GRPO formulation, sampling and scoring forward + backward.

    pytest benchmarks/bench_sde_step_cpu.py --benchmark-enable --benchmark-columns=median,ops
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flow_grpo_baseline as fg  # noqa: E402

from sfgrpo import functional as F  # noqa: E402
from sfgrpo.schedules import Schedule  # noqa: E402

SHAPE = (8, 16, 32, 32)
STEP = 3


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    schedule = Schedule.sd3(10)
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    t = schedule.t[STEP].expand(SHAPE[0]).contiguous()
    tn = schedule.t_next[STEP].expand(SHAPE[0]).contiguous()
    sample = F.sde_step(x, v, t, tn, 0.7, seed=0).prev_sample
    return schedule, x, v, t, tn, sample


@pytest.mark.parametrize("impl", ["sfgrpo", "flow_grpo"])
def test_sample(benchmark, setup, impl):
    schedule, x, v, t, tn, _ = setup
    timestep = schedule.timesteps[STEP].expand(SHAPE[0])
    if impl == "sfgrpo":
        benchmark(lambda: F.sde_step(x, v, t, tn, 0.7, generator=torch.Generator().manual_seed(0), return_x0_hat=True))
    else:
        benchmark(lambda: fg.sde_step_with_logprob(schedule.sigmas, schedule.timesteps, v, timestep, x, 0.7,
                                                   generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("impl", ["sfgrpo", "flow_grpo"])
def test_score_forward_backward(benchmark, setup, impl):
    schedule, x, v, t, tn, sample = setup
    timestep = schedule.timesteps[STEP].expand(SHAPE[0])

    def run():
        vg = v.detach().requires_grad_()
        if impl == "sfgrpo":
            log_prob = F.sde_step(x, vg, t, tn, 0.7, prev_sample=sample).log_prob
        else:
            log_prob = fg.sde_step_with_logprob(schedule.sigmas, schedule.timesteps, vg, timestep, x, 0.7,
                                                prev_sample=sample)[1]
        log_prob.sum().backward()

    benchmark(run)
