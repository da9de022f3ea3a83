"""`trainer grpo`'s settings: every field is a flag and a TOML key, checked before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, check_ranges, field
from ..runs import check_out_dir

RESUMABLE = {"iterations", "eval_every", "save_every", "resume", "peft_export"}


@dataclass
class GRPOConfig:
    base: str = field("", "SD3/SD3.5 model: a ComfyUI checkpoint or a diffusion-model .safetensors")
    vae: str = field("", "VAE .safetensors for the eval grids, when the base file has none")
    clip: list[str] = field([], "text encoder files (CLIP-L, CLIP-G, T5-XXL), when the base file has none")
    drm: str = field("", "the DRM checkpoint that gives the rewards (adapter DRMs share the base's weights)")
    prompts: str = field("", "training prompts: .txt (one per line), .jsonl ({\"prompt\": ...}) or a "
                             "pre-encoded .safetensors prompt bank")
    eval_prompts: str = field("", "evaluation prompts, same formats (default: the first 4 training prompts)")
    out: str = field("runs/grpo", "output directory: LoRAs, checkpoints, metrics.csv, reward curve, eval grids")
    algorithm: str = field("step-grpo", "step-grpo (dense per-step DRM rewards) or grpo (Flow-GRPO baseline)")
    resolution: int = field(512, "image size in pixels (multiple of 16)")
    steps: int = field(10, "rollout steps T")
    scheduler: str = field("normal", "ComfyUI scheduler of the rollout sigmas; normal reproduces Flow-GRPO's "
                                     "(diffusers FlowMatchEuler, shift 3); its last step, to sigma 0, is short and deterministic (never trained)")
    eta: float = field(0.7, "SDE noise level a of the rollouts")
    cfg: float = field(4.5, "classifier-free guidance of rollouts and log-probs (1: no CFG, half the cost)")
    t5_length: int = field(77, "text prompts: T5 tokens are padded to at least this many (ComfyUI's default 77; "
                               "Flow-GRPO uses 128); set the same in ComfyUI's T5TokenizerOptions when sampling")
    branches: int = field(4, "step-grpo: K siblings drawn from each parent")
    group: int = field(4, "grpo: G trajectories per prompt")
    train_steps: str = field("all", "which steps train: all, window (window_start..window_end) or random")
    window_start: int = field(0, "train_steps = window: first trained step")
    window_end: int = field(0, "train_steps = window: end (exclusive); 0 means steps")
    random_steps: int = field(3, "train_steps = random: trained steps drawn per iteration")
    clip_range: float = field(1e-4, "PPO clip range of the probability ratio (of per-element mean log-probs, "
                                    "as Flow-GRPO)")
    advantage_std: str = field("auto", "what advantages are divided by: group (the std within each group of "
                                       "siblings or trajectories), global (the std of all the batch's rewards, "
                                       "Flow-GRPO's global_std), or auto: global for grpo, group for step-grpo")
    advantage_clip: float = field(5.0, "advantages are clamped to +-this, as Flow-GRPO's adv_clip_max (0: off)")
    kl_beta: float = field(0.0, "weight of Flow-GRPO's KL to the reference model (the LoRA off); 0 is off")
    lora_rank: int = field(32, "LoRA rank")
    lora_alpha: float = field(64.0, "LoRA alpha (ComfyUI applies alpha / rank)")
    lora_mlp: bool = field(False, "also adapt the MLPs, not only joint attention")
    lr: float = field(3e-4, "AdamW learning rate")
    warmup_steps: int = field(0, "linear learning-rate warm-up iterations (0: constant, as Flow-GRPO)")
    weight_decay: float = field(1e-4, "AdamW weight decay")
    grad_clip: float = field(1.0, "gradient norm clip (0: off)")
    batch_size: int = field(4, "prompts per rollout, over all processes")
    grad_accum: int = field(1, "rollouts per optimizer step")
    ema: float = field(0.0, "EMA decay of the LoRA weights used for eval and export (0: off)")
    iterations: int = field(100, "optimizer steps")
    eval_every: int = field(10, "evaluate every N iterations (and at the start and the end)")
    eval_seeds: int = field(2, "seeds per eval prompt")
    save_every: int = field(10, "write a resumable checkpoint and a LoRA every N iterations")
    seed: int = field(0, "seed of prompts order, noise and init")
    peft_export: bool = field(False, "also write the LoRA in diffusers/peft names")
    resume: bool = field(False, "continue the run in `out` exactly where it stopped")

    def validate(self) -> None:
        from ..reward.images import check_resolution

        for name in ("base", "drm", "prompts"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required")
        for name in ("base", "drm", "prompts", "eval_prompts", "vae", *(["clip"] if self.clip else [])):
            for p in (self.clip if name == "clip" else [getattr(self, name)]):
                if p and not Path(p).is_file():
                    raise ConfigError(f"{name}: {p} is a folder; expected a file" if Path(p).is_dir()
                                      else f"{name}: file {p} does not exist")
        try:
            check_resolution(self.resolution)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_prompt_files(self)
        if self.algorithm not in ("step-grpo", "grpo"):
            raise ConfigError(f"algorithm: expected step-grpo or grpo, got {self.algorithm!r}")
        if self.algorithm == "step-grpo" and self.branches < 2:
            raise ConfigError(f"branches: step-grpo normalises rewards within K siblings, so K >= 2; got {self.branches}")
        if self.algorithm == "grpo" and self.group < 2:
            raise ConfigError(f"group: grpo normalises rewards within G trajectories, so G >= 2; got {self.group}")
        if self.advantage_std not in ("auto", "group", "global"):
            raise ConfigError(f"advantage_std: expected auto, group or global, got {self.advantage_std!r}")
        if self.advantage_clip < 0:
            raise ConfigError(f"advantage_clip: expected >= 0 (0: off), got {self.advantage_clip}")
        if self.train_steps not in ("all", "window", "random"):
            raise ConfigError(f"train_steps: expected all, window or random, got {self.train_steps!r}")
        for name in ("steps", "batch_size", "grad_accum", "iterations", "eval_every", "save_every", "eval_seeds",
                     "lora_rank", "random_steps", "t5_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.steps < 2:
            raise ConfigError("steps: expected >= 2 (the last step, to sigma 0, is deterministic and never trains)")
        end = self.window_end or self.steps
        # the last step (to sigma 0) is deterministic, so a window must hold an earlier one
        if self.train_steps == "window" and not (0 <= self.window_start < min(end, self.steps - 1)
                                                 and end <= self.steps):
            raise ConfigError(f"window_start/window_end: expected 0 <= start < end <= steps ({self.steps}) with a "
                              f"step before the last one, got {self.window_start}..{end}")
        if self.eta <= 0:
            raise ConfigError(f"eta: GRPO needs stochastic rollouts, so eta > 0; got {self.eta}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema: expected 0 <= ema < 1, got {self.ema}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: expected >= 0, got {self.warmup_steps}")
        check_ranges(self, {"lr": (lambda v: v > 0, "> 0"), "weight_decay": (lambda v: v >= 0, ">= 0"),
                            "grad_clip": (lambda v: v >= 0, ">= 0 (0: off)"), "clip_range": (lambda v: v > 0, "> 0"),
                            "kl_beta": (lambda v: v >= 0, ">= 0 (0: no KL)"),
                            "eta": (lambda v: v <= 2, "at most 2 (Flow-GRPO uses 0.7; larger steps diverge)"),
                            "cfg": (lambda v: 0 <= v <= 100, "a guidance scale in [0, 100]"),
                            "lora_alpha": (lambda v: v > 0, "> 0"), "seed": (lambda v: v >= 0, ">= 0")})
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
    """Refuse, before any model loads, a DRM whose latent channels, width or text context differ from the base's."""
    drm, base = _header_shapes(drm_path), _header_shapes(base_path)
    prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in base) else ""
    checks = [("x_embedder.proj.weight", "latent channels and width"), ("context_embedder.weight", "text context"),
              ("final_layer.linear.weight", "width")]
    for key, what in checks:
        if key in drm and prefix + key in base and drm[key] != base[prefix + key]:
            raise ConfigError(f"drm: {Path(drm_path).name} does not fit the base model ({what}: {key} is "
                              f"{drm[key]} in the DRM, {base[prefix + key]} in the base); use a DRM trained for it")
