"""Learned rewards from local model directories (transformers' CLIP family), registered as specs
with a path argument:

- `clip_score:/models/clip-vit-l14`: cosine similarity of CLIP image and prompt embeddings, in [-1, 1];
- `pickscore:/models/PickScore_v1?processor=/models/CLIP-ViT-H-14`: PickScore, `logit_scale * cos`
  (a CLIP-H model fine-tuned on human preferences; ~22 for good SD images -- Flow-GRPO's curves and
  the paper's "0.87" divide by 26: add `&scale=0.03846`);
- `aesthetic:/models/sac+logos+ava1-l14-linearMSE.pth?clip=/models/clip-vit-l14`: the LAION
  aesthetic predictor, a linear/MLP head (weights from a `.pth`/`.pt`/`.safetensors` file) on
  normalised CLIP image embeddings. (A path with `+` needs the mapping form of a mixture, see
  `get_reward`, because `+` separates mixture terms.)

Common options (`?key=value&...`): `batch_size` (images per forward, default 32), `dtype`
(`float32` default, `bfloat16`/`float16` on GPUs), `scale` (multiplies the score).

Models load lazily on the first call, once per process (shared between specs that name the same
directory), on the device the images arrive on; everything runs under `no_grad` in eval mode.
Images are preprocessed with torch on that device (resize of the short side, centre crop,
normalisation with the processor's own constants), never through PIL round trips.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from sfgrpo.rewards.base import register_reward_factory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MODELS: dict[tuple[str, str, str], "ClipEmbedder"] = {}
_LOCK = threading.Lock()


class ClipEmbedder:
    """A CLIPModel and its processor from local directories; normalised embeddings of images and of
    prompts (prompt embeddings cached per string)."""

    def __init__(self, path: str, processor_path: str | None = None, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        for directory in (path, processor_path or path):
            if not Path(directory).is_dir():
                raise FileNotFoundError(f"CLIP reward: {directory} is not a directory (a local CLIP checkpoint)")
        self.path, self.processor_path, self.dtype = path, processor_path or path, DTYPES[dtype]
        self.model = None
        self._text_cache: dict[str, Tensor] = {}

    @classmethod
    def shared(cls, path: str, processor_path: str | None = None, dtype: str = "float32") -> "ClipEmbedder":
        key = (str(path), str(processor_path or path), dtype)
        with _LOCK:
            if key not in _MODELS:
                _MODELS[key] = cls(path, processor_path, dtype)
            return _MODELS[key]

    def _ready(self, device: torch.device) -> None:
        if self.model is None:
            from transformers import AutoProcessor, CLIPModel

            model = CLIPModel.from_pretrained(self.path)
            # read before the cast: in bf16 PickScore's log-scale 4.6052 rounds to 4.59375 (scale ~99,
            # not 100); a Python float also keeps a device read out of every reward call
            self._logit_scale = float(model.logit_scale.detach().float().exp())
            self.model = model.to(dtype=self.dtype).requires_grad_(False).eval()
            processor = AutoProcessor.from_pretrained(self.processor_path)
            self.tokenizer, image_processor = processor.tokenizer, processor.image_processor
            size = image_processor.size
            self.resize_to = size.get("shortest_edge") or min(size.get("height", 224), size.get("width", 224))
            crop = image_processor.crop_size
            self.crop = (crop["height"], crop["width"])
            self.mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
            self.std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
        if next(self.model.parameters()).device != device:
            self.model.to(device)
            self._text_cache.clear()

    def pixel_values(self, images: Tensor) -> Tensor:
        """Images `[B, C, H, W]` in [0, 1] -> CLIP input: short side to `resize_to` (bicubic,
        antialiased, like the processor's PIL resize), centre crop, normalise."""
        images = images.float()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        height, width = images.shape[-2:]
        scale = self.resize_to / min(height, width)
        size = (max(self.crop[0], round(height * scale)), max(self.crop[1], round(width * scale)))
        if size != (height, width):
            images = nn.functional.interpolate(images, size=size, mode="bicubic", antialias=True,
                                               align_corners=False).clamp(0.0, 1.0)
        top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
        images = images[..., top:top + self.crop[0], left:left + self.crop[1]]
        return (images - self.mean.to(images.device)) / self.std.to(images.device)

    @torch.no_grad()
    def image_embeddings(self, images: Tensor, batch_size: int) -> Tensor:
        self._ready(images.device)
        out = []
        for chunk in images.split(batch_size):
            pixels = self.pixel_values(chunk).to(self.dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float())
        return nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str], device: torch.device) -> Tensor:
        self._ready(device)
        missing = list(dict.fromkeys(str(p) for p in prompts if str(p) not in self._text_cache))
        if missing:
            tokens = self.tokenizer(missing, padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                                    return_tensors="pt").to(device)
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens.get("attention_mask")).pooler_output
            embeddings = nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)
            self._text_cache.update(zip(missing, embeddings))
        return torch.stack([self._text_cache[str(p)] for p in prompts])

    @property
    def logit_scale(self) -> float:
        """`exp(logit_scale)` of the model as saved (fp32), whatever `dtype` the model runs in."""
        return self._logit_scale


