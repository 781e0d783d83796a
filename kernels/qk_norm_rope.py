"""Fused QK RMSNorm + rotary embedding (FLUX-style attention): one pass forward, one pass backward.

FLUX.1 / FLUX.2 attention normalises q and k per head with `torch.nn.RMSNorm` and then rotates them
with diffusers' `apply_rotary_emb` (interleaved pairs, `use_real_unbind_dim=-1`), which runs in
fp32 as ~7 full-size kernels per tensor (neg, stack, two casts up, two products, the sum, the cast
down) and as many again in the backward. Here one program tile reads rows of x once, normalises
them, rotates the pairs and writes the result once; the backward reads the incoming gradient and
x once and writes dx (and per-program dweight partials) once.

Layout: x is `[B, N, H, D]` (batch, token, head, channel: diffusers' `sequence_dim=1`) with any
strides as long as the channel stride is 1 (rows of a `torch.cat` slice, a transposed view: read
in place); cos / sin are `[N, D]` tables (row n the angles of token n) with channel stride 1. Row
r of the kernels is (b, n, h) with h fastest, so the H rows of one token share their cos / sin
row (read once from L2).

Numbers follow the modules they replace: the norm is torch's `rms_norm` (fp32: x * rsqrt(mean(x^2)
+ eps) * weight, IEEE-rounded division and root as torch computes them on the CPU), rounded to
the dtype torch's norm returns (`ROUND_H`: none under CUDA autocast, where torch's rms_norm runs
in fp32), then diffusers' rotation in fp32 without FMA contraction (x*cos + rotate(x)*sin with
rotate(x) = (-x_odd, x_even) per pair), rounded once to the output dtype. The backward treats the
intermediate rounding as the identity (as autograd does) and keeps fp32 throughout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sfgrpo.kernels._launch import DirectLauncher
from sfgrpo.kernels._rounding import round_to
from sfgrpo.kernels.rms_norm import _inv_rms, _inv_rms_input_grad
from sfgrpo.kernels.rms_norm import tile_config as rms_tile_config

# Widest head dim one tile holds (attention heads are 64-256 wide); wider rows run the reference.
MAX_D = 1024
# Backward programs when dweight is needed: fixed, so dweight's summation order (its bits) depends
# only on the shape, not on the device.
MAX_PARTIALS = 1024
FP_FUSION = False
# ROUND_H codes: the dtype the normalised rows are rounded to before the rotation
ROUND_NONE, ROUND_BF16, ROUND_FP16 = 0, 1, 2


@triton.jit
def _rows(tile, R, N, H, BLOCK_ROWS: tl.constexpr):
    """(b, n, h) of the tile's rows (int64) and the valid-row mask."""
    rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    valid = rows < R
    rows = tl.where(valid, rows, 0).to(tl.int64)
    h = rows % H
    token = rows // H
    return token // N, token % N, h, valid


