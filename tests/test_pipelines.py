"""Real-backbone loading (SD3, FLUX, Qwen-Image) on tiny random diffusers checkpoints built offline."""

import contextlib
import json
import math

import pytest
import torch

from sfgrpo.models import load_backbone
from sfgrpo.models.pipelines import (ChromaBackbone, Flux2KleinBackbone, FluxBackbone, PaddedText, PipelineOptions,
                                     QwenImageBackbone, SD3Backbone, backbone_families, load_pipeline_backbone)
from sfgrpo.models.tiny import save_tiny, save_tiny_flux, save_tiny_flux2_klein, save_tiny_sd3
from sfgrpo.trainer import Trainer, TrainerConfig
from sfgrpo.trainer.rollout import GuidedModel, rollout

torch.set_num_threads(1)
pytest.importorskip("transformers")

OPTIONS = PipelineOptions(resolution=16, max_sequence_length=8, decode_batch_size=3)
PROMPTS = ["a red cat", "two dogs, sleeping", "x"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """family -> its tiny checkpoint directory, built on first use, once per module."""
    built = {}

    def directory(family: str):
        if family not in built:
            built[family] = save_tiny(family, tmp_path_factory.mktemp(family))
        return built[family]

    return directory


@pytest.fixture(scope="module")
def sd3_dir(tiny_dirs):
    return tiny_dirs("sd3")


@pytest.fixture(scope="module")
def qwen_dir(tiny_dirs):
    return tiny_dirs("qwenimage")


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory):
    """SD3 with a T5 (as SD3.5 ships) and FLUX without guidance embedding (as FLUX.1-schnell)."""
    return {"sd3_t5": save_tiny_sd3(tmp_path_factory.mktemp("sd3_t5"), with_t5=True),
            "flux_schnell": save_tiny_flux(tmp_path_factory.mktemp("flux_schnell"), guidance_embeds=False)}


FAMILIES = [backbone.family for backbone in backbone_families().values()]  # each needs a tiny checkpoint


@pytest.fixture(params=FAMILIES)
def checkpoint(request, tiny_dirs):
    return request.param, tiny_dirs(request.param)


@pytest.fixture(params=["sd3", "sd3_t5", "flux", "flux_schnell", "chroma", "flux2", "qwenimage"])
def any_checkpoint(request, tiny_dirs, variant_dirs):
    name = request.param
    return name.split("_")[0], variant_dirs[name] if name in variant_dirs else tiny_dirs(name)


def guidance_for(family: str) -> float:
    """A CFG scale that exercises each family's guidance (FLUX.1 runs without CFG)."""
    return 1.0 if family == "flux" else 2.0


def test_family_is_read_from_model_index(tiny_dirs, tmp_path):
    assert isinstance(load_pipeline_backbone(tiny_dirs("sd3"), OPTIONS), SD3Backbone)
    assert isinstance(load_backbone(str(tiny_dirs("flux"))), FluxBackbone)
    assert isinstance(load_backbone(str(tiny_dirs("flux2"))), Flux2KleinBackbone)
    assert isinstance(load_backbone(str(tiny_dirs("chroma"))), ChromaBackbone)
    assert isinstance(load_backbone(str(tiny_dirs("qwenimage"))), QwenImageBackbone)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline"):
        load_backbone(str(tmp_path))


