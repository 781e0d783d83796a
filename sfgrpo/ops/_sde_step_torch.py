"""Plain-PyTorch implementation of the `sfgrpo::sde_step` ops for CPU tensors (and the `reference`
backend anywhere): the formulas of `sfgrpo.reference`, on `[B, D]` rows, computing only the
outputs that were asked for. On CPU a fresh full-size temporary costs more than the arithmetic
(each large allocation is new memory the kernel must fault in), so the passes work in place on
one or two scratch buffers. `sfgrpo.reference` stays the readable oracle the tests compare against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sfgrpo import reference


def _mean(xf: Tensor, vf: Tensor, c_x: Tensor, c_v: Tensor) -> Tensor:
    """`c_x x + c_v v` into a fresh buffer (never in place on the inputs)."""
    return torch.mul(xf, c_x).addcmul_(vf, c_v)


def _sum_of_squares_(values: Tensor) -> Tensor:
    """Row sums of squares; squares `values` in place (fp32 cascade summation, ~1e-7 relative)."""
    return values.mul_(values).sum(dim=1)


def step_rows(x: Tensor, *values: float | Tensor) -> tuple[Tensor, ...]:
    """The op's per-row step values (`[B]` tensors, or one value for every row: a number or a 0-d
    CPU tensor) as `[B]` on x's device. One value is filled on the device (a host-to-device copy
    would synchronise)."""
    return tuple(
        torch.full((x.shape[0],), float(value), dtype=torch.float32, device=x.device)
        if not isinstance(value, Tensor) or (value.ndim == 0 and value.device != x.device)
        else reference.row_values(value, x.shape[0], x.device)
        for value in values
    )


def forward(x, v, t, t_next, noise_level, sigma_max, prev_sample, noise, v_ref, seed, seed_offset,
            use_philox, sde_type, logprob, reduction, kl, write_mean, write_x0, write_x1,
            for_backward=False):
    # for_backward: the Triton kernels' cue for their L2 hints; nothing to hint on CPU
    batch, elements = x.shape
    t, t_next, noise_level, sigma_max = step_rows(x, t, t_next, noise_level, sigma_max)
    coeffs = reference.sde_coefficients(sde_type, t, t_next, noise_level, sigma_max)
    c_x, c_v, std = coeffs.c_x[:, None], coeffs.c_v[:, None], coeffs.std[:, None]
    xf, vf = x.float(), v.float()
    mean = _mean(xf, vf, c_x, c_v)
    if prev_sample is None:
        if use_philox:
            noise = reference.philox_step_noise(seed, seed_offset, x.shape[0], x.shape[1], x.device)
        sample_out = torch.addcmul(mean, noise.float(), std).to(x.dtype)
        sample = sample_out
    else:
        sample_out = None
        sample = prev_sample
    residual = torch.sub(sample.float(), mean)
    log_prob = reference.log_prob_from_squares(
        _sum_of_squares_(residual), coeffs.std, elements, sde_type=sde_type, convention=logprob, reduction=reduction
    )
    kl_value = None
    if v_ref is not None:
        mean_diff = torch.sub(mean, _mean(xf, v_ref.float(), c_x, c_v), out=residual)  # reuse the scratch buffer
        kl_value = reference.kl_from_squares(
            _sum_of_squares_(mean_diff), reference.kl_std(coeffs, kl), elements, reduction
        )
    t_col = t[:, None]
    return (
        sample_out,
        log_prob,
        coeffs.std.clone(),  # cps/ddim/ode share one tensor for std and std_dev_t: outputs may not alias
        coeffs.std_dev_t.clone(),
        mean if write_mean else None,
        torch.addcmul(xf, vf, -t_col) if write_x0 else None,
        torch.addcmul(xf, vf, 1.0 - t_col) if write_x1 else None,
        kl_value,
    )


def backward(x, v, sample, v_ref, t, t_next, noise_level, sigma_max, grad_log_prob, grad_kl, grad_mean,
             grad_x0, grad_x1, sde_type, logprob, reduction, kl, need_dv_ref, need_dx):
    """(dv, dv_ref, dx) by the closed form of `reference.sde_step_vjp`, in place on scratch buffers."""
    batch, elements = x.shape
    t, t_next, noise_level, sigma_max = step_rows(x, t, t_next, noise_level, sigma_max)
    coeffs = reference.sde_coefficients(sde_type, t, t_next, noise_level, sigma_max)
    c_x, c_v = coeffs.c_x[:, None], coeffs.c_v[:, None]
    xf, vf = x.float(), v.float()
    on_mean = None  # dL/dmean, [B, D], a buffer we own
    if grad_log_prob is not None:
        k_lp = reference.log_prob_grad_scale(
            grad_log_prob, coeffs.std, elements, sde_type=sde_type, convention=logprob, reduction=reduction
        )[:, None]
        # (x' - mean) * k_lp, built in the mean's buffer
        on_mean = _mean(xf, vf, c_x, c_v).sub_(sample.float()).mul_(-k_lp)
    if grad_mean is not None:
        on_mean = grad_mean.float().clone() if on_mean is None else on_mean.add_(grad_mean.float())
    dx = None
    if need_dx:
        dx = torch.zeros_like(xf) if on_mean is None else on_mean * c_x
    dv = torch.zeros_like(vf) if on_mean is None else on_mean.mul_(c_v)
    dv_ref = None
    if grad_kl is not None and v_ref is not None:
        k_kl = reference.kl_grad_scale(grad_kl, reference.kl_std(coeffs, kl), elements, reduction)[:, None]
        # mean - mean_ref, exactly as the forward formed it, times k_kl c_v
        on_kl = _mean(xf, vf, c_x, c_v).sub_(_mean(xf, v_ref.float(), c_x, c_v)).mul_(k_kl * c_v)
        dv.add_(on_kl)
        if need_dv_ref:
            dv_ref = on_kl.neg_()
    if grad_x0 is not None:
        dv.addcmul_(grad_x0.float(), -t[:, None])
        if dx is not None:
            dx.add_(grad_x0.float())
    if grad_x1 is not None:
        dv.addcmul_(grad_x1.float(), 1.0 - t[:, None])
        if dx is not None:
            dx.add_(grad_x1.float())
    if need_dv_ref:
        dv_ref_out = (dv_ref if dv_ref is not None else torch.zeros_like(v_ref, dtype=torch.float32)).to(v_ref.dtype)
    else:
        dv_ref_out = None
    return dv.to(v.dtype), dv_ref_out, dx.to(x.dtype) if need_dx else None
