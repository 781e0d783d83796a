"""The elementwise tail of diffusers' DiT blocks through sfgrpo's fused ops.

Between the matmuls, an SD3 `JointTransformerBlock` / FLUX `FluxTransformerBlock` runs, per stream,
`h = h + gate * attn_out` then `norm2(h) * (1 + scale) + shift` (six full-size kernels, ~11 passes
over the activations) and `h = h + gate * ff_out` (two kernels), and a FLUX single block
`residual + gate * proj_out(cat([attn_out, mlp_out]))`. These forwards are diffusers' own, line for
line, with those expressions replaced by `sfgrpo.gated_residual_layer_norm_modulate` (one pass: h
and the normalised, modulated h) and `sfgrpo.gated_residual`, and the single block's
concatenation by a split projection (`split_projection`) where its weight is frozen. The norm
modules inside the blocks are swapped by `sfgrpo.models.fused_norms` as everywhere else.

A block's forward is only replaced when diffusers' source of it is one this module was written
against and tested with (its digest is in `_VERIFIED`): another diffusers version may have changed
what the block computes, and there the block keeps its own forward (the norm modules are still
fused). On CPU, or with SFGRPO_BACKEND=reference, the ops run diffusers' expressions and the
swapped block is bit-exact (tests/test_fused_norms.py).
"""

from __future__ import annotations

import hashlib
import inspect
import textwrap

import torch

from sfgrpo import functional as F
from sfgrpo.backend import device_type, runs_reference
from sfgrpo.models.class_swap import global_module_hooks, unhooked
from sfgrpo.reference import autocast_dtype

# sha256[:16] of the dedented source of each block's forward, per diffusers release checked
_VERIFIED = {
    "JointTransformerBlock": {"0.42.1": "e64d8fc0e57ee1fa"},
    "FluxTransformerBlock": {"0.42.1": "2ddc89c799fd6eca"},
    "FluxSingleTransformerBlock": {"0.42.1": "febf6aee7ca882b6"},
}


def source_digest(function) -> str | None:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):  # no source (frozen, compiled): cannot be verified
        return None
    return hashlib.sha256(textwrap.dedent(source).encode()).hexdigest()[:16]


def verified(cls: type) -> bool:
    """Whether `cls.forward` is a diffusers forward the fused twin was written against."""
    return source_digest(cls.forward) in _VERIFIED.get(cls.__name__, {}).values()


_MODULES = {"JointTransformerBlock": "diffusers.models.attention",
            "FluxTransformerBlock": "diffusers.models.transformers.transformer_flux",
            "FluxSingleTransformerBlock": "diffusers.models.transformers.transformer_flux"}


def support() -> dict[str, str]:
    """Per block class: whether `fuse_norms` gives it the fused forward with the installed diffusers
    (`sfgrpo info`)."""
    import importlib

    report = {}
    for name, module in _MODULES.items():
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            report[name] = "not in the installed diffusers"
            continue
        report[name] = "fused" if verified(cls) else "diffusers' forward (this version of it is not verified)"
    return report


def _feed_forward(block, ff, hidden_states):
    """diffusers' chunked feed-forward when the block was set to chunk, else the plain call."""
    if block._chunk_size is not None:
        from diffusers.models.attention import _chunked_feed_forward

        return _chunked_feed_forward(ff, hidden_states, block._chunk_dim, block._chunk_size)
    return ff(hidden_states)


def joint_transformer_block(fused_mixin):
    from diffusers.models.attention import JointTransformerBlock

    class FusedJointTransformerBlock(fused_mixin, JointTransformerBlock):
        diffusers_class = JointTransformerBlock

        def forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
            joint_attention_kwargs = joint_attention_kwargs or {}
            if self.use_dual_attention:
                (norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hidden_states2,
                 gate_msa2) = self.norm1(hidden_states, emb=temb)
            else:
                norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)

            if self.context_pre_only:
                norm_encoder_hidden_states = self.norm1_context(encoder_hidden_states, temb)
            else:
                norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
                    encoder_hidden_states, emb=temb
                )

            attn_output, context_attn_output = self.attn(
                hidden_states=norm_hidden_states,
                encoder_hidden_states=norm_encoder_hidden_states,
                **joint_attention_kwargs,
            )

            # the last gated residual before norm2 and norm2's modulation: one pass
            if self.use_dual_attention:
                hidden_states = F.gated_residual(hidden_states, attn_output, gate_msa)
                attn_output2 = self.attn2(hidden_states=norm_hidden_states2, **joint_attention_kwargs)
                hidden_states, norm_hidden_states = F.gated_residual_layer_norm_modulate(
                    hidden_states, attn_output2, gate_msa2, scale_mlp, shift_mlp, self.norm2.eps)
            else:
                hidden_states, norm_hidden_states = F.gated_residual_layer_norm_modulate(
                    hidden_states, attn_output, gate_msa, scale_mlp, shift_mlp, self.norm2.eps)
            ff_output = _feed_forward(self, self.ff, norm_hidden_states)
            hidden_states = F.gated_residual(hidden_states, ff_output, gate_mlp)

            if self.context_pre_only:
                encoder_hidden_states = None
            else:
                encoder_hidden_states, norm_encoder_hidden_states = F.gated_residual_layer_norm_modulate(
                    encoder_hidden_states, context_attn_output, c_gate_msa, c_scale_mlp, c_shift_mlp,
                    self.norm2_context.eps)
                context_ff_output = _feed_forward(self, self.ff_context, norm_encoder_hidden_states)
                encoder_hidden_states = F.gated_residual(encoder_hidden_states, context_ff_output, c_gate_mlp)

            return encoder_hidden_states, hidden_states

    def supported(block) -> bool:
        norms = [block.norm2] + ([] if block.context_pre_only else [block.norm2_context])
        return all(_plain_layer_norm(norm) for norm in norms)

    return FusedJointTransformerBlock, supported


