"""Direct launch of compiled Triton kernels (sfgrpo.kernels._launch): the specialisation key, the
cache of compiled kernels, the fallbacks; on a GPU, direct launches give the JIT launch's bits."""

import importlib.util

import pytest
import torch

from sfgrpo import backend

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
if importlib.util.find_spec("triton") is not None:
    # imported now, under the session's TRITON_INTERPRET (conftest): importing it inside a test, under
    # the `launch` fixture's TRITON_INTERPRET=0, would make JIT functions of the kernels for the rest
    # of the session, which cannot run without a GPU
    from sfgrpo.kernels import sde_step as sde_kernels


class _Param:
    def __init__(self, is_constexpr):
        self.is_constexpr = is_constexpr


class FakeCompiled:
    function = object()

    def __init__(self, log, fail=False):
        self.log, self.fail = log, fail

    def __getitem__(self, grid):
        def runner(*args, stream=None):
            if self.fail:
                raise TypeError("launcher takes 3 arguments")
            self.log.append(("direct", grid, args, stream))
        return runner


class FakeKernel:
    """Stands for a JITFunction: `kernel[grid](*args, **options)` records a JIT launch."""

    arg_names = ["x_ptr", "n", "BLOCK"]
    params = [_Param(False), _Param(False), _Param(True)]

    def __init__(self, fail=False):
        self.log, self.fail = [], fail

    def __getitem__(self, grid):
        def run(*args, **options):
            self.log.append(("jit", grid, args, options))
            return FakeCompiled(self.log, self.fail)
        return run


@pytest.fixture
def launch(monkeypatch):
    from sfgrpo.kernels import _launch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(_launch.ENV_VAR, raising=False)
    monkeypatch.setattr(_launch, "_disabled_reason", None)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 1234, raising=False)
    monkeypatch.setattr(backend, "current_cuda_device", lambda: None)  # the fake tensors' (CPU) device index
    return _launch


def test_second_launch_of_a_specialisation_skips_the_jit(launch):
    kernel = FakeKernel()
    launcher = launch.DirectLauncher(kernel)
    x = torch.zeros(64)
    launcher((4,), x, 32, 128, num_warps=4)
    launcher.with_constexprs((4,), (x, 48), {"BLOCK": 128}, num_warps=4)  # same key: 48 % 16 == 0
    assert [entry[0] for entry in kernel.log] == ["jit", "direct"]
    _, grid, args, stream = kernel.log[1]
    assert grid == (4, 1, 1) and args == (x, 48, 128) and stream == 1234


@pytest.mark.parametrize("change", ["int_not_divisible", "int_one", "int64", "misaligned", "dtype", "constexpr", "options"])
def test_anything_triton_specialises_on_gets_its_own_kernel(launch, change):
    kernel = FakeKernel()
    launcher = launch.DirectLauncher(kernel)
    x = torch.zeros(64)
    launcher((1,), x, 32, 128, num_warps=4)
    args, options = [x, 32, 128], dict(num_warps=4)
    if change == "int_not_divisible":
        args[1] = 33
    elif change == "int_one":
        args[1] = 1
    elif change == "int64":
        args[1] = 2**40
    elif change == "misaligned":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        args[0] = x.double()
    elif change == "constexpr":
        args[2] = 256
    else:
        options = dict(num_warps=8)
    launcher((1,), *args, **options)
    assert [entry[0] for entry in kernel.log] == ["jit", "jit"]


def test_which_pointer_is_misaligned_is_part_of_the_key(launch):
    """All pointers aligned: one key form; a misaligned one: the per-argument form, which tells the
    two pointers apart (Triton specialises each pointer on its own alignment)."""
    kernel = FakeKernel()
    kernel.arg_names = ["x_ptr", "y_ptr", "n", "BLOCK"]
    kernel.params = [_Param(False), _Param(False), _Param(False), _Param(True)]
    launcher = launch.DirectLauncher(kernel)
    x = torch.zeros(64)
    for first, second in ((x, x), (x[1:], x), (x, x[1:]), (x[1:], x), (x, x[4:]), (x[4:], x[4:])):
        launcher((1,), first, second, 32, 128)
    # x[4:] is 16 bytes past x: aligned like x
    assert [entry[0] for entry in kernel.log] == ["jit", "jit", "jit", "direct", "direct", "direct"]


