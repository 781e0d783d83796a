"""Kernels and memory traffic of one real-size DiT block, diffusers' modules vs sfgrpo's fused
norms and block tail, counted on the CPU (no GPU needed).

Every ATen op a block's forward and backward dispatch is recorded (TorchDispatchMode) with the
bytes of its tensor inputs and outputs; views and metadata ops move nothing and are left out. The
fused ops' Triton kernels are counted as ONE kernel each with their
own inputs and outputs (the kernels run in Triton's interpreter). Grouped as matmul / attention (what fusion cannot remove) and everything
else (the elementwise and normalisation traffic the fused ops cut). On a GPU the "everything else"
row is memory-bound, so its bytes are its time: this is the model the GPU benchmark
(`bench_norms_gpu.py`) measures for real.

    python benchmarks/block_traffic_cpu.py [--tokens 1024] [--batch 1] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections import Counter

# the fused ops' Triton kernels run in Triton's interpreter on the CPU (set before Triton is imported)
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

from sfgrpo.bench.runner import environment  # noqa: E402

_COMPUTE = {"mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward",
            "_scaled_dot_product_efficient_attention_backward", "convolution", "convolution_backward"}
_FREE = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "split", "chunk",
         "slice", "select", "alias", "detach", "as_strided", "split_with_sizes", "unbind", "_reshape_alias",
         "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros_like", "ones_like",
         "lift_fresh", "is_same_size", "_to_copy_meta", "reshape", "contiguous_meta", "unflatten"}


def _nbytes(tree) -> int:
    total = 0
    for item in torch.utils._pytree.tree_leaves(tree):
        if isinstance(item, torch.Tensor) and item.device.type != "meta":
            total += item.numel() * item.element_size()
    return total


class Traffic(TorchDispatchMode):
    """Kernels and bytes per group of the ATen ops run inside it."""

    def __init__(self):
        super().__init__()
        self.kernels, self.bytes = Counter(), Counter()

    def record(self, group: str, nbytes: int) -> None:
        self.kernels[group] += 1
        self.bytes[group] += nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _FREE:
            return out
        group = "matmul / attention" if name in _COMPUTE else "elementwise / norms"
        self.record(group, _nbytes((args, kwargs)) + _nbytes(out))
        return out


@contextlib.contextmanager
def fused_ops_counted_as_one_kernel(traffic: Traffic):
    """The fused ops' Triton kernels (run in Triton's interpreter here) each recorded as one kernel
    moving the op's inputs and outputs, with the counting mode off inside them."""
    from sfgrpo.ops import gated_residual, layer_norm_modulate, rms_norm

    def counted(function):
        def run(*args, **kwargs):
            with _disable_current_modes():
                out = function(*args, **kwargs)
            traffic.record("elementwise / norms", _nbytes((args, kwargs)) + _nbytes(out))
            return out

        return run

    class Counting:
        def __init__(self, kernels):
            self.forward, self.backward = counted(kernels.forward), counted(kernels.backward)

    originals = []
    for module in (rms_norm, layer_norm_modulate, gated_residual):
        def implementation(*args, original=module._implementation, reference=module._Reference, **kwargs):
            chosen = original(*args, **kwargs)
            return chosen if chosen is reference else Counting(chosen)

        originals.append((module, module._implementation))
        module._implementation = implementation
    try:
        with environment("SFGRPO_BACKEND", "triton"):
            yield
    finally:
        for module, original in originals:
            module._implementation = original


def measure(block, inputs, fused: bool) -> Traffic:
    from sfgrpo.models.fused_norms import fuse_norms, unfuse_norms

    (fuse_norms if fused else unfuse_norms)(block)
    traffic = Traffic()
    stack = contextlib.ExitStack()
    with stack:
        if fused:
            stack.enter_context(fused_ops_counted_as_one_kernel(traffic))
        with traffic:
            outputs = [o for o in block(**inputs) if o is not None]
        # fixed output gradients made outside the count: the loss's own kernels are not the block's
        grads = [torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(i))
                 for i, o in enumerate(outputs)]
        with traffic:
            torch.autograd.backward(outputs, grads)
    traffic.outputs = [o.detach() for o in outputs] + [t.grad for t in inputs.values() if t.grad is not None]
    for tensor in inputs.values():
        tensor.grad = None
    return traffic


def largest_difference(a: Traffic, b: Traffic) -> float:
    """Largest |a - b| over the block's outputs and its inputs' gradients, relative to a's scale: the
    fused kernels (interpreter) against diffusers' bf16 ops at real size, a sanity check."""
    return max(((x.float() - y.float()).abs().max() / x.float().abs().max().clamp_min(1e-30)).item()
               for x, y in zip(a.outputs, b.outputs))


def main() -> int:
    from diffusers.models.attention import JointTransformerBlock

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="image tokens (SD3.5-M at 512 px: 1024)")
    parser.add_argument("--text-tokens", type=int, default=333)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    torch.manual_seed(0)
    # SD3.5-Medium's dual-attention block (layers 0-12), bf16 like a real run
    block = JointTransformerBlock(dim=1536, num_attention_heads=24, attention_head_dim=64, context_pre_only=False,
                                  qk_norm="rms_norm", use_dual_attention=True).to(torch.bfloat16).requires_grad_(False)
    inputs = dict(
        hidden_states=torch.randn(args.batch, args.tokens, 1536, dtype=torch.bfloat16, requires_grad=True),
        encoder_hidden_states=torch.randn(args.batch, args.text_tokens, 1536, dtype=torch.bfloat16, requires_grad=True),
        temb=torch.randn(args.batch, 1536, dtype=torch.bfloat16),
    )
    rows = {name: measure(block, inputs, fused) for name, fused in (("diffusers", False), ("sfgrpo fused", True))}
    lines = [f"SD3.5-M dual-attention JointTransformerBlock, bf16, batch {args.batch}, {args.tokens} image + "
             f"{args.text_tokens} text tokens, forward + backward of the activations (weights frozen, as under LoRA)",
             "", "| | diffusers kernels | diffusers MB | sfgrpo kernels | sfgrpo MB | traffic ratio |", "|---|---:|---:|---:|---:|---:|"]
    for group in ("elementwise / norms", "matmul / attention"):
        a, b = rows["diffusers"], rows["sfgrpo fused"]
        lines.append(f"| {group} | {a.kernels[group]} | {a.bytes[group] / 1e6:.0f} | {b.kernels[group]} | "
                     f"{b.bytes[group] / 1e6:.0f} | {a.bytes[group] / max(b.bytes[group], 1):.2f}x |")
    lines += ["", f"Largest difference of the outputs and input gradients, fused vs diffusers, relative to their "
                  f"largest value: {largest_difference(rows['diffusers'], rows['sfgrpo fused']):.1e} (bf16 rounds at "
                  f"3.9e-3; diffusers rounds after every op, the fused kernels once)"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
