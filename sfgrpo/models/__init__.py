"""Backbones the trainer can fine-tune. The built-in one is a tiny class-conditional SD3
transformer trained on scikit-learn's 8x8 handwritten digits (`sfgrpo.models.digits`)."""

from sfgrpo.models.digits import (
    ClassConditioner,
    DigitsBackbone,
    DigitsConfig,
    load_digits_backbone,
    load_backbone,
    load_digits_data,
)

__all__ = ["ClassConditioner", "DigitsBackbone", "DigitsConfig", "load_backbone", "load_digits_backbone", "load_digits_data"]
