"""`trainer grpo`'s files: the LoRA for ComfyUI (and diffusers/peft), and the resumable checkpoint."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..config import shareable_dict
from ..runs import load_checkpoint, save_checkpoint
from .config import GRPOConfig


def lora_metadata(cfg: GRPOConfig, base_name: str, iteration: int) -> dict[str, str]:
    """The LoRA file's metadata: base model, rank, alpha, algorithm, iterations, reward model and settings."""
    return {"drm.base_model": base_name, "drm.lora_rank": str(cfg.lora_rank), "drm.lora_alpha": str(cfg.lora_alpha),
            "drm.algorithm": cfg.algorithm, "drm.steps": str(iteration), "drm.reward_model": Path(cfg.drm).name,
            "drm.config": json.dumps(shareable_dict(cfg))}


def export_lora(lora, cfg: GRPOConfig, base_name: str, iteration: int, path: Path) -> None:
    """The LoRA in ComfyUI's keys at `path`, and with cfg.peft_export its diffusers/peft twin beside it
    (<stem>.peft.safetensors); each written atomically, `path` last: the run counts as finished once it exists."""
    from drm.files import atomic_save

    if cfg.peft_export:
        from .peft_export import peft_state_dict

        atomic_save(peft_state_dict(lora), path.with_name(path.stem + ".peft.safetensors"),
                    lora_metadata(cfg, base_name, iteration))
    atomic_save(lora.state_dict_comfy(), path, lora_metadata(cfg, base_name, iteration))


def save_state(out: Path, lora, ema, optimizer, scheduler, iteration: int, largest_at_start: float) -> None:
    """LoRA, optimizer, scheduler, iteration and EMA: everything --resume needs (rollout noise derives from
    (seed, iteration), so there is no RNG state to keep), and the run's WeightWatch start."""
    save_checkpoint(out, lora.state_dict(), {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                             "iteration": iteration, "ema": ema,
                                             "largest_weight_at_start": largest_at_start})


def load_state(out: Path, lora, optimizer, scheduler) -> tuple[int, list | None, float | None]:
    """Restore what save_state wrote into `lora`, `optimizer` and `scheduler`; returns (iteration, EMA weights,
    the largest trained weight at the run's start, if saved)."""
    tensors, state = load_checkpoint(out)
    lora.load_state_dict(tensors)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["iteration"], state["ema"], state.get("largest_weight_at_start")


def save_snapshot(accelerator, out: Path, lora, ema, optimizer, scheduler, iteration: int, cfg: GRPOConfig,
                  base_name: str, largest_at_start: float) -> None:
    """The main process writes loras/<base>-<iteration>.safetensors (EMA weights, if any), then the checkpoint;
    every process waits for it."""
    if accelerator.is_main_process:
        # The snapshot first: the checkpoint is what --resume starts after, so a kill between the two
        # must leave the snapshot to be rewritten, never a checkpoint whose snapshot is missing.
        with swapped_in(list(lora.parameters()), ema):
            export_lora(lora, cfg, base_name, iteration, out / "loras" / f"{base_name}-{iteration:05d}.safetensors")
        save_state(out, lora, ema, optimizer, scheduler, iteration, largest_at_start)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def swapped_in(params: list[torch.Tensor], ema: list[torch.Tensor] | None):
    """Temporarily put the EMA weights into the parameters (for eval and export); a no-op without EMA."""
    if ema is None:
        yield
        return
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, shadow in zip(params, ema):
            p.copy_(shadow)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, original in zip(params, saved):
                p.copy_(original)
