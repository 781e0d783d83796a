"""The launch stubs of sfgrpo's host-path benchmarks, written once for their pytest fixtures
(bench_triton_host_path.py, bench_advantages_host_path.py) and for host_instructions.py's callgrind
cases: with them a call runs all of sfgrpo's Python on CPU (or meta) tensors and launches nothing,
so what is measured is the host work a GPU call pays before its launch.

Each `stub_*` takes `patch(obj, name, value, must_exist=True)`: pytest's `monkeypatch.setattr`
(undone after the test) or a plain setattr for a process that only measures. `must_exist`: a stub
of an attribute that was renamed must fail, not sit unused while the real code runs; only
attributes that CPU builds of torch lack are added.
"""

from __future__ import annotations

from typing import Callable

import torch

Patch = Callable[..., None]


class InterpreterOn(RuntimeError):
    """The Triton kernels were imported under TRITON_INTERPRET=1: nothing compiled to stub."""


class NoOpCompiled:
    """Stands for a CompiledKernel: `compiled[grid](*args, stream=...)` launches nothing."""

    function = 0

    def __getitem__(self, grid):
        return lambda *args, **options: None


class NoOpKernel:
    """Stands for a JITFunction: the first launch of a specialisation returns the compiled kernel."""

    def __getitem__(self, grid):
        return lambda *args, **options: NoOpCompiled()


class NoOpEngine:
    """Stands for sfgrpo._C.cuda: launches nothing."""

    def advantages(self, *args):
        return None

    def advantages_workspace_bytes(self, *args):
        return 4096


def stub_cuda_queries(patch: Patch) -> None:
    """The device index and stream a launch asks for, on a machine without CUDA."""
    from sfgrpo import backend

    patch(backend, "current_cuda_device", lambda: None)  # the CPU / meta tensors' device index
    patch(torch._C, "_cuda_getCurrentRawStream", lambda index: 0, must_exist=False)  # absent from CPU builds


def _stub_launchers(patch: Patch, launchers) -> None:
    for launcher in launchers:
        if launcher.constexpr is None:
            raise InterpreterOn("Triton's interpreter was on at import: the kernels are not JIT functions")
        patch(launcher, "kernel", NoOpKernel())
        patch(launcher, "compiled", {})
    stub_cuda_queries(patch)


def stub_sde_step_launches(patch: Patch) -> None:
    """The SDE step's Triton path on CPU tensors, every launch a no-op. The caller makes sure the
    direct launch path is on (TRITON_INTERPRET and SFGRPO_TRITON_DIRECT_LAUNCH unset or off)."""
    from sfgrpo.kernels import sde_step as kernels
    from sfgrpo.ops import sde_step as ops

    _stub_launchers(patch, (kernels._FWD_LAUNCHER, kernels._BWD_LAUNCHER))
    patch(ops, "_implementation", lambda device, backend_name: kernels)


NORM_OPS = ("rms_norm", "layer_norm_modulate", "gated_residual", "qk_norm_rope")


def stub_norm_launches(patch: Patch) -> None:
    """The fused norms' Triton path on CPU tensors, every launch a no-op (the kernels' outputs are
    left unwritten: only the host work counts)."""
    from sfgrpo import backend
    from sfgrpo.kernels import _launch, gated_residual, layer_norm_modulate, qk_norm_rope, rms_norm

    _stub_launchers(patch, [value for module in (rms_norm, layer_norm_modulate, gated_residual, qk_norm_rope)
                            for value in vars(module).values() if isinstance(value, _launch.DirectLauncher)])
    resolve = backend.resolve_backend
    patch(backend, "resolve_backend",
          lambda op, device, override=None: "triton" if op in NORM_OPS else resolve(op, device, override))


def stub_advantage_engine(patch: Patch) -> None:
    """The CUDA branch of the advantage ops on meta tensors, the engine a no-op; the backend table
    has no entry for the meta device, so the choice is pinned to the native engine, as on CUDA."""
    from sfgrpo import alloc, functional
    from sfgrpo.ops import advantages

    patch(advantages, "_cuda_engine", lambda: NoOpEngine())
    stub_cuda_queries(patch)
    # the output from the fast allocator, as on the current CUDA device (CPU memory here: the engine
    # is a no-op; torch.empty on meta tensors would count torch's argument parser instead)
    patch(alloc, "allocator", lambda device: alloc.empty_strided_cpu)
    patch(functional, "resolve_backend", lambda op, device, override=None: "native")


def monkeypatch_patch(monkeypatch) -> Patch:
    """`patch` for pytest fixtures."""
    def patch(obj, name, value, must_exist=True):
        monkeypatch.setattr(obj, name, value, raising=must_exist)

    return patch


def setattr_patch(obj, name, value, must_exist=True) -> None:
    """`patch` for a process that only measures (nothing to undo)."""
    if must_exist and not hasattr(obj, name):
        raise AttributeError(f"{obj!r} has no attribute {name!r} to stub")
    setattr(obj, name, value)
