"""`trainer drm`'s settings: every field is a flag and a TOML key, checked before any model loads."""

from __future__ import annotations

import math
import re
from typing import Literal

from ..config import ConfigError, Resolution, Settings, check_files, field
from ..runs import check_out_dir

RESUMABLE = {"max_steps", "epochs", "eval_every", "save_every", "log_every", "resume"}  # may change on --resume

LARGE_DEPTH = 38  # SD3.5-Large's joint blocks; SD3.5-Medium has 24
# The DRM authors' SD3.5-Large training (jjaxonx/DRM@5c3c101 scripts/train_sd35_large.sh): uniform noise levels
# (:17), shift 1 (:18; train.py:146-150 sets shift 1.0), gradient checkpointing (:21). Medium keeps the defaults.
LARGE_DEFAULTS = {"timestep_sampling": "uniform", "timestep_shift": 1.0, "grad_checkpointing": True}
# --recipe authors: every other value of the authors' training (train.py and scripts/train_sd35_*.sh at 5c3c101)
AUTHORS_RECIPE = {
    "mode": "full",  # train.py:330-334 (the whole MMDiT and the head)
    "lr": 1e-5, "warmup_steps": 0,  # train.py:96-98 (constant; the warm-up is ignored by "constant")
    "weight_decay": 1e-4, "grad_clip": 1.0,  # train.py:104, :106
    "min_confidence": 0.95,  # train.py:140, scripts :16 (pairs without a confidence are kept: dataset.py:48-49)
    "resolution": 512, "precision": "bf16",  # scripts :13, medium :20 / large :23
    "t5_length": 512, "prompt_text": "plain",  # train.py:80, 166-192
    "image_resize": "squash", "vae_latent": "sample",  # dataset.py:79-80; train.py:490, 505
    "seed": 42,  # train.py:82
}
AUTHORS_BATCH = {LARGE_DEPTH: 8}  # pairs per step: large.sh:9, 19-20 (1 x 8 GPUs); else medium.sh:9, 17-18 (2 x 8)
AUTHORS_BATCH_OTHER = 16


