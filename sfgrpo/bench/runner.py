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
import sys
import tempfile
import time
import traceback

import torch

from sfgrpo.backend import ENV_VAR
from sfgrpo.bench.measure import BackboneClock, SyncCounter, peak_memory_mb, reset_peak_memory
from sfgrpo.bench.suites import Case, Suite
from sfgrpo.bench.weights import SharedWeights
from sfgrpo.trainer.trainer import TIME_KEYS

MIN_PHASE_SECONDS = 1e-3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def environment(name: str, value: str | None):
    """The environment variable `name` set to `value` inside the block (None: left as it is), then
    restored, unset if it was."""
    previous = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def backend_env(implementation: str):
    """SFGRPO_BACKEND=reference for the reference and flow_grpo-code implementations; the caller's
    setting otherwise."""
    return environment(ENV_VAR, "reference" if implementation.startswith(("reference", "flow_grpo-code")) else None)


def build_trainer(case: Case, prompts: int, device: str, output_dir: str, compile_backbone: bool = False,
                  weights=None):
    """The case's trainer. Transformer-config backbones come from `weights` (a `SharedWeights`: the
    run's one set of random weights) when given, else are built afresh."""
    from sfgrpo.trainer import Trainer, TrainerConfig

    overrides = dict(case.overrides, compile_backbone=compile_backbone)
    config = TrainerConfig(output_dir=output_dir, device=device, prompts_per_iteration=prompts, progress=False,
                           plots=False, **overrides)
    model = None
    if case.backbone != "digits":
        from sfgrpo.bench.backbones import build_backbone

        dtype = DTYPES[case.dtype]
        transformer = None
        if weights is not None:  # a full fine-tune updates the base weights in place: its own copy
            transformer = weights.transformer(case.backbone, device, dtype, trains_base=not config.use_lora)
        model = build_backbone(case.backbone, case.resolution, case.text_tokens, device=device, dtype=dtype,
                               transformer=transformer)
    return Trainer(config, model=model)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_one(case: Case, implementation: str, prompts: int, suite: Suite, log=None, weights=None) -> dict:
    """Metrics of one case x implementation x batch: medians over `suite.iterations` iterations.
    `log(message)` is called as each phase starts (trainer set-up, each iteration)."""
    log = log or (lambda message: None)
    device = torch.device(suite.device)
    started, built = time.perf_counter(), weights.build_seconds if weights is not None else 0.0
    with backend_env(implementation), tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        log("setting up the trainer")
        # "+compile": the trainer's own --compile-backbone
        trainer = build_trainer(case, prompts, suite.device, tmp, compile_backbone=implementation.endswith("+compile"),
                                weights=weights)
        clock = BackboneClock(trainer.model.transformer, device_events=device.type == "cuda")
        if trainer.reference_transformer is not None:
            clock.watch(trainer.reference_transformer)
        if implementation == "flow_grpo-code":
            from sfgrpo.bench.flow_grpo_loop import flow_grpo_code

            stack.enter_context(flow_grpo_code(trainer))
        syncs_iteration, syncs_update = SyncCounter(device), SyncCounter(device)
        records, outside = [], []
        reset_peak_memory(device)
        for index in range(suite.warmup + suite.iterations):
            if index < suite.warmup:
                log(f"warm-up {index + 1}/{suite.warmup}")
            else:
                log(f"iteration {index - suite.warmup + 1}/{suite.iterations}")
            clock.take()
            start = time.perf_counter()
            record = trainer.train_iteration()
            total = time.perf_counter() - start
            if index >= suite.warmup:
                records.append(record)
                outside.append(1.0 - clock.take() / total)
        iteration_syncs = update_syncs = None
        if syncs_update.enabled:
            # one more iteration just to count syncs (the clock's CUDA events are no syncs)
            log("host-sync count (one more iteration)")
            # the update counted in this iteration only (an instance attribute that shadows the
            # method): wrapped for the whole run, the warm-up and measured iterations' updates
            # added up into the one "per iteration" count (and ran in sync debug mode)
            trainer.update = syncs_update.wrap(trainer.update)
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
        # what the whole row cost (set-up, warm-up, measured and sync-count iterations; not the
        # backbone's one-off build): what a time budget has to plan with
        "seconds_run_total": time.perf_counter() - started - ((weights.build_seconds - built) if weights else 0.0),
    }
    return {"batch": batch, "metrics": metrics, "peak_memory_kind": peak_kind}


