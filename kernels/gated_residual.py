"""Fused gated residual `h + gate[b] * y`, optionally followed by the adaLN modulation of the result
(`layer_norm(h_out) * (1 + scale[b]) + shift[b]`): the elementwise tail of diffusers' SD3
`JointTransformerBlock` / FLUX `FluxTransformerBlock` (attention output gated into the residual
stream, then norm2 and the MLP's modulation) in one pass over the activations.

Layout and scheduling are layer_norm_modulate's (`kernels.layer_norm_modulate.launch_config`): one
program owns a range of rows of one sample (grid `(B, chunks)`), loads that sample's gate (and
scale, shift) once, and streams its rows, each held whole in registers (C <= MAX_C).

Rounding is the eager expression's, so h_out is bit-identical to torch's: the product gate * y
(exact in fp32 for 2-byte storage) is rounded to promote(gate, y) (`_product`), the fp32 sum to
h_out's dtype, each with `_rounding.round_to` (to nearest even, on the GPU and in Triton's
interpreter alike). No FMA contraction. The
LayerNorm then reads h_out *as rounded*, as diffusers' norm2 reads the stored hidden states.

Backward. `total = g_hout + d(layer_norm_modulate)/d(h_out) . g_normed` (g_hout optional), then
dh = total, dy = total * gate, dgate = sum_rows(total * y), dscale = sum_rows(g_normed * xhat),
dshift = sum_rows(g_normed); the three sums as fp32 per-program partials `[B, chunks, C]` that one
`torch.sum` over the chunk dim reduces (deterministic: the chunking depends only on (B, N)).
The backward READS h_out (the op saves its own output) instead of recomputing it from h, y, gate:
h_out is alive anyway (it is the residual stream the next block reads, and saves), so saving it
costs no memory, while recomputing would keep h and y alive for the backward and read two streams
instead of one; y is then only read when dgate is needed (LoRA with a frozen adaLN linear never
reads it), and the LayerNorm statistics come from exactly the bits the forward normalised. Mean and
rstd are recomputed from that row (two register reductions), as in layer_norm_modulate. Rows wider
than RELOAD_ABOVE (32 warps, 64 registers a thread) re-read gate / scale per row and take dgate from
a second, residual-only pass when the LayerNorm's partials are needed too (see RELOAD_ABOVE).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sfgrpo.kernels._launch import DirectLauncher
# one row per program's registers, the same limit and launch geometry as layer_norm_modulate's kernels
from sfgrpo.kernels.layer_norm_modulate import (MAX_C, _row_stats, launch_config, layer_norm_input_grad,
                                                modulate_grad_row, store_modulate_partials, supports)
from sfgrpo.kernels._rounding import round_to

__all__ = ["MAX_C", "supports", "launch_config", "forward", "backward", "aot_variants"]

# No FMA contraction: h + gate * y must round like the expression's separate multiply and add.
FP_FUSION = False
# Blocks wider than this run at 32 warps, where a thread may have 64 registers. The fused backward
# then re-reads the sample's gate and scale rows for every row (L1 / L2 hits) instead of keeping
# them in registers, and when dgate is needed together with dscale / dshift (three fp32
# accumulators: spilled at C = 6144 even with the reloads, tests/test_ptx.py) dgate comes from a
# second launch of the residual backward over the stored dh (one more read of dh and y; rows this
# wide are rare: SD3.5 and FLUX have C <= 3072).
RELOAD_ABOVE = 4096


def _split_dgate(block: int, norm: bool, need_dgate: bool, need_dscale: bool, need_dshift: bool) -> bool:
    return block > RELOAD_ABOVE and norm and need_dgate and (need_dscale or need_dshift)


@triton.jit
def _product(gate, y, GATE_T: tl.constexpr, Y_T: tl.constexpr):
    """gate * y in fp32, rounded to promote(gate, y): the storage dtype when both share a 2-byte
    dtype (the fp32 product of two such values is exact, so this is one rounding); fp32 otherwise
    (fp32 with anything, or bf16 with fp16, promotes to fp32)."""
    p = gate * y
    if GATE_T == Y_T:
        p = round_to(p, GATE_T).to(tl.float32)
    return p


@triton.jit
def gated_residual_fwd_kernel(h_ptr, y_ptr, gate_ptr, scale_ptr, shift_ptr, out_ptr, normed_ptr, N, C,
                              stride_hb, stride_hn, stride_yb, stride_yn, stride_gb, stride_sb, stride_tb,
                              rows_per_program, eps, BLOCK_C: tl.constexpr, NORM: tl.constexpr):
    b = tl.program_id(0)
    first = tl.program_id(1) * rows_per_program
    last = tl.minimum(first + rows_per_program, N)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    b64 = b.to(tl.int64)
    gate = tl.load(gate_ptr + b64 * stride_gb + cols, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        # (1 + scale) in fp32, as layer_norm_modulate's kernel
        gain = 1.0 + tl.load(scale_ptr + b64 * stride_sb + cols, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + b64 * stride_tb + cols, mask=mask, other=0.0).to(tl.float32)
    # 64-bit sample and row offsets (a row may start past 2^31 elements into its sample), as in
    # layer_norm_modulate's kernel
    h_row = h_ptr + b64 * stride_hb
    y_row = y_ptr + b64 * stride_yb
    out_row = out_ptr + b64 * N * C  # outputs contiguous [B, N, C]
    normed_row = normed_ptr + b64 * N * C
    for n in range(first, last):
        n64 = tl.cast(n, tl.int64)
        h = tl.load(h_row + n64 * stride_hn + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_row + n64 * stride_yn + cols, mask=mask, other=0.0).to(tl.float32)
        p = _product(gate, y, gate_ptr.dtype.element_ty, y_ptr.dtype.element_ty)
        out = round_to(h + p, out_ptr.dtype.element_ty)
        tl.store(out_row + n64 * C + cols, out, mask=mask)
        if NORM:
            # the LayerNorm reads h_out as stored (masked lanes are 0: loaded as 0, 0 + 0 * 0)
            centred, rstd = _row_stats(out.to(tl.float32), mask, C, eps)
            normed = centred * rstd * gain + shift
            tl.store(normed_row + n64 * C + cols, round_to(normed, normed_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gated_residual_bwd_kernel(g_out_ptr, g_normed_ptr, x_ptr, y_ptr, gate_ptr, scale_ptr, dh_ptr, dy_ptr,
                              dgate_part_ptr, dscale_part_ptr, dshift_part_ptr, N, C, stride_yb, stride_yn,
                              stride_gb, stride_sb, rows_per_program, num_chunks, eps, BLOCK_C: tl.constexpr,
                              NORM: tl.constexpr, HAS_G_OUT: tl.constexpr, WRITE_DH: tl.constexpr,
                              WRITE_DY: tl.constexpr, WRITE_DGATE: tl.constexpr, WRITE_DSCALE: tl.constexpr,
                              WRITE_DSHIFT: tl.constexpr, RELOAD: tl.constexpr):
    """g_out, g_normed, x (= h_out) and dh, dy are contiguous [B, N, C]; y is read through its
    strides. Without NORM, total = g_out (HAS_G_OUT must be set) and dh is the caller's cast."""
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    first = chunk * rows_per_program
    last = tl.minimum(first + rows_per_program, N)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    b64 = b.to(tl.int64)
    gate_row = gate_ptr + b64 * stride_gb
    scale_row = scale_ptr + b64 * stride_sb
    if not RELOAD:
        if WRITE_DY:
            gate = tl.load(gate_row + cols, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            gain = 1.0 + tl.load(scale_row + cols, mask=mask, other=0.0).to(tl.float32)
    base = b64 * N * C
    y_row = y_ptr + b64 * stride_yb
    dgate = tl.zeros([BLOCK_C], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_C], dtype=tl.float32)
    dshift = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n in range(first, last):
        n64 = tl.cast(n, tl.int64)  # 64-bit row offsets, as in the forward
        offs = base + n64 * C + cols
        if NORM:
            gn = tl.load(g_normed_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xhat, rstd, dscale, dshift = modulate_grad_row(gn, x, mask, C, eps, dscale, dshift, WRITE_DSCALE,
                                                           WRITE_DSHIFT)
            # LayerNorm's backward with the upstream gradient g_normed * (1 + scale); masked lanes 0
            if RELOAD:
                gain = 1.0 + tl.load(scale_row + cols, mask=mask, other=0.0).to(tl.float32)
            total = layer_norm_input_grad(gn * gain, xhat, rstd, C)
            if HAS_G_OUT:
                total += tl.load(g_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if WRITE_DH:
                tl.store(dh_ptr + offs, round_to(total, dh_ptr.dtype.element_ty), mask=mask)
        else:
            total = tl.load(g_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if WRITE_DY:
            if RELOAD:
                gate = tl.load(gate_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dy_ptr + offs, round_to(total * gate, dy_ptr.dtype.element_ty), mask=mask)
        if WRITE_DGATE:
            y = tl.load(y_row + n64 * stride_yn + cols, mask=mask, other=0.0).to(tl.float32)
            dgate += total * y
    part = (b64 * num_chunks + chunk) * C + cols
    if WRITE_DGATE:
        tl.store(dgate_part_ptr + part, dgate, mask=mask)
    store_modulate_partials(part, dscale, dshift, dscale_part_ptr, dshift_part_ptr, mask, WRITE_DSCALE, WRITE_DSHIFT)


_FWD_LAUNCHER = DirectLauncher(gated_residual_fwd_kernel)
_BWD_LAUNCHER = DirectLauncher(gated_residual_bwd_kernel)


def forward(h, y, gate, scale, shift, eps: float, out_dtype, normed_dtype):
    """h, y `[B, N, C]` with unit last stride (any batch / row strides), gate (scale, shift) `[B, C]`
    with unit last stride and any row stride -> (h_out in `out_dtype`, normed in `normed_dtype` or
    None when scale is None), both contiguous [B, N, C]."""
    batch, rows, channels = h.shape
    norm = scale is not None
    out = torch.empty(batch, rows, channels, dtype=out_dtype, device=h.device)
    normed = torch.empty(batch, rows, channels, dtype=normed_dtype, device=h.device) if norm else None
    if out.numel() == 0:
        return out, normed
    # positional arguments: a keyword makes launch_config's cache key dearer on every call
    per_program, chunks, block, num_warps = launch_config(batch, rows, channels, False)
    # unused pointer slots get a tensor of the right device; NORM = False never touches them
    _FWD_LAUNCHER.with_constexprs(
        (batch, chunks),
        (h, y, gate, scale if norm else gate, shift if norm else gate, out, normed if norm else out, rows, channels,
         *h.stride()[:2], *y.stride()[:2], gate.stride()[0], scale.stride()[0] if norm else 0,
         shift.stride()[0] if norm else 0, per_program, float(eps)),
        dict(BLOCK_C=block, NORM=norm), num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    return out, normed


def backward(g_out, g_normed, h_out, y, gate, scale, eps: float, dh_dtype, dy_dtype, need_dh: bool, need_dy: bool,
             need_dgate: bool, need_dscale: bool, need_dshift: bool):
    """-> (dh in `dh_dtype`, dy in `dy_dtype`, dgate, dscale, dshift as float32 [B, C]), None where not
    needed. With `g_normed` None (no norm, or its output unused) total = g_out and dh is left to the
    caller (None: it is g_out cast to h's dtype); g_out may be None only with g_normed. y is read only
    for dgate and gate only for dy: either may be None when not needed."""
    norm = g_normed is not None
    stream = g_normed if norm else g_out
    batch, rows, channels = stream.shape
    device = stream.device
    need_dscale = need_dscale and norm
    need_dshift = need_dshift and norm
    need_dh = need_dh and norm
    f32 = torch.float32
    dh = torch.empty(batch, rows, channels, dtype=dh_dtype, device=device) if need_dh else None
    dy = torch.empty(batch, rows, channels, dtype=dy_dtype, device=device) if need_dy else None
    if stream.numel() == 0 or not (need_dh or need_dy or need_dgate or need_dscale or need_dshift):
        zeros = lambda need: torch.zeros(batch, channels, dtype=f32, device=device) if need else None  # noqa: E731
        return dh, dy, zeros(need_dgate), zeros(need_dscale), zeros(need_dshift)
    g_out = None if g_out is None else g_out.contiguous()
    g_normed = None if g_normed is None else g_normed.contiguous()
    per_program, chunks, block, num_warps = launch_config(batch, rows, channels, need_dgate or need_dscale or need_dshift)
    parts = lambda need: torch.empty(batch, chunks, channels, dtype=f32, device=device) if need else None  # noqa: E731
    dgate_part, dscale_part, dshift_part = parts(need_dgate), parts(need_dscale), parts(need_dshift)
    split = _split_dgate(block, norm, need_dgate, need_dscale, need_dshift)
    if split and dh is None:  # the second pass reads total from here
        dh = torch.empty(batch, rows, channels, dtype=h_out.dtype, device=device)
    first_pass = (g_out, g_normed, h_out, dh, dy, None if split else dgate_part, dscale_part, dshift_part,
                  dict(NORM=norm, HAS_G_OUT=g_out is not None, WRITE_DH=need_dh or split, WRITE_DY=need_dy,
                       WRITE_DGATE=need_dgate and not split, WRITE_DSCALE=need_dscale, WRITE_DSHIFT=need_dshift))
    passes = [first_pass]
    if split:  # dgate = sum_rows(total * y), total read back from dh
        passes.append((dh, None, None, None, None, dgate_part, None, None,
                       dict(NORM=False, HAS_G_OUT=True, WRITE_DH=False, WRITE_DY=False, WRITE_DGATE=True,
                            WRITE_DSCALE=False, WRITE_DSHIFT=False)))
    for g_o, g_n, x, dh_, dy_, dgate_p, dscale_p, dshift_p, flags in passes:
        any_ = g_o if g_n is None else g_n
        # unused pointer slots get a tensor of the right device; the constexpr flags never touch them
        pick = lambda t: any_ if t is None else t  # noqa: E731
        y_, gate_ = pick(y if need_dgate else None), pick(gate if need_dy else None)
        scale_ = pick(scale if norm else None)
        _BWD_LAUNCHER.with_constexprs(
            (batch, chunks),
            (pick(g_o), pick(g_n), pick(x), y_, gate_, scale_, pick(dh_), pick(dy_), pick(dgate_p), pick(dscale_p),
             pick(dshift_p), rows, channels, *y_.stride()[:2], gate_.stride()[0], scale_.stride()[0],
             per_program, chunks, float(eps)),
            dict(flags, BLOCK_C=block, RELOAD=block > RELOAD_ABOVE), num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    if split and not need_dh:
        dh = None
    # the chunk order is fixed by (B, N): deterministic sums
    total = lambda part: None if part is None else part.sum(1)  # noqa: E731
    return dh, dy, total(dgate_part), total(dscale_part), total(dshift_part)


# ----------------------------------------------------------------- ahead-of-time variants
# integer arguments that are multiples of 16 on the shapes that matter (C = 1536, 3072 and the
# row strides of the activations and of the chunked embedding): what lets accesses be 128-bit
DIVISIBLE = ("C", "stride_hb", "stride_hn", "stride_yb", "stride_yn", "stride_gb", "stride_sb", "stride_tb")


def aot_variants():
    """(name, kernel, {arg: type}, constexprs, num_warps, divisible args): for fp32 and bf16 storage
    at SD3.5's and FLUX's widths (and 6144, the widest block at 32 warps): the forward with and
    without the norm; the backward of the plain gated residual (dy; dy and the dgate partials) and
    of the fused one (LoRA: dh, dy; full: dh, dy and all three partials)."""
    ints = {"N": "i32", "C": "i32", "rows_per_program": "i32", "num_chunks": "i32", "eps": "fp32",
            **{name: "i32" for name in DIVISIBLE if name != "C"}}
    partials = ("dgate_part_ptr", "dscale_part_ptr", "dshift_part_ptr")
    off = dict(WRITE_DH=False, WRITE_DY=False, WRITE_DGATE=False, WRITE_DSCALE=False, WRITE_DSHIFT=False)
    cases = (
        ("fwd/residual", gated_residual_fwd_kernel, dict(NORM=False)),
        ("fwd/norm", gated_residual_fwd_kernel, dict(NORM=True)),
        ("bwd/residual", gated_residual_bwd_kernel, dict(off, NORM=False, HAS_G_OUT=True, WRITE_DY=True)),
        ("bwd/residual_partials", gated_residual_bwd_kernel,
         dict(off, NORM=False, HAS_G_OUT=True, WRITE_DY=True, WRITE_DGATE=True)),
        ("bwd/norm", gated_residual_bwd_kernel, dict(off, NORM=True, HAS_G_OUT=True, WRITE_DH=True, WRITE_DY=True)),
        ("bwd/norm_partials", gated_residual_bwd_kernel,
         dict(NORM=True, HAS_G_OUT=True, WRITE_DH=True, WRITE_DY=True, WRITE_DGATE=True, WRITE_DSCALE=True,
              WRITE_DSHIFT=True)),
    )
    for storage in ("fp32", "bf16"):
        for channels in (1536, 3072, 6144):
            _, _, block, num_warps = launch_config(1, 4096, channels)
            for name, fn, flags in cases:
                types = {arg: ints[arg] if arg in ints else ("*fp32" if arg in partials else f"*{storage}")
                         for arg in fn.arg_names if arg in ints or arg.endswith("_ptr")}
                constexprs = dict(flags, BLOCK_C=block)
                if fn is gated_residual_bwd_kernel:
                    constexprs["RELOAD"] = block > RELOAD_ABOVE
                    if _split_dgate(block, flags["NORM"], flags["WRITE_DGATE"], flags["WRITE_DSCALE"],
                                    flags["WRITE_DSHIFT"]):
                        # what `backward` launches instead: the fused pass without dgate (the
                        # second pass is the residual_partials variant)
                        constexprs["WRITE_DGATE"] = False
                yield f"{name}/{storage}/C{channels}", fn, types, constexprs, num_warps, DIVISIBLE
