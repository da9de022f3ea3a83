"""The trainers' and the demo's figures as PNG files: training curves, eval grids, the world demo's plots.

matplotlib draws with its Agg backend (no display needed), torchvision tiles image grids; every file is
written through drm.files.atomic_path, so a kill never leaves half a PNG.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from drm.files import atomic_path

SHOWN = list(range(0, 60, 5))  # the world demo's 12 prompts in its grids: every shape, colour and background


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write(fig, path: Path) -> None:
    """Save a matplotlib figure as PNG at 100 dpi, atomically, and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    _pyplot().close(fig)


def _rows(metrics_csv: Path) -> list[dict[str, str]]:
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def training_curves_png(metrics_csv: Path, path: Path, title: str = "training") -> None:
    """`trainer drm`'s curves.png: loss and accuracy against step from its metrics CSV (columns step, loss, *acc*)."""
    rows = _rows(metrics_csv)
    fig, (loss_ax, acc_ax) = _pyplot().subplots(1, 2, figsize=(10, 3.6))
    steps = [int(r["step"]) for r in rows]
    loss_ax.plot(steps, [float(r["loss"]) for r in rows])
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("loss (nats)")
    loss_ax.set_title("training loss", fontsize=10)
    for column in [c for c in (rows[0] if rows else {}) if "acc" in c]:
        points = [(int(r["step"]), float(r[column])) for r in rows if r[column]]
        if points:
            acc_ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=column)
    acc_ax.set_xlabel("optimizer step")
    acc_ax.set_ylabel("preference accuracy (fraction)")
    acc_ax.set_ylim(0, 1)
    acc_ax.legend(fontsize=7)
    acc_ax.set_title("accuracy", fontsize=10)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _write(fig, path)


def reward_curve_png(metrics_csv: Path, path: Path, title: str) -> None:
    """`trainer grpo`'s reward_curve.png: rollout and eval DRM rewards against iteration (its metrics CSV)."""
    rows = _rows(metrics_csv)
    fig, ax = _pyplot().subplots(figsize=(6.4, 3.6))
    train = [(int(r["iteration"]), float(r["reward"])) for r in rows if r["reward"]]
    evals = [(int(r["iteration"]), float(r["eval_reward"])) for r in rows if r["eval_reward"]]
    if train:
        ax.plot(*zip(*train), alpha=0.5, label="rollout reward (DRM)")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval reward (DRM, ODE samples)")
    ax.set_xlabel("iteration (optimizer step)")
    ax.set_ylabel("DRM reward (reward units)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _write(fig, path)


def eval_grid_png(images: torch.Tensor, path: Path, columns: int) -> None:
    """images [B, 3, H, W] in [0, 1] tiled `columns` wide, row-major, without gaps (empty cells white)."""
    from torchvision.utils import save_image

    with atomic_path(path) as tmp:
        save_image(images.float().clamp(0, 1), tmp, nrow=columns, padding=0, pad_value=1.0, format="PNG")


def grid_png(texts: list[str], rows: dict[str, dict], path: Path) -> None:
    """The world demo's grids: the SHOWN prompts as columns, one row per entry of `rows` (world_demo.judged()
    results), each picture captioned with its oracle score (and "wrong" when it does not show its prompt)."""
    from .demo.world import parse_prompt

    fig, axes = _pyplot().subplots(len(rows), len(SHOWN), figsize=(1.15 * len(SHOWN), 1.45 * len(rows) + 0.5),
                                   squeeze=False)
    for r, (label, result) in enumerate(rows.items()):
        for c, i in enumerate(SHOWN):
            ax = axes[r][c]
            ax.imshow(result["images"][i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ok = result["matches"][i]
            ax.set_xlabel(f"{result['scores'][i]:.2f}" + ("" if ok else " wrong"), fontsize=7,
                          color="black" if ok else "red")
            if r == 0:
                shape, colour, background = parse_prompt(texts[i])
                ax.set_title(f"{colour} {shape}\non {background}", fontsize=7)
        axes[r][0].set_ylabel(f"{label}\nmean {result['oracle']:.2f}", fontsize=8)
    fig.suptitle("oracle score under each picture (in [0, 2]); same noise in every row", fontsize=8)
    fig.tight_layout()
    _write(fig, path)


def accuracy_png(accuracy: dict, path: Path) -> None:
    """Bars of the DRM's held-out accuracy against the oracle per sigma bucket (trainer drm's eval keys)."""
    buckets = [(k[10:].replace("_", "-"), v) for k, v in accuracy.items() if k.startswith("acc_sigma_")]
    fig, ax = _pyplot().subplots(figsize=(5, 3))
    ax.bar([b for b, _ in buckets], [v for _, v in buckets], color="tab:blue")
    ax.axhline(0.5, color="grey", linestyle="--", label="chance")
    for x, (_, v) in enumerate(buckets):
        ax.text(x, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_xlabel("sigma of the noised latent (0 clean, 1 pure noise)")
    ax.set_ylabel("agrees with the oracle")
    ax.set_title("DRM preference accuracy on held-out prompts", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    _write(fig, path)
