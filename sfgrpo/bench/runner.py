"""Runs a suite: every case x batch size x implementation, whole training iterations, one row per metric.

Implementations, side by side in one process:
- `sfgrpo`: the trainer as shipped (fused ops where the device has them);
- `reference`: the same loop with every op forced to plain PyTorch (SFGRPO_BACKEND=reference), i.e.
  what Flow-GRPO's own code does;
- `flow_grpo-code`: the reference loop with Flow-GRPO's own formulation of the SDE step (a host
  sync per row for the sigma lookup, the KL by a second call) and of the advantages (per-prompt
  numpy loop on the host): `sfgrpo/bench/flow_grpo_loop.py`;
- `sfgrpo+compile`: as shipped with `compile_backbone=True` (the transformer's forward under
  `torch.compile`; a failure to compile is recorded as the case's status, never fatal).
Stepwise vs Flow-GRPO is a difference between cases (`mode`), not an implementation.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import tempfile
import time
import traceback

import torch

from sfgrpo.backend import ENV_VAR
from sfgrpo.bench.measure import BackboneClock, SyncCounter, peak_memory_mb, reset_peak_memory
from sfgrpo.bench.suites import Case, Suite
from sfgrpo.trainer.trainer import TIME_KEYS

MIN_PHASE_SECONDS = 1e-3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def backend_env(implementation: str):
    """SFGRPO_BACKEND=reference for the reference and flow_grpo-code implementations; the caller's
    setting otherwise."""
    previous = os.environ.get(ENV_VAR)
    if implementation.startswith(("reference", "flow_grpo-code")):
        os.environ[ENV_VAR] = "reference"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous


def build_trainer(case: Case, prompts: int, device: str, output_dir: str, compile_backbone: bool = False):
    from sfgrpo.trainer import Trainer, TrainerConfig

    overrides = dict(case.overrides, compile_backbone=compile_backbone)
    config = TrainerConfig(output_dir=output_dir, device=device, prompts_per_iteration=prompts, progress=False,
                           plots=False, **overrides)
    model = None
    if case.backbone != "digits":
        from sfgrpo.bench.backbones import build_backbone

        model = build_backbone(case.backbone, case.resolution, case.text_tokens, device=device,
                               dtype=DTYPES[case.dtype])
    return Trainer(config, model=model)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_one(case: Case, implementation: str, prompts: int, suite: Suite) -> dict:
    """Metrics of one case x implementation x batch: medians over `suite.iterations` iterations."""
    device = torch.device(suite.device)
    with backend_env(implementation), tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        # "+compile": the trainer's own --compile-backbone
        trainer = build_trainer(case, prompts, suite.device, tmp, compile_backbone=implementation.endswith("+compile"))
        clock = BackboneClock(trainer.model.transformer, synchronize=device.type == "cuda")
        if trainer.reference_transformer is not None:
            clock.watch(trainer.reference_transformer)
        if implementation == "flow_grpo-code":
            from sfgrpo.bench.flow_grpo_loop import flow_grpo_code

            stack.enter_context(flow_grpo_code(trainer))
        syncs_iteration, syncs_update = SyncCounter(device), SyncCounter(device)
        trainer.update = syncs_update.wrap(trainer.update)  # instance attribute: counts inside the update only
        records, outside = [], []
        reset_peak_memory(device)
        for index in range(suite.warmup + suite.iterations):
            clock.take()
            start = time.perf_counter()
            record = trainer.train_iteration()
            total = time.perf_counter() - start
            if index >= suite.warmup:
                records.append(record)
                outside.append(1.0 - clock.take() / total)
        iteration_syncs = update_syncs = None
        if syncs_update.enabled:
            # one more iteration just to count syncs, with the clock's own synchronisations off so that
            # only the trainer's are counted
            clock.synchronize = False
            with syncs_iteration.counting():
                trainer.train_iteration()
            update_syncs = syncs_update.take()
            iteration_syncs = update_syncs + syncs_iteration.take()
        peak, peak_kind = peak_memory_mb(device)
        batch = trainer.config.batch_size
        del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    phases = {k: statistics.median(r[f"time/{k}"] for r in records) for k in TIME_KEYS}
    iteration = sum(phases.values())  # sum of per-phase medians: robust to one slow phase
    measured = iteration if case.kind == "iteration" else phases[case.kind]
    metrics = {
        # a phase that does no network work (the T' = 1 look-ahead reuses the rollout's velocity) has
        # no meaningful throughput: reported as n/a rather than as millions of images/s
        "images_per_s": batch / measured if measured > MIN_PHASE_SECONDS else None,
        "seconds_per_iteration": iteration,
        **{f"seconds_{k}": v for k, v in phases.items()},
        "peak_memory_mb": peak,
        "outside_backbone_share": statistics.median(outside),
        "host_syncs_per_iteration": iteration_syncs,
        "host_syncs_in_update": update_syncs,
    }
    return {"batch": batch, "metrics": metrics, "peak_memory_kind": peak_kind}


def run_suite(suite: Suite, progress: bool = True, case_filter: str | None = None) -> list[dict]:
    """All cases of `suite`; returns one row per case x implementation x batch x metric."""
    cases = [c for c in suite.cases if not case_filter or case_filter in c.name]
    units = [(c, i, p) for c in cases for p in c.prompts_sweep for i in c.implementations]
    bar = _progress(len(units), progress, suite.name)
    rows, out_of_memory = [], set()
    for case, implementation, prompts in units:
        bar.set_postfix_str(f"{case.name} [{implementation}] x{prompts}"[:60])
        key = (case.name, implementation)
        base = dict(case=case.name, kind=case.kind, backbone=case.backbone, implementation=implementation,
                    mode=case.overrides.get("mode", "stepwise"))
        if key in out_of_memory:  # a bigger batch than one that already ran out of memory
            bar.update()
            continue
        status = None
        try:
            result = run_one(case, implementation, prompts, suite)
        except Exception as error:  # recorded, never fatal: compile failures, out of memory, ...
            status = "oom" if _is_oom(error) else f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            if _is_oom(error):
                out_of_memory.add(key)
            elif os.environ.get("SFGRPO_BENCH_TRACEBACK"):
                traceback.print_exc()
        if status is not None:
            # freed here, not inside `except`: there the traceback still holds run_one's frame, and
            # with it the failed case's trainer and its device memory (the next case would OOM)
            rows.append(dict(base, batch=prompts * case.overrides.get("group_size", 8), metric="status", value=None,
                             unit="", status=status))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            bar.update()
            continue
        for metric, value in result["metrics"].items():
            rows.append(dict(base, batch=result["batch"], metric=metric, value=value, unit=_unit(metric, result),
                             status="ok" if value is not None else "n/a"))
        bar.update()
    bar.close()
    return rows


def _unit(metric: str, result: dict) -> str:
    if metric.startswith("seconds"):
        return "s"
    if metric == "peak_memory_mb":
        return "MiB (" + result["peak_memory_kind"] + ")"
    return {"images_per_s": "1/s", "outside_backbone_share": "fraction"}.get(metric, "count")


class _NoBar:
    def set_postfix_str(self, *_):
        pass

    def update(self, *_):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool, name: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"sfgrpo bench {name}", unit="run")
