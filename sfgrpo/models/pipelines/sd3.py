"""SD3 / SD3.5 (`StableDiffusion3Pipeline`)."""

from __future__ import annotations

from torch import Tensor

from sfgrpo.models.pipelines.base import PipelineBackbone, _calculate_shift


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

    def _timestep_arguments(self, scheduler, num_steps: int) -> dict:
        """`StableDiffusion3Pipeline`: the scheduler's own grid for `num_steps` (its static shift, or
        resolution-dependent `mu` when it uses dynamic shifting)."""
        arguments = {"num_inference_steps": num_steps}
        if scheduler.config.get("use_dynamic_shifting", False):
            seq_len = (self.latent_size // self.transformer_config.patch_size) ** 2
            arguments["mu"] = _calculate_shift(seq_len, scheduler.config, default_max_shift=1.16)
        return arguments
