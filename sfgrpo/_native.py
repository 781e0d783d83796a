"""Loads the compiled module `sfgrpo._C` if it was built; pure-Python code works without it."""

from __future__ import annotations

import importlib
from typing import Any

try:
    _C = importlib.import_module("sfgrpo._C")

    _IMPORT_ERROR: Exception | None = None
except ImportError as err:  # no C++ compiler at install time, or a broken build
    _C = None
    _IMPORT_ERROR = err


def available() -> bool:
    return _C is not None


def has_cuda() -> bool:
    return _C is not None and bool(_C.build_info()["cuda"])


def build_info() -> dict[str, Any]:
    if _C is None:
        return {"cpu": False, "cuda": False, "cuda_archs": "", "error": str(_IMPORT_ERROR)}
    return dict(_C.build_info())


def require(what: str = "this operation") -> Any:
    """Returns the compiled module or raises a message that says how to get it."""
    if _C is None:
        raise RuntimeError(
            f"sfgrpo: {what} needs the compiled extension sfgrpo._C, which is not available "
            f"({_IMPORT_ERROR}). Reinstall with a C++ compiler and CMake present "
            "(`pip install .`, set SFGRPO_REQUIRE_NATIVE=1 to see the build error), or force the "
            "pure-PyTorch path with SFGRPO_BACKEND=reference."
        )
    return _C


def require_cuda(what: str = "this operation") -> Any:
    module = require(what)
    if not module.build_info()["cuda"]:
        raise RuntimeError(
            f"sfgrpo: {what} got CUDA tensors but sfgrpo._C was built without CUDA code "
            "(nvcc was not found at install time, or SFGRPO_DISABLE_CUDA=1). Reinstall with the "
            "CUDA toolkit on PATH, or use SFGRPO_BACKEND=reference."
        )
    return module.cuda


def _check_float_matrix(name: str, tensor, columns_at_least: int = 1) -> None:
    import torch

    if tensor.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {tensor.dtype}")
    if tensor.ndim != 2 or tensor.shape[1] < columns_at_least:
        raise ValueError(f"{name} must be 2-d with at least {columns_at_least} column(s), got {tuple(tensor.shape)}")


def row_gains(rewards):
    """`[N, T+1]` -> `[N, T]` differences of consecutive columns, by the native CPU/CUDA code."""
    import torch

    _check_float_matrix("rewards", rewards, columns_at_least=2)
    rewards = rewards.contiguous()
    n, steps = rewards.shape[0], rewards.shape[1] - 1
    out = torch.empty((n, steps), dtype=rewards.dtype, device=rewards.device)
    dtype = str(rewards.dtype).removeprefix("torch.")
    if rewards.device.type == "cuda":
        stream = torch.cuda.current_stream(rewards.device).cuda_stream
        require_cuda("row_gains").row_gains(dtype, rewards.data_ptr(), n, steps, out.data_ptr(), stream)
    elif rewards.device.type == "cpu":
        require("row_gains").cpu.row_gains(dtype, rewards.data_ptr(), n, steps, out.data_ptr())
    else:
        raise ValueError(f"row_gains supports CPU and CUDA tensors, got {rewards.device}")
    return out


def dense_group_index(group_ids):
    """Arbitrary int64 ids `[N]` (CPU) -> (dense ids 0..G-1 in first-appearance order, G)."""
    import torch

    if group_ids.dtype != torch.int64 or group_ids.ndim != 1 or group_ids.device.type != "cpu":
        raise ValueError(f"group_ids must be a 1-d int64 CPU tensor, got {group_ids.dtype} {tuple(group_ids.shape)} on {group_ids.device}")
    group_ids = group_ids.contiguous()
    out = torch.empty_like(group_ids)
    count = require("dense_group_index").cpu.dense_group_index(group_ids.data_ptr(), group_ids.numel(), out.data_ptr())
    return out, count
