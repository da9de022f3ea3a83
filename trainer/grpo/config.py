"""`trainer grpo`'s settings: every field is a flag and a TOML key, checked before any model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator

from ..config import ConfigError, Resolution, Settings, check_files, field
from ..runs import check_out_dir

RESUMABLE = {"iterations", "eval_every", "save_every", "resume", "peft_export"}


class GRPOConfig(Settings):
    base: str = field("", "SD3/SD3.5 model: a ComfyUI checkpoint or a diffusion-model .safetensors")
    vae: str = field("", "VAE .safetensors for the eval grids, when the base file has none")
    clip: list[str] = field([], "text encoder files (CLIP-L, CLIP-G, T5-XXL), when the base file has none")
    drm: str = field("", "the DRM checkpoint that gives the rewards (adapter DRMs share the base's weights)")
    prompts: str = field("", "training prompts: .txt (one per line), .jsonl ({\"prompt\": ...}) or a "
                             "pre-encoded .safetensors prompt bank")
    eval_prompts: str = field("", "evaluation prompts, same formats (default: the first 4 training prompts)")
    out: str = field("runs/grpo", "output directory: LoRAs, checkpoints, metrics.csv, reward curve, eval grids")
    algorithm: Literal["step-grpo", "grpo"] = field(
        "step-grpo", "step-grpo (dense per-step DRM rewards) or grpo (Flow-GRPO baseline)")
    resolution: Resolution = field(512, "image size in pixels (multiple of 16)")
    steps: int = field(10, "rollout steps T", ge=1)
    scheduler: str = field("normal", "ComfyUI scheduler of the rollout sigmas; normal reproduces Flow-GRPO's "
                                     "(diffusers FlowMatchEuler, shift 3); its last step, to sigma 0, is short and deterministic (never trained)")
    eta: float = field(0.7, "SDE noise level a of the rollouts", le=2,
                       expected="at most 2 (Flow-GRPO uses 0.7; larger steps diverge)")
    cfg: float = field(4.5, "classifier-free guidance of rollouts and log-probs (1: no CFG, half the cost)",
                       ge=0, le=100, expected="a guidance scale in [0, 100]")
    t5_length: int = field(77, "text prompts: T5 tokens are padded to at least this many (ComfyUI's default 77; "
                               "Flow-GRPO uses 128); set the same in ComfyUI's T5TokenizerOptions when sampling", ge=1)
    branches: int = field(4, "step-grpo: K siblings drawn from each parent")
    group: int = field(4, "grpo: G trajectories per prompt")
    train_steps: Literal["all", "window", "random"] = field(
        "all", "which steps train: all, window (window_start..window_end) or random")
    window_start: int = field(0, "train_steps = window: first trained step")
    window_end: int = field(0, "train_steps = window: end (exclusive); 0 means steps")
    random_steps: int = field(3, "train_steps = random: trained steps drawn per iteration", ge=1)
    clip_range: float = field(1e-4, "PPO clip range of the probability ratio (of per-element mean log-probs, "
                                    "as Flow-GRPO)", gt=0)
    advantage_std: Literal["auto", "group", "global"] = field(
        "auto", "what advantages are divided by: group (the std within each group of siblings or trajectories), "
                "global (the std of all the batch's rewards, Flow-GRPO's global_std), or auto: global for grpo, "
                "group for step-grpo")
    advantage_clip: float = field(5.0, "advantages are clamped to +-this, as Flow-GRPO's adv_clip_max (0: off)",
                                  ge=0, expected=">= 0 (0: off)")
    kl_beta: float = field(0.0, "weight of Flow-GRPO's KL to the reference model (the LoRA off); 0 is off",
                           ge=0, expected=">= 0 (0: no KL)")
    lora_rank: int = field(32, "LoRA rank", ge=1)
    lora_alpha: float = field(64.0, "LoRA alpha (ComfyUI applies alpha / rank)", gt=0)
    lora_mlp: bool = field(False, "also adapt the MLPs, not only joint attention")
    lr: float = field(3e-4, "AdamW learning rate", gt=0)
    warmup_steps: int = field(0, "linear learning-rate warm-up iterations (0: constant, as Flow-GRPO)", ge=0)
    weight_decay: float = field(1e-4, "AdamW weight decay", ge=0)
    grad_clip: float = field(1.0, "gradient norm clip (0: off)", ge=0, expected=">= 0 (0: off)")
    batch_size: int = field(4, "prompts per rollout, over all processes", ge=1)
    grad_accum: int = field(1, "rollouts per optimizer step", ge=1)
    grad_checkpointing: bool = field(False, "recompute each joint block's activations in the backward pass: less "
                                            "memory for about one more forward pass per trained step")
    ema: float = field(0.0, "EMA decay of the LoRA weights used for eval and export (0: off)", ge=0, lt=1,
                       expected="0 <= ema < 1")
    iterations: int = field(100, "optimizer steps", ge=1)
    eval_every: int = field(10, "evaluate every N iterations (and at the start and the end)", ge=1)
    eval_seeds: int = field(2, "seeds per eval prompt", ge=1)
    save_every: int = field(10, "write a resumable checkpoint and a LoRA every N iterations", ge=1)
    seed: int = field(0, "seed of prompts order, noise and init", ge=0)
    peft_export: bool = field(False, "also write the LoRA in diffusers/peft names")
    resume: bool = field(False, "continue the run in `out` exactly where it stopped")

    @field_validator("steps")
    @classmethod
    def _a_step_trains(cls, steps: int) -> int:
        if steps < 2:
            raise ConfigError("steps: expected >= 2 (the last step, to sigma 0, is deterministic and never trains)")
        return steps

    @field_validator("eta")
    @classmethod
    def _stochastic(cls, eta: float) -> float:
        if eta <= 0:
            raise ConfigError(f"eta: GRPO needs stochastic rollouts, so eta > 0; got {eta}")
        return eta

    def validate(self) -> None:
        """Everything a run needs, before any model loads, in this order: the files (prompt files read), every
        value again, the rules between fields, the DRM against the base, the output folder. Raises ConfigError.

        The rules between fields wait for validate(): a config made with an untrainable window still says
        which steps it would train (trained_steps).
        """
        check_files(self, {"base": "", "drm": "", "prompts": ""}, ("eval_prompts", "vae", "clip"))
        check_prompt_files(self)
        super().validate()
        if self.algorithm == "step-grpo" and self.branches < 2:
            raise ConfigError(f"branches: step-grpo normalises rewards within K siblings, so K >= 2; got {self.branches}")
        if self.algorithm == "grpo" and self.group < 2:
            raise ConfigError(f"group: grpo normalises rewards within G trajectories, so G >= 2; got {self.group}")
        end = self.window_end or self.steps
        # the last step (to sigma 0) is deterministic, so a window must hold an earlier one
        if self.train_steps == "window" and not (0 <= self.window_start < min(end, self.steps - 1)
                                                 and end <= self.steps):
            raise ConfigError(f"window_start/window_end: expected 0 <= start < end <= steps ({self.steps}) with a "
                              f"step before the last one, got {self.window_start}..{end}")
        check_drm_fits_base(self.drm, self.base)
        check_out_dir(self, RESUMABLE)


def check_prompt_files(cfg: GRPOConfig) -> None:
    """Prompt files are read (not yet encoded) before any model loads: a wrong kind or no prompts fails here."""
    from ..prompts import read_prompt_texts
    from ..reward.pairs import DatasetError

    for name in ("prompts", "eval_prompts"):
        path = Path(getattr(cfg, name))
        if not getattr(cfg, name) or path.suffix == ".safetensors":
            continue
        if path.suffix not in (".txt", ".jsonl"):
            raise ConfigError(f"{name}: {path.name} is neither .txt, .jsonl nor a pre-encoded .safetensors prompt bank")
        try:
            read_prompt_texts(path)
        except DatasetError as e:
            raise ConfigError(f"{name}: {e}") from None


def _header_shapes(path: str) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a bad file
        raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None


def check_drm_fits_base(drm_path: str, base_path: str) -> None:
    """Refuse, before any model loads, a DRM whose latent channels, patch, width or text widths differ from the
    base's (drm.fit, read from the two files' headers)."""
    from drm.fit import Shapes, shape_differences

    drm, base = _header_shapes(drm_path), _header_shapes(base_path)
    prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in base) else ""
    drm_shapes = Shapes.of_state_dict(drm)
    differences = shape_differences(drm_shapes, Shapes.of_state_dict(base, prefix))
    if differences:
        what, key = differences[0].what, drm_shapes.sources[differences[0].name]
        raise ConfigError(f"drm: {Path(drm_path).name} does not fit the base model ({what}: {key} is "
                          f"{drm[key]} in the DRM, {base.get(prefix + key)} in the base); use a DRM trained for it")
