"""Checks the drop-in against a Flow-GRPO checkout: runs its own code and sfgrpo's side by side.

    python -m sfgrpo.compat.check_flow_grpo /path/to/flow_grpo [--device cuda]

For users who trained with Flow-GRPO (or a fork of it) before switching: imports `flow_grpo` from
the given checkout and compares, on the same inputs,
- its `sde_step_with_logprob` with `sfgrpo.compat.flow_grpo.sde_step_with_logprob`: every step of
  10- and 40-step SD3 schedules, each step type its signature offers (`sde`, `cps`), fp32 and bf16
  inputs, sampling with the same generator and scoring another stored sample (what training does
  after an update), and the gradient of the log-prob with respect to the velocity;
- its `PerPromptStatTracker` with sfgrpo's (`grpo` with and without `global_std`, `[N]` and
  `[N, K]` rewards, `rwr`, `sft`, `dpo`);
- its `pipeline_with_logprob` on a tiny random SD3 pipeline, unpatched and after
  `sfgrpo.compat.flow_grpo.patch()`, from the same seeds (latents and log-probs of every step).

Prints the largest error of each comparison and exits with 1 if any exceeds its tolerance.
Relative errors are `|ours - theirs| / (1 + |theirs|)` in float64; a non-finite value on one side
only counts as a failure, except where sfgrpo documents the difference (an `sde` row with noise
level 0: Flow-GRPO's NaN/-inf, sfgrpo's 0), which never occurs in these inputs.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# the gradient with respect to a bf16 velocity is stored in bf16 by both: one bf16 ulp (2^-8) apart
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-5, "gradient float32": 1e-4, "gradient bfloat16": 2.0**-7,
             "tracker": 1e-12, "pipeline": 1e-4}


@dataclass
class Comparison:
    what: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance  # NaN fails


def relative_error(ours, theirs) -> float:
    a = torch.as_tensor(ours).detach().double().cpu()
    b = torch.as_tensor(theirs).detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    finite = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), finite):
        return float("inf")
    if not torch.equal(a[~finite].nan_to_num(0.5), b[~finite].nan_to_num(0.5)):
        return float("inf")  # the same non-finite values: NaN where NaN, +inf where +inf, -inf where -inf
    if not finite.any():
        return 0.0
    return float(((a - b).abs() / (1 + b.abs()))[finite].max())


def import_flow_grpo(checkout: str):
    """Flow-GRPO's modules from `checkout` (the folder holding the `flow_grpo` package, or that
    package itself)."""
    root = Path(checkout).resolve()
    if root.name == "flow_grpo" and not (root / "flow_grpo").is_dir() and (root / "__init__.py").exists():
        root = root.parent  # given the package folder itself
    if not (root / "flow_grpo").is_dir():
        raise SystemExit(f"no flow_grpo package in {checkout}: pass the folder of a Flow-GRPO checkout "
                         "(the one holding flow_grpo/)")
    sys.path.insert(0, str(root))
    for name in [m for m in sys.modules if m == "flow_grpo" or m.startswith("flow_grpo.")]:
        del sys.modules[name]  # a previously imported flow_grpo must not shadow the checkout
    step = importlib.import_module("flow_grpo.diffusers_patch.sd3_sde_with_logprob")
    tracker = importlib.import_module("flow_grpo.stat_tracking")
    try:
        pipeline = importlib.import_module("flow_grpo.diffusers_patch.sd3_pipeline_with_logprob")
    except ImportError as err:
        print(f"pipeline comparison skipped: {err}")
        pipeline = None
    return step, tracker, pipeline


def step_types(theirs) -> list[str]:
    return ["sde", "cps"] if "sde_type" in inspect.signature(theirs).parameters else ["sde"]


def compare_steps(theirs, device: str) -> list[Comparison]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sfgrpo.compat import flow_grpo as ours

    worst: dict[str, float] = {}
    tolerance: dict[str, float] = {}

    def record(key: str, error: float, tol: float) -> None:
        worst[key] = max(worst.get(key, 0.0), error) if error == error else float("nan")
        tolerance[key] = tol

    parameters = inspect.signature(theirs).parameters
    for steps in (10, 40):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(steps, device=device)
        for sde_type in step_types(theirs):
            level = 0.7 if sde_type == "sde" else 0.8
            extra = {"sde_type": sde_type} if "sde_type" in parameters else {}
            labels = ["prev_sample", "log_prob", "prev_sample_mean", "std_dev_t"]
            if "return_sqrt_dt" in parameters:
                extra["return_sqrt_dt"] = True
                labels.append("sqrt(-dt)")
            for dtype in (torch.float32, torch.bfloat16):
                name = str(dtype).removeprefix("torch.")
                for step in range(steps):
                    g = torch.Generator().manual_seed(1000 * steps + step)
                    x, v, stored = (torch.randn(4, 16, 8, 8, generator=g).to(device, dtype) for _ in range(3))
                    rows = [(step + r) % steps for r in range(4)] if step % 2 else [step] * 4  # mixed / one step
                    timestep = scheduler.timesteps[rows]
                    for mode in ("sample", "score"):
                        kw = dict(extra, noise_level=level)
                        if mode == "score":
                            kw["prev_sample"] = stored
                        outputs = []
                        for impl in (theirs, ours.sde_step_with_logprob):
                            generator = torch.Generator(device).manual_seed(step) if mode == "sample" else None
                            vg = v.detach().clone().requires_grad_(mode == "score")
                            out = impl(scheduler, vg, timestep, x, generator=generator, **kw)
                            grad = None
                            if mode == "score":
                                out[1].sum().backward()
                                grad = vg.grad
                            outputs.append((out, grad))
                        (a, grad_a), (b, grad_b) = outputs
                        for i, label in enumerate(labels):
                            record(f"{sde_type} {name} {mode} {label}", relative_error(b[i], a[i]), TOLERANCE[name])
                        if mode == "score":
                            scale = grad_a.double().abs().max().clamp_min(1e-30)
                            error = float((grad_b.double() - grad_a.double()).abs().max() / scale)
                            record(f"{sde_type} {name} score d log_prob / d v", error, TOLERANCE[f"gradient {name}"])
    return [Comparison(k, worst[k], tolerance[k]) for k in sorted(worst)]


def compare_trackers(theirs_module) -> list[Comparison]:
    from sfgrpo.compat import flow_grpo as ours

    rng = np.random.default_rng(0)
    results = []
    for global_std in (False, True):
        for columns in (None, 3):
            for kind in ("grpo", "rwr", "sft", "dpo"):
                if kind == "dpo" and columns is not None:
                    continue  # Flow-GRPO's dpo ranks one reward per sample
                theirs, mine = theirs_module.PerPromptStatTracker(global_std), ours.PerPromptStatTracker(global_std)
                prompts = rng.choice([f"prompt {i}" for i in range(7)], size=48)
                rewards = rng.normal(size=48 if columns is None else (48, columns))
                a = theirs.update(prompts, rewards, type=kind)
                b = mine.update(prompts, rewards, type=kind)
                error = relative_error(torch.from_numpy(np.asarray(b, np.float64)),
                                       torch.from_numpy(np.asarray(a, np.float64)))
                if theirs.get_stats() != mine.get_stats():
                    error = float("inf")
                label = f"tracker {kind} global_std={global_std} rewards={'[N]' if columns is None else '[N, K]'}"
                results.append(Comparison(label, error, TOLERANCE["tracker"]))
    return results


def compare_pipelines(pipeline_module, device: str) -> tuple[list[Comparison], str]:
    import tempfile

    from diffusers import StableDiffusion3Pipeline

    from sfgrpo.compat import flow_grpo as ours
    from sfgrpo.models.tiny import save_tiny_sd3

    with tempfile.TemporaryDirectory() as folder:
        pipe = StableDiffusion3Pipeline.from_pretrained(save_tiny_sd3(folder), text_encoder_3=None, tokenizer_3=None)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def run():
        torch.manual_seed(0)
        start = time.perf_counter()
        out = pipeline_module.pipeline_with_logprob(
            pipe, prompt=["a cat", "a dog"], num_inference_steps=10, guidance_scale=4.5, height=32, width=32,
            num_images_per_prompt=4, generator=torch.Generator(device).manual_seed(3), output_type="latent",
        )
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    def median_of_five():
        runs = [run() for _ in range(6)][1:]  # the first warms up
        return runs[0][0], sorted(seconds for _, seconds in runs)[2]

    theirs, their_time = median_of_five()
    try:
        ours.patch()
        mine, my_time = median_of_five()
    finally:
        ours.unpatch()
    latents = max(relative_error(b, a) for a, b in zip(theirs[1], mine[1]))
    log_probs = max(relative_error(b, a) for a, b in zip(theirs[2], mine[2]))
    timing = (f"pipeline_with_logprob (tiny SD3, 8 images, 10 steps, median of 5): {their_time * 1e3:.1f} ms "
              f"-> {my_time * 1e3:.1f} ms patched")
    return [Comparison("pipeline latents, every step", latents, TOLERANCE["pipeline"]),
            Comparison("pipeline log-probs, every step", log_probs, TOLERANCE["pipeline"])], timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sfgrpo.compat.check_flow_grpo", description=__doc__.split("\n")[0])
    parser.add_argument("checkout", help="folder holding Flow-GRPO's `flow_grpo` package (a git checkout)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the tiny-SD3 pipeline comparison")
    args = parser.parse_args(argv)
    step, tracker, pipeline = import_flow_grpo(args.checkout)
    results = compare_steps(step.sde_step_with_logprob, args.device) + compare_trackers(tracker)
    timing = None
    if pipeline is not None and not args.no_pipeline:
        pipeline_results, timing = compare_pipelines(pipeline, args.device)
        results += pipeline_results
    width = max(len(r.what) for r in results)
    for r in results:
        print(f"{r.what:<{width}}  {r.error:9.2e}  (tolerance {r.tolerance:.0e})  {'ok' if r.ok else 'MISMATCH'}")
    if timing:
        print(timing)
    failed = [r for r in results if not r.ok]
    verdict = "" if failed else ": drop-in verified"
    print(f"{len(results) - len(failed)} of {len(results)} comparisons agree{verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
