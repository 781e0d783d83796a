"""The fused SDE-step op: Triton kernels (interpreter on CPU, real on CUDA) and the reference path
against `sfgrpo.reference`, gradients against autograd through the reference, on-policy exactness,
noise sources, opcheck, torch.compile and bad inputs."""

import itertools
import math

import pytest
import torch

from sfgrpo import functional as F
from sfgrpo import reference as ref
from sfgrpo.ops.sde_step import sde_step_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton on CUDA; on CPU the Triton kernels in Triton's interpreter (conftest sets it up) and the
# C++ kernels of sfgrpo._C
ACCELS = ["triton"] if DEVICE == "cuda" else ["triton", "native"]
BACKENDS = ["reference", *ACCELS]

SHAPES = [(1, 1), (3, 7), (2, 3, 5, 7), (4, 4, 8, 8), (2, 2, 3, 4, 5), (2, 3, 40000)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    v_ref = (v.float().cpu() + 0.05 * torch.randn(shape, generator=g)).to(dtype).to(DEVICE)
    batch = shape[0]
    t = (0.2 + 0.75 * torch.rand(batch, generator=g))
    t[0] = 1.0  # first step of a schedule
    t_next = t * (0.3 + 0.6 * torch.rand(batch, generator=g))
    t_next[-1] = 0.0  # last step
    level = torch.rand(batch, generator=g)
    level[min(1, batch - 1)] = 0.0  # a row without noise
    return x, v, v_ref, t.to(DEVICE), t_next.to(DEVICE), level.to(DEVICE)


def _tolerances(dtype):
    # log-probs are means of O(1) terms: fp32 math keeps them to ~1e-6 whatever the storage dtype
    return dict(atol=2e-6, rtol=2e-6)


def _close(a, b, atol, rtol, what):
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=atol, rtol=rtol, msg=what)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sde_type", ref.SDE_TYPES)
@pytest.mark.parametrize("accel", ACCELS)
def test_kernel_matches_reference_sampling_with_given_noise(shape, dtype, sde_type, accel):
    x, v, v_ref, t, tn, level = _inputs(shape, dtype)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    kw = dict(sde_type=sde_type, noise=noise, v_ref=v_ref, return_mean=True, return_x0_hat=True, return_x1_hat=True)
    got = F.sde_step(x, v, t, tn, level, backend=accel, **kw)
    want = F.sde_step(x, v, t, tn, level, backend="reference", **kw)
    oracle = ref.sde_step(x, v, t, tn, level, sde_type=sde_type, noise=noise, v_ref=v_ref)
    assert got.prev_sample.dtype == dtype and got.prev_sample.shape == shape
    # the sample may differ by one storage ulp where fp32 rounding differs
    ulp = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    _close(got.prev_sample, oracle.prev_sample, ulp * 4, ulp, "prev_sample")
    if dtype != torch.float32:
        # rounded to nearest even like torch: a 2-byte value differs only where the fp32 values
        # differ next to a rounding boundary (none here; in Triton's interpreter its own truncating
        # fp32 -> bf16 cast made about half of them one step off)
        assert (got.prev_sample != oracle.prev_sample).float().mean().item() <= 1e-3
    _close(got.mean, oracle.mean, 2e-6, 2e-6, "mean")
    _close(got.x0_hat, oracle.x0_hat, 2e-6, 2e-6, "x0_hat")
    _close(got.x1_hat, oracle.x1_hat, 2e-6, 2e-6, "x1_hat")
    _close(got.std, oracle.std, 1e-7, 1e-6, "std")
    _close(got.std_dev_t, oracle.std_dev_t, 1e-7, 1e-6, "std_dev_t")
    _close(got.kl, oracle.kl, 1e-7, 1e-5, "kl")
    ulp = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    _close(want.log_prob, oracle.log_prob, 2e-6, 2e-6, "plain-PyTorch path")
    _close(want.prev_sample, oracle.prev_sample, ulp * 4, ulp, "plain-PyTorch sample")
    if dtype == torch.float32:
        _close(got.log_prob, oracle.log_prob, **_tolerances(dtype), what="log_prob")
    # with rounded storage, score the kernel's own sample with the reference: same sample, same density
    rescored = ref.sde_step(x, v, t, tn, level, sde_type=sde_type, prev_sample=got.prev_sample)
    _close(got.log_prob, rescored.log_prob, **_tolerances(dtype), what="log_prob of the stored sample")


