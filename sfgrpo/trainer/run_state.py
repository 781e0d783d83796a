"""A trainer's state in checkpoints: what is saved, and how a run continues from it exactly.

Two formats (`checkpoint_format`; files and atomicity in trainer/checkpoint.py):
- full: rank 0 writes whole tensors (under FSDP gathered collectively, one tensor at a time).
  Replicated state (DDP weights, optimizer, generators) is identical on every rank and rollout
  noise is stateless, so rank 0's copy is everything any rank needs to resume;
- sharded: every rank writes its own shards (torch.distributed.checkpoint), which any number of
  processes can load.
Either way the non-tensor state (iteration, random streams, histories, loss scale) is rank 0's
state.pt.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from sfgrpo import distributed
from sfgrpo.trainer import checkpoint as ckpt

# settings a resumed run may change without breaking reproducibility
RESUMABLE_CHANGES = {"iterations", "resume_from", "output_dir", "progress", "plots", "threads", "checkpoint_every",
                     "image_every", "device", "activation_checkpointing", "eval_every", "eval_num_steps",
                     "eval_prompts", "eval_prompt_file", "eval_samples_per_prompt", "eval_batch_size",
                     "eval_guidance_scale", "checkpoint_format", "report_to", "wandb_project", "run_name",
                     "keep_checkpoints", "distributed_timeout_minutes"}


def save(trainer) -> Path | None:
    """Every rank calls; returns the checkpoint directory on rank 0. Keeps the newest
    `keep_checkpoints` (0: all)."""
    path = _save(trainer)
    if trainer.dist.is_main:
        ckpt.prune_checkpoints(trainer.output_dir / "checkpoints", trainer.config.keep_checkpoints)
    return path


def _save(trainer) -> Path | None:
    main, root = trainer.dist.is_main, trainer.output_dir / "checkpoints"
    if trainer.config.checkpoint_format == ckpt.SHARDED:
        return ckpt.save_sharded_checkpoint(root, trainer.iteration, tensors=_sharded_tensors(trainer),
                                            state=resume_state(trainer) if main else None, is_main=main,
                                            barrier=distributed.barrier)
    weights = distributed.gather_to_host(trainer.trainable, keep=main)
    ema = None if trainer.ema is None else distributed.gather_to_host(trainer.ema, keep=main)
    optimizer_state = _full_optimizer_state(trainer)
    if not main:
        distributed.barrier()
        return None
    path = ckpt.save_checkpoint(root, trainer.iteration, weights=weights, ema=ema, optimizer_state=optimizer_state,
                                state=resume_state(trainer))
    distributed.barrier()  # no rank runs ahead of a checkpoint it might have to resume from
    return path


def resume_state(trainer) -> dict:
    """Everything besides tensors that a resumed run needs to continue exactly."""
    return {
        "iteration": trainer.iteration,
        "data_position": trainer.iteration,
        "update_generator": trainer.update_generator.get_state(),
        "order_random": trainer.order_random.getstate(),
        "torch_rng": torch.get_rng_state(),
        "config": trainer.config.to_dict(),
        "history": trainer.history,
        "eval_history": trainer.eval_history,
        "grad_scaler": trainer.scaler.state_dict(),
    }


def load(trainer, spec: str) -> None:
    path = ckpt.resolve_checkpoint(spec, trainer.output_dir / "checkpoints")
    saved = ckpt.load_checkpoint(path)
    state = saved["state"]
    saved_config = state["config"]
    _check_trained_layout(trainer.config, saved_config, path)
    if "sharded" in saved:
        _load_sharded(trainer, saved["sharded"])
    else:
        _load_full(trainer, path, saved)
    changed = {k: (saved_config[k], v) for k, v in trainer.config.to_dict().items()
               if k not in RESUMABLE_CHANGES and k in saved_config and saved_config[k] != v}
    unknown = sorted(k for k in trainer.config.to_dict() if k not in RESUMABLE_CHANGES and k not in saved_config)
    saved_device = torch.device(saved_config.get("device", "cpu")).type
    if saved_device != trainer.device.type:  # another GPU is fine; another kind of device is not
        warnings.warn(f"resuming {path}, a {saved_device} run, on {trainer.device.type}: rollout noise is drawn by "
                      "the device's generator, so the run continues with other noise than it would have had "
                      "(not bit-identical to an uninterrupted run)", RuntimeWarning, stacklevel=3)
    if changed:
        warnings.warn(f"resuming {path} with changed settings (saved, now): {changed}; the run will not "
                      "reproduce an uninterrupted one", stacklevel=3)
    cfg = trainer.config
    if (cfg.lr_schedule == "cosine" and cfg.lr_decay_iterations is None
            and saved_config.get("iterations") not in (None, cfg.iterations)):
        warnings.warn(f"resuming {path} with iterations {saved_config['iterations']} -> {cfg.iterations}: the cosine "
                      "schedule ends at `iterations`, so it is stretched from here on; set lr_decay_iterations to "
                      "keep it", stacklevel=3)
    if unknown:  # an older sfgrpo wrote it: these settings did not exist, their defaults may differ from it
        warnings.warn(f"resuming {path}, written by an older sfgrpo without the settings {unknown}; they take "
                      "their current values (see `sfgrpo train --help` for what each changes)", stacklevel=3)
    trainer.iteration = int(state["iteration"])
    trainer.update_generator.set_state(state["update_generator"])
    trainer.order_random.setstate(state["order_random"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("grad_scaler"):
        trainer.scaler.load_state_dict(state["grad_scaler"])
    trainer.history = [r for r in state["history"] if r["iteration"] <= trainer.iteration]
    trainer.eval_history = [r for r in state.get("eval_history", []) if r["iteration"] <= trainer.iteration]


def _check_trained_layout(cfg, saved_config: dict, path: Path) -> None:
    """The settings that decide which tensors are trained must be the checkpoint's: a config error
    naming the setting (else a missing tensor or a size mismatch deep in the loading)."""
    for name in ("use_lora", "lora_rank") if saved_config.get("use_lora") and cfg.use_lora else ("use_lora",):
        if name in saved_config and saved_config[name] != getattr(cfg, name):
            raise ValueError(f"bad trainer config: checkpoint {path} was trained with {name} = {saved_config[name]!r}, "
                             f"this run has {getattr(cfg, name)!r}: resume with the checkpoint's setting (--config "
                             f"RUN/config.json takes all of the run's)")


# ------------------------------------------------------------------------------ full format
def _full_optimizer_state(trainer) -> dict:
    if not trainer._sharded:
        return trainer.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(trainer.model.transformer, trainer.optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_full(trainer, path: Path, saved: dict) -> None:
    missing = sorted(set(trainer.trainable) - set(saved["weights"].keys()))
    if missing:
        raise ValueError(f"bad trainer config: checkpoint {path} lacks {len(missing)} trained tensor(s), e.g. "
                         f"{missing[:3]} (trained with other LoRA target modules?)")
    # tensors are read from the file one at a time: host memory holds one whole tensor, not the model
    for name, param in trainer.trainable.items():
        distributed.copy_full_into(param, saved["weights"].get_tensor(name))
    if trainer.ema is not None:
        for name, value in trainer.ema.items():
            if saved["ema"] is not None:
                distributed.copy_full_into(value, saved["ema"].get_tensor(name))
            else:  # EMA switched on at resume: it starts from the loaded weights
                with torch.no_grad():
                    value.copy_(trainer.trainable[name].detach())
    if not trainer._sharded:
        trainer.optimizer.load_state_dict(saved["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(trainer.model.transformer, trainer.optimizer, saved["optimizer"],
                             options=StateDictOptions(full_state_dict=True))


# --------------------------------------------------------------------------- sharded format
def _sharded_tensors(trainer) -> dict:
    """The tensors of a sharded checkpoint, as this rank holds them (DTensor shards under FSDP):
    saving reads them, loading writes into them in place."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tensors = {"weights": {n: p.detach() for n, p in trainer.trainable.items()},
               "optimizer": get_optimizer_state_dict(trainer.model.transformer, trainer.optimizer)}
    if trainer.ema is not None:
        tensors["ema"] = dict(trainer.ema)
    return tensors


def _load_sharded(trainer, path: Path) -> None:
    """Loads a sharded checkpoint into the run's tensors, whatever number of processes wrote it
    (torch.distributed.checkpoint reshards)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    tensors = _sharded_tensors(trainer)
    if "ema" in tensors and "ema" not in ckpt.sharded_keys(path):
        del tensors["ema"]  # EMA switched on at resume: it starts from the loaded weights
    ckpt.load_sharded(tensors, path)
    set_optimizer_state_dict(trainer.model.transformer, trainer.optimizer, tensors["optimizer"])
    if trainer.ema is not None and "ema" not in tensors:
        with torch.no_grad():
            for name, value in trainer.ema.items():
                value.copy_(trainer.trainable[name].detach())
