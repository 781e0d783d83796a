"""benchmarks/check_goals.py: the open issues' GPU goals read from benchmark outputs (a script of
the repository, not of the package: loaded from its path)."""

import json
import sys

import pytest

import benchmark_scripts


@pytest.fixture(scope="module")
def goals():
    yield benchmark_scripts.load("check_goals", register=True)
    sys.modules.pop("check_goals", None)


def sde_rows(bandwidth=90.0, eager=5.0, compiled=2.0, syncs=0):
    rows = []
    for case in ("sample", "score"):
        common = dict(shape="sd35m_b8_64", dtype="bf16", case=case)
        rows += [dict(common, impl="fused", pct_copy_bw_gpu_only=bandwidth + (case == "score"), host_syncs=syncs,
                      fused_speedup_pipelined=1.0),
                 dict(common, impl="eager", fused_speedup_pipelined=eager + (case == "score"), host_syncs=0),
                 dict(common, impl="compiled", fused_speedup_pipelined=compiled, host_syncs=0)]
    return rows


def bench_rows(ours=(10.0, 11.0), reference=(12.5, 13.5), syncs=0):
    rows = []
    for case, mine, ref in zip(("sd35m iteration flow_grpo", "sd35m iteration stepwise T'=1"), ours, reference):
        for implementation, seconds in (("sfgrpo", mine), ("reference", ref), ("flow_grpo-code", 2 * ref)):
            rows.append(dict(case=case, implementation=implementation, metric="seconds_per_iteration", value=seconds,
                             status="ok"))
        rows.append(dict(case=case, implementation="sfgrpo", metric="host_syncs_in_update", value=syncs, status="ok"))
    return {"rows": rows}


def write(tmp_path, sde=None, advantages_us=(40.0, 20.0), bench=None):
    (tmp_path / "sde.json").write_text(json.dumps({"meta": {}, "rows": sde or sde_rows()}))
    (tmp_path / "adv.md").write_text("| case | call, median µs | GPU only (graph replay), median µs |\n|---|---|---|\n"
                                     f"| gain_advantages joint, drop (sync-free) | {advantages_us[0]} | {advantages_us[1]} |\n")
    (tmp_path / "bench.json").write_text(json.dumps(bench or bench_rows()))
    return ["--sde-step", str(tmp_path / "sde.json"), "--advantages", str(tmp_path / "adv.md"),
            "--bench", str(tmp_path / "bench.json")]


def test_all_goals_met(goals, tmp_path, capsys):
    assert goals.main(write(tmp_path) + ["--out", str(tmp_path / "goals.md")]) == 0
    table = (tmp_path / "goals.md").read_text()
    assert "NOT met" not in table and "not measured" not in table and table.count("| met |") == 9


@pytest.mark.parametrize("broken, goal", [
    (dict(sde=sde_rows(bandwidth=80.0)), "copy bandwidth"),
    (dict(sde=sde_rows(eager=3.5)), "speed-up over eager"),
    (dict(sde=sde_rows(compiled=1.4)), "speed-up over compiled"),
    (dict(sde=sde_rows(syncs=1)), "host syncs per fused call"),
    (dict(advantages_us=(51.0, 20.0)), "1M gains"),
    (dict(bench=bench_rows(reference=(11.0, 13.5))), "flow_grpo: reference-op loop"),
    (dict(bench=bench_rows(ours=(10.0, 13.5), reference=(12.5, 17.0))), "stepwise T'=1 / Flow-GRPO"),
    (dict(bench=bench_rows(syncs=2)), "host syncs inside the update"),
])
def test_each_missed_goal_fails(goals, tmp_path, capsys, broken, goal):
    assert goals.main(write(tmp_path, **broken)) == 1
    failing = [line for line in capsys.readouterr().out.splitlines() if "NOT met" in line]
    assert len(failing) == 1 and goal in failing[0]


def test_missing_measurements_are_reported_not_failed(goals, tmp_path, capsys):
    args = write(tmp_path)[:2]  # only the SDE-step results
    assert goals.main(args) == 0
    assert capsys.readouterr().out.count("not measured") == 4
    assert goals.main(args + ["--require-all"]) == 1


