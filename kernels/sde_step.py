"""Fused SDE step (SPEC §3): one memory pass forward, one memory pass backward.

Every SDE type has `mean = c_x * x + c_v * v`, `x' = mean + std * eps` with per-row scalars, so a
single pass over (x, v[, v_ref], x' or eps) yields the sample, the per-row squared residuals that
make the Gaussian log-prob, the squared mean differences that make the KL, the mean and the Tweedie
estimates. Rows are split into fixed chunks that depend only on (B, D, dtype) — never on which
outputs are requested — so sampling and later scoring the stored sample sum in the same order and
give bit-identical log-probs (on-policy ratio exactly 1). When a row spans several chunks, the
programs store partial sums, take a ticket from the row's counter, and the row's last program adds
the partials in chunk order (fp64): deterministic (no atomics on values), and a step is always a
single launch (host launch overhead, not bandwidth, dominates small steps).

The per-row coefficients are recomputed from (t, t', noise level) in every program: a few scalar
flops instead of extra launches, and no host syncs (everything per row lives in device tensors).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from sfgrpo import alloc
from sfgrpo.kernels._launch import DirectLauncher, _int_key
from sfgrpo.kernels._rounding import round_to
from sfgrpo.scratch import stream_scratch

SDE_TYPE_IDS = {"sde": 0, "cps": 1, "ddim": 2, "ode": 3}
MODE_SCORE, MODE_NOISE, MODE_PHILOX = 0, 1, 2
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
# No FMA contraction: the kernels are memory-bound, and uncontracted math rounds exactly like the
# reference and identically in every specialisation (sampling vs scoring), whatever LLVM decides.
FP_FUSION = False
# Box-Muller of the in-kernel Philox noise with the GPU's approximate transcendentals (lg2, sin,
# cos, sqrt .approx: one MUFU each) instead of libdevice's precise logf/sinf/cosf (a ~20-instruction
# polynomial for logf; sinf and cosf each with their own 3-part reduction and a Payne-Hanek branch
# never taken here). SASS per element of the sampling loop on sm_90 (benchmarks/sass_loop_count.py,
# ptxas 12.9 and 13.0 agree; the benchmark's case: x, v in, sample out), scoring / Philox precise /
# Philox fast: fp32 12.5 / 78 / 41, bf16 15 / 81 / 43.6 (Philox-4x32-10 itself ~16 per normal,
# Box-Muller now ~10). On an H100 (132 SMs x 4 issue slots x 32 lanes x 1.98 GHz) that bounds
# sampling at 428 / 816 G elements/s for fp32 and 414 / 767 for bf16, against the ~250 and ~500
# that 3 TB/s of copy bandwidth allows: the precise path could not be memory-bound in bf16
# (measured: ~200 G elements/s in both dtypes), the fast one can. Error bounds: lg2.approx 2^-22
# absolute on [0.5, 2] / 2^-22 relative, sin/cos.approx 2^-21.41 absolute on [-pi, pi] (hence the
# angle 2 pi u - pi of `_box_muller`; the PTX ISA says 2^-20.5), sqrt.approx 2^-23 relative
# (tl.sqrt was already that): the noise is within 7.5e-6 of the precise formula for 99.9 % of the
# draws, see reference.philox_normal4. Triton's interpreter runs no PTX, so there the kernels use
# tl.log2/cos/sin (the reference's numpy functions, the same bits). False: libdevice's precise
# functions on the GPU too, same formula (an A/B switch for benchmarks; it changes the noise by the
# approximation error only).
PHILOX_FAST_MATH = True
# L2 eviction hints for a training step's scoring pass (an A/B switch for benchmarks, off until a GPU
# shows it pays): the forward that autograd will differentiate loads x, v, x' (and v_ref) with
# L2::evict_last, so that the backward that follows a few small loss kernels later can find them
# in L2 (an H100 has 50 MB: bf16 FLUX latents of batch 16 are 8.4 MB each), and the backward,
# their last use, loads them with L2::evict_first. Sampling and scoring without a gradient keep the
# default priority. Hints change where data is cached, never a value.
L2_HINTS = False


@triton.jit
def _row_coefficients(t_ptr, tn_ptr, a_ptr, smax_ptr, t_val, tn_val, a_val, smax_val, row,
                      SDE_TYPE: tl.constexpr, ROW_SCALARS: tl.constexpr):
    """(c_x, c_v, std, std_dev_t) of one row, float32 — the formulas of reference.sde_coefficients.
    ROW_SCALARS: every row has the same (t, t', a, sigma_max), passed by value (no per-row tensors
    to build on the device, no loads)."""
    if ROW_SCALARS:
        t = tl.cast(t_val, tl.float32)  # (tl.cast: the interpreter passes Python floats)
        tn = tl.cast(tn_val, tl.float32)
        a = tl.cast(a_val, tl.float32)
    else:
        t = tl.load(t_ptr + row).to(tl.float32)
        tn = tl.load(tn_ptr + row).to(tl.float32)
        a = tl.load(a_ptr + row).to(tl.float32)
    dt = tn - t
    if SDE_TYPE == 0:  # sde (Flow-GRPO)
        if ROW_SCALARS:
            smax = tl.cast(smax_val, tl.float32)
        else:
            smax = tl.load(smax_ptr + row).to(tl.float32)
        t_tilde = tl.where(t >= 1.0, smax, t)
        sigma = a * tl.sqrt(t / (1.0 - t_tilde))
        corr = sigma * sigma / (2.0 * t)
        c_x = 1.0 + dt * corr
        c_v = dt * (1.0 + corr * (1.0 - t))
        std = sigma * tl.sqrt(-dt)
        std_dev_t = sigma
    elif SDE_TYPE == 3:  # ode
        c_x = t * 0.0 + 1.0
        c_v = dt
        std = t * 0.0
        std_dev_t = std
    else:  # cps / ddim share the coefficient-preserving mean
        if SDE_TYPE == 1:
            std = tn * tl.sin(a * 1.5707963267948966)
        else:
            std = a * tn * tl.sqrt(1.0 - t)
        keep = tl.sqrt(tl.maximum(tn * tn - std * std, 0.0))
        c_x = (1.0 - tn) + keep
        c_v = keep * (1.0 - t) - t * (1.0 - tn)
        std_dev_t = std
    return t, c_x, c_v, std, std_dev_t


@triton.jit
def _uniform(word):
    """A Philox word as a float32 uniform in [0, 1): the word's 31-bit fold (x < 0 -> ~x) times
    4.6566127342e-10, exactly Triton's uint_to_uniform_float for 32-bit words."""
    folded = word.to(tl.int32, bitcast=True)
    folded = tl.where(folded < 0, ~folded, folded)
    return folded.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _box_muller(u1, u2, FAST_MATH: tl.constexpr):
    """Two standard normals from two uniforms (reference.philox_normal4 has the same formula):
    radius sqrt(-2 ln u1) = sqrt(-2 ln(2) log2 u1), angle 2 pi u2 - pi in [-pi, pi) (the range where
    the hardware sin/cos approximations keep their 2^-21.41 absolute error), and the radius negated
    so that r cos(angle) = sqrt(..) cos(2 pi u2): the values of tl.randn4x up to rounding."""
    u1 = tl.maximum(u1, 1.0e-7)
    angle = u2 * 6.283185307179586 - 3.141592653589793  # FP_FUSION off: two roundings, as the reference
    if FAST_MATH:
        log2_u1 = libdevice.fast_log2f(u1)  # lg2.approx.ftz.f32 (MUFU.LG2)
        cos_a = libdevice.fast_cosf(angle)  # cos.approx.ftz.f32 (FMUL.RZ + MUFU.COS)
        sin_a = libdevice.fast_sinf(angle)  # sin.approx.ftz.f32 (MUFU.SIN)
    else:
        log2_u1 = tl.log2(u1)
        cos_a = tl.cos(angle)
        sin_a = tl.sin(angle)
    # clamped: within lg2.approx's 2^-22 absolute error of 0, u1 just below 1 may give log2 > 0 (and
    # the square root a NaN); tl.sqrt is sqrt.approx.ftz.f32 on the GPU
    radius = -tl.sqrt(tl.maximum(-1.3862943611198906 * log2_u1, 0.0))
    return radius * cos_a, radius * sin_a


