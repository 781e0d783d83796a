"""Kernels and memory traffic of one real-size DiT block, diffusers' modules vs sfgrpo's fused
ops, counted on the CPU (no GPU needed): SD3.5-M's dual-attention block (fused norms and block
tail), the same block with LoRA adapters on its attention projections under bf16 autocast (the
trainer's setting; peft's layers vs sfgrpo's fused LoRA linear), and FLUX.1-dev's double- and
single-stream blocks (fused norms, block tails and the attention's QK-norm + rotary embedding).

Every ATen op a block's forward and backward dispatch is recorded (TorchDispatchMode) with the
bytes of its tensor inputs and outputs; views and metadata ops move nothing and are left out. The
fused ops' Triton kernels are counted as ONE kernel each with their own inputs and outputs (the
kernels run in Triton's interpreter), and so is torch.nn.RMSNorm (one fused kernel each way on
CUDA, decomposed on the CPU). Grouped as matmul / attention (what fusion cannot remove) and
everything else (the elementwise and normalisation traffic the fused ops cut). On a GPU the
"everything else" row is memory-bound, so its bytes are its time: this is the model the GPU
benchmark (`bench_norms_gpu.py`) measures for real.

    python benchmarks/block_traffic_cpu.py [--models sd35m,flux1] [--tokens 1024] [--batch 1] [--lora-rank 32]
                                          [--out FILE.md]
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

_COMPUTE = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward",
            "_scaled_dot_product_efficient_attention_backward", "convolution", "convolution_backward"}
_FREE = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "split", "chunk",
         "slice", "select", "alias", "detach", "as_strided", "split_with_sizes", "unbind", "_reshape_alias",
         "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros_like", "ones_like",
         "lift_fresh", "is_same_size", "_to_copy_meta", "reshape", "contiguous_meta", "unflatten",
         "promote_types", "result_type"}  # dtype arithmetic the fused ops' wrappers dispatch: no kernel


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
    from sfgrpo.ops import gated_residual, layer_norm_modulate, qk_norm_rope, rms_norm

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
    for module in (rms_norm, layer_norm_modulate, gated_residual, qk_norm_rope):
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


@contextlib.contextmanager
def torch_rms_norm_counted_as_one_kernel(traffic: Traffic):
    """torch.nn.RMSNorm (FLUX's QK norms) recorded as one kernel forward and one backward, with their
    inputs and outputs: what CUDA runs (torch's fused rms_norm and its backward), where the CPU
    decomposes it into ~5 ops each way."""

    class Counted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            with _disable_current_modes():
                y = torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
            traffic.record("elementwise / norms", _nbytes((x, weight, y)))
            ctx.save_for_backward(x, weight)
            ctx.eps = eps
            return y

        @staticmethod
        def backward(ctx, g):
            x, weight = ctx.saved_tensors
            with _disable_current_modes(), torch.enable_grad():
                xg = x.detach().requires_grad_()
                wg = None if weight is None else weight.detach().requires_grad_(ctx.needs_input_grad[1])
                y = torch.nn.functional.rms_norm(xg, (x.shape[-1],), wg, ctx.eps)
                wanted = [xg] + ([wg] if wg is not None and wg.requires_grad else [])
                grads = list(torch.autograd.grad(y, wanted, g))
            dx = grads[0]
            dw = grads[1] if len(grads) > 1 else None
            traffic.record("elementwise / norms", _nbytes((g, x, weight, dx, dw)))
            return dx, dw, None

    def forward(self, x):
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return Counted.apply(x, self.weight, eps)

    original = torch.nn.RMSNorm.forward
    torch.nn.RMSNorm.forward = forward
    try:
        yield
    finally:
        torch.nn.RMSNorm.forward = original


def measure(block, inputs, fused: bool, autocast: bool = False, constants: dict | None = None) -> Traffic:
    """Kernels and bytes of `block(**inputs, **constants)` forward and backward; `inputs` get
    gradients, `constants` (FLUX's rotary tables) do not."""
    from sfgrpo.models.fused_lora import fuse_lora, unfuse_lora
    from sfgrpo.models.fused_norms import fuse_norms, unfuse_norms

    (fuse_norms if fused else unfuse_norms)(block)
    (fuse_lora if fused else unfuse_lora)(block)
    traffic = Traffic()
    stack = contextlib.ExitStack()
    with stack:
        stack.enter_context(torch_rms_norm_counted_as_one_kernel(traffic))
        if fused:
            stack.enter_context(fused_ops_counted_as_one_kernel(traffic))
        with traffic, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outputs = block(**inputs, **(constants or {}))
            outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o is not None]
        # fixed output gradients made outside the count: the loss's own kernels are not the block's
        grads = [torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(i))
                 for i, o in enumerate(outputs)]
        with traffic:
            torch.autograd.backward(outputs, grads)
    lora = [p for n, p in block.named_parameters() if "lora_" in n]
    traffic.outputs = ([o.detach() for o in outputs] + [t.grad for t in inputs.values() if t.grad is not None]
                       + [p.grad for p in lora])
    for tensor in [*inputs.values(), *lora]:
        tensor.grad = None
    return traffic


def add_lora(block, rank: int) -> None:
    """peft adapters on the attention projections of both streams (Flow-GRPO's SD3 targets), fp32
    on the bf16 block as the trainer keeps them, B drawn non-zero (a trained adapter)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out"]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                       init_lora_weights="gaussian"), block)
    for name, p in block.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            if "lora_B" in name:
                p.data.normal_(0, 0.02)
            p.requires_grad_(True)


def table(title: str, rows: dict) -> list[str]:
    lines = [title, "", "| | diffusers kernels | diffusers MB | sfgrpo kernels | sfgrpo MB | traffic ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    a, b = rows["diffusers"], rows["sfgrpo fused"]
    for group in ("elementwise / norms", "matmul / attention"):
        lines.append(f"| {group} | {a.kernels[group]} | {a.bytes[group] / 1e6:.0f} | {b.kernels[group]} | "
                     f"{b.bytes[group] / 1e6:.0f} | {a.bytes[group] / max(b.bytes[group], 1):.2f}x |")
    lines += ["", f"Largest difference of the outputs and gradients, fused vs diffusers, relative to their "
                  f"largest value: {largest_difference(a, b):.1e} (bf16 rounds at 3.9e-3; diffusers rounds after "
                  f"every op, the fused kernels once)", ""]
    return lines


def largest_difference(a: Traffic, b: Traffic) -> float:
    """Largest |a - b| over the block's outputs and its inputs' gradients, relative to a's scale: the
    fused kernels (interpreter) against diffusers' bf16 ops at real size, a sanity check."""
    return max(((x.float() - y.float()).abs().max() / x.float().abs().max().clamp_min(1e-30)).item()
               for x, y in zip(a.outputs, b.outputs))


def flux_rotary_tables(image_tokens: int, text_tokens: int, axes_dim=(16, 56, 56)):
    """FLUX.1's (cos, sin) for a square image grid after the text tokens (FluxPosEmbed; FLUX.1's
    axes for its head dim 128)."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    side = int(round(image_tokens ** 0.5))
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0),
                                      indexing="ij"), -1).reshape(-1, 3)
    ids = torch.cat([torch.zeros(text_tokens, 3), grid])
    return FluxPosEmbed(theta=10000, axes_dim=list(axes_dim))(ids)


def sd35m_tables(args) -> list[str]:
    from diffusers.models.attention import JointTransformerBlock

    torch.manual_seed(0)
    # SD3.5-Medium's dual-attention block (layers 0-12), bf16 like a real run
    block = JointTransformerBlock(dim=1536, num_attention_heads=24, attention_head_dim=64, context_pre_only=False,
                                  qk_norm="rms_norm", use_dual_attention=True).to(torch.bfloat16).requires_grad_(False)
    inputs = dict(
        hidden_states=torch.randn(args.batch, args.tokens, 1536, dtype=torch.bfloat16, requires_grad=True),
        encoder_hidden_states=torch.randn(args.batch, args.text_tokens, 1536, dtype=torch.bfloat16, requires_grad=True),
        temb=torch.randn(args.batch, 1536, dtype=torch.bfloat16),
    )
    shape = f"bf16, batch {args.batch}, {args.tokens} image + {args.text_tokens} text tokens"
    rows = {name: measure(block, inputs, fused) for name, fused in (("diffusers", False), ("sfgrpo fused", True))}
    lines = table(f"SD3.5-M dual-attention JointTransformerBlock, {shape}, forward + backward of the activations "
                  "(weights frozen, no adapters)", rows)
    if args.lora_rank > 0:
        add_lora(block, args.lora_rank)
        rows = {name: measure(block, inputs, fused, autocast=True)
                for name, fused in (("diffusers", False), ("sfgrpo fused", True))}
        lines += table(f"The same block with LoRA r{args.lora_rank} (fp32 adapters) on the 8 attention projections of "
                       "both streams, under bf16 autocast (the trainer's setting), forward + backward: diffusers = "
                       "diffusers' modules + peft's lora.Linear, sfgrpo = fused norms, block tail and "
                       "`sfgrpo.lora_linear`", rows)
    return lines


def flux1_tables(args) -> list[str]:
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    text = args.flux_text_tokens
    shape = f"bf16, batch {args.batch}, {args.tokens} image + {text} text tokens"
    tables = flux_rotary_tables(args.tokens, text)
    constants = dict(image_rotary_emb=tables)
    note = ("(weights frozen, no adapters; torch.nn.RMSNorm, FLUX's QK norm, counted as one kernel each way on "
            "both sides, as CUDA runs it)")
    lines = []
    titles = {FluxTransformerBlock: f"FLUX.1-dev double-stream FluxTransformerBlock, {shape}",
              FluxSingleTransformerBlock: f"FLUX.1-dev FluxSingleTransformerBlock, {shape} (one joint stream)"}
    for cls, title in titles.items():
        torch.manual_seed(0)
        block = cls(dim=3072, num_attention_heads=24, attention_head_dim=128).to(torch.bfloat16).requires_grad_(False)
        inputs = dict(  # both blocks take the two streams (the single one concatenates them itself)
            hidden_states=torch.randn(args.batch, args.tokens, 3072, dtype=torch.bfloat16, requires_grad=True),
            encoder_hidden_states=torch.randn(args.batch, text, 3072, dtype=torch.bfloat16, requires_grad=True),
            temb=torch.randn(args.batch, 3072, dtype=torch.bfloat16),
        )
        rows = {name: measure(block, inputs, fused, constants=constants)
                for name, fused in (("diffusers", False), ("sfgrpo fused", True))}
        lines += table(f"{title}, forward + backward {note}", rows)
        del block, inputs, rows
    return lines


MODELS = {"sd35m": sd35m_tables, "flux1": flux1_tables}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="image tokens (SD3.5-M / FLUX.1 at 512 px: 1024)")
    parser.add_argument("--text-tokens", type=int, default=333, help="SD3.5-M's text tokens (CLIP 77 + T5 256)")
    parser.add_argument("--flux-text-tokens", type=int, default=512, help="FLUX.1-dev's T5 tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=32, help="rank of the SD3.5-M LoRA table's adapters (0: none)")
    parser.add_argument("--models", default="sd35m,flux1", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()
    lines = []
    for name in args.models.split(","):
        lines += MODELS[name.strip()](args)
    text = "\n".join(lines).rstrip() + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