def test_frozen_parts_and_latent_layouts(checkpoint):
    family, path = checkpoint
    model = load_pipeline_backbone(path, OPTIONS)
    for frozen in (model.vae, *model.text_encoders):
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    # 16 px, 2x VAE: SD3 keeps [C, 8, 8]; FLUX packs 2x2 patches into [16 tokens, 4 * 4 channels];
    # Qwen-Image's VAE is 4x: [4 tokens, 16 channels]
    assert model.latent_shape == {"sd3": (4, 8, 8), "flux": (16, 16), "chroma": (16, 16), "flux2": (16, 16),
                                  "qwenimage": (4, 16)}[family]
    if family == "flux2":
        from diffusers import Flux2KleinPipeline as pipe_class

        latents = torch.randn(2, 4, 8, 8)  # VAE latents -> patches -> packed, as the pipeline does
        packed = pipe_class._pack_latents(pipe_class._patchify_latents(latents))
        assert torch.equal(model.pack(latents), packed)
        ids = pipe_class._prepare_latent_ids(torch.zeros(2, 16, 4, 4))
        assert torch.equal(model.position_ids(2, 4, 4, 1, "cpu"), ids)
        assert torch.equal(model.position_ids(2, 1, 1, 8, "cpu"), pipe_class._prepare_text_ids(torch.zeros(2, 8, 3)))
    if family == "qwenimage":
        from diffusers import QwenImagePipeline

        latents = torch.randn(2, 4, 4, 4)
        assert torch.equal(model.pack(latents), QwenImagePipeline._pack_latents(latents, 2, 4, 4, 4))
        assert torch.equal(model._to_vae_latents(model.pack(latents)),
                           QwenImagePipeline._unpack_latents(model.pack(latents), 16, 16, 4))
    if family == "flux":
        from diffusers import FluxPipeline

        latents = torch.randn(2, 4, 8, 8)
        packed = model.pack(latents)
        assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 8, 8))
        assert torch.equal(model.unpack(packed), latents)
        assert torch.equal(model.image_ids("cpu", torch.float32),
                           FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32))


def test_prompt_embeddings_are_cached_per_string(checkpoint):
    _, path = checkpoint
    model = load_pipeline_backbone(path, OPTIONS)
    calls = []
    original = model._encode_text
    model._encode_text = lambda prompts: calls.append(list(prompts)) or original(prompts)
    first = model.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    again = model.encode_prompts([PROMPTS[1], PROMPTS[0]])
    assert calls == [[PROMPTS[0], PROMPTS[1]]]  # each distinct prompt encoded once, in one batch
    assert torch.equal(first[0][0], first[0][2]) and torch.equal(again[0][0], first[0][1])
    assert not torch.equal(first[0][0], first[0][1])
    null = model.null_condition(4)
    assert null[0].shape[0] == 4 and torch.equal(null[0][0], null[0][3])
    assert type(null) is type(first)


