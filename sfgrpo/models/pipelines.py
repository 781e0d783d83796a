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

import contextlib
import importlib.util
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION_BACKENDS = ("sdpa", "xformers")


@dataclass
class PipelineOptions:
    """How a real backbone is loaded and run (the `TrainerConfig` fields of the same names)."""

    resolution: int = 512  # square images, pixels
    model_dtype: str = "float32"  # storage dtype of every component ("bfloat16" on GPUs)
    max_sequence_length: int | None = None  # text tokens (None: 256 for SD3, 512 for the others)
    embedded_guidance_scale: float = 3.5  # FLUX-dev's guidance embedding (ignored without one)
    decode_batch_size: int = 8  # latents per VAE decode call
    attention_backend: str = "sdpa"
    offload_text_encoders: bool = False  # text encoders live in CPU memory, visit the device to encode
    prompt_cache_size: int = 256  # text embeddings kept on the device (least recently used dropped first)

    @classmethod
    def from_config(cls, config) -> "PipelineOptions":
        """Picks the fields of the same names from a `TrainerConfig` (or anything with them)."""
        names = cls.__dataclass_fields__
        return cls(**{name: getattr(config, name) for name in names if hasattr(config, name)})

    def validate(self) -> "PipelineOptions":
        if self.model_dtype not in DTYPES:
            raise ValueError(f"model_dtype must be one of {sorted(DTYPES)}, got {self.model_dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.prompt_cache_size < 0:
            raise ValueError(f"prompt_cache_size must be >= 0, got {self.prompt_cache_size}")
        if self.resolution < 8 or self.decode_batch_size < 1:
            raise ValueError(f"resolution must be >= 8 and decode_batch_size >= 1, got {self.resolution}, "
                             f"{self.decode_batch_size}")
        return self


def _dtype_argument(dtype: torch.dtype) -> dict:
    """`dtype=` on diffusers versions that renamed it (they warn about `torch_dtype=`)."""
    import diffusers.utils.deprecation_utils as deprecation

    return {"dtype": dtype} if hasattr(deprecation, "_resolve_dtype") else {"torch_dtype": dtype}


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


class PipelineBackbone(nn.Module):
    """What every family shares: frozen text encoders + VAE, prompt cache, batched decode."""

    family = "?"
    negative_prompt = ""  # the CFG negative diffusers' examples use for the family
    # LoRA targets when `lora_target_modules` is None: the attention projections of the image and the
    # text stream (Flow-GRPO's SD3 recipe; FLUX's single blocks match attn.to_q/k/v as well)
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                            "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

    def __init__(self, pipe, options: PipelineOptions):
        super().__init__()
        self.options = options
        self.pipe = pipe  # kept for encode_prompt; its modules are registered below as well
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        encoders = [m for m in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
                    if m is not None]
        for frozen in (self.vae, *encoders):
            frozen.requires_grad_(False).eval()
        # registered, .to(device) moves them with the transformer; offloaded, a plain list that
        # .to() does not see: they stay in CPU memory between encodes
        self.text_encoders = nn.ModuleList([] if options.offload_text_encoders else encoders)
        self.offloaded_text_encoders = encoders if options.offload_text_encoders else []
        self.vae_scale_factor = self._vae_scale_factor()
        # least recently used first; entries in the text encoders' dtype (a full fine-tune's fp32
        # transformer casts at call time): FLUX.2 [klein] 4B holds 8 MB per prompt in bf16
        self._prompt_cache: OrderedDict[str, tuple[Tensor, ...]] = OrderedDict()
        set_attention_backend(self.transformer, options.attention_backend, self.family)

    # ---------------------------------------------------------------- trainer interface
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def transformer_config(self):
        """The transformer's diffusers config, also once DDP wraps the transformer (the wrapper
        hides `.config`; FSDP2 keeps the module itself)."""
        return getattr(self.transformer, "module", self.transformer).config

    def train(self, mode: bool = True):
        """Only the transformer follows train/eval; the frozen parts stay in eval (no dropout)."""
        self.training = mode
        self.transformer.train(mode)
        return self

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, ...]:
        """Per-row conditioning. Each distinct prompt of a call is encoded once, and the last
        `prompt_cache_size` distinct prompts are kept, so a group's trajectories, the look-ahead,
        the update and the next iterations that draw the prompt again reuse its embedding; a
        prompt set larger than the cache costs its encodes, not device memory."""
        prompts = [str(p) for p in prompts]
        rows = {}
        for prompt in dict.fromkeys(prompts):
            if prompt in self._prompt_cache:
                self._prompt_cache.move_to_end(prompt)
                rows[prompt] = self._prompt_cache[prompt]
        missing = [p for p in dict.fromkeys(prompts) if p not in rows]
        if missing:
            with torch.no_grad(), self._text_encoders_on_device():
                encoded = self._encode_text(missing)
            for prompt, row in zip(missing, self._split_rows(encoded)):
                rows[prompt] = row
                self._prompt_cache[prompt] = row
            while len(self._prompt_cache) > self.options.prompt_cache_size:
                self._prompt_cache.popitem(last=False)
        return self._join_rows([rows[p] for p in prompts])

    def null_condition(self, batch: int) -> tuple[Tensor, ...]:
        """The negative of classifier-free guidance (the empty prompt; " " for Qwen-Image, as in
        diffusers' examples)."""
        negative = self.encode_prompts([self.negative_prompt])
        return type(negative)(None if part is None else part.expand(batch, *part.shape[1:]) for part in negative)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents (the backbone's own layout) -> float32 images `[B, 3, H, W]` in [0, 1]."""
        images = []
        vae_dtype = next(self.vae.parameters()).dtype
        for chunk in latents.split(self.options.decode_batch_size):
            z = self._denormalize(self._to_vae_latents(chunk))
            decoded = self._from_vae_output(self.vae.decode(z.to(vae_dtype), return_dict=False)[0])
            images.append((decoded.float() * 0.5 + 0.5).clamp(0.0, 1.0))
        return torch.cat(images) if images else latents.new_zeros((0, 3, self.height, self.height))

    @property
    def height(self) -> int:
        return self.options.resolution

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- family-specific
    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, ...]:
        raise NotImplementedError

    @contextlib.contextmanager
    def _text_encoders_on_device(self):
        """Offloaded text encoders visit the device for one encode call (prompts not cached yet:
        the first iterations, new prompts of a large prompt set), then go back to CPU memory."""
        for encoder in self.offloaded_text_encoders:
            encoder.to(self.device)
        try:
            yield
        finally:
            for encoder in self.offloaded_text_encoders:
                encoder.to("cpu")

    def _vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _split_rows(self, encoded: tuple[Tensor, ...]) -> list[tuple[Tensor, ...]]:
        """A batch of encoded prompts -> one cache entry per prompt."""
        return [tuple(part[row:row + 1].detach() for part in encoded) for row in range(encoded[0].shape[0])]

    def _join_rows(self, rows: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """Cache entries -> the batch's condition, on the device."""
        return tuple(torch.cat(parts).to(self.device) for parts in zip(*rows))

    def _to_vae_latents(self, latents: Tensor) -> Tensor:
        return latents

    def _denormalize(self, z: Tensor) -> Tensor:
        """The diffusion latent -> the VAE's latent space."""
        return z / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)

    def _from_vae_output(self, decoded: Tensor) -> Tensor:
        return decoded

    def _scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)


