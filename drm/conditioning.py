"""Prompt conditioning cached as safetensors, so graphs and the trainer can skip the text encoders.

File layout: `context` [B, T, 4096] (SD3's CLIP-L/G + T5 tokens), `pooled` [B, 2048], and the
prompt text in the metadata under `prompt` (UTF-8, as safetensors requires of its whole header).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import read_safetensors
from .files import atomic_save

CONTEXT_WIDTH, POOLED_WIDTH = 4096, 2048  # SD3: CLIP-L/G + T5 token features, and CLIP-L + G pooled


def save_conditioning(path: str | os.PathLike, context: torch.Tensor, pooled: torch.Tensor, prompt: str = "") -> None:
    atomic_save({"context": context.detach().contiguous().cpu(), "pooled": pooled.detach().contiguous().cpu()},
                path, {"prompt": prompt})


def load_conditioning(path: str | os.PathLike) -> list:
    """A ComfyUI CONDITIONING: [[context, {"pooled_output": pooled}]]."""
    tensors, metadata = read_safetensors(path, "conditioning file",
                                         "Put conditioning files in ComfyUI/models/drm_conditioning/.")
    name = Path(path).name
    if set(tensors) != {"context", "pooled"}:
        raise ValueError(f"conditioning file {name} holds {sorted(tensors)[:4]}; expected exactly "
                         "`context` and `pooled` tensors (written by drm.conditioning.save_conditioning).")
    context, pooled = tensors["context"], tensors["pooled"]
    problem = None
    if not (context.is_floating_point() and pooled.is_floating_point()):
        problem = f"its tensors are {context.dtype} and {pooled.dtype}, not floating point"
    elif context.ndim != 3 or pooled.ndim != 2 or context.shape[0] != pooled.shape[0] or context.shape[1] == 0:
        problem = f"context is {list(context.shape)} and pooled {list(pooled.shape)}"
    elif context.shape[2] != CONTEXT_WIDTH or pooled.shape[1] != POOLED_WIDTH:
        problem = (f"context is {context.shape[2]} wide and pooled {pooled.shape[1]}, not SD3's {CONTEXT_WIDTH} and "
                   f"{POOLED_WIDTH}")
    elif not (torch.isfinite(context).all() and torch.isfinite(pooled).all()):
        problem = "it holds NaN or infinite values"
    if problem:
        raise ValueError(f"conditioning file {name}: {problem}. Expected SD3 conditioning: context [B, T >= 1, "
                         f"{CONTEXT_WIDTH}] and pooled [B, {POOLED_WIDTH}], finite floats (drm.conditioning."
                         "save_conditioning writes them); encode the prompt again.")
    return [[context, {"pooled_output": pooled}]]


def by_context_length(fn, context: torch.Tensor, context_length: torch.Tensor | None, *rows: torch.Tensor):
    """fn(context[idx, :L], *(r[idx] for r in rows)) for each group of rows whose prompt has L tokens,
    put back together in row order.

    context [B, T, C] holds prompts of different lengths right-padded with zeros to T; context_length
    [B] says how many tokens each really has (None: all T). Zero tokens are not inert in the MMDiT,
    so a padded prompt would score (and denoise) differently from the same prompt alone, as ComfyUI
    runs it; here every row runs at its own length. `fn` returns [n, ...] for n rows.
    """
    if context_length is None or bool((context_length == context.shape[1]).all()):
        return fn(context, *rows)
    out = None
    for length in context_length.unique().tolist():
        index = (context_length == length).nonzero().flatten()
        part = fn(context[index, :length], *(r[index] for r in rows))
        if out is None:
            out = part.new_empty((len(context_length), *part.shape[1:]))
        out[index] = part
    return out
