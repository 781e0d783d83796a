"""Reference SDE-step math against independent statements of the SPEC formulas."""

import math

import numpy as np
import pytest
import torch

from sfgrpo import reference as ref
from sfgrpo.schedules import Schedule, sd3_sigmas, uniform_sigmas, validate_sigmas

SHAPES = [(4, 16), (3, 4, 5, 6), (2, 3, 2, 4, 5), (5, 1)]


def _state(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, v


def _rows(shape, lo, hi, seed=1):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(shape[0], generator=g)


def test_schedule_matches_sd3_grid_of_the_spec():
    expected = [1.0, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0]
    torch.testing.assert_close(sd3_sigmas(10, 3.0), torch.tensor(expected), atol=1e-4, rtol=0)
    s = Schedule.sd3(10)
    assert s.num_steps == 10 and s.t.shape == (10,) and s.sigma_max == pytest.approx(0.9601, abs=1e-4)
    torch.testing.assert_close(s.timesteps[:2], torch.tensor([1000.0, 960.1293]), atol=1e-3, rtol=0)
    torch.testing.assert_close(uniform_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


@pytest.mark.parametrize(
    "grid, message",
    [([1.0, 0.5, 0.5, 0.0], "decreasing"), ([1.2, 0.0], r"\[0, 1\]"), ([1.0], "at least 2"), ([1.0, float("nan")], "NaN")],
)
def test_schedule_rejects_bad_grids(grid, message):
    with pytest.raises(ValueError, match=message):
        validate_sigmas(grid)


def test_schedule_rejects_bad_step_counts_and_shifts():
    for steps in (0, -1, 2.5, True, "10"):
        for build in (lambda: sd3_sigmas(steps), lambda: uniform_sigmas(steps)):
            with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
                build()
    for shift in (0.0, -1.0, float("nan"), float("inf"), "3", True):
        with pytest.raises(ValueError, match="shift must be a finite number > 0"):
            sd3_sigmas(10, shift)
    # integers and floats of numpy / torch are numbers too
    assert Schedule.sd3(np.int64(4), np.float32(3.0)).num_steps == 4 and uniform_sigmas(torch.tensor(3)).numel() == 4


@pytest.mark.parametrize("shape", SHAPES)
def test_tweedie_identities(shape):
    x0, x1 = _state(shape, torch.float64)
    t = _rows(shape, 0.05, 1.0)
    tt = ref.per_row(t, x0).double()
    xt = (1 - tt) * x0 + tt * x1
    v = x1 - x0
    torch.testing.assert_close(ref.tweedie_x0(xt, v, t).double(), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref.tweedie_x1(xt, v, t).double(), x1, atol=1e-5, rtol=0)
    # and they re-interpolate to x_t
    rebuilt = (1 - tt) * ref.tweedie_x0(xt, v, t) + tt * ref.tweedie_x1(xt, v, t)
    torch.testing.assert_close(rebuilt.double(), xt, atol=1e-5, rtol=0)


def _spec_mean_and_std(sde_type, x, v, t, tn, a, sigma_max):
    """The SPEC §3 table, written out without the coefficient form."""
    tt, tnn, aa = (ref.per_row(q, x).double() for q in (t, tn, a))
    x, v = x.double(), v.double()
    dt = tnn - tt
    x0h, x1h = x - tt * v, x + (1 - tt) * v
    if sde_type == "sde":
        t_tilde = torch.where(tt == 1, torch.full_like(tt, sigma_max), tt)
        sigma = aa * torch.sqrt(tt / (1 - t_tilde))
        return x + dt * (v + sigma**2 / (2 * tt) * x1h), sigma * torch.sqrt(-dt)
    if sde_type == "ode":
        return x + dt * v, torch.zeros_like(tt)
    s = tnn * torch.sin(aa * math.pi / 2) if sde_type == "cps" else aa * tnn * torch.sqrt(1 - tt)
    return (1 - tnn) * x0h + torch.sqrt(tnn**2 - s**2) * x1h, s


@pytest.mark.parametrize("sde_type", ref.SDE_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_step_mean_and_std_match_spec_table(sde_type, shape):
    x, v = _state(shape)
    t = _rows(shape, 0.2, 0.99)
    t[0] = 1.0  # first step of a grid
    tn = t * _rows(shape, 0.3, 0.9, seed=5)
    tn[-1] = 0.0  # last step
    a = _rows(shape, 0.0, 1.0, seed=7)
    out = ref.sde_step(x, v, t, tn, a, sde_type=sde_type, sigma_max=0.96, noise=torch.zeros(shape))
    mean, std = _spec_mean_and_std(sde_type, x, v, t, tn, a, 0.96)
    torch.testing.assert_close(out.mean.double(), mean, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.std.double(), std.flatten(), atol=1e-6, rtol=1e-5)
    assert torch.isfinite(out.log_prob).all()


@pytest.mark.parametrize("sde_type", ["cps", "ddim"])
def test_zero_noise_cps_and_ddim_equal_euler(sde_type):
    x, v = _state((6, 3, 8, 8))
    t, tn = _rows(x.shape, 0.3, 1.0), _rows(x.shape, 0.0, 0.25, seed=3)
    out = ref.sde_step(x, v, t, tn, 0.0, sde_type=sde_type)
    euler = x + ref.per_row(tn - t, x) * v
    torch.testing.assert_close(out.prev_sample, euler, atol=1e-6, rtol=1e-6)
    assert torch.equal(out.log_prob, torch.zeros(6))


@pytest.mark.parametrize("sde_type", ["sde", "cps", "ddim"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_equals_torch_normal(sde_type, reduction):
    x, v = _state((5, 4, 6, 6), torch.float64)
    t, tn = _rows(x.shape, 0.4, 0.95), _rows(x.shape, 0.05, 0.35, seed=2)
    out = ref.sde_step(x, v, t, tn, 0.7, sde_type=sde_type, reduction=reduction)
    std = ref.per_row(out.std, x).double()
    elementwise = torch.distributions.Normal(out.mean.double(), std).log_prob(out.prev_sample.double())
    expected = elementwise.mean(dim=(1, 2, 3)) if reduction == "mean" else elementwise.sum(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob.double(), expected, atol=1e-6 * (1 if reduction == "mean" else 144), rtol=1e-6)


def test_flow_grpo_log_prob_convention():
    x, v = _state((4, 2, 5, 5))
    t, tn = torch.full((4,), 0.8), torch.full((4,), 0.6)
    sde = ref.sde_step(x, v, t, tn, 0.7, sde_type="sde", generator=torch.Generator().manual_seed(0))
    sde_fg = ref.sde_step(x, v, t, tn, 0.7, sde_type="sde", prev_sample=sde.prev_sample, logprob="flow_grpo")
    assert torch.equal(sde.log_prob, sde_fg.log_prob)  # identical for sde
    cps = ref.sde_step(x, v, t, tn, 0.8, sde_type="cps", generator=torch.Generator().manual_seed(0))
    cps_fg = ref.sde_step(x, v, t, tn, 0.8, sde_type="cps", prev_sample=cps.prev_sample, logprob="flow_grpo")
    torch.testing.assert_close(cps_fg.log_prob, -((cps.prev_sample - cps.mean) ** 2).mean(dim=(1, 2, 3)))


def test_zero_std_rows_give_zero_log_prob_never_nan():
    x, v = _state((3, 8))
    t, tn = torch.tensor([1.0, 0.5, 0.3]), torch.tensor([0.9, 0.2, 0.0])
    for sde_type in ref.SDE_TYPES:
        out = ref.sde_step(x, v, t, tn, torch.tensor([0.0, 0.0, 0.7]), sde_type=sde_type, v_ref=v + 1)
        assert torch.isfinite(out.log_prob).all() and torch.isfinite(out.kl).all()
        assert out.log_prob[0] == 0 and out.log_prob[1] == 0 and out.kl[0] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sde_type", ["sde", "cps", "ddim"])
def test_rescoring_the_drawn_sample_gives_the_same_log_prob(dtype, sde_type):
    x, v = _state((4, 4, 8, 8), dtype)
    t, tn = torch.full((4,), 0.7), torch.full((4,), 0.5)
    drawn = ref.sde_step(x, v, t, tn, 0.7, sde_type=sde_type, generator=torch.Generator().manual_seed(3))
    assert drawn.prev_sample.dtype == dtype and drawn.mean.dtype == torch.float32
    scored = ref.sde_step(x, v, t, tn, 0.7, sde_type=sde_type, prev_sample=drawn.prev_sample)
    assert torch.equal(torch.exp(scored.log_prob - drawn.log_prob), torch.ones(4))


def test_kl_conventions():
    x, v = _state((3, 2, 4, 4))
    v_ref = v + 0.1 * torch.randn_like(v)
    t, tn = torch.full((3,), 0.8), torch.full((3,), 0.7)
    out = ref.sde_step(x, v, t, tn, 0.7, sde_type="sde", v_ref=v_ref, noise=torch.zeros_like(x))
    mean_ref = ref.sde_step(x, v_ref, t, tn, 0.7, sde_type="sde", noise=torch.zeros_like(x)).mean
    sq = ((out.mean - mean_ref) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.kl, sq / (2 * out.std**2))
    fg = ref.sde_step(x, v, t, tn, 0.7, sde_type="sde", v_ref=v_ref, kl="flow_grpo", noise=torch.zeros_like(x))
    torch.testing.assert_close(fg.kl, sq / (2 * out.std_dev_t**2))
    # Flow-GRPO's convention misses the -dt factor: ratio is exactly -dt
    torch.testing.assert_close(fg.kl / out.kl, torch.full((3,), 0.1), rtol=1e-5, atol=0)


def test_first_step_uses_sigma_max():
    x, v = _state((2, 5))
    out = ref.sde_step(x, v, 1.0, 0.96, 0.7, sde_type="sde", noise=torch.zeros_like(x))
    torch.testing.assert_close(out.std_dev_t, torch.full((2,), 0.7 * math.sqrt(1 / 0.04)))
    custom = ref.sde_step(x, v, 1.0, 0.96, 0.7, sde_type="sde", sigma_max=0.9, noise=torch.zeros_like(x))
    torch.testing.assert_close(custom.std_dev_t, torch.full((2,), 0.7 * math.sqrt(1 / 0.1)))


def test_same_generator_same_sample():
    x, v = _state((2, 3, 4))
    a = ref.sde_step(x, v, 0.6, 0.4, generator=torch.Generator().manual_seed(11))
    b = ref.sde_step(x, v, 0.6, 0.4, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a.prev_sample, b.prev_sample)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(a.prev_sample, a.mean + ref.per_row(a.std, x) * eps)


def test_bad_inputs_raise_clearly():
    x, v = _state((3, 4))
    with pytest.raises(ValueError, match="same shape"):
        ref.sde_step(x, v[:, :2], 0.5, 0.4)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        ref.sde_step(x, v, torch.ones(2), 0.4)
    with pytest.raises(ValueError, match="sde_type"):
        ref.sde_step(x, v, 0.5, 0.4, sde_type="euler")
    with pytest.raises(ValueError, match="convention"):
        ref.sde_step(x, v, 0.5, 0.4, logprob="exact")
    with pytest.raises(ValueError, match="reduction"):
        ref.sde_step(x, v, 0.5, 0.4, reduction="max")
    with pytest.raises(ValueError, match="prev_sample"):
        ref.sde_step(x, v, 0.5, 0.4, prev_sample=x[:2])


# ----------------------------------------------------------------------------- look-ahead
def _point_mass_velocity(m):
    def velocity(x, t):
        tt = ref.per_row(t, x)
        return (x - (1 - tt) * m) / tt - m

    return velocity


@pytest.mark.parametrize("num_steps", [1, 2, 5, 8])
def test_lookahead_recovers_point_mass_data_exactly(num_steps):
    m = 0.37
    x = torch.randn(64, 3, 4, 4)
    t = torch.rand(64) * 0.9 + 0.1
    xt = (1 - ref.per_row(t, x)) * m + ref.per_row(t, x) * x
    est = ref.ode_lookahead(xt, t, _point_mass_velocity(m), num_steps)
    torch.testing.assert_close(est, torch.full_like(est, m), atol=1e-4, rtol=0)


def test_lookahead_one_step_is_tweedie_and_reuses_rollout_velocity():
    x, v = _state((4, 2, 3, 3))
    t = torch.rand(4) * 0.9 + 0.1
    calls = []

    def velocity(state, tt):
        calls.append(tt)
        return torch.zeros_like(state)

    est = ref.ode_lookahead(x, t, velocity, 1, v=v)
    assert not calls
    torch.testing.assert_close(est, ref.tweedie_x0(x, v, t))
    ref.ode_lookahead(x, t, velocity, 3, v=v)
    assert len(calls) == 2
    torch.testing.assert_close(calls[0], t * (2 / 3))


def test_public_lookahead_checks_its_inputs():
    """sfgrpo.ode_lookahead gives the reference's estimate and clear errors where the reference would
    broadcast silently: a velocity of another (broadcastable) shape, t outside [0, 1], no steps."""
    from sfgrpo import functional as F

    x, v = _state((4, 2, 3, 3))
    t = torch.rand(4) * 0.9 + 0.1

    def velocity(state, tt):
        return -state

    torch.testing.assert_close(F.ode_lookahead(x, t, velocity, 3, v=v), ref.ode_lookahead(x, t, velocity, 3, v=v),
                               rtol=0, atol=0)
    cases = [
        ("velocity_fn returned \\(1, 2, 3, 3\\)", lambda: F.ode_lookahead(x, t, lambda s, tt: s[:1], 2)),
        ("velocity_fn returned list", lambda: F.ode_lookahead(x, t, lambda s, tt: [s], 2)),
        ("v must have the shape of x", lambda: F.ode_lookahead(x, t, velocity, 2, v=v[:, :1])),
        ("t must be in \\[0, 1\\], got 1.5", lambda: F.ode_lookahead(x, 1.5, velocity, 2)),
        ("t must be in \\[0, 1\\], got nan", lambda: F.ode_lookahead(x, float("nan"), velocity, 2)),
        ("num_steps must be an int >= 1, got 0", lambda: F.ode_lookahead(x, t, velocity, 0)),
        ("num_steps must be an int >= 1, got 2.0", lambda: F.ode_lookahead(x, t, velocity, 2.0)),
        ("num_steps must be an int >= 1, got True", lambda: F.ode_lookahead(x, t, velocity, True)),
    ]
    for message, call in cases:
        with pytest.raises(ValueError, match=message):
            call()
    # integers of numpy / torch are step counts, as for the schedules
    expected = F.ode_lookahead(x, t, velocity, 3, v=v)
    for steps in (np.int64(3), torch.tensor(3)):
        torch.testing.assert_close(F.ode_lookahead(x, t, velocity, steps, v=v), expected, rtol=0, atol=0)


def test_lookahead_converges_to_gaussian_flow_map():
    # For data N(m, s^2) the ODE maps x_t to m + s (x_t - mu_t) / sigma_t.
    m, s = 0.3, 0.5
    t = torch.full((1000,), 0.8)
    mu, sig = (1 - 0.8) * m, math.sqrt((1 - 0.8) ** 2 * s**2 + 0.8**2)
    xt = mu + sig * torch.randn(1000, 1)
    est = ref.ode_lookahead(xt, t, _gaussian_velocity(m, s), 400)
    error = (est - (m + s * (xt - mu) / sig)).abs()
    assert error.max() < 1e-2 and error.mean() < 2e-3


def _gaussian_velocity(m, s):
    """Exact E[x1 - x0 | x_t] for data N(m, s^2) and noise N(0, 1)."""

    def velocity(x, t):
        tt = ref.per_row(t, x)
        var = (1 - tt) ** 2 * s**2 + tt**2
        return (tt - (1 - tt) * s**2) / var * (x - (1 - tt) * m) - m

    return velocity
