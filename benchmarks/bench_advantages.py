"""Advantage engine vs Flow-GRPO's per-prompt loop (SPEC §7) and vs the PyTorch reference.

Two ways to run it (from the repository root, with sfgrpo installed):

    pytest benchmarks/bench_advantages.py --benchmark-enable     # pytest-benchmark tables
    python benchmarks/bench_advantages.py [--out FILE] [--quick] # markdown table (+ GPU section)

Sizes: 1,152 samples / 48 prompts, 24,576 / 1,024, 65,536 / 4,096 (group of 24, 24, 16), one
reward per sample (Flow-GRPO) and T = 10 stepwise gains per sample (Stepwise-Flow-GRPO). With a
CUDA GPU the script also times 1M gains (100k trajectories x 10 steps) with CUDA events.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from unittest import mock

import numpy as np
import pytest
import torch

import sfgrpo
from sfgrpo.bench.runner import environment
from sfgrpo.ops import advantages as advantage_ops

SIZES = [(1_152, 48), (24_576, 1_024), (65_536, 4_096)]
STEPS = 10


# ------------------------------------------------------------------------- Flow-GRPO baseline
class PerPromptStatTracker:
    """Flow-GRPO's tracker (flow_grpo/stat_tracking.py, type 'grpo'), restated faithfully: string
    prompts, numpy masks `prompts == prompt` per unique prompt (twice), population std,
    `(r - mean) / (std + 1e-4)`, `global_std` = np.std of every reward of the batch."""

    def __init__(self, global_std: bool = False):
        self.global_std = global_std
        self.stats: dict = {}

    def update(self, prompts, rewards):
        prompts = np.array(prompts)
        rewards = np.array(rewards, dtype=np.float64)
        unique = np.unique(prompts)
        advantages = np.empty_like(rewards) * 0.0
        for prompt in unique:
            self.stats.setdefault(prompt, []).extend(rewards[prompts == prompt])
        for prompt in unique:
            self.stats[prompt] = np.stack(self.stats[prompt])
            prompt_rewards = rewards[prompts == prompt]
            mean = np.mean(self.stats[prompt], axis=0, keepdims=True)
            spread = rewards if self.global_std else self.stats[prompt]
            std = np.std(spread, axis=0, keepdims=True) + 1e-4
            advantages[prompts == prompt] = (prompt_rewards - mean) / std
        return advantages


def flow_grpo_advantages(prompts, rewards, global_std=False):
    return PerPromptStatTracker(global_std).update(prompts, rewards)


def loop_gain_advantages(ids: np.ndarray, rewards: np.ndarray, eps: float = 1e-8):
    """The same per-prompt mask loop applied to stepwise gains (joint normalisation): what a
    straightforward port of Flow-GRPO's tracker to Stepwise-Flow-GRPO looks like."""
    gains = rewards[:, 1:] - rewards[:, :-1]
    advantages = np.zeros_like(gains)
    for gid in np.unique(ids):
        rows = ids == gid
        block = gains[rows]
        advantages[rows] = (block - block.mean()) / (block.std() + eps)
    return advantages


# ------------------------------------------------------------------------------------ inputs
def make_batch(samples: int, prompts: int, seed: int = 0):
    """Samples of `prompts` prompts, shuffled like a gathered multi-rank batch."""
    rng = np.random.default_rng(seed)
    prompt_of = rng.permutation(np.arange(samples) % prompts)
    texts = [f"a photo of prompt number {p} with some descriptive words" for p in prompt_of]
    ids = torch.from_numpy(prompt_of.astype(np.int64))
    flow = torch.from_numpy(rng.random(samples))
    stepwise = torch.from_numpy(rng.random((samples, STEPS + 1)).astype(np.float32))
    return texts, ids, flow, stepwise


def ids_from_prompts(prompts) -> torch.Tensor:
    """What a caller holding only prompt strings does first: one dict pass, O(N)."""
    index: dict = {}
    return torch.tensor([index.setdefault(p, len(index)) for p in prompts], dtype=torch.int64)


# --------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def batch(request):
    return make_batch(*request.param)


def test_flow_grpo_loop(benchmark, batch):
    texts, _, flow, _ = batch
    benchmark.pedantic(flow_grpo_advantages, args=(texts, flow.numpy()), rounds=3, iterations=1)


def test_native_group_advantages(benchmark, batch):
    texts, ids, flow, _ = batch
    out = benchmark(sfgrpo.group_advantages, flow, ids, backend="native")
    np.testing.assert_allclose(out.numpy(), flow_grpo_advantages(texts, flow.numpy()), rtol=1e-9, atol=1e-9)


