"""Live metrics for experiment trackers (`report_to`): TensorBoard and Weights & Biases.

metrics.jsonl and eval.jsonl stay the record of a run; a tracker gets the same numbers as they are
written (rank 0 only): the iteration's metrics as `train/<name>` (per-step lists as
`train/<name>/<step>`), phase times as `time/<phase>`, evaluations as `eval/<name>` (and their
sample grid as `eval/samples`), all at the iteration as the step. Neither package is a dependency: asking for one that is not installed is a
clear error when the trainer starts, not at the first log.
"""

from __future__ import annotations

import importlib
from pathlib import Path

TRACKERS = ("tensorboard", "wandb")


def parse_report_to(spec: str) -> list[str]:
    """'none' / '' -> []; 'tensorboard,wandb' -> both (unknown names are an error)."""
    names = [name.strip() for name in spec.split(",") if name.strip() and name.strip() != "none"]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ValueError(f"report_to: unknown tracker(s) {unknown}; known: {', '.join(TRACKERS)} (or none)")
    return names


def scalars(record: dict, prefix: str) -> dict[str, float]:
    """The record's numbers as flat scalar tags (`iteration` and `samples` are the step, not values)."""
    flat = {}
    for key, value in record.items():
        if key in ("iteration",):
            continue
        tag = key if key.startswith("time/") else f"{prefix}/{key}"
        if isinstance(value, bool):
            flat[tag] = float(value)
        elif isinstance(value, (int, float)):
            flat[tag] = float(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            flat.update({f"{tag}/{step}": float(v) for step, v in enumerate(value)})
    return flat


class TensorBoardReporter:
    def __init__(self, output_dir: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("report_to=tensorboard needs the tensorboard package: pip install tensorboard") from err
        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())), 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_image(self, tag: str, image, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """One W&B run per output directory: its id is kept in `output_dir/wandb-run-id`, so a resumed
    run keeps logging to the same W&B run."""

    def __init__(self, output_dir: Path, config: dict, project: str, run_name: str | None):
        try:
            self.wandb = importlib.import_module("wandb")
        except ImportError as err:
            raise ImportError("report_to=wandb needs the wandb package: pip install wandb") from err
        id_file = output_dir / "wandb-run-id"
        run_id = id_file.read_text().strip() if id_file.exists() else self.wandb.util.generate_id()
        output_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
        self.run = self.wandb.init(project=project, name=run_name, id=run_id, resume="allow", config=config,
                                   dir=str(output_dir))

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_image(self, tag: str, image, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Reporters:
    """The trackers of a run (none on ranks other than 0)."""

    def __init__(self, names: list[str], output_dir: Path, config: dict, project: str, run_name: str | None):
        self.trackers = []
        for name in names:
            if name == "tensorboard":
                self.trackers.append(TensorBoardReporter(output_dir, config))
            else:
                self.trackers.append(WandbReporter(output_dir, config, project, run_name))

    def log(self, record: dict, prefix: str) -> None:
        if not self.trackers:
            return
        values, step = scalars(record, prefix), int(record["iteration"])
        for tracker in self.trackers:
            tracker.log(values, step)

    def log_image(self, tag: str, grid, step: int) -> None:
        """An image grid (uint8 `[H, W, 3]` tensor) at `step`."""
        if not self.trackers:
            return
        image = grid.cpu().numpy()
        for tracker in self.trackers:
            tracker.log_image(tag, image, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
