"""`trainer drm`'s settings: every field is a flag and a TOML key, checked before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, check_ranges, field
from ..runs import check_out_dir

RESUMABLE = {"max_steps", "eval_every", "save_every", "log_every", "resume"}  # may change on --resume


@dataclass
class DRMTrainConfig:
    base: str = field("", "SD3/SD3.5 model: a ComfyUI checkpoint or a diffusion-model .safetensors")
    data: str = field("", "preference pairs (.json/.jsonl: prompt, path1 preferred, path2, confidence) "
                          "or pre-encoded pairs (.safetensors)")
    out: str = field("runs/drm", "output directory: checkpoints, metrics.csv, curves.png, the DRM file")
    vae: str = field("", "VAE .safetensors, when the base file has none (image data only)")
    clip: list[str] = field([], "text encoder files (CLIP-L, CLIP-G, T5-XXL), when the base file has none")
    resolution: int = field(512, "training resolution in pixels (multiple of 16)")
    t5_length: int = field(77, "image data: T5 tokens are padded to at least this many (ComfyUI's default 77; the "
                               "DRM authors use 512); recorded in the DRM file, for ComfyUI's T5TokenizerOptions")
    min_confidence: float = field(0.0, "drop pairs whose confidence is below this")
    on_bad_image: str = field("stop", "a missing or unreadable image: stop, or skip the pair")
    cache_dir: str = field("", "where encoded latents and prompts are cached (default: <out>/cache)")
    mode: str = field("adapter", "adapter | full | head")
    blocks: int = field(0, "joint blocks the DRM keeps; 0 means depth - 3 (the paper's SD3.5-M variant)")
    lora_rank: int = field(32, "adapter mode: LoRA rank")
    lora_alpha: float = field(32.0, "adapter mode: LoRA alpha (scale = alpha / rank)")
    lora_mlp: bool = field(False, "adapter mode: adapt the MLPs too, not only attention")
    timestep_sampling: str = field("logit-normal", "noise level per pair: logit-normal or uniform, drawn on the "
                                                   "base scheduler's 1000-step grid")
    logit_mean: float = field(0.0, "logit-normal mean")
    logit_std: float = field(1.0, "logit-normal std")
    timestep_shift: float = field(0.0, "shift of the noise levels, as the scheduler's: 0 means the base model's own "
                                       "(3 for SD3.5, median sigma 0.75); 1 is no shift")
    lr: float = field(1e-4, "AdamW learning rate")
    weight_decay: float = field(0.01, "AdamW weight decay")
    warmup_steps: int = field(0, "linear learning-rate warm-up steps")
    grad_clip: float = field(1.0, "gradient norm clip (0: off)")
    batch_size: int = field(8, "pairs per optimizer step, over all processes")
    max_steps: int = field(1000, "optimizer steps")
    precision: str = field("bf16", "bf16 (autocast on GPU) or fp32")
    grad_checkpointing: bool = field(False, "recompute block activations in backward to save memory")
    head_dropout: float = field(0.1, "dropout in the head's MLP")
    holdout: float = field(0.1, "fraction of pairs held out for evaluation")
    eval_every: int = field(100, "evaluate every N steps")
    save_every: int = field(200, "write a resumable checkpoint every N steps")
    log_every: int = field(10, "write a metrics row every N steps")
    seed: int = field(0, "seed for the split, noise levels, noise and init")
    resume: bool = field(False, "continue the run in `out` exactly where it stopped")

    def validate(self) -> None:
        from .images import check_resolution

        if not self.base:
            raise ConfigError("base: required (an SD3/SD3.5 checkpoint or diffusion model)")
        if not self.data:
            raise ConfigError("data: required (a pairs .json/.jsonl or pre-encoded .safetensors)")
        for name in ("base", "data", "vae", *(["clip"] if self.clip else [])):
            paths = getattr(self, name) if name == "clip" else [getattr(self, name)]
            for p in paths:
                if p and not Path(p).is_file():
                    raise ConfigError(f"{name}: {p} is a folder; expected a file" if Path(p).is_dir()
                                      else f"{name}: file {p} does not exist")
        try:
            check_resolution(self.resolution)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        choices = {"mode": ("adapter", "full", "head"), "timestep_sampling": ("logit-normal", "uniform"),
                   "precision": ("bf16", "fp32"), "on_bad_image": ("stop", "skip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        positive = ("batch_size", "max_steps", "eval_every", "save_every", "log_every", "lora_rank", "t5_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.timestep_shift < 0:
            raise ConfigError(f"timestep_shift: expected > 0, or 0 for the base model's own, got {self.timestep_shift}")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"holdout: expected a fraction in (0, 1), got {self.holdout}")
        for name in ("blocks", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected >= 0, got {getattr(self, name)}")
        check_ranges(self, {"lr": (lambda v: v > 0, "> 0"), "weight_decay": (lambda v: v >= 0, ">= 0"),
                            "grad_clip": (lambda v: v >= 0, ">= 0 (0: off)"),
                            "head_dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
                            "lora_alpha": (lambda v: v > 0, "> 0"), "logit_std": (lambda v: v > 0, "> 0"),
                            "seed": (lambda v: v >= 0, ">= 0")})
        check_out_dir(self, RESUMABLE)