class SD3Backbone(PipelineBackbone):
    """SD3 / SD3.5: latents `[C, H/8, W/8]`; the transformer takes `timestep = 1000 t`."""

    family = "sd3"

    @property
    def latent_size(self) -> int:
        size = self.options.resolution // self.vae_scale_factor
        patch = self.transformer_config.patch_size
        if size % patch:
            raise ValueError(f"resolution {self.options.resolution} must be a multiple of "
                             f"{self.vae_scale_factor * patch} for this checkpoint")
        return size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.transformer_config.in_channels, self.latent_size, self.latent_size)

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.options.max_sequence_length or 256,
        )
        return embeds, pooled  # the encoders' dtype (cached so); velocity casts

    def velocity(self, latents: Tensor, t: Tensor, cond: tuple[Tensor, Tensor]) -> Tensor:
        embeds, pooled = cond
        dtype = self.dtype  # the text encoders' may differ (a full fine-tune keeps fp32 master weights)
        return self.transformer(
            hidden_states=latents.to(dtype), timestep=t.float() * 1000.0,
            encoder_hidden_states=embeds.to(dtype), pooled_projections=pooled.to(dtype), return_dict=False,
        )[0]

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """What `StableDiffusion3Pipeline` samples with: the checkpoint scheduler's `set_timesteps`
        (its static shift, or resolution-dependent `mu` when it uses dynamic shifting)."""
        scheduler = self._scheduler()
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            seq_len = (self.latent_size // self.transformer_config.patch_size) ** 2
            kwargs["mu"] = _calculate_shift(seq_len, scheduler.config, default_max_shift=1.16)
        scheduler.set_timesteps(num_steps, **kwargs)
        return scheduler.sigmas.float().cpu()


class PackedLatentsBackbone(PipelineBackbone):
    """FLUX and Qwen-Image: latents are *packed*, `[(H/16)(W/16), 4C]` (2x2 patches of the
    `[C, H/8, W/8]` VAE latent, the layout the transformer reads and writes). The SDE runs on the
    packed tensor -- a permutation, so N(0, I) noise and per-element log-probs mean the same -- and
    `decode` unpacks. Both pipelines sample `linspace(1, 1/T, T)` shifted by a resolution-dependent
    `mu` and feed the transformer `timestep = t` (they pass `timestep / 1000`)."""

    @property
    def latent_grid(self) -> int:
        """Side of the packed grid: the VAE latent side halved (2x2 patches)."""
        size = self.options.resolution // (self.vae_scale_factor * 2)
        if size < 1 or self.options.resolution % (self.vae_scale_factor * 2):
            raise ValueError(f"resolution {self.options.resolution} must be a multiple of {self.vae_scale_factor * 2}")
        return size

    @property
    def latent_channels(self) -> int:
        return self.transformer_config.in_channels // 4

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.latent_grid ** 2, self.latent_channels * 4)

    def pack(self, latents: Tensor) -> Tensor:
        """`[B, C, H, W]` VAE latents -> `[B, (H/2)(W/2), 4C]`."""
        b, c, h, w = latents.shape
        return latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)

    def unpack(self, packed: Tensor) -> Tensor:
        """Inverse of `pack`."""
        b, _, channels = packed.shape
        grid = self.latent_grid
        c = channels // 4
        return packed.reshape(b, grid, grid, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, grid * 2, grid * 2)

    def _to_vae_latents(self, latents: Tensor) -> Tensor:
        return self.unpack(latents)

    def guidance_embedding(self, batch: int, device) -> Tensor | None:
        """The guidance-distilled checkpoints' embedded scale (FLUX.1-dev), None without one."""
        if not self.transformer_config.get("guidance_embeds", False):
            return None
        return torch.full((batch,), self.options.embedded_guidance_scale, device=device, dtype=torch.float32)

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """What `FluxPipeline` and `QwenImagePipeline` sample with: `linspace(1, 1/T, T)` shifted by the resolution-dependent
        `mu` of the checkpoint's scheduler config, then a final 0."""
        import numpy as np

        scheduler = self._scheduler()
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = _calculate_shift(self.latent_grid ** 2, scheduler.config, default_max_shift=1.15)
        scheduler.set_timesteps(sigmas=sigmas, **kwargs)
        return scheduler.sigmas.float().cpu()


