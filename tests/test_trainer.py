"""The trainer on a tiny random SD3 transformer (class-embedding conditioner, identity decode)."""

import json
import math
import shutil
import warnings

import pytest
import torch

from sfgrpo import functional
from sfgrpo.distributed import TrajectoryNoise
from sfgrpo.rewards import RewardError
from sfgrpo.trainer import Trainer, TrainerConfig
from sfgrpo.trainer import trainer as trainer_module
from sfgrpo.trainer.rollout import rollout, select_rows

torch.set_num_threads(1)


def tiny_config(tmp_path, **overrides) -> TrainerConfig:
    values = dict(output_dir=str(tmp_path / "run"), backbone="tiny-random", reward="brightness", iterations=2,
                  prompts_per_iteration=2, group_size=3, num_steps=4, progress=False, plots=False)
    values.update(overrides)
    return TrainerConfig(**values)


def _finite(record: dict) -> bool:
    return all(math.isfinite(v) for v in record.values() if isinstance(v, float))


@pytest.mark.parametrize("mode", ["stepwise", "stepwise_per_step", "flow_grpo"])
@pytest.mark.parametrize("sde_type,lookahead,cfg", [("sde", 1, 1.0), ("cps", 2, 2.0), ("ddim", 1, 1.5)])
def test_full_iteration_runs_and_logs(tmp_path, mode, sde_type, lookahead, cfg):
    trainer = Trainer(tiny_config(tmp_path, mode=mode, sde_type=sde_type, lookahead_steps=lookahead,
                                  guidance_scale=cfg, noise_level=0.8 if sde_type != "sde" else 0.7))
    record = trainer.train_iteration()
    assert record["iteration"] == 1 and _finite(record)
    assert trainer.last_images.shape[1:] == (6, 1, 8, 8)
    if mode == "flow_grpo":
        assert trainer.last_images.shape[0] == 1 and "reward_by_step" not in record
    else:  # T + 1 reward columns, T gains
        assert trainer.last_images.shape[0] == 5
        assert len(record["reward_by_step"]) == 5 and len(record["gain_abs_by_step"]) == 4
    if sde_type == "ddim":  # first step (t = 1) and last step have no noise: never trained
        assert 0 not in trainer.steps.trained and 3 not in trainer.steps.trained


@pytest.mark.parametrize("cfg_gradient", ["cond", "both"])
def test_the_first_update_is_on_policy_in_a_whole_iteration(tmp_path, cfg_gradient):
    # one optimizer step per iteration: every forward sees the rollout's weights (and, with CFG and
    # `cond`, the rollout's own unconditional velocity and its conditional forward's shape)
    trainer = Trainer(tiny_config(tmp_path, guidance_scale=2.0, cfg_gradient=cfg_gradient, mixed_precision="bf16"))
    assert [trainer.train_iteration()["ratio_mean"] for _ in range(2)] == [1.0, 1.0]


def test_on_policy_ratio_is_exactly_one(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, guidance_scale=2.0))
    batch = rollout(trainer.guided, trainer.prompts_for(0), 3, trainer.steps, sde_type="sde", logprob="gaussian",
                    generator=torch.Generator().manual_seed(0))
    advantages = torch.randn(6, trainer.steps.num_steps)
    for k in trainer.steps.trained:
        _, record = trainer.step_loss(batch, advantages, k, slice(None))
        assert record[1].item() == 1.0  # mean ratio, computed as exp(logp - logp_old)
        v = trainer.guided(batch.states[k], torch.full((6,), trainer.steps.t[k]), batch.cond, batch.null_cond)
        scored = functional.sde_step(batch.states[k], v, trainer.steps.t[k], trainer.steps.t_next[k], 0.7,
                                     prev_sample=batch.samples[k], sigma_max=trainer.steps.sigma_max)
        assert torch.equal(scored.log_prob, batch.log_probs[k])


@pytest.mark.parametrize("cfg_gradient", ["cond", "both"])
def test_cfg_gradient_picks_the_differentiated_branches_and_the_forwards(tmp_path, cfg_gradient):
    """`cond` (Flow-GRPO: `noise_pred_uncond.detach()`) differentiates the conditional branch only and
    runs the unconditional forward without autograd; `both` differentiates one batched forward."""
    trainer = Trainer(tiny_config(tmp_path, guidance_scale=2.5, cfg_gradient=cfg_gradient))
    batch = rollout(trainer.guided, trainer.prompts_for(0), 3, trainer.steps, sde_type="sde", logprob="gaussian",
                    generator=torch.Generator().manual_seed(0))
    advantages = torch.randn(6, trainer.steps.num_steps, generator=torch.Generator().manual_seed(1))
    k = trainer.steps.trained[1]
    calls = []
    hook = trainer.model.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((torch.is_grad_enabled(), kwargs["hidden_states"].shape[0])),
        with_kwargs=True)
    loss, _ = trainer.step_loss(batch, advantages, k, slice(None))
    hook.remove()
    assert calls == ([(False, 6), (True, 6)] if cfg_gradient == "cond" else [(True, 12)])
    params = [p for p in trainer.trainable.values()]
    got = torch.autograd.grad(loss, params)

    # oracle: Flow-GRPO's formulation, one batched forward with the unconditional half detached (or not)
    x, t_row = batch.states[k], torch.full((6,), trainer.steps.t[k])
    model = trainer.model
    both = model.velocity(torch.cat([x, x]), torch.cat([t_row, t_row]),
                          tuple(torch.cat([a, b]) for a, b in zip(batch.null_cond, batch.cond))).float()
    v_uncond, v_cond = both.chunk(2)
    if cfg_gradient == "cond":
        v_uncond = v_uncond.detach()
    v = v_uncond + 2.5 * (v_cond - v_uncond)
    scored = functional.sde_step(x, v, trainer.steps.t[k], trainer.steps.t_next[k], 0.7, prev_sample=batch.samples[k],
                                 sigma_max=trainer.steps.sigma_max)
    want_loss = functional.ppo_loss(scored.log_prob, batch.log_probs[k], advantages[:, k], trainer.config.clip_range)
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(loss, want_loss)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # the two settings really differ (the unconditional branch carries a gradient)
    other = trainer.guided(x, t_row, batch.cond, batch.null_cond) if cfg_gradient == "cond" else \
        trainer.guided.with_constant_uncond(x, t_row, batch.cond, batch.null_cond)
    other_scored = functional.sde_step(x, other, trainer.steps.t[k], trainer.steps.t_next[k], 0.7,
                                       prev_sample=batch.samples[k], sigma_max=trainer.steps.sigma_max)
    other_grad = torch.autograd.grad(
        functional.ppo_loss(other_scored.log_prob, batch.log_probs[k], advantages[:, k], trainer.config.clip_range),
        params)
    assert max((a - b).abs().max().item() for a, b in zip(got, other_grad)) > 1e-3 * max(a.abs().max().item() for a in got)


