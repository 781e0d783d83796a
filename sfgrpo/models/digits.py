"""The built-in backbone: a small class-conditional `diffusers.SD3Transformer2DModel` flow model
on scikit-learn's 8x8 handwritten digits (1,797 images shipped inside sklearn: no download).

There is no VAE: the 8x8x1 pixels, rescaled from sklearn's 0..16 to [-1, 1], are the latents, and
`decode` is the inverse rescale to [0, 1]. The "text encoder" is `ClassConditioner`: every class
(plus one extra *null* class used for classifier-free guidance) owns a few learned text tokens and
a pooled vector, fed to SD3's joint attention and its adaLN exactly as real text embeddings are.
Prompts are the digit classes as ints 0..9.

The weights in `sfgrpo/assets/` are written by `python -m sfgrpo.models.train_digits`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn

ASSET_PACKAGE = "sfgrpo.assets"
BACKBONE_WEIGHTS = "digits_backbone.safetensors"
BACKBONE_CONFIG = "digits_backbone.json"


@dataclass
class DigitsConfig:
    """Shape of the built-in model (saved next to its weights)."""

    image_size: int = 8
    channels: int = 1
    num_classes: int = 10
    num_layers: int = 4
    num_heads: int = 2
    head_dim: int = 32
    text_tokens: int = 4  # learned "text" tokens per class
    text_dim: int = 64  # width of those tokens (SD3's joint_attention_dim)
    pooled_dim: int = 64  # width of the pooled class vector (SD3's pooled_projection_dim)


def load_digits_data() -> tuple[Tensor, Tensor]:
    """All 1,797 sklearn digits as float32 `[N, 1, 8, 8]` in [-1, 1] and int64 labels `[N]`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return images, torch.as_tensor(digits.target, dtype=torch.int64)


def pixels_to_images(latents: Tensor) -> Tensor:
    """Latents in [-1, 1] (pixels) -> images in [0, 1], clamped (the built-in 'VAE decode')."""
    return ((latents.float() + 1.0) * 0.5).clamp(0.0, 1.0)


class ClassConditioner(nn.Module):
    """Class labels -> (text tokens `[B, L, text_dim]`, pooled vector `[B, pooled_dim]`).

    Index `num_classes` is the null class: the unconditional branch of classifier-free guidance.
    """

    def __init__(self, num_classes: int, text_tokens: int, text_dim: int, pooled_dim: int):
        super().__init__()
        self.num_classes, self.text_tokens, self.text_dim = num_classes, text_tokens, text_dim
        self.tokens = nn.Embedding(num_classes + 1, text_tokens * text_dim)
        self.pooled = nn.Embedding(num_classes + 1, pooled_dim)
        nn.init.normal_(self.tokens.weight, std=0.5)
        nn.init.normal_(self.pooled.weight, std=0.5)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.tokens(labels).reshape(labels.shape[0], self.text_tokens, self.text_dim)
        return tokens, self.pooled(labels)


