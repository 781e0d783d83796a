"""Evaluation: deterministic samples of fixed prompts from fixed noise, scored by the run's reward.

Flow-GRPO's protocol (SPEC §5): 40 sampling steps without noise (the ODE), the training prompts or
a test set. The initial noise of eval sample j is a function of (seed, j) only, and the ODE adds
none, so two evaluations differ only through the weights: the curve measures learning, not
sampling luck. With EMA enabled the EMA weights are evaluated (as Flow-GRPO does).

Under data parallelism each rank samples a contiguous share of the eval set and the rewards are
gathered; every rank makes the same number of network calls (a rank with nothing left in a chunk
runs a padding sample and drops it), because FSDP's forwards are collectives.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from sfgrpo import distributed, functional
from sfgrpo.models.pipelines import sampling_sigmas
from sfgrpo.trainer.rollout import GuidedModel

# the eval noise stream's "iteration": never one a training rollout uses (those count from 0)
EVAL_NOISE_ITERATION = -1
EVAL_GRID_IMAGES = 64  # images kept for the eval grid (an eval set may hold thousands)


def eval_prompts(config) -> list[str]:
    """One entry per eval sample: the eval prompts (`eval_prompts`, `eval_prompt_file`, else the
    training prompts), each
    `eval_samples_per_prompt` times in a row."""
    if config.eval_prompts:
        prompts = [p.strip() for p in config.eval_prompts.split(",") if p.strip()]
    elif config.eval_prompt_file:
        from sfgrpo.models.prompts import read_prompt_file

        prompts = read_prompt_file(config.eval_prompt_file)
    else:
        prompts = config.prompt_list
    return [p for p in prompts for _ in range(config.eval_samples_per_prompt)]


def eval_sigmas(model, config) -> list[float]:
    """The sampling grid with `eval_num_steps` steps (the run's schedule otherwise)."""
    return sampling_sigmas(model, dataclasses.replace(config, num_steps=config.eval_num_steps)).tolist()


@torch.no_grad()
def evaluate(trainer) -> tuple[dict, Tensor | None]:
    """({"iteration", "eval_reward_mean", "eval_reward_std"[, "eval_class_accuracy"]}, the first
    EVAL_GRID_IMAGES eval images of rank 0 (on the CPU; None on other ranks)). Every rank must call
    it: the rewards of every rank are gathered."""
    cfg, model, dist = trainer.config, trainer.model, trainer.dist
    prompts = eval_prompts(cfg)
    rows = list(distributed.shard_rows(len(prompts), dist.rank, dist.world_size))
    per_rank = math.ceil(len(prompts) / dist.world_size)  # the largest share: every rank runs as many chunks
    chunk = cfg.eval_batch_size
    sigmas = eval_sigmas(model, cfg)
    guidance = cfg.guidance_scale if cfg.eval_guidance_scale is None else cfg.eval_guidance_scale
    guided = GuidedModel(model, guidance, trainer.guided.autocast_dtype)
    noise = distributed.TrajectoryNoise(cfg.seed, EVAL_NOISE_ITERATION, trainer.device)
    rewards, accuracy, images = [], [], []
    with trainer.ema_weights():
        for start in range(0, per_rank, chunk):
            chunk_rows = rows[start:start + chunk]
            padding = not chunk_rows
            if padding:  # keeps this rank's network calls in step with the others'
                chunk_rows = [0]
            x = noise.initial(chunk_rows, model.latent_shape).to(trainer.device)
            texts = [prompts[r] for r in chunk_rows]
            cond, null_cond = model.encode_prompts(texts), model.null_condition(len(chunk_rows))
            for k in range(len(sigmas) - 1):
                t_row = torch.full((x.shape[0],), sigmas[k], device=x.device)
                v = guided(x, t_row, cond, null_cond)
                x = functional.sde_step(x, v, sigmas[k], sigmas[k + 1], 0.0, sde_type="ode").prev_sample
            if padding:
                continue
            decoded = model.decode(x)
            rewards.append(trainer.reward(decoded, texts).float())
            if trainer.monitor is not None:
                accuracy.append(trainer.monitor(decoded, texts).float())
            if dist.is_main and sum(len(i) for i in images) < EVAL_GRID_IMAGES:  # only the grid's, on the CPU
                images.append(decoded[:EVAL_GRID_IMAGES].float().cpu())
    distributed.reshard(model.transformer)  # FSDP: back to sharded parameters (no backward followed)
    local = torch.cat(rewards) if rewards else torch.zeros(0, device=trainer.device)
    scores = distributed.gather_rows(local)
    record = {"iteration": trainer.iteration, "eval_reward_mean": float(scores.mean()),
              "eval_reward_std": float(scores.std(unbiased=False))}
    if trainer.monitor is not None:
        local_accuracy = torch.cat(accuracy) if accuracy else torch.zeros(0, device=trainer.device)
        record["eval_class_accuracy"] = float(distributed.gather_rows(local_accuracy).mean())
    return record, (torch.cat(images) if images and dist.is_main else None)