class DRMTrainConfig(Settings):
    base: str = field("", "SD3/SD3.5 model: a ComfyUI checkpoint or a diffusion-model .safetensors")
    data: str = field("", "preference pairs (.json/.jsonl: prompt, path1 preferred, path2, confidence) "
                          "or pre-encoded pairs (.safetensors)")
    out: str = field("runs/drm", "output directory: checkpoints, metrics.csv, curves.png, the DRM file")
    vae: str = field("", "VAE .safetensors, when the base file has none (image data only)")
    clip: list[str] = field([], "text encoder files (CLIP-L, CLIP-G, T5-XXL), when the base file has none")
    resolution: Resolution = field(512, "training resolution in pixels (multiple of 16)")
    t5_length: int = field(77, "image data: T5 tokens are padded to at least this many (ComfyUI's default 77; the "
                               "DRM authors use 512); recorded in the DRM file, for ComfyUI's T5TokenizerOptions", ge=1)
    prompt_text: Literal["comfyui", "plain"] = field(
        "comfyui", "image data: comfyui encodes prompts as ComfyUI's CLIPTextEncode does (\"(red)\" is red at weight "
                   "1.1; long prompts get more 77-token CLIP chunks); plain as the DRM authors: plain text, CLIP cut "
                   "at 77 tokens, T5 cut at t5_length", expected="one of ('comfyui', 'plain')")
    image_resize: Literal["crop", "squash"] = field(
        "crop", "image data: crop scales the shorter side to resolution and crops the centre; squash resizes "
                "straight to the square in 8-bit Pillow, alpha dropped, as the DRM authors",
        expected="one of ('crop', 'squash')")
    vae_latent: Literal["mean", "sample"] = field(
        "mean", "image data: mean trains on the VAE posterior's mean (what ComfyUI's VAE Encode gives); sample "
                "draws a fresh posterior sample each time a latent is used, as the DRM authors",
        expected="one of ('mean', 'sample')")
    min_confidence: float = field(0.0, "drop pairs whose confidence is below this")
    on_bad_image: Literal["stop", "skip"] = field("stop", "a missing or unreadable image: stop, or skip the pair",
                                                  expected="one of ('stop', 'skip')")
    cache_dir: str = field("", "where encoded latents and prompts are cached (default: <out>/cache)")
    mode: Literal["adapter", "full", "head"] = field("adapter", "adapter | full | head",
                                                     expected="one of ('adapter', 'full', 'head')")
    blocks: int = field(0, "joint blocks the DRM keeps; 0 means the DRM authors' count: 21 of SD3.5-Medium's 24, "
                           "33 of SD3.5-Large's 38, depth - 3 for any other base", ge=0)
    lora_rank: int = field(32, "adapter mode: LoRA rank", ge=1)
    lora_alpha: float = field(32.0, "adapter mode: LoRA alpha (scale = alpha / rank)", gt=0)
    lora_mlp: bool = field(False, "adapter mode: adapt the MLPs too, not only attention")
    timestep_sampling: Literal["logit-normal", "uniform"] = field(
        "logit-normal", "noise level per pair: logit-normal or uniform, drawn on the base scheduler's 1000-step grid; "
                        "unset, uniform for SD3.5-Large (depth 38), as the DRM authors",
        expected="one of ('logit-normal', 'uniform')")
    logit_mean: float = field(0.0, "logit-normal mean")
    logit_std: float = field(1.0, "logit-normal std", gt=0)
    timestep_shift: float = field(0.0, "shift of the noise levels, as the scheduler's: 0 means the base model's own "
                                       "(3 for SD3.5, median sigma 0.75); 1 is no shift; unset, 1 for "
                                       "SD3.5-Large (depth 38), as the DRM authors",
                                  ge=0, expected="> 0, or 0 for the base model's own")
    lr: float = field(1e-4, "AdamW learning rate", gt=0)
    weight_decay: float = field(0.01, "AdamW weight decay", ge=0)
    warmup_steps: int = field(0, "linear learning-rate warm-up steps", ge=0)
    grad_clip: float = field(1.0, "gradient norm clip (0: off)", ge=0, expected=">= 0 (0: off)")
    batch_size: int = field(8, "pairs per optimizer step, over all processes", ge=1)
    max_steps: int = field(1000, "optimizer steps (unless epochs is set)", ge=1)
    epochs: int = field(0, "when > 0, max_steps = ceil(epochs x training pairs / batch_size), the pairs counted after "
                           "min_confidence and the holdout; 0 uses max_steps", ge=0)
    precision: Literal["bf16", "fp32"] = field("bf16", "bf16 (autocast on GPU) or fp32",
                                               expected="one of ('bf16', 'fp32')")
    grad_checkpointing: bool = field(False, "recompute block activations in backward to save memory; unset, on for "
                                            "SD3.5-Large (depth 38), as the DRM authors")
    head_dropout: float = field(0.1, "dropout in the head's MLP", ge=0, lt=1, expected="a probability in [0, 1)")
    holdout: float = field(0.1, "fraction of pairs held out for evaluation", gt=0, lt=1,
                           expected="a fraction in (0, 1)")
    eval_every: int = field(100, "evaluate every N steps", ge=1)
    save_every: int = field(200, "write a resumable checkpoint every N steps", ge=1)
    log_every: int = field(10, "write a metrics row every N steps", ge=1)
    seed: int = field(0, "seed for the split, noise levels, noise and init", ge=0)
    recipe: Literal["", "authors"] = field(
        "", "authors: every setting left unset takes the DRM authors' value (README: trainer drm's defaults): mode "
            "full, lr 1e-5, weight_decay 1e-4, min_confidence 0.95, batch_size 16 (8 for SD3.5-Large), epochs 1, "
            "seed 42, t5_length 512, prompt_text plain, image_resize squash, vae_latent sample (default: '', the "
            "defaults shown here)", expected="'' or 'authors'")
    resume: bool = field(False, "continue the run in `out` exactly where it stopped")

    def validate(self) -> None:
        """Everything a run needs, before any model loads: the files, every value again, the output folder.
        Raises ConfigError naming the field."""
        check_files(self, {"base": "an SD3/SD3.5 checkpoint or diffusion model",
                           "data": "a pairs .json/.jsonl or pre-encoded .safetensors"}, ("vae", "clip"))
        super().validate()
        if self.epochs and "max_steps" in self.model_fields_set:
            raise ConfigError(f"epochs: {self.epochs} sets max_steps from the number of pairs, and max_steps is set "
                              f"too ({self.max_steps}); give one of them")
        check_out_dir(self.resolved(base_depth(self.base)), RESUMABLE)

    def resolved(self, depth: int) -> DRMTrainConfig:
        """This config with the per-model and recipe defaults filled in for the fields the user did not set (from
        TOML or flags: model_fields_set), for a base of `depth` joint blocks: LARGE_DEFAULTS at depth 38, and with
        recipe authors, AUTHORS_RECIPE, its batch size and epochs 1 (unless max_steps is set). Resolving again
        changes nothing; the same settings and base always resolve the same, so --resume compares like with like."""
        fill = dict(LARGE_DEFAULTS) if depth == LARGE_DEPTH else {}
        if self.recipe == "authors":
            fill.update(AUTHORS_RECIPE, batch_size=AUTHORS_BATCH.get(depth, AUTHORS_BATCH_OTHER))
            if "max_steps" not in self.model_fields_set:
                fill["epochs"] = 1  # scripts :22 / :25
        unset = {k: v for k, v in fill.items() if k not in self.model_fields_set}
        return self.model_copy(update=unset) if unset else self

    def with_epochs(self, train_pairs: int) -> DRMTrainConfig:
        """With epochs > 0, this config with max_steps = ceil(epochs x train_pairs / batch_size); else itself."""
        if not self.epochs:
            return self
        return self.model_copy(update={"max_steps": max(1, math.ceil(self.epochs * train_pairs / self.batch_size))})


def base_depth(path: str) -> int:
    """Joint blocks of the base model at `path` (a ComfyUI checkpoint or a bare diffusion model), read from its
    safetensors header alone; 0 when the file cannot be read that way (loading the base then says why)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError):
        return 0
    indices = [int(m.group(1)) for m in (re.search(r"(?:^|\.)joint_blocks\.(\d+)\.", k) for k in keys) if m]
    return max(indices) + 1 if indices else 0