def test_integer_keys_are_memoised_up_to_a_bound(launch, monkeypatch):
    monkeypatch.setattr(launch, "_INT_KEYS", {})
    monkeypatch.setattr(launch, "_INT_KEYS_MAX", 3)
    kernel = FakeKernel()
    launcher = launch.DirectLauncher(kernel)
    x = torch.zeros(64)
    for n in (32, 48, 33, 1, 2**40, 31):
        launcher((1,), x, n, 128)
    assert launch._INT_KEYS == {32: launch._runtime_key(32), 48: launch._runtime_key(48), 33: launch._runtime_key(33)}
    # 32 and 48 share a kernel; 33, 1, 2**40 are three more; 31 is keyed like 33 (past the memo bound)
    assert [entry[0] for entry in kernel.log] == ["jit", "direct", "jit", "jit", "jit", "direct"]


def test_constexprs_between_runtime_arguments_are_keyed_by_value(launch):
    # sfgrpo's kernels declare their constexprs last (keyed as one slice); any order works
    kernel = FakeKernel()
    kernel.arg_names = ["x_ptr", "BLOCK", "n"]
    kernel.params = [_Param(False), _Param(True), _Param(False)]
    launcher = launch.DirectLauncher(kernel)
    x = torch.zeros(64)
    for block, n in ((128, 32), (128, 48), (256, 48), (256, 33)):
        launcher((1,), x, block, n)
    # 48 and 32 specialise alike (both % 16 == 0); a new BLOCK or an n not divisible by 16 does not
    assert [entry[0] for entry in kernel.log] == ["jit", "direct", "jit", "jit"]


def test_a_runner_that_rejects_the_call_turns_direct_launch_off(launch):
    kernel = FakeKernel(fail=True)
    launcher = launch.DirectLauncher(kernel)
    x = torch.zeros(64)
    launcher((1,), x, 32, 128)
    with pytest.warns(RuntimeWarning, match="launching Triton kernels directly failed"):
        launcher((1,), x, 32, 128)
    launcher((1,), x, 32, 128)
    assert [entry[0] for entry in kernel.log] == ["jit", "jit", "jit"] and not launch.enabled()


