"""`trainer drm`'s settings: every field is a flag and a TOML key, checked before any model loads."""

from __future__ import annotations

from typing import Literal

from ..config import Resolution, Settings, check_files, field
from ..runs import check_out_dir

RESUMABLE = {"max_steps", "eval_every", "save_every", "log_every", "resume"}  # may change on --resume


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
    blocks: int = field(0, "joint blocks the DRM keeps; 0 means depth - 3 (the paper's SD3.5-M variant)", ge=0)
    lora_rank: int = field(32, "adapter mode: LoRA rank", ge=1)
    lora_alpha: float = field(32.0, "adapter mode: LoRA alpha (scale = alpha / rank)", gt=0)
    lora_mlp: bool = field(False, "adapter mode: adapt the MLPs too, not only attention")
    timestep_sampling: Literal["logit-normal", "uniform"] = field(
        "logit-normal", "noise level per pair: logit-normal or uniform, drawn on the base scheduler's 1000-step grid",
        expected="one of ('logit-normal', 'uniform')")
    logit_mean: float = field(0.0, "logit-normal mean")
    logit_std: float = field(1.0, "logit-normal std", gt=0)
    timestep_shift: float = field(0.0, "shift of the noise levels, as the scheduler's: 0 means the base model's own "
                                       "(3 for SD3.5, median sigma 0.75); 1 is no shift",
                                  ge=0, expected="> 0, or 0 for the base model's own")
    lr: float = field(1e-4, "AdamW learning rate", gt=0)
    weight_decay: float = field(0.01, "AdamW weight decay", ge=0)
    warmup_steps: int = field(0, "linear learning-rate warm-up steps", ge=0)
    grad_clip: float = field(1.0, "gradient norm clip (0: off)", ge=0, expected=">= 0 (0: off)")
    batch_size: int = field(8, "pairs per optimizer step, over all processes", ge=1)
    max_steps: int = field(1000, "optimizer steps", ge=1)
    precision: Literal["bf16", "fp32"] = field("bf16", "bf16 (autocast on GPU) or fp32",
                                               expected="one of ('bf16', 'fp32')")
    grad_checkpointing: bool = field(False, "recompute block activations in backward to save memory")
    head_dropout: float = field(0.1, "dropout in the head's MLP", ge=0, lt=1, expected="a probability in [0, 1)")
    holdout: float = field(0.1, "fraction of pairs held out for evaluation", gt=0, lt=1,
                           expected="a fraction in (0, 1)")
    eval_every: int = field(100, "evaluate every N steps", ge=1)
    save_every: int = field(200, "write a resumable checkpoint every N steps", ge=1)
    log_every: int = field(10, "write a metrics row every N steps", ge=1)
    seed: int = field(0, "seed for the split, noise levels, noise and init", ge=0)
    resume: bool = field(False, "continue the run in `out` exactly where it stopped")

    def validate(self) -> None:
        """Everything a run needs, before any model loads: the files, every value again, the output folder.
        Raises ConfigError naming the field."""
        check_files(self, {"base": "an SD3/SD3.5 checkpoint or diffusion model",
                           "data": "a pairs .json/.jsonl or pre-encoded .safetensors"}, ("vae", "clip"))
        super().validate()
        check_out_dir(self, RESUMABLE)
