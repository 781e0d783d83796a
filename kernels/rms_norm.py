"""Fused RMSNorm (the QK-norm of SD3.5 / FLUX attention): one pass forward, one pass backward.

The wrappers take `x` whose rows lie one after another in memory (`[R, D]` row-major in memory
order: contiguous, or a dense permutation with the last dim innermost such as
`q.view(B, N, H, D).transpose(1, 2)`; `sfgrpo.ops.rms_norm` guarantees it), so row r starts at
element r * D whatever x's logical shape. Outputs are `empty_like(x)`: the same layout, the same
row order. Each program handles a tile of BLOCK_ROWS x BLOCK_D (a whole row per tile row), so
QK-norm's D = 64 still fills warps and loads 128 bits per thread.

Rounding mirrors diffusers' RMSNorm (see `sfgrpo.reference.rms_norm`): fp32 math, the mean as
sum / D and rsqrt as 1 / sqrt, both IEEE-rounded (div_rn, sqrt_rn: what torch computes on the
CPU; plain `/` is div.full, 2 ulp), x * rsqrt rounded to a half weight's dtype before the
multiply, the product rounded to that dtype, then the store's cast to the output dtype. Only the
order of the fp32 sum of squares differs from torch.

Backward recomputes 1 / rms from x (the row is loaded anyway: no saved statistics, one pass over
x and dy). dweight: each program keeps fp32 partial sums over its rows and writes one `[D]` row of
a `[programs, D]` buffer that `torch.sum(dim=0)` adds: deterministic, no atomics.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sfgrpo.kernels._launch import DirectLauncher
from sfgrpo.kernels._rounding import round_to

# Widest row one tile holds (larger D runs the reference: `sfgrpo.ops.rms_norm`). At 8192 the
# backward holds x, dy, the dweight partials and the weight slice: 16 fp32 values each per thread
# at 16 warps, 113 registers and no spills on sm_90 (tests/test_ptx.py).
MAX_D = 8192
# Elements per tile: 16 KB of fp32, one or two 128-bit accesses per thread and tensor (`tile_config`).
TILE_ELEMENTS = 4096
# Backward programs when dweight is needed (each strides over row tiles, so the partials buffer is
# at most [MAX_PARTIALS, D]); fixed, not the device's SM count, so dweight's summation order, and
# its bits, depend only on the shape.
MAX_PARTIALS = 1024
# No FMA contraction: x * r * w must round like the reference's separate multiplies.
FP_FUSION = False


@triton.jit
def _inv_rms(x, D, eps):
    """1 / sqrt(mean(x^2) + eps) per tile row, IEEE-rounded like torch.rsqrt on the CPU."""
    # D * 1.0, not D.to(...): Triton passes D = 1 as a constexpr (a Python int)
    mean_sq = tl.math.div_rn(tl.sum(x * x, axis=1), D * 1.0)
    return tl.math.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))


@triton.jit
def _inv_rms_input_grad(g, x, r, D):
    """d/dx of x r w given g = dy w (or dy without a weight), per tile row: r g - x r^3 mean(g x)."""
    c = tl.math.div_rn(tl.sum(g * x, axis=1), D * 1.0)[:, None]
    return r * g - x * (r * r * r * c)


@triton.jit
def _tile(R, D, tile, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    return offs, mask


@triton.jit
def rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, R, D, eps,
                        HAS_W: tl.constexpr, ROUND_W: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    offs, mask = _tile(R, D, tl.program_id(0), BLOCK_ROWS, BLOCK_D)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = x * _inv_rms(x, D, eps)[:, None]
    if HAS_W:
        cols = tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0)
        if ROUND_W:  # diffusers: h.to(weight.dtype) * weight, a half-precision product
            h = round_to(round_to(h, w.dtype).to(tl.float32) * w.to(tl.float32)[None, :], w.dtype)
        else:
            h = h * w.to(tl.float32)[None, :]
    tl.store(y_ptr + offs, round_to(h.to(tl.float32), y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _strided_rows(R, tile, S1, S2, ST0, ST1, ST2, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets of the tile's rows in a tensor whose row r (x's memory order) is (i0, i1, i2) over
    sizes (., S1, S2) at strides (ST0, ST1, ST2): the incoming gradient as a slice of a joint one."""
    rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    r = tl.where(rows < R, rows, 0).to(tl.int64)
    i2 = r % S2
    i01 = r // S2
    base = (i01 // S1) * ST0 + (i01 % S1) * ST1 + i2 * ST2
    return base[:, None] + tl.arange(0, BLOCK_D)[None, :]


@triton.jit
def rms_norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, dx_ptr, dw_ptr, R, D, eps, TILES, DY_S1, DY_S2, DY_ST0, DY_ST1, DY_ST2,
                        HAS_W: tl.constexpr, ROUND_W: tl.constexpr, WRITE_DX: tl.constexpr,
                        WRITE_DW: tl.constexpr, STRIDED_DY: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    if HAS_W:
        w_store = tl.load(w_ptr + cols, mask=cols < D, other=0.0)
        w = w_store.to(tl.float32)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)  # reduced over rows once, at the end
    for tile in range(pid, TILES, tl.num_programs(0)):
        offs, mask = _tile(R, D, tile, BLOCK_ROWS, BLOCK_D)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if STRIDED_DY:
            dy_offs = _strided_rows(R, tile, DY_S1, DY_S2, DY_ST0, DY_ST1, DY_ST2, BLOCK_ROWS, BLOCK_D)
        else:
            dy_offs = offs
        dy = tl.load(dy_ptr + dy_offs, mask=mask, other=0.0).to(tl.float32)
        r = _inv_rms(x, D, eps)[:, None]
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        if WRITE_DX:
            dx = _inv_rms_input_grad(g, x, r, D)
            tl.store(dx_ptr + offs, round_to(dx, dx_ptr.dtype.element_ty), mask=mask)
        if WRITE_DW:
            h = x * r
            if ROUND_W:  # the forward multiplied the weight by h rounded to its dtype
                h = round_to(h, w_store.dtype).to(tl.float32)
            # padding rows have r = 1 / sqrt(eps): inf when eps = 0, and 0 * inf is NaN
            acc += tl.where(mask, dy * h, 0.0)
    if WRITE_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * D + cols, tl.sum(acc, axis=0), mask=cols < D)


