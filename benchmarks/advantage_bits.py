"""Bit-for-bit check of a change to the CUDA advantage engine, without a GPU: runs the engine's host
emulation (`sfgrpo._C.testing.advantages_cuda_emulated`, the device code run on the CPU, whose bits
the GPU must reproduce: tests/test_advantages_cuda_engine.py) over a grid of problems and saves
every output; `--compare` says which problems differ between two saved runs.

The grid: 1 to 3,000 rows, random layouts (groups of 1 to 12, extreme ids) and prompt-sorted ones
(groups of 16); float32 and float64; 1, 2, 5 and 11 reward columns; plain, extreme (tiny, huge and
tied values mixed), all tiny (subnormal range), all huge, tied (halves) and non-finite rewards;
gains or raw columns, joint / per-column statistics, group or global std, ddof 0 / 1, clip,
a column mask, with and without per-group statistics: 43,776 problems, ~30 s.

    python benchmarks/advantage_bits.py /tmp/before.pt        # on the old build
    python benchmarks/advantage_bits.py /tmp/after.pt         # on the new one
    python benchmarks/advantage_bits.py --compare /tmp/before.pt /tmp/after.pt

(To run the old build next to the new one: `git archive <commit> | tar -x -C /tmp/old`, then
`pip install --no-deps --no-build-isolation --target /tmp/oldpkg /tmp/old` and
`PYTHONPATH=/tmp/oldpkg python benchmarks/advantage_bits.py /tmp/before.pt`.)
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

import torch

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1] / "tests"))  # the engine runner, the layouts
from advantage_oracles import random_layout, rewards_for  # noqa: E402
from test_advantages_cuda_engine import run_engine  # noqa: E402

KINDS = ("plain", "extreme", "nonfinite", "tiny", "huge", "ties")


def _rewards(kind: str, ids: torch.Tensor, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    r = rewards_for(ids, width, dtype, seed=seed)
    f64 = dtype == torch.float64
    rows = r.shape[0]
    if kind == "extreme":
        r[::3] *= 1e-300 if f64 else 1e-30
        r[1::5] = 3.0
        r[2::7] *= 1e200 if f64 else 1e30
    elif kind == "tiny":
        r *= 1e-306 if f64 else 1e-37
    elif kind == "huge":
        r *= 1e300 if f64 else 1e36
    elif kind == "ties":
        r = (r * 2).round() / 2
    elif kind == "nonfinite" and rows > 2:
        r[1, 0] = float("nan")
        r[rows // 2, -1] = float("inf")
    return r


def inputs():
    """(key, group ids, rewards) of every input."""
    for rows, layout, dtype, width, kind in itertools.product(
            [1, 5, 32, 33, 200, 3000], ["random", "sorted"], [torch.float32, torch.float64], [1, 2, 5, 11], KINDS):
        ids = random_layout(rows, seed=rows + width) if layout == "random" else torch.arange(rows) // 16
        yield (rows, layout, str(dtype), width, kind), ids, _rewards(kind, ids, width, dtype, rows * 7 + width)


def run_all() -> dict:
    out = {}
    for key, ids, rewards in inputs():
        width = rewards.shape[1]
        for gains, pooled, global_std, ddof, clip, masked, stats in itertools.product(
                [True, False], [True, False], [False, True], [0, 1], [None, 2.0], [False, True], [False, True]):
            columns = width - 1 if gains else width
            if (gains and (width < 2 or global_std)) or (masked and columns < 2):
                continue
            mask = None
            if masked:
                mask = torch.ones(columns, dtype=torch.bool)
                mask[::2] = False
            advantages, padded, groups, nonfinite = run_engine(
                "emulated", rewards, ids, gains=gains, pooled=pooled, global_std=global_std, ddof=ddof, clip=clip,
                step_mask=mask, stats=stats)
            entry = [advantages.clone(), groups, nonfinite]
            if padded is not None:
                entry.append(tuple(t.clone() for t in padded))
            out[key + (gains, pooled, global_std, ddof, clip, masked, stats)] = entry
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))
    return a == b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="OUT.pt, or with --compare: A.pt B.pt")
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    if args.compare:
        if len(args.paths) != 2:
            parser.error("--compare takes two saved runs")
        a, b = (torch.load(p, weights_only=False) for p in args.paths)
        if a.keys() != b.keys():
            print("the two runs hold different problems (different versions of this script?)")
            return 2
        differ = [key for key in a if not same(a[key], b[key])]
        print(f"{len(a)} problems, {len(differ)} differ")
        for key in differ[:20]:
            print(" ", key)
        return 1 if differ else 0
    if len(args.paths) != 1:
        parser.error("one output path")
    saved = run_all()
    torch.save(saved, args.paths[0])
    print(f"{len(saved)} problems -> {args.paths[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