class FluxBackbone(PackedLatentsBackbone):
    """FLUX.1: the transformer also takes the guidance embedding (FLUX.1-dev), a pooled CLIP vector
    and position ids for image patches and text tokens."""

    family = "flux"

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.options.max_sequence_length or 512,
        )
        return embeds, pooled  # the encoders' dtype (cached so); velocity casts

    def image_ids(self, device, dtype) -> Tensor:
        """`[L, 3]` position ids of the packed patches: (0, row, column). Built on the device: a
        host-to-device copy in every forward would synchronise the host."""
        grid = self.latent_grid
        index = torch.arange(grid, device=device, dtype=dtype)
        rows, columns = index[:, None].expand(grid, grid), index[None, :].expand(grid, grid)
        return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(grid * grid, 3)

    def velocity(self, latents: Tensor, t: Tensor, cond: tuple[Tensor, Tensor]) -> Tensor:
        embeds, pooled = cond
        dtype = self.dtype
        return self.transformer(
            hidden_states=latents.to(dtype), timestep=pipeline_timestep(t, dtype),
            guidance=self.guidance_embedding(latents.shape[0], latents.device),
            pooled_projections=pooled.to(dtype), encoder_hidden_states=embeds.to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=dtype),
            img_ids=self.image_ids(latents.device, dtype), return_dict=False,
        )[0]