def test_ode_sampling_and_decode_match_the_diffusers_pipeline(any_checkpoint):
    """Same noise, same grid: Euler steps through our velocity reproduce the pipeline's own sampler,
    which pins the time convention (1000 t for SD3, t for the others), CFG (Qwen-Image's rescaled
    "true CFG" with its " " negative), FLUX's guidance embedding and ids, FLUX.2's 4D ids and
    stacked text layers, Qwen-Image's text masks and image shapes, packing, the scheduler grid
    (dynamic mu, FLUX.2's step-dependent mu, Qwen-Image's shift_terminal) and the VAE's
    scaling/shift (Qwen-Image: per-channel mean/std, one frame; FLUX.2: latent batch norm)."""
    family, path = any_checkpoint
    # Qwen-Image with room for whole prompts: rows of different lengths, padded and masked
    sequence = 64 if family == "qwenimage" else OPTIONS.max_sequence_length
    model = load_pipeline_backbone(path, PipelineOptions(**{**vars(OPTIONS), "max_sequence_length": sequence}))
    cfg = 1.0 if family == "flux" else 2.5
    guided = GuidedModel(model, cfg)
    sigmas = model.sampling_sigmas(4)
    noise = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    x = noise.clone()
    with torch.no_grad():
        cond, null = model.encode_prompts(PROMPTS[:2]), model.null_condition(2)
        if family == "qwenimage":
            assert not bool(cond[1].all())  # the shorter prompt is padded
        for k in range(4):
            x = x + (sigmas[k + 1] - sigmas[k]) * guided(x, torch.full((2,), float(sigmas[k])), cond, null)
    kwargs = dict(prompt=PROMPTS[:2], height=16, width=16, num_inference_steps=4, max_sequence_length=sequence)
    start = noise.clone()
    if family == "qwenimage":
        kwargs.update(true_cfg_scale=cfg, negative_prompt=" ")
    elif family == "flux2":  # its pipeline takes the noise as patches [B, 4C, H/2, W/2], returns VAE latents
        kwargs.update(guidance_scale=cfg)
        start = noise.reshape(2, 4, 4, 16).permute(0, 3, 1, 2)
    else:
        kwargs.update(guidance_scale=OPTIONS.embedded_guidance_scale if family == "flux" else cfg)
    reference = model.pipe(latents=start.clone(), output_type="latent", **kwargs).images
    torch.testing.assert_close(model._to_vae_latents(x) if family == "flux2" else x, reference, atol=1e-5, rtol=1e-5)
    images = model.decode(torch.cat([x, x, x]))  # 6 latents, decode batches of 3
    reference_images = model.pipe(latents=start.clone(), output_type="pt", **kwargs).images
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.float32
    torch.testing.assert_close(images[:2], reference_images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(images[4:], reference_images, atol=1e-5, rtol=1e-5)


def test_sd3_grid_is_the_checkpoint_schedulers(sd3_dir):
    from sfgrpo.schedules import Schedule

    model = load_pipeline_backbone(sd3_dir, OPTIONS)
    torch.testing.assert_close(model.sampling_sigmas(10), Schedule.sd3(10, 3.0).sigmas)


@pytest.mark.parametrize("mode", ["stepwise", "flow_grpo"])
def test_full_trainer_iteration(checkpoint, mode, tmp_path):
    family, path = checkpoint
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# prompts\na red cat\n\ntwo dogs, sleeping\n")
    config = TrainerConfig(
        output_dir=str(tmp_path / "run"), backbone=str(path), prompt_file=str(prompt_file), reward="brightness",
        iterations=1, prompts_per_iteration=2, group_size=2, num_steps=3, lookahead_steps=2, progress=False,
        plots=False, resolution=16, max_sequence_length=8, decode_batch_size=4, mode=mode, use_lora=True,
        lora_rank=2, lora_alpha=4.0, beta=0.04, clip_range=1e-4, learning_rate=1e-3,
        guidance_scale=guidance_for(family), image_every=1,
    )
    trainer = Trainer(config)
    assert config.prompt_list == ["a red cat", "two dogs, sleeping"]
    before = {n: p.detach().clone() for n, p in trainer.trainable.items()}
    history = trainer.train()
    record = history[-1]
    assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))
    assert trainer.last_images.shape[1:] == (4, 3, 16, 16)
    assert trainer.last_images.shape[0] == (4 if mode == "stepwise" else 1)
    assert any(not torch.equal(before[n], p) for n, p in trainer.trainable.items())
    assert all(p.dtype == torch.float32 for p in trainer.trainable.values())
    assert (tmp_path / "run" / "checkpoints").is_dir()


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_full_finetune_of_a_bf16_checkpoint_keeps_fp32_master_weights(checkpoint, precision, tmp_path):
    # bf16 weights would round AdamW's small updates away; the trained copy is fp32, the frozen
    # parts and the KL's reference copy stay bf16, and the forward runs with or without autocast
    family, path = checkpoint
    config = TrainerConfig(
        output_dir=str(tmp_path / "run"), backbone=str(path), prompts="a cat,a dog", reward="brightness",
        iterations=1, prompts_per_iteration=2, group_size=2, num_steps=3, progress=False, plots=False,
        resolution=16, max_sequence_length=8, model_dtype="bfloat16", mixed_precision=precision, beta=0.04,
        learning_rate=1e-6, guidance_scale=guidance_for(family),
    )
    trainer = Trainer(config)
    assert all(p.dtype == torch.float32 for p in trainer.trainable.values())
    assert {p.dtype for p in trainer.reference_transformer.parameters()} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in trainer.trainable.items()}
    record = trainer.train()[-1]
    assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))
    changed = {n for n, p in trainer.trainable.items() if not torch.equal(before[n], p)}
    # lr 1e-6 moves fp32 weights (bf16 ones would mostly not move): all that get a gradient
    live = live_parameters(trainer)
    assert changed == live and len(live) > 0.75 * len(before)


