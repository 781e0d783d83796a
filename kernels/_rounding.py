"""fp32 -> storage dtype for every kernel's stores: round to nearest even, the GPU's bits everywhere.

Compiled for a GPU, Triton's cast `h.to(tl.bfloat16)` is a cvt.rn: round to nearest even, like
torch. Triton's interpreter (TRITON_INTERPRET=1, how the test suite runs the kernels on CPU tensors
without a GPU) truncates fp32 -> bf16 instead (its `_convert_float` with no rounding mode): about
half of the interpreted bf16 outputs were one bf16 step off the GPU's, so the interpreted tests could
not check the GPU's bf16 bits (an SDE step's bf16 sample from given noise differed from the
reference's in 36 of 75 values). Under the interpreter, `round_to` computes the bf16 bits itself;
compiled, it is the plain cast, the bit arithmetic not emitted (4-5 integer instructions per value:
~10 % of bf16 Philox sampling's). fp16 needs nothing: both round to nearest even.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


# What triton.jit gave at import: an InterpretedFunction when TRITON_INTERPRET was set (the same test
# Triton makes), so the AOT compiles and the GPU get False whatever the environment says later.
INTERPRETED = tl.constexpr(not isinstance(_probe, triton.runtime.jit.JITFunction))


@triton.jit
def round_to(h, dtype: tl.constexpr):
    """fp32 `h` rounded to `dtype`, to nearest even (like torch and the GPU's cvt.rn)."""
    if INTERPRETED and dtype == tl.bfloat16:
        # the bf16 bits themselves, bitcast: the interpreter's own fp32 -> bf16 conversion also
        # flushes results below bf16's smallest normal to zero; a NaN gives torch's 0x7FC0
        bits = h.to(tl.uint32, bitcast=True)
        rounded = tl.where(h != h, 0x7FC0, (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16)
        out = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = h.to(dtype)
    return out