def plan(suite: Suite, case_filter: str | None = None) -> list[tuple[Case, str, int]]:
    """The (case, implementation, groups per iteration) runs of a suite, in run order. Runs on the same
    backbone are consecutive (one set of weights serves them all); within a backbone, case by case
    (`suite.order == "case"`: each case's batch sizes, all implementations at each) or implementation
    by implementation (`"implementation"`: the first implementation on every case, then the second,
    ...: what matters most is measured first when a time budget cuts the run short)."""
    cases = [c for c in suite.cases if not case_filter or case_filter in c.name]
    units = []
    for backbone in dict.fromkeys(c.backbone for c in cases):
        group = [c for c in cases if c.backbone == backbone]
        if suite.order == "implementation":
            for implementation in dict.fromkeys(i for c in group for i in c.implementations):
                units += [(c, implementation, p) for c in group if implementation in c.implementations
                          for p in c.prompts_sweep]
        else:
            units += [(c, i, p) for c in group for p in c.prompts_sweep for i in c.implementations]
    return units


def run_suite(suite: Suite, progress: bool = True, case_filter: str | None = None, time_budget: float | None = None,
              on_rows=None) -> list[dict]:
    """All cases of `suite`; returns one row per case x implementation x batch x metric.

    Prints a timestamped line on stdout as each run's phases start and as each row is measured
    (with or without the progress bar) and calls `on_rows(rows)` after every run (the caller writes
    the results files then). `time_budget` (seconds since the start): a run whose estimated cost (the
    slowest earlier run of the same case and batch, else the last run on the same backbone) would end
    past the budget is not started but recorded as "skipped (time budget)"."""
    units = plan(suite, case_filter)
    progress_log = Progress(len(units), progress, suite.name)
    weights = SharedWeights(log=progress_log.line)
    budget = "" if time_budget is None else f", time budget {time_budget:g} s"
    progress_log.line(f"sfgrpo bench {suite.name}: {len(units)} runs on {suite.device} ({suite.warmup} warm-up + "
                      f"{suite.iterations} measured iterations each{budget})")
    rows, out_of_memory = [], set()
    durations: dict[tuple, list[float]] = {}  # (case, groups) -> seconds of each finished run
    last_on_backbone: dict[str, float] = {}
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    current = None  # (status row, phase log) of the run under way, until its rows are in `rows`

    def finish(new_rows: list[dict], outcome: str, line: str) -> None:
        """A run's rows into `rows` and the files, then its line on stdout (in that order)."""
        nonlocal current
        rows.extend(new_rows)
        current = None
        _save(on_rows, rows)
        progress_log.line(line)
        counts[outcome] += 1
        progress_log.update()

    try:
        for number, (case, implementation, prompts) in enumerate(units, 1):
            label = f"({number}/{len(units)}) {case.name} [{implementation}]" + (
                f" x{prompts} groups" if len(case.prompts_sweep) > 1 else "")
            progress_log.set_postfix(f"{case.name} [{implementation}] x{prompts}")
            key = (case.name, implementation)
            base = dict(case=case.name, kind=case.kind, backbone=case.backbone, implementation=implementation,
                        mode=case.overrides.get("mode", "stepwise"))
            status_row = dict(base, batch=prompts * case.overrides.get("group_size", 8), metric="status",
                              value=None, unit="")
            if key in out_of_memory:  # a bigger batch than one that already ran out of memory
                progress_log.update()
                continue
            unit_log = UnitLog(progress_log, label)
            current = (status_row, unit_log)
            known = durations.get((case.name, prompts))
            estimate = max(known) if known else last_on_backbone.get(case.backbone)
            elapsed = progress_log.elapsed()
            if time_budget is not None and elapsed + (estimate or 0.0) > time_budget:
                expected = "" if estimate is None else f" + ~{estimate:.0f} s expected"
                finish([dict(status_row, status="skipped (time budget)")], "skipped",
                       f"{label}: skipped (time budget: {elapsed:.0f} s elapsed{expected} > {time_budget:g} s)")
                continue
            status, started = None, time.perf_counter()
            try:
                result = run_one(case, implementation, prompts, suite, log=unit_log, weights=weights)
            except Exception as error:  # recorded, never fatal: compile failures, out of memory, ...
                status = "oom" if _is_oom(error) else f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                if _is_oom(error):
                    out_of_memory.add(key)
                elif os.environ.get("SFGRPO_BENCH_TRACEBACK"):
                    traceback.print_exc()
            if status is not None:
                # freed here, not inside `except`: there the traceback still holds run_one's frame, and
                # with it the failed case's trainer and its device memory (the next case would OOM)
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                finish([dict(status_row, status=status)], "failed",
                       f"{label}: {status} after {time.perf_counter() - started:.1f} s")
                continue
            seconds = result["metrics"]["seconds_run_total"]
            durations.setdefault((case.name, prompts), []).append(seconds)
            last_on_backbone[case.backbone] = seconds
            finish([dict(base, batch=result["batch"], metric=metric, value=value, unit=_unit(metric, result),
                         status="ok" if value is not None else "n/a") for metric, value in result["metrics"].items()],
                   "ok", f"{label}: {_summary(result)}")
    except BaseException as error:  # Ctrl-C, SIGTERM (`timeout`): everything measured before is kept
        if current is not None:
            status_row, unit_log = current
            rows.append(dict(status_row, status=f"interrupted ({type(error).__name__}) during {unit_log.phase}"))
            progress_log.line(f"{unit_log.label}: interrupted ({type(error).__name__}) during {unit_log.phase}")
        _save(on_rows, rows)
        progress_log.close()
        raise
    progress_log.line(f"sfgrpo bench {suite.name}: done, {counts['ok']} measured, {counts['skipped']} skipped, "
                      f"{counts['failed']} failed or out of memory")
    weights.release()
    progress_log.close()
    return rows


