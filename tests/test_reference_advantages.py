"""Gains, advantages and the PPO loss of the reference, against loop-based oracles from the SPEC."""

import numpy as np
import pytest
import torch

from sfgrpo import functional as F
from sfgrpo import reference as ref


def _layout(n_groups, sizes_max, seed):
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.full(rng.integers(1, sizes_max + 1), gid * 97 - 13) for gid in range(n_groups)])
    rng.shuffle(ids)
    return torch.from_numpy(ids.astype(np.int64))


def _loop_gain_advantages(rewards, ids, normalize, eps, step_mask):
    """One group at a time, straight from SPEC §4 (numpy float64)."""
    r = rewards.double().numpy()
    g = r[:, 1:] - r[:, :-1]
    mask = np.ones(g.shape[1], bool) if step_mask is None else step_mask.numpy()
    out = np.zeros_like(g)
    for gid in np.unique(ids.numpy()):
        rows = ids.numpy() == gid
        if rows.sum() <= 1:
            continue
        block = g[rows][:, mask]
        if normalize == "joint":
            mu, sd = block.mean(), block.std()
            adv = np.zeros_like(block) if block.max() == block.min() else (block - mu) / (sd + eps)
        else:
            mu, sd = block.mean(axis=0), block.std(axis=0)
            adv = np.where(block.max(axis=0) == block.min(axis=0), 0.0, (block - mu) / (sd + eps))
        full = np.zeros((rows.sum(), g.shape[1]))
        full[:, mask] = adv
        out[rows] = full
    return torch.from_numpy(out)


def test_gains_telescope():
    rewards = torch.randn(9, 11, dtype=torch.float64)
    g = ref.gains(rewards)
    assert g.shape == (9, 10)
    torch.testing.assert_close(g.sum(dim=1), rewards[:, -1] - rewards[:, 0])
    with pytest.raises(ValueError, match=r"\[N, T\+1\]"):
        ref.gains(torch.randn(4, 1))


@pytest.mark.parametrize("normalize", ["joint", "per_step"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_gain_advantages_match_the_group_loop(normalize, seed, masked):
    ids = _layout(7, 9, seed)
    rewards = torch.randn(ids.numel(), 11, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    step_mask = torch.tensor([False] + [True] * 8 + [False]) if masked else None
    got = ref.gain_advantages(rewards, ids, normalize=normalize, eps=1e-8, step_mask=step_mask)
    torch.testing.assert_close(got, _loop_gain_advantages(rewards, ids, normalize, 1e-8, step_mask))


def test_joint_advantages_are_standardised_per_group():
    ids = torch.tensor([5, 2, 5, 2, 5, 2, 5, 2])
    rewards = torch.randn(8, 6, dtype=torch.float64)
    adv, stats = ref.gain_advantages(rewards, ids, return_stats=True)
    for gid in (2, 5):
        block = adv[ids == gid]
        assert block.mean().item() == pytest.approx(0.0, abs=1e-12)
        assert block.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    assert stats.group_ids.tolist() == [2, 5] and stats.size.tolist() == [4, 4]
    assert not stats.zero_std.any()


def test_per_step_advantages_are_standardised_per_group_and_step():
    ids = torch.tensor([0] * 5 + [1] * 6)
    adv = ref.gain_advantages(torch.randn(11, 5, dtype=torch.float64), ids, normalize="per_step")
    for gid in (0, 1):
        block = adv[ids == gid]
        torch.testing.assert_close(block.mean(dim=0), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(block.std(dim=0, unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)


def test_groups_of_one_and_zero_std_give_zero():
    ids = torch.tensor([0, 1, 1, 2, 2, 2])
    rewards = torch.randn(6, 4)
    rewards[1:3] = torch.tensor([0.25, 0.5, 0.75, 1.0])  # group 1: every gain equals 0.25
    adv, stats = ref.gain_advantages(rewards, ids, return_stats=True)
    assert torch.equal(adv[:3], torch.zeros(3, 3))
    assert adv[3:].abs().sum() > 0
    assert stats.zero_std.tolist() == [True, True, False]
    assert adv.dtype == torch.float32
    flow = ref.group_advantages(torch.tensor([1.0, 2.0, 2.0, 3.0, 3.0, 4.0]), ids)
    assert flow[:3].tolist() == [0.0, 0.0, 0.0]


def test_identical_trajectories_still_credit_steps_jointly_but_not_per_step():
    # Joint normalisation compares steps with each other, so even a group whose trajectories are all
    # the same says which steps raised the reward; per-step normalisation has nothing to compare.
    ids = torch.zeros(4, dtype=torch.int64)
    rewards = torch.tensor([[0.0, 0.5, 0.4, 0.9]]).repeat(4, 1)
    joint = ref.gain_advantages(rewards, ids)
    assert (joint[:, 0] > 0).all() and (joint[:, 1] < 0).all()
    assert torch.equal(ref.gain_advantages(rewards, ids, normalize="per_step"), torch.zeros(4, 3))


def test_nonfinite_rewards_error_or_are_dropped():
    ids = torch.tensor([0, 0, 0, 1, 1])
    rewards = torch.randn(5, 4, dtype=torch.float64)
    rewards[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        ref.gain_advantages(rewards, ids)
    adv = ref.gain_advantages(rewards, ids, nonfinite="drop")
    assert torch.isfinite(adv).all() and torch.equal(adv[1], torch.zeros(3, dtype=torch.float64))
    expected = ref.gain_advantages(rewards[[0, 2, 3, 4]], ids[[0, 2, 3, 4]])
    torch.testing.assert_close(adv[[0, 2, 3, 4]], expected)
    flow = torch.tensor([1.0, float("inf"), 3.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="NaN or inf"):
        ref.group_advantages(flow, ids)
    dropped = ref.group_advantages(flow, ids, nonfinite="drop")
    assert dropped[1] == 0 and torch.isfinite(dropped).all()


def test_group_advantages_match_flow_grpo_formula():
    ids = _layout(6, 8, 3)
    rewards = torch.randn(ids.numel(), dtype=torch.float64)
    r, idn = rewards.numpy(), ids.numpy()
    for std_mode in ("group", "global"):
        expected = np.zeros_like(r)
        for gid in np.unique(idn):
            rows = idn == gid
            if rows.sum() <= 1:
                continue
            sd = r.std() if std_mode == "global" else r[rows].std()
            expected[rows] = (r[rows] - r[rows].mean()) / (sd + 1e-4)
        got = ref.group_advantages(rewards, ids, std=std_mode)
        torch.testing.assert_close(got, torch.from_numpy(expected))
    clipped = ref.group_advantages(rewards * 1e6, ids, eps=0.0, clip=0.5)
    assert clipped.abs().max() <= 0.5


def test_group_advantages_columns_are_independent():
    ids = torch.tensor([0, 0, 1, 1, 1])
    rewards = torch.randn(5, 3, dtype=torch.float64)
    both = ref.group_advantages(rewards, ids)
    for k in range(3):
        torch.testing.assert_close(both[:, k], ref.group_advantages(rewards[:, k].contiguous(), ids))


def test_empty_batch_and_bad_inputs():
    empty = ref.gain_advantages(torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64))
    assert empty.shape == (0, 4)
    with pytest.raises(TypeError, match="int64"):
        ref.gain_advantages(torch.zeros(3, 5), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="group_ids must be"):
        ref.gain_advantages(torch.zeros(3, 5), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="step_mask"):
        ref.gain_advantages(torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64), step_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="normalize"):
        ref.gain_advantages(torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64), normalize="global")
    with pytest.raises(TypeError, match="floating"):
        ref.group_advantages(torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))


# ------------------------------------------------------------------------------- PPO loss
def test_ppo_loss_matches_the_clipped_surrogate():
    g = torch.Generator().manual_seed(0)
    logp_old = torch.randn(6, 10, generator=g)
    logp = logp_old + 1e-3 * torch.randn(6, 10, generator=g)
    adv = torch.randn(6, 10, generator=g)
    kl = torch.rand(6, 10, generator=g)
    clip = 1e-4
    ratio = torch.exp(logp - logp_old)
    expected = torch.stack([-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)]).amax(0).mean() + 0.04 * kl.mean()
    torch.testing.assert_close(ref.ppo_loss(logp, logp_old, adv, clip, kl=kl, beta=0.04), expected)
    mask = torch.zeros(6, 10, dtype=torch.bool)
    mask[:, 2:5] = True
    masked = ref.ppo_loss(logp, logp_old, adv, clip, mask=mask)
    torch.testing.assert_close(masked, ref.ppo_loss(logp[:, 2:5], logp_old[:, 2:5], adv[:, 2:5], clip))


def test_ppo_gradient_on_policy_is_minus_advantage():
    adv = torch.randn(4, 3)
    logp = torch.randn(4, 3, requires_grad=True)
    ref.ppo_loss(logp, logp.detach(), adv, 1e-4).backward()
    torch.testing.assert_close(logp.grad, -adv / 12)


def test_ppo_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="share a shape"):
        ref.ppo_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3))


