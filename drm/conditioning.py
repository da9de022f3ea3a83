"""Prompt conditioning cached as safetensors, so graphs and the trainer can skip the text encoders.

File layout: `context` [B, T, 4096] (SD3's CLIP-L/G + T5 tokens), `pooled` [B, 2048], and the
prompt text in the metadata under `prompt` (UTF-8, as safetensors requires of its whole header).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import atomic_save, read_safetensors


def save_conditioning(path: str | os.PathLike, context: torch.Tensor, pooled: torch.Tensor, prompt: str = "") -> None:
    atomic_save({"context": context.detach().contiguous().cpu(), "pooled": pooled.detach().contiguous().cpu()},
                path, {"prompt": prompt})


def load_conditioning(path: str | os.PathLike) -> list:
    """A ComfyUI CONDITIONING: [[context, {"pooled_output": pooled}]]."""
    tensors, metadata = read_safetensors(path, "conditioning file",
                                         "Put conditioning files in ComfyUI/models/drm_conditioning/.")
    if set(tensors) != {"context", "pooled"}:
        raise ValueError(f"conditioning file {Path(path).name} holds {sorted(tensors)[:4]}; expected exactly "
                         "`context` and `pooled` tensors (written by drm.conditioning.save_conditioning).")
    return [[tensors["context"], {"pooled_output": tensors["pooled"]}]]
