"""`sfgrpo.kernels._rounding.round_to`, the fp32 -> storage-dtype cast of every kernel's stores: to
nearest even like torch, in Triton's interpreter (whose own fp32 -> bf16 cast truncates and flushes
bf16 subnormals) as on a GPU, and compiled it is exactly the plain cast (no extra instructions)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from sfgrpo.kernels._rounding import round_to  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# fp32 bit patterns around bf16's rounding boundaries: ties to even (down and up), just above a tie,
# a carry into the exponent, the largest finite float (rounds to inf), infinities, a NaN, subnormals
# (a tie to even, a tie rounding up to the smallest subnormals, the largest), signed zeros
EDGE_BITS = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F80FFFF, 0x7F7FFFFF, 0x7F7F7FFF, 0x7F800000, 0xFF800000,
             0x7FC00001, 0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x80008001, 0xBF808000, 0x0, 0x80000000]


def _edge_values() -> torch.Tensor:
    signed = [b - (1 << 32) if b >= 1 << 31 else b for b in EDGE_BITS]
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32)


@triton.jit
def store_rounded(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, round_to(tl.load(x_ptr + offs, mask=mask), y_ptr.dtype.element_ty), mask=mask)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's fp16 inf
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_to_rounds_like_torch(dtype):
    g = torch.Generator().manual_seed(0)
    # every binade of fp32, normal and subnormal, both signs
    spread = torch.randn(20000, generator=g) * 2.0 ** torch.randint(-140, 120, (20000,), generator=g).float()
    x = torch.cat([_edge_values(), spread]).to(DEVICE)
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    store_rounded[(-(-x.numel() // 1024),)](x, y, x.numel(), BLOCK=1024)
    want = x.to(dtype)
    nan = want.isnan()
    assert torch.equal(y.isnan(), nan)
    # NaN payloads aside (the GPU's cvt gives 0x7FFF, torch 0x7FC0), the same bits
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(y[~nan].view(bits), want[~nan].view(bits))


def test_compiled_round_to_is_the_plain_cast(tmp_path):
    """For a GPU (sm_90, no interpreter) a store through round_to compiles to the same PTX as one
    through `.to(dtype)`: the interpreter's bit arithmetic costs the kernels nothing."""
    module = tmp_path / "rounding_probe.py"
    module.write_text(textwrap.dedent('''
        import triton
        import triton.language as tl
        from sfgrpo.kernels._aot import compile_sm90
        from sfgrpo.kernels._rounding import INTERPRETED, round_to

        @triton.jit
        def with_round_to(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            tl.store(y_ptr + offs, round_to(tl.load(x_ptr + offs, mask=mask), y_ptr.dtype.element_ty), mask=mask)

        @triton.jit
        def with_cast(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(y_ptr.dtype.element_ty), mask=mask)

        assert not INTERPRETED
        for storage in ("bf16", "fp16"):
            types = {"x_ptr": "*fp32", "y_ptr": "*" + storage, "n": "i32"}
            ptx = [compile_sm90(fn, types, {"BLOCK": 1024}, 4, ("n",)).asm["ptx"] for fn in (with_round_to, with_cast)]
            # the same instructions (the functions' names, debug labels and scopes aside)
            body = [[line.split("//")[0].strip().replace(name, "kernel") for line in text.splitlines()
                     if line.strip()[:1].isalpha() or line.strip()[:1] == "@"]
                    for name, text in zip(("with_round_to", "with_cast"), ptx)]
            assert body[0] == body[1], storage
            ptx_type = {"bf16": "bf16", "fp16": "f16"}[storage]
            assert "cvt.rn." + ptx_type + "x2.f32" in ptx[1] or "cvt.rn." + ptx_type + ".f32" in ptx[1], storage
        print("same")
    '''))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(module)], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "same", result.stderr[-4000:]
