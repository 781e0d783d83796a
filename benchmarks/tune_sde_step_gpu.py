"""Sweeps the SDE-step kernels' launch knobs on a GPU and reports kernel-only bandwidth.

    python benchmarks/tune_sde_step_gpu.py [--quick] [--out results.md]

For every `LaunchTuning` variant (threads per program, storage bytes per thread per tensor,
target program count) it times, as CUDA-graph replays (kernel time only, no host work), the
scoring forward + backward and Philox sampling on SD3.5-M and FLUX latents in bf16 and fp32 (and,
with the default knobs, Philox sampling on libdevice's precise log/sin/cos: the A/B of
`PHILOX_FAST_MATH`, and the scoring pass with L2 eviction hints: the A/B of `L2_HINTS`), checks the log-prob against the reference, and prints one markdown row per
(case, variant) with GB/s and % of the measured copy bandwidth, best first. The winner (the best
geometric mean of GB/s over every case, shape and dtype) is printed last as the value of
SFGRPO_SDE_STEP_TUNING (`--winner-out FILE` also writes it there), which a process reads at
import; committed, it becomes the default by editing `LaunchTuning` in kernels/sde_step.py (the
chunking may depend on shape and dtype only: sampling and scoring must sum in the same order).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sde_step_gpu import copy_bandwidth_gbs, time_graph_ms  # noqa: E402

from sfgrpo import functional as F
from sfgrpo import reference as ref
from sfgrpo.kernels import sde_step as K

SHAPES = {"sd35m_b32_128": (32, 16, 128, 128), "flux_b16_4096x64": (16, 4096, 64)}
PRECISE_CASE = "sample philox precise"  # timed with the default tuning only
L2_CASE = "score fwd+bwd L2 hints"  # the A/B of L2_HINTS, default tuning only
AB_CASES = (PRECISE_CASE, L2_CASE)


def cases(shape, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g).to(dtype)
    v = torch.randn(shape, device="cuda", generator=g).to(dtype)
    sample = F.sde_step(x, v, 0.8, 0.6, 0.7, seed=3).prev_sample
    weights = torch.randn(shape[0], device="cuda", generator=g)
    vg = v.detach().requires_grad_()
    itemsize = x.element_size()
    numel = x.numel()

    def score():
        vg.grad = None
        out = F.sde_step(x, vg, 0.8, 0.6, 0.7, prev_sample=sample)
        torch.autograd.backward(out.log_prob, weights)  # the step's kernels only, no loss kernels

    def draw():
        F.sde_step(x, v, 0.8, 0.6, 0.7, seed=1)

    def check():
        got = F.sde_step(x, v, 0.8, 0.6, 0.7, prev_sample=sample).log_prob
        want = ref.sde_step(x, v, 0.8, 0.6, 0.7, prev_sample=sample).log_prob
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)

    # bytes the fused algorithm must move: score fwd reads x, v, x'; bwd reads them again, writes dv
    return {"score fwd+bwd": (score, numel * 7 * itemsize), "sample philox": (draw, numel * 3 * itemsize),
            # the A/Bs: libdevice's precise logf/sinf/cosf instead of the MUFU approximations; L2
            # evict_last in the scoring forward and evict_first in its backward
            PRECISE_CASE: (_with_switch(draw, "PHILOX_FAST_MATH", False), numel * 3 * itemsize),
            L2_CASE: (_with_switch(score, "L2_HINTS", True), numel * 7 * itemsize)}, check


def _with_switch(fn, name: str, value):
    """`fn` run with kernels.sde_step's A/B switch `name` set to `value`, restored after each call."""
    def run():
        previous = getattr(K, name)
        setattr(K, name, value)
        try:
            fn()
        finally:
            setattr(K, name, previous)
    return run


