"""Test setup. Tests import the *installed* sfgrpo (pytest runs with --import-mode=importlib and
this file never puts the repository root on sys.path), because the source tree has neither the
compiled sfgrpo._C nor sfgrpo.kernels."""

import os
import pathlib

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It must be switched
# on before Triton is first imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402

import sfgrpo  # noqa: E402

# shared test helpers (tests/advantage_oracles.py) import by name; this is the tests folder, not the
# repository root, so sfgrpo still comes from the installed package
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

_REPO = pathlib.Path(__file__).resolve().parents[1]
if pathlib.Path(sfgrpo.__file__).resolve().parent == _REPO / "sfgrpo":
    raise RuntimeError(
        "tests imported sfgrpo from the source tree, not the installed package; install it with "
        "`pip install '.[test]'` and run `pytest` (not `python -m pytest`) from the repository root"
    )
