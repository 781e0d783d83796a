"""Real backbones from a local diffusers checkpoint directory: SD3 / SD3.5, FLUX.1, Chroma, FLUX.2
[klein] and Qwen-Image.

`load_pipeline_backbone(path, options)` reads the checkpoint's own `model_index.json`, picks the
family from its `_class_name` and wraps the pipeline's components in the small interface the
trainer uses (the same one `DigitsBackbone` has):

- `encode_prompts(prompts)` / `null_condition(batch)`: text conditioning, cached per prompt
  string (the text encoders are frozen, so a prompt's embedding never changes during training);
- `velocity(x, t, cond)`: the transformer's prediction in sfgrpo's convention, `v = noise - data`
  at per-row `t` in [0, 1] (t = 1 is noise) -- every family already predicts exactly that, they
  only differ in how the time is fed in (see each class);
- `combine_guidance(v_cond, v_uncond, scale)` (Qwen-Image only): the checkpoint pipeline's own
  classifier-free guidance rule, used instead of the standard one;
- `decode(latents)`: VAE decode in chunks of `decode_batch_size`, images in [0, 1];
- `latent_shape`, `device`, `dtype`, `.transformer` (what LoRA and the KL reference act on);
- `sampling_sigmas(num_steps)`: the grid the checkpoint's own pipeline would sample with.

Text encoders and the VAE are frozen (`requires_grad_(False)`, eval mode) and always run under
`no_grad`; only the transformer is ever trained. Text encoding calls the pipeline's public
`encode_prompt`, so the exact recipe of each checkpoint (penultimate CLIP layers, T5 padding,
a missing T5) is the one diffusers implements for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from sfgrpo.models.pipelines.base import (ATTENTION_BACKENDS, DTYPES, PackedLatentsBackbone, PipelineBackbone,
                                          PipelineOptions, _dtype_argument, pipeline_timestep,
                                          set_attention_backend)
from sfgrpo.models.pipelines.flux import ChromaBackbone, Flux2KleinBackbone, FluxBackbone
from sfgrpo.models.pipelines.qwen_image import PaddedText, QwenImageBackbone
from sfgrpo.models.pipelines.sd3 import SD3Backbone

__all__ = ["ATTENTION_BACKENDS", "DTYPES", "ChromaBackbone", "Flux2KleinBackbone", "FluxBackbone", "PackedLatentsBackbone",
           "PaddedText", "PipelineBackbone", "PipelineOptions", "QwenImageBackbone", "SD3Backbone", "backbone_families",
           "load_pipeline_backbone", "pipeline_class_name", "pipeline_timestep", "sampling_sigmas",
           "set_attention_backend"]


def pipeline_class_name(path: str | Path) -> str | None:
    """The `_class_name` of a diffusers checkpoint directory, or None when it is not one."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    return json.loads(index.read_text()).get("_class_name")


def load_pipeline_backbone(path: str | Path, options: PipelineOptions | None = None) -> "PipelineBackbone":
    """SD3/SD3.5, FLUX.1, Chroma, FLUX.2 [klein] or Qwen-Image from a local diffusers directory,
    chosen by its `model_index.json`."""
    options = (options or PipelineOptions()).validate()
    class_name = pipeline_class_name(path)
    families = backbone_families()
    if class_name not in families:
        raise ValueError(f"{path}: model_index.json names pipeline {class_name!r}; supported: {sorted(families)}")
    import diffusers

    pipeline_class = getattr(diffusers, class_name, None)
    if pipeline_class is None:
        raise ImportError(f"{path}: the installed diffusers {diffusers.__version__} has no {class_name}; "
                          "upgrade it (pip install -U diffusers)")
    backbone_class = families[class_name]
    index = json.loads((Path(path) / "model_index.json").read_text())
    # components saved as [null, null] (e.g. SD3 without T5) must be passed as None explicitly
    absent = {name: None for name, value in index.items()
              if not name.startswith("_") and isinstance(value, list) and value[0] is None}
    pipe = pipeline_class.from_pretrained(str(path), **_dtype_argument(DTYPES[options.model_dtype]), **absent)
    return backbone_class(pipe, options)


def backbone_families() -> dict[str, type[PipelineBackbone]]:
    """diffusers pipeline class (`_class_name` in model_index.json) -> the backbone wrapping it."""
    return {"StableDiffusion3Pipeline": SD3Backbone, "FluxPipeline": FluxBackbone, "ChromaPipeline": ChromaBackbone,
            "Flux2KleinPipeline": Flux2KleinBackbone, "QwenImagePipeline": QwenImageBackbone}


def sampling_sigmas(model, config) -> Tensor:
    """The run's sampling grid: the checkpoint's own (real backbones, unless
    `schedule_from_checkpoint` is off) or SD3's shifted grid with `config.shift`."""
    if getattr(config, "schedule_from_checkpoint", True) and hasattr(model, "sampling_sigmas"):
        return model.sampling_sigmas(config.num_steps)
    from sfgrpo.schedules import Schedule

    return Schedule.sd3(config.num_steps, config.shift).sigmas
