"""Qwen-Image (`QwenImagePipeline`) and its variable-length text condition."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from sfgrpo.distributed import unwrap
from sfgrpo.models.pipelines.base import PackedLatentsBackbone, pipeline_timestep


def _text_lengths_without_sync(encoder_hidden_states: Tensor, encoder_hidden_states_mask: Tensor | None):
    """diffusers' `compute_text_seq_len_from_mask` (Qwen-Image's transformer), with the fallback
    length filled on the device: diffusers builds it with `torch.as_tensor(int, device=...)`, a
    host-to-device copy that synchronises the host in every forward of a padded batch (whose
    result the transformer does not even read). Same values, same checks."""
    batch_size, text_seq_len = encoder_hidden_states.shape[:2]
    if encoder_hidden_states_mask is None:
        return text_seq_len, None, None
    if encoder_hidden_states_mask.shape[:2] != (batch_size, text_seq_len):
        raise ValueError(f"`encoder_hidden_states_mask` shape {encoder_hidden_states_mask.shape} must match "
                         f"(batch_size, text_seq_len)=({batch_size}, {text_seq_len}).")
    if encoder_hidden_states_mask.dtype != torch.bool:
        encoder_hidden_states_mask = encoder_hidden_states_mask.to(torch.bool)
    position_ids = torch.arange(text_seq_len, device=encoder_hidden_states.device, dtype=torch.long)
    active_positions = torch.where(encoder_hidden_states_mask, position_ids, position_ids.new_zeros(()))
    has_active = encoder_hidden_states_mask.any(dim=1)
    per_sample_len = torch.where(has_active, active_positions.max(dim=1).values + 1,
                                 position_ids.new_full((), text_seq_len))
    return text_seq_len, per_sample_len, encoder_hidden_states_mask


@contextlib.contextmanager
def _sync_free_text_lengths(active: bool):
    """Runs the transformer with `_text_lengths_without_sync` in place of diffusers' function, only
    for this call (a diffusers without that function is left alone)."""
    from diffusers.models.transformers import transformer_qwenimage as module

    original = getattr(module, "compute_text_seq_len_from_mask", None)
    if not active or original is None:
        yield
        return
    module.compute_text_seq_len_from_mask = _text_lengths_without_sync
    try:
        yield
    finally:
        module.compute_text_seq_len_from_mask = original


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

    def __init__(self, pipe, options):
        super().__init__(pipe, options)
        self._latent_stats: dict = {}  # (device, dtype) -> the VAE's latents_mean / latents_std

    @property
    def unused_parameter_prefixes(self) -> tuple[str, ...]:
        """The last block's text-stream output (attention output projection, text MLP): the model
        returns only the image stream, so these never get a gradient; the trainer keeps them frozen
        (DDP would wait for their gradients forever)."""
        last = len(unwrap(self.transformer).transformer_blocks) - 1
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
        with _sync_free_text_lengths(mask is not None):
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
        # the VAE's per-channel statistics, made once per device and dtype: built from the config's
        # lists in every decode, they were a host-to-device copy (a host sync) per decode, and the
        # stepwise rewards decode after every step
        key = (z.device, z.dtype)
        stats = self._latent_stats.get(key)
        if stats is None:
            config = self.vae.config
            stats = self._latent_stats[key] = tuple(
                torch.tensor(values, dtype=z.dtype).view(1, -1, 1, 1, 1).to(z.device)
                for values in (config.latents_mean, config.latents_std))
        mean, std = stats
        return z * std + mean

    def _from_vae_output(self, decoded: Tensor) -> Tensor:
        return decoded[:, :, 0]