class ChromaBackbone(FluxBackbone):
    """Chroma (FLUX.1-schnell's architecture, pruned): T5 only, encoded with its attention mask, and
    the transformer masks the padding after the first padding token (the mask is part of the
    condition: fixed length, so conditions batch as they are); no pooled vector, no guidance
    embedding; latents, ids, grid and VAE as FLUX.1's."""

    family = "chroma"

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        embeds, _, mask, *_ = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.options.max_sequence_length or 512,
        )
        return embeds, mask

    def velocity(self, latents: Tensor, t: Tensor, cond: tuple[Tensor, Tensor]) -> Tensor:
        embeds, mask = cond
        batch, dtype = latents.shape[0], self.dtype
        image = torch.ones(batch, latents.shape[1], device=latents.device, dtype=torch.bool)
        return self.transformer(
            hidden_states=latents.to(dtype), timestep=pipeline_timestep(t, dtype), encoder_hidden_states=embeds.to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=dtype),
            img_ids=self.image_ids(latents.device, dtype),
            # the pipeline's _prepare_attention_mask, in the transformer's dtype (the mask comes in the
            # text encoder's, and a trained copy may be fp32 next to a bf16 encoder)
            attention_mask=torch.cat([mask, image], dim=1).to(dtype),
            return_dict=False,
        )[0]


class Flux2KleinBackbone(PackedLatentsBackbone):
    """FLUX.2 [klein]: conditioned on hidden states 9, 18 and 27 of a Qwen3 text encoder over its
    chat template, concatenated per token and padded to `max_sequence_length` (the pipeline's
    `encode_prompt`; the padding tokens are real tokens to the transformer, as in FLUX.1); 4D
    position ids (time, row, column, token); no guidance embedding. Latents are the VAE latent's
    2x2 patches flattened row by row -- the layout FLUX.1 packs to -- and `decode` undoes the VAE's
    latent batch normalisation on the patches before un-patchifying. The sampling grid's shift
    `mu` depends on the number of steps as well as the resolution (`compute_empirical_mu`).
    Distilled checkpoints (`is_distilled`) sample without CFG: train them with `guidance_scale` 1."""

    family = "flux2"
    # + the single blocks' fused QKV / MLP-in projection (their output projection `attn.to_out` shares
    # its name with the double blocks' ModuleList, which peft cannot adapt)
    default_lora_targets = PackedLatentsBackbone.default_lora_targets + ("attn.to_qkv_mlp_proj",)

    @property
    def cfg_distilled(self) -> bool:
        """The pipeline ignores the guidance scale of step-distilled checkpoints (no CFG)."""
        return bool(self.pipe.config.get("is_distilled", False))

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor]:
        embeds, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                            max_sequence_length=self.options.max_sequence_length or 512)
        return (embeds,)

    @staticmethod
    def position_ids(batch: int, rows: int, columns: int, tokens: int, device) -> Tensor:
        """`[B, rows * columns * tokens, 4]` ids (0, row, column, token): the image patches are
        (0, h, w, 0), the text tokens (0, 0, 0, l), as the pipeline's `_prepare_*_ids` build them.
        Built on the device (a host-to-device copy per forward would synchronise the host)."""
        axes = [torch.arange(n, device=device) for n in (1, rows, columns, tokens)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 4)
        return grid.expand(batch, -1, -1)

    def velocity(self, latents: Tensor, t: Tensor, cond: tuple[Tensor]) -> Tensor:
        (embeds,) = cond
        batch, dtype, grid = latents.shape[0], self.dtype, self.latent_grid
        return self.transformer(
            hidden_states=latents.to(dtype), encoder_hidden_states=embeds.to(dtype), timestep=pipeline_timestep(t, dtype),
            img_ids=self.position_ids(batch, grid, grid, 1, latents.device),
            txt_ids=self.position_ids(batch, 1, 1, embeds.shape[1], latents.device),
            guidance=None, return_dict=False,  # as Flux2KleinPipeline calls it, whatever guidance_embeds says
        )[0]

    def _to_vae_latents(self, latents: Tensor) -> Tensor:
        """Packed -> `[B, 4C, H/2, W/2]` patches, de-normalised by the VAE's latent batch norm ->
        `[B, C, H, W]` (the pipeline's `_unpack_latents_with_ids`, bn, `_unpatchify_latents`)."""
        b, _, channels = latents.shape
        grid = self.latent_grid
        patches = latents.reshape(b, grid, grid, channels).permute(0, 3, 1, 2)
        bn = self.vae.bn
        std = torch.sqrt(bn.running_var + self.vae.config.batch_norm_eps).to(patches.device, patches.dtype)
        patches = patches * std.view(1, -1, 1, 1) + bn.running_mean.to(patches.device, patches.dtype).view(1, -1, 1, 1)
        c = channels // 4
        return patches.reshape(b, c, 2, 2, grid, grid).permute(0, 1, 4, 2, 5, 3).reshape(b, c, grid * 2, grid * 2)

    def _denormalize(self, z: Tensor) -> Tensor:
        return z  # done on the patches in _to_vae_latents

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """What `Flux2KleinPipeline` samples with: `linspace(1, 1/T, T)` shifted by its empirical
        `mu(image tokens, T)`, then a final 0."""
        import numpy as np
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        scheduler = self._scheduler()
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
        if scheduler.config.get("use_flow_sigmas", False):  # the pipeline lets such a scheduler choose
            sigmas = None
        scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=compute_empirical_mu(self.latent_grid ** 2, num_steps))
        return scheduler.sigmas.float().cpu()


