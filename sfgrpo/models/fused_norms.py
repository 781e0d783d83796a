"""sfgrpo's fused normalisation ops inside a diffusers transformer.

A DiT block spends a large share of its eager time outside the matmuls and attention, in the
normalisations around them: diffusers' adaLN modulation `norm(x) * (1 + scale) + shift` is four
full-size kernels, the QK RMSNorm of SD3.5 / FLUX attention about eight (casts, pow, mean, rsqrt,
products), on every block of every forward and again in the backward. `fuse_norms` swaps those
modules for subclasses whose forward runs `sfgrpo.layer_norm_modulate` / `sfgrpo.rms_norm`
(one pass each; Triton on CUDA). Nothing else changes: same parameters and state-dict keys, same
outputs, and on CPU (or with SFGRPO_BACKEND=reference) the ops run diffusers' own expressions op
for op, so the swap is bit-exact there. On CUDA the fused kernels compute in fp32 and round once
(diffusers rounds after every op in bf16), and under autocast they write the autocast dtype
that the next Linear / attention would cast to anyway.

The blocks around them (SD3's JointTransformerBlock, FLUX's double and single blocks) are swapped
too, for twins that run their gated residuals and norm2's modulation through
`sfgrpo.gated_residual[_layer_norm_modulate]` (`sfgrpo.models.fused_blocks`; only where the
installed diffusers' block forward is one that module was verified against), and so is FLUX's
attention, whose QK-norm and rotary embedding run as one pass per stream
(`sfgrpo.models.fused_attention`, verified the same way).

Only modules whose configuration the fused ops reproduce are swapped (a plain LayerNorm without
affine parameters; an RMSNorm without bias): anything else keeps diffusers' forward.
`unfuse_norms` swaps them back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sfgrpo import functional as F
from sfgrpo.backend import runs_reference
from sfgrpo.models import fused_attention, fused_blocks
from sfgrpo.models.class_swap import swap_back, swap_in, swapped_count

__all__ = ["fuse_norms", "unfuse_norms", "fused_norm_count"]


def plain_layer_norm(norm) -> bool:
    """A LayerNorm the fused op reproduces: exactly nn.LayerNorm (not FP32LayerNorm, which
    rounds in between), without weight and bias, normalising one dimension."""
    return (type(norm) is nn.LayerNorm and not norm.elementwise_affine and len(norm.normalized_shape) == 1)


def _reference_path(x: Tensor) -> bool:
    """Whether the fused ops run their reference (diffusers' expressions) on x's device."""
    return runs_reference("layer_norm_modulate", x.device)


class _Fused:
    """Mixin of the swapped classes: the diffusers class they replace, for `unfuse_norms`."""

    diffusers_class: type


def _ada_layer_norm_zero():
    from diffusers.models.normalization import AdaLayerNormZero

    class FusedAdaLayerNormZero(_Fused, AdaLayerNormZero):
        diffusers_class = AdaLayerNormZero

        def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
            if self.emb is not None:
                emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
            emb = self.linear(self.silu(emb))
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
            x = F.layer_norm_modulate(x, scale_msa, shift_msa, self.norm.eps)
            return x, gate_msa, shift_mlp, scale_mlp, gate_mlp

    return FusedAdaLayerNormZero, lambda m: plain_layer_norm(m.norm)


def _ada_layer_norm_zero_single():
    from diffusers.models.normalization import AdaLayerNormZeroSingle

    class FusedAdaLayerNormZeroSingle(_Fused, AdaLayerNormZeroSingle):
        diffusers_class = AdaLayerNormZeroSingle

        def forward(self, x, emb=None):
            emb = self.linear(self.silu(emb))
            shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
            return F.layer_norm_modulate(x, scale_msa, shift_msa, self.norm.eps), gate_msa

    return FusedAdaLayerNormZeroSingle, lambda m: plain_layer_norm(m.norm)


def _sd35_ada_layer_norm_zero_x():
    from diffusers.models.normalization import SD35AdaLayerNormZeroX

    class FusedSD35AdaLayerNormZeroX(_Fused, SD35AdaLayerNormZeroX):
        """Two modulations of one LayerNorm (SD3.5's dual-attention blocks): two fused passes,
        each re-normalising x (one extra read instead of diffusers' stored LN output and 8 kernels)."""

        diffusers_class = SD35AdaLayerNormZeroX

        def forward(self, hidden_states, emb=None):
            if _reference_path(hidden_states):
                # diffusers' code: one LayerNorm shared by both modulations (bit-exact gradients)
                return super().forward(hidden_states, emb)
            emb = self.linear(self.silu(emb))
            (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2,
             gate_msa2) = emb.chunk(9, dim=1)
            eps = self.norm.eps
            first = F.layer_norm_modulate(hidden_states, scale_msa, shift_msa, eps)
            second = F.layer_norm_modulate(hidden_states, scale_msa2, shift_msa2, eps)
            return first, gate_msa, shift_mlp, scale_mlp, gate_mlp, second, gate_msa2

    return FusedSD35AdaLayerNormZeroX, lambda m: plain_layer_norm(m.norm)


def _ada_layer_norm_continuous():
    from diffusers.models.normalization import AdaLayerNormContinuous

    class FusedAdaLayerNormContinuous(_Fused, AdaLayerNormContinuous):
        diffusers_class = AdaLayerNormContinuous

        def forward(self, x: Tensor, conditioning_embedding: Tensor) -> Tensor:
            emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
            scale, shift = emb.chunk(2, dim=1)
            return F.layer_norm_modulate(x, scale, shift, self.norm.eps)

    return FusedAdaLayerNormContinuous, lambda m: plain_layer_norm(m.norm)


def _rms_norm():
    from diffusers.models.normalization import RMSNorm

    class FusedRMSNorm(_Fused, RMSNorm):
        diffusers_class = RMSNorm

        def forward(self, hidden_states: Tensor) -> Tensor:
            if hidden_states.dtype not in F.RMS_NORM_DTYPES or (
                    self.weight is not None and self.weight.dtype not in F.RMS_NORM_DTYPES):
                # float64 (the op takes 2- and 4-byte floats only): diffusers' code, as unswapped
                return super().forward(hidden_states)
            return F.rms_norm(hidden_states, self.weight, self.eps)

    def supported(module) -> bool:
        # diffusers' NPU branch and the bias variant are not what the fused op computes
        from diffusers.utils import is_torch_npu_available

        return module.bias is None and len(module.dim) == 1 and not is_torch_npu_available()

    return FusedRMSNorm, supported


def _blocks():
    """The DiT blocks whose elementwise tail runs fused (sfgrpo.models.fused_blocks), each only
    where diffusers' forward of it is one the fused twin was verified against."""
    for factory in fused_blocks.FACTORIES:
        try:
            fused, supported = factory(_Fused)
        except ImportError:
            continue
        if fused_blocks.verified(fused.diffusers_class):
            yield fused, supported


def _attention():
    """The attention modules whose QK-norm and rotation run fused (sfgrpo.models.fused_attention),
    each only where diffusers' processor of it is one the twin was verified against."""
    for name, factory in fused_attention.FACTORIES.items():
        if not fused_attention.verified(name):
            continue
        try:
            yield factory(_Fused)
        except ImportError:
            continue


_FACTORIES = (_ada_layer_norm_zero, _ada_layer_norm_zero_single, _sd35_ada_layer_norm_zero_x,
              _ada_layer_norm_continuous, _rms_norm)
_SWAPS: dict[type, tuple[type, object]] | None = None


def _swaps() -> dict[type, tuple[type, object]]:
    """diffusers class -> (fused subclass, whether a module's configuration is supported); built on
    first use, so importing sfgrpo does not import diffusers. A diffusers without one of the classes
    simply has nothing of it to swap."""
    global _SWAPS
    if _SWAPS is None:
        swaps = {}
        for factory in _FACTORIES:
            try:
                fused, supported = factory()
            except ImportError:
                continue
            swaps[fused.diffusers_class] = (fused, supported)
        for fused, supported in (*_blocks(), *_attention()):
            swaps[fused.diffusers_class] = (fused, supported)
        for fused, _ in swaps.values():  # importable by name (`__getattr__` below): a fused model pickles
            fused.__module__, fused.__qualname__ = __name__, fused.__name__
        _SWAPS = swaps
    return _SWAPS


def __getattr__(name: str):
    """The fused classes by name (built on first use: diffusers is imported only then)."""
    if name.startswith("Fused"):
        for fused, _ in _swaps().values():
            if fused.__name__ == name:
                return fused
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fuse_norms(model: nn.Module) -> int:
    """Swaps, in place, every adaLN modulation (AdaLayerNormZero, AdaLayerNormZeroSingle,
    SD35AdaLayerNormZeroX, AdaLayerNormContinuous over a plain LayerNorm), RMSNorm (no bias) and
    verified DiT block (JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock) and
    verified FLUX.1 / FLUX.2 attention (QK-norm + rotary embedding in one pass) in `model` for its
    fused twin; returns how many modules were swapped. Exact class matches only: a
    subclass of a diffusers module may compute something else. Idempotent."""
    swaps = _swaps()

    def twin_of(module):
        entry = swaps.get(type(module))
        return entry[0] if entry is not None and entry[1](module) else None

    return swap_in(model, twin_of)


def unfuse_norms(model: nn.Module) -> int:
    """Undoes `fuse_norms`; returns how many modules were swapped back."""
    return swap_back(model, _Fused, "diffusers_class")


def fused_norm_count(model: nn.Module) -> int:
    """How many of `model`'s modules run sfgrpo's fused norms."""
    return swapped_count(model, _Fused)
