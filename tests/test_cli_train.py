"""`sfgrpo train` / `sfgrpo demo` as installed (console script)."""

import json
import os
import shutil
import subprocess
import sys

# the console script next to this interpreter (the venv's bin need not be on PATH)
SFGRPO = shutil.which("sfgrpo", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


def run(*args, cwd=None):
    assert SFGRPO, "the sfgrpo console script is not installed"
    return subprocess.run([SFGRPO, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_train_help_lists_the_config_fields():
    result = run("train", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--mode", "--lookahead-steps", "--group-size", "--use-lora", "--resume-from", "--config", "--reward"):
        assert flag in result.stdout


def test_tiny_train_run_with_config_file(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"backbone": "tiny-random", "num_steps": 3, "group_size": 2, "iterations": 5}))
    result = run("train", "--config", str(config), "--iterations", "2", "--prompts-per-iteration", "2",
                 "--reward", "contrast", "--output-dir", str(tmp_path / "out"), "--no-progress", "--threads", "1")
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["iteration"] == 2
    assert json.loads((tmp_path / "out" / "config.json").read_text())["group_size"] == 2
    assert (tmp_path / "out" / "checkpoints" / "latest").exists()


def test_train_rejects_bad_flags_with_a_clear_message(tmp_path):
    result = run("train", "--backbone", "tiny-random", "--mode", "nope", "--output-dir", str(tmp_path))
    assert result.returncode != 0 and "mode must be one of" in result.stderr


def test_demo_help():
    result = run("demo", "--help")
    assert result.returncode == 0 and "--seeds" in result.stdout


def test_demo_runs_both_modes_and_writes_the_summary(tmp_path):
    result = run("demo", "--backbone", "tiny-random", "--rewards", "brightness,contrast", "--seeds", "2",
                 "--iterations", "2", "--jobs", "1", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["rewards"]) == {"brightness", "contrast"}
    assert set(summary["rewards"]["brightness"]["modes"]) == {"stepwise", "flow_grpo"}
    table = (tmp_path / "summary.md").read_text()
    assert "| `brightness`" in table and "flow_grpo" in table
    assert (tmp_path / "brightness" / "stepwise" / "seed1" / "metrics.jsonl").exists()
