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

    compiled = torch.compile(lambda: ref.sde_step(x, v, 0.8, 0.7, noise=torch.randn(SHAPE, device="cuda")).log_prob,
                             fullgraph=True)
    rows = [("one eager PyTorch op (x.mul(2))", per_call_us(lambda: x.mul(2))),
            ("torch.empty of the sample's size", per_call_us(lambda: torch.empty_like(x))),
            ("torch.compile'd reference sampling step", per_call_us(compiled)),
            ("sfgrpo sampling step (Philox, log-prob, x0_hat)", per_call_us(sample_step)),
            ("sfgrpo scoring step, forward + backward with .sum()", per_call_us(score_step))]
    # the same calls with every compiled-kernel launch a no-op: sfgrpo's own host work (the
    # difference to the rows above is Triton's launcher and the CUDA launch)
    stubbed = {}
    for launcher in (kernels._FWD_LAUNCHER, kernels._BWD_LAUNCHER):
        stubbed[launcher] = dict(launcher.compiled)
        launcher.compiled = {key: _NoOpRunner() for key in launcher.compiled}
    try:
        rows += [("  the same sampling step, launch replaced by a no-op", per_call_us(sample_step)),
                 ("  the same scoring step, launches replaced by no-ops", per_call_us(score_step))]
    finally:
        for launcher, compiled_kernels in stubbed.items():
            launcher.compiled = compiled_kernels
    lines = [f"# Host time per call on {torch.cuda.get_device_name()} (latents {SHAPE}, bf16)", "",
             "| call | µs per call (best of 5 x 200, back to back) |", "|---|---:|"]
    lines += [f"| {name} | {us:.1f} |" for name, us in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
