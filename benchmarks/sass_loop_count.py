"""Static SASS count of the fused SDE-step forward's element loop for sm_90, without a GPU.

Compiles `sde_step_fwd_kernel` ahead of time (kernels/_aot.py: triton.compile for GPUTarget
("cuda", 90, 32), Triton's bundled ptxas), disassembles the cubin with nvdisasm and counts the
instructions of one iteration of the element loop (the loop that streams the latents, divided by
its unroll factor; where LLVM unrolled it fully, the kernel with ITERS=2 minus the one with
ITERS=1), per element and by class, on the path actually executed (the precise sinf/cosf's
Payne-Hanek branches, taken only for |angle| >= 105615, are left out). Variants: scoring, Philox
sampling on libdevice's precise log/sin/cos and on the MUFU approximations (FAST_MATH), each `lean`
(what benchmarks/tune_sde_step_gpu.py times: x, v in, the sample out or in) and `heavy` (v_ref and
every output). From the counts it prints the throughput bounds they imply on an H100 SXM (132 SMs
at 1.98 GHz; per SM and clock: 4 warp instructions issued, 128 FP32 lanes, 64 INT32 lanes, 16 MUFU
lanes; ~3.0 TB/s copy bandwidth).

    python benchmarks/sass_loop_count.py            # a table (markdown)
    python benchmarks/sass_loop_count.py --json     # one JSON object per variant

Run it without TRITON_INTERPRET, on the installed package (sfgrpo.kernels). On a tree from before
FAST_MATH existed it counts the kernel as it was (both Philox rows are then the precise one).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SMS, CLOCK_HZ = 132, 1.98e9
ISSUE_PER_SM, FP32_PER_SM, INT_PER_SM, MUFU_PER_SM = 4 * 32, 128, 64, 16
COPY_BYTES_PER_S = 3.0e12

FP32_OPS = {"FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FRND", "HFMA2"}
INT_OPS = {"IMAD", "IADD3", "LOP3", "SHF", "ISETP", "LEA", "IABS", "SEL", "IMNMX", "VIMNMX", "PRMT", "I2F", "I2FP",
           "F2I", "F2F", "F2FP", "POPC", "FLO", "BREV", "VIADD", "IMUL", "MOV", "PLOP3", "P2R", "R2P"}
MEM_OPS = {"LDG", "STG", "LDS", "STS", "LDL", "STL", "ATOMG", "RED", "LDC"}


def _tool(name: str) -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    found = str(bundled) if bundled.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found (Triton's bundled copy or PATH)")
    return found


def _label_lines(lines):
    return {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}


def loops(lines: list[str]) -> list[tuple[int, int]]:
    """(first line, last line) of every loop: a label and a backward branch to it."""
    labels = _label_lines(lines)
    found = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            found.append((labels[m.group(1)], i))
    return found


def streaming_loads(lines: list[str]) -> int:
    """Global loads of the streamed tensors on the executed path (the row partials are read with
    .STRONG.GPU loads, the precise sinf/cosf's table with .CONSTANT ones)."""
    return sum(1 for op in opcodes(executed_path(lines))
               if op.startswith("LDG") and ".STRONG" not in op and ".CONSTANT" not in op)


def executed_path(lines: list[str]) -> list[str]:
    """Leaves out the regions a forward conditional branch jumps over when they contain a loop: the
    Payne-Hanek argument reduction of libdevice's sinf/cosf, never taken for |angle| <= 2 pi."""
    labels = _label_lines(lines)
    drop = set()
    for i, line in enumerate(lines):
        m = re.search(r"@!?P\d\s+BRA\s+`\((\.L_x_\d+)\)", line)
        if not (m and labels.get(m.group(1), -1) > i):
            continue
        end = labels[m.group(1)]
        for k in range(i + 1, end):
            back = re.search(r"BRA\s+`\((\.L_x_\d+)\)", lines[k])
            if back and i < labels.get(back.group(1), -1) < k:
                drop.update(range(i + 1, end))
                break
    return [line for i, line in enumerate(lines) if i not in drop]


def opcodes(lines: list[str]) -> list[str]:
    ops = []
    for line in lines:
        m = re.match(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops.append(m.group(1))
    return ops


def classify(op: str) -> str:
    base = op.split(".")[0]
    if base == "MUFU":
        return "MUFU"
    if base in FP32_OPS:
        return "FP32"
    if base in INT_OPS:
        return "INT"
    if base in MEM_OPS:
        return "MEM"
    return "other"


def variants():
    """(name, constexprs, storage, elements per loop iteration, bytes moved per element)."""
    from sfgrpo.kernels import sde_step as k

    for storage, itemsize in (("fp32", 4), ("bf16", 2)):
        cfg = k.launch_config(64, 1 << 20, itemsize)
        # `lean`: what benchmarks/tune_sde_step_gpu.py times (scalar schedule, no v_ref, only the
        # sample); `heavy`: every output and the KL (the AOT report's variants)
        lean = dict(ROW_SCALARS=True, HAS_VREF=False, WRITE_MEAN=False, WRITE_X0=False, WRITE_X1=False)
        heavy = dict(ROW_SCALARS=False, HAS_VREF=True, WRITE_MEAN=True, WRITE_X0=True, WRITE_X1=True)
        for flags_name, flags in (("lean", lean), ("heavy", heavy)):
            for mode_name, mode, fast in (("score", k.MODE_SCORE, False), ("philox-precise", k.MODE_PHILOX, False),
                                          ("philox-fast", k.MODE_PHILOX, True)):
                constexprs = dict(flags, SDE_TYPE=0, MODE=mode, FINALIZE=False, LOGPROB_FLOW_GRPO=False,
                                  SUM_REDUCTION=False, KL_FLOW_GRPO=False, FAST_MATH=fast, BLOCK=cfg.block,
                                  BLOCK_C=1024)
                # streamed bytes per element: x, v (+ v_ref) in; the sample in (scoring) or out
                moved = itemsize * (3 + (1 if flags_name == "heavy" else 0)) + (12 if flags_name == "heavy" else 0)
                streamed = 2 + (flags_name == "heavy") + (mode == k.MODE_SCORE)  # x, v, v_ref, sample
                yield (f"{storage}/{flags_name}/{mode_name}", constexprs, storage, cfg.block // (32 * cfg.num_warps),
                       moved, cfg.num_warps, streamed)


def _sass(constexprs, storage, num_warps) -> tuple[list[str], str, dict]:
    from sfgrpo.kernels import sde_step as k
    from sfgrpo.kernels._aot import compile_sm90, resource_usage

    types = next(v for v in k.aot_variants() if v[0].startswith(f"fwd/{storage}/"))[2]
    # constexprs the kernel lacks (FAST_MATH before it existed) are dropped: older trees count too
    constexprs = {name: value for name, value in constexprs.items() if name in k.sde_step_fwd_kernel.arg_names}
    compiled = compile_sm90(k.sde_step_fwd_kernel, types, constexprs, num_warps)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    return sass.splitlines(), compiled.asm["ptx"], resource_usage(compiled.asm["cubin"])


def iteration(constexprs, storage, num_warps, streamed_inputs: int) -> tuple[list[str], list[str], int, str, dict]:
    """(executed, static) opcodes of the element loop, how many iterations they hold, the PTX and
    the cubin's resource usage (compiled with ITERS=4). The loop that streams the latents when
    LLVM/ptxas kept one (its iterations counted from its loads); else, fully unrolled, the kernel
    compiled with ITERS=2 minus the one with ITERS=1 (one iteration)."""
    lines, ptx, usage = _sass(dict(constexprs, ITERS=4), storage, num_warps)
    body = max((lines[a:b + 1] for a, b in loops(lines)), key=streaming_loads, default=[])
    loads = streaming_loads(body)
    if loads:
        if loads % streamed_inputs:
            raise ValueError(f"{loads} streaming loads in the loop, not a multiple of {streamed_inputs}")
        return opcodes(executed_path(body)), opcodes(body), loads // streamed_inputs, ptx, usage
    one, _, _ = _sass(dict(constexprs, ITERS=1), storage, num_warps)
    two, _, _ = _sass(dict(constexprs, ITERS=2), storage, num_warps)

    def diff(a, b):
        return list((collections.Counter(a) - collections.Counter(b)).elements())

    return diff(opcodes(executed_path(two)), opcodes(executed_path(one))), diff(opcodes(two), opcodes(one)), 1, ptx, usage


def count(name, constexprs, storage, per_thread, moved, num_warps, streamed_inputs) -> dict:
    executed, static, iterations, ptx, usage = iteration(constexprs, storage, num_warps, streamed_inputs)
    elements = per_thread * iterations  # per thread
    classes = collections.Counter(classify(op) for op in executed)
    per_elem = {c: classes.get(c, 0) / elements for c in ("MUFU", "FP32", "INT", "MEM", "other")}
    total = len(executed) / elements
    bounds = {  # G elements / s
        "issue": SMS * CLOCK_HZ * ISSUE_PER_SM / total / 1e9,
        "fp32": SMS * CLOCK_HZ * FP32_PER_SM / max(per_elem["FP32"], 1e-9) / 1e9,
        "int": SMS * CLOCK_HZ * INT_PER_SM / max(per_elem["INT"], 1e-9) / 1e9,
        "mufu": SMS * CLOCK_HZ * MUFU_PER_SM / max(per_elem["MUFU"], 1e-9) / 1e9,
        "memory": COPY_BYTES_PER_S / moved / 1e9,
    }
    return {"variant": name, "elements_per_thread_iteration": per_thread,
            "iteration_static": len(static) / iterations, "iteration_executed": len(executed) / iterations,
            "per_element": round(total, 1),
            "per_element_by_class": {c: round(v, 2) for c, v in per_elem.items()},
            "mufu_per_iteration": {op: n / iterations for op, n in collections.Counter(
                op for op in executed if op.startswith("MUFU")).items()},
            "ptx_approx": {op: len(re.findall(rf"\b{op}\.approx", ptx)) for op in ("lg2", "sin", "cos", "sqrt")},
            "precise_trig_table": "__cudart_i2opi_f" in ptx,
            "bytes_per_element": moved, "registers": usage["registers"], "spill_bytes": usage["local_bytes"],
            "bound_G_elements_per_s": {key: round(v) for key, v in bounds.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", default="", help="substring of the variant names to count")
    args = parser.parse_args(argv)
    rows = [count(*v) for v in variants() if args.only in v[0]]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print("| variant | SASS per iteration (executed / static) | per element | MUFU | FP32 | INT | MEM | other | "
          "registers | issue bound G el/s | memory bound G el/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        c = r["per_element_by_class"]
        b = r["bound_G_elements_per_s"]
        print(f"| {r['variant']} | {r['iteration_executed']:g} / {r['iteration_static']:g} | {r['per_element']} | {c['MUFU']} | "
              f"{c['FP32']} | {c['INT']} | {c['MEM']} | {c['other']} | {r['registers']} | {b['issue']} | {b['memory']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
