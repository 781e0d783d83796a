"""sfgrpo.compat.flow_grpo against the Flow-GRPO formulas of SPEC §7, written out independently."""

import math
import sys
import types

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sfgrpo.compat import flow_grpo as compat


def spec_step(sigmas, timesteps, model_output, timestep, sample, noise_level, prev_sample, noise, sde_type):
    """SPEC §7 / §3: Flow-GRPO's step, one row at a time, float64."""
    rows = []
    for b in range(sample.shape[0]):
        idx = [i for i, ts in enumerate(timesteps.tolist()) if ts == float(timestep[b])]
        i = idx[1] if len(idx) > 1 else idx[0]
        t, tn = float(sigmas[i]), float(sigmas[i + 1])
        x, v = sample[b].double(), model_output[b].double()
        dt = tn - t
        if sde_type == "sde":
            t_tilde = float(sigmas[1]) if t == 1 else t
            sigma_t = noise_level * math.sqrt(t / (1 - t_tilde))
            mean = x * (1 + sigma_t**2 / (2 * t) * dt) + v * (1 + sigma_t**2 * (1 - t) / (2 * t)) * dt
            std, std_dev_t = sigma_t * math.sqrt(-dt), sigma_t
        else:
            std = tn * math.sin(noise_level * math.pi / 2)
            mean = (x - t * v) * (1 - tn) + (x + (1 - t) * v) * math.sqrt(tn**2 - std**2)
            std_dev_t = std
        xp = mean + std * noise[b].double() if prev_sample is None else prev_sample[b].double()
        if sde_type == "sde":
            lp = (-(xp - mean) ** 2 / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))).mean()
        else:
            lp = (-(xp - mean) ** 2).mean()
        rows.append((xp, lp, mean, std_dev_t, math.sqrt(-dt)))
    return (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows]),
            torch.tensor([r[3] for r in rows], dtype=torch.float64), torch.tensor([r[4] for r in rows], dtype=torch.float64))


@pytest.fixture(scope="module")
def scheduler():
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(10)
    return s


@pytest.mark.parametrize("shape", [(3, 16), (2, 4, 6), (3, 4, 8, 8), (2, 3, 2, 4, 4)])
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("steps", [[0, 0, 0], [0, 4, 9], [9, 9, 9]])  # first step, mixed rows, last step
def test_step_matches_the_spec(scheduler, shape, sde_type, steps):
    batch = shape[0]
    g = torch.Generator().manual_seed(1)
    sample, model_output = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    timestep = scheduler.timesteps[torch.tensor(steps[:batch])]
    level = 0.7 if sde_type == "sde" else 0.8
    out = compat.sde_step_with_logprob(scheduler, model_output, timestep, sample, level,
                                       generator=torch.Generator().manual_seed(7), sde_type=sde_type, return_sqrt_dt=True)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    xp, lp, mean, std_dev_t, sqrt_dt = spec_step(scheduler.sigmas, scheduler.timesteps, model_output, timestep, sample,
                                                  level, None, noise, sde_type)
    view = (batch,) + (1,) * (len(shape) - 1)
    assert all(o.dtype == torch.float32 for o in out)
    assert out[3].shape == view and out[4].shape == view and out[1].shape == (batch,)
    torch.testing.assert_close(out[0].double(), xp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[2].double(), mean, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[1].double(), lp, atol=2e-5 if sde_type == "sde" else 1e-6, rtol=1e-5)
    torch.testing.assert_close(out[3].double().flatten(), std_dev_t, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[4].double().flatten(), sqrt_dt, atol=1e-6, rtol=1e-6)
    # scoring the returned sample reproduces the log-prob
    again = compat.sde_step_with_logprob(scheduler, model_output, timestep, sample, level, prev_sample=out[0], sde_type=sde_type)
    assert torch.equal(again[1], out[1]) and len(again) == 4


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_scoring_another_sample_matches_the_spec_at_every_step(scheduler, sde_type):
    """Training scores stored samples under a moved policy, so x' != mean: on the last `cps` step
    (t' = 0, std 0) Flow-GRPO's bare squares `-(x' - mean)^2` are finite and carry a gradient."""
    g = torch.Generator().manual_seed(5)
    steps = torch.arange(10)
    sample, model_output, other = (torch.randn(10, 4, 6, 6, generator=g) for _ in range(3))
    timestep = scheduler.timesteps[steps]
    level = 0.7 if sde_type == "sde" else 0.8
    v = model_output.clone().requires_grad_(True)
    out = compat.sde_step_with_logprob(scheduler, v, timestep, sample, level, prev_sample=other, sde_type=sde_type)
    _, lp, mean, _, _ = spec_step(scheduler.sigmas, scheduler.timesteps, model_output, timestep, sample, level, other,
                                  None, sde_type)
    torch.testing.assert_close(out[1].double(), lp, atol=2e-5 if sde_type == "sde" else 1e-6, rtol=1e-5)
    out[1].sum().backward()
    # d logp / d v = c_v * d logp / d mean; c_v = d mean / d v per row (the step is affine in v)
    mean_shift = compat.sde_step_with_logprob(scheduler, model_output + 1, timestep, sample, level, prev_sample=other,
                                              sde_type=sde_type)[2].double() - mean
    c_v = mean_shift.flatten(1).mean(1).reshape(-1, 1, 1, 1)
    residual = other.double() - mean
    if sde_type == "sde":
        std = torch.tensor([float(s) for s in spec_step(scheduler.sigmas, scheduler.timesteps, model_output, timestep,
                                                        sample, level, other, None, sde_type)[3]], dtype=torch.float64)
        std = std * (scheduler.sigmas[steps] - scheduler.sigmas[steps + 1]).double().sqrt()
        expected = c_v * residual / (std.reshape(-1, 1, 1, 1) ** 2 * residual[0].numel())
    else:
        expected = c_v * 2 * residual / residual[0].numel()
    torch.testing.assert_close(v.grad.double(), expected, rtol=1e-4, atol=1e-7)
    if sde_type == "cps":
        assert out[1][-1] < 0 and v.grad[-1].abs().sum() > 0  # the last step counts, like Flow-GRPO's


