"""Checkpoints: a directory per save, written atomically.

    checkpoints/iter-000010/
        weights.safetensors     trained parameters (LoRA adapters or the full transformer)
        ema.safetensors         EMA of them (when enabled)
        optimizer.pt            AdamW state
        state.pt                iteration (= data position), RNG states, config
    checkpoints/latest          name of the newest complete checkpoint

Every file is written to a temporary name and `os.replace`d; the directory is assembled under a
temporary name and renamed into place, then `latest` is switched, so a crash at any moment leaves
either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

LATEST = "latest"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(cpu, tmp))


class LazyTensors:
    """A safetensors file whose tensors are read one at a time (`keys()`, `get_tensor(name)`)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        with safe_open(str(path), framework="pt") as handle:
            self._keys = list(handle.keys())

    def keys(self) -> list[str]:
        return self._keys

    def get_tensor(self, name: str) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(name)


def save_checkpoint(root: Path, iteration: int, *, weights: dict[str, Tensor], ema: dict[str, Tensor] | None,
                    optimizer_state: dict, state: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter-{iteration:06d}"
    final = root / name
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        save_tensors(staging / "weights.safetensors", weights)
        if ema is not None:
            save_tensors(staging / "ema.safetensors", ema)
        _atomic_write(staging / "optimizer.pt", lambda tmp: torch.save(optimizer_state, tmp))
        _atomic_write(staging / "state.pt", lambda tmp: torch.save(state, tmp))
        if final.exists():  # re-saving the same iteration (e.g. a resumed run): replace it whole
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _atomic_write(root / LATEST, lambda tmp: Path(tmp).write_text(name + "\n"))
    return final


def resolve_checkpoint(spec: str, root: Path) -> Path:
    """'latest' -> the directory named in `root/latest`; anything else is a path."""
    if spec == LATEST:
        pointer = root / LATEST
        if not pointer.exists():
            raise FileNotFoundError(f"resume_from='latest' but {pointer} does not exist")
        return root / pointer.read_text().strip()
    path = Path(spec)
    if not (path / "state.pt").exists():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no state.pt)")
    return path


def load_checkpoint(path: Path) -> dict:
    """Weights and EMA are opened lazily (`LazyTensors`), the optimizer state memory-mapped."""
    return {
        "weights": LazyTensors(path / "weights.safetensors"),
        "ema": LazyTensors(path / "ema.safetensors") if (path / "ema.safetensors").exists() else None,
        # memory-mapped: ranks of a node share the file's pages instead of each holding a copy
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True),
        "state": torch.load(path / "state.pt", map_location="cpu", weights_only=False),
    }
