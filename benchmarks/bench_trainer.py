"""Per-iteration time split (rollout / look-ahead / decode / reward / update) of the trainer on the
built-in digits backbone, for Flow-GRPO and Stepwise-Flow-GRPO at several T'.

    python benchmarks/bench_trainer.py [--iterations 6] [--warmup 2] [--threads 1] [--csv out.csv]

Modes are interleaved iteration by iteration so that CPU contention hits all of them alike. Prints
a table and writes one CSV row per (config, phase) with the device and versions. Goals (issue 6):
stepwise with T' = 1 costs at most 1.05x a Flow-GRPO iteration, and everything outside the
backbone's forward/backward (timed with module hooks) is at most 5% of the iteration.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import tempfile
import time

import torch

import sfgrpo
from sfgrpo.bench.measure import BackboneClock  # time inside the transformer
from sfgrpo.trainer import Trainer, TrainerConfig
from sfgrpo.trainer.trainer import TIME_KEYS

CONFIGS = {
    "flow_grpo": dict(mode="flow_grpo"),
    "stepwise T'=1": dict(mode="stepwise", lookahead_steps=1),
    "stepwise T'=2": dict(mode="stepwise", lookahead_steps=2),
    "stepwise T'=5": dict(mode="stepwise", lookahead_steps=5),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reward", default="digit*darkness")
    parser.add_argument("--prompts-per-iteration", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--csv", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            name: Trainer(TrainerConfig(output_dir=f"{tmp}/{i}", reward=args.reward, device=args.device,
                                        prompts_per_iteration=args.prompts_per_iteration, group_size=args.group_size,
                                        gradient_accumulation_steps=3, progress=False, plots=False, **CONFIGS[name]))
            for i, name in enumerate(names)
        }
        samples: dict = {name: [] for name in names}
        clocks = {name: BackboneClock(trainer.model.transformer) for name, trainer in trainers.items()}
        outside: dict = {name: [] for name in names}
        for step in range(args.warmup + args.iterations):
            for name, trainer in trainers.items():
                clocks[name].take()
                start = time.perf_counter()
                record = trainer.train_iteration()
                total = time.perf_counter() - start
                if step >= args.warmup:
                    samples[name].append(record)
                    outside[name].append(1.0 - clocks[name].take() / total)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    rows, base = [], None
    header = (f"{'config':<16}" + "".join(f"{k:>11}" for k in TIME_KEYS)
              + f"{'total':>11}{'vs flow':>9}{'outside backbone':>18}")
    print(f"seconds per iteration (median of {args.iterations}), {args.prompts_per_iteration}x{args.group_size} "
          f"trajectories, T=10, {args.threads} thread(s), {device}")
    print(header)
    for name in names:
        medians = {k: statistics.median(r[f"time/{k}"] for r in samples[name]) for k in TIME_KEYS}
        medians["iteration"] = sum(medians.values())  # sum of per-phase medians: robust to one slow phase
        base = medians["iteration"] if name == "flow_grpo" else base
        ratio = medians["iteration"] / base if base else float("nan")
        share = statistics.median(outside[name])
        print(f"{name:<16}" + "".join(f"{medians[k]:>11.4f}" for k in TIME_KEYS) + f"{medians['iteration']:>11.4f}"
              f"{ratio:>9.3f}{100 * share:>17.1f}%")
        medians["outside_backbone_share"] = share
        for phase, seconds in medians.items():
            rows.append({"config": name, "phase": phase, "seconds": f"{seconds:.6f}", "device": device,
                         "threads": args.threads, "batch": args.prompts_per_iteration * args.group_size,
                         "sfgrpo": sfgrpo.__version__, "torch": torch.__version__})
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
