"""FLUX attention's QK-norm and rotary embedding through `sfgrpo.qk_norm_rope`.

diffusers' FLUX.1 / FLUX.2 attention processors normalise q and k per head (`torch.nn.RMSNorm`: one
kernel on CUDA, and its backward), concatenate text and image tokens, then rotate q and k with
`apply_rotary_emb` in fp32: ~7 full-size kernels per tensor with fp32 intermediates (neg, stack,
two casts up, two products, the sum, the cast down) and as many in the backward; in a FLUX.1 block
that is most of the elementwise traffic left once the norms and block tails are fused. The twins'
forwards are diffusers' processors line for line with, per stream, norm + rotation as one pass
(`sfgrpo.qk_norm_rope`, each stream with its rows of the cos / sin tables) before the
concatenation, so q and k are each read and written once.

Swapped by `sfgrpo.models.fused_norms.fuse_norms`: `FluxAttention` (FLUX.1, Chroma),
`Flux2Attention` and `Flux2ParallelSelfAttention` (FLUX.2) become subclasses whose forward runs the
twin when the module's processor is diffusers' plain one (`FluxAttnProcessor`, `Flux2AttnProcessor`,
`Flux2ParallelSelfAttnProcessor`: no IP-adapter, no KV cache, no context parallelism, no extra
kwargs), the rotary embedding is the (cos, sin) pair of `[tokens, head_dim]` tables FLUX's position
embedders make, the norms are plain `torch.nn.RMSNorm` over the head dim and the fused op runs its
kernels (CUDA, or the triton backend); anything else, and the reference backend (CPU), runs
diffusers' processor itself: bit-exact there. Only where diffusers' processor and rotation are the
sources this module was written against and tested with (digests in `_VERIFIED`).
"""

from __future__ import annotations

import torch

from sfgrpo import functional as F
from sfgrpo.backend import runs_reference
from sfgrpo.models.class_swap import global_module_hooks, unhooked
from sfgrpo.models.fused_blocks import source_digest, split_projection

# sha256[:16] of the dedented sources the twins mirror, per diffusers release checked
_VERIFIED = {
    "FluxAttnProcessor.__call__": {"0.42.1": "6af7ff9528985bcc"},
    "Flux2AttnProcessor.__call__": {"0.42.1": "e3f195d59c330a7b"},
    "Flux2ParallelSelfAttnProcessor.__call__": {"0.42.1": "31019376b6209552"},
    "apply_rotary_emb": {"0.42.1": "a25267d425f8c5ea"},
}
# attention class -> (diffusers module, its plain processor)
_ATTENTIONS = {
    "FluxAttention": ("diffusers.models.transformers.transformer_flux", "FluxAttnProcessor"),
    "Flux2Attention": ("diffusers.models.transformers.transformer_flux2", "Flux2AttnProcessor"),
    "Flux2ParallelSelfAttention": ("diffusers.models.transformers.transformer_flux2", "Flux2ParallelSelfAttnProcessor"),
}


def _classes(name: str):
    """(diffusers module, attention class, processor class) of one twin; ImportError when absent."""
    import importlib

    module_name, processor = _ATTENTIONS[name]
    module = importlib.import_module(module_name)
    try:
        return module, getattr(module, name), getattr(module, processor)
    except AttributeError as err:
        raise ImportError(str(err)) from err


def digests(name: str = "FluxAttention") -> dict[str, str | None]:
    """The installed diffusers' digests of the sources a twin mirrors (to extend `_VERIFIED`)."""
    from diffusers.models import embeddings

    _, _, processor = _classes(name)
    return {f"{processor.__name__}.__call__": source_digest(processor.__call__),
            "apply_rotary_emb": source_digest(embeddings.apply_rotary_emb)}


def verified(name: str = "FluxAttention") -> bool:
    """Whether the installed diffusers' processor of `name` and its rotation are the ones the twin
    mirrors."""
    try:
        found = digests(name)
    except ImportError:
        return False
    return all(digest in _VERIFIED.get(source, {}).values() for source, digest in found.items())


def _plain_head_norm(norm, head_dim: int) -> bool:
    return type(norm) is torch.nn.RMSNorm and tuple(norm.normalized_shape) == (head_dim,)


