"""Marginal and coefficient preservation (SPEC §3 "Properties") with the exact velocity field of
Gaussian data N(m, s^2). These catch sign and scale errors that summary statistics could hide."""

import math

import pytest
import torch

from sfgrpo import reference as ref
from sfgrpo.schedules import sd3_sigmas, uniform_sigmas

POINTS = 200_000
M, S = 0.3, 0.5


def gaussian_velocity(m, s):
    """Exact E[x1 - x0 | x_t = x] for x0 ~ N(m, s^2), x1 ~ N(0, 1), x_t = (1-t) x0 + t x1."""

    def velocity(x, t):
        tt = ref.per_row(t, x)
        var = (1 - tt) ** 2 * s**2 + tt**2
        return (tt - (1 - tt) * s**2) / var * (x - (1 - tt) * m) - m

    return velocity


def sample(sigmas, sde_type, noise_level, m, s, seed=0, on_state=None, points=POINTS):
    g = torch.Generator().manual_seed(seed)
    velocity = gaussian_velocity(m, s)
    x = torch.randn(points, 1, generator=g, dtype=torch.float64).float()
    for k in range(len(sigmas) - 1):
        t, tn = float(sigmas[k]), float(sigmas[k + 1])
        v = velocity(x, torch.full((points,), t))
        noise = torch.randn(x.shape, generator=g)
        x = ref.sde_step(x, v, t, tn, noise_level, sde_type=sde_type, noise=noise, sigma_max=float(sigmas[1])).prev_sample
        if on_state is not None:
            on_state(tn, x)
    return x


@pytest.mark.parametrize("sde_type, noise_level", [("sde", 0.3), ("sde", 0.7), ("sde", 1.0), ("ode", 0.0)])
def test_sde_and_ode_preserve_marginals_on_a_fine_grid(sde_type, noise_level):
    x = sample(uniform_sigmas(200), sde_type, noise_level, M, S)
    assert x.mean().item() == pytest.approx(M, abs=0.01 * S)
    assert x.std().item() == pytest.approx(S, rel=0.01)


@pytest.mark.parametrize("sde_type, noise_level, expected_std", [("sde", 0.7, 0.42), ("ode", 0.0, 0.36)])
def test_coarse_sd3_grid_loses_variance_as_the_spec_measured(sde_type, noise_level, expected_std):
    x = sample(sd3_sigmas(10), sde_type, noise_level, M, S)
    assert x.std().item() == pytest.approx(expected_std, abs=0.01)


@pytest.mark.parametrize("sde_type, noise_level", [("cps", 0.8), ("cps", 0.3), ("ddim", 0.7)])
@pytest.mark.parametrize("grid", ["sd3", "uniform7"])
def test_cps_and_ddim_preserve_coefficients_for_point_mass_data(sde_type, noise_level, grid):
    m = 0.6
    sigmas = sd3_sigmas(10) if grid == "sd3" else uniform_sigmas(7)
    seen = []

    def check(t, x):
        seen.append(t)
        # x_t must be exactly N((1-t) m, t^2): mean, std, and Gaussian shape (4th moment)
        tol = 5 * max(t, 1e-3) / math.sqrt(POINTS)
        assert x.mean().item() == pytest.approx((1 - t) * m, abs=tol)
        assert x.std().item() == pytest.approx(t, abs=tol + 1e-6)
        if t > 0:
            z = (x.double() - (1 - t) * m) / t
            assert (z**4).mean().item() == pytest.approx(3.0, abs=0.06)

    sample(sigmas, sde_type, noise_level, m, 0.0, on_state=check)
    assert len(seen) == len(sigmas) - 1 and seen[-1] == 0.0


@pytest.mark.parametrize("sde_type, noise_level, expected_std", [("cps", 0.8, 0.40), ("ddim", 0.7, 0.47)])
def test_cps_and_ddim_shrink_spread_data(sde_type, noise_level, expected_std):
    # 1000 steps as in the SPEC's measurement; 50k points keep the std's sampling error ~0.002
    x = sample(uniform_sigmas(1000), sde_type, noise_level, M, S, points=50_000)
    assert x.mean().item() == pytest.approx(M, abs=0.01)
    assert x.std().item() == pytest.approx(expected_std, abs=0.01)
    assert x.std().item() < 0.97 * S
