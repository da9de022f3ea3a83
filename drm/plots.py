"""Plots rendered with matplotlib (Agg) into ComfyUI IMAGE tensors or PNG files."""

from __future__ import annotations

import io

import numpy as np
import torch

from .files import atomic_path


def _figure_to_image(fig) -> torch.Tensor:
    """A matplotlib figure as a ComfyUI IMAGE, [1, H, W, 3] floats in [0, 1]."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    rgb = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).unsqueeze(0)


def reward_trace_image(trace, title: str = "DRM step-wise sampling") -> torch.Tensor:
    """The kept score per branching step, with the band of candidate scores under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if trace.steps:
        ax.fill_between(trace.steps, trace.worst, trace.chosen, alpha=0.25, label="candidates (worst to best)")
        ax.plot(trace.steps, trace.chosen, marker="o", label="kept candidate")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no branching steps", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("sampling step (index)")
    ax.set_ylabel("DRM score (reward units)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    image = _figure_to_image(fig)
    plt.close(fig)
    return image


def training_curves_png(metrics_csv, path, title: str = "training") -> None:
    """Loss and accuracy against step from a metrics CSV (columns step, loss, *acc*), as a PNG."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