def _options(batch_size="32", dtype="float32", scale="1.0", **unknown) -> tuple[int, str, float]:
    if unknown:
        raise ValueError(f"unknown reward option(s) {sorted(unknown)}")
    if int(batch_size) < 1:
        raise ValueError(f"reward option batch_size must be >= 1, got {batch_size}")
    return int(batch_size), dtype, float(scale)


@register_reward_factory("clip_score")
def clip_score(path: str, processor: str | None = None, **options):
    """Cosine similarity of image and prompt CLIP embeddings."""
    batch_size, dtype, scale = _options(**options)
    embedder = ClipEmbedder.shared(path, processor, dtype)

    def reward(images: Tensor, prompts: Sequence) -> Tensor:
        image = embedder.image_embeddings(images, batch_size)
        return scale * (image * embedder.text_embeddings(prompts, images.device)).sum(-1)

    return reward


@register_reward_factory("pickscore")
def pickscore(path: str, processor: str | None = None, **options):
    """PickScore: `logit_scale.exp() * cos(image, prompt)` of the PickScore CLIP-H model."""
    batch_size, dtype, scale = _options(**options)
    embedder = ClipEmbedder.shared(path, processor, dtype)

    def reward(images: Tensor, prompts: Sequence) -> Tensor:
        image = embedder.image_embeddings(images, batch_size)
        cosine = (image * embedder.text_embeddings(prompts, images.device)).sum(-1)
        return scale * embedder.logit_scale * cosine

    return reward


def load_linear_head(path: str) -> nn.Sequential:
    """A stack of Linear layers from a state dict (`.pth`/`.pt`/`.safetensors`), in key order.

    LAION's improved aesthetic predictor is Linear(768,1024) -> Dropout -> Linear(1024,128) ->
    Dropout -> Linear(128,64) -> Dropout -> Linear(64,16) -> Linear(16,1): no activations, so
    the dropout layers (absent from the weights) are all that is skipped. The original linear
    predictor is a single Linear(768, 1)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    prefixes = [key[: -len("weight")] for key in state if key.endswith("weight") and state[key].ndim == 2]

    def order(prefix: str):
        numbers = [int(part) for part in prefix.split(".") if part.isdigit()]
        return numbers, prefix

    layers = []
    for prefix in sorted(prefixes, key=order):
        weight = state[prefix + "weight"]
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=prefix + "bias" in state)
        linear.weight.data.copy_(weight)
        if linear.bias is not None:
            linear.bias.data.copy_(state[prefix + "bias"])
        layers.append(linear)
    if not layers:
        raise ValueError(f"{path}: no Linear weights (2-d '*weight' tensors) in the state dict")
    for first, second in zip(layers, layers[1:]):
        if first.out_features != second.in_features:
            raise ValueError(f"{path}: layer widths do not chain ({first} -> {second})")
    if layers[-1].out_features != 1:
        raise ValueError(f"{path}: the head must end in one output, got {layers[-1].out_features}")
    return nn.Sequential(*layers).requires_grad_(False).eval()


@register_reward_factory("aesthetic")
def aesthetic(path: str, clip: str | None = None, processor: str | None = None, **options):
    """LAION aesthetic score: a linear/MLP head on normalised CLIP image embeddings."""
    if clip is None:
        raise ValueError("aesthetic reward needs the CLIP model it was trained on: aesthetic:HEAD?clip=/path/to/clip")
    if not Path(path).is_file():
        raise FileNotFoundError(f"aesthetic reward: head weights {path} not found")
    batch_size, dtype, scale = _options(**options)
    embedder = ClipEmbedder.shared(clip, processor, dtype)
    head = load_linear_head(path)

    def reward(images: Tensor, prompts: Sequence) -> Tensor:
        embeddings = embedder.image_embeddings(images, batch_size)
        if embeddings.shape[-1] != head[0].in_features:
            raise ValueError(f"aesthetic head {path} takes {head[0].in_features}-d embeddings, CLIP {clip} gives "
                             f"{embeddings.shape[-1]}-d (use the CLIP model the head was trained on)")
        head.to(embeddings.device)
        with torch.no_grad():
            return scale * head(embeddings).squeeze(-1)

    return reward