@pytest.mark.parametrize("env", [{"SFGRPO_TRITON_DIRECT_LAUNCH": "0"}, {"TRITON_INTERPRET": "1"}])
def test_switched_off_by_environment(launch, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    kernel = FakeKernel()
    launcher = launch.DirectLauncher(kernel)
    x = torch.zeros(64)
    for _ in range(3):
        launcher((1,), x, 32, 128)
    assert [entry[0] for entry in kernel.log] == ["jit"] * 3


def test_keyed_launch_reuses_the_kernel_its_key_was_tied_to(launch, monkeypatch):
    """launch_keyed: the first launch with a caller key computes the full key (and compiles); later
    launches with that caller key go straight to the compiled kernel, the full key not computed;
    a None caller key always computes it."""
    kernel = FakeKernel()
    launcher = launch.DirectLauncher(kernel)
    full_keys = []
    monkeypatch.setattr(launcher, "_key", lambda args, key=launcher._key: full_keys.append(args) or key(args))
    x, y = torch.zeros(64), torch.ones(64)
    launcher.launch_keyed((2,), ("float32", 32), (x, 32, 128), num_warps=4)
    launcher.launch_keyed((3,), ("float32", 32), (y, 32, 128), num_warps=4)
    assert [entry[0] for entry in kernel.log] == ["jit", "direct"] and len(full_keys) == 1
    assert kernel.log[1][1] == (3, 1, 1) and kernel.log[1][2][0] is y
    launcher.launch_keyed((1,), None, (x[1:], 32, 128), num_warps=4)  # misaligned: the caller gives no key
    launcher.launch_keyed((1,), ("float32", 48), (x, 48, 128), num_warps=4)  # new caller key, known kernel
    assert [entry[0] for entry in kernel.log] == ["jit", "direct", "jit", "direct"] and len(full_keys) == 3
    assert launcher.by_caller_key.keys() == {(("float32", 32), None), (("float32", 48), None)}


def test_with_constexprs_keys_launches_by_value(launch, monkeypatch):
    """with_constexprs: the leading *_ptr arguments by dtype (when all are 16-byte aligned), every
    other argument, constexpr and option by value. A repeated call skips the full key; values
    Triton specialises alike share the compiled kernel; a misaligned or non-tensor pointer takes the
    full key every time; the table of value keys is bounded."""
    monkeypatch.setattr(launch, "_CALLER_KEYS_MAX", 3)
    kernel = FakeKernel()
    kernel.arg_names = ["x_ptr", "y_ptr", "n", "BLOCK"]
    kernel.params = [_Param(False), _Param(False), _Param(False), _Param(True)]
    launcher = launch.DirectLauncher(kernel)
    assert launcher._pointer_count == 2
    full_keys = []
    monkeypatch.setattr(launcher, "_key", lambda args, key=launcher._key: full_keys.append(args) or key(args))
    x, y = torch.zeros(64), torch.ones(64)
    launcher.with_constexprs((1,), (x, y, 32), {"BLOCK": 128}, num_warps=4)
    launcher.with_constexprs((2,), (y, x, 32), {"BLOCK": 128}, num_warps=4)  # same dtypes and values
    assert [entry[0] for entry in kernel.log] == ["jit", "direct"] and len(full_keys) == 1
    assert kernel.log[1][2] == (y, x, 32, 128)
    launcher.with_constexprs((1,), (x, y, 48), {"BLOCK": 128}, num_warps=4)  # new value, same kernel
    assert [entry[0] for entry in kernel.log][-1] == "direct" and len(full_keys) == 2
    for args in ((x[1:], y, 48), (x, y, 48)):  # misaligned: the full key; then the value key again
        launcher.with_constexprs((1,), args, {"BLOCK": 128}, num_warps=4)
    assert [entry[0] for entry in kernel.log][-2:] == ["jit", "direct"] and len(full_keys) == 3
    launcher.with_constexprs((1,), (x, y.double(), 48), {"BLOCK": 128}, num_warps=4)  # another dtype
    launcher.with_constexprs((1,), (x, y, 48), {"BLOCK": 256}, num_warps=4)  # another constexpr
    launcher.with_constexprs((1,), (x, y, 48), {"BLOCK": 128}, num_warps=8)  # other options
    assert [entry[0] for entry in kernel.log][-3:] == ["jit", "jit", "jit"]
    assert len(launcher.by_caller_key) <= 3  # cleared at the bound, refilled from the compiled kernels
    before = len(full_keys)
    launcher.with_constexprs((1,), (x, y, [48]), {"BLOCK": 128}, num_warps=4)  # unhashable: the full key
    assert len(full_keys) == before + 1


def _stand_in_sde_forward(launch, monkeypatch):
    """(fake kernel, its DirectLauncher) standing for the SDE-step forward on the eager path: the
    real kernel's parameters (constexprs from the annotations: the real kernel may be an
    interpreted function, which has no `params`), every launch recorded in the fake's log."""
    from sfgrpo.ops import sde_step as ops

    real = sde_kernels.sde_step_fwd_kernel
    kernel = FakeKernel()
    kernel.arg_names = list(real.arg_names)
    annotations = getattr(real, "fn", real).__annotations__
    kernel.params = [_Param("constexpr" in str(annotations.get(name, ""))) for name in kernel.arg_names]
    launcher = launch.DirectLauncher(kernel)
    monkeypatch.setattr(sde_kernels, "_FWD_LAUNCHER", launcher)
    monkeypatch.setattr(ops, "_implementation", lambda device, backend_name: sde_kernels)
    return kernel, launcher


def test_sde_step_caller_key_tells_dtypes_and_alignment_apart(launch, monkeypatch):
    """The SDE-step forward keys its launches by its constexprs, input dtypes, alignment and Philox
    integers: a bf16 call and an fp32 call tie different kernels; a misaligned latent gives no key."""
    from sfgrpo import functional as F

    kernels = sde_kernels
    kernel, launcher = _stand_in_sde_forward(launch, monkeypatch)
    assert launcher._runtime_count is not None  # the constexprs trail: the layout the forward keys on
    calls = []
    monkeypatch.setattr(launcher, "_launch", lambda grid, args, options, key=None, run=launcher._launch:
                        calls.append(key) or run(grid, args, options, key))
    x = torch.randn(4, 64)
    for dtype in (torch.float32, torch.float32, torch.bfloat16):
        F.sde_step(x.to(dtype), x.to(dtype), 0.8, 0.7, seed=3)
    assert calls[0] == calls[1] and calls[0] != calls[2] and None not in calls
    assert [entry[0] for entry in kernel.log] == ["jit", "direct", "jit"]
    wide = torch.randn(4 * 64 + 1)
    F.sde_step(wide[1:].view(4, 64), x, 0.8, 0.7, seed=3)  # 4 bytes past a 16-byte boundary
    assert calls[-1] is None and kernel.log[-1][0] == "jit"


def test_a_cpu_tensor_rejected_by_the_runner_leaves_direct_launch_on(launch):
    """Triton's launcher refuses memory the GPU cannot access with a ValueError: a caller's mistake,
    raised as it is, not taken for a runner that differs (which would switch direct launch off)."""

    class Refusing(FakeCompiled):
        def __getitem__(self, grid):
            def runner(*args, stream=None):
                raise ValueError("Pointer argument cannot be accessed from Triton (cpu tensor?)")
            return runner

    kernel = FakeKernel()
    launcher = launch.DirectLauncher(kernel)
    x = torch.zeros(64)
    launcher((1,), x, 32, 128)
    launcher.compiled = {key: Refusing(kernel.log) for key in launcher.compiled}
    with pytest.raises(ValueError, match="cannot be accessed"):
        launcher((1,), x, 32, 128)
    assert launch.enabled()


def test_sde_step_launch_plans_follow_the_module_switches(launch, monkeypatch):
    """The SDE step's constexprs come from cached plans: flipping a module-level switch (the Philox
    approximations, the L2 hints) gives a new plan, never a stale one; equal calls share one."""
    from sfgrpo import functional as F

    kernels = sde_kernels
    kernel, _ = _stand_in_sde_forward(launch, monkeypatch)
    monkeypatch.setattr(kernels, "_INTERPRETED", False)  # as on a GPU: the switches are live
    fast_math = kernel.arg_names.index("FAST_MATH")
    evict = kernel.arg_names.index("EVICT")
    x = torch.randn(4, 64)
    seen = []
    for switch in (True, True, False):
        monkeypatch.setattr(kernels, "PHILOX_FAST_MATH", switch)
        F.sde_step(x, x, 0.8, 0.7, seed=3)
        seen.append(kernel.log[-1][2][fast_math])
    assert seen == [True, True, False]
    sample = torch.randn(4, 64)
    v = x.clone().requires_grad_()
    for hints, expected in ((False, ""), (True, "evict_last")):
        monkeypatch.setattr(kernels, "L2_HINTS", hints)
        F.sde_step(x, v, 0.8, 0.7, prev_sample=sample)  # autograd will differentiate it: the hint's cue
        assert kernel.log[-1][2][evict] == expected


def test_wrong_argument_count_is_an_error(launch):
    with pytest.raises(TypeError, match="takes 3 arguments"):
        launch.DirectLauncher(FakeKernel())((1,), torch.zeros(4), 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7), (4, 16, 33, 17), (2, 300_000)])
