"""The advantage engine's 1M-gain call (100,000 trajectories x 10 steps, groups of 16, joint
normalisation, `nonfinite="drop"`) a few times on each CUDA path, for Nsight Compute to profile:

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
        -k regex:'single_launch|warp_rows|write_kernel' python benchmarks/ncu_advantages.py

The single cooperative launch first, then (SFGRPO_ADVANTAGES_COOPERATIVE=0) the memset + 3 kernels,
whose phases ncu then reports one by one: where the 36 us of GPU time per call go (the call moves
8.4 MB, ~2 us at an H200's bandwidth). `--calls` per path; the first call of each path warms up.
`--layouts`: `permuted` (a group's rows scattered over the batch: every warp row its own group, the
benchmark's layout) and/or `sorted` (a prompt's samples side by side: the warps combine a run's rows
before their atomics), each profiled on both paths in that order.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

import sfgrpo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2, help="calls per path after one warm-up call")
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--layouts", default="permuted", help="comma-separated: permuted, sorted")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("ncu_advantages.py needs a CUDA GPU", file=sys.stderr)
        return 1
    groups = np.arange(args.samples) // 16
    layouts = {"permuted": np.random.default_rng(0).permutation(groups), "sorted": groups}
    rewards = torch.rand(args.samples, 11, device="cuda")
    for layout in args.layouts.split(","):
        if layout not in layouts:
            parser.error(f"unknown layout {layout!r} (known: {', '.join(layouts)})")
        ids = torch.from_numpy(layouts[layout]).cuda()
        for cooperative in ("1", "0"):
            os.environ["SFGRPO_ADVANTAGES_COOPERATIVE"] = cooperative  # read by the engine on every call
            for _ in range(1 + args.calls):
                sfgrpo.gain_advantages(rewards, ids, nonfinite="drop")
            torch.cuda.synchronize()
    print(f"profiled {args.calls} + 1 calls per path and layout ({args.layouts}) on {torch.cuda.get_device_name()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
