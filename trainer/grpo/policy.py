"""The policy under training: a ComfyUI SD3 model with a LoRA on its MMDiT (import after import_comfy)."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.utils.checkpoint

from drm.conditioning import by_context_length
from drm.lora import LoRA, target_paths


class Policy:
    """predict() runs ComfyUI's own apply_model, with the LoRA's hooks on (policy) or off (reference).

    With `checkpointing`, a prediction made with gradients keeps only each joint block's inputs and
    recomputes the block in the backward pass (torch.utils.checkpoint, non-reentrant): the activation
    memory of one block instead of all of them, for about one more forward pass. Predictions without
    gradients (the rollouts, the KL reference) run as they would without it.
    """

    def __init__(self, patcher, rank: int, alpha: float, include_mlp: bool, device, seed: int,
                 checkpointing: bool = False):
        self.patcher = patcher
        self.model = patcher.model  # comfy BaseModel: apply_model handles sigma -> timestep and x0
        self.mmdit = self.model.diffusion_model
        self.mmdit.requires_grad_(False)
        torch.manual_seed(seed)
        self.lora = LoRA.for_module(self.mmdit, target_paths(self.mmdit, include_mlp), rank, alpha).to(device)
        self.checkpointing = checkpointing
        self.forward_rows = 0  # latents pushed through the model so far, for cost accounting

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                context_length: torch.Tensor | None = None, lora: bool = True) -> torch.Tensor:
        """Denoised x0 (float32) for latents x at noise levels sigma [B]; each row's prompt runs at its own
        length (context_length [B]; None: all of context's tokens), as ComfyUI runs a prompt."""
        self.forward_rows += x.shape[0]
        options = {}
        if self.checkpointing and torch.is_grad_enabled():
            # ComfyUI's block replacement: each joint block runs checkpointed, its LoRA hooks entered inside,
            # so the recomputation in backward adds them again (hooks on the whole model would be gone by then).
            blocks = {("double_block", i): functools.partial(self._checkpointed_block, i, lora)
                      for i in range(len(self.mmdit.joint_blocks))}
            options, hooks = {"patches_replace": {"dit": blocks}}, contextlib.nullcontext()
        else:
            hooks = self.lora.applied(self.mmdit) if lora else contextlib.nullcontext()

        def run(context, x, sigma, pooled):
            return self.model.apply_model(x, sigma, c_crossattn=context, y=pooled, transformer_options=options).float()

        with hooks:
            return by_context_length(run, context, context_length, x, sigma, pooled)

    def _checkpointed_block(self, index: int, lora: bool, args: dict, extra: dict) -> dict:
        """Joint block `index` under torch.utils.checkpoint, with this policy's LoRA on it if `lora`; called by
        ComfyUI's MMDiT for a ("double_block", index) replacement with its {"txt", "img", "vec"} tensors."""
        def block(txt, img, vec):
            hooks = self.lora.applied(self.mmdit, f"joint_blocks.{index}.") if lora else contextlib.nullcontext()
            with hooks:
                return self.mmdit.joint_blocks[index](txt, img, c=vec, use_checkpoint=False,
                                                      transformer_options=args["transformer_options"])

        txt, img = torch.utils.checkpoint.checkpoint(block, args["txt"], args["img"], args["vec"], use_reentrant=False)
        return {"txt": txt, "img": img}
