"""Checkpoints: a directory per save, written atomically.

    checkpoints/iter-000010/
        weights.safetensors     trained parameters (LoRA adapters or the full transformer)
        ema.safetensors         EMA of them (when enabled)
        optimizer.pt            AdamW state
        state.pt                iteration (= data position), RNG states, config
    checkpoints/latest          name of the newest complete checkpoint

or, in the sharded format (`checkpoint_format="sharded"`), the weights, EMA and optimizer state
in one torch.distributed.checkpoint directory that every process writes its own shards of:

    checkpoints/iter-000010/
        sharded/                .metadata + one file per process
        state.pt

Every file is written to a temporary name and `os.replace`d; the directory is assembled under a
temporary name and renamed into place, then `latest` is switched, so a crash at any moment leaves
either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

LATEST = "latest"
SHARDED = "sharded"


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
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        save_tensors(staging / "weights.safetensors", weights)
        if ema is not None:
            save_tensors(staging / "ema.safetensors", ema)
        _atomic_write(staging / "optimizer.pt", lambda tmp: torch.save(optimizer_state, tmp))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _publish(staging, root, name, state)


def _publish(staging: Path, root: Path, name: str, state: dict) -> Path:
    """Adds state.pt to a complete staging directory, renames it to `root/name` (replacing a
    checkpoint of the same iteration, e.g. from a resumed run) and points `latest` at it."""
    final = root / name
    replaced = _replaced(final)
    try:
        _atomic_write(staging / "state.pt", lambda tmp: torch.save(state, tmp))
        if final.exists():
            # a directory cannot be swapped atomically: the complete old one is moved aside (not
            # deleted) first, and `resolve_checkpoint` falls back to it should we stop in between
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _atomic_write(root / LATEST, lambda tmp: Path(tmp).write_text(name + "\n"))
    shutil.rmtree(replaced, ignore_errors=True)
    return final


def _replaced(final: Path) -> Path:
    return final.with_name(f".{final.name}.replaced")


def save_sharded_checkpoint(root: Path, iteration: int, *, tensors: dict, state: dict | None, is_main: bool,
                            barrier) -> Path | None:
    """Every process calls this (a collective): each writes its shards of `tensors` (DTensors keep
    their sharding) with torch.distributed.checkpoint into a staging directory all of them see,
    then rank 0 (`is_main`, holding `state`) adds state.pt and renames it into place. The staging
    name is fixed per iteration, so every process finds it without communicating."""
    import torch.distributed.checkpoint as dcp

    name = f"iter-{iteration:06d}"
    staging = root / f".{name}.staging"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    barrier()
    with _quiet_single_process():
        dcp.save(tensors, checkpoint_id=str(staging / SHARDED), no_dist=_single_process())
    barrier()  # every shard is on disk before the checkpoint becomes visible
    return _publish(staging, root, name, state) if is_main else None


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Deletes all but the `keep` newest complete checkpoints (never the one `latest` names);
    returns what was deleted. Leftovers of interrupted saves (staging and set-aside directories) go too."""
    if keep <= 0 or not root.is_dir():
        return []
    latest = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter-"))
    if latest is not None:  # the newest are those up to `latest`: a restarted run's own, not an older run's
        complete = [p for p in complete if p.name <= latest]
    doomed = [p for p in complete[:-keep] if p.name != latest]
    doomed += [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".iter-")]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def load_sharded(tensors: dict, path: Path) -> None:
    """Reads a sharded checkpoint into `tensors` in place (each process its own shards; any number
    of processes, whatever number wrote it). Every process calls it."""
    import torch.distributed.checkpoint as dcp

    with _quiet_single_process():
        dcp.load(tensors, checkpoint_id=str(path), no_dist=_single_process())


def _single_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


@contextlib.contextmanager
def _quiet_single_process():
    """torch.distributed.checkpoint warns on every single-process use, even when asked for one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def sharded_keys(path: Path) -> set[str]:
    """The top-level entries ("weights", "ema", "optimizer") a sharded checkpoint holds."""
    import torch.distributed.checkpoint as dcp

    return {key.split(".", 1)[0] for key in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata}


def resolve_checkpoint(spec: str, root: Path) -> Path:
    """'latest' -> the directory named in `root/latest`; anything else is a path."""
    if spec == LATEST:
        pointer = root / LATEST
        if not pointer.exists():
            raise FileNotFoundError(f"resume_from='latest' but {pointer} does not exist")
        named = root / pointer.read_text().strip()
        if not (named / "state.pt").exists() and (_replaced(named) / "state.pt").exists():
            return _replaced(named)  # stopped while replacing it: the complete previous version
        if not (named / "state.pt").exists():
            raise FileNotFoundError(f"{pointer} names {named}, which is not a complete checkpoint")
        return named
    path = Path(spec)
    if not (path / "state.pt").exists():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no state.pt)")
    return path


def load_checkpoint(path: Path) -> dict:
    """Weights and EMA are opened lazily (`LazyTensors`), the optimizer state memory-mapped; a
    sharded checkpoint gives the path of its torch.distributed.checkpoint directory instead."""
    if (path / SHARDED).is_dir():
        return {"sharded": path / SHARDED,
                "state": torch.load(path / "state.pt", map_location="cpu", weights_only=False)}
    return {
        "weights": LazyTensors(path / "weights.safetensors"),
        "ema": LazyTensors(path / "ema.safetensors") if (path / "ema.safetensors").exists() else None,
        # memory-mapped: ranks of a node share the file's pages instead of each holding a copy
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True),
        "state": torch.load(path / "state.pt", map_location="cpu", weights_only=False),
    }
