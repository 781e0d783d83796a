"""Ahead-of-time compilation of the Triton kernels for sm_90 without a GPU, and a PTX report.

`python -m sfgrpo.kernels._aot` compiles every variant listed by the kernel modules'
`aot_variants()` with `triton.compile(..., GPUTarget("cuda", 90, 32))`, reads the PTX's global
access widths and transcendental instructions (approximate or libdevice's precise ones) and the
cubin's registers / stack / local memory (spills), and prints one JSON object per variant.
`--other-archs` compiles the same variants for sm_80 and sm_89 (compiled or the error, registers,
spills); `--unit-integers` every kernel with its integer arguments equal to 1. Run it without
TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SM90 = ("cuda", 90, 32)
# the other architecture generations the wheel's native module is built for (SFGRPO_CUDA_ARCHS'
# default): A100 (sm_80; sm_86, A10 / RTX 30xx, has its features) and L4 / L40 / RTX 40xx (sm_89).
# Triton compiles for them on the user's machine: a kernel that does not compile there would fail
# at its first launch
OTHER_ARCHS = (80, 89)
KERNEL_MODULES = ("sde_step", "rms_norm", "layer_norm_modulate", "gated_residual", "qk_norm_rope")


def _cuobjdump() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def compile_sm90(fn, arg_types: dict, constexprs: dict, num_warps: int, divisible=("D",), arch: int = 90):
    """`triton.compile` of one variant for sm_90 (or `arch`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {name: arg_types.get(name, "constexpr") for name in names}
    # what the launcher's specialisation sees for aligned tensors and integers that are multiples of
    # 16 (`divisible`: the SDE step's D; a kernel module may name its own, such as row strides)
    aligned = [name for name in names if arg_types.get(name, "").startswith("*") or name in divisible]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget(SM90[0], arch, SM90[2]), options={"num_warps": num_warps, "enable_fp_fusion": False})
    return compiled


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local memory of the cubin Triton's own ptxas produced (spills show up
    as stack / local bytes), read with cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return {"registers": None, "stack_bytes": None, "shared_bytes": None, "local_bytes": None}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return {"registers": int(usage.group(1)), "stack_bytes": int(usage.group(2)), "shared_bytes": int(usage.group(3)),
            "local_bytes": int(usage.group(4))}


def global_access_widths(ptx: str) -> dict:
    """Counts of 128-bit (`.v4` of 32-bit words) and narrower global loads/stores in the PTX."""
    # modifiers may carry "::" (cache hints: .L1::evict_last.L2::cache_hint)
    accesses = re.findall(r"\b(ld|st)\.global((?:\.[\w:]+)*)", ptx)
    wide = lambda kind: sum(1 for op, mods in accesses if op == kind and ".v4" in mods and (".b32" in mods or ".f32" in mods))  # noqa: E731
    return {"loads_128bit": wide("ld"), "stores_128bit": wide("st"),
            "loads_narrow": sum(1 for op, _ in accesses if op == "ld") - wide("ld"),
            "stores_narrow": sum(1 for op, _ in accesses if op == "st") - wide("st"),
            # cross-program hand-offs: acquire/release atomics, and loads that skip the (incoherent) L1
            "atomics_acq_rel": len(re.findall(r"\batom\.(?:\w+\.)*acq_rel", ptx)),
            "loads_cg": sum(1 for op, mods in accesses if op == "ld" and ".cg" in mods),
            # L2 eviction priorities (kernels.sde_step.L2_HINTS): policies made, and loads that use one
            "l2_evict_last": len(re.findall(r"createpolicy\.\w+\.L2::evict_last", ptx)),
            "l2_evict_first": len(re.findall(r"createpolicy\.\w+\.L2::evict_first", ptx)),
            "loads_l2_hinted": sum(1 for op, mods in accesses if op == "ld" and "L2::cache_hint" in mods)}