def test_single_timestep_broadcasts_and_bf16_inputs_compute_in_fp32(scheduler):
    sample = torch.randn(4, 3, 8, 8, dtype=torch.bfloat16)
    model_output = torch.randn(4, 3, 8, 8, dtype=torch.bfloat16)
    one = compat.sde_step_with_logprob(scheduler, model_output, scheduler.timesteps[2], sample, generator=torch.Generator().manual_seed(0))
    per_row = compat.sde_step_with_logprob(scheduler, model_output, scheduler.timesteps[2].expand(4), sample,
                                           generator=torch.Generator().manual_seed(0))
    assert one[0].dtype == torch.float32
    for a, b in zip(one, per_row):
        assert torch.equal(a, b)
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(0))
    xp, lp, *_ = spec_step(scheduler.sigmas, scheduler.timesteps, model_output.float(), scheduler.timesteps[2].expand(4),
                           sample.float(), 0.7, None, noise, "sde")
    torch.testing.assert_close(one[0].double(), xp, atol=2e-5, rtol=1e-5)


def test_same_generator_same_sample_and_list_of_generators(scheduler):
    sample, model_output = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    ts = scheduler.timesteps[3].expand(2)
    a = compat.sde_step_with_logprob(scheduler, model_output, ts, sample, generator=torch.Generator().manual_seed(3))
    b = compat.sde_step_with_logprob(scheduler, model_output, ts, sample, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0])
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    c = compat.sde_step_with_logprob(scheduler, model_output, ts, sample, generator=gens)
    row1 = compat.sde_step_with_logprob(scheduler, model_output[1:], ts[1:], sample[1:], generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(c[0][1:], row1[0])


def test_duplicate_timesteps_take_the_second_match():
    table = types.SimpleNamespace(timesteps=torch.tensor([1000.0, 500.0, 500.0, 250.0]),
                                  sigmas=torch.tensor([1.0, 0.6, 0.5, 0.25, 0.0]))
    sample, model_output = torch.randn(1, 8), torch.randn(1, 8)
    out = compat.sde_step_with_logprob(table, model_output, torch.tensor([500.0]), sample, sde_type="cps",
                                       noise_level=0.8, return_sqrt_dt=True)
    torch.testing.assert_close(out[4].flatten(), torch.tensor([math.sqrt(0.25)]))  # t = 0.5 -> t' = 0.25


_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ["reference", "triton"] + (["native"] if _DEVICE == "cpu" else []))
@pytest.mark.parametrize("mode", ["sample", "score"])
def test_low_precision_velocity_equals_flow_grpos_float_cast(scheduler, monkeypatch, backend, mode):
    """Flow-GRPO casts the velocity to float32 first; the drop-in reads it in its storage dtype
    (no cast kernel): outputs and the velocity's gradient must have the same bits."""
    monkeypatch.setenv("SFGRPO_BACKEND", backend)
    g = torch.Generator().manual_seed(11)
    sample = torch.randn(3, 4, 6, 6, generator=g).bfloat16().to(_DEVICE)
    other = torch.randn(3, 4, 6, 6, generator=g).to(_DEVICE)
    velocity = torch.randn(3, 4, 6, 6, generator=g).bfloat16().to(_DEVICE)
    timestep = scheduler.timesteps[torch.tensor([0, 3, 9])].to(_DEVICE)
    results = []
    for cast in (False, True):
        v = velocity.clone().requires_grad_()
        extra = dict(prev_sample=other) if mode == "score" else dict(generator=torch.Generator().manual_seed(2))
        out = compat.sde_step_with_logprob(scheduler, v.float() if cast else v, timestep, sample, **extra)
        (out[1] * torch.tensor([1.0, -2.0, 0.5], device=_DEVICE)).sum().backward()
        assert v.grad.dtype == torch.bfloat16
        results.append([o.detach() for o in out] + [v.grad])
    (*outputs, grad), (*cast_outputs, cast_grad) = results
    for a, b in zip(outputs, cast_outputs):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    assert torch.equal(grad, cast_grad)


