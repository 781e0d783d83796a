"""`Trainer`: Stepwise-Flow-GRPO and Flow-GRPO in one code path.

The whole iteration is `train_iteration`: rollout -> clean estimates -> decode + rewards ->
advantages -> PPO update. The two modes differ in exactly two places: which latents are scored
(every state's clean estimate plus the final image, or the final image only) and which advantage
function turns the rewards into per-step credit. Everything numerical is `sfgrpo.functional`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from sfgrpo import distributed, functional
from sfgrpo.rewards import get_reward
from sfgrpo.models.pipelines import sampling_sigmas
from sfgrpo.models.fused_lora import fuse_lora
from sfgrpo.models.fused_norms import fuse_norms
from sfgrpo.models.protocol import check_backbone
from sfgrpo.trainer import checkpoint as ckpt
from sfgrpo.trainer.config import TrainerConfig
from sfgrpo.trainer.reporting import Reporters, parse_report_to
from sfgrpo.trainer.rollout import (GuidedModel, Rollout, StepTable, clean_estimates, most_groups_per_process,
                                    pack_columns, rollout, select_rows, unpack_index)

TIME_KEYS = ("rollout", "lookahead", "decode", "reward", "update")


class PhaseTimer:
    """Wall time per phase; synchronises CUDA at phase boundaries only (never inside the update)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class Trainer:
    """Fine-tunes `model` (default: `config.backbone`) on `reward` (default: `config.reward`)."""

    def __init__(self, config: TrainerConfig, model=None, reward=None):
        self.config = cfg = config.validate().check_device()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # rank / world size: joins torchrun's process group when launched by torchrun (no-op when the
        # caller already initialised one); a world of 1 otherwise
        self.dist = distributed.init_from_env(cfg.device, cfg.distributed_timeout_minutes)
        self.device = distributed.local_device(cfg.device, self.dist)
        self._check_distributed_batch()
        if model is None:
            from sfgrpo.models.digits import load_backbone

            model = load_backbone(cfg.backbone, cfg.seed, cfg)
        check_backbone(model)  # a user's model=: every missing member named now, not mid-iteration
        scales = {cfg.guidance_scale, cfg.guidance_scale if cfg.eval_guidance_scale is None else cfg.eval_guidance_scale}
        if scales != {1.0} and getattr(model, "cfg_distilled", False):
            raise ValueError(f"bad trainer config: {type(model).__name__} is a guidance-distilled checkpoint (its "
                             f"pipeline samples without CFG); use guidance_scale and eval_guidance_scale 1, not "
                             f"{sorted(scales)}")
        self.model = model.to(self.device).requires_grad_(False)
        if cfg.fused_norms:  # before the reference copy, LoRA, DDP/FSDP and torch.compile see the modules
            fuse_norms(self.model)
        self.reward = get_reward(reward if reward is not None else cfg.reward)
        try:  # the config check tried SD3's grid; this is the backbone's own
            self.steps = StepTable.build(sampling_sigmas(self.model, cfg), cfg.sde_type, cfg.noise_level,
                                         cfg.train_last_step)
        except ValueError as err:
            raise ValueError(f"bad trainer config: {err} (on {type(self.model).__name__}'s sampling grid)") from None
        # `[T]` bool mask of the trained steps, on the device once (indexing a CUDA tensor with a
        # Python list in every iteration would copy the indices and synchronise)
        mask = torch.zeros(self.steps.num_steps, dtype=torch.bool)
        mask[self.steps.trained] = True
        self.trained_mask = mask.to(self.device)
        self.reference_transformer = None
        if cfg.beta > 0 and not cfg.use_lora:  # the KL's reference policy: a frozen copy of the backbone
            self.reference_transformer = copy.deepcopy(self.model.transformer).requires_grad_(False)
        self.trainable = self._make_trainable()
        self._wrap_for_distributed()
        if cfg.compile_backbone:
            self._compile_backbone()
        self.optimizer = torch.optim.AdamW(
            list(self.trainable.values()), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps, weight_decay=cfg.weight_decay, **self._adamw_kernel(),
        )
        self.ema = {n: p.detach().clone() for n, p in self.trainable.items()} if cfg.ema_decay > 0 else None
        autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        self.guided = GuidedModel(self.model, cfg.guidance_scale, autocast)
        # the update takes the unconditional velocity as a constant: keep the rollout's (CFG only)
        self.keep_rollout_uncond = cfg.cfg_gradient == "cond" and cfg.guidance_scale != 1.0
        # fp16: dynamic loss scaling; sync-free with the fused AdamW (it takes the scaler's inf flag
        # on the device). A disabled scaler passes losses and steps through unchanged.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.mixed_precision == "fp16")
        # rollout noise is stateless (distributed.TrajectoryNoise: a function of seed, iteration and
        # global trajectory index), so it needs no generator here and no state in checkpoints.
        # minibatch order: trajectory permutations (torch, CPU) and the order of (step, chunk)
        # forwards (Python, host-side, so shuffling never touches the device)
        self.update_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.order_random = random.Random(cfg.seed + 2)
        self.iteration = 0
        self.loss_scale = 1.0  # this rank's share of the global batch, see distributed.loss_scale
        self.history: list[dict] = []
        self.eval_history: list[dict] = []  # one record per evaluation (trainer/evaluation.py)
        self.reporters = Reporters([], Path(cfg.output_dir), {}, cfg.wandb_project, cfg.run_name)  # set by train()
        self.last_images: Tensor | None = None  # [K, N, C, H, W] decoded images of the last iteration
        self.last_prompts: list = []
        self.output_dir = Path(cfg.output_dir)
        self.monitor = self._class_accuracy_monitor()
        if cfg.resume_from and not self._fresh_start(cfg.resume_from):
            self.load_checkpoint(cfg.resume_from)

    # ================================================================== one iteration
    def train_iteration(self) -> dict:
        cfg, timer = self.config, PhaseTimer(self.device)
        for group in self.optimizer.param_groups:  # the schedule is a function of the iteration
            group["lr"] = cfg.learning_rate_at(self.iteration)
        prompts = self.prompts_for(self.iteration)  # the global batch's prompts, the same on every rank
        rows = distributed.shard_rows(cfg.batch_size, self.dist.rank, self.dist.world_size)  # this rank's share
        self.loss_scale = distributed.loss_scale(len(rows), cfg.batch_size, self.dist.world_size)
        with timer("rollout"):
            batch = rollout(self.guided, prompts, cfg.group_size, self.steps, sde_type=cfg.sde_type,
                            logprob=cfg.logprob, noise=distributed.TrajectoryNoise(cfg.seed, self.iteration, self.device),
                            rows=rows, batch_size=cfg.rollout_batch_size, keep_uncond=self.keep_rollout_uncond,
                            shared_initial_noise=cfg.shares_initial_noise)
        with timer("lookahead"):
            latents = self.scored_latents(batch)  # [K, N, ...]
        scored, prompts_scored, spread = self.unique_scored_latents(latents, batch)
        with timer("decode"):
            images = self.model.decode(scored)
        with timer("reward"):
            scores = self.reward(images, prompts_scored)
        if spread is not None:  # each group's initial estimate back to all of its rows
            scores, images = scores[spread], images[spread]
        rewards = scores.reshape(latents.shape[0], -1).T  # [N, K]
        advantages = self.advantages(rewards, batch.group_ids)  # [N, T] (this rank's rows; global statistics)
        with timer("update"):
            update_stats = self.update(batch, advantages)
        self.iteration += 1
        self.last_images, self.last_prompts = images.reshape(*latents.shape[:2], *images.shape[1:]), batch.prompts
        return self._record(rewards, advantages, update_stats, timer.seconds)

    def scored_latents(self, batch: Rollout) -> Tensor:
        """Stepwise: the clean estimate after k steps for k = 0..T-1, then the final latents (T+1
        columns). Flow-GRPO: the final latents only."""
        if not self.config.is_stepwise:
            return batch.final[None]
        cfg, world = self.config, self.dist.world_size
        # every process the same number of look-ahead rows, hence of (sharded) network calls
        initial_rows = most_groups_per_process(cfg.batch_size, cfg.group_size, world) if world > 1 else None
        estimates = clean_estimates(self.guided, batch, self.steps, cfg.lookahead_steps, cfg.lookahead_batch_size,
                                    initial_rows=initial_rows)
        return torch.cat([estimates, batch.final[None].float()])

    def unique_scored_latents(self, latents: Tensor, batch: Rollout):
        """What to decode and score: `latents` `[K, N, ...]` flattened, with the stepwise column 0
        (the estimate from the initial noise, one per group) once per group; `spread` maps the
        results back to the `K x N` rows (None when nothing is shared)."""
        starts = batch.group_starts() if latents.shape[0] > 1 else None
        if starts is None:
            return latents.flatten(0, 1), batch.prompts * latents.shape[0], None
        prompts = [batch.prompts[i] for i in starts.rows] + batch.prompts * (latents.shape[0] - 1)
        return (pack_columns(latents, starts.firsts), prompts,
                unpack_index(starts, len(starts.rows), latents.shape[0]))

    def advantages(self, rewards: Tensor, group_ids: Tensor) -> Tensor:
        """`[N, T]` per-step credit; zero on steps that are not trained."""
        cfg = self.config
        trained = self.trained_mask
        # the reward function already rejected NaN/inf scores with a clear error, so the engine's
        # own check (one device->host sync on CUDA) is not needed here
        if cfg.is_stepwise:
            return functional.gain_advantages(
                rewards, group_ids, normalize=cfg.normalize, clip=cfg.advantage_clip, step_mask=trained,
                eps=1e-8 if cfg.advantage_eps is None else cfg.advantage_eps, gather=self.dist.enabled,
                nonfinite="drop",
            )
        per_trajectory = functional.group_advantages(
            rewards[:, -1], group_ids, std=cfg.flow_grpo_std, clip=5.0 if cfg.advantage_clip is None else cfg.advantage_clip,
            eps=1e-4 if cfg.advantage_eps is None else cfg.advantage_eps, gather=self.dist.enabled,
            nonfinite="drop",
        )
        return per_trajectory[:, None] * trained[None, :].to(per_trajectory.dtype)

    def update(self, batch: Rollout, advantages: Tensor) -> tuple[Tensor, Tensor]:
        """PPO over every trained (step, trajectory chunk). Returns, without any host sync, the
        per-forward stats `[M, 5]` (loss, mean ratio, clip fraction, approx KL to the old policy, KL
        to the reference) and the grad norm of each optimizer step."""
        cfg, n = self.config, advantages.shape[0]
        records, grad_norms = [], []
        # until the first optimizer step the weights are the rollout's, and so is the unconditional
        # velocity that Flow-GRPO's update recomputes as a constant: take the stored one instead
        rollout_weights = True
        for _ in range(cfg.num_inner_epochs):
            # under data parallelism train_batch_size is global: each rank takes its share of a minibatch
            chunk = None if cfg.train_batch_size is None else cfg.train_batch_size // self.dist.world_size
            if chunk is None or chunk >= n:
                row_chunks = [slice(None)]  # the rollout's own batch: exact on-policy log-probs
            else:
                permutation = torch.randperm(n, generator=self.update_generator)  # CPU generator: same on every device
                if advantages.device.type == "cuda":  # pinned + non_blocking: the copy does not synchronise
                    permutation = permutation.pin_memory().to(advantages.device, non_blocking=True)
                row_chunks = list(permutation.split(chunk))
            work = [(k, rows) for k in self._pass_steps() for rows in row_chunks]
            order = list(range(len(work)))
            self.order_random.shuffle(order)
            accumulation = cfg.gradient_accumulation_steps or len(work)
            for position, index in enumerate(order):
                window_ends = (position + 1) % accumulation == 0 or position + 1 == len(order)
                # DDP all-reduces only on a window's last backward; loss_scale makes the reduced
                # gradient that of the global batch's mean (1.0 on one process)
                with distributed.gradient_sync(self.model.transformer, window_ends):
                    loss, record = self.step_loss(batch, advantages, *work[index], rollout_weights=rollout_weights)
                    self.scaler.scale(loss * self.loss_scale / accumulation).backward()
                records.append(record)
                if window_ends:
                    grad_norms.append(self.optimizer_step())
                    rollout_weights = False
        return torch.stack(records), torch.stack(grad_norms)

    def _pass_steps(self) -> list[int]:
        """The steps one pass over the batch trains: all trained steps, or a random subset of
        floor(train_step_fraction x their number) (at least one), drawn from the checkpointed order
        stream, so every rank draws the same steps and a resumed run the same as an uninterrupted one."""
        steps = list(self.steps.trained)
        if self.config.train_step_fraction >= 1.0:
            return steps
        keep = max(1, int(self.config.train_step_fraction * len(steps)))
        return sorted(self.order_random.sample(steps, keep))

    def step_loss(self, batch: Rollout, advantages: Tensor, k: int, rows,
                  rollout_weights: bool = False) -> tuple[Tensor, Tensor]:
        """PPO loss of step k on some trajectories: re-score the stored samples with the current
        weights (and, when beta > 0, the reference weights for the KL). `rollout_weights`: the
        weights are still those of the rollout, whose stored unconditional velocities are then
        reused (`cfg_gradient="cond"`)."""
        cfg, steps = self.config, self.steps
        x, stored = batch.states[k][rows], batch.samples[k][rows]
        cond, null_cond = select_rows(batch.cond, rows), select_rows(batch.null_cond, rows)
        t_row = torch.full((x.shape[0],), steps.t[k], device=x.device)
        if cfg.cfg_gradient == "cond":
            kept = batch.uncond_velocities
            v_uncond = kept[k][rows] if rollout_weights and kept is not None else None
            v = self.guided.with_constant_uncond(x, t_row, cond, null_cond, v_uncond=v_uncond)
        else:
            v = self.guided(x, t_row, cond, null_cond)
        v_ref = None
        if cfg.beta > 0:
            with torch.no_grad(), self.reference_weights():
                v_ref = self.guided(x, t_row, cond, null_cond)
        scored = functional.sde_step(
            x, v, steps.t[k], steps.t_next[k], steps.noise_level[k], sde_type=cfg.sde_type, prev_sample=stored,
            logprob=cfg.logprob, v_ref=v_ref, kl=cfg.kl, sigma_max=steps.sigma_max,
        )
        old_log_prob = batch.log_probs[k][rows]
        loss = functional.ppo_loss(scored.log_prob, old_log_prob, advantages[:, k][rows], cfg.clip_range,
                                   kl=scored.kl, beta=cfg.beta)
        with torch.no_grad():
            log_ratio = scored.log_prob - old_log_prob
            ratio = log_ratio.exp()
            kl_ref = scored.kl.mean() if scored.kl is not None else torch.zeros((), device=x.device)
            record = torch.stack([
                loss.detach(), ratio.mean(), ((ratio - 1.0).abs() > cfg.clip_range).float().mean(),
                0.5 * log_ratio.square().mean(), kl_ref,
            ])
        return loss, record

    def optimizer_step(self) -> Tensor:
        params = list(self.trainable.values())
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        self.scaler.unscale_(self.optimizer)  # the clip sees true gradients (no-op without fp16)
        grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
        self.scaler.step(self.optimizer)  # skipped by the optimizer itself on inf/NaN gradients
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            torch._foreach_lerp_(list(self.ema.values()), [p.detach() for p in params], 1.0 - self.config.ema_decay)
        return grad_norm.detach()

    # ================================================================== training loop
    def train(self) -> list[dict]:
        """Runs up to `config.iterations`, logging metrics.jsonl (and to the trackers of
        `report_to`), checkpoints, images and plots."""
        cfg, main = self.config, self.dist.is_main  # only rank 0 writes files; every rank computes
        metrics_path = self.output_dir / "metrics.jsonl"
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.output_dir / "config.json")
            self._rewrite_metrics(metrics_path)
            self.reporters = Reporters(parse_report_to(cfg.report_to), self.output_dir, cfg.to_dict(),
                                       cfg.wandb_project, cfg.run_name)
        try:
            return self._train_loop(metrics_path)
        finally:
            self.reporters.close()

    def _train_loop(self, metrics_path: Path) -> list[dict]:
        from sfgrpo.trainer import artifacts

        cfg, main = self.config, self.dist.is_main
        if cfg.eval_every and self.iteration == 0 and not self.eval_history:
            self.evaluate()  # the starting point of the eval curve
        first_iteration = self.iteration
        bar = _progress(range(self.iteration, cfg.iterations), cfg.progress and main, initial=self.iteration,
                        total=cfg.iterations)
        for _ in bar:
            record = self.train_iteration()
            if main:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                self.reporters.log(record, "train")
            self._check_update_finite(record)  # before anything is evaluated or saved from its weights
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(reward=f"{record['reward_mean']:.4f}", refresh=False)
            if cfg.eval_every and (self.iteration % cfg.eval_every == 0 or self.iteration == cfg.iterations):
                self.evaluate()  # before the checkpoint, which then holds it
            if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if cfg.image_every and self.iteration % cfg.image_every == 0:
                self._write_grids()
        if self.iteration > first_iteration:  # the last iteration's checkpoint and grids, unless just written
            if not (cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0):
                self.save_checkpoint()
            if not (cfg.image_every and self.iteration % cfg.image_every == 0):
                self._write_grids()
        if cfg.plots and main:
            artifacts.write_plots(self.history, self.output_dir, self.eval_history)
        distributed.barrier()
        return self.history

    def _check_update_finite(self, record: dict) -> None:
        """Stops the run at the iteration whose update went non-finite (a NaN/inf loss or gradient
        norm). Without loss scaling the optimizer has applied it: the next rollout would only fail in
        the reward (NaN images), and a checkpoint would keep the weights. With fp16 the scaler skips
        such steps itself (an inf gradient norm is then its normal skipped step). The record's
        numbers are already on the host: no sync."""
        if self.scaler.is_enabled():
            return
        bad = {key: record[key] for key in ("loss", "grad_norm") if not math.isfinite(record[key])}
        if bad:
            raise FloatingPointError(
                f"training diverged at iteration {record['iteration']}: {bad}; the optimizer applied a non-finite "
                f"update, so the run stops before saving or evaluating those weights. Resume from the last checkpoint "
                f"(resume_from='latest') with a lower learning_rate or clip_range")

    def evaluate(self) -> dict:
        """Scores ODE samples of the eval prompts (trainer/evaluation.py) with the current (EMA)
        weights; appends the record to eval.jsonl and writes images/eval-iterNNNNNN.png (rank 0)."""
        from sfgrpo.trainer import artifacts
        from sfgrpo.trainer.evaluation import evaluate

        record, images = evaluate(self)
        self.eval_history.append(record)
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with (self.output_dir / "eval.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            self.reporters.log(record, "eval")
            if images is not None:
                grid = artifacts.image_grid(artifacts.rows_of(images))
                artifacts.save_png(grid, self.output_dir / "images" / f"eval-iter{self.iteration:06d}.png")
                self.reporters.log_image("eval/samples", grid, self.iteration)
        return record

    def _write_grids(self) -> None:
        """Sample grids of the whole global batch (gathered; a collective), written by rank 0."""
        from sfgrpo.trainer import artifacts

        final = distributed.gather_rows(self.last_images[-1]) if self.last_images is not None else None
        if self.dist.is_main:
            for name, grid in artifacts.write_grids(self, self.output_dir / "images", final=final).items():
                self.reporters.log_image(f"train/{name}", grid, self.iteration)

    def prompts_for(self, iteration: int) -> list[str]:
        """The prompts of an iteration: a seeded permutation per iteration (the data position is the
        iteration), so a resumed run sees exactly the prompts the uninterrupted run saw."""
        pool, count = self.config.prompt_list, self.config.prompts_per_iteration
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + iteration)
        chosen: list[str] = []
        while len(chosen) < count:
            chosen += [pool[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
        return chosen[:count]

    # ================================================================== logging
    def _record(self, rewards: Tensor, advantages: Tensor, update_stats, seconds: dict) -> dict:
        records, grad_norms = update_stats
        # metrics of the global batch: per-row values are gathered, per-forward means weighted by
        # this rank's share, so every rank logs the same record (rank 0 writes it)
        local_images, local_prompts = self.last_images[-1], self.last_prompts
        rewards, advantages = distributed.gather_rows(rewards), distributed.gather_rows(advantages)
        records = distributed.weighted_mean_over_ranks(records, self.loss_scale / self.dist.world_size)
        seconds = dict(zip(seconds, distributed.max_over_ranks(list(seconds.values()))))
        final = rewards[:, -1]
        values = {
            "reward_mean": final.mean(), "reward_std": final.std(unbiased=False),
            "advantage_abs_mean": advantages.abs().mean(),
        }
        update = records.mean(dim=0)
        for i, key in enumerate(("loss", "ratio_mean", "clip_fraction", "approx_kl", "kl")):
            values[key] = update[i]
        values["grad_norm"] = grad_norms.mean()
        if self.monitor is not None:
            values["class_accuracy"] = distributed.gather_rows(self.monitor(local_images, local_prompts)).mean()
        record = {"iteration": self.iteration, "samples": self.iteration * rewards.shape[0]}
        record.update({k: float(v) for k, v in zip(values, torch.stack(list(values.values())).tolist())})
        if rewards.shape[1] > 1:  # stepwise: reward of the estimate after k steps, and |gain| of each step
            record["reward_by_step"] = rewards.mean(dim=0).tolist()
            record["gain_abs_by_step"] = (rewards[:, 1:] - rewards[:, :-1]).abs().mean(dim=0).tolist()
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record.update({f"time/{k}": seconds.get(k, 0.0) for k in TIME_KEYS})
        record["time/iteration"] = sum(seconds.values())
        self.history.append(record)
        return record

    def _rewrite_metrics(self, path: Path) -> None:
        """Keeps the metrics (and evaluations) of iterations already done (a resumed run drops rows
        past its checkpoint)."""
        path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        evals = path.with_name("eval.jsonl")
        if self.eval_history or evals.exists():
            evals.write_text("".join(json.dumps(r) + "\n" for r in self.eval_history))

    def _class_accuracy_monitor(self):
        from sfgrpo.models.digits import DigitsBackbone

        if not isinstance(self.model, DigitsBackbone):
            return None
        try:
            from sfgrpo.models.digit_classifier import DigitClassifier

            DigitClassifier.load()
        except FileNotFoundError:
            return None
        from sfgrpo.rewards.builtin import digit_accuracy

        return digit_accuracy

    # ================================================================== weights
    def _make_trainable(self) -> dict[str, torch.nn.Parameter]:
        cfg, transformer = self.config, self.model.transformer
        if cfg.use_lora:
            try:
                from peft import LoraConfig
            except ImportError as err:
                raise ImportError("use_lora needs peft: pip install 'sfgrpo[train]' (or pip install peft)") from err
            targets = self.lora_targets()
            with torch.random.fork_rng(devices=[]):  # seeded adapters: every rank starts from the same ones
                torch.manual_seed(cfg.seed)
                transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets,
                                                   init_lora_weights="gaussian"))
            if cfg.fused_lora:
                fuse_lora(transformer)
            params = {f"transformer.{n}": p for n, p in transformer.named_parameters() if "lora_" in n}
            for p in params.values():  # adapters train in fp32 even on a bf16/fp16 base (peft casts inputs)
                p.data = p.data.float()
                p.requires_grad_(True)
        else:
            transformer.requires_grad_(True)
            params = {f"transformer.{n}": p for n, p in transformer.named_parameters()}
            for p in params.values():
                # fp32 master weights: in bf16/fp16 AdamW's updates (lr x ~1 against weights of ~1)
                # fall below the storage's resolution and are rounded away; the compute precision
                # is mixed_precision's (autocast, or FSDP's parameter dtype)
                if p.dtype in (torch.bfloat16, torch.float16):
                    p.data = p.data.float()
        # parameters the velocity never reads (Qwen-Image's last block computes a text-stream output
        # the model drops) stay frozen: they would never get a gradient, and DDP waits for one
        dead = tuple(f"transformer.{prefix}" for prefix in getattr(self.model, "unused_parameter_prefixes", ()))
        if dead:
            for name in [n for n in params if n.startswith(dead)]:
                params.pop(name).requires_grad_(False)
        if not params:
            raise ValueError(f"nothing to train: no LoRA adapters matched {self.lora_targets()}")
        return params

    def lora_targets(self) -> list[str]:
        """`lora_target_modules`, or the backbone's `default_lora_targets` when it is None (both
        streams' attention projections for the diffusers families), or the attention of the image
        stream (`to_q,to_k,to_v,to_out.0`) for backbones without a default."""
        spec = self.config.lora_target_modules
        if spec is None:
            return list(getattr(self.model, "default_lora_targets", ("to_q", "to_k", "to_v", "to_out.0")))
        return [m.strip() for m in spec.split(",") if m.strip()]

    # ================================================================== data parallelism
    def _check_distributed_batch(self) -> None:
        cfg, world = self.config, self.dist.world_size
        if not self.dist.enabled:
            return
        if cfg.batch_size < world:
            raise ValueError(f"bad trainer config: {cfg.batch_size} trajectories per iteration cannot be split "
                             f"over {world} processes")
        # FSDP's forwards are collectives (parameter all-gathers): every rank must run as many of
        # them, hence equal shares. So must minibatches (the same number of backwards per rank).
        equal = cfg.batch_size % world == 0
        if not equal and (cfg.distributed == "fsdp" or cfg.train_batch_size is not None):
            raise ValueError(f"bad trainer config: {cfg.batch_size} trajectories per iteration must be a multiple "
                             f"of the {world} processes with distributed=fsdp or a train_batch_size")
        if cfg.train_batch_size is not None and cfg.train_batch_size % world:
            raise ValueError(f"bad trainer config: train_batch_size ({cfg.train_batch_size}, global) must be a "
                             f"multiple of the {world} processes")

    def _wrap_for_distributed(self) -> None:
        """DDP (replicas, gradient all-reduce) or FSDP2 (sharded blocks, then the root) around the
        transformer; activation checkpointing first. The trained parameters are looked up again
        afterwards: FSDP2 replaces them with sharded ones (DDP keeps them)."""
        cfg = self.config
        checkpointing = cfg.activation_checkpointing
        if checkpointing is None:
            checkpointing = self.dist.enabled and cfg.distributed == "fsdp"
        if checkpointing:
            distributed.enable_activation_checkpointing(self.model.transformer)
        if not self.dist.enabled:
            return
        if cfg.distributed == "ddp":
            self.model.transformer = distributed.wrap_ddp(self.model.transformer, self.device)
            return
        # bf16 mixed precision: all-gathers and compute in bf16, fp32 shards and gradient reduction
        compute_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
        distributed.shard_fsdp(self.model.transformer, self.device, compute_dtype)
        if self.reference_transformer is not None:  # the KL's frozen copy is sharded too
            distributed.shard_fsdp(self.reference_transformer, self.device, compute_dtype)
        names = set(self.trainable)
        self.trainable = {f"transformer.{n}": p for n, p in self.model.transformer.named_parameters()
                          if f"transformer.{n}" in names}

    def _compile_backbone(self) -> None:
        """torch.compile of the transformer's forward (not of the module: the module's hooks, e.g.
        the benchmarks' backbone clock, stay outside the graph). After adapters and data-parallel
        wrapping, so the compiled graph is the one that trains; the frozen KL copy is compiled too."""
        for module in (self.model.transformer, self.reference_transformer):
            if module is not None:
                inner = distributed.unwrap(module)  # DDP's wrapped module
                inner.forward = torch.compile(inner.forward)

    def _adamw_kernel(self) -> dict:
        """The fused AdamW kernel (one pass over all parameters) wherever torch has one: on CPU it
        is ~5x faster than the default per-tensor loop (0.6 vs 3.1 ms per step for the built-in
        585k-parameter backbone), 1-2% of an iteration. FSDP2's sharded DTensor parameters take the
        multi-tensor path, which DTensor supports everywhere."""
        params = list(self.trainable.values())
        fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        if self._sharded or not fusable:
            return {"foreach": True} if self._sharded else {}
        return {"fused": True}

    @property
    def _sharded(self) -> bool:
        return self.dist.enabled and self.config.distributed == "fsdp"

    def _fresh_start(self, spec: str) -> bool:
        """`resume_from='latest'` before any checkpoint exists starts from scratch, so the first launch
        and every elastic restart (torchrun --max-restarts) can share one command line."""
        if spec == ckpt.LATEST and not (self.output_dir / "checkpoints" / ckpt.LATEST).exists():
            if self.dist.is_main:
                warnings.warn(f"resume_from='latest': no checkpoint in {self.output_dir / 'checkpoints'} yet, "
                              "starting from scratch", stacklevel=3)
            return True
        return False

    @contextlib.contextmanager
    def reference_weights(self):
        """The reference policy of the KL term: LoRA disabled, or the frozen copy of the backbone."""
        if self.config.use_lora:
            transformer = distributed.unwrap(self.model.transformer)
            transformer.disable_adapters()
            try:
                yield
            finally:
                transformer.enable_adapters()
        else:
            trained, self.model.transformer = self.model.transformer, self.reference_transformer
            try:
                yield
            finally:
                self.model.transformer = trained

    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily swaps the EMA weights in (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        saved = {n: p.detach().clone() for n, p in self.trainable.items()}
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.trainable.items():
                    p.copy_(saved[n])

    # ================================================================== checkpoints
    def save_checkpoint(self) -> Path | None:
        """Every rank calls (trainer/run_state.py: what is saved, in which format)."""
        from sfgrpo.trainer import run_state

        return run_state.save(self)

    def load_checkpoint(self, spec: str) -> None:
        """Continues from checkpoint `spec` (a directory, or 'latest' in output_dir)."""
        from sfgrpo.trainer import run_state

        run_state.load(self, spec)


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)
