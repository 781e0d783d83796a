"""Backbones the trainer can fine-tune. The built-in one is a tiny class-conditional SD3
transformer trained on scikit-learn's 8x8 handwritten digits (`sfgrpo.models.digits`); diffusers SD3, FLUX.1,
Chroma, FLUX.2 [klein] and Qwen-Image checkpoints (`sfgrpo.models.pipelines`); and any model implementing `Backbone`
(`sfgrpo.models.protocol`), e.g. through `backbone="package.module:factory"`."""

from sfgrpo.models.digits import (
    ClassConditioner,
    DigitsBackbone,
    DigitsConfig,
    load_digits_backbone,
    load_backbone,
    load_digits_data,
)
from sfgrpo.models.protocol import Backbone, check_backbone

__all__ = ["Backbone", "ClassConditioner", "DigitsBackbone", "DigitsConfig", "check_backbone", "load_backbone",
           "load_digits_backbone", "load_digits_data"]
