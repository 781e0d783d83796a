"""`sfgrpo demo`: Stepwise-Flow-GRPO vs Flow-GRPO on the built-in digits model, offline, on CPU.

For every reward and seed it trains both modes from the shipped backbone with identical settings
(same prompts, noise streams and optimiser; the initial noise is one per group for stepwise, as
the paper specifies, and one per trajectory for Flow-GRPO, as its code draws it), then writes to
--output-dir:

  summary.md / summary.json   iterations to a reward threshold, reward at fixed iterations, the
                              evaluation reward (ODE samples from fixed noise) before and after
                              training, and class accuracy (mean +- std over seeds): reward hacking
                              shows up as a rising reward with a falling accuracy
  curves.png                  reward and class accuracy per iteration (mean +- std band)
  <reward>/<mode>/seed<k>/    each run's metrics.jsonl, plots, image grids, checkpoint

The thresholds of a reward are `start + fraction * (best - start)`: `start` is the mean first-
iteration reward, `best` the highest 3-iteration moving average any run reached. Runs that already
have a checkpoint in --output-dir are resumed (a finished run is only read back), so re-running
the demo with more iterations or seeds only trains what is new.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

MODES = ("stepwise", "flow_grpo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="sfgrpo-demo", help="where results go (default: sfgrpo-demo)")
    parser.add_argument("--rewards", default="digit*darkness,brightness",
                        help="comma-separated reward specs (default: digit*darkness,brightness)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes (default: stepwise,flow_grpo)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (reward, mode) (default: 3)")
    parser.add_argument("--iterations", type=int, default=40, help="iterations per run (default: 40)")
    parser.add_argument("--prompts-per-iteration", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--clip-range", type=float, default=1e-2)
    parser.add_argument("--lookahead-steps", type=int, default=1)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=3,
                        help="forwards per optimizer step (default 3: three optimizer steps per iteration)")
    parser.add_argument("--thresholds", default="0.5,0.8",
                        help="comma-separated fractions of the start-to-best reward gap (default 0.5,0.8)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs in parallel, 1 thread each")
    parser.add_argument("--backbone", default="digits", help="backbone spec (default: the shipped digits model)")
    parser.add_argument("--eval-samples-per-prompt", type=int, default=4,
                        help="evaluation samples per digit class, before and after training (default: 4)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 8 iterations: a smoke test")


def run_config(args: argparse.Namespace, reward: str, mode: str, seed: int) -> dict:
    from sfgrpo.trainer import TrainerConfig

    output_dir = Path(args.output_dir) / reward.replace("*", "_x_") / mode / f"seed{seed}"
    # a run that already has a checkpoint continues from it (a finished one is just read back)
    resume = "latest" if (output_dir / "checkpoints" / "latest").exists() else None
    return TrainerConfig(
        output_dir=str(output_dir), resume_from=resume,
        iterations=args.iterations, seed=seed, threads=1, backbone=args.backbone, reward=reward, mode=mode,
        prompts_per_iteration=args.prompts_per_iteration, group_size=args.group_size,
        learning_rate=args.learning_rate, clip_range=args.clip_range, lookahead_steps=args.lookahead_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps, progress=False,
        # evaluated before training and after the last iteration: ODE samples from fixed noise
        eval_every=args.iterations, eval_samples_per_prompt=args.eval_samples_per_prompt,
    ).to_dict()


def _train(config: dict) -> tuple[list[dict], list[dict]]:
    """(per-iteration metrics, evaluations) of one run."""
    from sfgrpo.trainer import Trainer, TrainerConfig

    trainer = Trainer(TrainerConfig(**config))
    return trainer.train(), trainer.eval_history


def _moving_average(values: list[float], window: int = 3) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _eval_change(evaluations: list[list[dict]]) -> dict | None:
    """Eval reward before training and after the last iteration, mean +- std over seeds (None when
    a run has no evaluation, e.g. one trained by an older version and only read back)."""
    if not evaluations or any(len(e) < 2 for e in evaluations):
        return None
    return {"start": _mean_std([e[0]["eval_reward_mean"] for e in evaluations]),
            "final": _mean_std([e[-1]["eval_reward_mean"] for e in evaluations])}


def summarise(results: dict, fractions: list[float], iterations: int, evaluations: dict | None = None) -> dict:
    """results[reward][mode] = list of histories (one per seed) -> summary numbers; evaluations[reward]
    [mode] = the runs' evaluation records."""
    evaluations = evaluations or {}
    checkpoints = sorted({max(1, iterations // 3), max(1, 2 * iterations // 3), iterations})
    summary = {"checkpoints": checkpoints, "rewards": {}}
    for reward, by_mode in results.items():
        histories = [h for runs in by_mode.values() for h in runs]
        start = sum(h[0]["reward_mean"] for h in histories) / len(histories)
        best = max(max(_moving_average([r["reward_mean"] for r in h])) for h in histories)
        thresholds = {f: start + f * (best - start) for f in fractions}
        entry = {"start": start, "best": best, "thresholds": thresholds, "modes": {}}
        for mode, runs in by_mode.items():
            smooth = [_moving_average([r["reward_mean"] for r in h]) for h in runs]
            to_threshold = {}
            for fraction, threshold in thresholds.items():
                reached = [next((i + 1 for i, value in enumerate(s) if value >= threshold), None) for s in smooth]
                hits = [r for r in reached if r is not None]
                to_threshold[fraction] = {"iterations": reached, "mean_std": _mean_std(hits) if hits else None,
                                          "reached": f"{len(hits)}/{len(runs)}"}
            entry["modes"][mode] = {
                "iterations_to_threshold": to_threshold,
                "reward_at": {c: _mean_std([h[c - 1]["reward_mean"] for h in runs]) for c in checkpoints},
                "class_accuracy_final": _mean_std([h[-1].get("class_accuracy", float("nan")) for h in runs]),
                "seconds_per_iteration": _mean_std([sum(r["time/iteration"] for r in h) / len(h) for h in runs]),
                "eval_reward": _eval_change(evaluations.get(reward, {}).get(mode, [])),
            }
        summary["rewards"][reward] = entry
    return summary


def format_markdown(summary: dict, args: argparse.Namespace, fractions: list[float]) -> str:
    checkpoints = summary["checkpoints"]
    head = ("| reward | mode | " + " | ".join(f"iters to {f:.0%}" for f in fractions) + " | "
            + " | ".join(f"reward @ {c}" for c in checkpoints) + " | eval reward: start -> final | class acc (final) "
            "| s / iter |")
    lines = [
        f"{args.seeds} seed(s), {args.iterations} iterations, {args.prompts_per_iteration} prompts x group "
        f"{args.group_size}, lr {args.learning_rate:g}, clip {args.clip_range:g}, T' = {args.lookahead_steps}. "
        "'iters to p' = first iteration whose 3-iteration moving average reaches start + p x (best - start) "
        "(reached/seeds in brackets). Eval reward: deterministic (ODE, 40 steps) samples of every digit class "
        "from noise fixed for the run, before training and after the last iteration. Mean +- std over seeds.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for reward, entry in summary["rewards"].items():
        for mode, m in entry["modes"].items():
            reach = []
            for fraction in fractions:
                hit = m["iterations_to_threshold"][fraction]
                if hit["mean_std"] is None:
                    reach.append(f"not reached (0/{len(hit['iterations'])})")
                else:
                    reach.append(f"{hit['mean_std'][0]:.1f} +- {hit['mean_std'][1]:.1f} ({hit['reached']})")
            at = " | ".join(f"{m['reward_at'][c][0]:.3f} +- {m['reward_at'][c][1]:.3f}" for c in checkpoints)
            acc = m["class_accuracy_final"]
            sec = m["seconds_per_iteration"]
            ev = m["eval_reward"]
            change = (f"{ev['start'][0]:.3f} -> {ev['final'][0]:.3f} +- {ev['final'][1]:.3f}" if ev else "n/a")
            lines.append(f"| `{reward}` | {mode} | {' | '.join(reach)} | {at} | {change} | {acc[0]:.2f} +- {acc[1]:.2f} | "
                         f"{sec[0]:.2f} |")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: curves.png skipped")
        return False
    import torch

    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 7), squeeze=False)
    for column, (reward, by_mode) in enumerate(results.items()):
        for mode, runs in by_mode.items():
            for row, key in enumerate(("reward_mean", "class_accuracy")):
                if key not in runs[0][0]:
                    continue
                values = torch.tensor([[r[key] for r in h] for h in runs])
                mean, std = values.mean(0), values.std(0, unbiased=False)
                x = list(range(1, values.shape[1] + 1))
                ax = axes[row][column]
                ax.plot(x, mean.tolist(), label=mode)
                ax.fill_between(x, (mean - std).tolist(), (mean + std).tolist(), alpha=0.2)
                ax.set_xlabel("iteration")
                ax.set_ylabel("reward" if row == 0 else "class accuracy")
        axes[0][column].set_title(reward)
        axes[0][column].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plan(args: argparse.Namespace) -> tuple[list[tuple[str, str, int]], list[dict], list[float]]:
    """The demo's runs (reward, mode, seed), their trainer configs (validated, rewards resolved) and
    the threshold fractions, before anything runs: a bad argument is a ValueError naming it, not a
    traceback from a worker process minutes later. `--quick` sets the seeds and iterations."""
    if args.quick:
        args.seeds, args.iterations = 1, 8
    for flag in ("seeds", "iterations", "jobs"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    rewards = [r.strip() for r in args.rewards.split(",") if r.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not rewards or not modes:
        raise ValueError(f"--rewards and --modes must name at least one each, got {args.rewards!r} and {args.modes!r}")
    try:
        fractions = [float(f) for f in args.thresholds.split(",") if f.strip()]
    except ValueError:
        fractions = []
    if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"--thresholds must be comma-separated fractions in (0, 1], got {args.thresholds!r}")
    from sfgrpo.rewards import get_reward
    from sfgrpo.trainer import TrainerConfig

    for reward in rewards:
        get_reward(reward)  # resolved (and cached) here: an unknown name fails now
    jobs = [(reward, mode, seed) for reward in rewards for seed in range(args.seeds) for mode in modes]
    configs = [run_config(args, *job) for job in jobs]
    for config in configs:
        TrainerConfig(**config).validate()
    return jobs, configs, fractions


def main(args: argparse.Namespace, planned: tuple | None = None) -> int:
    """Runs the demo; `planned`: what `plan(args)` returned, when the caller has checked the
    arguments with it already (the CLI does, to report a bad one before anything runs)."""
    jobs, configs, fractions = planned if planned is not None else plan(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"sfgrpo demo: {len(jobs)} runs x {args.iterations} iterations ({args.jobs} in parallel) -> {out}")
    start = time.time()
    if args.jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            outcomes = list(pool.map(_train, configs))
    else:
        outcomes = [_train(c) for c in configs]
    results: dict = {}
    evaluations: dict = {}
    for (reward, mode, _seed), (history, evals) in zip(jobs, outcomes):
        results.setdefault(reward, {}).setdefault(mode, []).append(history)
        evaluations.setdefault(reward, {}).setdefault(mode, []).append(evals)
    summary = summarise(results, fractions, args.iterations, evaluations)
    summary["wall_seconds"] = time.time() - start
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = format_markdown(summary, args, fractions)
    (out / "summary.md").write_text(table)
    plot_curves(results, out / "curves.png")
    print(table)
    print(f"done in {summary['wall_seconds']:.0f} s; summary.md, summary.json, curves.png in {out}")
    return 0