def test_update_reuses_the_rollouts_unconditional_velocity_until_the_first_optimizer_step(tmp_path):
    """Flow-GRPO recomputes the unconditional branch as a constant; while the weights are the
    rollout's, that constant is the rollout's own: stored, not recomputed. After an optimizer step it
    is recomputed (without autograd)."""
    trainer = Trainer(tiny_config(tmp_path, guidance_scale=2.5, gradient_accumulation_steps=2))
    assert len(trainer.steps.trained) == 3  # 3 forwards: an optimizer step after the 2nd and the 3rd
    calls = []
    hook = trainer.model.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((torch.is_grad_enabled(), kwargs["hidden_states"].shape[0])),
        with_kwargs=True)
    trainer.train_iteration()
    hook.remove()
    assert calls[-4:] == [(True, 6), (True, 6), (False, 6), (True, 6)]
    # the rollout: the two branches as two forwards of the update's shape per step (exact ratio 1)
    assert calls[:-4] == [(False, 6), (False, 6)] * trainer.steps.num_steps

    batch = rollout(trainer.guided, trainer.prompts_for(0), 3, trainer.steps, sde_type="sde", logprob="gaussian",
                    generator=torch.Generator().manual_seed(0), keep_uncond=True)
    assert batch.uncond_velocities.shape == batch.velocities.shape
    advantages = torch.randn(6, trainer.steps.num_steps, generator=torch.Generator().manual_seed(1))
    params = list(trainer.trainable.values())
    for k in trainer.steps.trained:
        stored_loss, record = trainer.step_loss(batch, advantages, k, slice(None), rollout_weights=True)
        fresh_loss, _ = trainer.step_loss(batch, advantages, k, slice(None))
        assert record[1].item() == 1.0  # on-policy: the stored constant keeps the ratio exactly 1
        torch.testing.assert_close(stored_loss, fresh_loss)
        for a, b in zip(torch.autograd.grad(stored_loss, params), torch.autograd.grad(fresh_loss, params)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    plain = rollout(trainer.guided, trainer.prompts_for(0), 3, trainer.steps, sde_type="sde", logprob="gaussian",
                    generator=torch.Generator().manual_seed(0))
    assert plain.uncond_velocities is None


def test_the_shared_initial_state_is_estimated_decoded_and_scored_once_per_group(tmp_path):
    """A group's rows start from one noise: column 0 (its clean estimate, image and reward) is
    computed once per group and spread to the rows; the look-ahead from it too."""
    from dataclasses import replace

    from sfgrpo.trainer.rollout import clean_estimates

    trainer = Trainer(tiny_config(tmp_path, lookahead_steps=2, guidance_scale=2.0))
    decoded, scored_prompts = [], []
    decode, reward = trainer.model.decode, trainer.reward
    trainer.model.decode = lambda latents: decoded.append(latents.shape[0]) or decode(latents)
    trainer.reward = lambda images, prompts: scored_prompts.append(list(prompts)) or reward(images, prompts)
    trainer.train_iteration()
    n, steps = 6, trainer.steps.num_steps
    assert decoded == [2 + steps * n]  # 2 groups' initial estimates + T columns of 6 rows
    assert scored_prompts[0][:2] == [trainer.prompts_for(0)[0], trainer.prompts_for(0)[1]]
    assert trainer.last_images.shape[:2] == (steps + 1, n)
    first = trainer.last_images[0]
    assert torch.equal(first[0], first[2]) and torch.equal(first[3], first[5]) and not torch.equal(first[0], first[3])

    batch = rollout(trainer.guided, trainer.prompts_for(0), 3, trainer.steps, sde_type="sde", logprob="gaussian",
                    noise=TrajectoryNoise(0, 0, "cpu"))
    assert batch.row_groups == [0, 0, 0, 1, 1, 1]
    calls = []
    hook = trainer.model.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    once = clean_estimates(trainer.guided, batch, trainer.steps, 2)
    hook.remove()
    assert calls == [2 * (2 + (steps - 1) * n)]  # one second sub-step, CFG: 2 rows per state
    every_row = clean_estimates(trainer.guided, replace(batch, row_groups=None), trainer.steps, 2)
    torch.testing.assert_close(once, every_row, rtol=1e-5, atol=1e-6)
    # padded to 4 initial rows (what a process with more groups computes): same estimates
    calls.clear()
    hook = trainer.model.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    padded = clean_estimates(trainer.guided, batch, trainer.steps, 2, initial_rows=4)
    hook.remove()
    assert calls == [2 * (4 + (steps - 1) * n)]
    torch.testing.assert_close(padded, once, rtol=1e-5, atol=1e-6)


def test_processes_agree_on_the_largest_number_of_groups_in_a_share():
    from sfgrpo.trainer.rollout import most_groups_per_process

    # 3 groups of 4 over 4 processes: shares of 3 rows hold 1, 2, 2 and 1 groups
    assert most_groups_per_process(12, 4, 4) == 2
    assert most_groups_per_process(12, 4, 1) == 3 and most_groups_per_process(12, 3, 2) == 2


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_rollout_batch_size_bounds_the_network_calls_and_keeps_the_rollout(tmp_path, cfg):
    trainer = Trainer(tiny_config(tmp_path, guidance_scale=cfg, rollout_batch_size=4))
    calls = []
    hook = trainer.model.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    record = trainer.train_iteration()
    # 6 trajectories in chunks of 4 and 2, every step; with CFG each chunk's branches as two forwards
    per_step = [4, 4, 2, 2] if cfg != 1.0 else [4, 2]
    assert calls[:len(per_step) * trainer.steps.num_steps] == per_step * trainer.steps.num_steps
    assert _finite(record)
    hook.remove()
    noise = dict(sde_type="sde", logprob="gaussian", noise=TrajectoryNoise(0, 0, "cpu"))
    whole = rollout(trainer.guided, trainer.prompts_for(0), 3, trainer.steps, **noise)
    chunked = rollout(trainer.guided, trainer.prompts_for(0), 3, trainer.steps, batch_size=4, **noise)
    for name in ("states", "samples", "log_probs", "velocities"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-5, atol=1e-6)


def test_groups_share_initial_noise_and_differ_afterwards(tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    batch = rollout(trainer.guided, ["1", "2"], 3, trainer.steps, sde_type="sde", logprob="gaussian",
                    generator=torch.Generator().manual_seed(0))
    start = batch.states[0]
    assert torch.equal(start[0], start[1]) and torch.equal(start[0], start[2]) and not torch.equal(start[0], start[3])
    assert not torch.equal(batch.final[0], batch.final[1])
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("mode, initial_noise, shared", [
    ("stepwise", "auto", True), ("flow_grpo", "auto", False),  # the paper / Flow-GRPO's code
    ("flow_grpo", "shared", True), ("stepwise", "independent", False),
])
def test_initial_noise_is_shared_per_group_or_drawn_per_trajectory(tmp_path, mode, initial_noise, shared):
    trainer = Trainer(tiny_config(tmp_path, mode=mode, initial_noise=initial_noise))
    assert trainer.config.shares_initial_noise is shared
    starts = []
    rollout_fn = trainer_module.rollout

    def recording_rollout(*args, **kwargs):
        batch = rollout_fn(*args, **kwargs)
        starts.append(batch.states[0])
        return batch

    decoded = []
    decode = trainer.model.decode
    trainer.model.decode = lambda latents: decoded.append(latents.shape[0]) or decode(latents)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "rollout", recording_rollout)
        trainer.train_iteration()
    start = starts[0]
    assert torch.equal(start[0], start[1]) is shared and torch.equal(start[3], start[5]) is shared
    assert not torch.equal(start[0], start[3])  # groups always differ
    columns = trainer.steps.num_steps + 1 if mode == "stepwise" else 1
    expected = (2 + (columns - 1) * 6) if (shared and mode == "stepwise") else columns * 6
    assert decoded == [expected]  # the initial estimate is scored once per group only when shared
    # independent noise of a trajectory is a function of (seed, iteration, trajectory): rank-independent
    noise = TrajectoryNoise(0, 0, "cpu")
    torch.testing.assert_close(noise.initial_per_trajectory([4], (1, 2)), noise.initial_per_trajectory([3, 4], (1, 2))[1:])


def test_lookahead_one_step_is_tweedie_without_network_calls(tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    batch = rollout(trainer.guided, ["1", "2"], 3, trainer.steps, sde_type="sde", logprob="gaussian",
                    generator=torch.Generator().manual_seed(0))
    calls = []
    original = trainer.model.velocity
    trainer.model.velocity = lambda *a: calls.append(1) or original(*a)
    estimates = trainer.scored_latents(batch)
    assert not calls and estimates.shape == (5, 6, 1, 8, 8)
    t = torch.tensor(trainer.steps.t)[:, None, None, None, None]
    torch.testing.assert_close(estimates[:-1], batch.states - t * batch.velocities)
    assert torch.equal(estimates[-1], batch.final)


def test_reward_rises_on_an_easy_reward(tmp_path):
    config = tiny_config(tmp_path, iterations=10, learning_rate=3e-3, clip_range=0.2, group_size=6,
                         gradient_accumulation_steps=1, seed=1)
    history = Trainer(config).train()
    first = sum(r["reward_mean"] for r in history[:2]) / 2
    last = sum(r["reward_mean"] for r in history[-2:]) / 2
    assert last > first + 0.02, [round(r["reward_mean"], 4) for r in history]


DETERMINISTIC = lambda record: {k: v for k, v in record.items() if not k.startswith("time/")}  # noqa: E731


@pytest.mark.parametrize("extra", [{}, {"ema_decay": 0.9, "train_batch_size": 4, "gradient_accumulation_steps": 2,
                                        "mode": "flow_grpo", "beta": 0.05},
                                   {"mixed_precision": "fp16"},  # the loss scale is resumed too
                                   {"train_step_fraction": 0.5, "num_inner_epochs": 2,  # the drawn steps too
                                    "eval_every": 1, "eval_num_steps": 3,  # and the evaluations
                                    "lr_warmup_iterations": 1, "lr_schedule": "cosine", "lr_decay_iterations": 4}])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, extra):
    full = Trainer(tiny_config(tmp_path / "a", iterations=4, **extra)).train()
    Trainer(tiny_config(tmp_path / "b", iterations=2, **extra)).train()
    resumed_trainer = Trainer(tiny_config(tmp_path / "b", iterations=4, resume_from="latest", **extra))
    assert resumed_trainer.iteration == 2
    resumed = resumed_trainer.train()
    assert [DETERMINISTIC(r) for r in resumed] == [DETERMINISTIC(r) for r in full]
    lines = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4]
    a = Trainer(tiny_config(tmp_path / "a", iterations=4, resume_from="latest", **extra))
    for name, value in a.trainable.items():
        assert torch.equal(value, resumed_trainer.trainable[name]), name
    if extra.get("eval_every"):
        evals = [(tmp_path / run / "run" / "eval.jsonl").read_text() for run in ("a", "b")]
        assert evals[0] == evals[1] and len(evals[0].splitlines()) == 5  # iterations 0..4


