"""Tiny random diffusers checkpoints (SD3, FLUX.1, Chroma, FLUX.2 [klein], Qwen-Image) and a tiny CLIP model, built offline from configs.

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
QWEN_WIDTH = 16  # hidden width of the tiny Qwen2.5-VL text encoder


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


# the system part of QwenImagePipeline's prompt template (its first 34 tokens, which the pipeline
# drops from the text encoder's output, are "<|im_start|>" + this + "<|im_end|>\n<|im_start|>")
QWEN_TEMPLATE_SYSTEM = ("system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                        "spatial relationships of the objects and background:")


def _byte_level_qwen_tokenizer(pieces: list[str]):
    """Qwen2's byte-level BPE without merges (one token per byte), its chat-template tokens, and
    `pieces` added as whole tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import AddedToken, Qwen2Tokenizer

    vocab = {character: index for index, character in enumerate(sorted(ByteLevel.alphabet()))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens([AddedToken(piece, normalized=False) for piece in pieces])
    return tokenizer


def tiny_qwen_tokenizer():
    """The byte-level Qwen tokenizer with the template's system text as 30 added tokens: like the
    real tokenizer, the template's prefix is 34 tokens, so the pipeline's
    `prompt_template_encode_start_idx` drops exactly the system part and a prompt's embedding starts
    at "user\n". (A prompt containing one of those fragments, e.g. " colo", gets it as one token:
    harmless in a random test model.)"""
    text = QWEN_TEMPLATE_SYSTEM
    bounds = [round(i * len(text) / 30) for i in range(31)]
    return _byte_level_qwen_tokenizer([text[a:b] for a, b in zip(bounds, bounds[1:])] + ["user\n", "assistant\n"])


def _tiny_qwen_vl(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab_size, head_dim = len(tokenizer), QWEN_WIDTH // 2
    end_of_text, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=QWEN_WIDTH, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, head_dim // 2 - 2]},
            bos_token_id=end_of_text, eos_token_id=im_end, pad_token_id=end_of_text,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=QWEN_WIDTH,
                           patch_size=2, spatial_merge_size=1, temporal_patch_size=1),
        # ids of the (unused) image tokens: any inside the tiny vocabulary
        bos_token_id=end_of_text, eos_token_id=im_end, image_token_id=end_of_text, video_token_id=end_of_text,
        vision_start_token_id=end_of_text, vision_end_token_id=end_of_text,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def save_tiny_qwen_image(directory: str | Path, seed: int = 0) -> Path:
    """A random Qwen-Image pipeline (tiny Qwen2.5-VL text encoder, 4x Qwen-Image VAE, the real
    checkpoint's scheduler config: dynamic shift, `shift_terminal` 0.02)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    pipe = QwenImagePipeline(
        transformer=QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=QWEN_WIDTH, axes_dims_rope=(2, 2, 4),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
            shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential",
        ),
        vae=AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                   temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                   latents_std=[1.5, 0.8, 1.2, 2.0]),
        text_encoder=_tiny_qwen_vl(tokenizer),
        tokenizer=tokenizer,
    )
    pipe.save_pretrained(str(directory))
    return Path(directory)


# a minimal Qwen3-style chat template: what Flux2KleinPipeline's `apply_chat_template(...,
# add_generation_prompt=True, enable_thinking=False)` needs (the real one adds an empty think block)
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
FLUX2_TEXT_LAYERS = 27  # Flux2KleinPipeline stacks hidden states 9, 18 and 27 of its text encoder


def tiny_qwen3_tokenizer():
    """The byte-level Qwen tokenizer with "user\n" as one token (so a short `max_sequence_length`
    still reaches the prompt) and a Qwen3-style chat template."""
    tokenizer = _byte_level_qwen_tokenizer(["user\n", "assistant\n"])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def save_tiny_flux2_klein(directory: str | Path, seed: int = 0) -> Path:
    """A random FLUX.2 [klein] pipeline: tiny Qwen3 text encoder (27 layers of width 16, hidden
    states 9/18/27 stacked as the pipeline does), 2x FLUX.2 VAE with its latent batch norm (random
    running statistics, so de-normalisation is exercised), CFG enabled (not distilled)."""
    from diffusers import (AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel,
                           FlowMatchEulerDiscreteScheduler)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = tiny_qwen3_tokenizer()
    end_of_text, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=QWEN_WIDTH, intermediate_size=32, num_hidden_layers=FLUX2_TEXT_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
        bos_token_id=end_of_text, eos_token_id=im_end, pad_token_id=end_of_text, tie_word_embeddings=True,
    ))
    vae = AutoencoderKLFlux2(
        latent_channels=4, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=2, sample_size=16,
    )
    with torch.no_grad():  # the latent batch norm's statistics (over 2x2-patched latents)
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.3)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    pipe = Flux2KleinPipeline(
        transformer=Flux2Transformer2DModel(
            in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=3 * QWEN_WIDTH, timestep_guidance_channels=32, axes_dims_rope=(2, 2, 2, 2),
            guidance_embeds=False,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
            use_dynamic_shifting=True,
        ),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, is_distilled=False,
    )
    pipe.save_pretrained(str(directory))
    return Path(directory)


def save_tiny_chroma(directory: str | Path, seed: int = 0) -> Path:
    """A random Chroma pipeline (tiny T5 whose padding is masked in the transformer, 2x VAE, FLUX's
    scheduler config)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    pipe = ChromaPipeline(
        transformer=ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=T5_WIDTH, axes_dims_rope=(2, 2, 4),
            approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
            use_dynamic_shifting=True,
        ),
        vae=_tiny_vae(), text_encoder=_tiny_t5(), tokenizer=tiny_t5_tokenizer(),
    )
    pipe.save_pretrained(str(directory))
    return Path(directory)


def save_tiny(family: str, directory: str | Path) -> Path:
    """The tiny checkpoint of a diffusers family, by the `family` name of its backbone (sd3, flux,
    chroma, flux2, qwenimage)."""
    builders = {"sd3": save_tiny_sd3, "flux": save_tiny_flux, "chroma": save_tiny_chroma,
                "flux2": save_tiny_flux2_klein, "qwenimage": save_tiny_qwen_image}
    if family not in builders:
        raise ValueError(f"no tiny checkpoint for family {family!r}; known: {sorted(builders)}")
    return builders[family](directory)