@triton.jit
def _philox_normal4(seed, counters, FAST_MATH: tl.constexpr):
    """Four normals per counter: Philox4x32-10 (tl.randint4x: counter = (low word, high word, 0, 0),
    key = the seed's two words), its four words -> uniforms -> two Box-Muller pairs."""
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    n0, n1 = _box_muller(_uniform(w0), _uniform(w1), FAST_MATH)
    n2, n3 = _box_muller(_uniform(w2), _uniform(w3), FAST_MATH)
    return n0, n1, n2, n3


@triton.jit
def _philox_block(seed, first_counter, BLOCK: tl.constexpr, FAST_MATH: tl.constexpr):
    """BLOCK normals in element order from the BLOCK / 4 counters first_counter, first_counter + 1,
    ...: element 4q + j is normal j of counter first_counter + q. Interleaved by a select on a
    [BLOCK / 4, 4] broadcast rather than tl.join + reshape: Triton then computes Philox in a slice
    of the elements' layout and the selects fold to register moves, where join made it shuffle the
    normals through shared memory when a thread holds 8 elements (bf16/fp16 blocks: 4 barriers, 4
    shared stores and 4 loads per 8 elements on sm_90)."""
    n0, n1, n2, n3 = _philox_normal4(seed, first_counter + tl.arange(0, BLOCK // 4), FAST_MATH)
    j = tl.arange(0, 4)[None, :]
    eps = tl.where(j == 0, n0[:, None], tl.where(j == 1, n1[:, None], tl.where(j == 2, n2[:, None], n3[:, None])))
    return tl.reshape(eps, [BLOCK])


@triton.jit
def philox_noise_kernel(out_ptr, seed, seed_offset, D, BLOCKS_PER_ROW, BLOCK: tl.constexpr, FAST_MATH: tl.constexpr):
    """The noise the forward kernel's Philox mode draws, written out: `[rows, D]` float32, row r
    from counters seed_offset + r * ceil(D / 4) + q (reference.philox_step_noise's layout)."""
    pid = tl.program_id(0)
    row = pid // BLOCKS_PER_ROW
    block = pid - row * BLOCKS_PER_ROW
    cols = block * BLOCK + tl.arange(0, BLOCK)
    first = seed_offset + row.to(tl.int64) * ((D + 3) // 4) + block * (BLOCK // 4)
    eps = _philox_block(seed, first, BLOCK, FAST_MATH)
    tl.store(out_ptr + row.to(tl.int64) * D + cols, eps, mask=cols < D)


@triton.jit
def _chunk_of(pid, NUM_CHUNKS, D, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Row of program `pid` and where its chunk starts: (row, first flat offset of the row, first column)."""
    row = pid // NUM_CHUNKS
    chunk = pid - row * NUM_CHUNKS
    return row, row.to(tl.int64) * D, chunk * (BLOCK * ITERS)


@triton.jit
def _load_block(x_ptr, v_ptr, row_start, block_start, D, c_x, c_v, BLOCK: tl.constexpr, EVICT: tl.constexpr):
    """One block of a row: (flat offsets, in-row mask, x, v, mean = c_x x + c_v v), float32.
    EVICT: the loads' L2 eviction priority ("" for the default; see L2_HINTS)."""
    cols = block_start + tl.arange(0, BLOCK)
    mask = cols < D
    offs = row_start + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
    return offs, mask, x, v, c_x * x + c_v * v


@triton.jit
def _kl_std(std, std_dev_t, KL_FLOW_GRPO: tl.constexpr):
    """The std the KL divides by: the step's (exact) or Flow-GRPO's std_dev_t (reference.kl_std)."""
    if KL_FLOW_GRPO:
        return std_dev_t
    return std


@triton.jit
def _finalize_row(
    sq, sq_kl, std, std_dev_t, D,
    SDE_TYPE: tl.constexpr, LOGPROB_FLOW_GRPO: tl.constexpr, SUM_REDUCTION: tl.constexpr,
    KL_FLOW_GRPO: tl.constexpr,
):
    """Per-row log-prob and KL from the row's sums of squares (float32/float64 scalars)."""
    if SUM_REDUCTION:
        scale = 1.0
        count = D * 1.0
    else:
        scale = 1.0 / D
        count = 1.0
    if LOGPROB_FLOW_GRPO and (SDE_TYPE == 1 or SDE_TYPE == 2):
        log_prob = -sq * scale  # no std in Flow-GRPO's bare squares: defined on every row, std = 0 too
    else:
        has_density = std > 0.0
        safe_std = tl.where(has_density, std, 1.0)
        log_prob = -sq * scale / (2.0 * safe_std * safe_std) - count * (tl.log(safe_std) + 0.9189385332046727)
        log_prob = tl.where(has_density, log_prob, 0.0)
    kl_std = _kl_std(std, std_dev_t, KL_FLOW_GRPO)
    kl_has = kl_std > 0.0
    safe_kl = tl.where(kl_has, kl_std, 1.0)
    kl = tl.where(kl_has, sq_kl * scale / (2.0 * safe_kl * safe_kl), 0.0)
    return log_prob, kl


@triton.jit
def sde_step_fwd_kernel(
    x_ptr, v_ptr, vref_ptr, sample_in_ptr, noise_ptr,
    t_ptr, tn_ptr, a_ptr, smax_ptr, t_val, tn_val, a_val, smax_val,
    sample_out_ptr, mean_ptr, x0_ptr, x1_ptr,
    partial_ptr, ticket_ptr,
    logp_ptr, kl_ptr, std_ptr, stddev_ptr,
    seed, seed_offset,
    D, NUM_CHUNKS,
    SDE_TYPE: tl.constexpr, ROW_SCALARS: tl.constexpr, MODE: tl.constexpr, HAS_VREF: tl.constexpr,
    WRITE_MEAN: tl.constexpr, WRITE_X0: tl.constexpr, WRITE_X1: tl.constexpr,
    FINALIZE: tl.constexpr, LOGPROB_FLOW_GRPO: tl.constexpr, SUM_REDUCTION: tl.constexpr,
    KL_FLOW_GRPO: tl.constexpr, FAST_MATH: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr, BLOCK_C: tl.constexpr, EVICT: tl.constexpr,
):
    """FINALIZE (one chunk per row): the program writes its row's outputs. Otherwise each program
    stores its chunk's partial sums and takes a ticket from the row's counter; the row's last
    program adds the partials in chunk order (fp64, the same bits whichever program finishes last)
    and writes the outputs: one launch per step, no atomics on the sums."""
    pid = tl.program_id(0)
    row, row_start, chunk_start = _chunk_of(pid, NUM_CHUNKS, D, BLOCK, ITERS)
    t, c_x, c_v, std, std_dev_t = _row_coefficients(
        t_ptr, tn_ptr, a_ptr, smax_ptr, t_val, tn_val, a_val, smax_val, row, SDE_TYPE, ROW_SCALARS
    )
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs, mask, x, v, mean = _load_block(x_ptr, v_ptr, row_start, chunk_start + i * BLOCK, D, c_x, c_v, BLOCK,
                                             EVICT)
        if MODE == 0:
            sample = tl.load(sample_in_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
        else:
            if MODE == 1:
                eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                # row r uses counters seed_offset + r * ceil(D / 4) + q, 4 normals each
                quads = seed_offset + row.to(tl.int64) * ((D + 3) // 4) + (chunk_start + i * BLOCK) // 4
                eps = _philox_block(seed, quads, BLOCK, FAST_MATH)
            # round to the storage dtype first: the log-prob must be that of the stored sample
            stored = round_to(mean + std * eps, sample_out_ptr.dtype.element_ty)
            tl.store(sample_out_ptr + offs, stored, mask=mask)
            sample = stored.to(tl.float32)
        diff = tl.where(mask, sample - mean, 0.0)
        acc += diff * diff
        if HAS_VREF:
            v_ref = tl.load(vref_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
            mean_diff = tl.where(mask, mean - (c_x * x + c_v * v_ref), 0.0)
            acc_kl += mean_diff * mean_diff
        if WRITE_MEAN:
            tl.store(mean_ptr + offs, mean, mask=mask)
        if WRITE_X0:
            tl.store(x0_ptr + offs, x - t * v, mask=mask)
        if WRITE_X1:
            tl.store(x1_ptr + offs, x + (1.0 - t) * v, mask=mask)
    sq = tl.sum(acc, axis=0)
    sq_kl = tl.sum(acc_kl, axis=0)
    if FINALIZE:
        log_prob, kl = _finalize_row(
            sq, sq_kl, std, std_dev_t, D, SDE_TYPE, LOGPROB_FLOW_GRPO, SUM_REDUCTION, KL_FLOW_GRPO
        )
        tl.store(logp_ptr + row, log_prob)
        tl.store(std_ptr + row, std)
        tl.store(stddev_ptr + row, std_dev_t)
        if HAS_VREF:
            tl.store(kl_ptr + row, kl)
    else:
        # one partial per program, then (with a reference velocity) the KL's partials after them:
        # the pointer is derived here rather than passed, one launch argument less
        partial_kl_ptr = partial_ptr + tl.num_programs(0)
        tl.store(partial_ptr + pid, sq)
        if HAS_VREF:
            tl.store(partial_kl_ptr + pid, sq_kl)
        tl.debug_barrier()  # the partials are stored before the ticket releases them
        ticket = tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel")
        if ticket == NUM_CHUNKS - 1:
            _finalize_from_partials(
                partial_ptr, partial_kl_ptr, logp_ptr, kl_ptr, std_ptr, stddev_ptr, row, std, std_dev_t, D,
                NUM_CHUNKS, SDE_TYPE, HAS_VREF, LOGPROB_FLOW_GRPO, SUM_REDUCTION, KL_FLOW_GRPO, BLOCK_C,
            )
            tl.store(ticket_ptr + row, 0)  # the counter is ready for the next launch (CUDA graphs replay it)


@triton.jit
def _finalize_from_partials(
    partial_ptr, partial_kl_ptr, logp_ptr, kl_ptr, std_ptr, stddev_ptr, row, std, std_dev_t, D, NUM_CHUNKS,
    SDE_TYPE: tl.constexpr, HAS_VREF: tl.constexpr, LOGPROB_FLOW_GRPO: tl.constexpr,
    SUM_REDUCTION: tl.constexpr, KL_FLOW_GRPO: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """A row's log-prob and KL from its chunk partials, added in a fixed order in fp64. Partials
    written by other programs are read past L1 (`.cg`), which is not coherent across SMs."""
    base = row.to(tl.int64) * NUM_CHUNKS
    acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    acc_kl = tl.zeros([BLOCK_C], dtype=tl.float64)
    for start in range(0, NUM_CHUNKS, BLOCK_C):
        idx = start + tl.arange(0, BLOCK_C)
        mask = idx < NUM_CHUNKS
        acc += tl.load(partial_ptr + base + idx, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)
        if HAS_VREF:
            acc_kl += tl.load(partial_kl_ptr + base + idx, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)
    sq = tl.sum(acc, axis=0)
    sq_kl = tl.sum(acc_kl, axis=0)
    log_prob, kl = _finalize_row(
        sq, sq_kl, std.to(tl.float64), std_dev_t.to(tl.float64), D, SDE_TYPE, LOGPROB_FLOW_GRPO,
        SUM_REDUCTION, KL_FLOW_GRPO,
    )
    tl.store(logp_ptr + row, log_prob.to(tl.float32))
    tl.store(std_ptr + row, std)
    tl.store(stddev_ptr + row, std_dev_t)
    if HAS_VREF:
        tl.store(kl_ptr + row, kl.to(tl.float32))


@triton.jit
def sde_step_bwd_kernel(
    x_ptr, v_ptr, vref_ptr, sample_ptr,
    t_ptr, tn_ptr, a_ptr, smax_ptr, t_val, tn_val, a_val, smax_val,
    g_logp_ptr, g_kl_ptr, g_mean_ptr, g_x0_ptr, g_x1_ptr,
    dv_ptr, dvref_ptr, dx_ptr,
    g_logp_stride, g_kl_stride, D, NUM_CHUNKS,
    SDE_TYPE: tl.constexpr, ROW_SCALARS: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_KL: tl.constexpr,
    HAS_G_MEAN: tl.constexpr, HAS_G_X0: tl.constexpr, HAS_G_X1: tl.constexpr,
    WRITE_DVREF: tl.constexpr, WRITE_DX: tl.constexpr,
    LOGPROB_FLOW_GRPO: tl.constexpr, SUM_REDUCTION: tl.constexpr, KL_FLOW_GRPO: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr, EVICT: tl.constexpr,
):
    """dL/dv (and dL/dv_ref, dL/dx when asked) from the upstream gradients, one pass.

    dv = c_v * (k_lp * (x' - mean) + g_mean + k_kl * (mean - mean_ref)) - t g_x0 + (1 - t) g_x1
    with per-row k_lp = g_logp / (s^2 D_r) (or 2 g_logp / D_r for Flow-GRPO's cps log-prob) and
    k_kl = g_kl / (s_kl^2 D_r); D_r = D for the mean reduction, 1 for the sum.
    """
    pid = tl.program_id(0)
    row, row_start, chunk_start = _chunk_of(pid, NUM_CHUNKS, D, BLOCK, ITERS)
    t, c_x, c_v, std, std_dev_t = _row_coefficients(
        t_ptr, tn_ptr, a_ptr, smax_ptr, t_val, tn_val, a_val, smax_val, row, SDE_TYPE, ROW_SCALARS
    )
    if SUM_REDUCTION:
        scale = 1.0
    else:
        scale = 1.0 / D
    k_lp = 0.0
    if HAS_G_LOGP:
        g_logp = tl.load(g_logp_ptr + row.to(tl.int64) * g_logp_stride).to(tl.float32)
        if LOGPROB_FLOW_GRPO and (SDE_TYPE == 1 or SDE_TYPE == 2):
            k_lp = 2.0 * g_logp * scale  # bare squares: a gradient on every row, std = 0 too
        else:
            safe_std = tl.where(std > 0.0, std, 1.0)
            k_lp = tl.where(std > 0.0, g_logp * scale / (safe_std * safe_std), 0.0)
    k_kl = 0.0
    if HAS_G_KL:
        g_kl = tl.load(g_kl_ptr + row.to(tl.int64) * g_kl_stride).to(tl.float32)
        kl_std = _kl_std(std, std_dev_t, KL_FLOW_GRPO)
        safe_kl = tl.where(kl_std > 0.0, kl_std, 1.0)
        k_kl = tl.where(kl_std > 0.0, g_kl * scale / (safe_kl * safe_kl), 0.0)
    for i in range(ITERS):
        offs, mask, x, v, mean = _load_block(x_ptr, v_ptr, row_start, chunk_start + i * BLOCK, D, c_x, c_v, BLOCK,
                                             EVICT)
        g_on_mean = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_G_LOGP:
            sample = tl.load(sample_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
            g_on_mean += k_lp * (sample - mean)
        if HAS_G_MEAN:
            g_on_mean += tl.load(g_mean_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dv = c_v * g_on_mean
        if HAS_G_KL:
            v_ref = tl.load(vref_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
            g_kl_mean = k_kl * (mean - (c_x * x + c_v * v_ref))
            dv += c_v * g_kl_mean
            if WRITE_DVREF:
                tl.store(dvref_ptr + offs, round_to(-c_v * g_kl_mean, dvref_ptr.dtype.element_ty), mask=mask)
        dx = c_x * g_on_mean
        if HAS_G_X0:
            g_x0 = tl.load(g_x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dv -= t * g_x0
            dx += g_x0
        if HAS_G_X1:
            g_x1 = tl.load(g_x1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dv += (1.0 - t) * g_x1
            dx += g_x1
        tl.store(dv_ptr + offs, round_to(dv, dv_ptr.dtype.element_ty), mask=mask)
        if WRITE_DX:
            tl.store(dx_ptr + offs, round_to(dx, dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ launch config
@dataclass(frozen=True)
class LaunchConfig:
    block: int
    iters: int
    num_chunks: int
    num_warps: int

    @property
    def finalize_inline(self) -> bool:
        return self.num_chunks == 1

    @functools.cached_property
    def partials_block(self) -> int:
        """Partials the row's last program adds per iteration (1 when rows are not split). Cached:
        the configs are (launch_config's lru_cache), and triton.next_power_of_2 is a
        constexpr_function whose call costs ~1 us on every launch otherwise."""
        return 1 if self.finalize_inline else min(1024, triton.next_power_of_2(self.num_chunks))


@dataclass(frozen=True)
class LaunchTuning:
    """The knobs of `launch_config` (benchmarks/tune_sde_step_gpu.py sweeps them on a GPU)."""

    threads: int = 256  # per program
    bytes_per_thread: int = 16  # storage bytes of one tensor a thread handles per iteration (16: 128-bit)
    target_programs: int = 1024  # enough programs to fill the GPU
    max_iters: int = 32  # blocks one program streams


TUNING_ENV = "SFGRPO_SDE_STEP_TUNING"


def tuning_from_text(text: str) -> LaunchTuning:
    """`LaunchTuning` from "threads=256,bytes_per_thread=16,target_programs=1024" (any subset of the
    fields; the others keep their defaults), the format benchmarks/tune_sde_step_gpu.py prints."""
    fields = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in LaunchTuning.__dataclass_fields__:
            raise ValueError(f"{TUNING_ENV}: expected name=value with names from "
                             f"{sorted(LaunchTuning.__dataclass_fields__)}, got {part!r}")
        fields[name] = int(value)
        if fields[name] <= 0:
            raise ValueError(f"{TUNING_ENV}: {name} must be > 0, got {value}")
    tuning = LaunchTuning(**fields)
    per_thread = tuning.bytes_per_thread
    if tuning.threads % 32 or tuning.threads & (tuning.threads - 1) or per_thread & (per_thread - 1):
        raise ValueError(f"{TUNING_ENV}: threads must be a power of two >= 32 and bytes_per_thread a power of "
                         f"two, got {tuning}")
    return tuning


def _tuning_at_import() -> LaunchTuning:
    """The launch knobs for this process: the defaults, or SFGRPO_SDE_STEP_TUNING (a device's sweep
    winner). Read once: the chunking must not change within a run, or sampling and scoring would
    sum residuals in different orders (the on-policy ratio would no longer be exactly 1)."""
    text = os.environ.get(TUNING_ENV, "").strip()
    if not text:
        return LaunchTuning()
    try:
        return tuning_from_text(text)
    except ValueError as err:
        warnings.warn(f"sfgrpo: {err}; using the default launch knobs", RuntimeWarning, stacklevel=2)
        return LaunchTuning()


TUNING = _tuning_at_import()


@functools.lru_cache(maxsize=1024)  # on the host path of every call: ~40 us uncached under Triton 3.6
def launch_config(batch: int, elements_per_row: int, itemsize: int = 4, tuning: LaunchTuning | None = None) -> LaunchConfig:
    """Chunking of each row. Depends only on the shape and storage dtype, never on the requested
    outputs, so the sampling pass and the scoring pass sum residuals in exactly the same order.

    By default each of the 256 threads of a program handles 16 bytes of storage per tensor per
    iteration (4 fp32 or 8 bf16/fp16 values): 128-bit loads and stores."""
    tuning = tuning or TUNING
    per_thread = max(1, tuning.bytes_per_thread // itemsize)
    full_block = tuning.threads * per_thread
    block = min(full_block, triton.next_power_of_2(max(elements_per_row, 16)))
    blocks_per_row = triton.cdiv(elements_per_row, block)
    wanted_chunks = max(1, triton.cdiv(tuning.target_programs, max(batch, 1)))
    iters = triton.next_power_of_2(max(1, triton.cdiv(blocks_per_row, wanted_chunks)))
    iters = min(iters, tuning.max_iters)
    num_chunks = triton.cdiv(blocks_per_row, iters)
    num_warps = max(1, min(tuning.threads // 32, block // (32 * per_thread)))
    return LaunchConfig(block=block, iters=iters, num_chunks=num_chunks, num_warps=num_warps)


# ------------------------------------------------------------------------------- launchers
def philox_fast_math() -> bool:
    """Whether the Philox noise uses the approximate transcendentals: PHILOX_FAST_MATH, never in
    Triton's interpreter (it runs no PTX: there the kernels use tl.log2/cos/sin)."""
    return PHILOX_FAST_MATH and not _INTERPRETED


_NO_VALUES = (0.0,) * 4  # the by-value step values' slots when the kernels read per-row tensors


class _Rows:
    """The per-row (t, t', a, sigma_max) as the kernels take them: four scalars when each is one
    value for every row (a Python number or a 0-d CPU tensor: nothing to build on the device), else
    four `[B]` device tensors."""

    __slots__ = ("pointers", "values", "scalars")

    def __init__(self, values, like):
        t, t_next, level, sigma_max = values
        # the common eager call (sfgrpo.sde_step with numbers: Python floats) first, at the cost of
        # four type checks
        if type(t) is float and type(t_next) is float and type(level) is float and type(sigma_max) is float:
            self._scalars(values, like)
            return
        # then per-row tensors (sfgrpo.sde_step has made them float32 `[B]` on the latents' device)
        tensor = torch.Tensor
        if (isinstance(t, tensor) and isinstance(t_next, tensor) and isinstance(level, tensor)
                and isinstance(sigma_max, tensor) and t.ndim and t_next.ndim and level.ndim and sigma_max.ndim):
            self.scalars = False
            self.values = _NO_VALUES
            self.pointers = tuple(values)
            return
        one = [not isinstance(v, torch.Tensor) or (v.ndim == 0 and v.device.type == "cpu") for v in values]
        if all(one):
            self._scalars(tuple(float(v) for v in values), like)  # CPU tensors: no device sync
            return
        self.scalars = False
        self.values = _NO_VALUES
        self.pointers = tuple(
            torch.full((like.shape[0],), float(v), dtype=torch.float32, device=like.device) if single else v
            for v, single in zip(values, one)
        )

    def _scalars(self, values, like):
        self.scalars = True
        self.values = values
        # unused by the kernel, but Triton's launcher checks that every pointer argument is device
        # memory: hand it the latents, never the CPU scalars
        self.pointers = (like,) * 4


_FWD_LAUNCHER = DirectLauncher(sde_step_fwd_kernel)
_BWD_LAUNCHER = DirectLauncher(sde_step_bwd_kernel)
# the runtime (non-constexpr) parameters lead each kernel's signature; the constexprs follow
_FWD_RUNTIME_ARGS = _FWD_LAUNCHER.arg_names.index("SDE_TYPE")
_BWD_RUNTIME_ARGS = _BWD_LAUNCHER.arg_names.index("SDE_TYPE")
# triton.jit gives an InterpretedFunction when TRITON_INTERPRET was set at import: no `params`,
# which DirectLauncher records as constexpr = None
_INTERPRETED = _FWD_LAUNCHER.constexpr is None


# `forward` / `backward` take contiguous latents of any rank (row b is elements b*D .. b*D + D - 1
# whatever the shape): the eager path hands them over without a `[B, D]` view (~1 us each on the
# host, and one more to reshape each output back)
ANY_RANK = True


def _batch_elements(x) -> tuple[int, int]:
    batch = x.shape[0]
    if batch:
        return batch, x.numel() // batch
    return 0, math.prod(x.shape[1:])


@functools.lru_cache(maxsize=None)
def _flags(sde_type: str, logprob: str, reduction: str, kl: str) -> dict:
    return dict(
        SDE_TYPE=SDE_TYPE_IDS[sde_type],
        LOGPROB_FLOW_GRPO=logprob == "flow_grpo",
        SUM_REDUCTION=reduction == "sum",
        KL_FLOW_GRPO=kl == "flow_grpo",
    )


class _Plan:
    """A launch's constexpr values (in parameter order) and compile options, made once per
    combination of flags and chunking (`_forward_plan`, `_backward_plan`). Hashed by identity: the
    caller keys hold the plan object itself, which the lru_caches hand back for equal arguments,
    instead of a tuple of ~20 values hashed on every call."""

    __slots__ = ("constexprs", "fp_fusion")

    def __init__(self, constexprs: tuple, fp_fusion: bool):
        self.constexprs, self.fp_fusion = constexprs, fp_fusion


@functools.lru_cache(maxsize=1024)
def _forward_plan(mode, has_vref, write_mean, write_x0, write_x1, cfg, row_scalars, fast_math, evict, sde_type,
                  logprob, reduction, kl, fp_fusion) -> _Plan:
    return _Plan(_FWD_LAUNCHER.constexpr_values(_FWD_RUNTIME_ARGS, dict(
        MODE=mode, HAS_VREF=has_vref, WRITE_MEAN=write_mean, WRITE_X0=write_x0, WRITE_X1=write_x1,
        FINALIZE=cfg.finalize_inline, BLOCK=cfg.block, ITERS=cfg.iters, BLOCK_C=cfg.partials_block,
        ROW_SCALARS=row_scalars, FAST_MATH=fast_math, EVICT=evict,
        **_flags(sde_type, logprob, reduction, kl))), fp_fusion)


@functools.lru_cache(maxsize=1024)
def _backward_plan(has_g_logp, has_g_kl, has_g_mean, has_g_x0, has_g_x1, write_dvref, write_dx, cfg, row_scalars,
                   evict, sde_type, logprob, reduction, kl, fp_fusion) -> _Plan:
    return _Plan(_BWD_LAUNCHER.constexpr_values(_BWD_RUNTIME_ARGS, dict(
        HAS_G_LOGP=has_g_logp, HAS_G_KL=has_g_kl, HAS_G_MEAN=has_g_mean, HAS_G_X0=has_g_x0, HAS_G_X1=has_g_x1,
        WRITE_DVREF=write_dvref, WRITE_DX=write_dx, BLOCK=cfg.block, ITERS=cfg.iters, ROW_SCALARS=row_scalars,
        EVICT=evict, **_flags(sde_type, logprob, reduction, kl))), fp_fusion)


def forward(x, v, t, t_next, noise_level, sigma_max, prev_sample, noise, v_ref, seed, seed_offset,
            use_philox, sde_type, logprob, reduction, kl, write_mean, write_x0, write_x1, for_backward=False):
    """Launches the fused forward on `[B, D]` contiguous tensors; returns the op's 8 outputs (None
    for those not asked for). `for_backward`: autograd will run the backward on these inputs (the
    L2 hints' cue)."""
    batch, elements = _batch_elements(x)
    cfg = launch_config(batch, elements, x.element_size())
    rows = _Rows((t, t_next, noise_level, sigma_max), x)
    f32 = torch.float32
    if prev_sample is not None:
        mode = MODE_SCORE
    elif use_philox:
        mode = MODE_PHILOX
    else:
        mode = MODE_NOISE
    device = x.device  # read once: each Tensor.device builds a new object
    sample_out = torch.empty_like(x) if mode != MODE_SCORE else None
    # empty_like: a shape tuple costs torch's argument parser ~2x an empty_like (x is contiguous here)
    mean = torch.empty_like(x, dtype=f32) if write_mean else None
    x0 = torch.empty_like(x, dtype=f32) if write_x0 else None
    x1 = torch.empty_like(x, dtype=f32) if write_x1 else None
    log_prob, std, std_dev_t, kl_out = _row_outputs(batch, device, v_ref is not None)
    if batch == 0:
        return sample_out, log_prob, std, std_dev_t, mean, x0, x1, kl_out
    programs = batch * cfg.num_chunks
    if cfg.finalize_inline:
        partial = tickets = log_prob  # unused: FINALIZE writes the outputs directly
    else:
        # reused by every launch on this stream (sfgrpo.scratch): the row's last program resets
        # its ticket counter, so no allocation and no memset per step. The KL's partials follow
        # the log-prob's in the same buffer (the kernel derives their address).
        partial = stream_scratch("sde_step.partials", device, programs * (2 if v_ref is not None else 1), torch.float32)
        tickets = stream_scratch("sde_step.tickets", device, batch, torch.int32, zeroed=True)
    noise = noise if mode == MODE_NOISE else None
    seed, seed_offset = int(seed), int(seed_offset)
    evict = "evict_last" if for_backward and L2_HINTS and mode == MODE_SCORE else ""
    # every module-level switch the plan depends on is an argument: a test that flips one gets a new plan
    plan = _forward_plan(mode, v_ref is not None, write_mean, write_x0, write_x1, cfg, rows.scalars,
                         mode == MODE_PHILOX and philox_fast_math(), evict, sde_type, logprob, reduction, kl, FP_FUSION)
    runtime = (
        # unused pointer slots get any valid tensor of a plausible dtype; constexpr flags keep them untouched
        x, v, v_ref if v_ref is not None else v, prev_sample if prev_sample is not None else x,
        noise if noise is not None else x,
        *rows.pointers, *rows.values,
        x if sample_out is None else sample_out, x if mean is None else mean,
        x if x0 is None else x0, x if x1 is None else x1,
        partial, tickets,
        log_prob, log_prob if kl_out is None else kl_out, std, std_dev_t,
        seed, seed_offset,
        elements, cfg.num_chunks)
    # what Triton specialises on, from a few values: the plan (constexprs, shape's chunking, options),
    # the dtypes of the inputs (every other pointer is an fp32 / int32 buffer or a dummy x), whether
    # every pointer is 16-byte aligned (fresh outputs and the stream scratch always are), the Philox
    # integers' properties, the row length
    dtypes = _aligned_dtypes((x, v, v_ref, prev_sample, noise) + (() if rows.scalars else rows.pointers))
    caller_key = None if dtypes is None else (plan, dtypes, _int_key(seed), _int_key(seed_offset), elements)
    _FWD_LAUNCHER.launch_keyed((programs,), caller_key, runtime + plan.constexprs, num_warps=cfg.num_warps,
                               enable_fp_fusion=plan.fp_fusion)
    return sample_out, log_prob, std, std_dev_t, mean, x0, x1, kl_out


def _row_outputs(batch: int, device: torch.device, with_kl: bool) -> tuple:
    """Fresh float32 `[batch]` tensors for the per-row outputs (log-prob, std, std_dev_t, and the KL
    or None), from sfgrpo.alloc's allocator where there is one (~4k host instructions each instead
    of torch.empty's ~9k)."""
    allocate = alloc.allocator(device) or alloc.empty_strided_on(device)
    size, stride, f32 = (batch,), (1,), torch.float32
    return (allocate(size, stride, f32), allocate(size, stride, f32), allocate(size, stride, f32),
            allocate(size, stride, f32) if with_kl else None)


def _aligned_dtypes(tensors) -> tuple | None:
    """The launch key's share of the inputs: their dtypes (None for an absent one) when every
    tensor starts at a 16-byte boundary (Triton's pointer specialisation), else None (no caller key:
    the launcher computes the full one)."""
    bits = 0
    for tensor in tensors:
        if tensor is not None:
            bits |= tensor.data_ptr()
    if bits & 15:
        return None
    return tuple(None if tensor is None else tensor.dtype for tensor in tensors)


def philox_noise(seed: int, seed_offset: int, rows: int, elements: int, device, block: int = 1024):
    """`[rows, elements]` float32: the in-kernel Philox noise of a sampling step, as the forward
    kernel draws it (same code, same approximations) — `reference.philox_step_noise` on the GPU."""
    out = torch.empty(rows, elements, dtype=torch.float32, device=device)
    if out.numel():
        blocks = triton.cdiv(elements, block)
        philox_noise_kernel[(rows * blocks,)](out, int(seed), int(seed_offset), elements, blocks, BLOCK=block,
                                              FAST_MATH=philox_fast_math(), num_warps=4, enable_fp_fusion=FP_FUSION)
    return out


def backward(x, v, sample, v_ref, t, t_next, noise_level, sigma_max, grad_log_prob, grad_kl,
             grad_mean, grad_x0, grad_x1, sde_type, logprob, reduction, kl, need_dv_ref, need_dx):
    """Launches the one-pass backward; returns (dv, dv_ref, dx), None where not needed."""
    batch, elements = _batch_elements(x)
    cfg = launch_config(batch, elements, x.element_size())
    rows = _Rows((t, t_next, noise_level, sigma_max), x)
    dv = torch.empty_like(v)
    has_g_kl = grad_kl is not None and v_ref is not None
    dv_ref = None
    if need_dv_ref:
        dv_ref = torch.empty_like(v_ref) if has_g_kl else torch.zeros_like(v_ref)
    dx = torch.empty_like(x) if need_dx else None
    if batch == 0:
        return dv, dv_ref, dx
    contiguous = lambda g: g.contiguous() if g is not None else None  # noqa: E731
    grad_mean, grad_x0, grad_x1 = contiguous(grad_mean), contiguous(grad_x0), contiguous(grad_x1)
    grad_kl = grad_kl if has_g_kl else None
    # the per-row gradients are read through their stride: `log_prob.sum()`'s backward hands an
    # expanded scalar (stride 0), which a .contiguous() would copy in a kernel of its own
    strides = (grad_log_prob.stride(0) if grad_log_prob is not None else 0, grad_kl.stride(0) if has_g_kl else 0)
    runtime = (
        x, v, v_ref if v_ref is not None else v, sample,
        *rows.pointers, *rows.values,
        # unused pointer slots get a device tensor: `t` may be a 0-d CPU tensor (the registered op's
        # scalar step values), which Triton's launcher rejects as a pointer
        grad_log_prob if grad_log_prob is not None else x, grad_kl if has_g_kl else x,
        grad_mean if grad_mean is not None else x, grad_x0 if grad_x0 is not None else x,
        grad_x1 if grad_x1 is not None else x,
        dv, dv_ref if (need_dv_ref and has_g_kl) else dv, dx if need_dx else dv,
        *strides, elements, cfg.num_chunks)
    plan = _backward_plan(grad_log_prob is not None, has_g_kl, grad_mean is not None, grad_x0 is not None,
                          grad_x1 is not None, need_dv_ref and has_g_kl, need_dx, cfg, rows.scalars,
                          "evict_first" if L2_HINTS else "", sde_type, logprob, reduction, kl, FP_FUSION)
    # as the forward's: the plan, the inputs' dtypes and alignment (the outputs are fresh), the
    # per-row gradients' strides by value (0 or 1: Triton specialises on 1), the row length
    dtypes = _aligned_dtypes((x, v, v_ref, sample, grad_log_prob, grad_kl, grad_mean, grad_x0, grad_x1) + (
        () if rows.scalars else rows.pointers))
    caller_key = None if dtypes is None else (plan, dtypes, strides, elements)
    _BWD_LAUNCHER.launch_keyed((batch * cfg.num_chunks,), caller_key, runtime + plan.constexprs,
                               num_warps=cfg.num_warps, enable_fp_fusion=plan.fp_fusion)
    return dv, dv_ref, dx


# ----------------------------------------------------------------- ahead-of-time variants
_FWD_POINTERS = ("x_ptr", "v_ptr", "vref_ptr", "sample_in_ptr", "sample_out_ptr")
_BWD_STORAGE = ("x_ptr", "v_ptr", "vref_ptr", "sample_ptr", "dv_ptr", "dvref_ptr", "dx_ptr")


def aot_variants():
    """(name, kernel, {arg: type}, constexprs, num_warps) of the specialisations worth compiling
    ahead of time for a PTX check: every SDE type, noise mode and storage dtype, with the heaviest
    flag set (all outputs, KL) so register pressure is at its worst."""
    scalars = {"seed": "i64", "seed_offset": "i64", "D": "i32", "NUM_CHUNKS": "i32",
               "g_logp_stride": "i32", "g_kl_stride": "i32",
               "t_val": "fp32", "tn_val": "fp32", "a_val": "fp32", "smax_val": "fp32"}

    def types(fn, storage, storage_args):
        def pointer(name):
            return "*i32" if name == "ticket_ptr" else f"*{storage if name in storage_args else 'fp32'}"

        return {name: (scalars[name] if name in scalars else pointer(name))
                for name in fn.arg_names if name in scalars or name.endswith("_ptr")}

    fwd_flags = dict(ROW_SCALARS=False, HAS_VREF=True, WRITE_MEAN=True, WRITE_X0=True, WRITE_X1=True, LOGPROB_FLOW_GRPO=False,
                     SUM_REDUCTION=False, KL_FLOW_GRPO=False, ITERS=4, EVICT="")
    bwd_flags = dict(ROW_SCALARS=False, HAS_G_LOGP=True, HAS_G_KL=True, HAS_G_MEAN=True, HAS_G_X0=True, HAS_G_X1=True,
                     WRITE_DVREF=True, WRITE_DX=True, LOGPROB_FLOW_GRPO=False, SUM_REDUCTION=False,
                     KL_FLOW_GRPO=False, ITERS=4, EVICT="")
    for storage in ("fp32", "bf16", "fp16"):
        cfg = launch_config(64, 1 << 20, 4 if storage == "fp32" else 2)
        fwd_flags["BLOCK"] = bwd_flags["BLOCK"] = cfg.block
        for sde_type, sde_id in SDE_TYPE_IDS.items():
            for mode in (MODE_SCORE, MODE_NOISE, MODE_PHILOX):
                if storage != "bf16" and (sde_type != "sde"):
                    continue  # dtypes x modes on one type, types x modes on bf16
                for finalize in (False, True):
                    if finalize and mode != MODE_NOISE:
                        continue
                    yield (f"fwd/{storage}/{sde_type}/mode{mode}/finalize{int(finalize)}", sde_step_fwd_kernel,
                           types(sde_step_fwd_kernel, storage, _FWD_POINTERS),
                           dict(fwd_flags, SDE_TYPE=sde_id, MODE=mode, FINALIZE=finalize,
                                BLOCK_C=1 if finalize else 1024,
                                FAST_MATH=mode == MODE_PHILOX and philox_fast_math()), cfg.num_warps)
        if storage == "bf16":  # one schedule value for every row, passed by value
            yield ("fwd/bf16/sde/rowscalars/mode1/finalize0", sde_step_fwd_kernel,
                   types(sde_step_fwd_kernel, storage, _FWD_POINTERS),
                   dict(fwd_flags, ROW_SCALARS=True, SDE_TYPE=0, MODE=MODE_NOISE, FINALIZE=False, BLOCK_C=1024,
                        FAST_MATH=False),
                   cfg.num_warps)
        # the scoring pass with the L2 hints (L2_HINTS): evict_last in the forward, evict_first in the backward
        yield (f"fwd/{storage}/sde/mode0/l2hints/finalize0", sde_step_fwd_kernel, types(sde_step_fwd_kernel, storage, _FWD_POINTERS),
               dict(fwd_flags, SDE_TYPE=0, MODE=MODE_SCORE, FINALIZE=False, BLOCK_C=1024, FAST_MATH=False,
                    EVICT="evict_last"), cfg.num_warps)
        yield (f"bwd/{storage}/sde/l2hints", sde_step_bwd_kernel, types(sde_step_bwd_kernel, storage, _BWD_STORAGE),
               dict(bwd_flags, SDE_TYPE=0, EVICT="evict_first"), cfg.num_warps)
        for sde_type, sde_id in SDE_TYPE_IDS.items():
            if storage != "bf16" and sde_type != "sde":
                continue
            yield (f"bwd/{storage}/{sde_type}", sde_step_bwd_kernel, types(sde_step_bwd_kernel, storage, _BWD_STORAGE),
                   dict(bwd_flags, SDE_TYPE=sde_id), cfg.num_warps)

