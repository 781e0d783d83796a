"""Which implementation runs an op: decided here and nowhere else.

Every op has a plain-PyTorch reference (`sfgrpo/reference.py`) and one accelerated kernel family:
`triton` (the fused SDE-step kernels in `sfgrpo.kernels`) or `native` (the C++/CUDA module
`sfgrpo._C`). The choice is made per call from the tensors' device and the requested backend:

- `auto` (default): CUDA tensors run the op's kernel family (falling back to the reference, with a
  one-time warning, if that family is not usable); CPU tensors run the native C++ code for
  `native` ops and for ops registered with a native CPU kernel (the SDE step), else the reference.
- `reference`: plain PyTorch for every op, on every device.
- `triton` / `native`: force that kernel family for the ops that have it (an error, not a silent
  fallback, if it is unusable); ops of the other family keep their `auto` choice. `triton` on CPU
  tensors runs the kernels in Triton's interpreter and needs TRITON_INTERPRET=1 in the environment
  before Triton is first imported.

The requested backend comes from a per-call `backend=` argument, else the environment variable
SFGRPO_BACKEND, else `auto`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from sfgrpo import _native

ENV_VAR = "SFGRPO_BACKEND"
BACKENDS = ("auto", "reference", "triton", "native")
KERNEL_FAMILIES = ("triton", "native")

# op name -> kernel family; each op module registers itself here when it is defined.
_OPS: dict[str, str] = {}
# op name -> the family of its CPU kernel, for ops whose CPU kernel is not of their own family
# (the SDE step: Triton on CUDA, C++ on CPU)
_CPU_FAMILY: dict[str, str] = {}


def register_op(name: str, family: str, cpu_family: str | None = None) -> None:
    for value in (family, cpu_family or family):
        if value not in KERNEL_FAMILIES:
            raise ValueError(f"unknown kernel family {value!r}; expected one of {KERNEL_FAMILIES}")
    _OPS[name] = family
    if cpu_family is not None and cpu_family != family:
        _CPU_FAMILY[name] = cpu_family


def registered_ops() -> dict[str, str]:
    return dict(_OPS)


def _environ_reader():
    """A function name -> os.environ.get(name) for the variables read on every op call.
    `os.environ.get` of an unset variable raises and catches a KeyError inside (~0.5 us); CPython's
    os.environ keeps its encoded copy in `_data`, which os.environ's own writes (and pytest's
    monkeypatch) update, so a plain dict lookup there gives the same answer. Any other
    implementation gets os.environ.get."""
    data = getattr(os.environ, "_data", None)
    encodekey = getattr(os.environ, "encodekey", None)
    decodevalue = getattr(os.environ, "decodevalue", None)
    if not isinstance(data, dict) or encodekey is None or decodevalue is None:
        return os.environ.get
    keys: dict[str, object] = {}

    def get(name: str) -> str | None:
        key = keys.get(name)
        if key is None:
            key = keys[name] = encodekey(name)
        value = data.get(key)
        return None if value is None else decodevalue(value)

    return get


environ_get = _environ_reader()


def _raw_environ():
    """(mapping, key of SFGRPO_BACKEND, key of TRITON_INTERPRET) whose `mapping.get(key)` gives each
    variable's value in some encoding: enough for a memo key (any change of a value changes it),
    without `environ_get`'s call and decoding. CPython: os.environ's encoded dict, as above."""
    data = getattr(os.environ, "_data", None)
    encodekey = getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and encodekey is not None:
        return data, encodekey(ENV_VAR), encodekey("TRITON_INTERPRET")
    return os.environ, ENV_VAR, "TRITON_INTERPRET"


_ENVIRON, _BACKEND_KEY, _INTERPRET_KEY = _raw_environ()


def requested_backend(override: str | None = None) -> str:
    value = override if override is not None else (environ_get(ENV_VAR) or "auto")
    value = value.strip().lower() or "auto"
    if value not in BACKENDS:
        source = "backend argument" if override is not None else ENV_VAR
        raise ValueError(f"sfgrpo: {source}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def traced_reference(device: torch.device, override: str | None = None) -> bool:
    """Under torch.compile, whether a Triton-family op on `device` is traced as its reference
    expression (Inductor fuses it; the registered op would be opaque to it): CPU tensors unless the
    triton backend is forced. Decided without `resolve_backend`, whose memo and environment lookups
    dynamo would trace."""
    return device.type == "cpu" and requested_backend(override) != "triton"


def runs_reference(op: str, device: torch.device) -> bool:
    """Whether `op` (a Triton-family op) runs its reference expression on `device`: under
    torch.compile by `traced_reference`'s rule, else as `resolve_backend` decides. What a fused
    module twin asks before leaving diffusers' own code for the op's kernels."""
    if torch.compiler.is_compiling():
        return traced_reference(device)
    return resolve_backend(op, device) == "reference"


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_status(device: torch.device) -> tuple[bool, str]:
    """(usable, reason) for running Triton kernels on tensors of `device`."""
    if not _triton_installed():
        return False, "Triton is not installed (pip install 'sfgrpo[triton]')"
    if device.type == "cuda":
        if triton_interpreter_enabled():
            return False, "TRITON_INTERPRET=1 is set, which runs kernels on CPU tensors only"
        return True, "Triton on CUDA"
    if device.type == "cpu":
        if not triton_interpreter_enabled():
            return False, "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1"
        if importlib.util.find_spec("numpy") is None:
            return False, "Triton's interpreter needs numpy"
        return True, "Triton interpreter on CPU"
    return False, f"no Triton support for device type {device.type!r}"


def native_status(device: torch.device) -> tuple[bool, str]:
    """(usable, reason) for running the C++/CUDA module on tensors of `device`."""
    if not _native.available():
        return False, "sfgrpo._C is not built"
    if device.type == "cpu":
        return True, "C++ (sfgrpo._C.cpu)"
    if device.type == "cuda":
        if not _native.has_cuda():
            return False, "sfgrpo._C was built without CUDA code"
        return True, "CUDA (sfgrpo._C.cuda)"
    return False, f"no native support for device type {device.type!r}"


def _family_status(family: str, device: torch.device) -> tuple[bool, str]:
    return triton_status(device) if family == "triton" else native_status(device)


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(op: str, device_type: str, reason: str) -> None:
    warnings.warn(
        f"sfgrpo: op {op!r} on {device_type} tensors falls back to the PyTorch reference: {reason}",
        RuntimeWarning,
        stacklevel=3,
    )


_RESOLVED: dict[tuple, str] = {}


_DEVICE_TYPES: dict[torch.device, str] = {}


def eager_device_type(device: torch.device) -> str:
    """`device.type`, memoised per device for the ops' hot paths: each read of `.type` builds a new
    string (~3k instructions, five times the device's hash). For code torch.compile never traces
    (kernel wrappers); traced code calls `device_type`."""
    kind = _DEVICE_TYPES.get(device)
    if kind is None:
        kind = _DEVICE_TYPES[device] = device.type
    return kind


_CUDA_GET_DEVICE = getattr(torch._C, "_cuda_getDevice", None)  # absent from CPU builds of torch


def current_cuda_device() -> int:
    """`torch.cuda.current_device()` for the ops' hot paths, which hold a CUDA tensor (so CUDA is
    initialised): torch's function first runs `_lazy_init`'s checks, three Python calls per read."""
    return torch.cuda.current_device() if _CUDA_GET_DEVICE is None else _CUDA_GET_DEVICE()


def device_type(device: torch.device) -> str:
    """`eager_device_type`, or under torch.compile `.type` itself (the trace needs no memo, and
    should not see one)."""
    return device.type if torch.compiler.is_compiling() else eager_device_type(device)


@functools.cache
def kernel_module(name: str):
    """`sfgrpo.kernels.<name>`, imported on first use (it needs Triton). Cached for the ops' hot
    paths: an import statement inside a function runs on every call (a `from ... import` through
    importlib's Python `_handle_fromlist`: ~2-3k instructions even when the module is loaded)."""
    return importlib.import_module(f"sfgrpo.kernels.{name}")


def resolve_backend(op: str, device: torch.device | str, override: str | None = None) -> str:
    """Returns 'reference', 'triton' or 'native' for running `op` on tensors of `device`.

    On every op call: decisions are memoised on everything they depend on (the environment
    variables are read each time, so changing them takes effect immediately)."""
    family = _OPS.get(op)
    cpu_family = _CPU_FAMILY.get(op)
    environ = _ENVIRON
    # TRITON_INTERPRET only matters to ops with a Triton kernel
    interpret = environ.get(_INTERPRET_KEY) if "triton" in (family, cpu_family) else None
    # keyed by the device as given (a torch.device hashes in ~1/5 of the time its .type takes to
    # build a new string): only a miss reads the type. The variables' raw values: a miss decodes them
    key = (op, family, cpu_family, device, override, environ.get(_BACKEND_KEY), interpret, _native._C is not None)
    chosen = _RESOLVED.get(key)
    if chosen is None:
        device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
        chosen = _resolve(op, torch.device(device_type), override)
        _RESOLVED[key] = chosen
    return chosen


def _resolve(op: str, device: torch.device, override: str | None) -> str:
    if op not in _OPS:
        raise KeyError(f"sfgrpo: unknown op {op!r}; registered ops: {sorted(_OPS)}")
    device = torch.device(device)
    family = _OPS[op]
    requested = requested_backend(override)
    if requested == "reference":
        return "reference"
    cpu_family = _CPU_FAMILY.get(op) if device.type == "cpu" else None
    if cpu_family is not None and requested in ("auto", cpu_family):
        usable, reason = _family_status(cpu_family, device)
        if usable:
            return cpu_family
        if requested == cpu_family:
            raise RuntimeError(f"sfgrpo: backend {requested!r} requested for op {op!r} "
                               f"on cpu tensors, but it is unusable: {reason}")
        return "reference"
    if requested == family:
        usable, reason = _family_status(family, device)
        if not usable:
            raise RuntimeError(f"sfgrpo: backend {requested!r} requested for op {op!r} "
                               f"on {device.type} tensors, but it is unusable: {reason}")
        return family
    # auto, or a forced family this op does not have: the op's default choice for the device.
    usable, reason = _family_status(family, device)
    if device.type == "cuda" or (device.type == "cpu" and family == "native"):
        if usable:
            return family
        if device.type == "cuda":
            _warn_fallback_once(op, device.type, reason)
    return "reference"


def available_backends(device: torch.device | str) -> dict[str, tuple[bool, str]]:
    device = torch.device(device)
    return {
        "reference": (True, "plain PyTorch"),
        "triton": triton_status(device),
        "native": native_status(device),
    }