def test_train_step_fraction_trains_a_random_subset_of_steps_per_pass(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, num_steps=8, train_step_fraction=0.5, num_inner_epochs=3, iterations=3))
    trained = list(trainer.steps.trained)
    passes = []
    original = trainer.step_loss
    monkeypatch.setattr(trainer, "step_loss", lambda batch, adv, k, rows, **kw: (passes.append(k), original(batch, adv, k, rows, **kw))[1])
    trainer.train()
    keep = int(0.5 * len(trained))
    chosen = [sorted(passes[i:i + keep]) for i in range(0, len(passes), keep)]
    assert len(passes) == 3 * 3 * keep  # iterations x passes x steps kept, one forward each
    assert all(len(set(c)) == keep and set(c) <= set(trained) for c in chosen)
    assert len({tuple(c) for c in chosen}) > 1  # drawn anew per pass
    assert set(passes) == set(trained)  # over 9 passes every step came up


def test_evaluation_scores_fixed_noise_ode_samples_without_touching_training(tmp_path):
    plain = Trainer(tiny_config(tmp_path / "plain", iterations=3)).train()
    trainer = Trainer(tiny_config(tmp_path / "eval", iterations=3, eval_every=2, eval_num_steps=6,
                                  eval_prompts="1,2", eval_samples_per_prompt=3, eval_batch_size=4))
    history = trainer.train()
    assert [DETERMINISTIC(r) for r in history] == [DETERMINISTIC(r) for r in plain]  # training unchanged
    lines = [json.loads(line) for line in (tmp_path / "eval" / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 2, 3] == [r["iteration"] for r in trainer.eval_history]
    assert all(_finite(r) and r["eval_reward_std"] > 0 for r in lines)
    assert (tmp_path / "eval" / "run" / "images" / "eval-iter000003.png").exists()
    # fixed noise and no sampling noise: the same weights give the same score, other weights another
    again = trainer.evaluate()
    assert again["eval_reward_mean"] == lines[-1]["eval_reward_mean"]
    fresh = Trainer(tiny_config(tmp_path / "fresh", eval_every=1, eval_num_steps=6, eval_prompts="1,2",
                                eval_samples_per_prompt=3, eval_batch_size=4))
    assert fresh.evaluate()["eval_reward_mean"] == lines[0]["eval_reward_mean"]
    assert lines[0]["eval_reward_mean"] != lines[-1]["eval_reward_mean"]


def test_eval_prompts_come_from_the_flag_the_file_or_the_training_prompts(tmp_path):
    from sfgrpo.trainer.evaluation import eval_prompts

    prompt_file = tmp_path / "eval.txt"
    prompt_file.write_text("a cat\na dog\n")
    assert eval_prompts(tiny_config(tmp_path, eval_prompts="1, 2", eval_samples_per_prompt=2)) == ["1", "1", "2", "2"]
    assert eval_prompts(tiny_config(tmp_path, eval_prompt_file=str(prompt_file))) == ["a cat", "a dog"]
    assert eval_prompts(tiny_config(tmp_path, prompts="3,4")) == ["3", "4"]
    with pytest.raises(ValueError, match="eval_prompt_file"):
        tiny_config(tmp_path, eval_prompt_file=str(tmp_path / "missing.txt")).validate()


def test_prompt_files_with_metadata_reach_the_reward(tmp_path):
    # Flow-GRPO's *_metadata.jsonl layout: the reward reads prompt.metadata; the backbone sees the text
    import pickle

    from sfgrpo.models.prompts import Prompt, read_prompt_file

    jsonl = tmp_path / "train_metadata.jsonl"
    jsonl.write_text('{"prompt": "1", "tag": "single", "count": 1}\n"2"\n\n{"prompt": "3", "count": 3}\n')
    prompts = read_prompt_file(str(jsonl))
    assert prompts == ["1", "2", "3"] and [p.metadata for p in prompts] == [{"tag": "single", "count": 1}, {}, {"count": 3}]
    assert pickle.loads(pickle.dumps(prompts[0])).metadata == {"tag": "single", "count": 1}
    listed = tmp_path / "prompts.json"
    listed.write_text('["a", {"prompt": "b", "ocr": "HELLO"}]')
    assert read_prompt_file(str(listed))[1].metadata == {"ocr": "HELLO"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="object with a string"):
        read_prompt_file(str(bad))

    seen = []

    def counting_reward(images, prompts):
        seen.extend(prompts)
        return torch.tensor([float(p.metadata.get("count", 0)) for p in prompts])

    trainer = Trainer(tiny_config(tmp_path, prompt_file=str(jsonl), prompts_per_iteration=3, iterations=1,
                                  mode="flow_grpo"), reward=counting_reward)
    trainer.train()
    assert all(isinstance(p, Prompt) for p in seen)
    assert sorted({(str(p), p.metadata.get("count", 0)) for p in seen}) == [("1", 1), ("2", 0), ("3", 3)]


def test_evaluation_uses_the_ema_weights(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, iterations=2, ema_decay=0.5, eval_num_steps=4))
    trainer.train()
    with_ema = trainer.evaluate()["eval_reward_mean"]
    with torch.no_grad():
        for name, param in trainer.trainable.items():
            param.copy_(trainer.ema[name])
    trainer.ema = None
    assert trainer.evaluate()["eval_reward_mean"] == with_ema


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, iterations=5, checkpoint_every=1, keep_checkpoints=2))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / ".iter-000001.staging").mkdir()  # an interrupted save
    trainer.train()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter-000004", "iter-000005", "latest"]
    resumed = Trainer(tiny_config(tmp_path, iterations=6, keep_checkpoints=2, resume_from="latest"))
    assert resumed.iteration == 5