def live_parameters(trainer) -> set[str]:
    """The trained tensors the velocity depends on (the last block of SD3 and Qwen-Image computes
    text-stream outputs nothing reads: those weights get no or a zero gradient)."""
    model = trainer.model
    x = torch.randn(2, *model.latent_shape)
    v = model.velocity(x, torch.tensor([0.9, 0.5]), model.encode_prompts(["a cat", "a dog"]))
    names = list(trainer.trainable)
    grads = torch.autograd.grad(v.float().square().sum(), [trainer.trainable[n] for n in names], allow_unused=True)
    return {n for n, g in zip(names, grads) if g is not None and bool(g.ne(0).any())}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_exported_weights_load_into_diffusers_and_give_the_trained_velocity(checkpoint, lora, tmp_path):
    from diffusers import ChromaPipeline, Flux2KleinPipeline, FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline

    from sfgrpo.cli import main
    from sfgrpo.trainer.export import export_weights

    family, path = checkpoint
    config = TrainerConfig(
        output_dir=str(tmp_path / "run"), backbone=str(path), prompts="a cat,a dog", reward="brightness",
        iterations=2, prompts_per_iteration=2, group_size=2, num_steps=3, progress=False, plots=False,
        resolution=16, max_sequence_length=8, use_lora=lora, lora_rank=2, lora_alpha=8.0, learning_rate=3e-2,
        ema_decay=0.5, guidance_scale=1.0,
    )
    trainer = Trainer(config)
    trainer.train()
    torch.manual_seed(3)
    latents = torch.randn(2, *trainer.model.latent_shape)
    t = torch.tensor([0.7, 0.4])
    cond = trainer.model.encode_prompts(["a cat", "a dog"])
    with trainer.ema_weights(), torch.no_grad():
        expected = trainer.model.velocity(latents, t, cond)
    with torch.no_grad():
        trained = trainer.model.velocity(latents, t, cond)
    assert not torch.allclose(expected, trained)  # EMA and trained weights differ: the export picks EMA
    # the CLI on the run's final checkpoint writes what export_weights writes
    assert main(["export", "--config", str(tmp_path / "run" / "config.json"), "--resume-from", "latest",
                 "--export-dir", str(tmp_path / "export"), "--no-progress"]) == 0
    pipe = load_pipeline_backbone(path, OPTIONS).pipe  # the base checkpoint, fresh, as diffusers loads it
    assert isinstance(pipe, {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline, "chroma": ChromaPipeline,
                             "flux2": Flux2KleinPipeline, "qwenimage": QwenImagePipeline}[family])
    if lora:
        assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").exists()
        pipe.load_lora_weights(str(tmp_path / "export"))
        loaded = pipe.transformer
    else:
        loaded = type(pipe.transformer).from_pretrained(str(tmp_path / "export" / "transformer"))
    trainer.model.transformer = loaded.eval()
    with torch.no_grad():
        got = trainer.model.velocity(latents, t, cond)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="keeps no EMA"):
        trainer.ema = None
        export_weights(trainer, tmp_path / "again", use_ema=True)


def test_on_policy_ratio_is_exactly_one(checkpoint, tmp_path):
    family, path = checkpoint
    config = TrainerConfig(
        output_dir=str(tmp_path / "run"), backbone=str(path), prompts="a cat,a dog", reward="brightness",
        prompts_per_iteration=2, group_size=2, num_steps=3, progress=False, plots=False, resolution=16,
        max_sequence_length=8, guidance_scale=3.0 if family != "flux" else 1.0,
    )
    trainer = Trainer(config)
    batch = rollout(trainer.guided, ["a cat", "a dog"], 2, trainer.steps, sde_type="sde", logprob="gaussian",
                    generator=torch.Generator().manual_seed(0))
    advantages = torch.randn(4, trainer.steps.num_steps)
    for k in trainer.steps.trained:
        _, record = trainer.step_loss(batch, advantages, k, slice(None))
        assert record[1].item() == 1.0


