"""Launching compiled Triton kernels without Triton's per-call argument binding.

`kernel[grid](*args)` binds every argument, builds a specialisation key (dtype and 16-byte
alignment of each pointer; for each integer whether it is 1, divisible by 16 and its width; the
value of each constexpr), stringifies it and looks up the compile cache on every call: ~60 us per
launch for the SDE-step kernels' ~36 arguments under Triton 3.6, measured on an H200's host, 10x
the kernel on typical latents. `DirectLauncher` computes the same key from the arguments itself
(a tuple of small values, a few microseconds), keeps the `CompiledKernel` that the first JIT
launch of each specialisation returned, and launches it through its runner
(`compiled[grid](*all_parameters, stream=...)`: in Triton 3.6 and 3.9 the runner and the JIT
path call the same launcher with every parameter, constexprs included). Anything Triton might
specialise on is in the key, so a cached kernel is only reused for arguments Triton would have
given the same kernel.

Off in Triton's interpreter (there is nothing compiled to keep), with SFGRPO_TRITON_DIRECT_LAUNCH=0,
and for good (with a warning) if a runner ever rejects a call.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
from torch import Tensor

from sfgrpo import backend
from sfgrpo.backend import environ_get

ENV_VAR = "SFGRPO_TRITON_DIRECT_LAUNCH"
_INT32 = (-(2**31), 2**31)
_disabled_reason: str | None = None
_FALSE = ("0", "false", "off", "no")
_INTERPRETER_OFF = ("",) + _FALSE


def enabled() -> bool:
    """Read on every launch: the variables may change at run time (tests do), so they are looked up
    each time, through sfgrpo's cheap environment reader."""
    if _disabled_reason is not None:
        return False
    switch = environ_get(ENV_VAR)
    if switch is not None and switch.strip().lower() in _FALSE:
        return False
    interpret = environ_get("TRITON_INTERPRET")
    return interpret is None or interpret.strip().lower() in _INTERPRETER_OFF


def _disable(reason: str) -> None:
    global _disabled_reason
    _disabled_reason = reason
    warnings.warn(f"sfgrpo: launching Triton kernels directly failed ({reason}); using Triton's own launch path "
                  "from now on", RuntimeWarning, stacklevel=3)


def _runtime_key(value) -> Any:
    """What Triton's specialisation can depend on for one runtime (non-constexpr) argument
    (conservative: a finer key only costs an extra JIT lookup the first time)."""
    if isinstance(value, Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool):  # before int: bool is an int
        return "i1", value
    if isinstance(value, int):
        return _INT32[0] <= value < _INT32[1], value >= 2**63, value == 1, value % 16 == 0
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return None
    # something Triton may treat in its own way: never reuse a kernel for it
    raise TypeError(f"no direct-launch key for argument of type {type(value).__name__}")


_INT_KEYS: dict[int, tuple] = {}  # the integers launches see again and again: sizes, strides
_INT_KEYS_MAX = 4096  # counters that change every call (Philox offsets) must not grow it forever
_ALL_ALIGNED, _PER_ARGUMENT = "aligned", "per-argument"  # the two forms of DirectLauncher's key
# caller keys a launcher keeps (launch_keyed, with_constexprs' value keys): value keys take one entry
# per distinct shape, so a run whose shapes never repeat must not grow the table forever
_CALLER_KEYS_MAX = 4096
_DTYPE_OF = operator.attrgetter("dtype")


def _int_key(value: int) -> tuple:
    """`_runtime_key` of a plain int, memoised."""
    key = _INT_KEYS.get(value)
    if key is None:
        key = _runtime_key(value)
        if len(_INT_KEYS) < _INT_KEYS_MAX:
            _INT_KEYS[value] = key
    return key


def argument_key(args: tuple, constexpr: tuple[bool, ...]) -> tuple:
    """The specialisation key of a whole argument list: constexprs by value, the others by
    `_runtime_key`."""
    return tuple(value if is_constexpr else _runtime_key(value) for value, is_constexpr in zip(args, constexpr))