def test_the_last_checkpoint_is_written_once_and_never_torn(tmp_path, monkeypatch):
    from sfgrpo.trainer import checkpoint as ckpt

    published = []
    publish = ckpt._publish
    monkeypatch.setattr(ckpt, "_publish", lambda staging, root, name, state: published.append(name)
                        or publish(staging, root, name, state))
    Trainer(tiny_config(tmp_path, iterations=2, checkpoint_every=2)).train()
    assert published == ["iter-000002"]  # not a second time after the loop
    Trainer(tiny_config(tmp_path, iterations=2, resume_from="latest")).train()  # nothing left to do
    assert published == ["iter-000002"]
    # a save replacing a checkpoint of the same iteration moves the old one aside first; stopped
    # between the two renames, `latest` still resolves to a complete checkpoint
    root = tmp_path / "run" / "checkpoints"
    (root / "iter-000002").rename(root / ".iter-000002.replaced")
    assert ckpt.resolve_checkpoint("latest", root) == root / ".iter-000002.replaced"
    assert Trainer(tiny_config(tmp_path, iterations=3, resume_from="latest")).iteration == 2
    shutil.rmtree(root / ".iter-000002.replaced")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_checkpoint("latest", root)


def test_a_non_finite_update_stops_the_run_before_its_weights_are_saved(tmp_path):
    """Iteration 2's gradients turn NaN (a hook on every trained weight): the optimizer applies them,
    so the run stops right there with a clear error, its metrics row written, no checkpoint or
    evaluation from those weights (the next rollout would only have failed in the reward)."""
    trainer = Trainer(tiny_config(tmp_path, iterations=4, checkpoint_every=1))
    run_iteration = trainer.train_iteration

    def poisoned_second_iteration():
        hooks = [p.register_hook(lambda grad: grad * float("nan")) for p in trainer.trainable.values()] \
            if trainer.iteration == 1 else []
        try:
            return run_iteration()
        finally:
            for hook in hooks:
                hook.remove()

    trainer.train_iteration = poisoned_second_iteration
    with pytest.raises(FloatingPointError, match="training diverged at iteration 2: .*grad_norm"):
        trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and _finite(rows[0]) and math.isnan(rows[1]["grad_norm"])
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter-000001", "latest"]
    assert Trainer(tiny_config(tmp_path, iterations=4, resume_from="latest")).iteration == 1