@functools.lru_cache(maxsize=256)
def tile_config(D: int, itemsize: int, vectors: int = 2) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps): a whole row per tile row, TILE_ELEMENTS per tile, and
    warps so that each thread handles `vectors` 128-bit vectors of a tensor (fewer where 16 warps
    cannot cover the tile). The forward takes 2 (D = 64 bf16: 64 rows x 64, 8 warps, 40 registers
    on sm_90); the backward, which holds x, dy, the weight and the dweight partials, 1 (16 warps:
    60 registers instead of 108 at 8 warps, twice the resident warps)."""
    block_d = triton.next_power_of_2(D)
    block_rows = max(1, TILE_ELEMENTS // block_d)
    vector = 16 // itemsize
    num_warps = max(1, min(16, block_rows * block_d // (32 * vector * vectors)))
    return block_rows, block_d, num_warps


_FWD = DirectLauncher(rms_norm_fwd_kernel)
_BWD = DirectLauncher(rms_norm_bwd_kernel)


def _round_w(weight) -> bool:
    """A half-precision weight (float16 / bfloat16: the 2-byte float dtypes sfgrpo accepts)."""
    return weight is not None and weight.element_size() == 2


def forward(x, weight, eps: float, out_dtype):
    """y = rms_norm(x) in `out_dtype`, laid out like x (rows consecutive in memory, see above)."""
    y = torch.empty_like(x, dtype=out_dtype)
    D = x.shape[-1]
    R = x.numel() // D if D else 0
    if R == 0:
        return y
    block_rows, block_d, num_warps = tile_config(D, x.element_size())
    weight = None if weight is None else weight.contiguous()  # read as [D] at stride 1
    _FWD.with_constexprs(
        ((R + block_rows - 1) // block_rows,), (x, x if weight is None else weight, y, R, D, float(eps)),
        dict(HAS_W=weight is not None, ROUND_W=_round_w(weight), BLOCK_ROWS=block_rows, BLOCK_D=block_d),
        num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    return y


def backward(dy, x, weight, eps: float, need_dx: bool, need_dw: bool, dy_rows=None):
    """(dx, dweight), None where not needed. dy has x's layout, or `dy_rows` = ((S0, S1, S2),
    (ST0, ST1, ST2)) maps x's memory-order rows to dy's (`sfgrpo.ops.rms_norm.row_map`)."""
    D = x.shape[-1]
    R = x.numel() // D if D else 0
    need_dw = need_dw and weight is not None
    dx = torch.empty_like(x) if need_dx else None
    if R == 0 or not (need_dx or need_dw):
        return dx, (torch.zeros_like(weight) if need_dw else None)
    block_rows, block_d, num_warps = tile_config(D, max(x.element_size(), dy.element_size()), vectors=1)
    tiles = (R + block_rows - 1) // block_rows  # not triton.cdiv: a constexpr_function, ~1 us a call
    weight = None if weight is None else weight.contiguous()
    programs = min(tiles, MAX_PARTIALS) if need_dw else tiles
    partials = torch.empty(programs, D, dtype=torch.float32, device=x.device) if need_dw else None
    (_, s1, s2), (st0, st1, st2) = dy_rows if dy_rows is not None else ((R, 1, 1), (0, 0, 0))
    _BWD.with_constexprs(
        (programs,), (x, x if weight is None else weight, dy, x if dx is None else dx,
                      x if partials is None else partials, R, D, float(eps), tiles, s1, s2, st0, st1, st2),
        dict(HAS_W=weight is not None, ROUND_W=_round_w(weight), WRITE_DX=need_dx, WRITE_DW=need_dw,
             STRIDED_DY=dy_rows is not None, BLOCK_ROWS=block_rows, BLOCK_D=block_d),
        num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    dw = partials.sum(dim=0).to(weight.dtype) if need_dw else None
    return dx, dw


# ----------------------------------------------------------------- ahead-of-time variants
def aot_variants():
    """(name, kernel, {arg: type}, constexprs, num_warps): forward and backward for fp32 and bf16
    storage at QK-norm's D = 64 and 128 and a wide D = 3072 (and the widest tile, MAX_D, for
    register pressure), with and without the weight gradient."""
    storage_of = {"fp32": ("fp32", 4), "bf16": ("bf16", 2)}
    for name, (storage, itemsize) in storage_of.items():
        for D in (64, 128, 3072, MAX_D):
            w = dict(HAS_W=True, ROUND_W=storage != "fp32")
            scalars = {"R": "i32", "D": "i32", "eps": "fp32"}
            block_rows, block_d, num_warps = tile_config(D, itemsize)
            yield (f"fwd/{name}/D{D}", rms_norm_fwd_kernel,
                   {"x_ptr": f"*{storage}", "w_ptr": f"*{storage}", "y_ptr": f"*{storage}", **scalars},
                   dict(w, BLOCK_ROWS=block_rows, BLOCK_D=block_d), num_warps)
            block_rows, block_d, num_warps = tile_config(D, itemsize, vectors=1)
            grad_rows = {"DY_S1": "i32", "DY_S2": "i32", "DY_ST0": "i32", "DY_ST1": "i32", "DY_ST2": "i32"}
            for dw in (False, True):
                for strided in ((False, True) if D <= 128 else (False,)):  # QK norms get joint-grad slices
                    yield (f"bwd/{name}/D{D}/dw{int(dw)}" + ("/strided_dy" if strided else ""), rms_norm_bwd_kernel,
                           {"x_ptr": f"*{storage}", "w_ptr": f"*{storage}", "dy_ptr": f"*{storage}",
                            "dx_ptr": f"*{storage}", "dw_ptr": "*fp32", "TILES": "i32", **scalars, **grad_rows},
                           dict(w, WRITE_DX=True, WRITE_DW=dw, STRIDED_DY=strided, BLOCK_ROWS=block_rows,
                                BLOCK_D=block_d), num_warps, ("D", "DY_ST0", "DY_ST1", "DY_ST2"))
