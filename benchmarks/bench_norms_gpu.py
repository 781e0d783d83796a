"""GPU benchmark of sfgrpo's fused transformer norms (`sfgrpo.layer_norm_modulate`,
`sfgrpo.rms_norm`, `sfgrpo.gated_residual_layer_norm_modulate`, FLUX attention's
`sfgrpo.qk_norm_rope`) and of what they buy a real-size
transformer (`sfgrpo.models.fused_norms`: the norm modules and the blocks' tails).

Ops, on SD3.5-M / FLUX.1 shapes at 512 px in bf16: the fused op vs diffusers' eager expression vs
`torch.compile` of that expression, forward and forward + backward; GPU-only times (CUDA-graph
replay), GB/s and % of the device's copy bandwidth (algorithmic bytes: each full-size tensor read or
written once); also the block tail `h + gate * y` alone (`sfgrpo.gated_residual`) and followed by
norm2's modulation (`sfgrpo.gated_residual_layer_norm_modulate`), and FLUX attention's QK-norm +
rotation (`sfgrpo.qk_norm_rope`). Model (`--models`, default sd35m; also flux1-dev): the
SD3.5-Medium transformer (random weights, published config) forward
(rollout) and forward + backward with frozen weights (a LoRA update's activations path), with the
norms fused vs diffusers' modules, eager, in one run; then with LoRA r32 adapters (fp32, the
trainer's attention targets) under bf16 autocast, the trainer's setting: sfgrpo's fused norms and
fused LoRA linear (`sfgrpo.models.fused_lora`) vs diffusers' modules and peft's LoRA layers.

    python benchmarks/bench_norms_gpu.py [--quick] [--models sd35m,flux1-dev] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench_sde_step_gpu import copy_bandwidth_gbs, time_graph_ms, time_ms, versions  # noqa: E402

from sfgrpo import functional as F  # noqa: E402
from sfgrpo import reference as ref  # noqa: E402

# (name, x shape, channels): image tokens at 512 px (+ text) for SD3.5-M (C 1536) and FLUX.1 (C 3072)
MODULATE_SHAPES = {
    "sd35m_b8_1024x1536": (8, 1024, 1536),
    "sd35m_b16_1357x1536": (16, 1357, 1536),
    "flux_b4_4608x3072": (4, 4608, 3072),
}
# QK-norm input as diffusers' SD3 processor passes it: [B, N, H, D] memory viewed as [B, H, N, D]
RMS_SHAPES = {
    "sd35m_q_b8_1024x24x64": (8, 1024, 24, 64),
    "sd35m_q_b16_1357x24x64": (16, 1357, 24, 64),
}
# FLUX attention's q (or k) of one stream as FluxAttnProcessor has it: [B, N, H, D], image tokens
# at 512 px and at 1024 px
ROPE_SHAPES = {
    "flux_q_b4_1024x24x128": (4, 1024, 24, 128),
    "flux_q_b4_4096x24x128": (4, 4096, 24, 128),
}
QUICK_MODULATE = ("sd35m_b16_1357x1536", "flux_b4_4608x3072")
QUICK_RMS = ("sd35m_q_b16_1357x24x64",)
QUICK_ROPE = ("flux_q_b4_4096x24x128",)


def diffusers_modulate(x, scale, shift, eps=1e-6):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]


def diffusers_residual(h, y, gate):
    """JointTransformerBlock / FluxTransformerBlock: the attention or MLP output gated into the residual."""
    return h + gate.unsqueeze(1) * y


def diffusers_residual_norm2(h, y, gate, scale, shift, eps=1e-6):
    """The gated residual, then norm2's modulation."""
    h = diffusers_residual(h, y, gate)
    return h, diffusers_modulate(h, scale, shift, eps)


def _diffusers_rms(x, weight, eps=1e-6):
    return ref.rms_norm(x, weight, eps)


def _diffusers_norm_rope(x, weight, cos, sin, eps=1e-6):
    """FluxAttnProcessor: torch.nn.RMSNorm over the head dim, then apply_rotary_emb (fp32)."""
    return ref.qk_norm_rope(x, cos, sin, weight, eps)