def test_pruning_keeps_this_runs_checkpoints_not_an_older_runs_higher_ones(tmp_path):
    old = tmp_path / "run" / "checkpoints"
    Trainer(tiny_config(tmp_path, iterations=6, checkpoint_every=2)).train()  # iter 2, 4, 6
    (old / "iter-000002").rename(old / "old-iter-2")  # keep only the old run's higher ones
    Trainer(tiny_config(tmp_path, iterations=3, checkpoint_every=1, keep_checkpoints=2)).train()  # a fresh run
    names = sorted(p.name for p in old.iterdir())
    assert {"iter-000002", "iter-000003"} <= set(names) and (old / "latest").read_text().strip() == "iter-000003"


def test_learning_rate_warms_up_then_follows_the_cosine(tmp_path):
    config = tiny_config(tmp_path, iterations=6, learning_rate=1e-3, lr_min=1e-4, lr_warmup_iterations=2,
                         lr_schedule="cosine")
    history = Trainer(config).train()
    expected = [5e-4, 1e-3, 1e-3, 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi / 4)), 5.5e-4,
                1e-4 + 9e-4 * 0.5 * (1 + math.cos(3 * math.pi / 4))]
    assert [r["lr"] for r in history] == pytest.approx(expected, rel=1e-12)
    constant = tiny_config(tmp_path, iterations=3, learning_rate=2e-4)
    assert [constant.learning_rate_at(i) for i in range(3)] == [2e-4] * 3
    with pytest.raises(ValueError, match="lr_schedule"):
        tiny_config(tmp_path, lr_schedule="linear").validate()


def test_checkpoint_layout_is_complete(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, iterations=1, ema_decay=0.5))
    trainer.train()
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "iter-000001"
    files = sorted(p.name for p in (root / "iter-000001").iterdir())
    assert files == ["ema.safetensors", "optimizer.pt", "state.pt", "weights.safetensors"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_kl_is_zero_before_the_first_update_and_positive_after(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, beta=0.1, learning_rate=1e-2, gradient_accumulation_steps=1))
    first = trainer.train_iteration()
    assert first["kl"] > 0  # several optimizer steps happen within the iteration
    batch = rollout(trainer.guided, ["1", "2"], 3, trainer.steps, sde_type="sde", logprob="gaussian",
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trainer.model.transformer.load_state_dict(trainer.reference_transformer.state_dict())
    _, record = trainer.step_loss(batch, torch.zeros(6, 4), trainer.steps.trained[0], slice(None))
    assert record[4].item() == 0.0


def test_lora_trains_only_adapters_and_uses_them_for_kl(tmp_path):
    pytest.importorskip("peft")
    lora = dict(use_lora=True, lora_rank=4, lora_alpha=8.0, beta=0.1, learning_rate=1e-2, gradient_accumulation_steps=1)
    trainer = Trainer(tiny_config(tmp_path, **lora))
    assert trainer.trainable and all("lora_" in name for name in trainer.trainable)
    frozen = {n: p.detach().clone() for n, p in trainer.model.transformer.named_parameters() if "lora_" not in n}
    record = trainer.train_iteration()
    assert _finite(record) and record["kl"] > 0
    for n, p in trainer.model.transformer.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n]), n
    trainer.save_checkpoint()
    resumed = Trainer(tiny_config(tmp_path, resume_from="latest", **lora))
    for name, value in trainer.trainable.items():
        assert torch.equal(value, resumed.trainable[name])


def test_bf16_mixed_precision_runs(tmp_path):
    record = Trainer(tiny_config(tmp_path, mixed_precision="bf16")).train_iteration()
    assert _finite(record) and record["ratio_mean"] == 1.0


