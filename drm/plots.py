"""The nodes' plots, rendered with matplotlib (Agg) into ComfyUI IMAGE tensors (the trainers' are in trainer/figures.py)."""

from __future__ import annotations

import io

import numpy as np
import torch


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

