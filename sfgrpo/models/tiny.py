"""Tiny random diffusers checkpoints (SD3, FLUX) and a tiny CLIP model, built offline from configs.

They exercise exactly the loading code real checkpoints go through (`model_index.json`,
`from_pretrained` of every component) in a second of CPU time, so the tests need no network and
no downloaded weights. The tokenizers are built from a tiny in-memory vocabulary: byte-level
characters only (no merges) for CLIP's BPE, whitespace-split words for T5's Unigram.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_WIDTH = 16  # hidden width of each tiny CLIP text encoder (two of them are concatenated: 32)
T5_WIDTH = 32


def _clip_vocab() -> dict[str, int]:
    """Byte-level BPE vocabulary without merges: every printable character, alone and word-final."""
    characters = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in characters:
        vocab.setdefault(character, len(vocab))
        vocab.setdefault(character + "</w>", len(vocab))
    return vocab


def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_clip_vocab(), merges=[], model_max_length=16)


def tiny_t5_tokenizer():
    from transformers import T5TokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["▁"]
    return T5TokenizerFast(vocab=[(w, -1.0) for w in words], extra_ids=0, model_max_length=32)


def _clip_text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=32, projection_dim=TEXT_WIDTH,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=2, sample_size=16, scaling_factor=1.5, shift_factor=0.1,
    )


def _tiny_t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tiny_t5_tokenizer()), d_model=T5_WIDTH, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))


def save_tiny_sd3(directory: str | Path, seed: int = 0, with_t5: bool = False) -> Path:
    """A random SD3 pipeline (two tiny CLIP encoders, optionally a tiny T5 -- SD3 runs without one --,
    2x VAE) saved with `save_pretrained`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=2 * TEXT_WIDTH, caption_projection_dim=16,
            pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=16,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(),
        text_encoder=CLIPTextModelWithProjection(_clip_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(len(tokenizer))),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=_tiny_t5() if with_t5 else None,
        tokenizer_3=tiny_t5_tokenizer() if with_t5 else None,
    )
    pipe.save_pretrained(str(directory))
    return Path(directory)


def save_tiny_flux(directory: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A random FLUX pipeline (tiny CLIP + tiny T5, 2x VAE, guidance embedding like FLUX.1-dev)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=TEXT_WIDTH,
            guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
            use_dynamic_shifting=True,
        ),
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_clip_text_config(len(clip_tokenizer))),
        tokenizer=clip_tokenizer,
        text_encoder_2=_tiny_t5(),
        tokenizer_2=t5_tokenizer,
    )
    pipe.save_pretrained(str(directory))
    return Path(directory)


def save_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """A random CLIPModel + CLIPProcessor (32x32 images) saved with `save_pretrained`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=TEXT_WIDTH, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8)
    config = CLIPConfig(text_config=_clip_text_config(len(tokenizer)).to_dict(), vision_config=vision.to_dict(),
                        projection_dim=TEXT_WIDTH)
    CLIPModel(config).save_pretrained(str(directory))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(directory))
    return Path(directory)
