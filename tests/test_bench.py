"""`sfgrpo bench`: the quick CPU suite end to end, and the real-size configs' parameter counts."""

import csv
import json

import pytest
import torch

from sfgrpo import bench
from sfgrpo.bench import configs, get_suite, runner
from sfgrpo.bench.report import COLUMNS
from sfgrpo.bench.runner import plan
from sfgrpo.bench.suites import Case, Suite
from sfgrpo.cli import main
from sfgrpo.trainer import TrainerConfig


def test_quick_suite_writes_results(tmp_path, capsys):
    # no wall-clock assertion: timings belong to benchmarks (this one flaked on a loaded 2-core VM)
    assert main(["bench", "--quick", "--no-progress", "--output-dir", str(tmp_path)]) == 0
    # without the bar, a timestamped line per phase and per measured row on stdout
    out = capsys.readouterr().out
    runs = len(plan(get_suite("quick")))
    assert sum(": ok, batch " in line for line in out.splitlines()) == runs
    assert out.count(": warm-up 1/1") == out.count(": iteration 1/2") == out.count(": iteration 2/2") == runs
    assert out.count("building backbone sd35m-small") == 1 and out.startswith("[    0.0 s] sfgrpo bench quick")
    assert not list(tmp_path.glob(".*.tmp"))
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


def _status(rows):
    return [(r["case"], r["implementation"], r["status"]) for r in rows if r["metric"] == "status"]


def test_gpu_core_measures_the_goals_rows_first():
    order = [(c.name, i) for c, i, _ in plan(get_suite("gpu-core"))]
    flow, step = "sd35m iteration flow_grpo", "sd35m iteration stepwise T'=1"
    assert order == [(flow, "sfgrpo"), (step, "sfgrpo"), (flow, "reference"), (step, "reference"),
                     (flow, "flow_grpo-code"), (step, "flow_grpo-code")]
    # the other suites keep their case-by-case order (all of a case's implementations together)
    cpu = get_suite("cpu")
    assert [(c.name, i, p) for c, i, p in plan(cpu)] == [
        (c.name, i, p) for backbone in dict.fromkeys(c.backbone for c in cpu.cases) for c in cpu.cases
        if c.backbone == backbone for p in c.prompts_sweep for i in c.implementations]


def test_random_transformer_is_cheap_seeded_and_sane():
    register = torch.nn.Module.register_parameter
    default = configs.build_transformer("sd35m-small")
    first, again = configs.random_transformer("sd35m-small", seed=3), configs.random_transformer("sd35m-small", seed=3)
    assert torch.nn.Module.register_parameter is register  # the constructor patch is undone
    assert not any(p.is_meta for p in first.parameters()) and not any(b.is_meta for b in first.buffers())
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert torch.equal(first.pos_embed.pos_embed, default.pos_embed.pos_embed)  # buffers computed for real
    for (name, mine), (_, theirs) in zip(first.named_parameters(), default.named_parameters()):
        assert torch.isfinite(mine).all(), name
        if mine.ndim >= 2:  # PyTorch's default scale: uniform in +-1/sqrt(fan_in)
            assert 0.8 < float(mine.detach().std() / theirs.detach().std()) < 1.25, name
        elif name.endswith("norm.weight") or ".norm_" in name:
            assert torch.equal(mine, theirs), name
    shell = configs.assign_tensors(configs.build_transformer("sd35m-small", "meta"), configs.tensors_of(first))
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(shell.parameters(), first.parameters()))  # no copy


def _base_weights(transformer) -> dict:
    """The base (non-LoRA) tensors by their plain name (peft moves them under `base_layer`)."""
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in transformer.named_parameters()
            if "lora_" not in n}