class PaddedText(tuple):
    """`(embeds [B, L, D], mask [B, L] bool or None)`: prompts of different token counts, each padded
    with zeros to the batch's longest (mask False), as `QwenImagePipeline` batches them; the
    transformer masks the padding out of its attention. A batch without padding (one prompt, the
    CFG negative) has no mask, as the pipeline passes none then: attention runs without one
    (flash kernels on GPUs) and diffusers' mask handling, which synchronises the host, is skipped.
    Concatenation pads the shorter side, so conditions encoded apart still batch into one forward."""

    def concat_rows(self, other: "PaddedText") -> "PaddedText":
        (embeds, mask), (other_embeds, other_mask) = self, other
        if mask is None and other_mask is None and embeds.shape[1] == other_embeds.shape[1]:
            return PaddedText((torch.cat([embeds, other_embeds]), None))
        length = max(embeds.shape[1], other_embeds.shape[1])
        masks = [_full_mask(e) if m is None else m for e, m in ((embeds, mask), (other_embeds, other_mask))]
        return PaddedText((torch.cat([_pad_tokens(embeds, length), _pad_tokens(other_embeds, length)]),
                           torch.cat([_pad_tokens(masks[0], length), _pad_tokens(masks[1], length)])))


def _full_mask(embeds: Tensor) -> Tensor:
    return torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)


def _pad_tokens(part: Tensor, length: int) -> Tensor:
    """Zero-pads dim 1 (tokens) to `length` (False for a mask)."""
    missing = length - part.shape[1]
    if missing == 0:
        return part
    return torch.cat([part, part.new_zeros((part.shape[0], missing, *part.shape[2:]))], dim=1)


class QwenImageBackbone(PackedLatentsBackbone):
    """Qwen-Image: conditioned on the last hidden layer of a Qwen2.5-VL text encoder over a chat
    template (the pipeline's `encode_prompt`), a variable number of tokens per prompt with a mask
    (`PaddedText`); no pooled vector; latents packed like FLUX's, decoded by a video-style VAE
    (one frame) after per-channel de-normalisation. Classifier-free guidance is the pipeline's
    "true CFG": the combined velocity rescaled per token to the conditional one's norm
    (`combine_guidance`), with " " as the negative prompt."""

    family = "qwenimage"
    negative_prompt = " "

    @property
    def unused_parameter_prefixes(self) -> tuple[str, ...]:
        """The last block's text-stream output (attention output projection, text MLP): the model
        returns only the image stream, so these never get a gradient; the trainer keeps them frozen
        (DDP would wait for their gradients forever)."""
        last = len(getattr(self.transformer, "module", self.transformer).transformer_blocks) - 1
        return (f"transformer_blocks.{last}.attn.to_add_out.", f"transformer_blocks.{last}.txt_mlp.")

    def _vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        embeds, mask = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.options.max_sequence_length or 512,
        )
        return embeds, mask

    def _split_rows(self, encoded: tuple[Tensor, Tensor | None]) -> list[tuple[Tensor]]:
        """Each prompt keeps its own token count (its embedding does not depend on the prompts it
        was encoded with); padding happens per batch in `_join_rows`."""
        embeds, mask = encoded
        lengths = [embeds.shape[1]] * embeds.shape[0] if mask is None else mask.sum(dim=1).tolist()
        return [(embeds[row, :length].detach(),) for row, length in enumerate(lengths)]

    def _join_rows(self, rows: list[tuple[Tensor]]) -> PaddedText:
        lengths = [row.shape[0] for (row,) in rows]
        length = max(lengths)
        embeds = torch.stack([_pad_tokens(row[None], length)[0] for (row,) in rows]).to(self.device)
        if min(lengths) == length:
            return PaddedText((embeds, None))
        # filled on the device from host-side lengths: no host-to-device copy
        mask = torch.stack([torch.cat([torch.ones(n, dtype=torch.bool, device=self.device),
                                       torch.zeros(length - n, dtype=torch.bool, device=self.device)]) for n in lengths])
        return PaddedText((embeds, mask))

    def velocity(self, latents: Tensor, t: Tensor, cond: PaddedText) -> Tensor:
        embeds, mask = cond
        batch, dtype, grid = latents.shape[0], self.dtype, self.latent_grid
        return self.transformer(
            hidden_states=latents.to(dtype), timestep=pipeline_timestep(t, dtype),
            guidance=self.guidance_embedding(batch, latents.device), encoder_hidden_states=embeds.to(dtype),
            encoder_hidden_states_mask=mask, img_shapes=[[(1, grid, grid)]] * batch, return_dict=False,
        )[0]

    @staticmethod
    def combine_guidance(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
        """`QwenImagePipeline`'s guidance: standard CFG, then each token's velocity rescaled to the
        norm of its conditional velocity (over the packed channels)."""
        combined = v_uncond + scale * (v_cond - v_uncond)
        return combined * (v_cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))

    def _to_vae_latents(self, latents: Tensor) -> Tensor:
        return self.unpack(latents).unsqueeze(2)  # [B, C, 1 frame, H, W]

    def _denormalize(self, z: Tensor) -> Tensor:
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        return z * std + mean

    def _from_vae_output(self, decoded: Tensor) -> Tensor:
        return decoded[:, :, 0]


