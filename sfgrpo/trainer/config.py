"""`TrainerConfig`: one dataclass whose field names are the `sfgrpo train` flags (TRL-style).

A run is configured by defaults < config file (JSON, or YAML when PyYAML is installed) < flags.
`validate()` turns every bad combination into one clear `ValueError` before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODES = ("stepwise", "stepwise_per_step", "flow_grpo")
SDE_TYPES = ("sde", "cps", "ddim")
MIXED_PRECISION = ("no", "bf16", "fp16")


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


def _need(condition: bool, message: str) -> None:
    """A config check: a ValueError naming the problem when `condition` fails."""
    if not condition:
        raise ValueError(f"bad trainer config: {message}")


@dataclass
class TrainerConfig:
    # ------------------------------------------------------------------ run
    output_dir: str = _help("directory for metrics.jsonl, checkpoints, plots and grids", default="sfgrpo-run")
    iterations: int = _help("number of training iterations (rollout + update)", default=50)
    seed: int = _help("seed of every random stream (noise, prompt order, minibatch order)", default=0)
    device: str = _help("torch device", default="cpu")
    threads: int | None = _help("torch CPU threads (None: torch's default)", default=None)
    # ------------------------------------------------------------------ backbone and data
    backbone: str = _help(
        "'digits' (the shipped pretrained digits model), 'digits-random' / 'tiny-random' (random init, "
        "for tests), a directory written by DigitsBackbone.save, a diffusers checkpoint directory (its "
        "model_index.json picks the pipeline), or 'package.module:factory' returning any model with "
        "sfgrpo.models.protocol.Backbone's interface (called as factory(config) or factory())", default="digits")
    prompts: str = _help("comma-separated prompt list; for the digits backbone the classes", default="0,1,2,3,4,5,6,7,8,9")
    prompts_per_iteration: int = _help("groups per iteration (distinct prompts, each with its own shared noise)", default=4)
    group_size: int = _help("trajectories per group (same prompt)", default=8)
    initial_noise: str = _help(
        "shared (one initial noise per group, the paper's stepwise setting) | independent (one per trajectory, "
        "as Flow-GRPO's code draws it) | auto (shared in the stepwise modes, independent in flow_grpo)",
        default="auto")
    reward: str = _help("reward spec: a name, a product 'digit*darkness', or 'module:function'", default="digit*darkness")
    # ------------------------------------------------------------------ method
    mode: str = _help("stepwise (gains, joint normalisation) | stepwise_per_step (ablation) | flow_grpo", default="stepwise")
    advantage_normalize: str | None = _help("joint | per_step (None: from mode)", default=None)
    advantage_clip: float | None = _help("clip advantages to +-this (None: 5 for flow_grpo, off for stepwise)", default=None)
    advantage_eps: float | None = _help("epsilon in (g - mean) / (std + eps) (None: 1e-8 stepwise, 1e-4 flow_grpo)", default=None)
    flow_grpo_std: str = _help("flow_grpo advantage std: global (Flow-GRPO default) | group", default="global")
    lookahead_steps: int = _help("T': Euler sub-steps of the clean estimate (1 = Tweedie, no extra network call)", default=1)
    rollout_batch_size: int | None = _help(
        "trajectories per rollout network call, per process (None: all of the process's trajectories at once; "
        "set it for big backbones and batches; the on-policy ratio is then 1 up to batch-shape rounding, like "
        "with train_batch_size)", default=None)
    lookahead_batch_size: int | None = _help(
        "states per network call in the look-ahead (None: all N x T at once; set it for big backbones)", default=None)
    # ------------------------------------------------------------------ sampling
    num_steps: int = _help("T: sampling steps of a rollout", default=10)
    shift: float = _help("SD3 schedule shift", default=3.0)
    sde_type: str = _help("sde (Flow-GRPO) | cps | ddim", default="sde")
    noise_level: float = _help("SDE noise level a", default=0.7)
    guidance_scale: float = _help("classifier-free guidance scale (1 = no CFG, one network call per step)", default=1.0)
    cfg_gradient: str = _help(
        "CFG branches the update differentiates: cond (Flow-GRPO: the unconditional velocity is a constant: "
        "the rollout's own until the iteration's first optimizer step, then recomputed without autograd; the "
        "backward covers half the batch) | both (one batched forward, gradient through both branches)",
        default="cond")
    logprob: str = _help("log-prob convention: gaussian | flow_grpo", default="gaussian")
    train_last_step: bool = _help("also train the last step (Flow-GRPO leaves it out: its std is ~0)", default=False)
    # ------------------------------------------------------------------ optimisation
    learning_rate: float = _help("AdamW learning rate (the peak, with a schedule)", default=1e-4)
    lr_warmup_iterations: int = _help("linear warm-up of the learning rate over the first N iterations", default=0)
    lr_schedule: str = _help("constant | cosine: after the warm-up, decay to lr_min by iteration "
                             "lr_decay_iterations", default="constant")
    lr_decay_iterations: int | None = _help("where the cosine ends (None: iterations; set it when a run may be "
                                            "extended on resume, which would otherwise stretch the schedule)",
                                            default=None)
    lr_min: float = _help("learning rate at the end of the cosine", default=0.0)
    weight_decay: float = _help("AdamW weight decay", default=1e-4)
    adam_beta1: float = _help("AdamW beta1", default=0.9)
    adam_beta2: float = _help("AdamW beta2", default=0.999)
    adam_eps: float = _help("AdamW epsilon", default=1e-8)
    clip_range: float = _help("PPO ratio clip range (SPEC default 1e-4; 1e-2 suits the digits model)", default=1e-2)
    beta: float = _help("KL weight against the reference policy (backbone with LoRA disabled / frozen copy)", default=0.0)
    kl: str = _help("KL convention: exact | flow_grpo", default="exact")
    num_inner_epochs: int = _help("passes over each rollout batch", default=1)
    train_step_fraction: float = _help(
        "fraction of the trained steps each pass trains, a random subset drawn per pass and shared by its "
        "trajectories (floor, at least one; like Flow-GRPO's timestep_fraction, which draws a subset per "
        "trajectory; the update's cost shrinks in proportion; 1: every step)", default=1.0)
    train_batch_size: int | None = _help(
        "trajectories per update forward (None: the whole batch, which keeps the on-policy ratio exactly 1)", default=None)
    gradient_accumulation_steps: int | None = _help(
        "forwards (one trained step x one trajectory chunk) per optimizer step (None: all of an epoch)", default=None)
    max_grad_norm: float | None = _help("gradient-norm clip (None: off)", default=1.0)
    mixed_precision: str = _help("no | bf16 | fp16: autocast of the network (SDE math stays fp32); fp16 adds "
                                 "dynamic loss scaling", default="no")
    ema_decay: float = _help("EMA of the trained weights (0: off)", default=0.0)
    compile_backbone: bool = _help("run the transformer's forward under torch.compile (the first iterations "
                                   "compile)", default=False)
    fused_norms: bool = _help(
        "run the diffusers transformer's adaLN modulations (LayerNorm * (1 + scale) + shift), QK RMSNorms, block "
        "tails (gated residuals) and FLUX's QK-norm + rotary embedding through sfgrpo's fused ops (one pass each, "
        "Triton on CUDA; diffusers' own expressions on CPU, bit-exact); the "
        "parameters and checkpoints are unchanged (sfgrpo.models.fused_norms)", default=True)
    # ------------------------------------------------------------------ LoRA (needs peft)
    use_lora: bool = _help("train LoRA adapters (peft) instead of the full transformer", default=False)
    lora_rank: int = _help("LoRA rank", default=32)
    lora_alpha: float = _help("LoRA alpha", default=64.0)
    fused_lora: bool = _help(
        "run the LoRA layers through sfgrpo's fused LoRA linear (the adapter's products accumulated inside the "
        "GEMMs: none of peft's full-size casts, scaling products and sums); falls back to peft's forward for "
        "anything it does not reproduce; parameters and checkpoints are unchanged (sfgrpo.models.fused_lora)",
        default=True)
    lora_target_modules: str | None = _help(
        "comma-separated module names that get adapters (None: the backbone's default -- the attention projections "
        "of both streams for the diffusers families, as Flow-GRPO's SD3 recipe; to_q,to_k,to_v,to_out.0 otherwise)",
        default=None)
    # ------------------------------------------------------------------ logging and checkpoints
    eval_every: int = _help("evaluate every N iterations, before the first and after the last (0: off): ODE "
                            "samples of fixed prompts from fixed noise, the run's reward, EMA weights when on; "
                            "eval.jsonl and images/eval-*.png", default=0)
    eval_num_steps: int = _help("sampling steps of an evaluation (Flow-GRPO: 40, without noise)", default=40)
    eval_prompts: str | None = _help("comma-separated eval prompts (None: eval_prompt_file, else the training prompts)",
                                     default=None)
    eval_prompt_file: str | None = _help("file of eval prompts, in prompt_file's formats", default=None)
    eval_samples_per_prompt: int = _help("eval samples per prompt, each from its own fixed noise", default=1)
    eval_batch_size: int = _help("eval samples per network call (per process)", default=16)
    eval_guidance_scale: float | None = _help("CFG scale of evaluations (None: guidance_scale)", default=None)

    report_to: str = _help("live metrics for trackers, comma-separated: tensorboard (OUTPUT_DIR/tensorboard) | "
                           "wandb | none", default="none")
    wandb_project: str = _help("W&B project (report_to=wandb)", default="sfgrpo")
    run_name: str | None = _help("run name shown by the trackers (None: theirs)", default=None)

    checkpoint_every: int = _help("save a checkpoint every N iterations (0: only at the end)", default=0)
    keep_checkpoints: int = _help("how many of the newest checkpoints to keep (0: all)", default=0)
    checkpoint_format: str = _help(
        "full: whole tensors written by rank 0 (safetensors) | sharded: every process writes its own shards "
        "(torch.distributed.checkpoint; for big FSDP runs; the directory must be shared by all nodes). Both "
        "resume on any number of processes", default="full")
    resume_from: str | None = _help("checkpoint directory, or 'latest' in output_dir", default=None)
    image_every: int = _help("write sample / intermediate-estimate grids every N iterations (0: only at the end)", default=0)
    plots: bool = _help("write reward and per-step gain plots (needs matplotlib; skipped without it)", default=True)
    progress: bool = _help("tqdm progress bar", default=True)
    # --- distributed (issue 7)
    distributed: str = _help(
        "strategy when launched on several processes (torchrun): ddp (replicated model, gradient all-reduce; "
        "LoRA and small backbones) | fsdp (FSDP2 fully_shard of every transformer block, then the root; full "
        "fine-tuning of large backbones)", default="ddp")
    activation_checkpointing: bool | None = _help(
        "recompute each transformer block in the backward instead of storing activations (None: on with "
        "distributed=fsdp, off otherwise)", default=None)
    distributed_timeout_minutes: float = _help(
        "how long a collective may wait for the slowest process, e.g. while rank 0 alone writes a whole "
        "checkpoint (torch's NCCL default is 10 minutes: too short for a full fine-tune's checkpoint on slow "
        "storage)", default=60.0)

    # --- real backbones and learned rewards (issue 7)
    prompt_file: str | None = _help(
        "file of prompts (replaces --prompts): one per line, a JSON list (.json) or JSON lines (.jsonl); a JSON "
        "entry is a string or an object whose 'prompt' is the text and whose other fields reach the reward "
        "as prompt.metadata (GenEval-style files)", default=None)
    resolution: int = _help("real backbones: image height = width in pixels", default=512)
    model_dtype: str = _help("real backbones: storage dtype float32 | bfloat16 | float16 (trained weights are kept in fp32: "
                             "LoRA adapters, or the transformer in a full fine-tune)",
                             default="float32")
    max_sequence_length: int | None = _help("real backbones: text tokens (None: 256 SD3, 512 FLUX / Qwen-Image)",
                                            default=None)
    embedded_guidance_scale: float = _help("FLUX-dev guidance embedding (not CFG; ignored by other models)",
                                           default=3.5)
    decode_batch_size: int = _help("real backbones: latents per VAE decode call", default=8)
    attention_backend: str = _help("real backbones: sdpa | xformers (needs xformers installed)", default="sdpa")
    prompt_cache_size: int = _help(
        "real backbones: text embeddings kept on the device, least recently used dropped first (0: none beyond "
        "one call); each costs e.g. 4 MB for FLUX.1 (512 T5 tokens, bf16), 8 MB for FLUX.2 [klein] 4B", default=256)
    offload_text_encoders: bool = _help(
        "real backbones: keep the frozen text encoders in CPU memory, moved to the device only to encode prompts "
        "not seen before (embeddings are cached per prompt); saves their memory on the GPU, e.g. ~9.5 GB for "
        "FLUX's T5-XXL, ~16.6 GB for Qwen-Image's Qwen2.5-VL in bf16", default=False)
    schedule_from_checkpoint: bool = _help(
        "real backbones: sample on the checkpoint scheduler's grid (its shift; the resolution-dependent mu of FLUX "
        "and Qwen-Image); "
        "off: SD3 grid with --shift", default=True)

    # ------------------------------------------------------------------ derived
    @property
    def normalize(self) -> str:
        if self.advantage_normalize is not None:
            return self.advantage_normalize
        return "per_step" if self.mode == "stepwise_per_step" else "joint"

    @property
    def is_stepwise(self) -> bool:
        return self.mode != "flow_grpo"

    @property
    def shares_initial_noise(self) -> bool:
        return self.initial_noise == "shared" or (self.initial_noise == "auto" and self.is_stepwise)

    @property
    def prompt_list(self) -> list[str]:  # `Prompt`s (str with .metadata) from a prompt file
        if self.prompt_file:
            from sfgrpo.models.prompts import cached_prompt_file

            return cached_prompt_file(self.prompt_file)
        return [p.strip() for p in self.prompts.split(",") if p.strip()]

    def learning_rate_at(self, iteration: int) -> float:
        """The learning rate of iteration `iteration` (0-based): a pure function of it, so a resumed
        run follows the schedule exactly."""
        if iteration < self.lr_warmup_iterations:
            return self.learning_rate * (iteration + 1) / self.lr_warmup_iterations
        if self.lr_schedule == "constant":
            return self.learning_rate
        end = self.iterations if self.lr_decay_iterations is None else self.lr_decay_iterations
        progress = min(1.0, (iteration - self.lr_warmup_iterations) / max(1, end - self.lr_warmup_iterations))
        return self.lr_min + (self.learning_rate - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def batch_size(self) -> int:
        return self.prompts_per_iteration * self.group_size

    def validate(self) -> "TrainerConfig":
        need = _need
        finite = math.isfinite  # NaN fails every comparison below; inf passes them
        need(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        need(self.advantage_normalize in (None, "joint", "per_step"),
             f"advantage_normalize must be joint or per_step, got {self.advantage_normalize!r}")
        need(not (self.mode == "flow_grpo" and self.advantage_normalize is not None),
             "advantage_normalize applies to the stepwise modes only")
        need(self.flow_grpo_std in ("global", "group"), f"flow_grpo_std must be global or group, got {self.flow_grpo_std!r}")
        need(self.sde_type in SDE_TYPES, f"sde_type must be one of {SDE_TYPES}, got {self.sde_type!r}")
        need(self.logprob in ("gaussian", "flow_grpo"), f"logprob must be gaussian or flow_grpo, got {self.logprob!r}")
        need(self.cfg_gradient in ("cond", "both"), f"cfg_gradient must be cond or both, got {self.cfg_gradient!r}")
        need(self.initial_noise in ("auto", "shared", "independent"),
             f"initial_noise must be auto, shared or independent, got {self.initial_noise!r}")
        need(self.kl in ("exact", "flow_grpo"), f"kl must be exact or flow_grpo, got {self.kl!r}")
        need(self.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        need(self.iterations >= 0, f"iterations must be >= 0, got {self.iterations}")
        need(self.num_steps >= 2, f"num_steps must be >= 2, got {self.num_steps}")
        need(self.lookahead_steps >= 1, f"lookahead_steps must be >= 1, got {self.lookahead_steps}")
        need(self.rollout_batch_size is None or self.rollout_batch_size >= 1,
             f"rollout_batch_size must be >= 1, got {self.rollout_batch_size}")
        need(self.lookahead_batch_size is None or self.lookahead_batch_size >= 1,
             f"lookahead_batch_size must be >= 1, got {self.lookahead_batch_size}")
        need(self.group_size >= 2, f"group_size must be >= 2 (advantages compare trajectories of a group), got {self.group_size}")
        need(self.prompts_per_iteration >= 1, f"prompts_per_iteration must be >= 1, got {self.prompts_per_iteration}")
        need(len(self.prompt_list) >= 1, "prompts is empty")
        need(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        need(self.noise_level > 0 and finite(self.noise_level),
             f"noise_level must be a finite number > 0 (a rollout without noise cannot be trained), got {self.noise_level}")
        need(self.shift > 0 and finite(self.shift), f"shift must be a finite number > 0, got {self.shift}")
        need(self.sde_type != "cps" or self.noise_level <= 1.0,
             f"noise_level must be in (0, 1] for sde_type cps (std = t' sin(a pi / 2)), got {self.noise_level}")
        need(self.threads is None or self.threads >= 1, f"threads must be >= 1 (or None: torch's default), got {self.threads}")
        need(self.advantage_eps is None or (self.advantage_eps >= 0 and finite(self.advantage_eps)),
             f"advantage_eps must be a finite number >= 0, got {self.advantage_eps}")
        need(self.advantage_clip is None or self.advantage_clip > 0,
             f"advantage_clip must be > 0 (None: the mode's default), got {self.advantage_clip}")
        # below 1 diffusers' pipelines switch CFG off (they apply it only above 1), where the formula
        # would interpolate towards the unconditional model: refused rather than silently different
        need(self.guidance_scale >= 1 and finite(self.guidance_scale),
             f"guidance_scale must be a finite number >= 1 (1 = no CFG), got {self.guidance_scale}")
        need(self.learning_rate > 0 and finite(self.learning_rate),
             f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        need(self.weight_decay >= 0 and finite(self.weight_decay),
             f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
             f"adam_beta1 and adam_beta2 must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        need(self.adam_eps >= 0 and finite(self.adam_eps), f"adam_eps must be a finite number >= 0, got {self.adam_eps}")
        need(self.clip_range > 0, f"clip_range must be > 0, got {self.clip_range}")
        need(self.lr_schedule in ("constant", "cosine"), f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        need(self.lr_warmup_iterations >= 0 and 0 <= self.lr_min <= self.learning_rate,
             "lr_warmup_iterations must be >= 0 and lr_min in [0, learning_rate]")
        need(self.lr_schedule != "cosine" or self.lr_decay_iterations is None
             or self.lr_decay_iterations > self.lr_warmup_iterations,
             f"lr_decay_iterations ({self.lr_decay_iterations}) must come after the warm-up "
             f"({self.lr_warmup_iterations} iterations)")
        need(self.lr_decay_iterations is None or self.lr_decay_iterations >= 1,
             f"lr_decay_iterations must be >= 1, got {self.lr_decay_iterations}")
        need(self.beta >= 0 and finite(self.beta), f"beta must be a finite number >= 0, got {self.beta}")
        need(self.num_inner_epochs >= 1, f"num_inner_epochs must be >= 1, got {self.num_inner_epochs}")
        need(0.0 < self.train_step_fraction <= 1.0, f"train_step_fraction must be in (0, 1], got {self.train_step_fraction}")
        need(self.train_batch_size is None or 1 <= self.train_batch_size <= self.batch_size,
             f"train_batch_size must be in 1..{self.batch_size} (the rollout batch), got {self.train_batch_size}")
        need(self.gradient_accumulation_steps is None or self.gradient_accumulation_steps >= 1,
             f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        need(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank}")
        need(self.lora_alpha > 0 and finite(self.lora_alpha),
             f"lora_alpha must be a finite number > 0 (the adapters' scale alpha / rank), got {self.lora_alpha}")
        need(self.checkpoint_every >= 0 and self.image_every >= 0, "checkpoint_every and image_every must be >= 0")
        try:
            from sfgrpo.trainer.reporting import parse_report_to

            parse_report_to(self.report_to)
        except ValueError as err:
            need(False, str(err))
        need(self.keep_checkpoints >= 0, f"keep_checkpoints must be >= 0, got {self.keep_checkpoints}")
        need(self.distributed_timeout_minutes > 0 and finite(self.distributed_timeout_minutes),
             f"distributed_timeout_minutes must be a finite number > 0, got {self.distributed_timeout_minutes}")
        need(self.checkpoint_format in ("full", "sharded"),
             f"checkpoint_format must be full or sharded, got {self.checkpoint_format!r}")
        need(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        need(self.eval_prompt_file is None or Path(self.eval_prompt_file).is_file(),
             f"eval_prompt_file {self.eval_prompt_file!r} not found")
        need(self.eval_num_steps >= 1 and self.eval_samples_per_prompt >= 1 and self.eval_batch_size >= 1,
             "eval_num_steps, eval_samples_per_prompt and eval_batch_size must be >= 1")
        if self.eval_every or self.eval_prompts is not None or self.eval_prompt_file is not None:
            from sfgrpo.trainer.evaluation import eval_prompts

            need(len(eval_prompts(self)) >= 1, "the eval prompts are empty (eval_prompts / eval_prompt_file)")
        need(self.eval_guidance_scale is None or (self.eval_guidance_scale >= 1 and finite(self.eval_guidance_scale)),
             f"eval_guidance_scale must be a finite number >= 1 (1 = no CFG), got {self.eval_guidance_scale}")
        need(self.distributed in ("ddp", "fsdp"), f"distributed must be ddp or fsdp, got {self.distributed!r}")
        need(not (self.distributed == "fsdp" and self.mixed_precision == "fp16"),
             "mixed_precision=fp16 is not supported with distributed=fsdp (sharded gradients); use bf16")
        need(self.prompt_file is None or Path(self.prompt_file).is_file(), f"prompt_file {self.prompt_file!r} not found")
        need(self.model_dtype in ("float32", "bfloat16", "float16"),
             f"model_dtype must be float32, bfloat16 or float16, got {self.model_dtype!r}")
        need(self.attention_backend in ("sdpa", "xformers"),
             f"attention_backend must be sdpa or xformers, got {self.attention_backend!r}")
        need(self.decode_batch_size >= 1 and self.resolution >= 8, "decode_batch_size must be >= 1, resolution >= 8")
        need(self.prompt_cache_size >= 0, f"prompt_cache_size must be >= 0, got {self.prompt_cache_size}")
        need(self.max_sequence_length is None or self.max_sequence_length >= 1,
             f"max_sequence_length must be >= 1 (None: the model's default), got {self.max_sequence_length}")
        need(finite(self.embedded_guidance_scale),
             f"embedded_guidance_scale must be a finite number, got {self.embedded_guidance_scale}")
        self._check_schedule()
        self._torch_device()
        return self

    def _check_schedule(self) -> None:
        """Some step must have a density to train (ddim's and cps's steps at the grid's ends have none:
        with 2 steps and the last one not trained, nothing is left), and every step's std must fit the
        sampler (ddim's a t' sqrt(1 - t) at most t'). Checked on SD3's grid of this num_steps and shift
        before any backbone loads; every grid starts at t = 1 and ends at 0, where those steps lie (the
        trainer checks its actual grid again)."""
        from sfgrpo.schedules import Schedule
        from sfgrpo.trainer.rollout import StepTable

        try:
            StepTable.build(Schedule.sd3(self.num_steps, self.shift).sigmas, self.sde_type, self.noise_level,
                            self.train_last_step)
        except ValueError as err:
            hint = ""
            if str(err).startswith("no trainable step"):
                hint = (f" ({self.num_steps} steps{', the last not trained' if not self.train_last_step else ''}; more "
                        f"steps have noisy steps in between)")
            _need(False, f"{err}{hint}")

    def _torch_device(self):
        import torch

        try:
            return torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            _need(False, f"device {self.device!r} is not a torch device ({err})")

    def check_device(self) -> "TrainerConfig":
        """The config's device is usable on this machine (validate() checks the config alone, so that
        a GPU recipe validates anywhere): a clear error for 'cuda' without a GPU, whose torch error is
        an assertion deep inside the first allocation. The trainer and the CLI call it."""
        import torch

        device = self._torch_device()
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            _need(count > 0, f"device {self.device!r}: torch {torch.__version__} sees no CUDA GPU")
            _need(device.index is None or device.index < count,
                 f"device {self.device!r}: torch sees {count} CUDA GPU(s)")
        return self

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"bad trainer config: unknown field(s) {unknown}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "TrainerConfig":
        """JSON (`.json`) or YAML (`.yaml`/`.yml`, needs PyYAML); `overrides` win over the file."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as err:
                raise ImportError(f"{path} is YAML: install PyYAML, or use a JSON config") from err
            values = yaml.safe_load(text) or {}
        else:
            try:
                values = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"bad trainer config: {path} is not valid JSON ({err})") from err
        if not isinstance(values, dict):
            raise ValueError(f"bad trainer config: {path} must hold a mapping of field names to values")
        return cls.from_dict({**values, **overrides})
