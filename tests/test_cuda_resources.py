"""The CUDA advantage engine's kernels compile for sm_90 with the build's nvcc flags (CMakeLists.txt)
without register spills, and within the registers that keep 3 blocks of 256 threads resident per SM:
the cooperative launch's grid must hold the 391 blocks of 100k rows at once on a 132-SM H100 / H200
(fewer resident blocks cut the grid and make every phase run a second round). Needs nvcc, no GPU."""

import pathlib
import re
import shutil
import subprocess

import pytest

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")

REPO = pathlib.Path(__file__).resolve().parents[1]
# what CMakeLists.txt gives the CUDA sources (Release: -O3 -DNDEBUG)
FLAGS = ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false",
         "-arch=sm_90", f"-I{REPO / 'csrc' / 'include'}", "--resource-usage"]
MAX_REGISTERS = 65536 // (3 * 256)  # 85: 3 resident blocks of 256 threads per SM


def kernel_resources(source: str, tmp_path) -> dict[str, dict[str, int]]:
    """{mangled sfgrpo kernel: {registers, stack, spill_stores, spill_loads}} from ptxas' report."""
    result = subprocess.run([NVCC, *FLAGS, "-c", str(REPO / "csrc" / "cuda" / source), "-o", str(tmp_path / "k.o")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    kernels, current = {}, None
    for line in (result.stdout + result.stderr).splitlines():
        properties = re.search(r"Function properties for (\S+)", line)
        if properties:
            current = properties.group(1) if "6sfgrpo" in properties.group(1) else None
            continue
        if current is None:
            continue
        spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills:
            kernels[current] = dict(zip(("stack", "spill_stores", "spill_loads"), map(int, spills.groups())))
        registers = re.search(r"Used (\d+) registers", line)
        if registers and current in kernels:
            kernels[current]["registers"] = int(registers.group(1))
            current = None
    return kernels


def test_advantage_kernels_fit_three_blocks_per_sm_without_spills(tmp_path):
    kernels = kernel_resources("advantages.cu", tmp_path)
    names = " ".join(kernels)
    for kernel in ("single_launch_kernel", "warp_rows_kernel", "finalize_kernel", "write_kernel", "pad_claims_kernel"):
        assert kernel in names, f"{kernel} missing from ptxas' report: {names}"
    # single launch, finalize, write and two phase kernels for float and double, pad claims
    assert len(kernels) == 11
    for name, used in kernels.items():
        assert used["spill_stores"] == 0 and used["spill_loads"] == 0 and used["stack"] == 0, (name, used)
        assert used["registers"] <= MAX_REGISTERS, (name, used)


def test_gain_kernels_do_not_spill(tmp_path):
    kernels = kernel_resources("gains.cu", tmp_path)
    assert kernels, "no sfgrpo kernel in ptxas' report"
    for name, used in kernels.items():
        assert used["spill_stores"] == 0 and used["spill_loads"] == 0 and used["stack"] == 0, (name, used)