def flux_transformer_block(fused_mixin):
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    class FusedFluxTransformerBlock(fused_mixin, FluxTransformerBlock):
        diffusers_class = FluxTransformerBlock

        def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                    joint_attention_kwargs=None):
            norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)

            norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
                encoder_hidden_states, emb=temb
            )
            joint_attention_kwargs = joint_attention_kwargs or {}

            attention_outputs = self.attn(
                hidden_states=norm_hidden_states,
                encoder_hidden_states=norm_encoder_hidden_states,
                image_rotary_emb=image_rotary_emb,
                **joint_attention_kwargs,
            )

            if len(attention_outputs) == 2:
                attn_output, context_attn_output = attention_outputs
            elif len(attention_outputs) == 3:
                attn_output, context_attn_output, ip_attn_output = attention_outputs

            hidden_states, norm_hidden_states = F.gated_residual_layer_norm_modulate(
                hidden_states, attn_output, gate_msa, scale_mlp, shift_mlp, self.norm2.eps)
            ff_output = self.ff(norm_hidden_states)
            hidden_states = F.gated_residual(hidden_states, ff_output, gate_mlp)
            if len(attention_outputs) == 3:
                hidden_states = hidden_states + ip_attn_output

            encoder_hidden_states, norm_encoder_hidden_states = F.gated_residual_layer_norm_modulate(
                encoder_hidden_states, context_attn_output, c_gate_msa, c_scale_mlp, c_shift_mlp,
                self.norm2_context.eps)
            context_ff_output = self.ff_context(norm_encoder_hidden_states)
            encoder_hidden_states = F.gated_residual(encoder_hidden_states, context_ff_output, c_gate_mlp)
            if encoder_hidden_states.dtype == torch.float16:
                encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)

            return encoder_hidden_states, hidden_states

    return FusedFluxTransformerBlock, lambda block: _plain_layer_norm(block.norm2) and _plain_layer_norm(
        block.norm2_context)


def flux_single_transformer_block(fused_mixin):
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    class FusedFluxSingleTransformerBlock(fused_mixin, FluxSingleTransformerBlock):
        diffusers_class = FluxSingleTransformerBlock

        def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                    joint_attention_kwargs=None):
            text_seq_len = encoder_hidden_states.shape[1]
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

            residual = hidden_states
            norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
            mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
            joint_attention_kwargs = joint_attention_kwargs or {}
            attn_output = self.attn(
                hidden_states=norm_hidden_states,
                image_rotary_emb=image_rotary_emb,
                **joint_attention_kwargs,
            )

            projected = split_projection(self.proj_out, attn_output, mlp_hidden_states)
            if projected is None:  # diffusers' concatenation, then the projection
                projected = self.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2))
            hidden_states = F.gated_residual(residual, projected, gate)
            if hidden_states.dtype == torch.float16:
                hidden_states = hidden_states.clip(-65504, 65504)

            encoder_hidden_states, hidden_states = hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
            return encoder_hidden_states, hidden_states

    return FusedFluxSingleTransformerBlock, lambda block: True


def split_projection(linear, first, second):
    """`linear(torch.cat([first, second], dim=-1))` without the concatenation, or None where that
    is not done. FLUX's single block concatenates the attention output (C wide) and the MLP's
    activations (4C) only to project them: the 5C-wide copy moves more bytes than every other
    elementwise pass of the block's forward. Here the projection's weight is split by columns and
    the second GEMM accumulates into the first's output (`addmm_`): same math, one extra bf16
    rounding of the partial sum. Only for a frozen plain nn.Linear (LoRA training, rollouts; a
    trained weight's gradient would be assembled from two slices) and off the reference path
    (diffusers' bits there)."""
    if type(linear) is not torch.nn.Linear or linear.weight.requires_grad or (
            linear.bias is not None and linear.bias.requires_grad) or runs_reference("layer_norm_modulate", first.device):
        return None
    # calling the projection must compute nothing but its weights: no hooks (offloading, layerwise
    # casting move or cast them around the call), the weights already on the activations' device
    if not unhooked(linear) or global_module_hooks() or linear.weight.device != first.device:
        return None
    weight, bias = linear.weight, linear.bias
    autocast = autocast_dtype(device_type(first.device))
    if autocast is not None:  # what autocast would hand the GEMM
        if torch.float64 in (first.dtype, second.dtype, weight.dtype):
            return None  # autocast leaves float64 alone: diffusers' call
        dtype = autocast
    else:
        dtype = first.dtype
        if any(t is not None and t.dtype != dtype for t in (second, weight, bias)):
            return None  # mixed dtypes without autocast: diffusers' call (and its error, if any)
    width = first.shape[-1]
    rows = first.reshape(-1, width).to(dtype)
    rest = second.reshape(-1, second.shape[-1]).to(dtype)
    head, tail = weight[:, :width].to(dtype), weight[:, width:].to(dtype)
    out = rows @ head.t() if bias is None else torch.addmm(bias.to(dtype), rows, head.t())
    out.addmm_(rest, tail.t())
    return out.view(*first.shape[:-1], weight.shape[0])


def _plain_layer_norm(norm) -> bool:
    from sfgrpo.models.fused_norms import plain_layer_norm

    return plain_layer_norm(norm)


FACTORIES = (joint_transformer_block, flux_transformer_block, flux_single_transformer_block)
