"""FLUX.1 (`FluxPipeline`), Chroma (`ChromaPipeline`) and FLUX.2 [klein] (`Flux2KleinPipeline`)."""

from __future__ import annotations

import torch
from torch import Tensor

from sfgrpo.models.pipelines.base import PackedLatentsBackbone, pipeline_timestep


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


class _ConstantsOnDevice(torch.nn.Module):
    """Wraps a stateless module that diffusers calls with a CPU tensor of constants, and runs it on
    the device the wrapper was moved to. Chroma's timestep embedding projects
    `torch.tensor([0] * batch)`, built on the CPU and copied to the GPU after the projection: a
    synchronising copy in every forward. CPU constants are readable for free: one value repeated
    becomes `torch.full` on the device (the embedding of 0 is exact, sin 0 and cos 0, so the
    result is bit-identical); anything else goes through unchanged."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        # tracks the device through .to(); not saved (the state dict keeps diffusers' keys)
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    def forward(self, values: Tensor) -> Tensor:
        device = self.anchor.device
        # under torch.compile the constants are traced as such (and bool() below would break the graph)
        if torch.compiler.is_compiling():
            return self.inner(values)
        if values.device.type == "cpu" and device.type != "cpu" and values.numel() > 0:
            first = values.reshape(-1)[0]
            if bool((values == first).all()):  # a CPU tensor: no device sync
                values = torch.full(values.shape, first.item(), dtype=values.dtype, device=device)
        return self.inner(values)


class ChromaBackbone(FluxBackbone):
    """Chroma (FLUX.1-schnell's architecture, pruned): T5 only, encoded with its attention mask, and
    the transformer masks the padding after the first padding token (the mask is part of the
    condition: fixed length, so conditions batch as they are); no pooled vector, no guidance
    embedding; latents, ids, grid and VAE as FLUX.1's."""

    family = "chroma"

    def __init__(self, pipe, options):
        super().__init__(pipe, options)
        embed = getattr(self.transformer, "time_text_embed", None)
        if embed is not None and hasattr(embed, "guidance_proj") and hasattr(embed, "mod_proj"):
            embed.guidance_proj = _ConstantsOnDevice(embed.guidance_proj)

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

    def _timestep_arguments(self, scheduler, num_steps: int) -> dict:
        """`Flux2KleinPipeline`: FLUX's linspace grid, shifted by its empirical `mu(image tokens, T)`
        whether the scheduler shifts dynamically or not; a `use_flow_sigmas` scheduler picks its own."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        arguments = super()._timestep_arguments(scheduler, num_steps)
        if scheduler.config.get("use_flow_sigmas", False):
            arguments["sigmas"] = None
        arguments.update(num_inference_steps=num_steps, mu=compute_empirical_mu(self.latent_grid ** 2, num_steps))
        return arguments
