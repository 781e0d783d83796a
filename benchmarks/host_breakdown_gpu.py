"""Where the host time of a fused SDE-step call goes on this machine (CUDA GPU needed).

    python benchmarks/host_breakdown_gpu.py [--out FILE.md]

Back to back on small latents the step is bound by the host, not the kernel: this splits one
call's wall time into sfgrpo's Python (validation, outputs, scratch, the launcher's key), Triton's
launcher and the CUDA launch, by timing the same call with the launch replaced by a no-op, and
next to it what one eager PyTorch op and one `torch.compile`d reference step cost on the same host.
Each figure is the best of 5 rounds of 200 calls (wall time per call, the GPU queue absorbing the
kernels: their GPU time is far below the host time on these latents).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from sfgrpo import functional as F
from sfgrpo import reference as ref

SHAPE = (8, 16, 64, 64)  # SD3.5-M 512 px latents, batch 8: ~1 MB per tensor in bf16


def per_call_us(fn, calls: int = 200, rounds: int = 5) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return best


class _NoOpRunner:
    function = 0

    def __getitem__(self, grid):
        return lambda *args, **options: None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from sfgrpo.kernels import _launch
    from sfgrpo.kernels import sde_step as kernels

    x = torch.randn(SHAPE, device="cuda").bfloat16()
    v = torch.randn(SHAPE, device="cuda").bfloat16()
    sample = F.sde_step(x, v, 0.8, 0.7, seed=0).prev_sample
    vg = v.clone().requires_grad_()

    def sample_step():
        F.sde_step(x, v, 0.8, 0.7, seed=1, return_x0_hat=True)

    def score_step():
        F.sde_step(x, vg, 0.8, 0.7, prev_sample=sample).log_prob.sum().backward()
        vg.grad = None

    rows = []

    def report() -> str:
        """The table so far, to --out: rewritten after every row, so a time limit or a failing row
        still leaves the rows measured before it."""
        lines = [f"# Host time per call on {torch.cuda.get_device_name()} (latents {SHAPE}, bf16)", "",
                 "| call | µs per call (best of 5 x 200, back to back) |", "|---|---:|"]
        lines += [f"| {name} | {us} |" for name, us in rows]
        text = "\n".join(lines) + "\n"
        if args.out:
            with open(args.out, "w") as handle:
                handle.write(text)
        return text

    def row(name: str, fn) -> None:
        try:
            rows.append((name, f"{per_call_us(fn):.1f}"))
        except Exception as err:  # noqa: BLE001 - reported in the table, the other rows stand
            rows.append((name, f"failed ({type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''})"))
        report()

    row("one eager PyTorch op (x.mul(2))", lambda: x.mul(2))
    row("torch.empty of the sample's size", lambda: torch.empty_like(x))
    row("sfgrpo sampling step (Philox, log-prob, x0_hat)", sample_step)
    row("sfgrpo scoring step, forward + backward with .sum()", score_step)
    # the same calls with every compiled-kernel launch a no-op: sfgrpo's own host work (the
    # difference to the rows above is Triton's launcher and the CUDA launch)
    # (only where the calls above went through the direct launcher: otherwise the stub would not be
    # called and these rows would time the real launches under the no-op label)
    launchers = (kernels._FWD_LAUNCHER, kernels._BWD_LAUNCHER)
    if not (_launch.enabled() and all(launcher.compiled for launcher in launchers)):
        rows.append(("  the same calls, launches replaced by no-ops", "n/a: direct launch off or unused"))
    else:
        stubbed = {}
        for launcher in launchers:  # both caches: by the full key and by the caller's key
            stubbed[launcher] = (launcher.compiled, launcher.by_caller_key)
            launcher.compiled = {key: _NoOpRunner() for key in launcher.compiled}
            launcher.by_caller_key = {key: _NoOpRunner() for key in launcher.by_caller_key}
        try:
            row("  the same sampling step, launch replaced by a no-op", sample_step)
            row("  the same scoring step, launches replaced by no-ops", score_step)
        finally:
            for launcher, (compiled_kernels, by_caller_key) in stubbed.items():
                launcher.compiled, launcher.by_caller_key = compiled_kernels, by_caller_key
    # last: a cold inductor compile is the slowest and least predictable part of the run
    compiled = torch.compile(lambda: ref.sde_step(x, v, 0.8, 0.7, noise=torch.randn(SHAPE, device="cuda")).log_prob,
                             fullgraph=True)
    row("torch.compile'd reference sampling step", compiled)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
