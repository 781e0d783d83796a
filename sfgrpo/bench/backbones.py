"""Transformer-only backbones for benchmarking: a real-architecture diffusers transformer with random
weights behind the trainer's backbone interface, without text encoders or a VAE.

What the benchmark measures is the RL loop around the transformer (rollout, look-ahead, PPO update),
so the text conditioning is a fixed random embedding per prompt (of the shapes the real pipeline
produces) and `decode` is a cheap fixed projection of the latents to RGB. Velocity calls reuse the
SD3 / FLUX backbone code unchanged, so the transformer sees exactly what it sees in training.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import torch
from torch import Tensor, nn

from sfgrpo.bench import configs
from sfgrpo.models.pipelines import FluxBackbone, PipelineOptions, SD3Backbone
from sfgrpo.schedules import Schedule


class _TransformerOnly:
    """Mixin replacing the pipeline parts of `PipelineBackbone` (text encoders, VAE)."""

    def _setup(self, transformer: nn.Module, options: PipelineOptions, text_tokens: int, pooled_dim: int):
        nn.Module.__init__(self)
        self.options = options
        self.transformer = transformer
        self.vae_scale_factor = configs.VAE_SCALE
        self.text_tokens, self.pooled_dim = text_tokens, pooled_dim
        self.text_dim = transformer.config.joint_attention_dim

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        # a deterministic embedding per prompt string (seeded by its CRC), generated on the CPU
        embeds, pooled = [], []
        for prompt in prompts:
            generator = torch.Generator().manual_seed(zlib.crc32(str(prompt).encode()))
            embeds.append(torch.randn(1, self.text_tokens, self.text_dim, generator=generator))
            pooled.append(torch.randn(1, self.pooled_dim, generator=generator))
        return (torch.cat(embeds).to(self.device, self.dtype), torch.cat(pooled).to(self.device, self.dtype))

    def null_condition(self, batch: int) -> tuple[Tensor, Tensor]:
        embeds, pooled = self.encode_prompts([""])
        return embeds.expand(batch, -1, -1), pooled.expand(batch, -1)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latent channels averaged in three interleaved groups -> RGB in [0, 1], upsampled (nearest) to
        the pipeline's pixel size so rewards see images of the real size (no VAE)."""
        z = self._to_vae_latents(latents).float()
        rgb = torch.sigmoid(torch.stack([z[:, c::3].mean(1) for c in range(3)], dim=1))
        return torch.nn.functional.interpolate(rgb, scale_factor=self.vae_scale_factor, mode="nearest")

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        return Schedule.sd3(num_steps, 3.0).sigmas


class BenchSD3Backbone(_TransformerOnly, SD3Backbone):
    def __init__(self, transformer, options: PipelineOptions, text_tokens: int):
        self._setup(transformer, options, text_tokens, transformer.config.pooled_projection_dim)


class BenchFluxBackbone(_TransformerOnly, FluxBackbone):
    def __init__(self, transformer, options: PipelineOptions, text_tokens: int):
        self._setup(transformer, options, text_tokens, transformer.config.pooled_projection_dim)

    @property
    def latent_channels(self) -> int:
        return self.transformer_config.in_channels // 4


def build_backbone(name: str, resolution: int, text_tokens: int | None = None, device: str = "cpu",
                   dtype: torch.dtype = torch.float32, seed: int = 0, transformer: nn.Module | None = None):
    """A named transformer config (`configs.TRANSFORMERS`) with seeded random weights drawn on `device`
    (`configs.random_transformer`), ready for `Trainer(model=...)`; or around a given `transformer` of
    that config (the benchmark runner's shared weights, `SharedWeights`)."""
    if transformer is None:
        transformer = configs.random_transformer(name, device, dtype, seed)
    family = configs.family(name)
    options = PipelineOptions(resolution=resolution, model_dtype=str(dtype).removeprefix("torch."))
    tokens = text_tokens or configs.TEXT_TOKENS[family]
    backbone_class = BenchSD3Backbone if family == "sd3" else BenchFluxBackbone
    return backbone_class(transformer, options, tokens)