def _sfgrpo_norm_rope(x, weight, cos, sin, eps=1e-6):
    return F.qk_norm_rope(x, cos, sin, weight, eps)


_GENERATORS: dict[str, torch.Generator] = {}


def _randn(*shape, dtype=torch.float32, requires_grad=False, dev="cuda"):
    """Inputs from the script's own generator: a CUDA-graph capture that fails (an implementation
    that cannot be captured) can leave the default CUDA generator unusable ("Offset increment outside
    graph capture"), which must not stop the rows after it."""
    if dev not in _GENERATORS:
        _GENERATORS[dev] = torch.Generator(device=dev).manual_seed(0)
    return torch.randn(*shape, device=dev, dtype=dtype, generator=_GENERATORS[dev]).requires_grad_(requires_grad)


def _timings(name, implementations, make_inputs, nbytes_fwd, nbytes_bwd, bandwidth, rows):
    for mode in ("fwd", "fwd+bwd"):
        base = None
        for impl_name, fn in implementations.items():
            inputs = make_inputs(mode == "fwd+bwd")
            if mode == "fwd":
                call = lambda: fn(*inputs)  # noqa: E731
            else:
                out = fn(*inputs)
                outs = out if isinstance(out, tuple) else (out,)
                grads = tuple(_randn(*o.shape, dtype=o.dtype, dev=o.device.type) for o in outs)
                wrt = tuple(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)

                def call(inputs=inputs, grads=grads, fn=fn, wrt=wrt):
                    # gradients handed back, not accumulated into .grad: no AccumulateGrad nodes, whose
                    # stream (the default one, where the leaves were made) breaks the graph capture
                    out = fn(*inputs)
                    return torch.autograd.grad(out if isinstance(out, tuple) else (out,), wrt, grads)
            try:
                gpu_ms = time_graph_ms(call)
                eager_ms = time_ms(call, warmup=3, reps=10, calls=10)
            except Exception as err:  # noqa: BLE001 - a failed implementation is a row, not a crash
                print(f"  {name} {mode} {impl_name}: failed ({type(err).__name__}: {err})", flush=True)
                continue
            nbytes = nbytes_fwd if mode == "fwd" else nbytes_fwd + nbytes_bwd
            gbs = nbytes / (gpu_ms * 1e-3) / 1e9
            base = base or gpu_ms
            row = dict(case=name, mode=mode, impl=impl_name, gpu_ms=gpu_ms, back_to_back_ms=eager_ms, gbs=gbs,
                       pct_copy_bw=100 * gbs / bandwidth)
            rows.append(row)
            print(f"  {name:24s} {mode:8s} {impl_name:10s} GPU {gpu_ms * 1e3:8.1f} us  {gbs:6.0f} GB/s "
                  f"{row['pct_copy_bw']:5.1f}%  back-to-back {eager_ms * 1e3:8.1f} us", flush=True)


def _baselines(eager, quick: bool) -> dict:
    """diffusers' eager expression, and torch.compile of it unless quick (each compile of a forward
    and a backward graph takes tens of seconds: the short GPU session's step has ~2 minutes)."""
    return {"eager": eager} if quick else {"eager": eager, "compiled": torch.compile(eager)}


