"""`sfgrpo bench`: the quick CPU suite end to end, and the real-size configs' parameter counts."""

import csv
import json
import time

import pytest
import torch

from sfgrpo.bench import configs, get_suite
from sfgrpo.bench.report import COLUMNS
from sfgrpo.cli import main
from sfgrpo.trainer import TrainerConfig


def test_quick_suite_writes_results(tmp_path):
    start = time.perf_counter()
    assert main(["bench", "--quick", "--no-progress", "--output-dir", str(tmp_path)]) == 0
    assert time.perf_counter() - start < 60
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and list(rows[0]) == list(COLUMNS)
    assert all(r["status"] in ("ok", "n/a") for r in rows), [r for r in rows if r["status"] not in ("ok", "n/a")]
    assert {r["implementation"] for r in rows} == {"sfgrpo", "reference", "flow_grpo-code"}
    for row in rows:
        assert row["device"] and row["torch"] and row["sfgrpo"] and row["git"] and row["date"]
    values = {(r["case"], r["implementation"], r["metric"]): r["value"] for r in rows}
    for case, implementation in {(r["case"], r["implementation"]) for r in rows}:
        for metric in ("images_per_s", "seconds_per_iteration", "seconds_rollout", "seconds_update",
                       "peak_memory_mb"):
            assert float(values[(case, implementation, metric)]) > 0, (case, implementation, metric)
        share = float(values[(case, implementation, "outside_backbone_share")])
        assert 0 < share < 1
        # host syncs are counted on CUDA only
        assert values[(case, implementation, "host_syncs_in_update")] == ""
    assert {"flow_grpo", "stepwise"} <= {r["mode"] for r in rows}
    assert {r["case"] for r in rows if r["implementation"] == "flow_grpo-code"} == {
        "iteration flow_grpo", "iteration stepwise T'=1"}
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["suite"] == "quick" and len(report["rows"]) == len(rows)
    markdown = (tmp_path / "results.md").read_text()
    assert "| case | implementation |" in markdown and "iteration stepwise T'=1" in markdown
    pytest.importorskip("matplotlib")
    assert (tmp_path / "seconds_per_iteration.png").stat().st_size > 0


def test_failures_are_recorded_not_fatal(tmp_path):
    from sfgrpo.bench.runner import run_suite
    from sfgrpo.bench.suites import Case, Suite

    bad = Case("bad", "iteration", overrides=dict(group_size=4, mode="no-such-mode"), prompts_sweep=(1,),
               implementations=("sfgrpo",))
    rows = run_suite(Suite("t", [bad], warmup=0, iterations=1), progress=False)
    assert len(rows) == 1 and rows[0]["metric"] == "status" and rows[0]["status"].startswith("failed: ValueError")


@pytest.mark.parametrize("name, low, high", [("sd35m", 2.2e9, 2.3e9), ("flux1-dev", 11.8e9, 12.0e9)])
def test_real_size_configs_on_meta(name, low, high):
    transformer = configs.build_transformer(name, device="meta")
    count = configs.parameter_count(transformer)
    # SD3.5-Medium's transformer: 2.24B; FLUX.1-dev's: 11.90B (diffusers' published configs)
    assert low < count < high, count
    assert all(p.is_meta for p in transformer.parameters())


def test_small_backbones_follow_the_real_architectures():
    from sfgrpo.bench.backbones import build_backbone

    for name in ("sd35m-small", "flux1-dev-small"):
        backbone = build_backbone(name, resolution=64, text_tokens=8)
        real = configs.TRANSFORMERS[name.removesuffix("-small")]
        assert type(backbone.transformer).__name__ == ("SD3Transformer2DModel" if real["family"] == "sd3"
                                                       else "FluxTransformer2DModel")
        cond = backbone.encode_prompts(["a", "b"])
        x = torch.randn(2, *backbone.latent_shape)
        v = backbone.velocity(x, torch.full((2,), 0.5), cond)
        assert v.shape == x.shape and torch.isfinite(v).all()
        images = backbone.decode(x)
        assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1


