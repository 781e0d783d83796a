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
from sfgrpo.trainer import Trainer, TrainerConfig
from sfgrpo.trainer.trainer import TIME_KEYS

CONFIGS = {
    "flow_grpo": dict(mode="flow_grpo"),
    "stepwise T'=1": dict(mode="stepwise", lookahead_steps=1),
    "stepwise T'=2": dict(mode="stepwise", lookahead_steps=2),
    "stepwise T'=5": dict(mode="stepwise", lookahead_steps=5),
}


class BackboneClock:
    """Wall time spent inside the transformer's forward and backward, so the share of an iteration
    spent outside the backbone can be reported. Forward: module hooks. Backward: from the moment the
    gradient of the transformer's output arrives to the last gradient accumulated into one of its
    parameters (module backward hooks fire too early when the inputs need no gradient)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self._forward_start, self._backward = 0.0, 0.0, None
        module.register_forward_pre_hook(self._forward_begins)
        module.register_forward_hook(self._forward_ends)
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.register_post_accumulate_grad_hook(self._gradient_done)

    def _forward_begins(self, *_):
        self._forward_start = time.perf_counter()

    def _forward_ends(self, _module, _inputs, output):
        self.seconds += time.perf_counter() - self._forward_start
        tensor = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            tensor.register_hook(self._backward_begins)

    def _backward_begins(self, _grad):
        self._close()
        self._backward = [time.perf_counter(), None]

    def _gradient_done(self, _parameter):
        if self._backward is not None:
            self._backward[1] = time.perf_counter()

    def _close(self):
        if self._backward is not None and self._backward[1] is not None:
            self.seconds += self._backward[1] - self._backward[0]
        self._backward = None

    def take(self) -> float:
        self._close()
        seconds, self.seconds = self.seconds, 0.0
        return seconds


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