def test_cuda_direct_launches_equal_jit_launches(monkeypatch, dtype, shape):
    from sfgrpo import functional as F
    from sfgrpo.kernels import _launch

    g = torch.Generator().manual_seed(0)
    base = torch.randn((shape[0], shape[1] * 2, *shape[2:]), generator=g).to(dtype).cuda()
    x = base[:, 1:shape[1] + 1]  # not 16-byte aligned, and not contiguous
    v = torch.randn(shape, generator=g).to(dtype).cuda()
    t = torch.full((shape[0],), 0.8, device="cuda")

    def run():
        vg = v.clone().requires_grad_()
        out = F.sde_step(x, vg, t, t * 0.7, 0.7, seed=5, return_x0_hat=True)
        scored = F.sde_step(x.contiguous(), vg, t, t * 0.7, 0.7, prev_sample=out.prev_sample, v_ref=v)
        (scored.log_prob.sum() + scored.kl.sum() + out.x0_hat.float().sum()).backward()
        return out.prev_sample, out.log_prob, scored.log_prob, scored.kl, vg.grad

    monkeypatch.setenv(_launch.ENV_VAR, "0")
    jit = run()
    monkeypatch.setenv(_launch.ENV_VAR, "1")
    run()  # compiles / caches
    direct = run()
    assert _launch.enabled()
    for a, b in zip(jit, direct):
        assert torch.equal(a, b)