def test_timestep_occurring_three_times_takes_its_second_occurrence():
    table = types.SimpleNamespace(timesteps=torch.tensor([1000.0, 500.0, 500.0, 500.0, 250.0]),
                                  sigmas=torch.tensor([1.0, 0.7, 0.6, 0.5, 0.25, 0.0]))
    out = compat.sde_step_with_logprob(table, torch.randn(3, 8), torch.tensor([500.0, 1000.0, 250.0]), torch.randn(3, 8),
                                       sde_type="cps", noise_level=0.8, return_sqrt_dt=True)
    torch.testing.assert_close(out[4].flatten() ** 2, torch.tensor([0.1, 0.3, 0.25]))


def test_scheduler_without_timesteps_is_a_clear_error():
    table = types.SimpleNamespace(timesteps=torch.tensor([]), sigmas=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="no timesteps"):
        compat.sde_step_with_logprob(table, torch.randn(1, 4), torch.tensor([1.0]), torch.randn(1, 4))


def test_scheduler_before_set_timesteps_is_a_clear_error():
    # diffusers' constructor leaves 1000 training timesteps and as many sigmas (no final 0)
    with pytest.raises(ValueError, match="call it first"):
        compat.sde_step_with_logprob(FlowMatchEulerDiscreteScheduler(shift=3.0), torch.randn(1, 4), 500.0,
                                     torch.randn(1, 4))


def test_unknown_timestep_is_a_clear_error(scheduler):
    with pytest.raises(RuntimeError, match="not in scheduler.timesteps"):
        compat.sde_step_with_logprob(scheduler, torch.randn(2, 4), torch.tensor([123.0, 456.0]), torch.randn(2, 4))


def test_table_is_rebuilt_when_the_schedule_changes():
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(10)
    compat.sde_step_with_logprob(s, torch.randn(1, 4), s.timesteps[:1], torch.randn(1, 4))
    s.set_timesteps(20)
    out = compat.sde_step_with_logprob(s, torch.randn(1, 4), s.timesteps[5:6], torch.randn(1, 4), return_sqrt_dt=True)
    torch.testing.assert_close(out[4].flatten() ** 2, (s.sigmas[5] - s.sigmas[6]).reshape(1))


