"""Images and plots of a run. Pillow / matplotlib are optional: without them these are skipped
with a one-line notice, never an error."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor


GRID_SIDE = 8  # at most 8 x 8 images in a grid: real backbones' images are 512-1024 px


def image_grid(images: Tensor, scale: int | None = None, pad: int = 1) -> Tensor:
    """`[R, C, ch, H, W]` in [0, 1] -> one uint8 `[H', W', 3]` grid, upscaled `scale`x (nearest;
    default: small images, like the digits model's 8 px, to about 64 px, real ones not at all)."""
    rows, cols, channels, height, width = images.shape
    if scale is None:
        scale = max(1, 64 // max(height, width))
    images = images.float().clamp(0, 1)
    if channels == 1:
        images = images.expand(-1, -1, 3, -1, -1)
    images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    h, w = height * scale + pad, width * scale + pad
    grid = torch.ones(3, rows * h + pad, cols * w + pad)
    for r in range(rows):
        for c in range(cols):
            grid[:, pad + r * h: pad + r * h + h - pad, pad + c * w: pad + c * w + w - pad] = images[r, c, :3]
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8)


def save_png(grid: Tensor, path: Path) -> bool:
    try:
        from PIL import Image
    except ImportError:
        warnings.warn("Pillow is not installed: image grids skipped", stacklevel=2)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.cpu().numpy()).save(path)
    return True


def write_grids(trainer, directory: Path, final: Tensor | None = None) -> dict[str, Tensor]:
    """samples-iterNNNNNN.png: final images, one row per group. estimates-iterNNNNNN.png: the first
    group's clean estimates after 0..T steps (one row per trajectory; stepwise modes only).
    `final`: the global batch's final images when this process holds only its share (distributed).
    Returns the grids by name ("samples", "estimates")."""
    images = trainer.last_images  # [K, N, C, H, W]
    if images is None:
        return {}
    groups, group_size = trainer.config.prompts_per_iteration, trainer.config.group_size
    tag = f"iter{trainer.iteration:06d}"
    final = (images[-1] if final is None else final).reshape(groups, group_size, *images.shape[2:])
    grids = {"samples": image_grid(final[:GRID_SIDE, :GRID_SIDE].cpu())}
    if images.shape[0] > 1:
        first_group = images[:, :group_size].transpose(0, 1)  # [group, K, ...]
        grids["estimates"] = image_grid(first_group[:GRID_SIDE].cpu())
    for name, grid in grids.items():
        save_png(grid, directory / f"{name}-{tag}.png")
    return grids


def rows_of(images: Tensor, per_row: int = GRID_SIDE, rows: int = GRID_SIDE) -> Tensor:
    """`[N, ch, H, W]` -> `[R, per_row, ch, H, W]`: the first `rows x per_row` images, the last row
    padded with white."""
    images = images[: rows * per_row]
    count = images.shape[0]
    padded = torch.ones((-(-count // per_row) * per_row, *images.shape[1:]), dtype=images.dtype)
    padded[:count] = images.cpu()
    return padded.reshape(-1, per_row, *images.shape[1:])


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: plots skipped (pip install 'sfgrpo[plots]')", stacklevel=3)
        return None
    return plt


def write_plots(history: list[dict], directory: Path, evaluations: list[dict] = ()) -> list[Path]:
    """reward.png (final-image reward and class accuracy per iteration, and the evaluations' reward
    when there are any) and gains.png (mean |gain| per sampling step, the paper's Fig. 2; stepwise
    runs only)."""
    plt = _pyplot()
    if plt is None or not history:
        return []
    written = []
    iterations = [r["iteration"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(iterations, [r["reward_mean"] for r in history], label="reward (final image)")
    if evaluations:
        ax.plot([r["iteration"] for r in evaluations], [r["eval_reward_mean"] for r in evaluations], "o-",
                color="tab:green", label="eval reward (ODE, fixed noise)")
        ax.legend(loc="lower right")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    if "class_accuracy" in history[0]:
        twin = ax.twinx()
        twin.plot(iterations, [r["class_accuracy"] for r in history], color="tab:red", alpha=0.6, label="class accuracy")
        twin.set_ylabel("class accuracy")
        twin.set_ylim(0, 1.05)
    ax.set_title("reward per iteration")
    fig.tight_layout()
    written.append(directory / "reward.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    gains = [r["gain_abs_by_step"] for r in history if "gain_abs_by_step" in r]
    if gains:
        mean_gain = torch.tensor(gains).mean(dim=0)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(range(1, mean_gain.numel() + 1), mean_gain.tolist())
        ax.set_xlabel("sampling step")
        ax.set_ylabel("mean |gain| (reward change of the clean estimate)")
        ax.set_title("per-step gain magnitude")
        fig.tight_layout()
        written.append(directory / "gains.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
