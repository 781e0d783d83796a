"""benchmarks/bench_norms_gpu.py runs end to end (a script of the repository, loaded from its path):
on the CPU with small shapes and its GPU timers replaced by stand-ins, so a GPU session does not
discover a broken script. The timings themselves need a GPU."""

import sys

import pytest

import benchmark_scripts


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(benchmark_scripts.BENCHMARKS))  # its `from bench_sde_step_gpu import ...`
    module = benchmark_scripts.load("bench_norms_gpu")
    calls = []

    def fake_time(fn, *args, **kwargs):  # runs what would be timed, as the real timers do
        fn()
        calls.append(fn)
        return 0.5

    monkeypatch.setattr(module, "time_ms", fake_time)
    monkeypatch.setattr(module, "time_graph_ms", fake_time)
    monkeypatch.setattr(module, "MODULATE_SHAPES", {"tiny": (2, 5, 16)})
    monkeypatch.setattr(module, "QUICK_MODULATE", ("tiny",))
    monkeypatch.setattr(module, "RMS_SHAPES", {"tiny_q": (2, 5, 3, 8)})
    monkeypatch.setattr(module, "QUICK_RMS", ("tiny_q",))
    monkeypatch.setattr(module, "ROPE_SHAPES", {"tiny_rope": (2, 5, 3, 8)})
    monkeypatch.setattr(module, "QUICK_ROPE", ("tiny_rope",))
    yield module, calls
    sys.modules.pop("bench_sde_step_gpu", None)


@pytest.mark.parametrize("quick", [True, False])
def test_op_rows_for_every_op_mode_and_implementation(script, quick):
    module, calls = script
    rows = []
    module.bench_ops(quick, 1000.0, rows, dev="cpu")
    impls = {"sfgrpo", "eager"} | (set() if quick else {"compiled"})
    cases = {row["case"] for row in rows}
    assert cases == {"tiny", "residual+norm2 tiny", "residual tiny", "tiny_q", "norm+rope tiny_rope"}
    for case in cases:
        for mode in ("fwd", "fwd+bwd"):
            assert {r["impl"] for r in rows if r["case"] == case and r["mode"] == mode} == impls, (case, mode)
    assert all(row["gbs"] > 0 and row["pct_copy_bw"] > 0 for row in rows)
    assert len(calls) == 2 * len(rows)  # a graph-replay and a back-to-back timing per row


def test_model_rows_compare_fused_with_diffusers_modules(script, monkeypatch):
    pytest.importorskip("peft")
    from sfgrpo.models import fused_lora, fused_norms

    module, _ = script
    swaps = []  # the A/B/A order: diffusers' modules, fused, diffusers' again, per mode
    monkeypatch.setattr(fused_norms, "fuse_norms", lambda m, f=fused_norms.fuse_norms: swaps.append("fused") or f(m))
    monkeypatch.setattr(fused_norms, "unfuse_norms",
                        lambda m, f=fused_norms.unfuse_norms: swaps.append("diffusers") or f(m))
    lora_counts = []  # LoRA layers swapped by fuse_lora: none before the adapters exist, then all 8 per block
    monkeypatch.setattr(fused_lora, "fuse_lora", lambda m, f=fused_lora.fuse_lora: lora_counts.append(f(m)))
    rows = []
    module.bench_model(1, rows, name="sd35m-small", device="cpu", grid=8, text_tokens=5, lora_rank=4)
    assert [row["mode"] for row in rows] == ["forward", "forward+backward", "lora forward", "lora forward+backward"]
    assert all(row["speedup"] == 1.0 and row["case"] == "sd35m-small_b1_64px" for row in rows)
    assert swaps == ["diffusers", "fused", "diffusers"] * 4
    assert lora_counts[:2] == [0, 0] and len(set(lora_counts[2:])) == 1 and lora_counts[2] > 0


def test_model_rows_for_a_flux_transformer(script):
    """The FLUX.1 inputs (packed latents, position ids, guidance) drive the whole-model A/B/A."""
    pytest.importorskip("peft")
    module, _ = script
    rows = []
    module.bench_model(1, rows, name="flux1-dev-small", device="cpu", grid=8, text_tokens=5, lora_rank=4)
    assert [row["mode"] for row in rows] == ["forward", "forward+backward", "lora forward", "lora forward+backward"]
    assert all(row["case"] == "flux1-dev-small_b1_64px" for row in rows)


def test_profile_rows_name_the_kernels_each_variant_ran(script):
    """--profile: per-kernel times of the forward + backward, diffusers' modules vs fused, as rows."""
    module, _ = script
    rows = []
    module.bench_model(1, rows, name="sd35m-small", device="cpu", grid=8, text_tokens=5, lora_rank=0, profile=True)
    (kernels,) = [row for row in rows if row["impl"] == "kernels"]
    assert kernels["mode"] == "forward+backward" and 0 < len(kernels["kernels"]) <= 15
    first = kernels["kernels"][0]
    assert {"kernel", "diffusers_ms", "fused_ms", "diffusers_calls", "fused_calls"} <= set(first)
    # sorted by how much the variants differ, and some kernel differs (the fused modules run other ops)
    gaps = [abs(k["fused_ms"] - k["diffusers_ms"]) for k in kernels["kernels"]]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 0


def test_row_chunking_sweep_times_every_setting_and_restores_the_defaults(script):
    from sfgrpo.kernels import layer_norm_modulate as kernels

    module, calls = script
    shipped = (kernels.MIN_ROWS, kernels.TARGET_PROGRAMS)
    shipped_plain = (kernels.PLAIN_MIN_ROWS, kernels.PLAIN_TARGET_PROGRAMS)
    rows = []
    module.sweep_row_chunking(1000.0, rows, quick=True, dev="cpu")
    settings = {(row["min_rows"], row["target_programs"]) for row in rows}
    assert settings == set(module.ROW_CHUNKINGS) and module.ROW_CHUNKINGS[0] == shipped
    assert shipped_plain in module.ROW_CHUNKINGS
    per_setting = {(row["case"], row["mode"]) for row in rows if (row["min_rows"], row["target_programs"]) == shipped}
    assert {mode for _, mode in per_setting} == {"fwd", "fwd+bwd x", "fwd+bwd all"}
    assert len(per_setting) == 6 and len(rows) == 6 * len(module.ROW_CHUNKINGS) == len(calls)
    assert (kernels.MIN_ROWS, kernels.TARGET_PROGRAMS) == shipped
    assert (kernels.PLAIN_MIN_ROWS, kernels.PLAIN_TARGET_PROGRAMS) == shipped_plain
