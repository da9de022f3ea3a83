"""The policy under training: a ComfyUI SD3 model with a LoRA on its MMDiT (import after import_comfy)."""

from __future__ import annotations

import contextlib

import torch

from drm.conditioning import by_context_length
from drm.lora import LoRA, target_paths


class Policy:
    """predict() runs ComfyUI's own apply_model, with the LoRA's hooks on (policy) or off (reference)."""

    def __init__(self, patcher, rank: int, alpha: float, include_mlp: bool, device, seed: int):
        self.patcher = patcher
        self.model = patcher.model  # comfy BaseModel: apply_model handles sigma -> timestep and x0
        self.mmdit = self.model.diffusion_model
        self.mmdit.requires_grad_(False)
        torch.manual_seed(seed)
        self.lora = LoRA.for_module(self.mmdit, target_paths(self.mmdit, include_mlp), rank, alpha).to(device)
        self.forward_rows = 0  # latents pushed through the model so far, for cost accounting

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                context_length: torch.Tensor | None = None, lora: bool = True) -> torch.Tensor:
        """Denoised x0 (float32) for latents x at noise levels sigma [B]; each row's prompt runs at its own
        length (context_length [B]; None: all of context's tokens), as ComfyUI runs a prompt."""
        self.forward_rows += x.shape[0]
        hooks = self.lora.applied(self.mmdit) if lora else contextlib.nullcontext()

        def run(context, x, sigma, pooled):
            return self.model.apply_model(x, sigma, c_crossattn=context, y=pooled).float()

        with hooks:
            return by_context_length(run, context, context_length, x, sigma, pooled)