def test_xformers_backend_fails_clearly_when_missing(sd3_dir):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed")
    with pytest.raises(ImportError, match="xformers"):
        load_pipeline_backbone(sd3_dir, PipelineOptions(resolution=16, attention_backend="xformers"))
    with pytest.raises(ValueError, match="attention_backend"):
        TrainerConfig(attention_backend="flash").validate()


def test_cli_flags_reach_the_backbone(sd3_dir, tmp_path):
    from sfgrpo.cli import main
    from sfgrpo.schedules import Schedule

    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(["a, b", "c"]))
    args = ["train", "--backbone", str(sd3_dir), "--prompt-file", str(prompt_file), "--resolution", "16",
            "--max-sequence-length", "8", "--iterations", "1", "--prompts-per-iteration", "2", "--group-size", "2",
            "--num-steps", "3", "--decode-batch-size", "5", "--reward", "brightness", "--no-schedule-from-checkpoint", "--shift", "1.5",
            "--output-dir", str(tmp_path / "run"), "--no-progress", "--no-plots", "--offload-text-encoders"]
    assert main(args) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["decode_batch_size"] == 5 and saved["schedule_from_checkpoint"] is False
    config = TrainerConfig.from_dict(saved)
    trainer = Trainer(config)
    assert trainer.model.options.decode_batch_size == 5 and config.prompt_list == ["a, b", "c"]
    assert len(trainer.model.text_encoders) == 0 and len(trainer.model.offloaded_text_encoders) == 2
    torch.testing.assert_close(torch.tensor(trainer.steps.t + [0.0]), Schedule.sd3(3, 1.5).sigmas)


def test_qwen_image_text_padding_is_masked_out(qwen_dir):
    """Prompts keep their own token counts and are padded per batch (mask False); padding a
    condition further (as concatenating it with a longer one does) leaves the velocity unchanged."""
    model = load_pipeline_backbone(qwen_dir, OPTIONS)
    short, long = model.encode_prompts(["x"]), model.encode_prompts(["two dogs, sleeping"])
    assert isinstance(short, PaddedText) and short[0].shape[1] < long[0].shape[1]
    assert short[1] is None and long[1] is None  # nothing padded: no mask, as the pipeline passes none
    null = model.null_condition(3)
    assert null[1] is None and null[0].shape[0] == 3
    both = model.encode_prompts(["x", "two dogs, sleeping"])
    torch.testing.assert_close(both[0][1], long[0][0], rtol=0, atol=0)
    assert both[1][0].sum() == short[0].shape[1] and not bool(both[1][0, short[0].shape[1]:].any())
    assert not bool(both[0][0, short[0].shape[1]:].any())
    from sfgrpo.trainer.rollout import concat_rows

    joined = concat_rows(short, long)
    assert isinstance(joined, PaddedText) and torch.equal(joined[0], both[0]) and torch.equal(joined[1], both[1])
    same = concat_rows(long, long)  # equal lengths, no masks: still none
    assert same[1] is None and same[0].shape[0] == 2
    from sfgrpo.trainer.rollout import repeat_rows, select_rows

    assert select_rows(same, slice(0, 1))[1] is None and repeat_rows(same, 3)[0].shape[0] == 6
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        alone = torch.cat([model.velocity(x[:1], t[:1], short), model.velocity(x[1:], t[1:], long)])
        batched = model.velocity(x, t, joined)
        masked = model.velocity(x[1:], t[1:], PaddedText((long[0], torch.ones(long[0].shape[:2], dtype=torch.bool))))
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked, alone[1:], rtol=1e-5, atol=1e-6)  # no mask = an all-True one


def test_qwen_image_guidance_is_the_pipelines_rescaled_cfg():
    v_cond, v_uncond = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    got = QwenImageBackbone.combine_guidance(v_cond, v_uncond, 4.0)
    combined = v_uncond + 4.0 * (v_cond - v_uncond)
    expected = combined * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.norm(dim=-1), v_cond.norm(dim=-1))  # each token keeps the conditional norm