# ---------------------------------------------------------------------------- the tracker
class SpecTracker:
    """SPEC §7 tracker semantics, one prompt at a time (history kept until clear())."""

    def __init__(self, global_std):
        self.global_std, self.stats, self.seen = global_std, {}, set()

    def update(self, prompts, rewards):
        rewards = np.asarray(rewards, dtype=np.float64)
        out = np.zeros_like(rewards)
        for p in dict.fromkeys(prompts):
            rows = [i for i, q in enumerate(prompts) if q == p]
            self.stats[p] = list(self.stats.get(p, [])) + [rewards[i] for i in rows]
            self.seen.add(p)
        for p in dict.fromkeys(prompts):
            rows = [i for i, q in enumerate(prompts) if q == p]
            hist = np.stack(self.stats[p])
            mean = hist.mean(axis=0)
            std = rewards.std(axis=0) if self.global_std else hist.std(axis=0)
            out[rows] = (rewards[rows] - mean) / (std + 1e-4)
        return out


@pytest.mark.parametrize("global_std", [False, True])
@pytest.mark.parametrize("columns", [None, 3])
def test_tracker_matches_the_spec_across_updates(global_std, columns):
    rng = np.random.default_rng(0)
    ours, spec = compat.PerPromptStatTracker(global_std), SpecTracker(global_std)
    for _ in range(3):  # history accumulates until clear()
        prompts = [f"prompt {i}" for i in rng.integers(0, 7, size=40)]
        rewards = rng.normal(size=(40,) if columns is None else (40, columns))
        got = ours.update(prompts, rewards)
        assert got.dtype == np.float64 and got.shape == rewards.shape
        np.testing.assert_allclose(got, spec.update(prompts, rewards), rtol=1e-9, atol=1e-9)
    size, seen = ours.get_stats()
    assert seen == len(spec.seen) and size == pytest.approx(np.mean([len(v) for v in spec.stats.values()]))
    ours.clear()
    assert ours.stats == {} and ours.get_stats()[1] == len(spec.seen)


def test_tracker_other_types_and_bad_input():
    tracker = compat.PerPromptStatTracker()
    prompts, rewards = ["a", "b", "a", "b", "a"], [1.0, 5.0, 3.0, 5.0, 2.0]
    np.testing.assert_array_equal(tracker.update(prompts, rewards, type="rwr"), rewards)
    np.testing.assert_array_equal(tracker.update(prompts, rewards, type="sft"), [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(tracker.update(prompts, rewards, type="dpo"), [-1, -1, 1, 1, 0])
    with pytest.raises(NotImplementedError):
        tracker.update(prompts, rewards, type="gardo")
    with pytest.raises(ValueError, match="NaN or inf"):
        tracker.update(["a", "a"], [1.0, float("nan")])
    with pytest.raises(ValueError, match="prompts"):
        tracker.update(["a"], [1.0, 2.0])


# ------------------------------------------------------------------------------- patching
def test_patch_and_unpatch_a_stand_in_flow_grpo():
    def original_step(*args, **kwargs):
        return "original"

    class OriginalTracker:
        pass

    defining = types.ModuleType("fake_flow_grpo_defs")
    defining.sde_step_with_logprob, defining.PerPromptStatTracker = original_step, OriginalTracker
    user = types.ModuleType("fake_flow_grpo_trainer")
    user.sde_step_with_logprob = original_step  # `from ... import sde_step_with_logprob`
    sys.modules.update({defining.__name__: defining, user.__name__: user})
    try:
        done = compat.patch(modules=[defining])
        assert set(done) == {"fake_flow_grpo_defs.sde_step_with_logprob", "fake_flow_grpo_defs.PerPromptStatTracker",
                             "fake_flow_grpo_trainer.sde_step_with_logprob"}
        assert user.sde_step_with_logprob is compat.sde_step_with_logprob
        assert defining.PerPromptStatTracker is compat.PerPromptStatTracker
        assert compat.patch(modules=[defining]) == []  # idempotent
        compat.unpatch()
        assert user.sde_step_with_logprob is original_step and defining.PerPromptStatTracker is OriginalTracker
        assert not compat.is_patched()
    finally:
        compat.unpatch()
        for name in (defining.__name__, user.__name__):
            sys.modules.pop(name, None)


def test_patch_without_flow_grpo_installed_says_so():
    with pytest.raises(ImportError, match="Flow-GRPO installed"):
        compat.patch(modules=["flow_grpo_not_installed_here.stat_tracking"])