def bench_ops(quick: bool, bandwidth: float, rows: list, dev: str = "cuda") -> None:
    dt = torch.bfloat16
    for name in QUICK_MODULATE if quick else MODULATE_SHAPES:
        b, n, c = MODULATE_SHAPES[name]

        def make(grad, b=b, n=n, c=c):
            x = _randn(b, n, c, dtype=dt, requires_grad=grad, dev=dev)
            emb = _randn(b, 6 * c, dtype=dt, requires_grad=grad, dev=dev)
            chunks = emb.chunk(6, dim=1)  # the adaLN layout: strided views, as diffusers passes them
            return x, chunks[1], chunks[0]

        numel = b * n * c
        _timings(name, {"sfgrpo": F.layer_norm_modulate, **_baselines(diffusers_modulate, quick)},
                 make, 2 * numel * 2, 3 * numel * 2, bandwidth, rows)
    for name in QUICK_MODULATE[:1] if quick else MODULATE_SHAPES:
        b, n, c = MODULATE_SHAPES[name]

        def make(grad, b=b, n=n, c=c):
            h = _randn(b, n, c, dtype=dt, requires_grad=grad, dev=dev)
            y = _randn(b, n, c, dtype=dt, requires_grad=grad, dev=dev)
            emb = _randn(b, 6 * c, dtype=dt, requires_grad=grad, dev=dev)
            chunks = emb.chunk(6, dim=1)
            return h, y, chunks[2], chunks[4], chunks[3]

        numel = b * n * c  # fwd: h, y in; h', normed out. bwd: h, y, 2 grads in; dh, dy out
        _timings(f"residual+norm2 {name}", {"sfgrpo": F.gated_residual_layer_norm_modulate,
                                            **_baselines(diffusers_residual_norm2, quick)},
                 make, 4 * numel * 2, 6 * numel * 2, bandwidth, rows)
        # the plain gated residual (the MLP branch's): fwd h, y in, h' out; bwd the grad and y in, dy out
        _timings(f"residual {name}", {"sfgrpo": F.gated_residual, **_baselines(diffusers_residual, quick)},
                 lambda grad, make=make: make(grad)[:3], 3 * numel * 2, 3 * numel * 2, bandwidth, rows)
    for name in QUICK_RMS if quick else RMS_SHAPES:
        b, n, h, d = RMS_SHAPES[name]

        def make(grad, b=b, n=n, h=h, d=d):
            q = _randn(b, n, h, d, dtype=dt, dev=dev).transpose(1, 2).requires_grad_(grad)
            weight = torch.ones(d, device=dev, dtype=dt)
            return q, weight

        numel = b * n * h * d
        _timings(name, {"sfgrpo": F.rms_norm, **_baselines(_diffusers_rms, quick)},
                 make, 2 * numel * 2, 3 * numel * 2, bandwidth, rows)
    for name in QUICK_ROPE if quick else ROPE_SHAPES:
        b, n, h, d = ROPE_SHAPES[name]

        def make(grad, b=b, n=n, h=h, d=d):
            q = _randn(b, n, h, d, dtype=dt, requires_grad=grad, dev=dev)
            weight = (1 + 0.1 * _randn(d, dev=dev)).to(dt).requires_grad_(grad)
            angles = _randn(n, d // 2, dev=dev).repeat_interleave(2, dim=1) * 3.0
            return q, weight, angles.cos(), angles.sin()

        numel = b * n * h * d  # fwd: q in, q out (the fp32 tables stay in L2); bwd: q, grad in, dq out
        _timings(f"norm+rope {name}", {"sfgrpo": _sfgrpo_norm_rope, **_baselines(_diffusers_norm_rope, quick)},
                 make, 2 * numel * 2, 3 * numel * 2, bandwidth, rows)


LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out"]  # the SD3 / FLUX backbones' default_lora_targets


def model_inputs(model, family: str, batch: int, device: str, grid: int, text_tokens: int) -> dict:
    """What the family's pipeline feeds the transformer: SD3 latents `[B, C, grid, grid]`, FLUX
    packed 2x2 patches `[B, (grid/2)^2, 4C]` with their position ids and guidance; bf16."""
    g = torch.Generator(device=device).manual_seed(0)
    c = model.config
    bf16 = torch.bfloat16
    text = torch.randn(batch, text_tokens, c.joint_attention_dim, device=device, dtype=bf16, generator=g)
    pooled = torch.randn(batch, c.pooled_projection_dim, device=device, dtype=bf16, generator=g)
    if family == "sd3":
        latents = torch.randn(batch, c.in_channels, grid, grid, device=device, dtype=bf16, generator=g)
        return dict(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                    timestep=torch.full((batch,), 500.0, device=device))
    side = grid // 2
    latents = torch.randn(batch, side * side, c.in_channels, device=device, dtype=bf16, generator=g)
    img_ids = torch.zeros(side * side, 3, device=device)
    img_ids[:, 1] = torch.arange(side, device=device).repeat_interleave(side)
    img_ids[:, 2] = torch.arange(side, device=device).repeat(side)
    inputs = dict(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                  timestep=torch.full((batch,), 0.5, device=device), img_ids=img_ids,
                  txt_ids=torch.zeros(text_tokens, 3, device=device))
    if c.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5, device=device)
    return inputs


