"""Flow-GRPO's SDE step as its public code formulates it (SPEC §7), re-written from the SPEC for
benchmarking: per-row sigma lookup by exact timestep match (one device->host sync per row via
`.item()`-style indexing), then ~10-14 separate full-size PyTorch ops, and the KL from a second
call with the reference velocity; and its per-prompt advantage loop (numpy masks on the host).
Baselines for the benchmarks (benchmarks/*.py) and for `sfgrpo bench`'s `flow_grpo-code`
implementation (sfgrpo/bench/flow_grpo_loop.py)."""

from __future__ import annotations

import math

import numpy as np
import torch


def _index_for_timestep(timesteps: torch.Tensor, timestep: torch.Tensor) -> int:
    # diffusers' rule: the second match if there are two; `.item()` syncs with the device
    matches = (timesteps == timestep).nonzero()
    pos = 1 if len(matches) > 1 else 0
    return int(matches[pos].item())


def sde_step_with_logprob(sigmas, timesteps, model_output, timestep, sample, noise_level=0.7, prev_sample=None,
                          generator=None, sde_type="sde"):
    model_output = model_output.float()
    sample = sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()
    step_index = [_index_for_timestep(timesteps, t) for t in timestep]
    prev_step_index = [step + 1 for step in step_index]
    shape = (-1,) + (1,) * (sample.ndim - 1)
    sigma = sigmas[step_index].view(shape)
    sigma_prev = sigmas[prev_step_index].view(shape)
    sigma_max = sigmas[1].item()
    dt = sigma_prev - sigma
    if sde_type == "sde":
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        prev_sample_mean = (sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
                            + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt)
        if prev_sample is None:
            noise = torch.randn(model_output.shape, generator=generator, device=model_output.device,
                                dtype=model_output.dtype)
            prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * noise
        log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                    - torch.log(std_dev_t * torch.sqrt(-1 * dt)) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    elif sde_type == "cps":
        std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
        pred_original_sample = sample - sigma * model_output
        noise_estimate = sample + model_output * (1 - sigma)
        prev_sample_mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * torch.sqrt(sigma_prev**2 - std_dev_t**2)
        if prev_sample is None:
            noise = torch.randn(model_output.shape, generator=generator, device=model_output.device,
                                dtype=model_output.dtype)
            prev_sample = prev_sample_mean + std_dev_t * noise
        log_prob = -((prev_sample.detach() - prev_sample_mean) ** 2)
    else:
        raise ValueError(sde_type)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def kl_to_reference(prev_sample_mean, prev_sample_mean_ref, std_dev_t):
    dims = tuple(range(1, prev_sample_mean.ndim))
    return ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=dims, keepdim=True) / (2 * std_dev_t**2)


def per_prompt_advantages(rewards: np.ndarray, prompt_ids: np.ndarray, global_std: bool, eps: float = 1e-4) -> np.ndarray:
    """Flow-GRPO's PerPromptStatTracker.update ('grpo'): one boolean mask over the batch per prompt
    (O(N x prompts)), per-prompt mean, the prompt's std or the batch's, float64."""
    advantages = np.zeros_like(rewards, dtype=np.float64)
    for prompt in np.unique(prompt_ids):
        mask = prompt_ids == prompt
        group = rewards[mask]
        std = rewards.std(axis=0) if global_std else group.std(axis=0)
        advantages[mask] = (group - group.mean(axis=0)) / (std + eps)
    return advantages
