"""GPU benchmark of the fused SDE step against eager PyTorch, torch.compile and Flow-GRPO's formulas.

    python benchmarks/bench_sde_step_gpu.py                 # full suite, writes benchmarks/results/
    python benchmarks/bench_sde_step_gpu.py --quick         # two shapes, a smoke run

In one run, for SD3.5-M latents (B 8-32 x 16x64x64 and 16x128x128), FLUX packed latents
(B x 4096 x 64) and a video latent (2 x 16x21x60x104), bf16 and fp32 storage, it times
  sample        draw x' + per-row log-prob + Tweedie x0_hat (what a rollout step needs)
  score         log-prob of a stored sample, forward + backward to v (the PPO update); the
                per-row gradient is handed to autograd, so no loss kernels are timed
  score_kl      the same with the KL to a reference velocity (beta > 0)
for: `fused` (sfgrpo's Triton kernels; Philox noise for sampling), `fused_noise` (given eps),
`eager` (sfgrpo.reference), `compiled` (torch.compile of the reference), `flow_grpo` (the
Flow-GRPO formulation: per-row sigma lookup with host syncs, separate ops, a second call for the
KL) and `compat` (sfgrpo.compat.flow_grpo.sde_step_with_logprob, the drop-in with the same
signature: fp32 casts + device-side sigma lookup + the fused op). Reports time per lone call (latency, host overhead included) and per call when 20 run
back-to-back (throughput: the host runs ahead of the GPU), effective GB/s (bytes the fused
algorithm must move / time), % of the device's measured copy bandwidth, speed-up of `fused` over
each baseline, the GPU-only time (the call captured in a CUDA graph and replayed) and host syncs
per call. GPU-only bandwidth is also given against a device copy of the same bytes, replayed the
same way (`pct_same_size_copy_gpu_only`): a 5 MB step cannot reach the bandwidth of a 1 GiB copy
(launch and ramp-up take a few microseconds whatever the kernel), but it can match a copy of its
own size.
Writes CSV + JSON (GPU name, versions) under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import torch

from sfgrpo.bench import flow_grpo_code as fg  # noqa: E402
from sfgrpo.bench.measure import SyncCounter  # noqa: E402

from sfgrpo import functional as F  # noqa: E402
from sfgrpo import reference as ref  # noqa: E402
from sfgrpo.schedules import Schedule  # noqa: E402

SHAPES = {
    "sd35m_b8_64": (8, 16, 64, 64),
    "sd35m_b32_64": (32, 16, 64, 64),
    "sd35m_b8_128": (8, 16, 128, 128),
    "sd35m_b32_128": (32, 16, 128, 128),
    "flux_b16_4096x64": (16, 4096, 64),
    "video_b2_16x21x60x104": (2, 16, 21, 60, 104),
}
QUICK = ("sd35m_b8_64", "flux_b16_4096x64")
STEP = 3  # a middle step of the SD3 10-step grid


def time_ms(fn, warmup=5, reps=30, calls=1) -> float:
    """Median over `reps` of the time per call of `calls` back-to-back calls between two events.
    calls=1: the latency of a lone call (host work included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    times.sort()
    return times[len(times) // 2]


def time_pipelined_ms(fn) -> float:
    """Per call, 20 calls back to back: the host enqueues ahead of the GPU, so this is
    max(host time, GPU time) per call, the training-loop throughput. The median of 11 such runs: these
    rows are host-bound, and the GPU machines' hosts are noisy (with 5, the same fused call's rows
    differed by 40 % between two dtypes of equal host work on an H200)."""
    return time_ms(fn, warmup=3, reps=11, calls=20)


def time_graph_ms(fn) -> float:
    """GPU-only time per call: `fn` captured in a CUDA graph and replayed (no Python, no launch
    overhead). NaN when `fn` cannot be captured (it synchronises with the host)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_ms(graph.replay, warmup=3, reps=20)
    except Exception:  # noqa: BLE001 - host syncs, or ops that cannot be captured
        torch.cuda.synchronize()
        return math.nan


def count_syncs(fn) -> int:
    """Host syncs of one call after a warm-up call (sfgrpo bench's counter)."""
    fn()
    torch.cuda.synchronize()
    counter = SyncCounter(torch.device("cuda"))
    with counter.counting():
        fn()
    torch.cuda.synchronize()
    return counter.take()


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def same_size_copy_ms(nbytes: int) -> float:
    """GPU-only time of a device copy that reads and writes `nbytes` in total, captured in a CUDA
    graph and replayed like the steps."""
    src = torch.empty(max(1, nbytes // 8), dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = time_graph_ms(lambda: dst.copy_(src))
    del src, dst
    return ms


def make_cases(shape, dtype, schedule):
    device = "cuda"
    batch = shape[0]
    x = torch.randn(shape, device=device).to(dtype)
    v = torch.randn(shape, device=device).to(dtype)
    v_ref = (v.float() + 0.01 * torch.randn(shape, device=device)).to(dtype)
    noise = torch.randn(shape, device=device)
    t = schedule.t[STEP].to(device).expand(batch).contiguous()
    tn = schedule.t_next[STEP].to(device).expand(batch).contiguous()
    level = torch.full((batch,), 0.7, device=device)
    sample = F.sde_step(x, v, t, tn, level, seed=0).prev_sample
    weights = torch.randn(batch, device=device)
    sigmas, timesteps = schedule.sigmas.to(device), schedule.timesteps.to(device)
    timestep = timesteps[STEP].expand(batch)

    def eager_sample():
        # returns what the fused call returns: a compiled function without outputs would be
        # dead-code-eliminated to nothing by inductor
        out = ref.sde_step(x, v, t, tn, level, noise=torch.randn(shape, device=device))
        return out.prev_sample, out.log_prob, out.x0_hat

    def flow_sample():
        out = fg.sde_step_with_logprob(sigmas, timesteps, v, timestep, x, 0.7)
        return out, x.float() - sigmas[STEP] * v.float()  # x0_hat for the stepwise rewards

    kl_weights = torch.full((batch,), 0.01, device=device)

    def score(step_fn, with_kl):
        # the per-row gradients a loss `(log_prob * weights).sum() + 0.01 * kl.sum()` would send,
        # handed to autograd directly: the timed work is the step's forward and backward only (the
        # loss's own mul / sum / fill kernels, ~4 launches of a few us each whatever the step, are
        # the caller's and would dominate the small shapes' GPU time; the bytes counted are the step's)
        def run():
            vg = v.detach().requires_grad_()
            out = step_fn(vg, with_kl)
            if with_kl:  # Flow-GRPO's KL is [B, 1, ...]: the view matches it (a no-op view for the others)
                torch.autograd.backward((out[0], out[1]), (weights, kl_weights.view(out[1].shape)))
            else:
                torch.autograd.backward(out[0], weights)
        return run

    def fused_score(vg, with_kl):
        out = F.sde_step(x, vg, t, tn, level, prev_sample=sample, v_ref=v_ref if with_kl else None)
        return out.log_prob, out.kl

    def eager_score(vg, with_kl):
        out = ref.sde_step(x, vg, t, tn, level, prev_sample=sample, v_ref=v_ref if with_kl else None)
        return out.log_prob, out.kl

    compiled_step = torch.compile(eager_score, fullgraph=True)

    def flow_score(vg, with_kl):
        _, log_prob, mean, std_dev_t = fg.sde_step_with_logprob(sigmas, timesteps, vg, timestep, x, 0.7, prev_sample=sample)
        kl = None
        if with_kl:
            with torch.no_grad():
                _, _, mean_ref, _ = fg.sde_step_with_logprob(sigmas, timesteps, v_ref, timestep, x, 0.7, prev_sample=sample)
            kl = fg.kl_to_reference(mean, mean_ref, std_dev_t)
        return log_prob, kl

    compiled_sample = torch.compile(eager_sample, fullgraph=True)

    from diffusers import FlowMatchEulerDiscreteScheduler

    from sfgrpo.compat import flow_grpo as compat

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(len(schedule.t), device=device)

    def compat_score(vg, with_kl):
        _, log_prob, mean, std_dev_t = compat.sde_step_with_logprob(scheduler, vg, timestep, x, 0.7, prev_sample=sample)
        kl = None
        if with_kl:
            with torch.no_grad():
                _, _, mean_ref, _ = compat.sde_step_with_logprob(scheduler, v_ref, timestep, x, 0.7, prev_sample=sample)
            kl = fg.kl_to_reference(mean, mean_ref, std_dev_t)
        return log_prob, kl
    return {
        "sample": {
            "fused": lambda: F.sde_step(x, v, t, tn, level, seed=1, return_x0_hat=True),
            "fused_noise": lambda: F.sde_step(x, v, t, tn, level, noise=noise, return_x0_hat=True),
            "eager": eager_sample,
            "compiled": compiled_sample,
            "flow_grpo": flow_sample,
            "compat": lambda: compat.sde_step_with_logprob(scheduler, v, timestep, x, 0.7),
        },
        "score": {
            "fused": score(fused_score, False),
            "eager": score(eager_score, False),
            "compiled": score(compiled_step, False),
            "flow_grpo": score(flow_score, False),
            "compat": score(compat_score, False),
        },
        "score_kl": {
            "fused": score(fused_score, True),
            "eager": score(eager_score, True),
            "compiled": score(compiled_step, True),
            "flow_grpo": score(flow_score, True),
            "compat": score(compat_score, True),
        },
    }


def algorithmic_bytes(case: str, numel: int, itemsize: int) -> int:
    """Bytes the fused algorithm must move: its reads and writes of full-size tensors."""
    if case == "sample":  # read x, v; write x' (storage) and x0_hat (fp32)
        return numel * (3 * itemsize + 4)
    if case == "score":  # fwd reads x, v, x'; bwd reads x, v, x' and writes dv
        return numel * 7 * itemsize
    return numel * 9 * itemsize  # + v_ref read in both passes


def versions() -> dict:
    import triton

    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        revision = ""
    import sfgrpo

    from sfgrpo.kernels import sde_step as kernels

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "sfgrpo": sfgrpo.__version__, "git": revision,
            "sde_step_tuning": str(kernels.TUNING),  # the launch knobs (SFGRPO_SDE_STEP_TUNING when set)
            "python": platform.python_version(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--dtypes", default="bf16,fp32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    meta = versions()
    peak = copy_bandwidth_gbs()
    schedule = Schedule.sd3(10)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = meta["gpu"].replace(" ", "_").replace("/", "_")

    def save() -> None:  # after every case: a run cut short by a time limit keeps what it measured
        if not rows:
            return
        with open(out / f"sde_step_{tag}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        # NaN (a step that could not be captured in a graph) as null: strict JSON parsers reject NaN
        json_rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]
        (out / f"sde_step_{tag}.json").write_text(json.dumps({"meta": meta, "copy_bandwidth_gbs": round(peak, 1),
                                                              "rows": json_rows}, indent=1))

    for shape_name in (QUICK if args.quick else SHAPES):
        shape = SHAPES[shape_name]
        for dtype_name in args.dtypes.split(","):
            dtype = dtypes[dtype_name]
            cases = make_cases(shape, dtype, schedule)
            for case, impls in cases.items():
                nbytes = algorithmic_bytes(case, math.prod(shape), torch.empty((), dtype=dtype).element_size())
                copy_ms = same_size_copy_ms(nbytes)
                timings = {}
                for impl, fn in impls.items():
                    try:
                        syncs = count_syncs(fn)
                        # a call that synchronises cannot be captured, and a failed capture leaves
                        # torch's CUDA generator mid-capture: every later randn then fails
                        # ("Offset increment outside graph capture"), as Flow-GRPO's sampler did to
                        # the next baseline on an H100
                        graph_ms = time_graph_ms(fn) if syncs == 0 else math.nan
                        timings[impl] = (time_ms(fn), time_pipelined_ms(fn), syncs, graph_ms)
                    except Exception as err:  # a baseline that cannot run this shape (e.g. OOM)
                        print(f"  {shape_name} {dtype_name} {case} {impl}: failed ({type(err).__name__}: {err})")
                        torch.cuda.empty_cache()
                fused_ms, fused_pipelined = timings.get("fused", (math.nan, math.nan, 0, math.nan))[:2]
                for impl, (ms, pipelined, syncs, graph_ms) in timings.items():
                    gbs_graph = nbytes / (graph_ms * 1e-3) / 1e9
                    gbs = nbytes / (ms * 1e-3) / 1e9
                    gbs_pipelined = nbytes / (pipelined * 1e-3) / 1e9
                    rows.append({"shape": shape_name, "dims": "x".join(map(str, shape)), "dtype": dtype_name, "case": case,
                                 "impl": impl, "ms": round(ms, 4), "gb_per_s": round(gbs, 1),
                                 "pct_copy_bw": round(100 * gbs / peak, 1), "fused_speedup": round(ms / fused_ms, 2),
                                 "ms_pipelined": round(pipelined, 4), "gb_per_s_pipelined": round(gbs_pipelined, 1),
                                 "pct_copy_bw_pipelined": round(100 * gbs_pipelined / peak, 1),
                                 "fused_speedup_pipelined": round(pipelined / fused_pipelined, 2),
                                 "ms_gpu_only": round(graph_ms, 4), "pct_copy_bw_gpu_only": round(100 * gbs_graph / peak, 1),
                                 "ms_same_size_copy": round(copy_ms, 4),
                                 "pct_same_size_copy_gpu_only": round(100 * copy_ms / graph_ms, 1),
                                 "host_syncs": syncs})
                    print(f"{shape_name:>24} {dtype_name} {case:>8} {impl:>11}: {ms:8.3f} ms {gbs:7.0f} GB/s "
                          f"{100 * gbs / peak:5.1f}% fused x{ms / fused_ms:5.2f} | back-to-back {pipelined:8.3f} ms "
                          f"{100 * gbs_pipelined / peak:5.1f}% fused x{pipelined / fused_pipelined:5.2f} | GPU only {graph_ms:7.3f} ms "
                          f"{100 * gbs_graph / peak:5.1f}% ({100 * copy_ms / graph_ms:5.1f}% of a same-size copy) | syncs {syncs}")
                save()
            del cases
            torch.cuda.empty_cache()
    save()
    print(f"copy bandwidth {peak:.0f} GB/s on {meta['gpu']}; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