def test_prompts_are_a_deterministic_function_of_seed_and_iteration(tmp_path):
    a, b = Trainer(tiny_config(tmp_path)), Trainer(tiny_config(tmp_path))
    assert [a.prompts_for(i) for i in range(5)] == [b.prompts_for(i) for i in range(5)]
    assert len(set(a.prompts_for(0))) == 2


@pytest.mark.parametrize("overrides,message", [
    ({"mode": "grpo"}, "mode must be one of"),
    ({"group_size": 1}, "group_size must be >= 2"),
    ({"sde_type": "euler"}, "sde_type must be one of"),
    ({"train_batch_size": 100}, "train_batch_size must be in"),
    ({"mode": "flow_grpo", "advantage_normalize": "per_step"}, "stepwise modes only"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"noise_level": 0.0}, "noise_level must be a finite number > 0"),
    ({"noise_level": float("inf")}, "noise_level must be a finite number > 0"),
    ({"train_step_fraction": 0.0}, "train_step_fraction must be in"),
    ({"eval_batch_size": 0}, "eval_batch_size must be >= 1"),
    ({"eval_every": 1, "eval_prompts": " , "}, "eval prompts are empty"),
    ({"seed": 2**45}, "seed must be in"),
    ({"cfg_gradient": "uncond"}, "cfg_gradient must be"),
    ({"initial_noise": "per_group"}, "initial_noise must be"),
    ({"rollout_batch_size": 0}, "rollout_batch_size must be"),
    ({"use_lora": True, "lora_alpha": 0.0}, "lora_alpha must be a finite number > 0"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number > 0"),
    # values that used to pass validation and fail (or silently diverge) inside the run
    ({"learning_rate": float("inf")}, "learning_rate must be a finite number > 0"),
    ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number >= 1"),
    ({"eval_guidance_scale": float("inf")}, "eval_guidance_scale must be a finite number >= 1"),
    ({"beta": float("inf")}, "beta must be a finite number >= 0"),
    ({"shift": 0.0}, "shift must be a finite number > 0"),
    ({"shift": float("nan")}, "shift must be a finite number > 0"),
    ({"threads": 0}, "threads must be >= 1"),
    ({"advantage_eps": -1.0}, "advantage_eps must be a finite number >= 0"),
    ({"advantage_eps": float("inf")}, "advantage_eps must be a finite number >= 0"),
    ({"advantage_clip": 0.0}, "advantage_clip must be > 0"),
    ({"advantage_clip": float("nan")}, "advantage_clip must be > 0"),
    ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
    ({"adam_beta1": 1.5}, "adam_beta1 and adam_beta2 must be in"),
    ({"adam_beta2": -0.1}, "adam_beta1 and adam_beta2 must be in"),
    ({"adam_eps": float("nan")}, "adam_eps must be a finite number >= 0"),
    ({"max_sequence_length": 0}, "max_sequence_length must be >= 1"),
    ({"embedded_guidance_scale": float("nan")}, "embedded_guidance_scale must be a finite number"),
    ({"distributed_timeout_minutes": float("inf")}, "distributed_timeout_minutes must be a finite number > 0"),
    ({"lr_schedule": "cosine", "lr_warmup_iterations": 5, "lr_decay_iterations": 5}, "must come after the warm-up"),
    # nothing to train: ddim's first step (from t = 1) has no noise, the last one is not trained
    ({"sde_type": "ddim", "num_steps": 2}, "no trainable step"),
    ({"sde_type": "cps", "noise_level": 1.2}, r"noise_level must be in \(0, 1\] for sde_type cps"),
    ({"sde_type": "ddim", "noise_level": 3.0}, r"noise_level 3.0 does not fit 'ddim' at step 1 .* must be in \[0, t'\]"),
])
def test_bad_configs_fail_clearly(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **overrides).validate()  # before any backbone loads
    with pytest.raises(ValueError, match=message):
        Trainer(tiny_config(tmp_path, **overrides))


@pytest.mark.parametrize("overrides", [{"sde_type": "ddim", "num_steps": 3}, {"sde_type": "cps", "num_steps": 2},
                                       {"sde_type": "sde", "num_steps": 2}])
def test_schedules_with_one_trainable_step_pass_the_config_check(tmp_path, overrides):
    trainer = Trainer(tiny_config(tmp_path, **overrides))
    assert len(trainer.steps.trained) >= 1


def test_unknown_config_fields_and_files(tmp_path):
    with pytest.raises(ValueError, match="unknown field"):
        TrainerConfig.from_dict({"learning_rat": 1.0})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"group_size": 5, "mode": "flow_grpo"}))
    config = TrainerConfig.from_file(path, group_size=7)
    assert config.group_size == 7 and config.mode == "flow_grpo"


def nan_reward(images, prompts):
    return torch.full((images.shape[0],), float("nan"))


def short_reward(images, prompts):
    return torch.zeros(images.shape[0] - 1)


@pytest.mark.parametrize("reward,message", [
    (nan_reward, "NaN or inf"),
    (short_reward, "one score per image"),
    (lambda images, prompts: "bad", "not numbers"),
])
def test_bad_reward_functions_fail_clearly(tmp_path, reward, message):
    trainer = Trainer(tiny_config(tmp_path), reward=reward)
    with pytest.raises(RewardError, match=message):
        trainer.train_iteration()


