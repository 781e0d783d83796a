"""Transformer configs the benchmark builds with random weights: the published diffusers configs of
SD3.5-Medium and FLUX.1-dev (written here, so nothing is downloaded), and scaled-down twins of the
same architectures that run in seconds on a CPU.

Values copied from the `transformer/config.json` of `stabilityai/stable-diffusion-3.5-medium` and
`black-forest-labs/FLUX.1-dev` on the Hugging Face Hub.
"""

from __future__ import annotations

import torch

SD35_MEDIUM = dict(
    family="sd3", sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),  # MMDiT-X: layers 0..12 add a second, image-only attention
)

FLUX1_DEV = dict(
    family="flux", patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# Same block types as the real ones (dual attention, qk-norm; FLUX's double + single blocks), two
# orders of magnitude fewer parameters: what a CPU can run a few iterations of.
SD35_MEDIUM_SMALL = dict(
    SD35_MEDIUM, num_layers=2, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
    caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=32, dual_attention_layers=(0,),
)

FLUX1_DEV_SMALL = dict(
    FLUX1_DEV, num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
    joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12),
)

TRANSFORMERS = {
    "sd35m": SD35_MEDIUM,
    "flux1-dev": FLUX1_DEV,
    "sd35m-small": SD35_MEDIUM_SMALL,
    "flux1-dev-small": FLUX1_DEV_SMALL,
}

# what each family's pipeline feeds the transformer at 512 px: text tokens (CLIP 77 + T5 256 for
# SD3; T5 512 for FLUX) and the VAE's downsampling
TEXT_TOKENS = {"sd3": 333, "flux": 512}
VAE_SCALE = 8


def transformer_config(name: str) -> dict:
    """The diffusers constructor arguments of a named transformer (without our `family` key)."""
    if name not in TRANSFORMERS:
        raise ValueError(f"unknown transformer config {name!r}; known: {sorted(TRANSFORMERS)}")
    config = dict(TRANSFORMERS[name])
    config.pop("family")
    return config


def family(name: str) -> str:
    return TRANSFORMERS[name]["family"]


def build_transformer(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A randomly initialised diffusers transformer of the named config. `device="meta"` allocates
    nothing (parameter counts of the 12B FLUX on any machine)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    model_class = SD3Transformer2DModel if family(name) == "sd3" else FluxTransformer2DModel
    # built directly in `dtype` on `device`: FLUX.1-dev in fp32 first would need 48 GB before any cast
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_class(**transformer_config(name))
    finally:
        torch.set_default_dtype(previous)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
