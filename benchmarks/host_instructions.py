"""Host cost of sfgrpo's per-call Python paths in CPU instructions, counted by valgrind's callgrind:
deterministic where wall time on a shared VM is not (this 2-core machine's timings of the same
call drift by 2x from day to day and by 20 % between runs), so an A/B of a host-path change needs
one run of each version, not a session's worth of medians.

    python benchmarks/host_instructions.py                  # every case, 2,000 calls each
    python benchmarks/host_instructions.py score_rows --calls 500

Each case runs in its own process under `valgrind --tool=callgrind --instr-atstart=no`: the import
and a warm-up run uninstrumented, then `callgrind_control -i on` / `off` brackets the timed calls
(the toggles themselves cost < 0.5 % of 1,000 calls), with Python's cyclic garbage collector off.
The launches are stubbed by host_path_stubs.py, as in bench_triton_host_path.py (Triton's runner a
no-op, CPU tensors) and bench_advantages_host_path.py (the CUDA engine a no-op, meta tensors), so
the count is sfgrpo's Python plus the torch calls it makes: on a GPU host, Triton's launcher and the
CUDA launch come on top. Needs valgrind.
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import re
import shutil
import subprocess
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
BATCH = 8
LATENT = (BATCH, 16, 8, 8)  # small: CPU allocation stays negligible; the host path does not depend on size


def _stubs():
    """benchmarks/host_path_stubs.py (the pytest benchmarks' fixtures use the same stubs)."""
    sys.path.insert(0, str(HERE))
    import host_path_stubs

    return host_path_stubs


def _stub_sde_step_launches() -> None:
    from sfgrpo.kernels import _launch

    if not _launch.enabled():
        raise RuntimeError(f"the direct launch path is off (TRITON_INTERPRET or {_launch.ENV_VAR} set)")
    stubs = _stubs()
    stubs.stub_sde_step_launches(stubs.setattr_patch)


def _stub_advantage_engine() -> None:
    stubs = _stubs()
    stubs.stub_advantage_engine(stubs.setattr_patch)


def _stub_norm_launches() -> None:
    stubs = _stubs()
    stubs.stub_norm_launches(stubs.setattr_patch)


def _norm_cases() -> dict:
    """An SD3.5-M block's adaLN calls on tiny activations (the host path does not depend on size):
    x / residual [1, 2, 64] bf16, shift / scale / gate chunks of a [1, 6 x 64] embedding; the fused
    ops (launches stubbed) and diffusers' eager expressions they replace, whose ATen ops compute on
    the CPU here (on 128 elements: a small part of each op's count). `_train`: the activations
    require grad (the modulation frozen, as under LoRA), forward and backward."""
    from bench_norms_gpu import diffusers_modulate, diffusers_residual_norm2

    from sfgrpo import functional as F

    _stub_norm_launches()
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(1, 2, 64, generator=g).bfloat16() for _ in range(2))
    shift, scale, gate = torch.randn(1, 6 * 64, generator=g).bfloat16().chunk(6, dim=1)[:3]
    grad = torch.ones_like(x)

    def train(step, n_inputs):
        def run():
            inputs = [t.detach().requires_grad_() for t in (x, y)[:n_inputs]]
            out = step(*inputs)
            torch.autograd.backward(out, (grad,) * len(out) if isinstance(out, tuple) else grad)
        return run

    fused_norm2 = lambda h, y: F.gated_residual_layer_norm_modulate(h, y, gate, scale, shift)  # noqa: E731
    diffusers_norm2 = lambda h, y: diffusers_residual_norm2(h, y, gate, scale, shift)  # noqa: E731
    return {
        "layer_norm_modulate": lambda: F.layer_norm_modulate(x, scale, shift),
        "diffusers_layer_norm_modulate": lambda: diffusers_modulate(x, scale, shift),
        "gated_residual_layer_norm_modulate": lambda: fused_norm2(x, y),
        "diffusers_gated_residual_layer_norm_modulate": lambda: diffusers_norm2(x, y),
        "layer_norm_modulate_train": train(lambda x: F.layer_norm_modulate(x, scale, shift), 1),
        "diffusers_layer_norm_modulate_train": train(lambda x: diffusers_modulate(x, scale, shift), 1),
        "gated_residual_layer_norm_modulate_train": train(fused_norm2, 2),
        "diffusers_gated_residual_layer_norm_modulate_train": train(diffusers_norm2, 2),
    }