def test_no_host_sync_in_the_update(tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    batch = rollout(trainer.guided, ["1", "2"], 3, trainer.steps, sde_type="sde", logprob="gaussian",
                    generator=torch.Generator().manual_seed(0))
    advantages = torch.randn(6, 4)

    import inspect

    original_item, original_tolist = torch.Tensor.item, torch.Tensor.tolist

    def guard(original):
        def forbidden(*args, **kwargs):
            # torch's own AdamW reads its CPU step counter; everything of ours stays on the device
            if "torch/optim" not in inspect.stack()[1].filename:
                raise AssertionError("host sync (.item/.tolist) inside the update")
            return original(*args, **kwargs)

        return forbidden

    torch.Tensor.item, torch.Tensor.tolist = guard(original_item), guard(original_tolist)
    try:
        records, grad_norms = trainer.update(batch, advantages)
    finally:
        torch.Tensor.item, torch.Tensor.tolist = original_item, original_tolist
    assert records.shape == (len(trainer.steps.trained), 5) and grad_norms.shape == (1,)


def test_select_rows_handles_tuples():
    cond = (torch.arange(6), torch.arange(12).reshape(6, 2))
    picked = select_rows(cond, torch.tensor([0, 5]))
    assert picked[0].tolist() == [0, 5] and picked[1].tolist() == [[0, 1], [10, 11]]


def test_plots_and_grids_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    trainer = Trainer(tiny_config(tmp_path, plots=True, iterations=2, image_every=1))
    trainer.train()
    run = tmp_path / "run"
    assert (run / "reward.png").stat().st_size > 0 and (run / "gains.png").stat().st_size > 0
    assert (run / "images" / "samples-iter000001.png").exists()
    assert (run / "images" / "estimates-iter000002.png").exists()


def test_grids_stay_small_for_real_size_images():
    # 512 px images are not upscaled (8 px digits are, to 64 px), and a grid holds at most 8 x 8
    from sfgrpo.trainer import artifacts

    big = artifacts.image_grid(torch.rand(1, 2, 3, 512, 512))
    assert big.shape == (1 * 513 + 1, 2 * 513 + 1, 3)
    digits = artifacts.image_grid(torch.rand(1, 1, 1, 8, 8))
    assert digits.shape == (65 + 1, 65 + 1, 3)
    rows = artifacts.rows_of(torch.rand(100, 3, 4, 4))
    assert rows.shape == (8, 8, 3, 4, 4)
    short = artifacts.rows_of(torch.zeros(10, 3, 4, 4))
    assert short.shape == (2, 8, 3, 4, 4) and torch.all(short[1, 2:] == 1)  # padded with white


def test_modes_share_rollouts_and_differ_only_in_credit(tmp_path):
    rewards = torch.tensor([[0.0, 0.1, 0.5, 0.6, 0.7], [0.0, 0.3, 0.2, 0.2, 0.4], [0.0, 0.0, 0.1, 0.1, 0.2],
                            [0.0, 0.2, 0.2, 0.5, 0.3], [0.0, 0.1, 0.1, 0.1, 0.1], [0.0, 0.4, 0.3, 0.2, 0.1]])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    by_mode = {m: Trainer(tiny_config(tmp_path / m, mode=m)).advantages(rewards, groups)
               for m in ("stepwise", "stepwise_per_step", "flow_grpo")}
    trained = torch.tensor([True, True, True, False])  # the last sde step is not trained
    for adv in by_mode.values():
        assert adv.shape == (6, 4) and torch.all(adv[:, ~trained] == 0)
    assert not torch.allclose(by_mode["stepwise"], by_mode["stepwise_per_step"])
    flow = by_mode["flow_grpo"][:, trained]
    assert torch.all(flow == flow[:, :1])  # one advantage per trajectory, the same at every step
    torch.testing.assert_close(by_mode["stepwise"], functional.gain_advantages(rewards, groups, step_mask=trained))


def test_resume_with_changed_settings_warns(tmp_path):
    Trainer(tiny_config(tmp_path, iterations=1)).train()
    with pytest.warns(UserWarning, match="changed settings"):
        Trainer(tiny_config(tmp_path, iterations=2, learning_rate=1.0, resume_from="latest"))


def test_extending_a_cosine_run_on_resume_warns_that_the_schedule_stretches(tmp_path):
    Trainer(tiny_config(tmp_path, iterations=2, lr_schedule="cosine")).train()
    with pytest.warns(UserWarning, match="schedule ends at `iterations`"):
        Trainer(tiny_config(tmp_path, iterations=4, lr_schedule="cosine", resume_from="latest"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fixed end (lr_decay_iterations) does not move: no warning
        Trainer(tiny_config(tmp_path / "fixed", iterations=2, lr_schedule="cosine", lr_decay_iterations=4)).train()
        Trainer(tiny_config(tmp_path / "fixed", iterations=4, lr_schedule="cosine", lr_decay_iterations=4,
                            resume_from="latest"))


def test_resume_of_an_older_checkpoint_names_the_settings_it_lacks(tmp_path):
    Trainer(tiny_config(tmp_path, iterations=1)).train()
    state_file = tmp_path / "run" / "checkpoints" / "iter-000001" / "state.pt"
    state = torch.load(state_file, weights_only=False)
    del state["config"]["initial_noise"]  # as written before the setting existed
    torch.save(state, state_file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(tiny_config(tmp_path, iterations=2, resume_from="latest"))
    messages = [str(w.message) for w in caught]
    assert any("older sfgrpo" in m and "initial_noise" in m for m in messages)
    assert not any("changed settings" in m for m in messages)


def test_resume_on_another_kind_of_device_warns_that_noise_differs(tmp_path):
    Trainer(tiny_config(tmp_path, iterations=1)).train()
    state_file = tmp_path / "run" / "checkpoints" / "iter-000001" / "state.pt"
    state = torch.load(state_file, weights_only=False)
    state["config"]["device"] = "cuda:1"  # as a GPU run writes it
    torch.save(state, state_file)
    with pytest.warns(RuntimeWarning, match="a cuda run, on cpu: rollout noise"):
        Trainer(tiny_config(tmp_path, iterations=2, resume_from="latest"))
    state["config"]["device"] = "cpu"
    torch.save(state, state_file)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(tiny_config(tmp_path, iterations=2, resume_from="latest"))


def test_chunked_lookahead_matches_the_single_batch(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, lookahead_steps=3, guidance_scale=2.0))
    batch = rollout(trainer.guided, ["1", "2"], 3, trainer.steps, sde_type="sde", logprob="gaussian",
                    generator=torch.Generator().manual_seed(0))
    from sfgrpo.trainer.rollout import clean_estimates

    whole = clean_estimates(trainer.guided, batch, trainer.steps, 3)
    chunked = clean_estimates(trainer.guided, batch, trainer.steps, 3, batch_size=5)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_yaml_config(tmp_path):
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"mode": "stepwise_per_step", "lookahead_steps": 2}))
    config = TrainerConfig.from_file(path)
    assert config.normalize == "per_step" and config.lookahead_steps == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("overrides", [dict(mode="stepwise", guidance_scale=2.0), dict(mode="flow_grpo", beta=0.04),
                                       # CFG: the stored, then recomputed, unconditional velocity
                                       dict(mode="stepwise", train_batch_size=3, mixed_precision="bf16",
                                            guidance_scale=2.0, gradient_accumulation_steps=2),
                                       dict(mode="stepwise", mixed_precision="fp16")])
