"""Every Triton kernel compiles ahead of time for sm_90 on this GPU-less machine; the cubin has no
register spills (no stack or local memory) and the streamed tensors are read and written with
128-bit vector accesses."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@pytest.fixture(scope="module")
def variants():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "sfgrpo.kernels._aot"], capture_output=True, text=True, env=env,
                            cwd="/", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows, "no kernel variants were compiled"
    return {row["variant"]: row for row in rows}


def test_every_sde_type_mode_and_dtype_compiles_for_sm90(variants):
    for storage in ("fp32", "bf16", "fp16"):
        for mode in (0, 1, 2):
            assert f"sde_step/fwd/{storage}/sde/mode{mode}/finalize0" in variants
        assert f"sde_step/bwd/{storage}/sde" in variants
    for sde_type in ("sde", "cps", "ddim", "ode"):
        assert f"sde_step/bwd/bf16/{sde_type}" in variants and f"sde_step/fwd/bf16/{sde_type}/mode0/finalize0" in variants
    assert all(row["target"].startswith("sm_90") for row in variants.values())


def test_every_layer_norm_modulate_variant_compiles_for_sm90(variants):
    for storage in ("fp32", "bf16"):
        for channels in (1536, 3072, 6144):
            for kind in ("fwd", "bwd/dx", "bwd/dx_partials"):
                assert f"layer_norm_modulate/{kind}/{storage}/C{channels}" in variants


def test_no_register_spills(variants):
    for name, row in variants.items():
        assert row["registers"] is not None, f"{name}: could not read the cubin's resource usage"
        assert row["stack_bytes"] == 0 and row["local_bytes"] == 0, f"{name} spills: {row}"
        assert row["registers"] <= 128, f"{name} uses {row['registers']} registers"


def test_streamed_tensors_use_128bit_accesses(variants):
    for name, row in variants.items():
        if name.startswith("sde_step/fwd/"):
            mode = int(name.split("/mode")[1][0])
            # x, v, v_ref and (stored sample or noise) stream in; Philox draws noise in-kernel
            assert row["loads_128bit"] >= (3 if mode == 2 else 4), f"{name}: {row}"
            assert row["stores_128bit"] >= 3, f"{name}: {row}"
        elif name.startswith("sde_step/bwd/"):
            # x, v, v_ref, sample, and three upstream gradients; dv, dv_ref, dx written
            assert row["loads_128bit"] >= 7 and row["stores_128bit"] >= 3, f"{name}: {row}"


def test_layer_norm_modulate_streams_with_128bit_accesses_only(variants):
    # x (and dy) in, y (or dx, and the fp32 dscale / dshift partials) out; the per-sample scale and
    # shift too: not one narrower global access (C and the row strides are multiples of 16)
    rows = {name: row for name, row in variants.items() if name.startswith("layer_norm_modulate/")}
    assert len(rows) == 18
    for name, row in rows.items():
        assert row["loads_narrow"] == 0 and row["stores_narrow"] == 0, f"{name}: {row}"
        # fwd: x, scale, shift; bwd: x, dy, scale (bf16 at 8 elements a thread: one v4 each)
        assert row["loads_128bit"] >= 3 and row["stores_128bit"] >= (3 if "partials" in name else 1), f"{name}: {row}"


def test_split_rows_hand_their_partials_over_with_acquire_release(variants):
    # rows split over several programs: the last program (ticket from an acq_rel atomic) adds the
    # partials, read with .cg loads that bypass the SM's L1; single-chunk rows need neither
    for name, row in variants.items():
        if name.startswith("sde_step/fwd/") and name.endswith("finalize0"):
            assert row["atomics_acq_rel"] >= 1 and row["loads_cg"] >= 1, f"{name}: {row}"
        elif name.startswith("sde_step/fwd/"):
            assert row["atomics_acq_rel"] == 0, f"{name}: {row}"


def test_philox_sampling_uses_the_hardware_approximations(variants):
    # in-kernel Philox noise: Box-Muller on lg2/sin/cos.approx (one MUFU each), never libdevice's
    # precise logf/sinf/cosf, which made the sampling loop issue-bound (kernels/sde_step.py,
    # PHILOX_FAST_MATH); the other modes compute no transcendental per element
    philox = [name for name in variants if name.startswith("sde_step/fwd/") and "/mode2/" in name]
    assert philox
    for name in philox:
        row = variants[name]
        assert row["lg2_approx"] >= 2 and row["sin_approx"] >= 2 and row["cos_approx"] >= 2, f"{name}: {row}"
        if "/cps/" not in name:  # cps's per-row std is t' sin(a pi / 2), precise on purpose (once per program)
            assert not row["precise_trig"], f"{name} still has libdevice's sinf/cosf: {row}"
    for name, row in variants.items():
        if name.startswith("sde_step/") and name not in philox:
            assert row["lg2_approx"] == row["sin_approx"] == row["cos_approx"] == 0, f"{name}: {row}"


def test_l2_hints_only_where_asked_and_loads_stay_128bit(variants):
    # kernels.sde_step.L2_HINTS: the scoring forward keeps x, v, x', v_ref in L2 for the backward
    # (evict_last), the backward lets them go (evict_first); every other variant has no hint
    hinted = {name: row for name, row in variants.items() if "l2hints" in name}
    assert {name.split("/")[1] for name in hinted} == {"fwd", "bwd"} and len(hinted) == 6
    for name, row in hinted.items():
        kind = "l2_evict_last" if "/fwd/" in name else "l2_evict_first"
        assert row[kind] >= 1 and row["loads_l2_hinted"] >= 4, f"{name}: {row}"
        twin = variants[name.replace("/l2hints", "")]  # the same kernel without the hints
        assert all(row[k] == twin[k] for k in ("loads_128bit", "loads_narrow", "stores_128bit")), f"{name}: {row}"
    for name, row in variants.items():
        if name.startswith("sde_step/") and name not in hinted:
            assert row["l2_evict_last"] == row["l2_evict_first"] == row["loads_l2_hinted"] == 0, f"{name}: {row}"


def test_rms_norm_variants_compile_for_sm90(variants):
    for storage in ("fp32", "bf16"):
        for D in (64, 128, 3072):
            assert f"rms_norm/fwd/{storage}/D{D}" in variants
            assert f"rms_norm/bwd/{storage}/D{D}/dw0" in variants and f"rms_norm/bwd/{storage}/D{D}/dw1" in variants
        for D in (64, 128):  # the incoming gradient read in place through a row map (joint-attention slices)
            assert f"rms_norm/bwd/{storage}/D{D}/dw1/strided_dy" in variants


def test_rms_norm_streams_rows_with_128bit_accesses(variants):
    # a tile of whole rows: even D = 64 loads x, dy (and the weight) and stores y, dx 128 bits at a
    # time; the only narrow access is the backward's one [D] row of dweight partials per program
    rms = {name: row for name, row in variants.items() if name.startswith("rms_norm/")}
    assert rms
    for name, row in rms.items():
        assert row["loads_narrow"] == 0, f"{name}: {row}"
        if "/fwd/" in name:
            assert row["loads_128bit"] >= 2 and row["stores_128bit"] >= 1 and row["stores_narrow"] == 0, f"{name}: {row}"
        else:
            assert row["loads_128bit"] >= 3 and row["stores_128bit"] >= 1, f"{name}: {row}"
            assert row["stores_narrow"] <= (1 if "/dw1" in name else 0), f"{name}: {row}"


def test_rms_norm_divides_and_takes_roots_ieee_rounded(variants):
    # torch's CPU rsqrt is 1 / sqrt with both correctly rounded, and the mean is sum / D: the kernels
    # use div.rn / sqrt.rn, never Triton's default div.full (2 ulp) or sqrt.approx
    for name, row in variants.items():
        if name.startswith("rms_norm/"):
            assert row["div_rn"] >= 2 and row["sqrt_rn"] >= 1, f"{name}: {row}"
            assert row["div_inexact"] == 0 and row["sqrt_approx"] == 0, f"{name}: {row}"


def test_qk_norm_rope_variants_compile_for_sm90(variants):
    for storage in ("fp32", "bf16"):
        for D in (64, 128):
            for norm in (0, 1):
                assert f"qk_norm_rope/fwd/{storage}/D{D}/norm{norm}" in variants
                assert f"qk_norm_rope/bwd/{storage}/D{D}/norm{norm}/dw0" in variants
            assert f"qk_norm_rope/bwd/{storage}/D{D}/norm1/dw1" in variants


def test_qk_norm_rope_streams_rows_and_tables_with_128bit_accesses(variants):
    # x (or the incoming gradient), cos and sin stream in 128 bits at a time (the even / odd split of
    # the pairs stays in registers) and the rotated rows / dx go out the same way; the only narrow
    # accesses are the widest tile's weight load and the backward's one row of dweight partials
    rows = {name: row for name, row in variants.items() if name.startswith("qk_norm_rope/")}
    assert rows
    for name, row in rows.items():
        assert row["loads_128bit"] >= (4 if "/bwd/" in name and "/norm1/" in name else 3), f"{name}: {row}"
        assert row["stores_128bit"] >= 1, f"{name}: {row}"
        assert row["loads_narrow"] <= (1 if "/D1024/" in name else 0), f"{name}: {row}"
        assert row["stores_narrow"] <= (1 if name.endswith("dw1") else 0), f"{name}: {row}"
        if "/norm1" in name:  # torch's rms_norm: IEEE-rounded mean and root, as the RMSNorm kernels
            assert row["div_rn"] >= 2 and row["sqrt_rn"] >= 1 and row["div_inexact"] == 0, f"{name}: {row}"


GATED_RESIDUAL_KINDS = {  # variant kind -> (128-bit loads, 128-bit stores) at least, bf16 (fp32 has twice)
    "fwd/residual": (3, 1),  # h, y, gate -> h_out
    "fwd/norm": (5, 2),  # h, y, gate, scale, shift -> h_out, normed
    "bwd/residual": (2, 1),  # g, gate -> dy
    "bwd/residual_partials": (3, 3),  # + y -> + the fp32 dgate partials (two v4 of fp32)
    "bwd/norm": (5, 2),  # g_normed, h_out, g_hout, gate, scale -> dh, dy
    # + y -> + dgate, dscale, dshift partials; at C = 6144 the fused pass leaves dgate to the
    # residual_partials kernel (kernels/gated_residual.py, RELOAD_ABOVE): one partial fewer
    "bwd/norm_partials": (5, 6),
}


def test_every_gated_residual_variant_compiles_for_sm90(variants):
    for storage in ("fp32", "bf16"):
        for channels in (1536, 3072, 6144):
            for kind in GATED_RESIDUAL_KINDS:
                assert f"gated_residual/{kind}/{storage}/C{channels}" in variants


def test_gated_residual_streams_with_128bit_accesses_only(variants):
    # every activation, gradient, per-sample row and fp32 partial: not one narrower global access
    rows = {name: row for name, row in variants.items() if name.startswith("gated_residual/")}
    assert len(rows) == 2 * 3 * len(GATED_RESIDUAL_KINDS)
    for name, row in rows.items():
        kind = name.split("/")[1] + "/" + name.split("/")[2]
        loads, stores = GATED_RESIDUAL_KINDS[kind]
        assert row["loads_narrow"] == 0 and row["stores_narrow"] == 0, f"{name}: {row}"
        assert row["loads_128bit"] >= loads and row["stores_128bit"] >= stores, f"{name}: {row}"


def test_every_kernel_compiles_with_its_integer_arguments_equal_to_one():
    """Triton specialises an integer argument equal to 1 into a constexpr (D = 1, one token, one
    chunk, ...): a kernel that calls a tensor method on it compiles for every other value and fails
    at the first launch with a 1."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "sfgrpo.kernels._aot", "--unit-integers"], capture_output=True,
                            text=True, env=env, cwd="/", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) >= 8  # SDE step, RMSNorm, adaLN, gated residual: forward and backward each
    failed = {row["kernel"]: row["error"] for row in rows if not row["compiled"]}
    assert not failed, failed


def test_every_variant_compiles_for_the_other_architectures_of_the_wheel():
    """A100 (sm_80) and L4 / L40 / RTX 40xx (sm_89): Triton compiles there on the user's machine,
    so a variant that only compiles for sm_90 would fail at its first launch. Spills: none to local
    memory beyond a 16-byte stack (sm_80's fp16 scoring forward, at 80 registers, parks three values
    there: 3 stores and 4 loads per program, next to its 4 unrolled blocks of 2,048 elements)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "sfgrpo.kernels._aot", "--other-archs"], capture_output=True,
                            text=True, env=env, cwd="/", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {row["arch"] for row in rows} == {80, 89} and len(rows) >= 2 * 100
    failed = {(row["variant"], row["arch"]): row["error"] for row in rows if not row["compiled"]}
    assert not failed, failed
    spilled = {(row["variant"], row["arch"]): (row["stack_bytes"], row["local_bytes"]) for row in rows
               if row["local_bytes"] or row["stack_bytes"] > 16}
    assert not spilled, spilled