def _rotary_tables(image_rotary_emb, tokens: int, head_dim: int, device):
    """(cos, sin) when `image_rotary_emb` is FLUX's pair of [tokens, head_dim] tables the fused op
    takes (on the activations' device, no gradient wanted for them: diffusers would move them and
    differentiate through them), else None."""
    if not isinstance(image_rotary_emb, (tuple, list)) or len(image_rotary_emb) != 2:
        return None
    cos, sin = image_rotary_emb
    for table in (cos, sin):
        if (not isinstance(table, torch.Tensor) or table.shape != (tokens, head_dim)
                or table.dtype not in F.RMS_NORM_DTYPES or table.device != device
                or (table.requires_grad and torch.is_grad_enabled())):
            return None
    return cos, sin


def _norm_rope(norm, x, cos, sin):
    """`apply_rotary_emb(norm(x), ...)` for one stream's rows of the tables, one pass."""
    # torch.nn.RMSNorm's default eps: that of its compute dtype (fp32 for half-precision inputs)
    eps = norm.eps if norm.eps is not None else torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
    return F.qk_norm_rope(x, cos, sin, norm.weight, eps)


def _fusable_tables(attn, processor_cls, kwargs, hidden_states, text_tokens: int, image_rotary_emb):
    """FLUX's (cos, sin) tables when the twin may run (the module's processor is diffusers' plain
    one, nothing extra asked of it, the fused op runs its kernels), else None: diffusers' forward."""
    processor = attn.processor
    if (type(processor) is not processor_cls or kwargs or processor._parallel_config is not None
            or hidden_states.dtype not in F.RMS_NORM_DTYPES or runs_reference("qk_norm_rope", hidden_states.device)):
        return None
    if not _norm_weights_readable(attn, hidden_states.device):
        return None
    return _rotary_tables(image_rotary_emb, text_tokens + hidden_states.shape[1], attn.head_dim,
                          hidden_states.device)


def _norm_weights_readable(attn, device) -> bool:
    """The twin reads the QK norms' weights instead of calling the norms: only where that is the
    same (no hooks that would move or cast them, the weights already on the activations' device)."""
    if global_module_hooks():
        return False
    return all(unhooked(norm) and (norm.weight is None or norm.weight.device == device) for norm in _norms(attn))


def _joint_qkv(attn, query, key, value, encoder_query, encoder_key, encoder_value, tables):
    """Per stream: unflatten to heads, norm + rotation of q and k in one pass; then text before
    image as diffusers concatenates them (the rotation rows follow: text's first)."""
    cos, sin = tables
    query = query.unflatten(-1, (-1, attn.head_dim))
    key = key.unflatten(-1, (-1, attn.head_dim))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if encoder_query is None:
        return _norm_rope(attn.norm_q, query, cos, sin), _norm_rope(attn.norm_k, key, cos, sin), value
    encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
    encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
    encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
    text = encoder_query.shape[1]
    query = torch.cat([_norm_rope(attn.norm_added_q, encoder_query, cos[:text], sin[:text]),
                       _norm_rope(attn.norm_q, query, cos[text:], sin[text:])], dim=1)
    key = torch.cat([_norm_rope(attn.norm_added_k, encoder_key, cos[:text], sin[:text]),
                     _norm_rope(attn.norm_k, key, cos[text:], sin[text:])], dim=1)
    return query, key, torch.cat([encoder_value, value], dim=1)


def _attention(module, processor, query, key, value, attention_mask):
    """diffusers' attention call as the processors make it, then heads flattened and cast."""
    hidden_states = module.dispatch_attention_fn(
        query,
        key,
        value,
        attn_mask=attention_mask,
        backend=processor._attention_backend,
        parallel_config=processor._parallel_config,
    )
    return hidden_states.flatten(2, 3).to(query.dtype)