class DigitsBackbone(nn.Module):
    """SD3 transformer + class conditioner, with the small interface the trainer needs:

    - `encode_prompts(prompts)` -> conditioning; `null_condition(batch)` -> the CFG negative;
    - `velocity(latents, t, cond)` with per-row t in [0, 1] (t = 1 noise), SD3's `1000 t` timesteps;
    - `decode(latents)` -> images in [0, 1]; `latent_shape`.
    """

    def __init__(self, config: DigitsConfig | None = None):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        self.config = config or DigitsConfig()
        c = self.config
        self.transformer = SD3Transformer2DModel(
            sample_size=c.image_size,
            patch_size=1,
            in_channels=c.channels,
            out_channels=c.channels,
            num_layers=c.num_layers,
            attention_head_dim=c.head_dim,
            num_attention_heads=c.num_heads,
            joint_attention_dim=c.text_dim,
            caption_projection_dim=c.num_heads * c.head_dim,
            pooled_projection_dim=c.pooled_dim,
            pos_embed_max_size=c.image_size,
        )
        self.conditioner = ClassConditioner(c.num_classes, c.text_tokens, c.text_dim, c.pooled_dim)

    # ---------------------------------------------------------------- trainer interface
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config.channels, self.config.image_size, self.config.image_size)

    def encode_prompts(self, prompts) -> tuple[Tensor, Tensor]:
        """Prompts are digit classes (ints 0..9, or strings of them)."""
        labels = torch.as_tensor([int(p) for p in prompts], dtype=torch.int64, device=self.device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.config.num_classes):
            raise ValueError(f"digit prompts must be classes 0..{self.config.num_classes - 1}, got {list(prompts)}")
        return self.conditioner(labels)

    def null_condition(self, batch: int) -> tuple[Tensor, Tensor]:
        labels = torch.full((batch,), self.conditioner.null_class, dtype=torch.int64, device=self.device)
        return self.conditioner(labels)

    def velocity(self, latents: Tensor, t: Tensor, cond: tuple[Tensor, Tensor]) -> Tensor:
        tokens, pooled = cond
        return self.transformer(
            hidden_states=latents.to(self.dtype),
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            timestep=t * 1000.0,
            return_dict=False,
        )[0]

    def decode(self, latents: Tensor) -> Tensor:
        return pixels_to_images(latents)

    @property
    def device(self) -> torch.device:
        return self.conditioner.pooled.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conditioner.pooled.weight.dtype

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | Path, weights: str = BACKBONE_WEIGHTS, config: str = BACKBONE_CONFIG) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / weights))
        (directory / config).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path, weights: str = BACKBONE_WEIGHTS, config: str = BACKBONE_CONFIG) -> "DigitsBackbone":
        from safetensors.torch import load_file

        directory = Path(directory)
        model = cls(DigitsConfig(**json.loads((directory / config).read_text())))
        model.load_state_dict(load_file(str(directory / weights)))
        return model


def asset_dir() -> Path:
    """The installed `sfgrpo/assets` directory."""
    return Path(str(resources.files(ASSET_PACKAGE)))


def load_digits_backbone(path: str | Path | None = None) -> DigitsBackbone:
    """The shipped pretrained digits model (or one saved by `train_digits` in `path`)."""
    directory = Path(path) if path is not None else asset_dir()
    if not (directory / BACKBONE_WEIGHTS).exists():
        raise FileNotFoundError(
            f"no {BACKBONE_WEIGHTS} in {directory}; train one with `python -m sfgrpo.models.train_digits`"
        )
    return DigitsBackbone.load(directory).eval()


TINY_CONFIG = DigitsConfig(num_layers=1, num_heads=1, head_dim=16, text_tokens=2, text_dim=16, pooled_dim=16)


def load_backbone(spec: str, seed: int = 0, config=None):
    """The backbone a `--backbone` spec names:

    - `digits` (shipped weights), `digits-random` (the same shape, random init), `tiny-random` (a
      one-layer SD3 transformer for tests);
    - a diffusers checkpoint directory (SD3/SD3.5, FLUX, ...: its `model_index.json` picks the family
      in `sfgrpo.models.pipelines`; `config`, a `TrainerConfig`, supplies resolution, dtype, decode
      batch size etc., see `PipelineOptions`);
    - a directory written by `DigitsBackbone.save`;
    - `package.module:factory`: any model implementing `sfgrpo.models.protocol.Backbone`, built by
      `factory(config)` (or `factory()`) and checked by `check_backbone`.

    Directories are looked up first, so a path containing ':' stays a path. Random inits (the
    `*-random` names and factories) run under torch's CPU generator seeded with `seed`, so every
    process of a distributed run builds the same weights; the CPU generator's state is restored
    afterwards (torch.manual_seed also reseeds CUDA generators, which are left reseeded)."""
    from sfgrpo.models import pipelines, protocol

    if pipelines.pipeline_class_name(spec) is not None:
        options = pipelines.PipelineOptions.from_config(config) if config is not None else None
        return pipelines.load_pipeline_backbone(spec, options)
    if spec == "digits":
        return load_digits_backbone()
    if spec in ("digits-random", "tiny-random"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return DigitsBackbone(DigitsConfig() if spec == "digits-random" else TINY_CONFIG).eval()
    if Path(spec).is_dir():
        return load_digits_backbone(spec)
    if protocol.is_factory_spec(spec):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return protocol.load_backbone_factory(spec, config)
    raise ValueError(f"unknown backbone {spec!r} (and no such directory): use 'digits', 'digits-random', "
                     "'tiny-random', a saved digits model directory, a diffusers checkpoint directory (see "
                     "sfgrpo.models.pipelines) or 'package.module:factory' returning a backbone "
                     "(sfgrpo.models.protocol.Backbone)")