def test_one_backbone_build_per_run_and_identical_starting_weights(tmp_path, monkeypatch):
    builds, starts = [], []
    build, build_trainer = configs.random_transformer, runner.build_trainer
    monkeypatch.setattr(configs, "random_transformer", lambda *a, **k: builds.append(a) or build(*a, **k))

    def recording(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        starts.append(_base_weights(trainer.model.transformer))
        return trainer

    monkeypatch.setattr(runner, "build_trainer", recording)
    small = dict(backbone="sd35m-small", resolution=64, text_tokens=8, prompts_sweep=(1,))
    lora = dict(group_size=2, reward="brightness", prompts="a,b", num_steps=3, use_lora=True, lora_rank=4,
                lora_alpha=8, beta=0.04)
    cases = [Case("lora stepwise", "iteration", overrides=lora, implementations=("sfgrpo", "reference"), **small),
             # a full fine-tune trains the base weights in place: the runs after it must not see that
             Case("full", "iteration", overrides=dict(lora, use_lora=False, learning_rate=1e-2),
                  implementations=("sfgrpo",), **small),
             Case("lora flow_grpo", "iteration", overrides=dict(lora, mode="flow_grpo"),
                  implementations=("sfgrpo", "flow_grpo-code"), **small)]
    rows = runner.run_suite(Suite("t", cases, warmup=0, iterations=1), progress=False)
    assert not _status(rows) and len({(r["case"], r["implementation"]) for r in rows}) == 5
    assert len(builds) == 1  # five runs, one backbone
    fresh = configs.tensors_of(build("sd35m-small", "cpu", torch.float32, 0))
    assert len(starts) == 5
    for start in starts:
        assert start.keys() == {n for n in fresh if n != "pos_embed.pos_embed"}
        assert all(torch.equal(start[n], fresh[n]) for n in start)


def _fake_result(seconds: float) -> dict:
    metrics = {"images_per_s": 1.0, "seconds_per_iteration": 1.0, "seconds_rollout": 0.5, "seconds_update": 0.5,
               "peak_memory_mb": 1.0, "host_syncs_per_iteration": None, "host_syncs_in_update": None,
               "seconds_run_total": seconds}
    return {"batch": 8, "metrics": metrics, "peak_memory_kind": "test"}


def test_time_budget_skips_and_records(tmp_path, monkeypatch, capsys):
    calls, now = [], [0.0]

    def thirty_seconds(case, implementation, *args, **kwargs):
        calls.append((case.name, implementation))
        now[0] += 30.0
        return _fake_result(30.0)

    monkeypatch.setattr(runner, "run_one", thirty_seconds)
    monkeypatch.setattr(runner.Progress, "clock", staticmethod(lambda: now[0]))
    impls = ("sfgrpo", "reference", "flow_grpo-code")
    suite = Suite("t", [Case("a", "iteration", implementations=impls), Case("b", "iteration", implementations=impls)],
                  order="implementation")
    rows = runner.run_suite(suite, progress=False, time_budget=45.0)
    # the first run has no estimate and starts; each later one is expected to take 30 s more: skipped
    assert calls == [("a", "sfgrpo")]
    assert _status(rows) == [(c, i, "skipped (time budget)") for i in impls for c in "ab"][1:]
    assert "(2/6) b [sfgrpo]: skipped (time budget: 30 s elapsed + ~30 s expected > 45 s)" in capsys.readouterr().out
    calls.clear()
    now[0] = 0.0
    rows = runner.run_suite(suite, progress=False, time_budget=1000.0)
    assert len(calls) == 6 and not _status(rows)
    # the CLI flag: nothing fits in a budget of 0 s; every row is recorded as skipped
    monkeypatch.undo()
    assert main(["bench", "--quick", "--no-progress", "--time-budget", "0", "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(report) == len(plan(get_suite("quick"))) and {r["status"] for r in report} == {"skipped (time budget)"}
    assert "skipped (time budget)" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("flags,message", [
    (("--threads", "0"), "--threads must be >= 1, got 0"),
    (("--time-budget", "-5"), "--time-budget must be a number of seconds >= 0, got -5.0"),
    (("--time-budget", "nan"), "--time-budget must be a number of seconds >= 0, got nan"),
    (("--device", "foo"), "--device 'foo' is not a torch device"),
    (("--cases", "no such case"), "--cases 'no such case' matches no case of suite 'quick': rollout cfg=on"),
])
def test_bad_flags_are_usage_errors_before_anything_runs(tmp_path, capsys, flags, message):
    """One line on stderr, exit status 2, no results folder (an empty --cases match wrote one with no
    rows; a negative --threads or a bad --device was a traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", "--no-progress", *flags, "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"sfgrpo bench: error: {message}")
    assert not (tmp_path / "out").exists()


def test_rows_are_saved_as_they_are_measured(tmp_path, monkeypatch):
    original, calls = runner.run_one, []

    def interrupted_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            kwargs["log"]("iteration 1/1")
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "run_one", interrupted_second)
    case = Case("iteration", "iteration", overrides=dict(group_size=2, num_steps=3), prompts_sweep=(1,),
                implementations=("sfgrpo", "reference", "flow_grpo-code"))
    with pytest.raises(KeyboardInterrupt):
        bench.run(Suite("t", [case], warmup=0, iterations=1), str(tmp_path), progress=False)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["implementation"] for r in rows if r["status"] == "ok"} == {"sfgrpo"}
    assert _status(rows) == [("iteration", "reference", "interrupted (KeyboardInterrupt) during iteration 1/1")]
    with open(tmp_path / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    assert "| iteration | sfgrpo |" in (tmp_path / "results.md").read_text()
    assert not list(tmp_path.glob(".*.tmp"))


def test_sigterm_keeps_the_rows_measured(tmp_path):
    """`timeout` sends SIGTERM: the lines are on stdout as they happen, the finished rows in the files,
    the run under way is recorded as interrupted (here the second run waits for the signal)."""
    import signal
    import subprocess
    import sys

    child = ("import sys, time\n"
             "from sfgrpo.bench import runner\n"
             "measure, calls = runner.run_one, []\n"
             "def second_waits(*args, **kwargs):\n"
             "    calls.append(1)\n"
             "    if len(calls) == 2:\n"
             "        kwargs['log']('waiting for the signal')\n"
             "        time.sleep(120)\n"
             "    return measure(*args, **kwargs)\n"
             "runner.run_one = second_waits\n"
             "from sfgrpo.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    command = [sys.executable, "-c", child, "bench", "--quick", "--cases", "sd35m-small", "--no-progress",
               "--output-dir", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.rstrip().endswith("waiting for the signal"):
                process.send_signal(signal.SIGTERM)
                break
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert sum(": ok, batch " in line for line in lines) == 1  # the first row's line came before
    assert "[reference]: interrupted (SystemExit) during waiting for the signal" in out
    assert "interrupted; the rows measured so far are in" in out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert any(r["status"] == "ok" and r["metric"] == "seconds_per_iteration" for r in rows)
    status = _status(rows)
    assert len(status) == 1 and status[0][:2] == ("iteration sd35m-small stepwise T'=1", "reference"), (out, status)
    assert status[0][2] == "interrupted (SystemExit) during waiting for the signal"


def test_update_syncs_are_those_of_the_counted_iteration_only(monkeypatch):
    """On CUDA the runner counts the update's host syncs in one extra iteration. A counter that
    stands in for CUDA's sync debug mode (one "sync" per counted call) must find one update call,
    not one per warm-up, measured and counted iteration added up."""
    import contextlib

    from sfgrpo.bench.measure import SyncCounter

    class OnePerCall(SyncCounter):
        def __init__(self, device):
            self.enabled, self.total = True, 0

        @contextlib.contextmanager
        def counting(self):
            self.total += 1
            yield

    monkeypatch.setattr(runner, "SyncCounter", OnePerCall)
    case = Case("iteration stepwise T'=1", "iteration", overrides=dict(group_size=4, mode="stepwise"),
                prompts_sweep=(2,), implementations=("sfgrpo",))
    metrics = runner.run_one(case, "sfgrpo", 2, Suite("t", [case], warmup=1, iterations=2))["metrics"]
    assert metrics["host_syncs_in_update"] == 1  # the counted iteration's one update call
    assert metrics["host_syncs_per_iteration"] == 2  # + the iteration around it



class _FakeEvent:
    """Stands for torch.cuda.Event on a CPU-only machine: `record()` reads a fake GPU clock (ms)."""

    gpu_ms = [0.0]

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self):
        self.at = _FakeEvent.gpu_ms[0]

    def elapsed_time(self, other):
        return other.at - self.at


def test_backbone_clock_on_cuda_uses_events_and_synchronises_only_in_take(monkeypatch):
    """On CUDA the clock's hooks record events and never wait for the device (a sync per forward
    would serialise host and GPU work that overlap without the clock); `take()` synchronises once
    and sums the GPU time between each pair of events: forwards and backwards."""
    from sfgrpo.bench import measure

    syncs = []
    gpu = _FakeEvent.gpu_ms
    gpu[0] = 0.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: syncs.append(gpu[0]))

    def advance(ms):
        def hook(*_):
            gpu[0] += ms
        return hook

    net = torch.nn.Linear(4, 4)
    clock = measure.BackboneClock(net, device_events=True)
    # the network's own GPU time, between the clock's marks: 3 ms per forward (a pre-hook that runs
    # after the clock's), 5 ms per backward (the weight's gradient, before it is accumulated)
    net.register_forward_pre_hook(advance(3.0))
    net.weight.register_hook(advance(5.0))
    for _ in range(2):
        gpu[0] += 1.0  # outside the network, before and after
        out = net(torch.randn(2, 4))
        gpu[0] += 1.0
        out.sum().backward()
        gpu[0] += 1.0
    assert syncs == []  # nothing waited for the device during the iterations
    assert clock.take() == pytest.approx(2 * (3.0 + 5.0) / 1000)
    assert len(syncs) == 1
    assert clock.take() == 0.0 and len(syncs) == 1  # nothing left to time: no second sync


def test_backbone_clock_on_cpu_reads_the_wall_clock(monkeypatch):
    from sfgrpo.bench import measure

    now = [0.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: now[0])
    net = torch.nn.Linear(4, 4)
    clock = measure.BackboneClock(net)
    net.register_forward_pre_hook(lambda *_: now.__setitem__(0, now[0] + 2.0))
    now[0] += 7.0
    net(torch.randn(2, 4)).sum().backward()
    assert clock.take() == pytest.approx(2.0)
