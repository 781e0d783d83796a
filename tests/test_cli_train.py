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


def test_evaluate_a_trained_run(tmp_path):
    out = tmp_path / "out"
    result = run("train", "--backbone", "tiny-random", "--num-steps", "3", "--group-size", "2", "--iterations", "2",
                 "--prompts-per-iteration", "2", "--reward", "contrast", "--output-dir", str(out), "--no-progress",
                 "--threads", "1", "--eval-every", "2", "--eval-num-steps", "4", "--eval-prompts", "1,2")
    assert result.returncode == 0, result.stderr
    during = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in during] == [0, 2]
    # the same protocol afterwards, on the final checkpoint, gives the same score
    result = run("evaluate", "--config", str(out / "config.json"), "--resume-from", "latest", "--no-progress")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["iteration"] == 2 and record["eval_reward_mean"] == during[-1]["eval_reward_mean"]


def test_checkpoint_and_export_mismatches_are_one_line_errors(tmp_path):
    """Resuming a LoRA run without LoRA (or another rank), exporting a LoRA without a diffusers
    pipeline or EMA weights a run does not keep: one line with argparse's status, no traceback (they
    were ValueError tracebacks from deep in the loading or the export)."""
    out = tmp_path / "out"
    common = ("--backbone", "tiny-random", "--num-steps", "3", "--group-size", "2", "--prompts-per-iteration", "2",
              "--output-dir", str(out), "--no-progress", "--threads", "1")
    result = run("train", *common, "--iterations", "1", "--use-lora", "--lora-rank", "4", "--checkpoint-every", "1")
    assert result.returncode == 0, result.stderr
    cases = [
        (("evaluate", *common, "--resume-from", "latest"),
         "sfgrpo evaluate: error: bad trainer config: checkpoint ", "was trained with use_lora = True, this run has False"),
        (("evaluate", *common, "--resume-from", "latest", "--use-lora", "--lora-rank", "8"),
         "sfgrpo evaluate: error: bad trainer config: checkpoint ", "was trained with lora_rank = 4, this run has 8"),
        (("export", *common, "--resume-from", "latest", "--use-lora", "--lora-rank", "4", "--export-dir", str(tmp_path / "x")),
         "sfgrpo export: error: cannot export a LoRA in diffusers' pipeline LoRA format", ""),
        (("export", *common, "--resume-from", "latest", "--use-lora", "--lora-rank", "4", "--weights", "ema",
          "--export-dir", str(tmp_path / "x")), "sfgrpo export: error: cannot export the EMA weights", ""),
    ]
    for args, start, part in cases:
        result = run(*args)
        assert result.returncode == 2 and result.stderr.startswith(start) and part in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    # with the run's own settings it evaluates
    result = run("evaluate", "--config", str(out / "config.json"), "--resume-from", "latest", "--no-progress")
    assert result.returncode == 0, result.stderr


def test_train_rejects_bad_flags_with_a_clear_message(tmp_path):
    """A bad value or --config file is one line on stderr with argparse's exit status, no traceback,
    for every command that takes the trainer's flags."""
    broken = tmp_path / "broken.json"
    broken.write_text('{"group_size": ')
    cases = [
        (("train", "--mode", "nope"), "sfgrpo train: error: bad trainer config: mode must be one of"),
        (("train", "--group-size", "1"), "sfgrpo train: error: bad trainer config: group_size must be >= 2"),
        (("train", "--device", "cuda:99"), "sfgrpo train: error: bad trainer config: device 'cuda:99': torch"),
        (("train", "--device", "gpu"), "sfgrpo train: error: bad trainer config: device 'gpu' is not a torch device"),
        (("train", "--reward", "nope"), "sfgrpo train: error: unknown reward(s) ['nope']"),
        (("train", "--learning-rate", "inf"), "sfgrpo train: error: bad trainer config: learning_rate must be a finite"),
        # ddim's first step (from t = 1) is deterministic, the last is not trained: nothing to train
        (("train", "--sde-type", "ddim", "--num-steps", "2"),
         "sfgrpo train: error: bad trainer config: no trainable step: every step of this 'ddim' schedule"),
        (("evaluate", "--resume-from", str(tmp_path)), f"sfgrpo evaluate: error: {tmp_path} is not a checkpoint directory"),
        (("evaluate", "--config", str(broken)), f"sfgrpo evaluate: error: bad trainer config: {broken} is not valid JSON"),
        (("export", "--config", str(tmp_path / "missing.json"), "--export-dir", str(tmp_path / "x")),
         "sfgrpo export: error: [Errno 2] No such file or directory"),
    ]
    for args, message in cases:
        result = run(*args, "--backbone", "tiny-random", "--output-dir", str(tmp_path / "out"))
        assert result.returncode == 2 and result.stderr.startswith(message), (args, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # rejected before the run wrote anything


def test_demo_rejects_bad_arguments_before_any_run(tmp_path):
    """Each bad demo argument is one line on stderr (exit status 2) before anything trains or is
    written; they used to surface as tracebacks from the runs' worker processes (or, for thresholds
    beyond 1 or zero seeds, as a summary of nothing)."""
    cases = [
        (("--seeds", "0"), "--seeds must be >= 1"),
        (("--jobs", "0"), "--jobs must be >= 1"),
        (("--rewards", ","), "--rewards and --modes must name at least one each"),
        (("--rewards", "nope"), "unknown reward(s) ['nope']"),
        (("--modes", "foo"), "bad trainer config: mode must be one of"),
        (("--thresholds", "2"), "--thresholds must be comma-separated fractions in (0, 1]"),
        (("--thresholds", "abc"), "--thresholds must be comma-separated fractions in (0, 1]"),
        (("--eval-samples-per-prompt", "0"), "bad trainer config: eval_num_steps, eval_samples_per_prompt"),
    ]
    for args, message in cases:
        result = run("demo", *args, "--backbone", "tiny-random", "--output-dir", str(tmp_path / "out"))
        assert result.returncode == 2 and result.stderr.startswith(f"sfgrpo demo: error: {message}"), (args, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


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
    assert "| `brightness`" in table and "flow_grpo" in table and "eval reward: start -> final" in table
    evals = summary["rewards"]["brightness"]["modes"]["stepwise"]["eval_reward"]
    assert evals["start"][0] > 0 and evals["final"][0] > 0
    assert (tmp_path / "brightness" / "stepwise" / "seed1" / "metrics.jsonl").exists()


def test_a_config_error_only_the_backbone_shows_is_a_usage_error_too(monkeypatch, capsys):
    """The trainer's own config checks (its backbone's sampling grid, CFG asked of a guidance-distilled
    checkpoint) are one line with argparse's exit status, like the config's."""
    import pytest

    from sfgrpo import cli, trainer

    def refuse(config):
        raise ValueError("bad trainer config: no trainable step (on Backbone's sampling grid)")

    monkeypatch.setattr(trainer, "Trainer", refuse)
    args = cli.build_parser().parse_args(["train", "--backbone", "tiny-random"])
    with pytest.raises(SystemExit) as exit_info:
        cli._trainer(args, None)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "sfgrpo train: error: bad trainer config: no trainable step (on Backbone's sampling grid)\n"

    def crash(config):
        raise ValueError("something else")

    monkeypatch.setattr(trainer, "Trainer", crash)
    with pytest.raises(ValueError, match="something else"):  # not a config error: not hidden
        cli._trainer(args, None)