def kernel_times(fn, device: str = "cuda") -> dict[str, tuple[float, int]]:
    """GPU time (ms) and launch count of each kernel in one call of `fn` (after a warm-up call), by
    kernel name (torch.profiler; on the CPU: the ops' CPU time, for the script's test)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    times = {}
    for item in prof.key_averages():
        if cuda and getattr(item, "device_type", None) == torch.autograd.DeviceType.CPU:
            continue  # host-side events (the runtime's launch calls) may carry their kernels' time too
        total_us = (getattr(item, "device_time_total", None) if cuda else item.self_cpu_time_total) or 0.0
        if total_us > 0:
            times[item.key] = (total_us / 1e3, item.count)
    return times


def print_kernel_diff(label: str, times: dict[str, dict], top: int = 15) -> list[dict]:
    """The kernels where the variants' times differ most (what the fused modules changed), and each
    variant's total; returns the rows for the JSON."""
    (name_a, a), (name_b, b) = times.items()
    total_a, total_b = sum(t for t, _ in a.values()), sum(t for t, _ in b.values())
    print(f"  kernels, {label}: {name_a} {total_a:.2f} ms in all, {name_b} {total_b:.2f} ms", flush=True)
    names = sorted(set(a) | set(b), key=lambda k: -abs(b.get(k, (0.0, 0))[0] - a.get(k, (0.0, 0))[0]))
    rows = []
    for key in names[:top]:
        (ta, ca), (tb, cb) = a.get(key, (0.0, 0)), b.get(key, (0.0, 0))
        rows.append(dict(kernel=key, **{f"{name_a}_ms": ta, f"{name_a}_calls": ca, f"{name_b}_ms": tb,
                                        f"{name_b}_calls": cb}))
        print(f"    {tb - ta:+8.3f} ms  {name_a} {ta:8.3f} ms x{ca:<5d} {name_b} {tb:8.3f} ms x{cb:<5d} {key[:90]}",
              flush=True)
    return rows


def bench_model(batch: int, rows: list, name: str = "sd35m", device: str = "cuda", grid: int = 64,
                text_tokens: int | None = None, lora_rank: int = 32, profile: bool = False) -> None:
    """A real-size transformer at 512 px (a 64 x 64 latent grid; SD3.5-M's 333 text tokens, FLUX's
    512): forward (no grad) and forward + backward with frozen weights; then (lora_rank > 0, needs
    peft) both again with LoRA adapters under bf16 autocast. `name` / `device`: a small config on
    the CPU for the script's test."""
    from sfgrpo.bench import configs
    from sfgrpo.models import fused_lora, fused_norms

    model = configs.random_transformer(name, device, torch.bfloat16).requires_grad_(False)
    family = configs.TRANSFORMERS[name]["family"]
    inputs = model_inputs(model, family, batch, device, grid, text_tokens or configs.TEXT_TOKENS[family])
    latents = inputs.pop("hidden_states")

    def forward():
        with torch.no_grad():
            model(hidden_states=latents, **inputs, return_dict=False)

    def forward_backward():
        x = latents.detach().requires_grad_()
        out = model(hidden_states=x, **inputs, return_dict=False)[0]
        out.float().square().mean().backward()

    def lora_forward():
        with torch.autocast(device, dtype=torch.bfloat16):
            forward()

    def lora_forward_backward():
        with torch.autocast(device, dtype=torch.bfloat16):
            forward_backward()

    def use(variant):
        """The model on sfgrpo's fused modules ("fused") or on diffusers' and peft's own."""
        fused = variant == "fused"
        (fused_norms.fuse_norms if fused else fused_norms.unfuse_norms)(model)
        (fused_lora.fuse_lora if fused else fused_lora.unfuse_lora)(model)

    def a_b_a(label, fn):
        times = {}
        for variant in ("diffusers", "fused", "diffusers "):  # diffusers twice: drift between the A and B runs
            use(variant)
            times[variant] = time_ms(fn, warmup=2, reps=5)
        base = min(times["diffusers"], times["diffusers "])
        row = dict(case=f"{name}_b{batch}_{grid * 8}px", mode=label, impl="model", diffusers_ms=base, fused_ms=times["fused"],
                   speedup=base / times["fused"], diffusers_runs_ms=[times["diffusers"], times["diffusers "]])
        rows.append(row)
        print(f"  {name} b{batch} {grid * 8}px {label:22s} diffusers {base:8.2f} ms  fused {times['fused']:8.2f} ms  "
              f"x{row['speedup']:.3f}", flush=True)

    def kernel_diff(label, fn):
        times = {}
        for variant in ("diffusers", "fused"):
            use(variant)
            times[variant] = kernel_times(fn, device)
        rows.append(dict(case=f"{name}_b{batch}_{grid * 8}px", mode=label, impl="kernels",
                         kernels=print_kernel_diff(f"{name} b{batch} {label}", times)))

    for label, fn in (("forward", forward), ("forward+backward", forward_backward)):
        a_b_a(label, fn)
    if profile:  # which kernels the fused modules made faster or slower
        kernel_diff("forward+backward", forward_backward)
    if lora_rank:
        try:
            from peft import LoraConfig
        except ImportError:
            print("  LoRA rows skipped: peft is not installed", flush=True)
            return
        model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=LORA_TARGETS,
                                     init_lora_weights="gaussian"))
        for param_name, param in model.named_parameters():  # fp32 adapters, as the trainer keeps them
            if "lora_" in param_name:
                param.data = param.data.float()
                param.requires_grad_(True)
        for label, fn in (("lora forward", lora_forward), ("lora forward+backward", lora_forward_backward)):
            a_b_a(label, fn)
        if profile:
            kernel_diff("lora forward+backward", lora_forward_backward)