def test_suites_are_well_formed():
    for name in ("quick", "cpu", "gpu", "gpu-core"):
        suite = get_suite(name)
        assert suite.cases and len({c.name for c in suite.cases}) == len(suite.cases)
        for case in suite.cases:
            assert case.kind in ("rollout", "lookahead", "update", "iteration")
            assert case.backbone == "digits" or case.backbone in configs.TRANSFORMERS
        for case in suite.cases:  # every case's trainer settings are valid (typos fail here, not on a GPU)
            for prompts in case.prompts_sweep:
                TrainerConfig(output_dir="unused", prompts_per_iteration=prompts, **case.overrides).validate()
    gpu = get_suite("gpu")
    assert gpu.device == "cuda" and {"sd35m", "flux1-dev"} <= {c.backbone for c in gpu.cases}
    assert any("sfgrpo+compile" in c.implementations for c in gpu.cases)
    core = get_suite("gpu-core")  # SD3.5-M Flow-GRPO and stepwise T'=1 iterations, sfgrpo vs reference ops
    assert core.device == "cuda" and len(core.cases) == 2 and all(c.backbone == "sd35m" for c in core.cases)


def test_real_size_config_in_bf16_on_meta():

    transformer = configs.build_transformer("sd35m", device="meta", dtype=torch.bfloat16)
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored


def test_sync_counter_is_off_on_cpu():

    from sfgrpo.bench import SyncCounter

    counter = SyncCounter(torch.device("cpu"))
    assert counter.wrap(lambda x: x + 1)(1) == 2
    assert counter.take() is None  # reported as n/a


def test_sync_count_ignores_the_debug_modes_one_time_notice():
    """torch's first use of sync debug mode warns "Synchronization debug mode is a prototype
    feature..." once per process: counted as a sync, it put 1 host sync on the first case measured
    on an H100 (2026-11-26)."""
    from sfgrpo.bench.measure import is_sync_warning

    assert is_sync_warning("called a synchronizing CUDA operation")
    assert not is_sync_warning("Synchronization debug mode is a prototype feature and does not yet detect all "
                               "synchronizing operations (Triggered internally at Module.cpp:1003.)")


def test_flow_grpo_code_runs_the_trainer_on_flow_grpos_formulation(tmp_path, monkeypatch):
    from sfgrpo import functional
    from sfgrpo.bench import flow_grpo_code as fg
    from sfgrpo.bench.flow_grpo_loop import flow_grpo_code
    from sfgrpo.trainer import Trainer

    calls = {"step": 0, "advantages": 0}
    step, advantages = fg.sde_step_with_logprob, fg.per_prompt_advantages
    monkeypatch.setattr(fg, "sde_step_with_logprob", lambda *a, **k: calls.__setitem__("step", calls["step"] + 1) or step(*a, **k))
    monkeypatch.setattr(fg, "per_prompt_advantages",
                        lambda *a, **k: calls.__setitem__("advantages", calls["advantages"] + 1) or advantages(*a, **k))
    config = TrainerConfig(output_dir=str(tmp_path), backbone="tiny-random", reward="brightness", mode="flow_grpo",
                           beta=0.05, prompts_per_iteration=2, group_size=3, num_steps=4, progress=False, plots=False,
                           guidance_scale=2.0)
    trainer = Trainer(config)
    original = functional.sde_step
    forwards = []  # the update's CFG as Flow-GRPO runs it: one batched forward with autograd
    trainer.model.transformer.register_forward_hook(
        lambda module, args, kwargs, out: forwards.append((torch.is_grad_enabled(), kwargs["hidden_states"].shape[0])),
        with_kwargs=True)
    with flow_grpo_code(trainer):
        record = trainer.train_iteration()
    assert functional.sde_step is original and "with_constant_uncond" not in vars(trainer.guided)  # restored
    assert forwards.count((True, 12)) == 3 and (False, 6) not in forwards  # 3 trained steps, 6 rows each
    assert forwards.count((False, 12)) == 4 and trainer.keep_rollout_uncond  # batched rollout; restored
    with flow_grpo_code(trainer):  # nested blocks restore what the enclosing one set
        outer = trainer.guided.with_constant_uncond
        with flow_grpo_code(trainer):
            pass
        assert trainer.guided.with_constant_uncond is outer and not trainer.keep_rollout_uncond
    assert "with_constant_uncond" not in vars(trainer.guided) and trainer.keep_rollout_uncond
    # rollout: 4 steps; update: 3 trained steps x (policy + reference for the KL)
    assert calls == {"step": 4 + 3 * 2, "advantages": 1}
    assert record["kl"] >= 0 and all(v == v for v in record.values() if isinstance(v, float))