@pytest.mark.parametrize("sde_type", ref.SDE_TYPES)
@pytest.mark.parametrize("logprob, reduction, kl", list(itertools.product(ref.LOGPROB_CONVENTIONS, ref.REDUCTIONS, ref.KL_CONVENTIONS)))
@pytest.mark.parametrize("accel", ACCELS)
def test_kernel_conventions_when_scoring(sde_type, logprob, reduction, kl, accel):
    x, v, v_ref, t, tn, level = _inputs((3, 2, 6, 5), torch.float32, seed=4)
    sample = torch.randn_like(x)
    kw = dict(sde_type=sde_type, prev_sample=sample, v_ref=v_ref, logprob=logprob, reduction=reduction, kl=kl)
    got = F.sde_step(x, v, t, tn, level, backend=accel, **kw)
    oracle = ref.sde_step(x, v, t, tn, level, **kw)
    scale = 60 if reduction == "sum" else 1
    _close(got.log_prob, oracle.log_prob, 2e-6 * scale, 2e-6, "log_prob")
    _close(got.kl, oracle.kl, 1e-6 * scale, 1e-5, "kl")
    assert got.prev_sample is sample


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sde_type", ["sde", "cps", "ddim"])
@pytest.mark.parametrize("source", ["noise", "seed", "generator"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scoring_the_drawn_sample_gives_ratio_exactly_one(dtype, sde_type, source, backend):
    x, v, _, t, tn, level = _inputs((4, 3, 33, 17), dtype, seed=2)
    draw = {"noise": dict(noise=torch.randn(x.shape, device=DEVICE)), "seed": dict(seed=1234, seed_offset=77),
            "generator": dict(generator=torch.Generator(device=DEVICE).manual_seed(5))}[source]
    drawn = F.sde_step(x, v, t, tn, level, sde_type=sde_type, backend=backend, **draw)
    scored = F.sde_step(x, v, t, tn, level, sde_type=sde_type, prev_sample=drawn.prev_sample, backend=backend)
    assert torch.equal(scored.log_prob, drawn.log_prob)
    assert torch.equal(torch.exp(scored.log_prob - drawn.log_prob), torch.ones_like(drawn.log_prob))


@pytest.mark.parametrize("backend", BACKENDS)
def test_philox_seed_and_offset_are_taken_modulo_2_64(backend):
    # any Python integers: the noise of their 64 bits, on every backend (a seed beyond int64 failed
    # in Triton's launcher, one of 2^63 or more under torch.compile: the op's schema is int64)
    x, v, _, t, tn, level = _inputs((2, 3, 5), torch.float32, seed=3)

    def sample(seed, seed_offset):
        return F.sde_step(x, v, t, tn, level, seed=seed, seed_offset=seed_offset, backend=backend).prev_sample

    assert torch.equal(sample(2**70 + 9, 2**64 - 5), sample(9, -5))
    assert torch.equal(sample(2**64 - 1, -(2**63) - 1), sample(-1, 2**63 - 1))
    assert not torch.equal(sample(9, -5), sample(9, -4))

    def compiled_sample(x, v):
        return F.sde_step(x, v, t, tn, level, seed=2**64 - 1, seed_offset=2**63, backend=backend).prev_sample

    torch._dynamo.reset()
    assert torch.equal(torch.compile(compiled_sample, fullgraph=True, backend="aot_eager")(x, v),
                       sample(-1, -(2**63)))


@pytest.mark.parametrize("accel", ACCELS)
def test_multi_chunk_rows_are_deterministic_and_on_policy(accel):
    # 3 x 300k elements: several chunks per row, partial sums added by the row's last program
    x, v, _, t, tn, level = _inputs((3, 300_000), torch.bfloat16, seed=6)
    level = torch.full_like(level, 0.7)
    a = F.sde_step(x, v, t, tn, level, seed=3, backend=accel)
    b = F.sde_step(x, v, t, tn, level, seed=3, backend=accel)
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.log_prob, b.log_prob)
    scored = F.sde_step(x, v, t, tn, level, prev_sample=a.prev_sample, backend=accel)
    assert torch.equal(scored.log_prob, a.log_prob)
    oracle = ref.sde_step(x, v, t, tn, level, prev_sample=a.prev_sample)
    _close(a.log_prob, oracle.log_prob, 2e-6, 2e-6, "log_prob")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sde_type", ref.SDE_TYPES)
def test_one_value_for_every_row_equals_per_row_tensors(backend, sde_type):
    # Python numbers reach the kernels by value (no per-row tensors): same bits as [B] tensors, as
    # a mix of both (the numbers become rows on the device) and as 0-d CPU tensors
    x, v, v_ref, *_ = _inputs((3, 2, 40_000), torch.bfloat16, seed=12)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    t, tn, level, smax = 0.85, 0.55, 0.7, 0.9
    rows = [torch.full((3,), value, device=DEVICE) for value in (t, tn, level, smax)]
    mixed = (rows[0], tn, rows[2], smax)
    zero_dim = [torch.tensor(value) for value in (t, tn, level, smax)]
    results = []
    for values in ((t, tn, level, smax), rows, mixed, zero_dim):
        vg = v.float().requires_grad_()
        out = F.sde_step(x, vg, *values[:3], sigma_max=values[3], sde_type=sde_type, noise=noise, v_ref=v_ref,
                         return_x0_hat=True, backend=backend)
        (out.log_prob.sum() + out.kl.sum() + out.x0_hat.sum()).backward()
        results.append((out.prev_sample, out.log_prob, out.kl, out.std, out.x0_hat, vg.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.skipif(DEVICE != "cpu", reason="the native SDE step is the CPU kernel")
def test_native_cpu_step_has_the_same_bits_for_any_thread_count():
    # 2 x 200k elements: several 64k-element chunks per row, spread over threads when allowed
    x, v, v_ref, t, tn, level = _inputs((2, 200_000), torch.float32, seed=11)
    noise = torch.randn(x.shape)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            vv = v.clone().requires_grad_()
            out = F.sde_step(x, vv, t, tn, level, noise=noise, v_ref=v_ref, backend="native")
            (out.log_prob.sum() + out.kl.sum()).backward()
            results.append((out.prev_sample, out.log_prob, out.kl, vv.grad))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.skipif(DEVICE != "cpu", reason="the native SDE step is the CPU kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_native_storage_rounding_equals_torch(dtype):
    from sfgrpo._native import require
    from sfgrpo.ops._sde_step_native import storage_code

    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.9, 65520.0, 1e6, -1e6, 1e-8, -1e-8, 6.1e-5,
                            5.96e-8, 2.98e-8, 2.99e-8, 1e-40, float("inf"), float("-inf"), 3.0e38])
    bits = torch.randint(0, 2**31 - 1, (200_000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    random_floats = (bits.to(torch.int32)).view(torch.float32)  # every exponent, both tails of every rounding
    values = torch.cat([special, random_floats, -random_floats, torch.randn(10_000)])
    values = values[~values.isnan()]
    module = require()
    stored = torch.empty(values.shape, dtype=dtype)
    module.cpu.convert_storage(0, values.data_ptr(), storage_code(dtype), stored.data_ptr(), values.numel())
    assert torch.equal(stored.view(torch.int16 if dtype != torch.float64 else torch.int64),
                       values.to(dtype).view(torch.int16 if dtype != torch.float64 else torch.int64))
    back = torch.empty(values.shape, dtype=torch.float32)
    module.cpu.convert_storage(storage_code(dtype), stored.data_ptr(), 0, back.data_ptr(), values.numel())
    assert torch.equal(back, stored.float())
    nan = torch.full((3,), float("nan"))
    module.cpu.convert_storage(0, nan.data_ptr(), storage_code(dtype), stored.data_ptr(), 3)
    assert stored[:3].isnan().all()


@pytest.mark.parametrize("accel", ACCELS)
def test_philox_noise_matches_between_kernel_and_reference(accel):
    x, v, _, t, tn, level = _inputs((3, 5000), torch.float32, seed=8)
    level = torch.full_like(level, 0.7)
    t = torch.full_like(t, 0.8)
    tn = torch.full_like(tn, 0.6)
    a = F.sde_step(x, v, t, tn, level, seed=99, seed_offset=12345, backend=accel, return_mean=True)
    b = F.sde_step(x, v, t, tn, level, seed=99, seed_offset=12345, backend="reference")
    _close(a.prev_sample, b.prev_sample, 1e-5, 1e-5, "philox sample")
    eps = (a.prev_sample - a.mean) / ref.per_row(a.std, x)
    assert abs(eps.mean().item()) < 0.03 and abs(eps.std().item() - 1) < 0.03
    other = F.sde_step(x, v, t, tn, level, seed=100, seed_offset=12345, backend=accel)
    assert not torch.allclose(other.prev_sample, a.prev_sample)


def test_philox_step_noise_layout_and_statistics():
    # 4 normals per counter, rows on disjoint counter ranges: a row drawn alone at its offset is the
    # same row drawn within the batch; odd row lengths use only the first values of the last counter
    batch = ref.philox_step_noise(7, 100, 3, 1001)
    quads = (1001 + 3) // 4
    assert batch.shape == (3, 1001)
    assert torch.equal(batch[2], ref.philox_step_noise(7, 100 + 2 * quads, 1, 1001)[0])
    assert torch.equal(batch[0, :1000], ref.philox_step_noise(7, 100, 1, 1000)[0])
    four = ref.philox_normal4(7, torch.tensor([100, 101]))
    assert torch.equal(batch[0, :8], four.reshape(-1))
    big = ref.philox_step_noise(3, 0, 4, 250_000).double()
    assert abs(big.mean().item()) < 0.005 and abs(big.std().item() - 1) < 0.005
    assert abs((big ** 4).mean().item() - 3) < 0.05  # Gaussian kurtosis
    for lag in (1, 2, 3, 4):  # the 4 values of a counter (and neighbours) are uncorrelated
        corr = (big[:, lag:] * big[:, :-lag]).mean().item()
        assert abs(corr) < 0.005, (lag, corr)


def _philox_error_bound(u1):
    """Largest difference the GPU's approximate Box-Muller may have from reference.philox_normal4,
    per draw, from the documented bounds: lg2.approx 2^-22 absolute on [0.5, 2] (2^-22 relative
    elsewhere), sin/cos.approx 2^-20.5 absolute (the PTX ISA's; the CUDA guide gives 2^-21.41 on
    [-pi, pi]), sqrt.approx 2^-23 relative; plus a few float32 roundings both sides make."""
    u1 = u1.double().clamp_min(1e-7)
    log2 = torch.log2(u1)
    radius = torch.sqrt(-2 * math.log(2) * log2)
    d_square = 2 * math.log(2) * 2.0**-22 * log2.abs().clamp_min(1.0)  # on radius^2 = -2 ln(2) log2 u1
    # |sqrt(a) - sqrt(b)| <= min(sqrt|a - b|, |a - b| / sqrt(b)); the kernel clamps radius^2 at 0
    d_radius = torch.minimum(d_square.sqrt(), d_square / radius) + radius * 2.0**-23
    return d_radius + (radius + d_radius) * 2.0**-20.5 + 8 * 2.0**-24 * (1 + radius)


@pytest.mark.parametrize("rows, elements, seed_offset", [(3, 5000, 12345), (2, 1001, 2**32 - 100), (1, 3, 0)])
def test_philox_kernel_noise_is_the_reference_noise(rows, elements, seed_offset):
    # the forward kernel's Philox noise (same code: _philox_block), written out: bit-equal to the
    # reference in Triton's interpreter (plain tl.log2/cos/sin there); on a GPU within the error
    # bounds of the hardware approximations, draw by draw
    pytest.importorskip("triton")
    from sfgrpo.kernels import sde_step as kernels

    got = kernels.philox_noise(99, seed_offset, rows, elements, DEVICE).cpu()
    want = ref.philox_step_noise(99, seed_offset, rows, elements)
    if DEVICE == "cpu":
        assert not kernels.philox_fast_math()
        assert torch.equal(got, want)
        return
    assert kernels.philox_fast_math()
    quads = -(-elements // 4)
    counters = seed_offset + torch.arange(rows)[:, None] * quads + torch.arange(quads)[None, :]
    u1 = ref.philox_uniform4(99, counters)[..., [0, 0, 2, 2]].reshape(rows, quads * 4)[:, :elements]
    excess = (got.double() - want.double()).abs() - _philox_error_bound(u1)
    assert excess.max().item() <= 0, f"over the approximation bound by {excess.max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_philox_sample_is_drawn_from_the_written_out_noise(dtype):
    # the fused forward and kernels.philox_noise share the noise code (4 and 8 elements per thread):
    # the stored sample is (mean + std * noise) rounded to the storage dtype (to nearest even, like
    # torch: also in Triton's interpreter, whose own fp32 -> bf16 cast truncates), on the GPU
    # (approximations) as in the interpreter
    pytest.importorskip("triton")
    from sfgrpo.kernels import sde_step as kernels

    x, v, _, t, tn, level = _inputs((3, 5001), dtype, seed=8)
    level = torch.full_like(level, 0.7)
    got = F.sde_step(x, v, t, tn, level, seed=99, seed_offset=2**32 - 7, backend="triton", return_mean=True)
    noise = kernels.philox_noise(99, 2**32 - 7, 3, 5001, DEVICE)
    want = (got.mean + ref.per_row(got.std, x) * noise).to(dtype)
    assert torch.equal(got.prev_sample, want)


# counters whose first or second Box-Muller u1 (seed 7) lies within 2^-22 of 1, where lg2.approx's
# absolute error can exceed log2(u1) itself (found by scanning the reference's uniforms)
NEAR_ONE_COUNTERS = [2313274, 3196445, 6067294, 8263248, 10165086, 12763568, 15070595, 15612715]


def test_philox_noise_is_finite_where_u1_is_next_to_one():
    pytest.importorskip("triton")
    from sfgrpo.kernels import sde_step as kernels

    u = ref.philox_uniform4(7, torch.tensor(NEAR_ONE_COUNTERS))
    assert (torch.maximum(u[:, 0], u[:, 2]) >= 1 - 2.0**-22).all()
    for counter in NEAR_ONE_COUNTERS:
        got = kernels.philox_noise(7, counter, 1, 4, DEVICE).cpu()[0]
        want = ref.philox_normal4(7, torch.tensor([counter]))[0]
        assert torch.isfinite(got).all(), (counter, got)
        u1 = ref.philox_uniform4(7, torch.tensor([counter]))[0, [0, 0, 2, 2]]
        assert ((got.double() - want.double()).abs() <= _philox_error_bound(u1)).all(), (counter, got, want)


def test_philox_noise_is_standard_normal():
    # 2^20 draws of the oracle the kernels match (counters past 2^32: the high word in use): moments,
    # tails, a Kolmogorov-Smirnov test, and the shifted-angle formula is the textbook Box-Muller
    rows, elements, offset = 8, 1 << 17, 2**32 + 12345
    noise = ref.philox_step_noise(5, offset, rows, elements).double().reshape(-1)
    n = noise.numel()
    centred = noise - noise.mean()
    var = (centred ** 2).mean()
    assert abs(noise.mean().item()) < 5 / math.sqrt(n)  # sd of the mean 1/sqrt(n): a 5-sigma band
    assert abs(var.item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(((centred ** 3).mean() / var ** 1.5).item()) < 5 * math.sqrt(6 / n)
    assert abs(((centred ** 4).mean() / var ** 2).item() - 3) < 5 * math.sqrt(24 / n)
    for cut in (2.0, 3.0, 4.0):
        expected = n * math.erfc(cut / math.sqrt(2))
        observed = (noise.abs() > cut).sum().item()
        assert abs(observed - expected) < 5 * math.sqrt(expected) + 1, (cut, observed, expected)
    assert noise.abs().max().item() <= math.sqrt(-2 * math.log(1e-7)) + 1e-5  # u1 >= 1e-7
    ordered = noise.sort().values
    cdf = torch.special.ndtr(ordered)
    steps = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(steps - cdf, cdf - (steps - 1 / n)).max().item()
    assert ks < 1.63 / math.sqrt(n), ks  # the 1 % critical value
    quads = elements // 4
    counters = offset + torch.arange(rows)[:, None] * quads + torch.arange(quads)[None, :]
    u = ref.philox_uniform4(5, counters).double().reshape(-1, 4)
    radius = torch.sqrt(-2 * torch.log(u[:, [0, 2]].clamp_min(1e-7)))
    angle = 2 * math.pi * u[:, [1, 3]]
    textbook = torch.stack([radius[:, 0] * torch.cos(angle[:, 0]), radius[:, 0] * torch.sin(angle[:, 0]),
                            radius[:, 1] * torch.cos(angle[:, 1]), radius[:, 1] * torch.sin(angle[:, 1])], dim=-1)
    torch.testing.assert_close(noise, textbook.reshape(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("accel", ACCELS)
def test_generator_noise_is_diffusers_compatible(accel):
    x, v, _, t, tn, level = _inputs((2, 4, 8, 8), torch.float32)
    got = F.sde_step(x, v, t, tn, level, generator=torch.Generator(device=DEVICE).manual_seed(21), backend=accel,
                     return_mean=True)
    eps = torch.randn(x.shape, generator=torch.Generator(device=DEVICE).manual_seed(21), device=DEVICE, dtype=torch.float32)
    _close(got.prev_sample, got.mean + ref.per_row(got.std, x) * eps, 1e-6, 1e-6, "generator sample")


GRAD_CASES = [
    ("sde", "gaussian", "mean", "exact"), ("sde", "gaussian", "sum", "flow_grpo"), ("cps", "flow_grpo", "mean", "exact"),
    ("cps", "gaussian", "mean", "exact"), ("ddim", "gaussian", "sum", "exact"), ("ode", "gaussian", "mean", "exact"),
]


@pytest.mark.parametrize("sde_type, logprob, reduction, kl", GRAD_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 2, 5, 7), (2, 70_000)])
def test_gradients_match_autograd_through_the_reference(sde_type, logprob, reduction, kl, backend, shape):
    x, v, v_ref, t, tn, level = _inputs(shape, torch.float32, seed=3)
    sample = (x + 0.3 * torch.randn_like(x)).detach()
    weights = [torch.randn(shape[0], device=DEVICE) for _ in range(2)] + [torch.randn(shape, device=DEVICE) for _ in range(3)]

    def run(step, **extra):
        xs, vs, vr = (a.detach().clone().requires_grad_() for a in (x, v, v_ref))
        out = step(xs, vs, t, tn, level, sde_type=sde_type, prev_sample=sample, v_ref=vr, logprob=logprob,
                   reduction=reduction, kl=kl, **extra)
        loss = ((out.log_prob * weights[0]).sum() + (out.kl * weights[1]).sum() + (out.mean * weights[2]).sum()
                + (out.x0_hat * weights[3]).sum() + (out.x1_hat * weights[4]).sum())
        loss.backward()
        return xs.grad, vs.grad, vr.grad

    got = run(F.sde_step, backend=backend, return_mean=True, return_x0_hat=True, return_x1_hat=True)
    want = run(ref.sde_step)
    scale = 1.0 if reduction == "mean" else 1.0 / math.prod(shape[1:])
    for name, a, b in zip(("dx", "dv", "dv_ref"), got, want):
        _close(a * scale, b * scale, 1e-5, 1e-4, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_flows_only_through_requested_outputs(backend):
    x, v, _, t, tn, level = _inputs((2, 3, 4, 4), torch.bfloat16)
    v = v.detach().requires_grad_()
    out = F.sde_step(x, v, t, tn, level, prev_sample=torch.randn_like(x), backend=backend)
    out.log_prob.sum().backward()
    assert v.grad is not None and v.grad.dtype == torch.bfloat16 and torch.isfinite(v.grad.float()).all()
    oracle_v = v.detach().clone().requires_grad_()
    ref.sde_step(x, oracle_v, t, tn, level, prev_sample=out.prev_sample).log_prob.sum().backward()
    _close(v.grad, oracle_v.grad, 1e-2, 1e-2, "bf16 dv")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["expanded", "strided"])
def test_per_row_gradients_are_read_through_their_strides(backend, layout):
    """`log_prob.sum()` hands the backward an expanded scalar (stride 0); a column of a stacked
    `[B, 2]` gradient has stride 2. The kernels read both in place (no copy) and must get the
    rows right."""
    x, v, v_ref, t, tn, level = _inputs((4, 3, 50), torch.float32, seed=5)
    sample = (x + 0.3 * torch.randn_like(x)).detach()
    weights = torch.randn(4, 2, device=DEVICE)

    def run(step, **extra):
        vg, vr = v.detach().clone().requires_grad_(), v_ref.detach().clone().requires_grad_()
        out = step(x, vg, t, tn, level, prev_sample=sample, v_ref=vr, **extra)
        if layout == "expanded":
            loss = out.log_prob.sum() + 0.5 * out.kl.sum()
        else:
            loss = (torch.stack([out.log_prob, out.kl], dim=1) * weights).sum()
        loss.backward()
        return vg.grad, vr.grad

    for name, a, b in zip(("dv", "dv_ref"), run(F.sde_step, backend=backend), run(ref.sde_step)):
        _close(a, b, 1e-6, 1e-5, name)


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the ATen ops around the interpreted kernels")
def test_backward_runs_its_kernel_and_nothing_else():
    """The Triton backward of a scoring step launches one kernel: no zero gradients materialised
    for the outputs the loss does not use (std, std_dev_t), no copy of the expanded per-row
    gradients. On a GPU each of those was a kernel of its own in every backward."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    from sfgrpo.kernels import sde_step as kernels

    ops = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    launch = kernels._BWD_LAUNCHER.launch_keyed

    def launch_unrecorded(*args, **kwargs):  # the interpreter's own tensor traffic is not the GPU's
        with _disable_current_modes():
            ops.append("TRITON")
            launch(*args, **kwargs)

    x, v, v_ref, t, tn, level = _inputs((3, 2, 40), torch.float32)
    v = v.requires_grad_()
    out = F.sde_step(x, v, t, tn, level, prev_sample=torch.randn_like(x), v_ref=v_ref, backend="triton")
    loss = out.log_prob.sum() + out.kl.sum()
    kernels._BWD_LAUNCHER.launch_keyed = launch_unrecorded
    try:
        with Recorder():
            loss.backward()
    finally:
        del kernels._BWD_LAUNCHER.launch_keyed
    kernel_ops = [op for op in ops if op not in ("empty", "empty_like", "expand", "view", "detach", "ones_like")]
    assert kernel_ops == ["TRITON"], ops


def _op_args(x, v, v_ref, t, tn, level, *, prev_sample=None, noise=None, write=True, backend=None, sde_type="sde"):
    rows = lambda a: a.reshape(a.shape[0], -1).contiguous()  # noqa: E731
    return (rows(x), rows(v), t, tn, level, tn.clone(), None if prev_sample is None else rows(prev_sample),
            None if noise is None else rows(noise), None if v_ref is None else rows(v_ref), 0, 0, False,
            sde_type, "gaussian", "mean", "exact", write, write, write, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["score", "sample"])
def test_opcheck(backend, mode):
    x, v, v_ref, t, tn, level = _inputs((3, 2, 4, 4), torch.float32)
    v = v.requires_grad_()
    extra = dict(prev_sample=torch.randn_like(x)) if mode == "score" else dict(noise=torch.randn_like(x))
    args = _op_args(x, v, v_ref.requires_grad_(), t, tn, level, backend=backend, **extra)
    torch.library.opcheck(sde_step_op, args)


def test_torch_compile_fullgraph_has_no_graph_break():
    x, v, v_ref, t, tn, level = _inputs((2, 3, 4, 4), torch.float32)

    def loss_fn(x, v, sample, t, tn, level):
        out = F.sde_step(x, v, t, tn, level, prev_sample=sample, return_x0_hat=True)
        return out.log_prob.sum() + out.x0_hat.square().mean()

    sample = torch.randn_like(x)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    v1 = v.detach().clone().requires_grad_()
    v2 = v.detach().clone().requires_grad_()
    compiled(x, v1, sample, t, tn, level).backward()
    loss_fn(x, v2, sample, t, tn, level).backward()
    torch.testing.assert_close(v1.grad, v2.grad)
    # and inductor compiles it too (the op is opaque to it)
    out = torch.compile(loss_fn, fullgraph=True)(x, v, sample, t, tn, level)
    torch.testing.assert_close(out, loss_fn(x, v, sample, t, tn, level))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_torch_compile_fullgraph_with_python_number_step_values(device):
    """Step values as Python numbers (what the trainer passes) trace without a graph break, and the
    compiled backward without a KL (unused gradient slots) runs -- on CUDA the op's scalar step
    values are CPU tensors, which must never reach a kernel's pointer argument."""
    x, v, _, _, _, _ = _inputs((2, 3, 4, 4), torch.float32)
    x, v = x.to(device), v.to(device)
    sample = torch.randn_like(x)

    def loss_fn(x, v, sample):
        out = F.sde_step(x, v, 0.7, 0.55, 0.7, prev_sample=sample, sigma_max=0.95)
        return out.log_prob.sum()

    v1 = v.detach().clone().requires_grad_()
    v2 = v.detach().clone().requires_grad_()
    torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x, v1, sample).backward()
    loss_fn(x, v2, sample).backward()
    torch.testing.assert_close(v1.grad, v2.grad)


@pytest.mark.parametrize("accel", ACCELS)
def test_non_contiguous_inputs_equal_contiguous(accel):
    x, v, _, t, tn, level = _inputs((3, 4, 6, 5), torch.float32)
    xt, vt = x.transpose(2, 3).contiguous().transpose(2, 3), v.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert not xt.is_contiguous() or not vt.is_contiguous()
    noise = torch.randn_like(x)
    a = F.sde_step(xt, vt, t, tn, level, noise=noise, backend=accel, return_x0_hat=True)
    b = F.sde_step(x, v, t, tn, level, noise=noise, backend=accel, return_x0_hat=True)
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.log_prob, b.log_prob)
    assert torch.equal(a.x0_hat, b.x0_hat)


def test_triton_path_reads_latents_of_any_rank_in_place(monkeypatch):
    """Eager Triton calls hand contiguous 4-D latents to the kernels as they are (no [B, D] view)
    and get outputs shaped like x; forward values and gradients equal those of the flattened call."""
    from sfgrpo.ops import sde_step as ops

    x, v, sample, t, tn, level = _inputs((3, 4, 6, 5), torch.float32)
    seen = []
    original = ops._flattened
    monkeypatch.setattr(ops, "_flattened", lambda inputs: seen.append(inputs[0].shape) or original(inputs))
    results = []
    for latents in ((x, v, sample), tuple(t.reshape(3, -1) for t in (x, v, sample))):
        vg = latents[1].detach().clone().requires_grad_()
        out = F.sde_step(latents[0], vg, t, tn, level, prev_sample=latents[2], return_mean=True,
                         return_x0_hat=True, backend="triton")
        assert out.mean.shape == latents[0].shape and out.x0_hat.shape == latents[0].shape
        (out.log_prob.sum() + out.x0_hat.square().mean()).backward()
        results.append((out.log_prob, out.mean.reshape(3, -1), out.x0_hat.reshape(3, -1), vg.grad.reshape(3, -1)))
    assert seen == []  # neither call was flattened
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.zeros(0, 4, 8, 8, device=DEVICE)
    out = F.sde_step(x, x, torch.zeros(0, device=DEVICE), torch.zeros(0, device=DEVICE), 0.7, seed=1,
                     return_x0_hat=True, backend=backend)
    assert out.prev_sample.shape == x.shape and out.log_prob.shape == (0,) and out.x0_hat.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_without_a_noise_source(backend):
    # ode needs no noise; the stochastic steps draw from torch's global RNG (diffusers' rule)
    x, v = torch.randn(3, 2, 4, device=DEVICE), torch.randn(3, 2, 4, device=DEVICE)
    out = F.sde_step(x, v, 0.6, 0.4, 0.0, sde_type="ode", backend=backend)
    torch.testing.assert_close(out.prev_sample, x - 0.2 * v, rtol=1e-6, atol=1e-6)
    torch.manual_seed(5)
    drawn = F.sde_step(x, v, 0.6, 0.4, 0.7, backend=backend)
    torch.manual_seed(5)
    expected = F.sde_step(x, v, 0.6, 0.4, 0.7, noise=torch.randn(x.shape, device=DEVICE), backend=backend)
    assert torch.equal(drawn.prev_sample, expected.prev_sample)


def test_bad_inputs_give_clear_errors():
    x, v, v_ref, t, tn, level = _inputs((3, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="shape of x"):
        F.sde_step(x, v[:, :2], t, tn, level)
    with pytest.raises(TypeError, match="float32, bfloat16"):
        F.sde_step(x, v.to(torch.int32), t, tn, level)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        F.sde_step(x, v, t[:2], tn, level)
    with pytest.raises(ValueError, match="at most one"):
        F.sde_step(x, v, t, tn, level, seed=1, noise=torch.randn_like(x))
    with pytest.raises(ValueError, match="sde_type"):
        F.sde_step(x, v, t, tn, level, sde_type="heun")
    with pytest.raises(ValueError, match="no elements"):
        F.sde_step(torch.zeros(2, 0), torch.zeros(2, 0), 0.5, 0.4)
    with pytest.raises(ValueError, match="not one of"):
        F.sde_step(x, v, t, tn, level, backend="cuda")
    with pytest.raises(ValueError, match="shape of x"):
        F.sde_step(x, v, t, tn, level, prev_sample=x[:, :2])


@pytest.mark.parametrize("values, message", [
    ((0.5, 0.7, 0.7), r"t_next must be in \[0, t\]"),  # stepping backwards: sqrt of a negative
    ((0.0, 0.0, 0.7), r"t must be in \(0, 1\]"),  # sde divides by t
    ((1.2, 0.5, 0.7), r"t must be in \(0, 1\]"),
    ((0.5, -0.1, 0.7), r"t_next must be in \[0, t\]"),
    ((0.5, 0.4, -0.1), "noise_level must be a finite number"),
    ((0.5, 0.4, float("nan")), "noise_level must be a finite number"),
    ((float("nan"), 0.4, 0.7), r"t must be in \(0, 1\]"),
    ((1.0, 1.0, 0.7), r"sigma_max < 1: it defaults to t_next = 1.0"),  # sde divides by 1 - sigma_max
])
def test_step_numbers_out_of_range_are_clear_errors_not_nans(values, message):
    x, v, *_ = _inputs((3, 4, 4), torch.float32)
    t, tn, level = values
    with pytest.raises(ValueError, match=message):
        F.sde_step(x, v, t, tn, level, seed=1)
    with pytest.raises(ValueError, match="sigma_max must be in"):
        F.sde_step(x, v, 1.0, 0.9, 0.7, sigma_max=1.0, seed=1)
    # in range, including the edges, they run: first step t = 1, last step t' = 0, no noise
    for ok in ((1.0, 0.9, 0.7), (0.3, 0.0, 0.7), (0.5, 0.5, 0.0)):
        assert torch.isfinite(F.sde_step(x, v, *ok, seed=1).prev_sample).all()
    # a step that ends at t' = 1 runs with an explicit sigma_max, and with the other SDE types
    assert torch.isfinite(F.sde_step(x, v, 1.0, 1.0, 0.7, sigma_max=0.9, seed=1).std).all()
    assert torch.isfinite(F.sde_step(x, v, 1.0, 1.0, 0.7, sde_type="cps", seed=1).std).all()
    # a number next to a tensor is checked alone; tensors are the caller's to keep in range
    with pytest.raises(ValueError, match="t_next must be in"):
        F.sde_step(x, v, torch.full((3,), 0.5), 1.5, 0.7, seed=1)


def test_noise_levels_outside_the_samplers_range_are_clear_errors():
    # cps: std = t' sin(a pi / 2) turns negative past a = 2 (the sample took -std, the log-prob said
    # "no density": a step trained on nothing) and vanishes at 2 (log-probs of a collapsed Gaussian)
    x, v, *_ = _inputs((3, 4, 4), torch.float32)
    for level in (1.5, 2.0, 3.0):
        with pytest.raises(ValueError, match=r"noise_level must be in \[0, 1\] for cps"):
            F.sde_step(x, v, 0.6, 0.3, level, sde_type="cps", seed=1)
    assert (F.sde_step(x, v, 0.6, 0.3, 1.0, sde_type="cps", seed=1).std > 0).all()
    # ddim: std = a t' sqrt(1 - t) above t' (the mean's sqrt(t'^2 - std^2) clamped to 0: another sampler)
    with pytest.raises(ValueError, match=r"too large for ddim at t = 0.6.*a must be <= 1.58114"):
        F.sde_step(x, v, 0.6, 0.3, 1.6, sde_type="ddim", seed=1)
    out = F.sde_step(x, v, 0.6, 0.3, 1.58, sde_type="ddim", seed=1)
    assert (out.std <= 0.3).all() and (out.std > 0.29).all()
    assert (F.sde_step(x, v, 1.0, 0.9, 50.0, sde_type="ddim", seed=1).std == 0).all()  # t = 1: no noise at any level


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", ["tensors", "floats"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_cuda_training_step_has_no_host_sync(rows, backend):
    x, v, v_ref, t, tn, level = _inputs((8, 16, 32, 32), torch.bfloat16)
    if rows == "floats":  # the trainer's case: one schedule value for every row
        t, tn, level = 0.8, 0.6, 0.7
    v = v.detach().requires_grad_()
    sample = F.sde_step(x, v.detach(), t, tn, level, seed=0, backend=backend).prev_sample
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        drawn = F.sde_step(x, v.detach(), t, tn, level, seed=1, return_x0_hat=True, backend=backend)
        out = F.sde_step(x, v, t, tn, level, prev_sample=sample, v_ref=v_ref, backend=backend)
        (out.log_prob.sum() + 0.01 * out.kl.sum()).backward()
        del drawn
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("numbers", [False, True], ids=["row-tensors", "python-numbers"])
def test_eager_fast_path_equals_the_registered_op(backend, numbers):
    """The eager path (numbers as they are, None for what was not asked for, no autograd node when
    nothing needs a gradient) gives the registered op's bits, forward and backward."""
    from sfgrpo.ops.sde_step import sde_step as eager_step

    x, v, v_ref, t, tn, level = _inputs((3, 2, 4, 4), torch.float32)
    if numbers:
        t, tn, level = (torch.tensor(value, dtype=torch.float32) for value in (0.8, 0.55, 0.7))
    sample = torch.randn_like(x)
    results = []
    for call in (eager_step, sde_step_op):
        vg, vrg = v.detach().clone().requires_grad_(), v_ref.detach().clone().requires_grad_()
        args = _op_args(x, vg, vrg, t, tn, level, prev_sample=sample, backend=backend)
        if numbers and call is eager_step:
            args = args[:2] + tuple(float(a) for a in args[2:6]) + args[6:]
        out = call(*args)
        (out[1].sum() + out[7].sum() + out[5].square().sum()).backward()
        results.append([o.detach() if o is not None else None for o in out] + [vg.grad, vrg.grad])
        with torch.no_grad():
            detached = call(*args)
        assert all(o is None or o.grad_fn is None for o in detached)
        assert all(torch.equal(a, b) for a, b in zip(detached, out) if a is not None and b is not None)
    eager, registered = results
    assert eager[0] is None and registered[0].numel() == 0  # scoring returns no sample
    for a, b in zip(eager[1:], registered[1:]):
        assert torch.equal(a, b)


def test_eager_step_leaves_out_what_was_not_asked_for():
    from sfgrpo.ops.sde_step import sde_step as eager_step

    x, v, _, t, tn, level = _inputs((2, 3, 5), torch.float32)
    args = _op_args(x, v, None, t, tn, level, noise=torch.randn_like(x), write=False)
    sample, log_prob, std, std_dev_t, mean, x0, x1, kl = eager_step(*args)
    assert sample.shape == (2, 15) and log_prob.shape == std.shape == std_dev_t.shape == (2,)
    assert mean is None and x0 is None and x1 is None and kl is None


def test_split_rows_reuse_one_scratch_per_stream_and_leave_the_tickets_at_zero():
    """Rows spanning several programs sum partials through per-(device, stream) scratch that every
    launch reuses (sfgrpo.scratch): the kernel's last program of each row resets its ticket
    counter, so the next launch (another batch size, another mode) finds zeros; growing keeps the
    results exact."""
    from sfgrpo import scratch

    def tickets():
        (key, (held, _)), = [(k, t) for k, t in scratch._HELD.items() if k[0] == "sde_step.tickets"]
        return held

    scratch.release()
    x, v, v_ref, t, tn, level = _inputs((3, 300_000), torch.bfloat16, seed=8)
    first = F.sde_step(x, v, t, tn, level, seed=5, backend="triton")
    held = tickets()
    assert int(held.abs().sum()) == 0
    again = F.sde_step(x, v, t, tn, level, seed=5, backend="triton")
    assert tickets().data_ptr() == held.data_ptr()  # reused
    assert torch.equal(again.log_prob, first.log_prob) and torch.equal(again.prev_sample, first.prev_sample)
    # more rows and the KL's second set of partials: the scratch grows, the counters start at zero
    x5, v5, vr5, t5, tn5, level5 = _inputs((5, 300_000), torch.bfloat16, seed=9)
    scored = F.sde_step(x5, v5, t5, tn5, level5, prev_sample=x5, v_ref=vr5, backend="triton")
    oracle = ref.sde_step(x5, v5, t5, tn5, level5, prev_sample=x5, v_ref=vr5)
    _close(scored.log_prob, oracle.log_prob, 2e-6, 2e-6, "log_prob after growing")
    _close(scored.kl, oracle.kl, 2e-6, 2e-6, "kl after growing")
    assert tickets().numel() >= 5 and int(tickets().abs().sum()) == 0
    back = F.sde_step(x, v, t, tn, level, prev_sample=first.prev_sample, backend="triton")
    assert torch.equal(back.log_prob, first.log_prob)  # on-policy after the scratch grew


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_of_split_rows_interleaves_with_eager_steps(monkeypatch):
    # rows of 300k elements span several programs and sum through scratch. The capture runs on a
    # stream whose eager steps already hold scratch: it must get buffers of its own (a graph may
    # replay next to eager launches that reuse the held ones), and replays between eager steps on
    # that stream stay exact
    from sfgrpo import scratch
    from sfgrpo.kernels import sde_step as kernels

    x, v, _, t, tn, level = _inputs((3, 300_000), torch.bfloat16, seed=7)
    noise = torch.randn(x.shape, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        expected = F.sde_step(x, v, t, tn, level, noise=noise)
    torch.cuda.synchronize()
    side_key = (x.device.index, side.cuda_stream)
    held = {key: buffer.data_ptr() for key, (buffer, _) in scratch._HELD.items() if key[-1] == side_key}
    assert len(held) == 2  # the side stream's partials and tickets
    handed_out = []

    def recording(*args, **kwargs):
        buffer = scratch.stream_scratch(*args, **kwargs)
        handed_out.append(buffer.data_ptr())
        return buffer

    monkeypatch.setattr(kernels, "stream_scratch", recording)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        captured = F.sde_step(x, v, t, tn, level, noise=noise)
    assert len(handed_out) == 2 and not set(handed_out) & set(held.values())
    monkeypatch.undo()
    with torch.cuda.stream(side):
        for _ in range(3):
            graph.replay()
            eager = F.sde_step(x, v, t, tn, level, noise=noise)
            assert torch.equal(eager.log_prob, expected.log_prob)
    torch.cuda.synchronize()
    assert {key: buffer.data_ptr() for key, (buffer, _) in scratch._HELD.items() if key in held} == held
    assert torch.equal(captured.log_prob, expected.log_prob)
    assert torch.equal(captured.prev_sample, expected.prev_sample)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_replays_the_step():
    # per-row t / t' / noise level live in device tensors, so a captured step replays with new values
    x, v, _, t, tn, level = _inputs((4, 4, 16, 16), torch.bfloat16)
    noise = torch.randn(x.shape, device=DEVICE)
    F.sde_step(x, v, t, tn, level, noise=noise)  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = F.sde_step(x, v, t, tn, level, noise=noise, return_x0_hat=True)
    t.copy_(torch.full_like(t, 0.6))
    tn.copy_(torch.full_like(tn, 0.3))
    graph.replay()
    expected = F.sde_step(x, v, t, tn, level, noise=noise, return_x0_hat=True)
    assert torch.equal(captured.prev_sample, expected.prev_sample)
    assert torch.equal(captured.log_prob, expected.log_prob) and torch.equal(captured.x0_hat, expected.x0_hat)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compat_step_has_no_host_sync():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sfgrpo.compat import flow_grpo as compat

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10, device=DEVICE)
    x, v = torch.randn(4, 16, 32, 32, device=DEVICE), torch.randn(4, 16, 32, 32, device=DEVICE)
    ts = scheduler.timesteps[3].expand(4)
    sample = compat.sde_step_with_logprob(scheduler, v, ts, x)[0]  # builds the schedule table
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        vg = v.clone().requires_grad_()
        compat.sde_step_with_logprob(scheduler, vg, ts, x, prev_sample=sample)[1].sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2_hints_change_no_value(monkeypatch, dtype):
    # kernels.sde_step.L2_HINTS (evict_last in a scoring forward that autograd will differentiate,
    # evict_first in its backward) moves data between cache levels only: the same bits, with the
    # split rows' partials (60k-element rows) and the KL; on the GPU this runs the hinted kernels
    from sfgrpo.kernels import sde_step as kernels

    x, v, v_ref, t, tn, level = _inputs((3, 60_000), dtype, seed=13)
    sample = F.sde_step(x, v, t, tn, level, seed=3, backend="triton").prev_sample
    results = []
    for hints in (False, True):
        monkeypatch.setattr(kernels, "L2_HINTS", hints)
        vg = v.clone().requires_grad_()
        out = F.sde_step(x, vg, t, tn, level, prev_sample=sample, v_ref=v_ref, backend="triton")
        (out.log_prob.sum() + 0.5 * out.kl.sum()).backward()
        results.append((out.log_prob, out.kl, vg.grad))
    for plain, hinted in zip(*results):
        assert torch.equal(plain, hinted)
