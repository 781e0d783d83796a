"""The `sfgrpo::sde_step` ops on CPU tensors by the C++ kernels of `sfgrpo._C` (csrc/cpu/sde_step.cpp):
one pass forward, one pass backward, the same signatures as `_sde_step_torch`. On the small latents
of a training step this is one native call instead of ~40 PyTorch ops, whose dispatch cost is most
of the step's time outside the backbone; on large latents it streams memory once.

In-kernel Philox noise is drawn in the kernel too, in the layout of the Triton kernels and of
`sfgrpo.reference.philox_step_noise` (the same integers; float results up to the last bits of
log/cos/sin).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sfgrpo import _native, alloc

_STORAGE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_SDE_TYPES = {"sde": 0, "cps": 1, "ddim": 2, "ode": 3}
_ABSENT = (0, 0)
_U64 = (1 << 64) - 1


def storage_code(dtype: torch.dtype) -> int:
    try:
        return _STORAGE[dtype]
    except KeyError:
        raise TypeError(f"sfgrpo: the native SDE step stores float32, bfloat16, float16 or float64, got {dtype}") from None


def _latent(tensor: Tensor | None) -> tuple[int, int]:
    """(address, storage code) of a contiguous latent; (0, 0) for none."""
    if tensor is None:
        return _ABSENT
    return tensor.data_ptr(), storage_code(tensor.dtype)


def _address(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _contiguous(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.contiguous()


def _f32(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.to(torch.float32).contiguous()


def _row_value(batch: int, value: float | Tensor) -> tuple[tuple[int, float], Tensor | None]:
    """A schedule value as the kernels take it: `((0, value), None)` for one value for every row (a
    number or a 0-d tensor: nothing to allocate), else `((address, 0.0), tensor)` for a contiguous
    float32 `[B]` tensor that must outlive the call."""
    if isinstance(value, float):
        return (0, value), None
    if value.ndim == 0:
        return (0, float(value)), None
    rows = value.to(torch.float32).expand(batch).contiguous()
    return (rows.data_ptr(), 0.0), rows


def _problem(x: Tensor, values: tuple, sde_type: str, logprob: str, reduction: str, kl: str) -> tuple[tuple, list]:
    """The kernels' problem tuple, and the per-row tensors it points into (keep them alive)."""
    rows = [_row_value(x.shape[0], value) for value in values]
    problem = (x.shape[0], x.shape[1], _SDE_TYPES[sde_type], logprob == "flow_grpo", reduction == "sum",
               kl == "flow_grpo", *(arg for arg, _ in rows))
    return problem, [tensor for _, tensor in rows]


def forward(x, v, t, t_next, noise_level, sigma_max, prev_sample, noise, v_ref, seed, seed_offset,
            use_philox, sde_type, logprob, reduction, kl, write_mean, write_x0, write_x1,
            for_backward=False):
    # for_backward: the Triton kernels' cue for their L2 hints; nothing to hint on CPU
    module = _native.require("the native CPU SDE step")
    x, v, prev_sample, noise, v_ref = (_contiguous(a) for a in (x, v, prev_sample, noise, v_ref))
    batch, elements = x.shape
    problem, keep_alive = _problem(x, (t, t_next, noise_level, sigma_max), sde_type, logprob, reduction, kl)
    # in-kernel Philox: (seed, first counter) as unsigned 64-bit words, the layout of the Triton kernels
    philox = (int(seed) & _U64, int(seed_offset) & _U64) if prev_sample is None and use_philox else None
    # x is contiguous [B, D] here: empty_like keeps that layout (and costs the parser less than a shape)
    sample = torch.empty_like(x) if prev_sample is None else None
    f32, row, one = torch.float32, (batch,), (1,)
    empty = alloc.empty_strided_cpu
    log_prob, std, std_dev_t = empty(row, one, f32), empty(row, one, f32), empty(row, one, f32)
    mean = torch.empty_like(x, dtype=f32) if write_mean else None
    x0_hat = torch.empty_like(x, dtype=f32) if write_x0 else None
    x1_hat = torch.empty_like(x, dtype=f32) if write_x1 else None
    kl_value = empty(row, one, f32) if v_ref is not None else None
    if batch > 0:
        module.cpu.sde_step_forward(
            problem, _latent(x), _latent(v), _latent(prev_sample), _latent(noise), _latent(v_ref), _latent(sample),
            log_prob.data_ptr(), std.data_ptr(), std_dev_t.data_ptr(), _address(mean), _address(x0_hat),
            _address(x1_hat), _address(kl_value), torch.get_num_threads(), philox,
        )
    del keep_alive
    return sample, log_prob, std, std_dev_t, mean, x0_hat, x1_hat, kl_value


def backward(x, v, sample, v_ref, t, t_next, noise_level, sigma_max, grad_log_prob, grad_kl, grad_mean,
             grad_x0, grad_x1, sde_type, logprob, reduction, kl, need_dv_ref, need_dx):
    """(dv, dv_ref, dx) in the dtypes of v, v_ref, x (None when not needed)."""
    module = _native.require("the native CPU SDE step")
    x, v, sample, v_ref = (_contiguous(a) for a in (x, v, sample, v_ref))
    grad_log_prob, grad_kl, grad_mean, grad_x0, grad_x1 = (
        _f32(g) for g in (grad_log_prob, grad_kl, grad_mean, grad_x0, grad_x1)
    )
    problem, keep_alive = _problem(x, (t, t_next, noise_level, sigma_max), sde_type, logprob, reduction, kl)
    dv = torch.empty_like(v)
    dv_ref = torch.empty_like(v_ref) if (need_dv_ref and v_ref is not None) else None
    dx = torch.empty_like(x) if need_dx else None
    if x.shape[0] > 0:
        module.cpu.sde_step_backward(
            problem, _latent(x), _latent(v),
            _latent(sample if grad_log_prob is not None else None), _latent(v_ref if grad_kl is not None else None),
            _address(grad_log_prob), _address(grad_kl), _address(grad_mean), _address(grad_x0), _address(grad_x1),
            _latent(dv), _latent(dv_ref), _latent(dx), torch.get_num_threads(),
        )
    del keep_alive
    return dv, dv_ref, dx
