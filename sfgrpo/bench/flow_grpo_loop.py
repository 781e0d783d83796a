"""`sfgrpo bench`'s `flow_grpo-code` implementation: the trainer's loop with Flow-GRPO's own
formulation of its two numerical pieces (sfgrpo/bench/flow_grpo_code.py) swapped in, everything
else plain PyTorch (SFGRPO_BACKEND=reference):

- every SDE step looks its sigmas up by timestep with one device->host sync per row, computes the
  step in ~10-14 separate ops, and the KL by a second call with the reference velocity;
- advantages come from the per-prompt numpy loop, after copying the rewards to the host;
- with CFG, the update runs Flow-GRPO's `compute_log_prob`: one batched forward with autograd over
  both branches, the unconditional half detached afterwards (the same gradient as sfgrpo's
  `cfg_gradient="cond"`, which reuses the rollout's unconditional velocity while the weights are
  the rollout's and otherwise recomputes it without autograd).

What is timed is the cost of those formulations inside a whole iteration, not their numbers (the
step uses Flow-GRPO's log-prob convention and draws its noise itself).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from sfgrpo import functional
from sfgrpo.bench import flow_grpo_code as fg
from sfgrpo.trainer.rollout import concat_rows


def _to_host(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


@contextlib.contextmanager
def flow_grpo_code(trainer):
    """Swaps Flow-GRPO's step and advantages into `sfgrpo.functional` while the block runs (the
    trainer calls them through that module)."""
    steps = trainer.steps
    sigmas = torch.tensor(steps.t + [steps.t_next[-1]], dtype=torch.float32, device=trainer.device)
    timesteps = sigmas[:-1] * 1000
    original = {name: getattr(functional, name) for name in ("sde_step", "gain_advantages", "group_advantages")}

    def sde_step(x, v, t, t_next, noise_level=0.7, *, sde_type="sde", prev_sample=None, v_ref=None, **options):
        if sde_type not in ("sde", "cps") or not isinstance(t, float):
            return original["sde_step"](x, v, t, t_next, noise_level, sde_type=sde_type, prev_sample=prev_sample,
                                        v_ref=v_ref, **options)
        timestep = torch.full((x.shape[0],), t * 1000, dtype=torch.float32, device=x.device)
        sample, log_prob, mean, std_dev_t = fg.sde_step_with_logprob(
            sigmas, timesteps, v, timestep, x, noise_level, prev_sample=prev_sample, sde_type=sde_type)
        kl = None
        if v_ref is not None:
            _, _, mean_ref, _ = fg.sde_step_with_logprob(
                sigmas, timesteps, v_ref, timestep, x, noise_level, prev_sample=sample, sde_type=sde_type)
            kl = fg.kl_to_reference(mean, mean_ref, std_dev_t).reshape(-1)
        std = std_dev_t.reshape(-1)
        return functional.StepResult(prev_sample=sample.to(x.dtype), log_prob=log_prob, std=std, std_dev_t=std,
                                     mean=mean, x0_hat=None, x1_hat=None, kl=kl)

    def group_advantages(rewards, group_ids, *, std="group", eps=1e-4, clip=None, **_):
        advantages = fg.per_prompt_advantages(_to_host(rewards), group_ids.cpu().numpy(), std == "global", eps)
        if clip is not None:
            advantages = np.clip(advantages, -clip, clip)
        return torch.from_numpy(advantages).to(rewards.device, rewards.dtype)

    def gain_advantages(rewards, group_ids, *, normalize="joint", eps=1e-8, clip=None, step_mask=None, **_):
        # the same per-prompt loop over the gains of the trained steps, pooled per prompt (joint)
        gains = _to_host(rewards[:, 1:] - rewards[:, :-1])
        trained = np.ones(gains.shape[1], bool) if step_mask is None else step_mask.cpu().numpy()
        ids = group_ids.cpu().numpy()
        advantages = np.zeros_like(gains)
        for prompt in np.unique(ids):
            mask = ids == prompt
            block = gains[mask][:, trained]
            if normalize == "joint":
                scaled = (block - block.mean()) / (block.std() + eps)
            else:
                scaled = (block - block.mean(axis=0)) / (block.std(axis=0) + eps)
            advantages[np.ix_(mask, trained)] = scaled
        if clip is not None:
            advantages = np.clip(advantages, -clip, clip)
        return torch.from_numpy(advantages).to(rewards.device, rewards.dtype)

    guided = trainer.guided

    def with_constant_uncond(x, t, cond, null_cond, v_uncond=None):  # Flow-GRPO's compute_log_prob, train.cfg
        if guided.guidance_scale == 1.0:
            return guided(x, t, cond, null_cond)
        with guided.autocast():
            both = guided.model.velocity(torch.cat([x, x]), torch.cat([t, t]), concat_rows(null_cond, cond)).float()
        v_uncond, v_cond = both.chunk(2)
        return guided.combine(v_cond, v_uncond.detach())

    replacements = {"sde_step": sde_step, "gain_advantages": gain_advantages, "group_advantages": group_advantages}
    patched_update = vars(guided).get("with_constant_uncond")  # an enclosing block's, if any
    keep_uncond = trainer.keep_rollout_uncond
    try:
        for name, function in replacements.items():
            setattr(functional, name, function)
        guided.with_constant_uncond = with_constant_uncond
        trainer.keep_rollout_uncond = False  # its rollout: one batched forward
        yield
    finally:
        for name, function in original.items():
            setattr(functional, name, function)
        if patched_update is None:
            vars(guided).pop("with_constant_uncond", None)
        else:
            guided.with_constant_uncond = patched_update
        trainer.keep_rollout_uncond = keep_uncond