def test_offloaded_text_encoders_stay_in_cpu_memory_between_encodes(checkpoint):
    """`offload_text_encoders`: the encoders are not submodules (`.to()` leaves them alone), visit
    the backbone's device only when a prompt is not cached yet, and encode exactly as before."""
    family, path = checkpoint
    resident = load_pipeline_backbone(path, OPTIONS)
    model = load_pipeline_backbone(path, PipelineOptions(**{**vars(OPTIONS), "offload_text_encoders": True}))
    assert len(model.text_encoders) == 0 and len(model.offloaded_text_encoders) == len(resident.text_encoders) > 0
    assert not any(p.requires_grad for e in model.offloaded_text_encoders for p in e.parameters())
    assert all(not e.training for e in model.offloaded_text_encoders)
    moves = []
    for encoder in model.offloaded_text_encoders:
        original = encoder.to
        encoder.to = lambda *args, original=original, **kwargs: moves.append(str(args[0])) or original(*args, **kwargs)
    expected = resident.encode_prompts(PROMPTS)
    got = model.encode_prompts(PROMPTS)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    encoders = len(model.offloaded_text_encoders)
    assert moves == [str(model.device)] * encoders + ["cpu"] * encoders  # there and back, once
    model.encode_prompts(PROMPTS[:2])
    assert len(moves) == 2 * encoders  # cached prompts need no encoder
    model.to(torch.float64)  # what trainer.model.to(device) moves: not the offloaded encoders
    assert model.dtype == torch.float64
    assert {p.dtype for e in model.offloaded_text_encoders for p in e.parameters()} == {torch.float32}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offloaded_text_encoders_encode_on_cuda(sd3_dir):
    model = load_pipeline_backbone(sd3_dir, PipelineOptions(**{**vars(OPTIONS), "offload_text_encoders": True}))
    model.to("cuda")
    cond = model.encode_prompts(PROMPTS)
    assert all(part.is_cuda for part in cond)
    assert all(p.device.type == "cpu" for e in model.offloaded_text_encoders for p in e.parameters())
    resident = load_pipeline_backbone(sd3_dir, OPTIONS).to("cuda")
    for a, b in zip(cond, resident.encode_prompts(PROMPTS)):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_velocity_never_synchronises_on_cuda(family, tiny_dirs):
    """Forward and backward of each backbone's velocity (what every rollout step and PPO update
    runs) without a host sync: position ids are built on the device. Qwen-Image with a padded
    batch: its mask goes through `_text_lengths_without_sync` (diffusers' version copies a Python
    int to the device in every forward). Chroma: its zero guidance embedding is
    computed on the device (`_ConstantsOnDevice`). Steady state: after one forward (diffusers
    caches per-device tensors on first use, e.g. Qwen-Image's rotary frequencies)."""
    model = load_pipeline_backbone(tiny_dirs(family), OPTIONS).to("cuda")
    prompts = PROMPTS[1:]  # Qwen-Image: different token counts, a padded batch with its mask
    cond = model.encode_prompts(prompts)  # encoding may synchronise; it is cached per prompt
    x = torch.randn(2, *model.latent_shape, device="cuda")
    t = torch.tensor([0.9, 0.4], device="cuda")
    model.velocity(x, t, cond).float().square().sum().backward()  # the first step of a run
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.velocity(x, t, cond).float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_qwen_text_lengths_match_diffusers_and_the_swap_is_scoped(tiny_dirs):
    """`_text_lengths_without_sync` gives diffusers' `compute_text_seq_len_from_mask` values (masks
    with empty rows, float masks, none); the swap lasts one forward (restored after an error too),
    and a padded batch's velocity is the one diffusers' own function gives."""
    from diffusers.models.transformers import transformer_qwenimage as module

    from sfgrpo.models.pipelines import qwen_image

    original = module.compute_text_seq_len_from_mask
    embeds = torch.randn(4, 7, 3)
    mask = torch.rand(4, 7) > 0.4
    mask[1] = False  # a row without any active token
    for given in (mask, mask.float(), None):
        ours, theirs = qwen_image._text_lengths_without_sync(embeds, given), original(embeds, given)
        assert ours[0] == theirs[0]
        for a, b in zip(ours[1:], theirs[1:]):
            assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(ValueError, match="must match"):
        qwen_image._text_lengths_without_sync(embeds, mask[:, :5])
    with pytest.raises(RuntimeError, match="inside"):
        with qwen_image._sync_free_text_lengths(True):
            assert module.compute_text_seq_len_from_mask is qwen_image._text_lengths_without_sync
            raise RuntimeError("inside")
    assert module.compute_text_seq_len_from_mask is original
    with qwen_image._sync_free_text_lengths(False):
        assert module.compute_text_seq_len_from_mask is original
    model = load_pipeline_backbone(tiny_dirs("qwenimage"), OPTIONS)
    cond = model.encode_prompts(PROMPTS[1:])
    assert cond[1] is not None  # different token counts: padded
    x, t = torch.randn(2, *model.latent_shape), torch.tensor([0.9, 0.4])
    with torch.no_grad():
        patched = model.velocity(x, t, cond)
        swap, qwen_image._sync_free_text_lengths = qwen_image._sync_free_text_lengths, lambda active: contextlib.nullcontext()
        try:
            direct = model.velocity(x, t, cond)  # diffusers' own function
        finally:
            qwen_image._sync_free_text_lengths = swap
    assert torch.equal(patched, direct)


