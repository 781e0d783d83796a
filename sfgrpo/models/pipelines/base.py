"""What every diffusers family shares: loading options, the frozen text encoders + VAE, the
prompt cache, batched decode, packed (2x2 patch) latents, and the time/shift conventions of the
pipelines."""

from __future__ import annotations

import contextlib
import importlib.util
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from sfgrpo.distributed import unwrap

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
        return unwrap(self.transformer).config

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
        """The grid the checkpoint's own pipeline samples with: its scheduler's `set_timesteps`,
        called with the arguments the family's pipeline passes (`_timestep_arguments`)."""
        scheduler = self._scheduler()
        scheduler.set_timesteps(**self._timestep_arguments(scheduler, num_steps))
        return scheduler.sigmas.float().cpu()

    # ---------------------------------------------------------------- family-specific
    def _timestep_arguments(self, scheduler, num_steps: int) -> dict:
        """What the family's pipeline passes to `scheduler.set_timesteps` for `num_steps` steps."""
        raise NotImplementedError

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

    def _timestep_arguments(self, scheduler, num_steps: int) -> dict:
        """`FluxPipeline`, `ChromaPipeline` and `QwenImagePipeline`: `linspace(1, 1/T, T)` shifted by
        the resolution-dependent `mu` of the checkpoint's scheduler config (then a final 0)."""
        import numpy as np

        arguments = {"sigmas": np.linspace(1.0, 1.0 / num_steps, num_steps)}
        if scheduler.config.get("use_dynamic_shifting", False):
            arguments["mu"] = _calculate_shift(self.latent_grid ** 2, scheduler.config, default_max_shift=1.15)
        return arguments


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
