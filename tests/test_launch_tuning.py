"""The SDE-step kernels' launch knobs: SFGRPO_SDE_STEP_TUNING (read once at import, the format the
tuning sweep prints) and the sweep's choice of a winner."""

import importlib.util
import os
import subprocess
import sys

import pytest

import benchmark_scripts

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _tuning_in_a_fresh_process(value: str | None) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SFGRPO_SDE_STEP_TUNING"}
    if value is not None:
        env["SFGRPO_SDE_STEP_TUNING"] = value
    code = "from sfgrpo.kernels import sde_step as K; print(K.TUNING)"
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                          cwd="/", check=True)
    return done.stdout.strip(), done.stderr


def test_tuning_text_round_trips_and_rejects_bad_values():
    from sfgrpo.kernels import sde_step as K

    tuning = K.tuning_from_text("threads=128, target_programs=2048")
    assert tuning == K.LaunchTuning(threads=128, target_programs=2048)
    assert K.tuning_from_text("") == K.LaunchTuning()
    for bad in ("threads=96", "bytes_per_thread=12", "warps=4", "threads", "threads=0", "threads=x"):
        with pytest.raises(ValueError):
            K.tuning_from_text(bad)


def test_environment_sets_the_knobs_at_import_and_a_bad_value_warns():
    default, _ = _tuning_in_a_fresh_process(None)
    assert default == "LaunchTuning(threads=256, bytes_per_thread=16, target_programs=1024, max_iters=32)"
    chosen, _ = _tuning_in_a_fresh_process("threads=256,bytes_per_thread=32,target_programs=4096,max_iters=32")
    assert chosen == "LaunchTuning(threads=256, bytes_per_thread=32, target_programs=4096, max_iters=32)"
    fallback, warning = _tuning_in_a_fresh_process("threads=100")
    assert fallback == default and "using the default launch knobs" in warning


def test_launch_config_follows_the_knobs():
    from sfgrpo.kernels import sde_step as K

    few = K.launch_config(16, 262144, 2, K.LaunchTuning(target_programs=512))
    many = K.launch_config(16, 262144, 2, K.LaunchTuning(target_programs=4096))
    assert 16 * few.num_chunks <= 512 < 16 * many.num_chunks <= 4096


@pytest.fixture(scope="module")
def tune():
    return benchmark_scripts.load("tune_sde_step_gpu")


def test_the_sweep_winner_has_the_best_geometric_mean_over_complete_variants(tune, tmp_path):
    from sfgrpo.kernels import sde_step as K

    a, b, c = (K.LaunchTuning(target_programs=p) for p in (512, 1024, 2048))
    rows = [
        # a: fast on one case, slow on the other; b: good on both (wins); c: the best on one case
        # but missing the other (a failed variant cannot win)
        ("score fwd+bwd", "flux", "bfloat16", a, 1.0, 3000.0), ("sample philox", "flux", "bfloat16", a, 1.0, 500.0),
        ("score fwd+bwd", "flux", "bfloat16", b, 1.0, 2000.0), ("sample philox", "flux", "bfloat16", b, 1.0, 1500.0),
        ("score fwd+bwd", "flux", "bfloat16", c, 1.0, 9000.0),
        (tune.PRECISE_CASE, "flux", "bfloat16", a, 1.0, 1e9),  # the A/B cases do not count
        (tune.L2_CASE, "flux", "bfloat16", a, 1.0, 1e9),
    ]
    assert tune.winner(rows, [a, b, c]) == b
    assert tune.winner([], [a]) is None
    text = tune.tuning_text(b)
    assert K.tuning_from_text(text) == b and "target_programs=1024" in text
    # written after every shape, so a sweep cut short by its time limit still names one
    path = tmp_path / "winner.txt"
    assert tune.save_winner(rows, [a, b, c], str(path)) == b and path.read_text() == text + "\n"
    assert tune.save_winner([], [a], str(tmp_path / "none.txt")) is None and not (tmp_path / "none.txt").exists()
