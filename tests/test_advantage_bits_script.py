"""benchmarks/advantage_bits.py (the engine-change bit check, loaded from its path): its comparison
finds one flipped bit in one problem's output, the same bits pass, and a run's problems go through
the emulated engine (a few of them here: the whole grid takes ~30 s)."""

import sys

import pytest
import torch

from sfgrpo import _native

import benchmark_scripts

pytestmark = pytest.mark.skipif(not _native.available(), reason="sfgrpo._C is not built")


@pytest.fixture(scope="module")
def script():
    return benchmark_scripts.load("advantage_bits")


def test_compare_finds_one_flipped_bit(script, tmp_path, monkeypatch, capsys):
    small = [one for one in script.inputs() if one[0][0] == 33 and one[0][3] == 5]  # 33 rows, 5 columns: 24 inputs
    monkeypatch.setattr(script, "inputs", lambda: iter(small))
    saved = script.run_all()
    assert len(saved) > 1000 and all(isinstance(entry[0], torch.Tensor) for entry in saved.values())
    torch.save(saved, tmp_path / "a.pt")
    key = next(k for k, entry in saved.items() if entry[0].dtype == torch.float64 and entry[0].abs().sum() > 0)
    flipped = saved[key][0].view(torch.int64)
    flipped.view(-1)[flipped.view(-1).nonzero()[0]] ^= 1  # the last bit of one non-zero advantage
    torch.save(saved, tmp_path / "b.pt")

    monkeypatch.setattr(sys, "argv", ["advantage_bits.py", "--compare", str(tmp_path / "a.pt"), str(tmp_path / "a.pt")])
    assert script.main() == 0
    monkeypatch.setattr(sys, "argv", ["advantage_bits.py", "--compare", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    assert script.main() == 1
    assert f"1 differ\n  {key}" in capsys.readouterr().out