class DirectLauncher:
    """`launcher(grid, *args, **options)` == `kernel[grid](*args, **options)`, minus the binding
    cost after the first call of each specialisation. `args` are all of the kernel's parameters in
    order (constexprs included, positionally); `options` are compile options (num_warps, ...)."""

    def __init__(self, kernel: Any):
        self.kernel = kernel
        self.arg_names = tuple(kernel.arg_names)
        # Triton's interpreter wraps kernels without `params`; nothing is compiled there anyway
        params = getattr(kernel, "params", None)
        self.constexpr = tuple(bool(p.is_constexpr) for p in params) if params is not None else None
        # when the constexprs are the trailing parameters (as in sfgrpo's kernels) the key takes
        # their values as one slice: only the runtime arguments are looked at one by one
        self._runtime_count = None
        if self.constexpr is not None:
            count = len(self.constexpr)
            while count and self.constexpr[count - 1]:
                count -= 1
            if not any(self.constexpr[:count]):
                self._runtime_count = count
        self.compiled: dict[tuple, Any] = {}
        self.by_caller_key: dict[tuple, Any] = {}  # launch_keyed's key -> the compiled kernel
        # leading runtime parameters named *_ptr (sfgrpo's kernels take their pointers first):
        # with_constexprs keys a launch by their dtypes and the other arguments' values
        self._pointer_count = 0
        if self.constexpr is not None:
            while (self._pointer_count < len(self.arg_names) and not self.constexpr[self._pointer_count]
                   and self.arg_names[self._pointer_count].endswith("_ptr")):
                self._pointer_count += 1

    def with_constexprs(self, grid: tuple[int, ...], args: tuple, constexprs: dict, **options) -> None:
        """Leading runtime arguments positionally, the constexprs by name (any order).

        Keyed by value: the pointers' dtypes (all 16-byte aligned), every other argument's value and
        the options, a key finer than Triton's specialisation key (which sees only properties of the
        integers: 1, divisible by 16, 32- or 64-bit) and ~3x cheaper to build than `_key`'s
        per-argument one; a misaligned or non-tensor pointer takes the full key."""
        values = tuple(map(constexprs.__getitem__, self.arg_names[len(args):]))
        pointers = self._pointer_count
        key = None
        if pointers:
            address_bits = 0
            try:
                for tensor in args[:pointers]:
                    address_bits |= tensor.data_ptr()
            except AttributeError:  # None or another non-tensor in a pointer slot
                address_bits = 1
            if not address_bits & 15:
                key = (tuple(map(_DTYPE_OF, args[:pointers])), args[pointers:], values, tuple(options.items()))
        self._launch(grid, (*args, *values), options, key)

    def constexpr_values(self, runtime_count: int, constexprs: dict) -> tuple:
        """The constexprs by name -> their values in parameter order (after `runtime_count` runtime
        arguments): for `launch_keyed`, which takes all arguments positionally."""
        return tuple(map(constexprs.__getitem__, self.arg_names[runtime_count:]))

    def launch_keyed(self, grid: tuple[int, ...], caller_key, args: tuple, **options) -> None:
        """`self(grid, *args, **options)` with the caller's `caller_key` standing for the
        specialisation key once a launch has tied the two: the caller promises that its key
        determines everything Triton specialises on (each pointer's dtype and 16-byte alignment, the
        integers' properties, the constexprs) and the options, and passes None when it cannot (a
        misaligned tensor, say): then the full key is computed as usual. A caller that knows its
        kernel's layout builds such a key from a few values instead of one per argument."""
        self._launch(grid, args, options, caller_key)

    def __call__(self, grid: tuple[int, ...], *args, **options) -> None:
        self._launch(grid, args, options)

    def _key(self, args: tuple) -> tuple:
        count = self._runtime_count
        if count is None:
            return argument_key(args, self.constexpr)
        # the common case in one sweep: when every pointer is 16-byte aligned (fresh outputs and
        # activations always are) their alignment is one OR of the addresses, and the key holds
        # the dtypes alone; a misaligned pointer falls back to the key of each argument
        address_bits = 0
        runtime = []
        append = runtime.append
        for value in args[:count]:
            if isinstance(value, Tensor):
                address_bits |= value.data_ptr()
                append(value.dtype)
            elif type(value) is int:
                append(_int_key(value))
            else:
                append(_runtime_key(value))
        if address_bits & 15:
            return _PER_ARGUMENT, tuple(map(_runtime_key, args[:count])), args[count:]
        return _ALL_ALIGNED, tuple(runtime), args[count:]

    def _launch(self, grid: tuple[int, ...], args: tuple, options: dict, caller_key=None) -> None:
        if len(args) != len(self.arg_names):
            raise TypeError(f"the kernel takes {len(self.arg_names)} arguments, got {len(args)}")
        if self.constexpr is None or not enabled():
            self.kernel[grid](*args, **options)
            return
        first = args[0]
        device = (first if isinstance(first, Tensor) else next(a for a in args if isinstance(a, Tensor))).device
        if device.index != backend.current_cuda_device():  # Triton launches on the current device
            with torch.cuda.device(device):
                self.kernel[grid](*args, **options)
            return
        if caller_key is not None:
            caller_key = (caller_key, device.index)
            try:
                compiled = self.by_caller_key.get(caller_key)
            except TypeError:  # an unhashable value in a value key: the full key decides
                compiled = caller_key = None
            if compiled is not None:
                self._run(compiled, grid, args, options, device)
                return
        try:
            # options by insertion order: a caller that reorders them only costs a second entry
            key = (self._key(args), tuple(options.items()), device.index)
        except TypeError:
            self.kernel[grid](*args, **options)
            return
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self.kernel[grid](*args, **options)  # compiles (or finds) and launches
            if hasattr(compiled, "__getitem__") and hasattr(compiled, "function"):
                self.compiled[key] = compiled
                if caller_key is not None:
                    self._remember(caller_key, compiled)
            return
        if caller_key is not None:
            self._remember(caller_key, compiled)
        self._run(compiled, grid, args, options, device)

    def _remember(self, caller_key, compiled) -> None:
        if len(self.by_caller_key) >= _CALLER_KEYS_MAX:
            self.by_caller_key.clear()  # rebuilt from `compiled` (bounded by Triton's specialisations)
        self.by_caller_key[caller_key] = compiled

    def _run(self, compiled, grid: tuple[int, ...], args: tuple, options: dict, device) -> None:
        grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        stream = torch._C._cuda_getCurrentRawStream(device.index)
        try:
            compiled[grid3](*args, stream=stream)
        except (TypeError, ValueError, AttributeError) as err:  # a Triton whose runner differs
            if isinstance(err, ValueError) and "cannot be accessed" in str(err):
                raise  # memory the GPU cannot read (Triton's check): the caller's mistake, not the runner's
            _disable(f"{type(err).__name__}: {err}")
            self.kernel[grid](*args, **options)