def test_ppo_loss_of_no_entry_is_zero_with_a_graph():
    """An empty batch (or a mask without a True) trains nothing: loss 0, not the NaN of an empty mean,
    and backward still runs (gradient 0)."""
    logp = torch.zeros(0, 10, requires_grad=True)
    loss = F.ppo_loss(logp, torch.zeros(0, 10), torch.zeros(0, 10), 1e-4)
    assert loss.item() == 0.0
    loss.backward()
    assert logp.grad.shape == (0, 10)
    masked = torch.randn(3, 4, requires_grad=True)
    loss = F.ppo_loss(masked, torch.zeros(3, 4), torch.ones(3, 4), 1e-4, mask=torch.zeros(3, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(masked.grad, torch.zeros(3, 4))


def test_ppo_loss_rejects_bad_inputs_with_clear_errors():
    x = torch.zeros(3, 4)
    cases = [
        (ValueError, "old_log_prob must have log_prob's shape", lambda: F.ppo_loss(x, x[:2], x, 1e-4)),
        (ValueError, "kl must have log_prob's shape", lambda: F.ppo_loss(x, x, x, 1e-4, kl=x[0], beta=0.1)),
        (ValueError, "mask must have log_prob's shape", lambda: F.ppo_loss(x, x, x, mask=torch.ones(3, dtype=torch.bool))),
        (TypeError, "mask must be a bool tensor", lambda: F.ppo_loss(x, x, x, mask=torch.ones(3, 4))),
        (TypeError, "advantages must be a floating-point", lambda: F.ppo_loss(x, x, x.long())),
        (ValueError, "advantages is on meta", lambda: F.ppo_loss(x, x, x.to("meta"))),
        (ValueError, "clip_range must be a finite number > 0", lambda: F.ppo_loss(x, x, x, 0.0)),
        (ValueError, "clip_range must be a finite number > 0", lambda: F.ppo_loss(x, x, x, float("nan"))),
        (ValueError, "beta must be a finite number >= 0", lambda: F.ppo_loss(x, x, x, kl=x, beta=-0.1)),
        (ValueError, "beta must be a finite number >= 0", lambda: F.ppo_loss(x, x, x, kl=x, beta=float("inf"))),
        (ValueError, "beta > 0 needs kl", lambda: F.ppo_loss(x, x, x, beta=0.04)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