def _two_stream(name: str, fused_mixin, project_out):
    """A twin of a two-stream attention (FLUX.1's / FLUX.2's double blocks, FLUX.1's single blocks);
    `project_out(attn, hidden_states, encoder_hidden_states)` is the processor's tail after the
    attention (which differs between FLUX.1 and FLUX.2)."""
    module, attention_cls, processor_cls = _classes(name)

    class FusedAttention(fused_mixin, attention_cls):
        diffusers_class = attention_cls

        def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                    **kwargs):
            tables = None
            joint = self.added_kv_proj_dim is not None
            if joint == (encoder_hidden_states is not None):  # else diffusers' own handling of it
                text = encoder_hidden_states.shape[1] if joint else 0
                tables = _fusable_tables(self, processor_cls, kwargs, hidden_states, text, image_rotary_emb)
            if tables is None:
                return super().forward(hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
            projections = module._get_qkv_projections(self, hidden_states, encoder_hidden_states)
            if not joint:  # diffusers' fused projections hand back (None,) here, which it never reads
                projections = (*projections[:3], None, None, None)
            query, key, value = _joint_qkv(self, *projections, tables)
            hidden_states = _attention(module, self.processor, query, key, value, attention_mask)
            if encoder_hidden_states is None:
                return project_out(self, hidden_states, None)
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            return project_out(self, hidden_states, encoder_hidden_states)

    FusedAttention.__name__ = FusedAttention.__qualname__ = f"Fused{name}"
    return FusedAttention, _supported


def _flux_out(attn, hidden_states, encoder_hidden_states):
    """FluxAttnProcessor's tail (diffusers 0.42.1)."""
    if encoder_hidden_states is None:
        return hidden_states
    hidden_states = attn.to_out[0](hidden_states.contiguous())
    hidden_states = attn.to_out[1](hidden_states)
    encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
    return hidden_states, encoder_hidden_states


def _flux2_out(attn, hidden_states, encoder_hidden_states):
    """Flux2AttnProcessor's tail (diffusers 0.42.1)."""
    if encoder_hidden_states is not None:
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if encoder_hidden_states is not None:
        return hidden_states, encoder_hidden_states
    return hidden_states


def flux_attention(fused_mixin):
    return _two_stream("FluxAttention", fused_mixin, _flux_out)


def flux2_attention(fused_mixin):
    return _two_stream("Flux2Attention", fused_mixin, _flux2_out)


def flux2_parallel_self_attention(fused_mixin):
    """FLUX.2's single blocks: q, k, v and the MLP input from one projection, attention and MLP
    outputs concatenated into one output projection (Flux2ParallelSelfAttnProcessor); that
    projection split in two GEMMs where its weight is frozen (`split_projection`)."""
    module, attention_cls, processor_cls = _classes("Flux2ParallelSelfAttention")

    class FusedFlux2ParallelSelfAttention(fused_mixin, attention_cls):
        diffusers_class = attention_cls

        def forward(self, hidden_states, attention_mask=None, image_rotary_emb=None, **kwargs):
            tables = _fusable_tables(self, processor_cls, kwargs, hidden_states, 0, image_rotary_emb)
            if tables is None:
                return super().forward(hidden_states, attention_mask, image_rotary_emb, **kwargs)
            hidden_states = self.to_qkv_mlp_proj(hidden_states)
            qkv_dim = 3 * self.inner_dim
            mlp_dim = self.mlp_hidden_dim * self.mlp_mult_factor
            local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
            qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
            query, key, value = _joint_qkv(self, *qkv.chunk(3, dim=-1), None, None, None, tables)
            hidden_states = _attention(module, self.processor, query, key, value, attention_mask)
            mlp_hidden_states = self.mlp_act_fn(mlp_hidden_states)
            # the output projection of the concatenation, without it where the weight is frozen
            projected = split_projection(self.to_out, hidden_states, mlp_hidden_states)
            if projected is not None:
                return projected
            hidden_states = torch.cat([hidden_states, mlp_hidden_states], dim=-1)
            return self.to_out(hidden_states)

    return FusedFlux2ParallelSelfAttention, _supported


def _norms(attn) -> list:
    """The QK norms the twin reads: both streams' where the module has a text stream."""
    norms = [attn.norm_q, attn.norm_k]
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        norms += [attn.norm_added_q, attn.norm_added_k]
    return norms


def _supported(attn) -> bool:
    return all(_plain_head_norm(norm, attn.head_dim) for norm in _norms(attn))


# attention class -> factory of its twin
FACTORIES = {"FluxAttention": flux_attention, "Flux2Attention": flux2_attention,
             "Flux2ParallelSelfAttention": flux2_parallel_self_attention}


def support() -> dict[str, str]:
    """`sfgrpo info`: per attention class, whether `fuse_norms` gives it the fused QK-norm + rotation."""
    report = {}
    for name in _ATTENTIONS:
        try:
            _classes(name)
        except ImportError:
            report[name] = "not in the installed diffusers"
            continue
        report[name] = ("fused QK-norm + rotary embedding" if verified(name)
                        else "diffusers' processor (this version of it is not verified)")
    return report
