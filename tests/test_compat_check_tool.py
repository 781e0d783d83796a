"""`python -m sfgrpo.compat.check_flow_grpo` against a stand-in Flow-GRPO checkout written here.

The stand-in's step is Flow-GRPO's formulation as `sfgrpo.bench.flow_grpo_code` writes it from the
SPEC (independent of the fused op), its tracker the SPEC's formula, its pipeline a denoising loop
that imports the step by name like Flow-GRPO's does. A deliberately wrong stand-in must fail.
"""

import sys
import textwrap

import pytest

from sfgrpo.compat import check_flow_grpo

STEP = '''
import torch
from sfgrpo.bench import flow_grpo_code


def sde_step_with_logprob(self, model_output, timestep, sample, noise_level=0.7, prev_sample=None, generator=None,
                          sde_type="sde", return_sqrt_dt=False):
    out = flow_grpo_code.sde_step_with_logprob(self.sigmas, self.timesteps, model_output, timestep, sample,
                                               noise_level, prev_sample, generator, sde_type)
    {mutation}
    if return_sqrt_dt:
        index = [int((self.timesteps == t).nonzero()[0]) for t in timestep]
        dt = self.sigmas[[i + 1 for i in index]] - self.sigmas[index]
        return out + (torch.sqrt(-dt).view(out[3].shape),)
    return out
'''

TRACKER = '''
import numpy as np


class PerPromptStatTracker:
    def __init__(self, global_std=False):
        self.global_std, self.stats, self.history_prompts = global_std, {}, set()

    def update(self, prompts, rewards, type="grpo"):
        prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
        advantages = np.zeros_like(rewards)
        for prompt in np.unique(prompts):
            mine = rewards[prompts == prompt]
            self.stats.setdefault(prompt, []).extend(mine)
            self.history_prompts.add(hash(prompt))
            if type == "rwr":
                advantages[prompts == prompt] = mine
            elif type == "sft":
                advantages[prompts == prompt] = (mine == mine.max()).astype(np.float64)
            elif type == "dpo":
                best, worst = int(np.argmax(mine)), int(np.argmin(mine))
                best, worst = (1, 0) if best == worst else (best, worst)
                result = np.zeros_like(mine)
                result[best], result[worst] = 1.0, -1.0
                advantages[prompts == prompt] = result
            else:
                history = np.stack(self.stats[prompt])
                std = (rewards if self.global_std else history).std(axis=0, keepdims=True) + 1e-4
                advantages[prompts == prompt] = (mine - history.mean(axis=0, keepdims=True)) / std
        return advantages

    def get_stats(self):
        return (sum(len(v) for v in self.stats.values()) / len(self.stats) if self.stats else 0,
                len(self.history_prompts))

    def clear(self):
        self.stats = {}
'''

PIPELINE = '''
import torch
from .sd3_sde_with_logprob import sde_step_with_logprob


@torch.no_grad()
def pipeline_with_logprob(self, prompt, num_inference_steps=10, guidance_scale=4.5, height=32, width=32,
                          num_images_per_prompt=1, generator=None, output_type="latent", noise_level=0.7):
    embeds, negative, pooled, negative_pooled = self.encode_prompt(
        prompt, prompt, prompt, num_images_per_prompt=num_images_per_prompt)
    embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
    latents = torch.randn(embeds.shape[0] // 2, self.transformer.config.in_channels, height // 8, width // 8,
                          generator=generator)
    self.scheduler.set_timesteps(num_inference_steps)
    all_latents, all_log_probs = [latents], []
    for t in self.scheduler.timesteps:
        both = self.transformer(hidden_states=torch.cat([latents] * 2), timestep=t.expand(embeds.shape[0]),
                                encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        uncond, cond = both.chunk(2)
        velocity = uncond + guidance_scale * (cond - uncond)
        latents, log_prob, _, _ = sde_step_with_logprob(self.scheduler, velocity.float(), t.unsqueeze(0), latents.float(),
                                                        noise_level=noise_level)
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    return latents, all_latents, all_log_probs
'''


def _checkout(root, mutation="pass"):
    package = root / "flow_grpo"
    (package / "diffusers_patch").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "diffusers_patch" / "__init__.py").write_text("")
    (package / "diffusers_patch" / "sd3_sde_with_logprob.py").write_text(textwrap.dedent(STEP).replace("{mutation}", mutation))
    (package / "diffusers_patch" / "sd3_pipeline_with_logprob.py").write_text(PIPELINE)
    (package / "stat_tracking.py").write_text(TRACKER)
    return str(root)


@pytest.fixture(autouse=True)
def _forget_flow_grpo(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in [m for m in sys.modules if m == "flow_grpo" or m.startswith("flow_grpo.")]:
        del sys.modules[name]


def test_a_faithful_checkout_is_verified(tmp_path, capsys):
    assert check_flow_grpo.main([_checkout(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert "drop-in verified" in report and "MISMATCH" not in report
    for line in ("cps float32 score log_prob", "sde bfloat16 score d log_prob / d v", "sde float32 sample sqrt(-dt)",
                 "tracker grpo global_std=True rewards=[N, K]", "pipeline log-probs, every step"):
        assert line in report
    assert "pipeline_with_logprob (tiny SD3" in report


def test_a_checkout_that_computes_something_else_fails(tmp_path, capsys):
    # a fork whose cps log-prob divides by 2 s^2 (the exact density): not what sfgrpo's compat computes
    mutation = ("if sde_type == 'cps':\n        std = out[3].clamp_min(1e-12)\n"
                "        out = (out[0], out[1] / (2 * std.flatten() ** 2), out[2], out[3])")
    assert check_flow_grpo.main([_checkout(tmp_path, mutation), "--no-pipeline"]) == 1
    report = capsys.readouterr().out
    mismatched = [line for line in report.splitlines() if line.endswith("MISMATCH")]
    assert mismatched and all(line.startswith("cps") and "log_prob" in line for line in mismatched)


def test_the_package_folder_works_too_and_a_wrong_folder_is_a_clear_error(tmp_path, capsys):
    _checkout(tmp_path / "repo")
    assert check_flow_grpo.main([str(tmp_path / "repo" / "flow_grpo"), "--no-pipeline"]) == 0
    with pytest.raises(SystemExit, match="no flow_grpo package"):
        check_flow_grpo.main([str(tmp_path), "--no-pipeline"])


def test_relative_error_counts_one_sided_non_finite_values():
    import torch

    assert check_flow_grpo.relative_error(torch.tensor([1.0, 0.0]), torch.tensor([1.0, float("nan")])) == float("inf")
    assert check_flow_grpo.relative_error(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("nan")])) == 0.0
    assert check_flow_grpo.relative_error(torch.tensor([float("nan")]), torch.tensor([float("-inf")])) == float("inf")
    assert check_flow_grpo.relative_error(torch.tensor([float("inf")]), torch.tensor([float("-inf")])) == float("inf")
    assert not check_flow_grpo.Comparison("x", float("nan"), 1.0).ok