@triton.jit
def _pairs(t, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """[rows, D] -> (even channels, odd channels), each [rows, D / 2]."""
    return tl.split(tl.reshape(t, [BLOCK_ROWS, BLOCK_D // 2, 2]))


@triton.jit
def _interleave(even, odd, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    return tl.reshape(tl.join(even, odd), [BLOCK_ROWS, BLOCK_D])


@triton.jit
def _round_code(h, ROUND_H: tl.constexpr):
    if ROUND_H == 1:
        h = round_to(h, tl.bfloat16).to(tl.float32)
    elif ROUND_H == 2:
        h = h.to(tl.float16).to(tl.float32)
    return h


@triton.jit
def qk_norm_rope_fwd_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr, R, N, H, D, eps,
                            x_sb, x_sn, x_sh, y_sb, y_sn, y_sh, t_sn,
                            HAS_NORM: tl.constexpr, HAS_W: tl.constexpr, ROUND_H: tl.constexpr,
                            BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    b, n, h, valid = _rows(tl.program_id(0), R, N, H, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + (b * x_sb + n * x_sn + h * x_sh)[:, None] + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_NORM:
        x = x * _inv_rms(x, D, eps)[:, None]
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
            x = x * w[None, :]
        x = _round_code(x, ROUND_H)
    t_offs = (n * t_sn)[:, None] + cols[None, :]
    cos = tl.load(cos_ptr + t_offs, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t_offs, mask=mask, other=0.0).to(tl.float32)
    x_even, x_odd = _pairs(x, BLOCK_ROWS, BLOCK_D)
    cos_even, cos_odd = _pairs(cos, BLOCK_ROWS, BLOCK_D)
    sin_even, sin_odd = _pairs(sin, BLOCK_ROWS, BLOCK_D)
    # diffusers: x * cos + stack(-x_odd, x_even) * sin, each product rounded (no FMA)
    y = _interleave(x_even * cos_even - x_odd * sin_even, x_odd * cos_odd + x_even * sin_odd, BLOCK_ROWS, BLOCK_D)
    y_offs = (b * y_sb + n * y_sn + h * y_sh)[:, None] + cols[None, :]
    tl.store(y_ptr + y_offs, round_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def qk_norm_rope_bwd_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, g_ptr, dx_ptr, dw_ptr, R, N, H, D, eps, TILES,
                            x_sb, x_sn, x_sh, g_sb, g_sn, g_sh, dx_sb, dx_sn, dx_sh, t_sn,
                            HAS_NORM: tl.constexpr, HAS_W: tl.constexpr, WRITE_DX: tl.constexpr,
                            WRITE_DW: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)  # dweight partials, reduced at the end
    for tile in range(pid, TILES, tl.num_programs(0)):
        b, n, h, valid = _rows(tile, R, N, H, BLOCK_ROWS)
        mask = valid[:, None] & (cols < D)[None, :]
        g = tl.load(g_ptr + (b * g_sb + n * g_sn + h * g_sh)[:, None] + cols[None, :], mask=mask, other=0.0)
        t_offs = (n * t_sn)[:, None] + cols[None, :]
        cos = tl.load(cos_ptr + t_offs, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + t_offs, mask=mask, other=0.0).to(tl.float32)
        g_even, g_odd = _pairs(g.to(tl.float32), BLOCK_ROWS, BLOCK_D)
        cos_even, cos_odd = _pairs(cos, BLOCK_ROWS, BLOCK_D)
        sin_even, sin_odd = _pairs(sin, BLOCK_ROWS, BLOCK_D)
        # the rotation's transpose: d/dx_even = g_even cos_even + g_odd sin_odd,
        # d/dx_odd = g_odd cos_odd - g_even sin_even
        u = _interleave(g_even * cos_even + g_odd * sin_odd, g_odd * cos_odd - g_even * sin_even,
                        BLOCK_ROWS, BLOCK_D)
        if HAS_NORM:
            x = tl.load(x_ptr + (b * x_sb + n * x_sn + h * x_sh)[:, None] + cols[None, :], mask=mask, other=0.0)
            x = x.to(tl.float32)
            r = _inv_rms(x, D, eps)[:, None]
            if HAS_W:
                gw = u * w[None, :]
            else:
                gw = u
            if WRITE_DX:
                dx = _inv_rms_input_grad(gw, x, r, D)
            if WRITE_DW:
                # padding rows have r = 1 / sqrt(eps): inf when eps = 0, and 0 * inf is NaN
                acc += tl.where(mask, u * (x * r), 0.0)
        else:
            dx = u
        if WRITE_DX:
            dx_offs = (b * dx_sb + n * dx_sn + h * dx_sh)[:, None] + cols[None, :]
            tl.store(dx_ptr + dx_offs, round_to(dx, dx_ptr.dtype.element_ty), mask=mask)
    if WRITE_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * D + cols, tl.sum(acc, axis=0), mask=cols < D)


def tile_config(D: int, itemsize: int, vectors: int = 2) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps): whole rows, as the RMSNorm kernels tile them (the forward
    2 vectors per thread and tensor, the backward 1); at least a pair of channels wide."""
    return rms_tile_config(max(D, 2), itemsize, vectors)


_FWD = DirectLauncher(qk_norm_rope_fwd_kernel)
_BWD = DirectLauncher(qk_norm_rope_bwd_kernel)


def round_code(dtype) -> int:
    """ROUND_H for the dtype the normalised rows are rounded to (float32: none)."""
    return {torch.bfloat16: ROUND_BF16, torch.float16: ROUND_FP16}.get(dtype, ROUND_NONE)


def _strides(t):
    return t.stride()[:3]  # one call: t.stride(i) parses its argument each time


def forward(x, cos, sin, weight, eps, norm_dtype, out_dtype):
    """y `[B, N, H, D]` (contiguous, `out_dtype`); eps None: the rotation only. x's channel stride
    and cos / sin's must be 1 (the op layer sees to it)."""
    B, N, H, D = x.shape
    y = torch.empty(B, N, H, D, dtype=out_dtype, device=x.device)
    R = B * N * H
    if R == 0 or D == 0:
        return y
    block_rows, block_d, num_warps = tile_config(D, min(x.element_size(), y.element_size()))
    has_norm = eps is not None
    weight = None if weight is None else weight.contiguous()  # read as [D] at stride 1
    _FWD.with_constexprs(
        ((R + block_rows - 1) // block_rows,),
        (x, x if weight is None else weight, cos, sin, y, R, N, H, D, float(eps or 0.0),
         *_strides(x), *_strides(y), cos.stride()[0]),
        dict(HAS_NORM=has_norm, HAS_W=has_norm and weight is not None,
             ROUND_H=round_code(norm_dtype) if has_norm else ROUND_NONE, BLOCK_ROWS=block_rows, BLOCK_D=block_d),
        num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    return y


def backward(g, x, cos, sin, weight, eps, need_dx: bool, need_dw: bool):
    """(dx `[B, N, H, D]` contiguous in x's dtype, dweight), None where not needed; g of any
    strides with channel stride 1."""
    B, N, H, D = x.shape
    R = B * N * H
    has_norm = eps is not None
    need_dw = need_dw and has_norm and weight is not None
    dx = torch.empty(B, N, H, D, dtype=x.dtype, device=x.device) if need_dx else None
    if R == 0 or D == 0 or not (need_dx or need_dw):
        return dx, (torch.zeros_like(weight) if need_dw else None)
    block_rows, block_d, num_warps = tile_config(D, min(x.element_size(), g.element_size()), vectors=1)
    tiles = (R + block_rows - 1) // block_rows
    programs = min(tiles, MAX_PARTIALS) if need_dw else tiles
    partials = torch.empty(programs, D, dtype=torch.float32, device=x.device) if need_dw else None
    out = x if dx is None else dx
    weight = None if weight is None else weight.contiguous()
    _BWD.with_constexprs(
        (programs,),
        (x, x if weight is None else weight, cos, sin, g, out, x if partials is None else partials,
         R, N, H, D, float(eps or 0.0), tiles, *_strides(x), *_strides(g), *_strides(out), cos.stride()[0]),
        dict(HAS_NORM=has_norm, HAS_W=has_norm and weight is not None, WRITE_DX=need_dx, WRITE_DW=need_dw,
             BLOCK_ROWS=block_rows, BLOCK_D=block_d),
        num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    dw = partials.sum(dim=0).to(weight.dtype) if need_dw else None
    return dx, dw


# ----------------------------------------------------------------- ahead-of-time variants
def aot_variants():
    """(name, kernel, {arg: type}, constexprs, num_warps, divisible args): forward and backward for
    fp32 and bf16 storage at FLUX's head dim 128 and 64 (and the widest tile), norm with a weight
    (FLUX) and the rotation alone, with and without the weight gradient."""
    strides = ("x_sb", "x_sn", "x_sh", "t_sn")
    for storage, itemsize in (("fp32", 4), ("bf16", 2)):
        for D in (64, 128, MAX_D):
            scalars = {"R": "i32", "N": "i32", "H": "i32", "D": "i32", "eps": "fp32", "t_sn": "i32"}
            pointers = {"x_ptr": f"*{storage}", "w_ptr": f"*{storage}", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}
            for norm in (True, False):
                block_rows, block_d, num_warps = tile_config(D, itemsize)
                fwd_strides = {name: "i32" for name in ("x_sb", "x_sn", "x_sh", "y_sb", "y_sn", "y_sh")}
                yield (f"fwd/{storage}/D{D}/norm{int(norm)}", qk_norm_rope_fwd_kernel,
                       {**pointers, "y_ptr": f"*{storage}", **scalars, **fwd_strides},
                       dict(HAS_NORM=norm, HAS_W=norm, ROUND_H=ROUND_BF16 if storage == "bf16" and norm else ROUND_NONE,
                            BLOCK_ROWS=block_rows, BLOCK_D=block_d), num_warps,
                       ("D", *strides, "y_sb", "y_sn", "y_sh"))
                block_rows, block_d, num_warps = tile_config(D, itemsize, vectors=1)
                bwd_strides = {name: "i32" for name in ("x_sb", "x_sn", "x_sh", "g_sb", "g_sn", "g_sh",
                                                         "dx_sb", "dx_sn", "dx_sh")}
                for dw in ((False, True) if norm else (False,)):
                    yield (f"bwd/{storage}/D{D}/norm{int(norm)}/dw{int(dw)}", qk_norm_rope_bwd_kernel,
                           {**pointers, "g_ptr": f"*{storage}", "dx_ptr": f"*{storage}", "dw_ptr": "*fp32",
                            "TILES": "i32", **scalars, **bwd_strides},
                           dict(HAS_NORM=norm, HAS_W=norm, WRITE_DX=True, WRITE_DW=dw, BLOCK_ROWS=block_rows,
                                BLOCK_D=block_d), num_warps,
                           ("D", *strides, "g_sb", "g_sn", "g_sh", "dx_sb", "dx_sn", "dx_sh"))