def _sde_step_cases() -> dict:
    from sfgrpo import functional as F

    _stub_sde_step_launches()  # puts benchmarks/ on sys.path
    from bench_triton_host_path import _row_tensors

    g = torch.Generator().manual_seed(0)
    x = torch.randn(LATENT, generator=g).bfloat16()
    v = torch.randn(LATENT, generator=g).bfloat16()
    t, t_next, level = _row_tensors(x)
    sample = F.sde_step(x, v, 0.8, 0.7, seed=1).prev_sample
    weights = torch.randn(BATCH, generator=g)

    def score_numbers():  # the trainer's call: step values as numbers, a loss built on the log-prob
        vg = v.detach().requires_grad_()
        (F.sde_step(x, vg, 0.8, 0.7, 0.7, prev_sample=sample).log_prob * weights).sum().backward()

    def score_rows():  # bench_sde_step_gpu's scoring row: [B] step values, the per-row gradient given
        vg = v.detach().requires_grad_()
        torch.autograd.backward(F.sde_step(x, vg, t, t_next, level, prev_sample=sample).log_prob, weights)

    return {
        "sample_numbers": lambda: F.sde_step(x, v, 0.8, 0.7, 0.7, seed=1, return_x0_hat=True),
        "sample_rows": lambda: F.sde_step(x, v, t, t_next, level, seed=1, return_x0_hat=True),
        "score_numbers": score_numbers,
        "score_rows": score_rows,
    }


def _advantage_cases() -> dict:
    import sfgrpo

    _stub_advantage_engine()
    rewards = torch.empty(100_000, 11, device="meta")  # issue 5's 1M gains (meta: no data)
    ids = torch.empty(100_000, dtype=torch.int64, device="meta")
    return {"gain_advantages_cuda_path": lambda: sfgrpo.gain_advantages(rewards, ids, nonfinite="drop")}


def _scale_case() -> dict:
    x = torch.ones(LATENT)
    return {"one_eager_op": lambda: x.mul(2)}  # for scale: one ATen op from Python


# each case's builder: one process builds only its own group's stubs
_BUILDER = {
    **dict.fromkeys(("sample_numbers", "sample_rows", "score_numbers", "score_rows"), _sde_step_cases),
    "gain_advantages_cuda_path": _advantage_cases,
    **dict.fromkeys([f"{prefix}{op}{suffix}" for suffix in ("", "_train") for op in (
        "layer_norm_modulate", "gated_residual_layer_norm_modulate") for prefix in ("", "diffusers_")], _norm_cases),
    "one_eager_op": _scale_case,
}
CASES = tuple(_BUILDER)


def build(case: str):
    """The callable of `case`, with its stubs in place (for this process's lifetime)."""
    return _BUILDER[case]()[case]


def _child(case: str, calls: int) -> None:
    """Runs inside callgrind: warm up uninstrumented, then count `calls` calls."""
    fn = build(case)
    for _ in range(200):  # first-call work (compiled-kernel lookups, caches) stays out of the count
        fn()
    pid = str(os.getpid())
    # Python's cyclic GC off while counting: its collections cost what the whole heap holds (the
    # imports, the stubs' modules), not what the call does; with it on, moving a stub to another
    # module moved a fused norm's count by 2 %
    gc.collect()
    gc.disable()
    subprocess.run(["callgrind_control", "-i", "on", pid], check=True, stdout=subprocess.DEVNULL)
    for _ in range(calls):
        fn()
    subprocess.run(["callgrind_control", "-i", "off", pid], check=True, stdout=subprocess.DEVNULL)
    gc.enable()


def count(case: str, calls: int) -> int:
    """Instructions per call of `case` (a fresh process under callgrind)."""
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--callgrind-out-file=/dev/null",
               sys.executable, str(pathlib.Path(__file__).resolve()), "--child", case, "--calls", str(calls)]
    env = {name: value for name, value in os.environ.items() if name != "SFGRPO_TRITON_DIRECT_LAUNCH"}
    # one thread: callgrind counts every thread's instructions, and ATen's CPU ops would otherwise
    # wake OpenMP workers that spin (the diffusers cases' counts tripled)
    env.update(TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{case}: callgrind run failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1)) // calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", help=f"any of {', '.join(CASES)} (default: all)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--check", action="store_true",
                        help="build and call each case a few times without valgrind (a smoke test)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.calls)
        return 0
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {CASES}")
    if args.check:
        for case in args.cases or CASES:
            fn = build(case)
            for _ in range(3):
                fn()
            print(f"{case}: ok")
        return 0
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found (install valgrind)")
    print(f"| case | instructions per call ({args.calls} calls, callgrind) |\n|---|---:|")
    for case in args.cases or CASES:
        print(f"| {case} | {count(case, args.calls):,} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
