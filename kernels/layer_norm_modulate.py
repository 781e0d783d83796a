"""Fused adaLN modulation: `y = layer_norm(x) * (1 + scale[b]) + shift[b]` in one pass over x.

Every diffusers DiT block runs this before its attention and its MLP; eager it is a LayerNorm plus
three elementwise kernels over the full activation. Here one program owns a range of rows of one
sample (grid `(B, chunks)`): it loads that sample's scale and shift once, then streams its rows,
each held whole in registers (C <= MAX_C), so mean, variance (two-pass, on the registers: no
E[x^2] - mean^2 cancellation), normalisation and modulation cost one read of x and one write of y.
Math is fp32 whatever the storage; y is rounded once to its dtype.

The backward recomputes mean and rstd from the row it has to load anyway (x is needed for xhat),
instead of saving them from the forward: the recompute is two register reductions per row, while
saving would add a second forward output (and its bookkeeping in the custom op) for no bandwidth
gain. dscale / dshift are sums over a sample's rows: each program accumulates its rows' share in
fp32 registers and stores it to `[B, chunks, C]` partials, which one `torch.sum` over the chunk
dim reduces. The chunking depends only on (B, N), so the sums are deterministic (no atomics).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sfgrpo.kernels._launch import DirectLauncher
from sfgrpo.kernels._rounding import round_to

# Widest row a program holds in registers (8 fp32 per thread at 32 warps); wider rows run the
# reference (SD3.5 has C = 1536 / 2432, FLUX 3072).
MAX_C = 8192
# Rows per program of the kernels that write per-program partials (dscale / dshift, dgate): at
# least MIN_ROWS (each program writes a C-wide partial, so fewer, longer programs keep that extra
# traffic to a few % of the streamed activations), more when B * N would give more than
# TARGET_PROGRAMS programs (a few per SM of an H100 is plenty).
MIN_ROWS = 16
TARGET_PROGRAMS = 512
# The kernels without partials (forwards, backwards to the input alone) have no such traffic and
# run shorter programs, 4x as many: on an H100 (2026-11-27, bench_norms_gpu.py --sweep,
# results/gpu-checks-NVIDIA_H100_80GB_HBM3-2026-11-27) the modulation's forward took 77.8 -> 70.4 us
# and its forward + input backward 197.2 -> 166.6 us on SD3.5-M's 16 x 1357 x 1536, the residual +
# norm2 kernels 2 % less, FLUX's 4 x 4608 x 3072 the same or 1-2 % less; with partials the longer
# programs stay ahead (FLUX's forward + full backward: 507 vs 546 us at 4 rows / 2048 programs).
PLAIN_MIN_ROWS = 4
PLAIN_TARGET_PROGRAMS = 2048
# No FMA contraction: the same rounding in every specialisation, as the SDE-step kernels.
FP_FUSION = False


@triton.jit
def _row_stats(x, mask, C, eps):
    """(x - mean, rstd) of one fp32 row held in registers; masked lanes of the centred row are 0.
    The per-row divisions and the square root IEEE-rounded (div.rn / sqrt.rn, as torch computes
    them; plain `/` is div.full, 2 ulp): once per row, free in a memory-bound kernel."""
    mean = _mean(tl.sum(x, axis=0), C)
    centred = tl.where(mask, x - mean, 0.0)
    var = _mean(tl.sum(centred * centred, axis=0), C)
    return centred, tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def layer_norm_input_grad(g, xhat, rstd, C):
    """dL/dx of a LayerNorm without affine from the gradient g of its output (xhat, rstd from
    `_row_stats`; masked lanes of g and xhat are 0). Plain division here: the gradient is not
    bit-matched, and div.rn costs registers the widest rows do not have."""
    mean_g = tl.sum(g, axis=0) / C
    mean_gx = tl.sum(g * xhat, axis=0) / C
    return rstd * (g - mean_g - xhat * mean_gx)


@triton.jit
def modulate_grad_row(g, x, mask, C, eps, dscale, dshift, WRITE_DSCALE: tl.constexpr, WRITE_DSHIFT: tl.constexpr):
    """One row of the adaLN modulation's backward, `normed = LN(x) * (1 + scale) + shift` with g the
    gradient of normed: the row's LayerNorm statistics, and its terms added to the per-sample
    dscale (g * xhat) and dshift (g) accumulators. -> (xhat, rstd, dscale, dshift)."""
    centred, rstd = _row_stats(x, mask, C, eps)
    xhat = centred * rstd
    if WRITE_DSCALE:
        dscale += g * xhat
    if WRITE_DSHIFT:
        dshift += g
    return xhat, rstd, dscale, dshift


@triton.jit
def store_modulate_partials(part, dscale, dshift, dscale_part_ptr, dshift_part_ptr, mask,
                            WRITE_DSCALE: tl.constexpr, WRITE_DSHIFT: tl.constexpr):
    """A program's dscale / dshift partial sums at offset `part` of the partials buffers (summed over
    programs by the host in a fixed order: deterministic)."""
    if WRITE_DSCALE:
        tl.store(dscale_part_ptr + part, dscale, mask=mask)
    if WRITE_DSHIFT:
        tl.store(dshift_part_ptr + part, dshift, mask=mask)


@triton.jit
def _mean(total, C):
    # C * 1.0, not C.to(...): Triton passes C = 1 as a constexpr (a Python int)
    return tl.math.div_rn(total, C * 1.0)


@triton.jit
def ln_modulate_fwd_kernel(x_ptr, scale_ptr, shift_ptr, y_ptr, N, C, stride_xb, stride_xn, stride_sb, stride_tb,
                           rows_per_program, eps, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    first = tl.program_id(1) * rows_per_program
    last = tl.minimum(first + rows_per_program, N)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    b64 = b.to(tl.int64)
    # (1 + scale) in fp32: the eager expression rounds it to scale's dtype first
    gain = 1.0 + tl.load(scale_ptr + b64 * stride_sb + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b64 * stride_tb + cols, mask=mask, other=0.0).to(tl.float32)
    # 64-bit sample and row offsets (one scalar per row: free): a row may start past 2^31 elements
    # into its sample (N * C >= 2^31, or a token stride spanning the batch); column offsets are 32-bit
    x_row = x_ptr + b64 * stride_xb
    y_row = y_ptr + b64 * N * C
    for n in range(first, last):
        n64 = tl.cast(n, tl.int64)
        x = tl.load(x_row + n64 * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
        centred, rstd = _row_stats(x, mask, C, eps)
        y = centred * rstd * gain + shift
        tl.store(y_row + n64 * C + cols, round_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ln_modulate_bwd_kernel(dy_ptr, x_ptr, scale_ptr, dx_ptr, dscale_part_ptr, dshift_part_ptr, N, C, stride_xb,
                           stride_xn, stride_sb, rows_per_program, num_chunks, eps, BLOCK_C: tl.constexpr,
                           WRITE_DX: tl.constexpr, WRITE_DSCALE: tl.constexpr, WRITE_DSHIFT: tl.constexpr):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    first = chunk * rows_per_program
    last = tl.minimum(first + rows_per_program, N)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    b64 = b.to(tl.int64)
    gain = 1.0 + tl.load(scale_ptr + b64 * stride_sb + cols, mask=mask, other=0.0).to(tl.float32)
    x_row = x_ptr + b64 * stride_xb
    dy_row = dy_ptr + b64 * N * C  # dy and dx are contiguous [B, N, C]
    dx_row = dx_ptr + b64 * N * C
    dscale = tl.zeros([BLOCK_C], dtype=tl.float32)
    dshift = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n in range(first, last):
        n64 = tl.cast(n, tl.int64)  # 64-bit row offsets, as in the forward
        x = tl.load(x_row + n64 * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + n64 * C + cols, mask=mask, other=0.0).to(tl.float32)
        xhat, rstd, dscale, dshift = modulate_grad_row(dy, x, mask, C, eps, dscale, dshift, WRITE_DSCALE, WRITE_DSHIFT)
        if WRITE_DX:
            # LayerNorm's backward with the upstream gradient dy * (1 + scale); masked lanes are 0
            dx = layer_norm_input_grad(dy * gain, xhat, rstd, C)
            tl.store(dx_row + n64 * C + cols, round_to(dx, dx_ptr.dtype.element_ty), mask=mask)
    store_modulate_partials((b64 * num_chunks + chunk) * C + cols, dscale, dshift, dscale_part_ptr, dshift_part_ptr,
                            mask, WRITE_DSCALE, WRITE_DSHIFT)


_FWD_LAUNCHER = DirectLauncher(ln_modulate_fwd_kernel)
_BWD_LAUNCHER = DirectLauncher(ln_modulate_bwd_kernel)


def supports(channels: int) -> bool:
    return channels <= MAX_C


@functools.lru_cache(maxsize=1024)  # on every call's host path: triton.cdiv / next_power_of_2 cost ~1 us each
def launch_config(batch: int, rows: int, channels: int, partials: bool = True) -> tuple[int, int, int, int]:
    """(rows_per_program, chunks, BLOCK_C, num_warps) for `[batch, rows, channels]`; `partials`:
    the launch writes per-program partial sums (see MIN_ROWS / PLAIN_MIN_ROWS)."""
    min_rows, target = (MIN_ROWS, TARGET_PROGRAMS) if partials else (PLAIN_MIN_ROWS, PLAIN_TARGET_PROGRAMS)
    per_program = max(min_rows, triton.cdiv(batch * rows, target))
    block = max(16, triton.next_power_of_2(channels))
    # 8 elements per thread (one 128-bit access of bf16, two of fp32): the backward with partials
    # keeps x, dy, gain and two accumulators live, 64 registers; at 16 warps C = 6144 took 127 of
    # the 128 that 512 threads may have (sm_90, no spill yet, but no margin)
    num_warps = min(32, max(1, block // 256))
    return per_program, triton.cdiv(rows, per_program), block, num_warps


def forward(x, scale, shift, eps: float, out_dtype):
    """`x` [B, N, C] with unit last stride, `scale` / `shift` [B, C] with unit last stride (any row
    stride: the chunks of diffusers' [B, 6C] embedding are read in place) -> y [B, N, C] contiguous
    in `out_dtype`."""
    batch, rows, channels = x.shape
    y = torch.empty(batch, rows, channels, dtype=out_dtype, device=x.device)
    if y.numel() == 0:
        return y
    # positional arguments: a keyword makes launch_config's cache key dearer on every call
    per_program, chunks, block, num_warps = launch_config(batch, rows, channels, False)
    _FWD_LAUNCHER.with_constexprs(
        (batch, chunks),
        (x, scale, shift, y, rows, channels, *x.stride()[:2], scale.stride()[0], shift.stride()[0],
         per_program, float(eps)),
        dict(BLOCK_C=block), num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    return y


def backward(grad, x, scale, eps: float, need_dx: bool, need_dscale: bool, need_dshift: bool):
    """-> (dx in x's dtype, dscale, dshift as float32 [B, C]), None where not needed."""
    batch, rows, channels = x.shape
    f32 = torch.float32
    dx = torch.empty(batch, rows, channels, dtype=x.dtype, device=x.device) if need_dx else None
    if x.numel() == 0:  # no rows: the sums over them are zero
        zeros = lambda: torch.zeros(batch, channels, dtype=f32, device=x.device)  # noqa: E731
        return dx, zeros() if need_dscale else None, zeros() if need_dshift else None
    grad = grad.contiguous()
    per_program, chunks, block, num_warps = launch_config(batch, rows, channels, need_dscale or need_dshift)
    parts = lambda: torch.empty(batch, chunks, channels, dtype=f32, device=x.device)  # noqa: E731
    dscale_part = parts() if need_dscale else None
    dshift_part = parts() if need_dshift else None
    # unused pointer slots get a tensor of the right device; the constexpr flags never touch them
    _BWD_LAUNCHER.with_constexprs(
        (batch, chunks),
        (grad, x, scale, grad if dx is None else dx, grad if dscale_part is None else dscale_part,
         grad if dshift_part is None else dshift_part, rows, channels, *x.stride()[:2], scale.stride()[0],
         per_program, chunks, float(eps)),
        dict(BLOCK_C=block, WRITE_DX=need_dx, WRITE_DSCALE=need_dscale, WRITE_DSHIFT=need_dshift),
        num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    # the chunk order is fixed by (B, N): a deterministic sum
    return (dx, None if dscale_part is None else dscale_part.sum(1),
            None if dshift_part is None else dshift_part.sum(1))


# ----------------------------------------------------------------- ahead-of-time variants
# integer arguments that are multiples of 16 on the shapes that matter (C = 1536, 3072 and the
# row strides of x and of the chunked embedding): what lets the loads and stores be 128-bit
DIVISIBLE = ("C", "stride_xb", "stride_xn", "stride_sb", "stride_tb")


def aot_variants():
    """(name, kernel, {arg: type}, constexprs, num_warps, divisible args): forward and backward for
    fp32 and bf16 storage at SD3.5's and FLUX's widths and at 6144 (the widest block, 32 warps);
    the backward with and without the dscale / dshift partials."""
    ints = {"N": "i32", "C": "i32", "stride_xb": "i32", "stride_xn": "i32", "stride_sb": "i32", "stride_tb": "i32",
            "rows_per_program": "i32", "num_chunks": "i32", "eps": "fp32"}
    for storage in ("fp32", "bf16"):
        pointers = {"x_ptr": storage, "dy_ptr": storage, "dx_ptr": storage, "y_ptr": storage, "scale_ptr": storage,
                    "shift_ptr": storage, "dscale_part_ptr": "fp32", "dshift_part_ptr": "fp32"}
        for channels in (1536, 3072, 6144):
            _, _, block, num_warps = launch_config(1, 4096, channels)
            for name, fn, flags in (
                ("fwd", ln_modulate_fwd_kernel, {}),
                ("bwd/dx", ln_modulate_bwd_kernel, dict(WRITE_DX=True, WRITE_DSCALE=False, WRITE_DSHIFT=False)),
                ("bwd/dx_partials", ln_modulate_bwd_kernel, dict(WRITE_DX=True, WRITE_DSCALE=True, WRITE_DSHIFT=True)),
            ):
                types = {arg: ints[arg] if arg in ints else f"*{pointers[arg]}"
                         for arg in fn.arg_names if arg in ints or arg.endswith("_ptr")}
                yield f"{name}/{storage}/C{channels}", fn, types, dict(flags, BLOCK_C=block), num_warps, DIVISIBLE