def test_qwen_decode_statistics_are_made_once_per_device_and_dtype(tiny_dirs):
    model = load_pipeline_backbone(tiny_dirs("qwenimage"), OPTIONS)
    z = torch.randn(1, model.vae.config.z_dim, 1, 2, 2)
    first = model._denormalize(z)
    stats = model._latent_stats[(z.device, z.dtype)]
    assert model._denormalize(z) is not first and model._latent_stats[(z.device, z.dtype)] is stats
    mean = torch.tensor(model.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(first, z * std + mean, rtol=0, atol=0)


def test_chroma_guidance_embedding_is_built_on_the_module_device(tiny_dirs):
    """Chroma's transformer embeds `torch.tensor([0] * batch)` made on the CPU; the wrapper builds
    the constants where the module lives (meta here stands in for a GPU: a CPU input reaching it
    would fail), bit-identical on the CPU, with diffusers' state dict keys unchanged."""
    from diffusers.models.embeddings import Timesteps

    from sfgrpo.models.pipelines.flux import _ConstantsOnDevice

    model = load_pipeline_backbone(tiny_dirs("chroma"), OPTIONS)
    embed = model.transformer.time_text_embed
    assert isinstance(embed.guidance_proj, _ConstantsOnDevice)
    assert not any("anchor" in key for key in model.transformer.state_dict())
    plain = Timesteps(8, flip_sin_to_cos=True, downscale_freq_shift=0)
    wrapped = _ConstantsOnDevice(Timesteps(8, flip_sin_to_cos=True, downscale_freq_shift=0))
    zeros = torch.tensor([0] * 3)
    assert torch.equal(wrapped(zeros), plain(zeros))
    on_meta = _ConstantsOnDevice(Timesteps(8, flip_sin_to_cos=True, downscale_freq_shift=0)).to("meta")
    assert on_meta(zeros).device.type == "meta" and on_meta(zeros).shape == (3, 8)
    mixed = torch.tensor([0, 1])  # not one repeated value: passed through as given
    assert on_meta(mixed).device.type == "cpu"
    t = torch.tensor([0.9, 0.4])
    x = torch.randn(2, *model.latent_shape)
    cond = model.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        patched = model.velocity(x, t, cond)
        embed.guidance_proj = embed.guidance_proj.inner  # diffusers' own path
        assert torch.equal(model.velocity(x, t, cond), patched)


def test_distilled_flux2_refuses_cfg(tmp_path):
    """A step-distilled FLUX.2 [klein] samples without CFG (its pipeline ignores the scale): training
    it with CFG would train another sampler than the one deployed."""
    path = save_tiny_flux2_klein(tmp_path / "klein")
    index = json.loads((path / "model_index.json").read_text())
    index["is_distilled"] = True
    (path / "model_index.json").write_text(json.dumps(index))
    base = dict(output_dir=str(tmp_path / "run"), backbone=str(path), prompts="a cat", reward="brightness",
                prompts_per_iteration=1, group_size=2, num_steps=2, progress=False, plots=False, resolution=16,
                max_sequence_length=8)
    with pytest.raises(ValueError, match="guidance-distilled"):
        Trainer(TrainerConfig(**base, guidance_scale=3.0))
    with pytest.raises(ValueError, match="guidance-distilled"):  # evaluations would run CFG too
        Trainer(TrainerConfig(**base, guidance_scale=1.0, eval_guidance_scale=2.0))
    with pytest.raises(ValueError, match="1 = no CFG"):  # below 1 the pipelines switch CFG off
        TrainerConfig(**base, guidance_scale=0.0).validate()
    assert Trainer(TrainerConfig(**base, guidance_scale=1.0)).model.cfg_distilled


def test_prompt_cache_keeps_the_most_recently_used(sd3_dir):
    model = load_pipeline_backbone(sd3_dir, PipelineOptions(**{**vars(OPTIONS), "prompt_cache_size": 2}))
    calls = []
    original = model._encode_text
    model._encode_text = lambda prompts: calls.append(list(prompts)) or original(prompts)
    first = model.encode_prompts(["a", "b", "a"])
    model.encode_prompts(["a"])  # "a" is now the most recent
    model.encode_prompts(["c"])  # evicts "b"
    assert list(model._prompt_cache) == ["a", "c"]
    again = model.encode_prompts(["b", "a"])
    assert calls == [["a", "b"], ["c"], ["b"]]
    torch.testing.assert_close(again[0][0], first[0][1], rtol=0, atol=0)
    torch.testing.assert_close(again[0][1], first[0][0], rtol=0, atol=0)
    big = model.encode_prompts(["p", "q", "r", "p"])  # more prompts than the cache holds, in one call
    assert big[0].shape[0] == 4 and torch.equal(big[0][0], big[0][3]) and len(model._prompt_cache) == 2
    with pytest.raises(ValueError, match="prompt_cache_size"):
        PipelineOptions(prompt_cache_size=-1).validate()


def test_qwen_image_refuses_xformers(qwen_dir):
    with pytest.raises(ValueError, match="not supported for Qwen-Image"):
        load_pipeline_backbone(qwen_dir, PipelineOptions(**{**vars(OPTIONS), "attention_backend": "xformers"}))


def test_default_lora_targets_cover_both_streams(checkpoint, tmp_path):
    """`lora_target_modules` None: the family's default, the attention of the image and the text
    stream (Flow-GRPO's SD3 recipe), plus FLUX.2's fused single-block projection; an explicit list
    wins."""
    pytest.importorskip("peft")
    family, path = checkpoint
    base = dict(output_dir=str(tmp_path / "run"), backbone=str(path), prompts="a cat", reward="brightness",
                prompts_per_iteration=1, group_size=2, num_steps=2, progress=False, plots=False, resolution=16,
                max_sequence_length=8, use_lora=True, lora_rank=2)
    adapted = {n.split(".lora_")[0].split(".", 1)[1] for n in Trainer(TrainerConfig(**base)).trainable}
    assert any(n.endswith("attn.add_q_proj") for n in adapted) and any(n.endswith("attn.to_q") for n in adapted)
    assert any(n.endswith("attn.to_qkv_mlp_proj") for n in adapted) == (family == "flux2")
    explicit = Trainer(TrainerConfig(**{**base, "output_dir": str(tmp_path / "explicit")}, lora_target_modules="to_q"))
    assert all(".to_q.lora_" in n for n in explicit.trainable)
