"""The package as installed: native module, kernels subpackage, CLI, backend selection."""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import sfgrpo
from sfgrpo import _native, backend


def test_native_module_is_built_with_cpu_code():
    info = _native.build_info()
    assert info["cpu"] is True, info
    import sfgrpo._C as C

    assert C.build_info()["cpu"] is True


def test_native_module_has_cuda_code_when_nvcc_was_present():
    import shutil

    if shutil.which("nvcc") is None and not torch.cuda.is_available():
        pytest.skip("no nvcc on this machine: the CPU-only build is the expected result")
    info = _native.build_info()
    assert info["cuda"] is True
    assert "90" in info["cuda_archs"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_row_gains_cpu_matches_reference(dtype):
    rewards = torch.randn(37, 11, dtype=dtype)
    got = _native.row_gains(rewards)
    assert got.dtype == dtype and got.shape == (37, 10)
    torch.testing.assert_close(got, sfgrpo.reference.gains(rewards), rtol=0, atol=0)


def test_native_row_gains_handles_non_contiguous_and_empty():
    rewards = torch.randn(11, 8, dtype=torch.float64).t()  # [8, 11], non-contiguous
    torch.testing.assert_close(_native.row_gains(rewards), rewards[:, 1:] - rewards[:, :-1])
    assert _native.row_gains(torch.zeros(0, 4)).shape == (0, 3)


def test_native_row_gains_rejects_bad_input():
    with pytest.raises(TypeError, match="float32 or float64"):
        _native.row_gains(torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-d"):
        _native.row_gains(torch.zeros(3, 1))


def test_native_dense_group_index_first_appearance_order():
    dense, count = _native.dense_group_index(torch.tensor([7, -3, 7, 10**12, -3]))
    assert count == 3
    assert dense.tolist() == [0, 1, 0, 2, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_native_row_gains_cuda_matches_cpu():
    rewards = torch.randn(1000, 11, device="cuda")
    torch.testing.assert_close(_native.row_gains(rewards).cpu(), sfgrpo.reference.gains(rewards.cpu()))


def test_kernels_install_as_subpackage_only():
    import sfgrpo.kernels  # noqa: F401

    spec = importlib.util.find_spec("kernels")
    # A top-level `kernels` module would shadow other projects' packages of that name.
    assert spec is None or "site-packages/kernels" not in str(spec.origin)


def test_cli_info_reports_native_build_and_backends():
    result = subprocess.run(
        [sys.executable, "-m", "sfgrpo.cli", "info", "--json"], capture_output=True, text=True, check=True,
        cwd="/",
    )
    report = json.loads(result.stdout)
    assert report["versions"]["sfgrpo"] == sfgrpo.__version__
    assert report["versions"]["torch"] == torch.__version__
    assert report["native"]["cpu"] is True
    assert "cpu" in report["available"]
    import importlib.metadata

    assert report["optional"]["peft"] == importlib.metadata.version("peft")  # an installed one
    assert report["optional"]["wandb"] == "not installed" or report["optional"]["wandb"][0].isdigit()
    text = subprocess.run(
        [sys.executable, "-m", "sfgrpo.cli", "info"], capture_output=True, text=True, check=True, cwd="/"
    ).stdout
    assert "native module sfgrpo._C" in text and "backend each op will use" in text and "optional packages" in text
    import diffusers

    assert report["pipelines"] == {name: name in dir(diffusers) for name in
                                   ("StableDiffusion3Pipeline", "FluxPipeline", "ChromaPipeline", "Flux2KleinPipeline",
                                    "QwenImagePipeline")}
    assert "diffusers checkpoints" in text and "QwenImagePipeline" in text
    # which DiT blocks get the fused forward with this diffusers (verified forwards only)
    from diffusers.models.attention import JointTransformerBlock

    from sfgrpo.models import fused_blocks

    expected = "fused" if fused_blocks.verified(JointTransformerBlock) else "diffusers' forward"
    assert report["fused_blocks"]["JointTransformerBlock"].startswith(expected)
    from sfgrpo.models import fused_attention

    expected = "fused" if fused_attention.verified() else "diffusers' processor"
    assert report["fused_blocks"]["FluxAttention"].startswith(expected)
    assert "DiT blocks under --fused-norms" in text
    assert report["fused_lora"].startswith(f"peft {importlib.metadata.version('peft')}: lora.Linear layers run")
    assert "LoRA layers under --fused-lora: peft" in text
    # the accelerated paths' switches as the process sees them (the launch knobs from the environment)
    assert report["switches"]["SFGRPO_ADVANTAGES_COOPERATIVE"] == "(unset: on)"
    assert report["switches"]["SFGRPO_ADVANTAGES_STAGE_ROWS"] == "(unset: on)"
    assert report["switches"]["SFGRPO_SDE_STEP_TUNING"].endswith("(defaults)")
    tuned = subprocess.run(
        [sys.executable, "-m", "sfgrpo.cli", "info", "--json"], capture_output=True, text=True, check=True, cwd="/",
        env=dict(os.environ, SFGRPO_SDE_STEP_TUNING="target_programs=4096"),
    ).stdout
    assert json.loads(tuned)["switches"]["SFGRPO_SDE_STEP_TUNING"] == (
        "LaunchTuning(threads=256, bytes_per_thread=16, target_programs=4096, max_iters=32)")


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("sfgrpo", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert exe is not None
    out = subprocess.run([exe, "info"], capture_output=True, text=True, check=True).stdout
    assert "sfgrpo installation report" in out


# ------------------------------------------------------------------------- backend selection
@pytest.fixture
def fake_ops(monkeypatch):
    monkeypatch.setattr(backend, "_OPS", {"fused_thing": "triton", "native_thing": "native"})
    monkeypatch.delenv(backend.ENV_VAR, raising=False)


def test_backend_auto_on_cpu(fake_ops):
    assert backend.resolve_backend("fused_thing", "cpu") == "reference"
    assert backend.resolve_backend("native_thing", "cpu") == "native"


def test_backend_env_and_override(fake_ops, monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert backend.resolve_backend("native_thing", "cpu") == "reference"
    assert backend.resolve_backend("native_thing", "cpu", override="auto") == "native"
    monkeypatch.setenv(backend.ENV_VAR, "native")
    # an op without a native kernel keeps its auto choice
    assert backend.resolve_backend("fused_thing", "cpu") == "reference"


def test_backend_forced_triton_on_cpu_needs_interpreter(fake_ops, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.resolve_backend("fused_thing", "cpu", override="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    assert backend.resolve_backend("fused_thing", "cpu", override="triton") == "triton"


def test_backend_op_with_a_native_cpu_kernel(monkeypatch):
    # the SDE step: Triton on CUDA, C++ on CPU (auto), the reference on request
    monkeypatch.setattr(backend, "_OPS", {"step": "triton"})
    monkeypatch.setattr(backend, "_CPU_FAMILY", {"step": "native"})
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.resolve_backend("step", "cpu") == "native"
    assert backend.resolve_backend("step", "cpu", override="native") == "native"
    assert backend.resolve_backend("step", "cpu", override="reference") == "reference"
    monkeypatch.setattr(backend._native, "_C", None)  # as if the extension was not built
    assert backend.resolve_backend("step", "cpu") == "reference"
    with pytest.raises(RuntimeError, match="not built"):
        backend.resolve_backend("step", "cpu", override="native")


def test_sde_step_runs_native_on_cpu_by_default(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.resolve_backend("sde_step", "cpu") == "native"


def test_backend_rejects_unknown_names(fake_ops, monkeypatch):
    with pytest.raises(ValueError, match="not one of"):
        backend.resolve_backend("fused_thing", "cpu", override="cuda")
    monkeypatch.setenv(backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="SFGRPO_BACKEND"):
        backend.resolve_backend("fused_thing", "cpu")
    with pytest.raises(KeyError, match="unknown op"):
        backend.resolve_backend("nope", "cpu")
