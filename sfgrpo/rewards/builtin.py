"""Built-in rewards. All take images `[B, C, H, W]` in [0, 1] and return `[B]`; higher is better.

The model-free ones are cheap style targets; pure style rewards can be *hacked* (a bright blob is
maximally bright but no digit). `digit` is the probability the built-in classifier gives the
requested class, and products like `digit*darkness` keep the digit while moving the style.
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor

from sfgrpo.rewards.base import register_reward


@register_reward("brightness")
def brightness(images: Tensor, prompts: Sequence) -> Tensor:
    """Mean pixel value (for the digits: the amount of ink)."""
    return images.float().flatten(1).mean(dim=1)


@register_reward("darkness")
def darkness(images: Tensor, prompts: Sequence) -> Tensor:
    """1 - mean pixel value (for the digits: thin strokes)."""
    return 1.0 - images.float().flatten(1).mean(dim=1)


@register_reward("contrast")
def contrast(images: Tensor, prompts: Sequence) -> Tensor:
    """Pixel standard deviation per image, times 2 so it spans [0, 1]."""
    return 2.0 * images.float().flatten(1).std(dim=1, unbiased=False)


@register_reward("sharpness")
def sharpness(images: Tensor, prompts: Sequence) -> Tensor:
    """Mean distance of pixels from mid-grey, in [0, 1]: crisp black/white strokes score high."""
    return (2.0 * images.float() - 1.0).abs().flatten(1).mean(dim=1)


@register_reward("symmetry")
def symmetry(images: Tensor, prompts: Sequence) -> Tensor:
    """1 - mean |image - mirrored image| (left-right)."""
    return 1.0 - (images.float() - images.float().flip(-1)).abs().flatten(1).mean(dim=1)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(images: Tensor, prompts: Sequence) -> Tensor:
    """Flow-GRPO's compressibility reward: -(JPEG size in kB) at quality 95 (needs Pillow)."""
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - Pillow comes with matplotlib
        raise ImportError("the jpeg_compressibility reward needs Pillow (`pip install pillow`)") from err
    pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    sizes = []
    for image in pixels.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000.0)
    return -torch.tensor(sizes, dtype=torch.float32, device=images.device)


@lru_cache(maxsize=1)
def _classifier():
    from sfgrpo.models.digit_classifier import DigitClassifier

    return DigitClassifier.load()


def digit_labels(prompts: Sequence, device) -> Tensor:
    return torch.as_tensor([int(p) for p in prompts], dtype=torch.int64, device=device)


@register_reward("digit")
def digit(images: Tensor, prompts: Sequence) -> Tensor:
    """p(requested digit | image) under the shipped logistic-regression classifier."""
    classifier = _classifier().to(images.device)
    return classifier.class_probability(images, digit_labels(prompts, images.device))


def digit_accuracy(images: Tensor, prompts: Sequence) -> Tensor:
    """1.0 where the classifier's top class is the requested digit (a metric, not a reward)."""
    classifier = _classifier().to(images.device)
    return (classifier(images).argmax(dim=-1) == digit_labels(prompts, images.device)).float()
