"""Exporting trained weights for inference with diffusers.

- LoRA runs: the adapters in diffusers' LoRA format (`pytorch_lora_weights.safetensors`, written by
  the pipeline class's own `save_lora_weights`), so `pipe.load_lora_weights(directory)` loads them
  into the base checkpoint the run started from.
- Full fine-tunes: the transformer as a diffusers model directory (`transformer/`,
  `save_pretrained`), in the run's `model_dtype`; it replaces the checkpoint's `transformer/`.

By default the EMA weights are exported when the run keeps an EMA (the weights evaluations use).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from sfgrpo import distributed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


NO_EMA = "cannot export the EMA weights: this run keeps no EMA (ema_decay = 0)"
LORA_NEEDS_PIPELINE = ("cannot export a LoRA in diffusers' pipeline LoRA format without a diffusers checkpoint "
                       "backbone (--backbone /path/to/checkpoint)")


def check_export(config, use_ema: bool | None) -> None:
    """What the config alone shows an export cannot do, checked before any backbone loads (the same
    checks run in export_weights, on the trainer itself)."""
    if use_ema and config.ema_decay == 0:
        raise ValueError(NO_EMA)
    backbone = str(config.backbone)
    # a 'module:factory' backbone may carry a diffusers pipeline: export_weights decides for it
    if config.use_lora and ":" not in backbone and not (Path(backbone) / "model_index.json").is_file():
        raise ValueError(LORA_NEEDS_PIPELINE)


def export_weights(trainer, directory: str | Path, *, use_ema: bool | None = None) -> Path:
    """Writes the trainer's current weights (EMA ones when `use_ema`, default: when it has them)
    to `directory` in a diffusers format; returns the file or folder written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    use_ema = trainer.ema is not None if use_ema is None else use_ema
    if use_ema and trainer.ema is None:
        raise ValueError(NO_EMA)
    transformer = distributed.unwrap(trainer.model.transformer)
    with trainer.ema_weights() if use_ema else contextlib.nullcontext():
        if trainer.config.use_lora:
            return _export_lora(trainer, transformer, directory)
        return _export_transformer(trainer, transformer, directory)


def _export_lora(trainer, transformer, directory: Path) -> Path:
    from peft.utils import get_peft_model_state_dict

    pipe = getattr(trainer.model, "pipe", None)
    if pipe is None:
        raise ValueError(LORA_NEEDS_PIPELINE)
    layers = {name: value.detach().cpu().contiguous() for name, value in get_peft_model_state_dict(transformer).items()}
    # the adapter's config travels along: without it a loader assumes lora_alpha = r (scale 1)
    config = next(iter(transformer.peft_config.values())).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    type(pipe).save_lora_weights(str(directory), transformer_lora_layers=layers, safe_serialization=True,
                                 transformer_lora_adapter_metadata=config)
    return directory / "pytorch_lora_weights.safetensors"


def _export_transformer(trainer, transformer, directory: Path) -> Path:
    """config.json + diffusion_pytorch_model.safetensors, what `from_pretrained` reads; the tensors
    are cast copies (the module's fp32 master weights are left as they are)."""
    from safetensors.torch import save_file

    if not hasattr(transformer, "save_config"):
        raise ValueError(f"{type(transformer).__name__} is not a diffusers model: nothing to export")
    target = directory / "transformer"
    target.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[trainer.config.model_dtype]
    transformer.save_config(str(target))
    tensors = {name: value.detach().to("cpu", dtype if value.is_floating_point() else value.dtype).contiguous()
               for name, value in transformer.state_dict().items()}
    save_file(tensors, str(target / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return target
