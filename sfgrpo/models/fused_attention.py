"""FLUX attention's QK-norm and rotary embedding through `sfgrpo.qk_norm_rope`.

diffusers' `FluxAttnProcessor` normalises q and k per head (`torch.nn.RMSNorm`: one kernel on CUDA,
and its backward), concatenates text and image tokens, then rotates q and k with `apply_rotary_emb`
in fp32: ~7 full-size kernels per tensor with fp32 intermediates (neg, stack, two casts up, two
products, the sum, the cast down) and as many in the backward; in a FLUX.1 double block that is
most of the elementwise traffic left once the norms and block tails are fused. The twin's forward
is diffusers' processor line for line with, per stream, norm + rotation as one pass
(`sfgrpo.qk_norm_rope`, each stream with its rows of the cos / sin tables) before the
concatenation, so q and k are each read and written once.

`FluxAttention` modules are swapped (by `sfgrpo.models.fused_norms.fuse_norms`) for a subclass whose
forward runs the twin when the module's processor is diffusers' plain `FluxAttnProcessor` (no
IP-adapter, no context parallelism), the rotary embedding is the (cos, sin) pair FLUX's
`FluxPosEmbed` makes, the norms are plain `torch.nn.RMSNorm` over the head dim and the fused op
runs its kernels (CUDA, or the triton backend); anything else, and the reference backend (CPU),
runs diffusers' processor itself: bit-exact there. Only where diffusers' processor and rotation
are sources this module was written against and tested with (digests in `_VERIFIED`).
"""

from __future__ import annotations

import torch

from sfgrpo import functional as F
from sfgrpo.backend import resolve_backend, traced_reference
from sfgrpo.models.fused_blocks import source_digest

# sha256[:16] of the dedented sources the twin mirrors, per diffusers release checked
_VERIFIED = {
    "FluxAttnProcessor.__call__": {"0.42.1": "6af7ff9528985bcc"},
    "apply_rotary_emb": {"0.42.1": "a25267d425f8c5ea"},
}


def _sources():
    from diffusers.models import embeddings
    from diffusers.models.transformers import transformer_flux

    return {"FluxAttnProcessor.__call__": transformer_flux.FluxAttnProcessor.__call__,
            "apply_rotary_emb": embeddings.apply_rotary_emb}


def digests() -> dict[str, str | None]:
    """The installed diffusers' digests of the sources the twin mirrors (to extend `_VERIFIED`)."""
    return {name: source_digest(function) for name, function in _sources().items()}


def verified() -> bool:
    """Whether the installed diffusers' FLUX processor and rotation are the ones the twin mirrors."""
    try:
        found = digests()
    except ImportError:
        return False
    return all(found[name] in _VERIFIED[name].values() for name in _VERIFIED)


def _plain_head_norm(norm, head_dim: int) -> bool:
    return type(norm) is torch.nn.RMSNorm and tuple(norm.normalized_shape) == (head_dim,)


def _kernel_path(x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return not traced_reference(x.device)
    return resolve_backend("qk_norm_rope", x.device) != "reference"


def _rotary_tables(image_rotary_emb, tokens: int, head_dim: int):
    """(cos, sin) when `image_rotary_emb` is FLUX's pair of [tokens, head_dim] tables the fused op
    takes, else None."""
    if not isinstance(image_rotary_emb, (tuple, list)) or len(image_rotary_emb) != 2:
        return None
    cos, sin = image_rotary_emb
    for table in (cos, sin):
        if not isinstance(table, torch.Tensor) or table.shape != (tokens, head_dim) or table.dtype not in F.RMS_NORM_DTYPES:
            return None
    return cos, sin


def _norm_rope(norm, x, cos, sin):
    """`apply_rotary_emb(norm(x), ...)` for one stream's rows of the tables, one pass."""
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps  # torch.nn.RMSNorm's default
    return F.qk_norm_rope(x, cos, sin, norm.weight, eps)


def flux_attention(fused_mixin):
    from diffusers.models.transformers import transformer_flux
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    class FusedFluxAttention(fused_mixin, FluxAttention):
        diffusers_class = FluxAttention

        def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                    **kwargs):
            processor = self.processor
            tables = None
            if (type(processor) is FluxAttnProcessor and not kwargs and processor._parallel_config is None
                    and hidden_states.dtype in F.RMS_NORM_DTYPES and _kernel_path(hidden_states)):
                joint = self.added_kv_proj_dim is not None
                if joint == (encoder_hidden_states is not None):  # else diffusers' own handling of it
                    text = encoder_hidden_states.shape[1] if joint else 0
                    tables = _rotary_tables(image_rotary_emb, text + hidden_states.shape[1], self.head_dim)
            if tables is None:
                return super().forward(hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
            return _fused_flux_attention(processor, self, hidden_states, encoder_hidden_states, attention_mask,
                                         tables)

    def _fused_flux_attention(processor, attn, hidden_states, encoder_hidden_states, attention_mask, tables):
        """FluxAttnProcessor.__call__ (diffusers 0.42.1) with norm -> cat -> rotation replaced by
        per-stream norm + rotation (one pass each) -> cat."""
        cos, sin = tables
        query, key, value, encoder_query, encoder_key, encoder_value = transformer_flux._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            text = encoder_query.shape[1]  # text tokens first, as diffusers concatenates them
            query = torch.cat([_norm_rope(attn.norm_added_q, encoder_query, cos[:text], sin[:text]),
                               _norm_rope(attn.norm_q, query, cos[text:], sin[text:])], dim=1)
            key = torch.cat([_norm_rope(attn.norm_added_k, encoder_key, cos[:text], sin[:text]),
                             _norm_rope(attn.norm_k, key, cos[text:], sin[text:])], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        else:
            query = _norm_rope(attn.norm_q, query, cos, sin)
            key = _norm_rope(attn.norm_k, key, cos, sin)

        hidden_states = transformer_flux.dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=processor._attention_backend,
            parallel_config=processor._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states

    def supported(attn) -> bool:
        norms = [attn.norm_q, attn.norm_k]
        if attn.added_kv_proj_dim is not None:
            norms += [attn.norm_added_q, attn.norm_added_k]
        return all(_plain_head_norm(norm, attn.head_dim) for norm in norms)

    return FusedFluxAttention, supported


FACTORIES = (flux_attention,)


def support() -> dict[str, str]:
    """`sfgrpo info`: whether `fuse_norms` gives FLUX attention the fused QK-norm + rotation."""
    try:
        _sources()
    except ImportError:
        return {"FluxAttention": "not in the installed diffusers"}
    return {"FluxAttention": "fused QK-norm + rotary embedding" if verified()
            else "diffusers' processor (this version of it is not verified)"}