def test_cuda_iterations_run_and_the_update_never_syncs(tmp_path, overrides):
    # every config also evaluates once, with EMA weights (the ODE protocol on CUDA)
    trainer = Trainer(tiny_config(tmp_path, device="cuda", eval_num_steps=3, ema_decay=0.5, **overrides))
    record = trainer.evaluate()
    assert _finite(record)
    first = trainer.train_iteration()  # warm-up: kernels compiled, caches filled
    update = trainer.update

    def update_without_syncs(*args):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return update(*args)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    trainer.update = update_without_syncs
    second = trainer.train_iteration()
    assert _finite(first) and _finite(second)
    if "train_batch_size" not in overrides:  # every forward before the one optimizer step is on-policy
        assert first["ratio_mean"] == 1.0 and second["ratio_mean"] == 1.0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_fp32_sde_math(tmp_path, precision):
    trainer = Trainer(tiny_config(tmp_path, mixed_precision=precision, iterations=3, learning_rate=3e-3))
    history = trainer.train()
    assert all(_finite(r) for r in history)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.trainable.values())
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":
        assert trainer.scaler.get_scale() > 0  # dynamic loss scaling ran (and may have backed off)


def test_fp16_with_fsdp_is_a_clear_config_error(tmp_path):
    with pytest.raises(ValueError, match="fp16 is not supported with distributed=fsdp"):
        tiny_config(tmp_path, mixed_precision="fp16", distributed="fsdp").validate()


def test_compiled_backbone_trains_like_the_eager_one(tmp_path):
    eager = Trainer(tiny_config(tmp_path / "eager", iterations=2)).train()
    trainer = Trainer(tiny_config(tmp_path / "compiled", iterations=2, compile_backbone=True))
    compiled = trainer.train()
    assert "forward" in vars(trainer.model.transformer)  # the instance's forward is the compiled one
    for a, b in zip(eager, compiled):  # inductor's fused kernels round differently: close, not equal
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-3)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3)


class _FakeWriter:
    """Stands for torch.utils.tensorboard.SummaryWriter (tensorboard is not a dependency)."""

    instances = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _FakeWriter.instances.append(self)

    def add_text(self, tag, text, step):
        self.text = text

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_image(self, tag, image, step, dataformats):
        self.images = getattr(self, "images", []) + [(tag, image.shape, step, dataformats)]

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_metrics_reach_tensorboard_and_wandb(tmp_path, monkeypatch):
    import importlib.machinery
    import sys
    import types

    fake_tb = types.ModuleType("torch.utils.tensorboard")
    fake_tb.__spec__ = importlib.machinery.ModuleSpec("torch.utils.tensorboard", None)
    fake_tb.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_tb)
    runs = []

    class FakeRun:
        def __init__(self, **kwargs):
            self.kwargs, self.logged, self.finished = kwargs, [], False
            runs.append(self)

        def log(self, values, step):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    fake_wandb = types.ModuleType("wandb")
    fake_wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # others probe it with find_spec
    fake_wandb.init = lambda **kw: FakeRun(**kw)
    fake_wandb.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    fake_wandb.Image = lambda array: ("image", array.shape)
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    _FakeWriter.instances.clear()
    config = tiny_config(tmp_path, iterations=2, eval_every=2, eval_num_steps=3, report_to="tensorboard,wandb",
                         run_name="tiny", checkpoint_every=1)
    Trainer(config).train()
    writer, run = _FakeWriter.instances[-1], runs[-1]
    assert writer.closed and run.finished
    assert writer.log_dir.endswith("tensorboard") and run.kwargs["id"] == "abc123" and run.kwargs["name"] == "tiny"
    tags = {(tag, step) for tag, _, step in writer.scalars}
    assert {("train/reward_mean", 1), ("train/reward_mean", 2), ("eval/eval_reward_mean", 0),
            ("eval/eval_reward_mean", 2), ("time/update", 1), ("train/reward_by_step/0", 1)} <= tags
    # eval scalars + grid at 0 and 2; the final training grids (samples, clean estimates) at 2
    assert [step for step, _ in run.logged] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert [(tag, step, fmt) for tag, _, step, fmt in writer.images] == [
        ("eval/samples", 0, "HWC"), ("eval/samples", 2, "HWC"), ("train/samples", 2, "HWC"),
        ("train/estimates", 2, "HWC")]
    assert run.logged[1][1]["eval/samples"][0] == "image"
    # a resumed run logs to the same W&B run
    Trainer(tiny_config(tmp_path, iterations=3, report_to="wandb", resume_from="latest")).train()
    assert runs[-1].kwargs["id"] == "abc123" and runs[-1].kwargs["resume"] == "allow"


def test_report_to_needs_the_tracker_installed(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(ImportError, match="pip install wandb"):
        Trainer(tiny_config(tmp_path, report_to="wandb")).train()
    with pytest.raises(ValueError, match="unknown tracker"):
        tiny_config(tmp_path, report_to="mlflow").validate()
