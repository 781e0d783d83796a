"""Results folder of a benchmark run: results.csv, results.json, results.md and PNG plots."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

import sfgrpo

COLUMNS = ("suite", "case", "kind", "backbone", "mode", "implementation", "batch", "metric", "value", "unit",
           "status", "device", "torch", "sfgrpo", "git", "date")


def environment(device: str, directory: str | Path = ".") -> dict:
    """Device name, versions, git revision and date, repeated on every row."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = f"{cpu_model()}, {torch.get_num_threads()} threads"
    return {"device": name, "torch": torch.__version__, "sfgrpo": sfgrpo.__version__, "git": git_revision(directory),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def cpu_model() -> str:
    try:  # Linux names the processor model here; platform.processor() only says "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def git_revision(*places) -> str:
    """The git revision of the first of `places`, sfgrpo's own directory or the current directory that
    is inside a checkout (an installed sfgrpo is not: then the results folder's checkout counts)."""
    for where in (*places, Path(sfgrpo.__file__).resolve().parent, Path.cwd()):
        where = Path(where)
        while not where.exists():
            where = where.parent
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True,
                                 text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    return "unknown"


def write_results(rows: list[dict], suite: str, device: str, directory: str | Path, env: dict | None = None,
                  plots: bool = True) -> dict[str, Path]:
    """results.csv, results.json, results.md (and the plots unless `plots=False`), each written to a
    temporary file first and renamed over the old one, so a run killed at any moment leaves complete
    files of what it measured so far (the runner calls this after every row)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    env = env or environment(device, directory)
    full = [{**{c: None for c in COLUMNS}, **row, "suite": suite, **env} for row in rows]
    paths = {"csv": directory / "results.csv", "json": directory / "results.json", "md": directory / "results.md"}
    with _replacing(paths["csv"], newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(full)
    with _replacing(paths["json"]) as handle:
        handle.write(json.dumps({"suite": suite, **env, "rows": full}, indent=1) + "\n")
    with _replacing(paths["md"]) as handle:
        handle.write(markdown_table(rows, suite, env))
    if plots:
        paths.update(write_plots(rows, directory))
    return paths


@contextlib.contextmanager
def _replacing(path: Path, newline: str | None = None):
    """A text file handle whose content replaces `path` atomically (os.replace) when the block ends."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "w", newline=newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


TABLE = (("images/s", "images_per_s", "{:.1f}"), ("s/iter", "seconds_per_iteration", "{:.3f}"),
         ("rollout s", "seconds_rollout", "{:.3f}"), ("look-ahead s", "seconds_lookahead", "{:.3f}"),
         ("update s", "seconds_update", "{:.3f}"), ("peak MiB", "peak_memory_mb", "{:.0f}"),
         ("outside backbone", "outside_backbone_share", "{:.1%}"), ("syncs/iter", "host_syncs_per_iteration", "{:g}"),
         ("syncs in update", "host_syncs_in_update", "{:g}"), ("run s", "seconds_run_total", "{:.0f}"))


def pivot(rows: list[dict]) -> dict[tuple, dict]:
    """(case, implementation, batch) -> {metric: value, "status": ...}, in run order."""
    table: dict[tuple, dict] = {}
    for row in rows:
        entry = table.setdefault((row["case"], row["implementation"], row["batch"]), {"status": "ok"})
        if row["metric"] == "status":
            entry["status"] = row["status"]
        else:
            entry[row["metric"]] = row["value"]
    return table


def markdown_table(rows: list[dict], suite: str, env: dict) -> str:
    peak_kind = next((r["unit"] for r in rows if r["metric"] == "peak_memory_mb"), "")
    lines = [f"# sfgrpo bench --suite {suite}", "",
             f"{env['device']}; torch {env['torch']}, sfgrpo {env['sfgrpo']} ({env['git']}), {env['date']}.",
             f"images/s: trajectories of the case's phase per second (the whole iteration for `iteration` cases); "
             f"s/iter: sum of per-phase medians; peak memory: {peak_kind}; run s: wall time of the row's whole run "
             f"(trainer set-up, warm-up, measured and sync-count iterations).", "",
             "| case | implementation | batch | " + " | ".join(h for h, _, _ in TABLE) + " | status |",
             "|---|---|---:|" + "---:|" * len(TABLE) + "---|"]
    for (case, implementation, batch), values in pivot(rows).items():
        cells = []
        for _, metric, fmt in TABLE:
            value = values.get(metric)
            cells.append("n/a" if value is None else fmt.format(value))
        lines.append(f"| {case} | {implementation} | {batch} | " + " | ".join(cells) + f" | {values['status']} |")
    return "\n".join(lines) + "\n"


def write_plots(rows: list[dict], directory: Path) -> dict[str, Path]:
    """Seconds per iteration and images/s per case, implementations side by side (skipped without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    table = pivot(rows)
    cases = list(dict.fromkeys(f"{c} (x{b})" for c, _, b in table))
    implementations = list(dict.fromkeys(i for _, i, _ in table))
    paths = {}
    for metric, label in (("seconds_per_iteration", "seconds per iteration"), ("images_per_s", "images / s")):
        figure, axes = plt.subplots(figsize=(max(6, 0.9 * len(cases) * max(1, len(implementations)) / 2), 4.5))
        width = 0.8 / max(1, len(implementations))
        for j, implementation in enumerate(implementations):
            heights = [table.get((c.rsplit(" (x", 1)[0], implementation, int(c.rsplit("(x", 1)[1][:-1])), {})
                       .get(metric) or 0.0 for c in cases]
            axes.bar([i + j * width for i in range(len(cases))], heights, width, label=implementation)
        axes.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        axes.set_xticklabels(cases, rotation=35, ha="right", fontsize=7)
        axes.set_ylabel(label)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = directory / f"{metric}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths[metric] = path
    return paths