def transcendentals(ptx: str) -> dict:
    """How the PTX computes log/sin/cos/sqrt/division: counts of the approximate instructions (`lg2.approx`,
    `sin.approx`, `cos.approx`, `sqrt.approx`: one MUFU each in SASS) and whether libdevice's
    precise sinf/cosf are there (their Payne-Hanek table `__cudart_i2opi_f`; the precise logf is
    an inlined polynomial with no instruction of its own)."""
    return {"lg2_approx": len(re.findall(r"\blg2\.approx", ptx)), "sin_approx": len(re.findall(r"\bsin\.approx", ptx)),
            "cos_approx": len(re.findall(r"\bcos\.approx", ptx)), "sqrt_approx": len(re.findall(r"\bsqrt\.approx", ptx)),
            "precise_trig": "__cudart_i2opi_f" in ptx,
            # IEEE-rounded division / square root (rms_norm mirrors torch's CPU rsqrt = 1 / sqrt)
            # against the 2-ulp div.full / approximate forms that Triton's `/` and tl.sqrt give
            "div_rn": len(re.findall(r"\bdiv\.rn\.f32", ptx)), "sqrt_rn": len(re.findall(r"\bsqrt\.rn\.f32", ptx)),
            "div_inexact": len(re.findall(r"\bdiv\.(?:full|approx)\.f32", ptx))}


def report(modules=KERNEL_MODULES) -> list[dict]:
    import importlib

    rows = []
    for module_name in modules:
        module = importlib.import_module(f"sfgrpo.kernels.{module_name}")
        # a variant may end with the names of its integer arguments that are multiples of 16
        for name, fn, arg_types, constexprs, num_warps, *divisible in module.aot_variants():
            compiled = compile_sm90(fn, arg_types, constexprs, num_warps, *divisible)
            ptx = compiled.asm["ptx"]
            target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
            rows.append({"variant": f"{module_name}/{name}", "target": target, **global_access_widths(ptx),
                         **transcendentals(ptx), **resource_usage(compiled.asm["cubin"])})
    return rows


def arch_report(archs=OTHER_ARCHS, modules=KERNEL_MODULES) -> list[dict]:
    """Every variant compiled for each of `archs`: one row per (variant, arch), compiled or the
    error, with the cubin's registers and spills."""
    import importlib

    rows = []
    for module_name in modules:
        module = importlib.import_module(f"sfgrpo.kernels.{module_name}")
        for name, fn, arg_types, constexprs, num_warps, *divisible in module.aot_variants():
            for arch in archs:
                row = {"variant": f"{module_name}/{name}", "arch": arch}
                try:
                    compiled = compile_sm90(fn, arg_types, constexprs, num_warps, *divisible, arch=arch)
                    row.update(compiled=True, **resource_usage(compiled.asm["cubin"]))
                except Exception as err:  # noqa: BLE001 - reported, the test names the variant
                    row.update(compiled=False, error=f"{type(err).__name__}: {str(err)[-400:]}")
                rows.append(row)
    return rows


def unit_integer_report(modules=KERNEL_MODULES) -> list[dict]:
    """Triton passes an integer argument equal to 1 as a constexpr (a Python int inside the kernel:
    `D.to(tl.float32)` fails to compile there, `D * 1.0` does not). Compiles every kernel function
    once (its first variant) with all its integer arguments set to 1, the way a launch with
    D = 1, N = 1, one chunk, ... specialises it; one row per kernel: compiled or the error."""
    import importlib

    rows, seen = [], set()
    for module_name in modules:
        module = importlib.import_module(f"sfgrpo.kernels.{module_name}")
        for name, fn, arg_types, constexprs, num_warps, *divisible in module.aot_variants():
            if fn in seen:
                continue
            seen.add(fn)
            ints = [arg for arg, kind in arg_types.items() if kind in ("i32", "i64")]
            types = {arg: kind for arg, kind in arg_types.items() if arg not in ints}
            kept = tuple(arg for arg in (divisible[0] if divisible else ("D",)) if arg not in ints)
            row = {"kernel": f"{module_name}/{fn.fn.__name__}", "ones": ints}
            try:
                compile_sm90(fn, types, {**constexprs, **{arg: 1 for arg in ints}}, num_warps, kept)
                row["compiled"] = True
            except Exception as err:  # noqa: BLE001 - reported, the test names the kernel
                row.update(compiled=False, error=f"{type(err).__name__}: {str(err)[-400:]}")
            rows.append(row)
    return rows


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    args = sys.argv[1:]
    if "--unit-integers" in args:
        rows = unit_integer_report()
    elif "--other-archs" in args:
        rows = arch_report()
    else:
        rows = report()
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