def _save(on_rows, rows: list[dict]) -> None:
    """`on_rows(rows)`; interrupted while writing (SIGTERM, Ctrl-C), it writes them all again first."""
    if on_rows is None:
        return
    try:
        on_rows(rows)
    except BaseException:
        on_rows(rows)
        raise


def _summary(result: dict) -> str:
    m = result["metrics"]
    parts = [f"ok, batch {result['batch']}", f"{m['seconds_per_iteration']:.3f} s/iter"]
    if m["images_per_s"] is not None:
        parts.append(f"{m['images_per_s']:.2f} images/s")
    parts += [f"rollout {m['seconds_rollout']:.3f} s", f"update {m['seconds_update']:.3f} s",
              f"peak {m['peak_memory_mb']:.0f} MiB"]
    if m["host_syncs_in_update"] is not None:
        parts.append(f"syncs {m['host_syncs_per_iteration']} ({m['host_syncs_in_update']} in update)")
    parts.append(f"run {m['seconds_run_total']:.1f} s")
    return ", ".join(parts)


def _unit(metric: str, result: dict) -> str:
    if metric.startswith("seconds"):
        return "s"
    if metric == "peak_memory_mb":
        return "MiB (" + result["peak_memory_kind"] + ")"
    return {"images_per_s": "1/s", "outside_backbone_share": "fraction"}.get(metric, "count")


class Progress:
    """Timestamped lines on stdout, flushed at once (also under --no-progress, and while the tqdm bar,
    on stderr, is shown), seconds counted from the start of the run."""

    clock = staticmethod(time.perf_counter)

    def __init__(self, total: int, bar: bool, name: str):
        self.start = self.clock()
        self.bar = None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"sfgrpo bench {name}", unit="run")

    def elapsed(self) -> float:
        return self.clock() - self.start

    def line(self, message: str) -> None:
        text = f"[{self.elapsed():7.1f} s] {message}"
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, file=sys.stdout)
        sys.stdout.flush()

    def set_postfix(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60])

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class UnitLog:
    """One run's phase lines ("<label>: warm-up 1/1"); remembers the phase for an interruption's record."""

    def __init__(self, progress: Progress, label: str):
        self.progress, self.label, self.phase = progress, label, "its start"

    def __call__(self, message: str) -> None:
        self.phase = message
        self.progress.line(f"{self.label}: {message}")