def backbone_families() -> dict[str, type[PipelineBackbone]]:
    """diffusers pipeline class (`_class_name` in model_index.json) -> the backbone wrapping it."""
    return {"StableDiffusion3Pipeline": SD3Backbone, "FluxPipeline": FluxBackbone, "ChromaPipeline": ChromaBackbone,
            "Flux2KleinPipeline": Flux2KleinBackbone, "QwenImagePipeline": QwenImageBackbone}


def pipeline_timestep(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t` as the FLUX-style pipelines hand it to their transformer: the scheduler's timestep 1000 t
    cast to the model's dtype, then divided by 1000 in that dtype (in bf16 not the same as bf16(t):
    0.9297 vs 0.9258 on Qwen-Image's grid)."""
    return (t.float() * 1000.0).to(dtype) / 1000.0


def _calculate_shift(image_seq_len: int, config, default_max_shift: float) -> float:
    """diffusers' `calculate_shift`: `mu` linear in the number of image tokens."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", default_max_shift)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def set_attention_backend(transformer, backend: str, family: str) -> None:
    """`sdpa`: PyTorch's scaled_dot_product_attention (diffusers' default, nothing to do).
    `xformers`: memory-efficient attention, only when the xformers package is installed."""
    if backend == "sdpa":
        return
    if backend != "xformers":
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if family == "qwenimage":
        # diffusers' xformers path turns Qwen-Image's boolean text mask into an additive bias of 1/0:
        # the padding would not be masked (and a [B, H, S, S] bias is built per call)
        raise ValueError("attention_backend='xformers' is not supported for Qwen-Image (its text padding mask "
                         "would be lost); use attention_backend='sdpa'")
    if importlib.util.find_spec("xformers") is None:
        raise ImportError("attention_backend='xformers' needs the xformers package (pip install 'sfgrpo[xformers]', "
                          "GPU builds only); use attention_backend='sdpa' otherwise")
    if family in ("flux", "chroma", "flux2"):  # their attention goes through diffusers' dispatcher
        transformer.set_attention_backend("xformers")
    else:  # SD3's joint-attention processors are swapped for their xformers twins
        transformer.enable_xformers_memory_efficient_attention()


def sampling_sigmas(model, config) -> Tensor:
    """The run's sampling grid: the checkpoint's own (real backbones, unless
    `schedule_from_checkpoint` is off) or SD3's shifted grid with `config.shift`."""
    if getattr(config, "schedule_from_checkpoint", True) and hasattr(model, "sampling_sigmas"):
        return model.sampling_sigmas(config.num_steps)
    from sfgrpo.schedules import Schedule

    return Schedule.sd3(config.num_steps, config.shift).sigmas