def test_bandwidth_goal_uses_the_same_size_copy_when_measured(goals, tmp_path, capsys):
    """A step of a few MB is judged against a copy of its own bytes (launch and ramp-up included
    in both), and the 1 GiB-copy figure stays in the note; without the column, the old one."""
    rows = sde_rows(bandwidth=20.0)
    for row in rows:
        if row["impl"] == "fused":
            row["pct_same_size_copy_gpu_only"] = 88.0 if row["case"] == "sample" else 84.0
    assert goals.main(write(tmp_path, sde=rows)) == 1
    failing = [line for line in capsys.readouterr().out.splitlines() if "NOT met" in line]
    assert len(failing) == 1 and "copy bandwidth" in failing[0] and "| 84 |" in failing[0]
    assert "same bytes" in failing[0] and "1 GiB copy: worst 20.0" in failing[0]
    for row in rows:
        row.pop("pct_same_size_copy_gpu_only", None)
    assert goals.main(write(tmp_path, sde=rows)) == 1  # 20 % of the 1 GiB copy


def test_rows_skipped_by_the_time_budget_are_not_measured(goals, tmp_path, capsys):
    """`sfgrpo bench --time-budget` records runs it did not start as status rows ("skipped (time
    budget)", metric "status", no value): their goals are "not measured", the others still decided."""
    bench = bench_rows()
    stepwise = "sd35m iteration stepwise T'=1"
    bench["rows"] = [r for r in bench["rows"] if not (r["case"] == stepwise and r["implementation"] == "reference")]
    bench["rows"].append(dict(case=stepwise, implementation="reference", metric="status", value=None,
                              status="skipped (time budget)"))
    assert goals.main(write(tmp_path, bench=bench)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "not measured" in line] == [
        line for line in lines if f"{stepwise}: reference-op loop" in line]


def test_speed_up_goals_also_report_kernel_time(goals, tmp_path, capsys):
    """The goals are judged back to back; the note gives the same ratio on kernel time (graph
    replay), so a host-bound miss reads as such."""
    rows = sde_rows(compiled=1.2)
    for row in rows:
        row["ms_gpu_only"] = {"fused": 0.02, "eager": 0.2, "compiled": 0.05}[row["impl"]] * (1 + (row["case"] == "score"))
    assert goals.main(write(tmp_path, sde=rows)) == 1
    failing = [line for line in capsys.readouterr().out.splitlines() if "NOT met" in line]
    assert len(failing) == 1 and "speed-up over compiled" in failing[0]
    assert "kernel time: worst 2.50x" in failing[0]


def test_reference_loop_goal_notes_the_time_outside_the_backbone(goals, tmp_path, capsys):
    """The two loops differ only outside the backbone: the note puts that share's seconds side by
    side (Amdahl: a large gain there can be a small one on the whole iteration)."""
    bench = bench_rows(ours=(10.0, 11.0), reference=(10.5, 11.5))
    for row in list(bench["rows"]):
        if row["metric"] == "seconds_per_iteration" and row["implementation"] in ("sfgrpo", "reference"):
            share = 0.01 if row["implementation"] == "sfgrpo" else 0.05
            bench["rows"].append(dict(row, metric="outside_backbone_share", value=share))
    assert goals.main(write(tmp_path, bench=bench)) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if "flow_grpo: reference-op loop" in line]
    assert len(lines) == 1 and "NOT met" in lines[0]
    assert "outside the backbone: 0.525 s vs 0.1 s (5.25x)" in lines[0]


def test_advantage_goal_notes_gpu_and_host_time(goals, tmp_path, capsys):
    """bench_advantages --gpu-only writes call | GPU only | host per call: the goal reads the call,
    the note carries the other two."""
    args = write(tmp_path)
    (tmp_path / "adv.md").write_text("| case | call, median µs | GPU only (graph replay), median µs | host, µs per call |\n"
                                     "|---|---|---|---|\n| gain_advantages joint, drop (sync-free) | 55.0 | 24.5 | 31.2 |\n")
    assert goals.main(args) == 1
    failing = [line for line in capsys.readouterr().out.splitlines() if "NOT met" in line]
    assert len(failing) == 1 and "| 55 |" in failing[0]
    assert "GPU only (graph replay) 24.5 us" in failing[0] and "host 31.2 us per call" in failing[0]