def test_native_group_advantages_from_strings(benchmark, batch):
    texts, _, flow, _ = batch
    benchmark(lambda: sfgrpo.group_advantages(flow, ids_from_prompts(texts), backend="native"))


def test_reference_group_advantages(benchmark, batch):
    _, ids, flow, _ = batch
    benchmark(sfgrpo.group_advantages, flow, ids, backend="reference")


def test_loop_gain_advantages(benchmark, batch):
    _, ids, _, stepwise = batch
    benchmark.pedantic(loop_gain_advantages, args=(ids.numpy(), stepwise.numpy()), rounds=3, iterations=1)


def test_native_gain_advantages(benchmark, batch):
    _, ids, _, stepwise = batch
    benchmark(sfgrpo.gain_advantages, stepwise, ids, backend="native")


def test_reference_gain_advantages(benchmark, batch):
    _, ids, _, stepwise = batch
    benchmark(sfgrpo.gain_advantages, stepwise, ids, backend="reference")


# ------------------------------------------------------------------------------ plain script
def timings(fn, *, min_rounds: int = 5, budget_s: float = 1.0) -> list[float]:
    fn()  # warm-up (first-call costs: op registration, allocator)
    times, start = [], time.perf_counter()
    while len(times) < min_rounds or (time.perf_counter() - start < budget_s and len(times) < 2000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def best_seconds(fn, **kwargs) -> float:
    """Best of repeated runs: on a machine shared with other jobs the minimum is the stable
    estimate of a call's own cost (medians there swing with the neighbours' load)."""
    return min(timings(fn, **kwargs))


def cpu_table(sizes, quick: bool) -> list[str]:
    slow_rounds = 1 if quick else 3
    rows = [
        "| samples / prompts | Flow-GRPO loop | sfgrpo native (median) | speed-up | native incl. strings->ids "
        "| reference (torch) | native µs/sample |",
        "|---|---|---|---|---|---|---|",
    ]
    gain_rows = [
        "| trajectories x T | gains | per-prompt loop (numpy) | sfgrpo native (median) | speed-up | reference (torch) "
        "| native ns/gain |",
        "|---|---|---|---|---|---|---|",
    ]
    for samples, prompts in sizes:
        texts, ids, flow, stepwise = make_batch(samples, prompts)
        loop = best_seconds(lambda: flow_grpo_advantages(texts, flow.numpy()), min_rounds=slow_rounds, budget_s=0)
        native_times = timings(lambda: sfgrpo.group_advantages(flow, ids, backend="native"))
        native = min(native_times)
        strings = best_seconds(lambda: sfgrpo.group_advantages(flow, ids_from_prompts(texts), backend="native"))
        ref = best_seconds(lambda: sfgrpo.group_advantages(flow, ids, backend="reference"))
        rows.append(
            f"| {samples:,} / {prompts:,} | {fmt(loop)} | {fmt(native)} ({fmt(statistics.median(native_times))}) | "
            f"**{loop / native:,.0f}x** | {fmt(strings)} | {fmt(ref)} | {native / samples * 1e6:.3f} |"
        )
        gloop = best_seconds(lambda: loop_gain_advantages(ids.numpy(), stepwise.numpy()), min_rounds=slow_rounds,
                             budget_s=0)
        gnative_times = timings(lambda: sfgrpo.gain_advantages(stepwise, ids, backend="native"))
        gnative = min(gnative_times)
        gref = best_seconds(lambda: sfgrpo.gain_advantages(stepwise, ids, backend="reference"))
        gains = samples * STEPS
        gain_rows.append(
            f"| {samples:,} x {STEPS} | {gains:,} | {fmt(gloop)} | {fmt(gnative)} ({fmt(statistics.median(gnative_times))}) | "
            f"**{gloop / gnative:,.0f}x** | {fmt(gref)} | {gnative / gains * 1e9:.1f} |"
        )
    return ["### One reward per sample (Flow-GRPO `PerPromptStatTracker`, group std)", "", *rows, "",
            "### Stepwise gains (joint normalisation, float32 rewards `[N, 11]`)", "", *gain_rows]


def gpu_section() -> list[str]:
    if not torch.cuda.is_available():
        return ["### GPU", "", "No CUDA device on this machine: GPU section skipped."]
    device = torch.device("cuda")
    lines = ["### GPU (CUDA events, 1M gains = 100,000 trajectories x 10 steps, groups of 16)", "",
             f"device: {torch.cuda.get_device_name(device)}", "",
             "`call`: one eager call between two events (host work included; calls without statistics "
             "are one cooperative launch); `GPU only`: replay of the call captured in a CUDA graph (kernel "
             "time, no Python, no launch overhead; graphs capture the memset + 3 kernels path, not the "
             "cooperative launch; n/a for calls that synchronise); `host`: wall time per call of 50 back-to-back eager calls without a "
             "sync (the Python path and the launches, while the GPU queue absorbs the kernels; n/a for "
             "calls that synchronise).", "",
             "| case | call, median µs | GPU only (graph replay), median µs | host, µs per call |",
             "|---|---|---|---|"]
    samples = 100_000
    # ids permuted: a group's rows scattered over the batch (the goal's case, the engine's worst);
    # `sorted_ids`: a prompt's samples side by side, as a sampler that repeats each prompt lays them out
    ids = torch.from_numpy(np.random.default_rng(0).permutation(np.arange(samples) // 16)).to(device)
    sorted_ids = torch.from_numpy(np.arange(samples) // 16).to(device)
    rewards = torch.rand(samples, STEPS + 1, device=device)
    flow = torch.rand(samples, device=device)
    four_columns = torch.rand(samples, 4, device=device)  # several rewards per sample: one statistic per column
    cases = {
        GAIN_CASE: lambda: sfgrpo.gain_advantages(rewards, ids, nonfinite="drop"),
        "gain_advantages joint, drop, a prompt's rows side by side": lambda: sfgrpo.gain_advantages(
            rewards, sorted_ids, nonfinite="drop"),
        "gain_advantages per_step, drop": lambda: sfgrpo.gain_advantages(rewards, ids, normalize="per_step",
                                                                          nonfinite="drop"),
        "gain_advantages per_step, drop, a prompt's rows side by side": lambda: sfgrpo.gain_advantages(
            rewards, sorted_ids, normalize="per_step", nonfinite="drop"),
        MULTI_KERNEL_CASE: lambda: sfgrpo.gain_advantages(rewards, ids, nonfinite="drop"),
        GLOBAL_ROWS_CASE: lambda: sfgrpo.gain_advantages(rewards, ids, nonfinite="drop"),
        GLOBAL_ROWS_PER_STEP_CASE: lambda: sfgrpo.gain_advantages(rewards, ids, normalize="per_step",
                                                                   nonfinite="drop"),
        "gain_advantages joint, error (1 sync)": lambda: sfgrpo.gain_advantages(rewards, ids),
        "group_advantages 100k samples, drop": lambda: sfgrpo.group_advantages(flow, ids, nonfinite="drop"),
        "group_advantages global std, drop": lambda: sfgrpo.group_advantages(flow, ids, std="global",
                                                                              nonfinite="drop"),
        "group_advantages 100k samples x 4 reward columns, drop": lambda: sfgrpo.group_advantages(
            four_columns, ids, nonfinite="drop"),
        "reference gain_advantages (torch)": lambda: sfgrpo.gain_advantages(rewards, ids, backend="reference"),
    }
    def event_times(fn, reps=50):
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)

    def host_time(fn, reps=50, rounds=5):
        best = float("inf")
        for _ in range(rounds):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - start) / reps * 1e6)
            torch.cuda.synchronize()
        return best

    for name, fn in cases.items():
        with case_environment(name):
            lines.append(gpu_row(name, fn, event_times, host_time))
    lines += ["", *kernel_breakdown(cases), "", *host_breakdown(cases[GAIN_CASE], rewards, host_time)]
    return lines


GAIN_CASE = "gain_advantages joint, drop (sync-free)"


class _NoLaunchEngine:
    """sfgrpo._C.cuda with its launch replaced by a no-op (the workspace size query is real)."""

    def __init__(self, engine):
        self.advantages_workspace_bytes = engine.advantages_workspace_bytes

    def advantages(self, *args):
        return None


def host_breakdown(gain_call, rewards, host_time) -> list[str]:
    """Where the 1M-gain call's host time goes: sfgrpo's Python (validation, the output, the stream's
    workspace, the pybind call's arguments) with the engine's launch replaced by a no-op, against the
    whole call and two plain PyTorch calls of this host for scale."""
    lines = ["Host time per call (back to back, best of 5 x 50):", "", "| call | µs per call |", "|---|---:|"]
    small = torch.ones(16, device=rewards.device)
    whole_call = host_time(gain_call)
    stub = _NoLaunchEngine(advantage_ops._cuda_engine())
    with mock.patch.object(advantage_ops, "_cuda_engine", lambda: stub):
        python_only = host_time(gain_call)
    for label, us in (
        ("gain_advantages joint, drop (the whole call: Python + one cooperative launch)", whole_call),
        ("the same, the engine's launch replaced by a no-op (Python, output, workspace)", python_only),
        ("one eager PyTorch op (x.mul(2), 16 elements)", host_time(lambda: small.mul(2))),
        ("torch.empty of the advantages' size",
         host_time(lambda: torch.empty(rewards.shape[0], STEPS, device=rewards.device))),
    ):
        lines.append(f"| {label} | {us:.1f} |")
    return lines


# The same call as the first row on the memset + three kernels that the single cooperative launch
# replaces (the A/B of SFGRPO_ADVANTAGES_COOPERATIVE); CUDA graphs capture that path in every row.
MULTI_KERNEL_CASE = "gain_advantages joint, drop, memset + 3 kernels"
# The first and third rows with every phase reading the rows from global memory instead of the
# shared-memory stage (the A/B of SFGRPO_ADVANTAGES_STAGE_ROWS, same bits)
GLOBAL_ROWS_CASE = "gain_advantages joint, drop, rows not staged"
GLOBAL_ROWS_PER_STEP_CASE = "gain_advantages per_step, drop, rows not staged"
_CASE_SWITCHES = {MULTI_KERNEL_CASE: "SFGRPO_ADVANTAGES_COOPERATIVE", GLOBAL_ROWS_CASE: "SFGRPO_ADVANTAGES_STAGE_ROWS",
                  GLOBAL_ROWS_PER_STEP_CASE: "SFGRPO_ADVANTAGES_STAGE_ROWS"}


def case_environment(name: str):
    """The case's A/B switch set to 0 while it runs (the engine reads them per call); none for the others."""
    switch = _CASE_SWITCHES.get(name)
    return environment(switch, "0") if switch else contextlib.nullcontext()


def synchronises(case: str) -> bool:
    """Whether a GPU case's call waits for the device (`nonfinite="error"` reads a count back, the
    reference engine syncs): no host-time or graph row, no kernel profile."""
    return "(1 sync)" in case or "reference" in case


def gpu_row(name: str, fn, event_times, host_time) -> str:
    """One row of the GPU table: eager call, graph replay, host time per call."""
    for _ in range(5):
        fn()
    call = event_times(fn)
    syncs = synchronises(name)
    host = "n/a" if syncs else f"{host_time(fn):.1f}"
    graph_time = "n/a"
    if not syncs:  # calls that synchronise cannot be captured
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()  # warm-up on the capture stream
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                fn()
            graph_time = f"{event_times(graph.replay):.1f}"
        except Exception as err:  # noqa: BLE001 - reported in the table
            graph_time = f"capture failed ({type(err).__name__})"
    return f"| {name} | {call:.1f} | {graph_time} | {host} |"


def kernel_breakdown(cases: dict) -> list[str]:
    """Device time of every kernel and memset of the sync-free native cases (torch.profiler), so a
    GPU run says which phase of the engine to shrink next."""
    lines = ["Kernels (torch.profiler, 20 calls each; µs per call = device time / 20):", "",
             "| case | kernel | µs per call |", "|---|---|---|"]
    try:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in cases.items():
            if synchronises(name):
                continue
            with case_environment(name):
                fn()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        fn()
                    torch.cuda.synchronize()
            for event in prof.key_averages():
                total = getattr(event, "device_time_total", None)
                if total is None:
                    total = getattr(event, "cuda_time_total", 0.0)
                if total > 0 and getattr(event, "device_type", None) != torch.autograd.DeviceType.CPU:
                    kernel = event.key if len(event.key) <= 90 else event.key[:87] + "..."
                    lines.append(f"| {name} | `{kernel}` | {total / 20:.1f} |")
    except Exception as err:  # noqa: BLE001 - reported, the timings above stand
        lines.append(f"| profiler failed | {type(err).__name__}: {err} | |")
    return lines


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown here as well as to stdout")
    parser.add_argument("--quick", action="store_true", help="one round of the slow baselines")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU section (no CPU tables)")
    args = parser.parse_args(argv)
    from sfgrpo.ops import advantages as ops

    header = [
        "# Advantage engine benchmark",
        "",
        f"machine: {cpu_model()}, {os.cpu_count()} cores "
        f"(`{platform.platform()}`); Python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}, sfgrpo {sfgrpo.__version__}; native threads: "
        f"{ops.get_num_threads() or 'auto'}. Best of repeated runs, native medians in parentheses "
        f"(baseline loops: best of {'1 run' if args.quick else '3 runs'}); times include the Python call. "
        "Speed-ups compare best with best.",
        "",
    ]
    cpu = [] if args.gpu_only else cpu_table(SIZES, args.quick) + [""]
    lines = header + cpu + gpu_section() + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    sys.exit(main())