def _write(path: str | None, header: list[str], rows: list, default, peak: float) -> str:
    """The markdown table of `rows` (best first per case); written to `path` when given."""
    lines = header + ["| case | latents | dtype | threads | bytes/thread | target programs | µs | GB/s | % copy BW |",
                      "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for case, shape_name, dtype, variant, us, gbs in sorted(
            rows, key=lambda r: (r[0], r[1], r[2], -(r[5] if math.isfinite(r[5]) else -1.0))):
        mark = " (default)" if variant == default else ""
        lines.append(f"| {case} | {shape_name} | {dtype} | {variant.threads} | {variant.bytes_per_thread}{mark} | "
                     f"{variant.target_programs} | {us:.1f} | {gbs:,.0f} | {100 * gbs / peak:.1f} |")
    text = "\n".join(lines) + "\n"
    if path:
        with open(path, "w") as handle:
            handle.write(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer variants")
    parser.add_argument("--out", help="also write the markdown here")
    parser.add_argument("--winner-out", help="write the winning variant here, as SFGRPO_SDE_STEP_TUNING's value")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    peak = copy_bandwidth_gbs()
    grid = dict(threads=(128, 256, 512), bytes_per_thread=(8, 16, 32), target_programs=(1024, 4096))
    if args.quick:
        # the first H100 sweep (2026-11-26) found threads and bytes per thread within a few % of each
        # other; the number of programs decides how many waves the grid runs in (a 48-register
        # program of 256 threads fits 5 per SM: 660 on an H100, so 1,024 programs are 1.55 waves)
        grid = dict(threads=(256,), bytes_per_thread=(16, 32), target_programs=(512, 1024, 2048, 4096))
    variants = [K.LaunchTuning(threads=t, bytes_per_thread=b, target_programs=p)
                for t, b, p in itertools.product(*grid.values())]
    default = K.TUNING
    rows = []
    header = [f"# SDE-step launch tuning on {torch.cuda.get_device_name()} (copy bandwidth {peak:,.0f} GB/s)", "",
              f"default: {default}", ""]
    try:
        for shape_name, dtype in itertools.product(SHAPES, (torch.bfloat16, torch.float32)):
            work, check = cases(SHAPES[shape_name], dtype)
            for variant in variants:
                K.TUNING = variant
                K.launch_config.cache_clear()
                try:
                    check()
                    for case, (fn, nbytes) in work.items():
                        if case in AB_CASES and variant != default:
                            continue
                        us = 1e3 * time_graph_ms(fn)  # NaN: could not be captured
                        gbs = nbytes / (us * 1e-6) / 1e9
                        rows.append((case, shape_name, str(dtype).removeprefix("torch."), variant, us, gbs))
                except Exception as err:  # noqa: BLE001 - a variant that does not compile or fit
                    print(f"{shape_name} {dtype} {variant}: {type(err).__name__}: {err}", file=sys.stderr)
            # after every shape: a time limit still leaves what was measured, and a winner over it
            if args.out:
                _write(args.out, header, rows, default, peak)
            save_winner(rows, variants, args.winner_out)
    finally:
        K.TUNING = default
        K.launch_config.cache_clear()
    print(_write(args.out, header, rows, default, peak))
    best = save_winner(rows, variants, args.winner_out)
    if best is not None:
        print(f"winner: {K.TUNING_ENV}={tuning_text(best)}")
    return 0


def save_winner(rows: list, variants: list, path: str | None):
    """The winner over the rows so far, written to `path` (when given) as SFGRPO_SDE_STEP_TUNING's value."""
    best = winner(rows, variants)
    if best is not None and path:
        with open(path, "w") as handle:
            handle.write(tuning_text(best) + "\n")
    return best


def tuning_text(variant) -> str:
    """The variant as SFGRPO_SDE_STEP_TUNING's value (kernels.sde_step.tuning_from_text reads it)."""
    return ",".join(f"{name}={getattr(variant, name)}" for name in variant.__dataclass_fields__)


def winner(rows: list, variants: list):
    """The variant with the best geometric mean of GB/s over every (case, latents, dtype) that all
    variants measured (the precise-math A/B left out); None without a complete variant."""
    keys = {(r[0], r[1], r[2]) for r in rows if r[0] not in AB_CASES}
    score = {}
    for variant in variants:
        gbs = {(r[0], r[1], r[2]): r[5] for r in rows if r[3] == variant and r[0] not in AB_CASES}
        values = [gbs.get(key, math.nan) for key in keys]
        if values and all(math.isfinite(v) and v > 0 for v in values):
            score[variant] = math.exp(sum(math.log(v) for v in values) / len(values))
    return max(score, key=score.get) if score else None


if __name__ == "__main__":
    sys.exit(main())