# (MIN_ROWS, TARGET_PROGRAMS) of kernels.layer_norm_modulate.launch_config, which the gated-residual
# kernels share, set for the launches with partial sums and without (PLAIN_*) alike: the shipped
# partials' (16, 512) first, the shipped plain (4, 2048) among them. Each program streams its rows one after another, so the
# rows in flight per SM (and the bandwidth, by Little's law) grow with the programs resident per SM;
# more programs also mean more dscale / dshift / dgate partial rows in the backward.
ROW_CHUNKINGS = ((16, 512), (8, 1024), (4, 2048), (2, 4096), (1, 8192))


def sweep_row_chunking(bandwidth: float, rows: list, quick: bool, dev: str = "cuda") -> None:
    """GPU-only time of the modulation and of the residual + norm2 op, forward and forward + backward
    (the activations' gradients; then with dscale / dshift / dgate too), under each ROW_CHUNKINGS
    setting: the data for choosing the kernels' defaults."""
    from sfgrpo.kernels import layer_norm_modulate as lnm_kernels

    shipped = (lnm_kernels.MIN_ROWS, lnm_kernels.TARGET_PROGRAMS, lnm_kernels.PLAIN_MIN_ROWS,
               lnm_kernels.PLAIN_TARGET_PROGRAMS)
    dt = torch.bfloat16
    shapes = QUICK_MODULATE if quick else tuple(MODULATE_SHAPES)
    try:
        for min_rows, target in ROW_CHUNKINGS:
            lnm_kernels.MIN_ROWS = lnm_kernels.PLAIN_MIN_ROWS = min_rows
            lnm_kernels.TARGET_PROGRAMS = lnm_kernels.PLAIN_TARGET_PROGRAMS = target
            lnm_kernels.launch_config.cache_clear()
            for name in shapes:
                b, n, c = MODULATE_SHAPES[name]
                numel = b * n * c
                x = _randn(b, n, c, dtype=dt, dev=dev)
                h = _randn(b, n, c, dtype=dt, dev=dev)
                chunks = _randn(b, 6 * c, dtype=dt, dev=dev).chunk(6, dim=1)
                g = _randn(b, n, c, dtype=dt, dev=dev)
                cases = [(f"modulate {name}", "fwd", 2 * numel * 2,
                          lambda: F.layer_norm_modulate(x, chunks[1], chunks[0])),
                         (f"residual+norm2 {name}", "fwd", 4 * numel * 2,
                          lambda: F.gated_residual_layer_norm_modulate(h, x, chunks[2], chunks[4], chunks[3]))]
                for weights in (False, True):  # the activations' gradients; then the modulation's too
                    xs = x.detach().requires_grad_(True)
                    hs, ys = h.detach().requires_grad_(True), x.detach().requires_grad_(True)
                    mods = [t.detach().requires_grad_(weights) for t in chunks]
                    label = "fwd+bwd all" if weights else "fwd+bwd x"
                    wrt = (xs, *(mods[:2] if weights else ()))
                    cases.append((f"modulate {name}", label, 5 * numel * 2,
                                  lambda xs=xs, m=mods, wrt=wrt: torch.autograd.grad(
                                      F.layer_norm_modulate(xs, m[1], m[0]), wrt, g)))
                    wrt2 = (hs, ys, *((mods[2], mods[3], mods[4]) if weights else ()))
                    cases.append((f"residual+norm2 {name}", label, 10 * numel * 2,
                                  lambda hs=hs, ys=ys, m=mods, wrt2=wrt2: torch.autograd.grad(
                                      F.gated_residual_layer_norm_modulate(hs, ys, m[2], m[4], m[3]), wrt2, (g, g))))
                for case, mode, nbytes, call in cases:
                    gpu_ms = time_graph_ms(call)
                    gbs = nbytes / (gpu_ms * 1e-3) / 1e9
                    rows.append(dict(case=case, mode=mode, impl="sweep", min_rows=min_rows, target_programs=target,
                                     gpu_ms=gpu_ms, gbs=gbs, pct_copy_bw=100 * gbs / bandwidth))
                    print(f"  sweep MIN_ROWS={min_rows:<2d} TARGET_PROGRAMS={target:<5d} {case:34s} {mode:12s} "
                          f"GPU {gpu_ms * 1e3:8.1f} us {gbs:6.0f} GB/s {100 * gbs / bandwidth:5.1f}%", flush=True)
    finally:
        (lnm_kernels.MIN_ROWS, lnm_kernels.TARGET_PROGRAMS, lnm_kernels.PLAIN_MIN_ROWS,
         lnm_kernels.PLAIN_TARGET_PROGRAMS) = shipped
        lnm_kernels.launch_config.cache_clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and no torch.compile baselines (the short "
                        "GPU session)")
    parser.add_argument("--out", default="benchmarks/results", help="results folder")
    parser.add_argument("--model-batch", type=int, default=4, help="trajectories in the model forwards (0: skip)")
    parser.add_argument("--models", default="sd35m", help="comma-separated transformers to time whole: sd35m, "
                        "flux1-dev (12B parameters: ~24 GB in bf16, a minute to build)")
    parser.add_argument("--sweep", action="store_true", help="only the row-chunking sweep of the modulation and "
                        "residual + norm2 kernels (ROW_CHUNKINGS): GPU-only times per setting")
    parser.add_argument("--profile", action="store_true", help="per-kernel GPU times of the model's forward + "
                        "backward, diffusers vs fused (torch.profiler): which kernels the fused modules changed")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_norms_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 1
    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth_gbs()
    print(f"{device}: copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    rows: list = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"norms_{device.replace(' ', '_')}.json"
    if args.sweep:
        path = out / f"norms_sweep_{device.replace(' ', '_')}.json"
    try:
        if args.sweep:
            sweep_row_chunking(bandwidth, rows, args.quick)
            return 0
        # the whole transformer first: what the fused modules buy a training step is the headline
        if args.model_batch:
            for name in args.models.split(","):
                bench_model(args.model_batch, rows, name=name.strip(), profile=args.profile)
        bench_ops(args.quick, bandwidth, rows)
    finally:  # what was measured is written even when a later row fails or the run is cut short
        path.write_text(json.dumps(dict(device=device, copy_bandwidth_gbs=bandwidth, versions=versions(), rows=rows),
                                   indent=1))
        print(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
