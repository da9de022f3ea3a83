"""`python -m trainer grpo`: Step-wise GRPO (dense DRM rewards per step) or Flow-GRPO, writing a ComfyUI LoRA.

One readable loop: roll out with the current policy (no gradient), then one optimizer step on the
clipped policy loss of what the rollout recorded. Step-GRPO branches K siblings from one parent at
each trained step and normalises their DRM scores within the siblings; GRPO samples G trajectories
per prompt and normalises their terminal DRM rewards within the group.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from drm.checkpoint import atomic_path

from .config import ConfigError, check_ranges, field, shareable_dict
from .runs import (
    RunInterrupted,
    append_csv,
    check_out_dir,
    load_checkpoint,
    remove_files_after,
    rewind_metrics,
    save_checkpoint,
    stop_on_signals,
    warmup_scheduler,
    write_run_file,
)

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
        from .data import check_resolution

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
    from .data import DatasetError
    from .prompts import read_prompt_texts

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


def resolved_advantage_std(cfg: GRPOConfig) -> str:
    """group or global: auto is Flow-GRPO's global std for grpo, the paper's within-siblings std for step-grpo."""
    if cfg.advantage_std != "auto":
        return cfg.advantage_std
    return "global" if cfg.algorithm == "grpo" else "group"


def trained_steps(cfg: GRPOConfig, iteration: int) -> set[int]:
    """The steps whose actions train this iteration (never the last, deterministic one)."""
    trainable = range(cfg.steps - 1)
    if cfg.train_steps == "window":
        return {i for i in trainable if cfg.window_start <= i < (cfg.window_end or cfg.steps)}
    if cfg.train_steps == "random":
        order = torch.randperm(len(trainable), generator=torch.Generator().manual_seed(cfg.seed * 7919 + iteration))
        return {int(i) for i in order[: cfg.random_steps]}
    return set(trainable)


def prompt_generators(cfg: GRPOConfig, iteration: int, micro: int, positions: range) -> list[torch.Generator]:
    """One generator per prompt, from (seed, iteration, micro-batch, global position) only."""
    return [torch.Generator().manual_seed(((cfg.seed * 100_003 + iteration) * 101 + micro) * 10_007 + p)
            for p in positions]


# ---- evaluation and pictures ----

@torch.no_grad()
def evaluate(policy, drm, bank, cfg: GRPOConfig, sigmas, shape, device) -> tuple[float, torch.Tensor]:
    """Mean DRM reward of ODE samples (eta = 0) for every eval prompt and seed, and the samples."""
    from .rollout import cfg_predict

    rows = torch.arange(len(bank)).repeat(cfg.eval_seeds)
    cond = bank_conditioning(bank.rows(rows), device)
    gen = torch.Generator().manual_seed(12345)  # the same noise at every evaluation
    x = torch.randn((len(rows), *shape), generator=gen).to(device)
    for i in range(len(sigmas) - 1):
        denoised, _ = cfg_predict(policy, x, float(sigmas[i]), cond, cfg.cfg)
        x = x + (x - denoised) / float(sigmas[i]) * (float(sigmas[i + 1]) - float(sigmas[i]))
    return drm_reward(drm, cond, x, 0.0).mean().item(), x


def bank_conditioning(bank, device):
    """A prompt bank's rows as the rollout's Conditioning, on `device`."""
    from .rollout import Conditioning

    lengths = None if bank.context_length is None else bank.context_length.to(device)
    return Conditioning(bank.context.to(device), bank.pooled.to(device), bank.negative_context.to(device),
                        bank.negative_pooled.to(device), lengths)


def drm_reward(drm, cond, x: torch.Tensor, sigma) -> torch.Tensor:
    """DRM scores [B] of latents x [B, ...] at noise level sigma, row b scored against cond's prompt b at its
    own length (zero padding would change the score).

    A DRM whose file recommends a noise level (DiNa-LRM: 0.4) scores latents below it noised forward to it,
    as its authors score clean latents; every row gets the same noise, so rewards compare the latents.
    """
    from drm.conditioning import by_context_length
    from drm.sde import renoise

    level = drm.recommended_noise_sigma()
    if level > float(sigma):
        noise = torch.randn((1, *x.shape[1:]), generator=torch.Generator().manual_seed(0))
        x, sigma = renoise(x, float(sigma), level, noise), level
    return by_context_length(lambda context, x, pooled: drm.score(x, sigma, context, pooled),
                             cond.context, cond.context_length, x, cond.pooled)


@torch.no_grad()  # ComfyUI's VAE keeps requires_grad on its weights; a decode would build a graph
def save_grid(latents: torch.Tensor, base, path: Path, columns: int) -> None:
    """A PNG grid: VAE-decoded when the base has a VAE, else ComfyUI's latent RGB preview factors."""
    from PIL import Image

    latent_format = base.model.get_model_object("latent_format")
    if base.vae is not None:
        images = base.vae.decode(latent_format.process_out(latents.cpu())).clamp(0, 1)
    else:
        factors = torch.tensor(latent_format.latent_rgb_factors)
        bias = torch.tensor(latent_format.latent_rgb_factors_bias or [0.0, 0.0, 0.0])
        rgb = torch.einsum("bchw,cr->bhwr", latent_format.process_out(latents.cpu().float()), factors) + bias
        images = ((rgb + 1) / 2).clamp(0, 1)
        images = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), scale_factor=8, mode="nearest")
        images = images.permute(0, 2, 3, 1)
    b, h, w, _ = images.shape
    rows = math.ceil(b / columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        tile = Image.fromarray((image.numpy() * 255).round().astype("uint8"))
        grid.paste(tile, ((i % columns) * w, (i // columns) * h))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def reward_curve_png(metrics_csv: Path, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with metrics_csv.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    train = [(int(r["iteration"]), float(r["reward"])) for r in rows if r["reward"]]
    evals = [(int(r["iteration"]), float(r["eval_reward"])) for r in rows if r["eval_reward"]]
    if train:
        ax.plot(*zip(*train), alpha=0.5, label="rollout reward (DRM)")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval reward (DRM, ODE samples)")
    ax.set_xlabel("iteration (optimizer step)")
    ax.set_ylabel("DRM reward (reward units)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ---- LoRA export and checkpoints ----

def lora_metadata(cfg: GRPOConfig, base_name: str, iteration: int) -> dict[str, str]:
    return {"drm.base_model": base_name, "drm.lora_rank": str(cfg.lora_rank), "drm.lora_alpha": str(cfg.lora_alpha),
            "drm.algorithm": cfg.algorithm, "drm.steps": str(iteration), "drm.reward_model": Path(cfg.drm).name,
            "drm.config": json.dumps(shareable_dict(cfg))}


def export_lora(lora, cfg: GRPOConfig, base_name: str, iteration: int, path: Path) -> None:
    from drm.checkpoint import atomic_save

    atomic_save(lora.state_dict_comfy(), path, lora_metadata(cfg, base_name, iteration))
    if cfg.peft_export:
        from .peft_export import peft_state_dict

        atomic_save(peft_state_dict(lora), path.with_name(path.stem + ".peft.safetensors"),
                    lora_metadata(cfg, base_name, iteration))


def save_state(out: Path, lora, ema, optimizer, scheduler, iteration: int) -> None:
    """LoRA, optimizer, scheduler, iteration and EMA: everything --resume needs (rollout noise derives from
    (seed, iteration), so there is no RNG state to keep)."""
    save_checkpoint(out, lora.state_dict(), {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                             "iteration": iteration, "ema": ema})


def load_state(out: Path, lora, optimizer, scheduler) -> tuple[int, list | None]:
    tensors, state = load_checkpoint(out)
    lora.load_state_dict(tensors)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["iteration"], state["ema"]


# ---- the loop ----

def train_grpo(cfg: GRPOConfig) -> dict:
    """Train and write the LoRA; returns the last metrics row.

    Ctrl-C or SIGTERM saves a resumable checkpoint after the current iteration and raises RunInterrupted.
    """
    import comfy.model_management
    import comfy.samplers
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from drm.runtime import load_drm
    from drm.stepwise import schedule_sigmas

    from .grpo_loss import group_advantages
    from .models import load_base
    from .policy import Policy
    from .prompts import load_prompt_bank
    from .rollout import group_rows, policy_loss, rollout_grpo, rollout_step_grpo

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size: {cfg.batch_size} prompts do not split over {world} processes")
    if cfg.scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise ConfigError(f"scheduler: expected one of ComfyUI's {list(comfy.samplers.SCHEDULER_NAMES)}, "
                          f"got {cfg.scheduler!r}")
    out = Path(cfg.out)
    base = load_base(cfg.base, cfg.vae, cfg.clip)
    cache = out / "cache"
    bank = load_prompt_bank(cfg.prompts, base.clip, cache, base.text_encoder_id, cfg.t5_length)
    eval_bank = (load_prompt_bank(cfg.eval_prompts, base.clip, cache, base.text_encoder_id, cfg.t5_length)
                 if cfg.eval_prompts else bank.rows(list(range(min(4, len(bank))))))
    drm = load_drm(cfg.drm, weight_dtype=torch.float32 if device.type == "cpu" else None, base_model=base.model)
    for name, prompts in ((cfg.prompts, bank), (cfg.eval_prompts or cfg.prompts, eval_bank)):
        # the reward model sees prompts padded as in its training (drm.t5_length), or the run is refused
        shortest = prompts.context.shape[1] if prompts.context_length is None else int(prompts.context_length.min())
        drm.check_text_length(prompts.context[:, :shortest], f"prompts {Path(name).name}",
                              fix=f"Pass --t5-length {drm.metadata.get('drm.t5_length')} (text prompts), or a bank "
                                  "encoded with T5 padded that far.")
    policy = Policy(base.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_mlp, device, cfg.seed)
    comfy.model_management.load_models_gpu([base.model, drm.patcher])
    sigmas = schedule_sigmas(base.model.get_model_object("model_sampling"), cfg.scheduler, cfg.steps)
    shape = (16, cfg.resolution // 8, cfg.resolution // 8)

    params = list(policy.lora.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_scheduler(optimizer, cfg.warmup_steps)
    iteration, ema = load_state(out, policy.lora, optimizer, scheduler) if cfg.resume else (0, None)
    if cfg.resume and iteration >= cfg.iterations:
        raise ConfigError(f"iterations: the run in {cfg.out} already finished {iteration} iterations; to train on, "
                          f"resume with --iterations above {iteration}")
    if cfg.ema and ema is None:
        ema = [p.detach().clone() for p in params]
    metrics_file = out / "metrics.csv"
    if accelerator.is_main_process:
        write_run_file(cfg)
        # What was written after the checkpoint (before a kill) is written again from here; a run
        # starting over keeps none of the one before.
        done = iteration if cfg.resume else -1
        rewind_metrics(metrics_file, "iteration", done)
        remove_files_after(out / "eval", r"step(\d+)\.png", done)
        remove_files_after(out / "loras", re.escape(base.name) + r"-(\d+)\.safetensors", done)

    def reward(x, sigma, rows):
        return drm_reward(drm, cond.rows(rows), x, sigma)

    def advantages_of(rewards):
        if resolved_advantage_std(cfg) == "group":
            return group_advantages(rewards)
        # Flow-GRPO's global_std: the std of every process's rewards (all ranks reach this point together)
        return group_advantages(rewards, std_of=accelerator.gather(rewards.contiguous()))

    def run_eval(tag: str) -> float:
        with swapped_in(params, ema):
            value, samples = evaluate(policy, drm, eval_bank, cfg, sigmas, shape, device)
        if accelerator.is_main_process:
            save_grid(samples, base, out / "eval" / f"{tag}.png", columns=len(eval_bank))
        return value

    per_rank = cfg.batch_size // world
    positions = range(rank * per_rank, (rank + 1) * per_rank)
    last: dict = {}
    if iteration == 0:
        last = {"iteration": 0, "eval_reward": run_eval("step0000")}
        if accelerator.is_main_process:
            append_csv(metrics_file, last, COLUMNS)
    bar = tqdm(total=cfg.iterations, initial=iteration, disable=not accelerator.is_main_process, desc=cfg.algorithm)
    stopping = False
    with stop_on_signals() as stop_request, contextlib.closing(bar):
        while iteration < cfg.iterations and not stopping:
            start_time = time.perf_counter()
            forwards_before = policy_forward_rows(policy, drm)
            totals: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                order = torch.randperm(len(bank), generator=torch.Generator().manual_seed(cfg.seed + iteration))
                global_index = order[(torch.arange(cfg.batch_size) + micro * cfg.batch_size) % len(bank)]
                index = global_index[list(positions)]
                cond = bank_conditioning(bank.rows(index), device)
                generators = prompt_generators(cfg, iteration, micro, positions)
                trained = trained_steps(cfg, iteration)
                if cfg.algorithm == "step-grpo":
                    records, _, stats = rollout_step_grpo(policy, reward, cond, generators, sigmas, shape, cfg.cfg,
                                                          cfg.eta, cfg.branches, trained, device, advantages_of)
                    record_cond = cond
                else:
                    records, _, stats = rollout_grpo(policy, reward, cond, generators, sigmas, shape, cfg.cfg,
                                                     cfg.eta, cfg.group, trained, device, advantages_of)
                    record_cond = cond.rows(group_rows(len(generators), cfg.group).to(device))
                losses = policy_loss(policy, records, record_cond, cfg.cfg, cfg.eta, cfg.clip_range, cfg.kl_beta,
                                     scale=1.0 / cfg.grad_accum, advantage_clip=cfg.advantage_clip)
                for key, value in {**stats, **losses}.items():
                    totals[key] = totals.get(key, 0.0) + value / cfg.grad_accum
            if not math.isfinite(totals["loss"]):
                raise ValueError(f"the policy loss is {totals['loss']} at iteration {iteration + 1}, so this step is not "
                                 "applied; the last checkpoint in out is intact. Lower lr, or set clip_range and "
                                 "grad_clip; resume with --resume.")
            if world > 1:  # data parallel over the LoRA parameters: average the gradients
                for p in params:
                    torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                with torch.no_grad():
                    for shadow, p in zip(ema, params):
                        shadow.lerp_(p, 1 - cfg.ema)
            iteration += 1

            reward_key = "step_reward" if cfg.algorithm == "step-grpo" else "terminal_reward"
            row = {"iteration": iteration, "reward": totals[reward_key], "loss": totals["loss"],
                   "ratio": totals["ratio"], "clip_frac": totals["clip_frac"], "kl": totals["kl"],
                   "seconds": time.perf_counter() - start_time}
            row.update({k: v - forwards_before[k] for k, v in policy_forward_rows(policy, drm).items()})
            row = {k: (accelerator.reduce(torch.tensor(float(v), device=device), "mean").item()
                       if k != "iteration" else v) for k, v in row.items()}
            if iteration % cfg.eval_every == 0 or iteration == cfg.iterations:
                row["eval_reward"] = run_eval(f"step{iteration:04d}")
            last = row
            if accelerator.is_main_process:
                append_csv(metrics_file, row, COLUMNS)
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward']:.3f}", loss=f"{row['loss']:.2e}")  # the on-policy loss is ~1e-7
            stopping = stop_request.agreed(accelerator)
            if iteration % cfg.save_every == 0 or stopping:
                _save(accelerator, out, policy, ema, params, optimizer, scheduler, iteration, cfg, base.name)
    if stopping:
        message = f"Interrupted at iteration {iteration}; a checkpoint is saved. Continue with --resume."
        raise RunInterrupted(message)  # the command line prints it; the demo says it in its own words
    _save(accelerator, out, policy, ema, params, optimizer, scheduler, iteration, cfg, base.name)
    if accelerator.is_main_process:
        final = out / f"{base.name}-{cfg.algorithm}.safetensors"
        with swapped_in(params, ema):
            export_lora(policy.lora, cfg, base.name, iteration, final)
        reward_curve_png(metrics_file, out / "reward_curve.png", f"{cfg.algorithm} on {base.name}")
        also = f" (and {final.with_name(final.stem + '.peft.safetensors').name} for diffusers/peft)" if cfg.peft_export else ""
        print(f"LoRA written to {final}{also}; eval reward {last.get('eval_reward', float('nan')):.4f}")
    return last


def policy_forward_rows(policy, drm) -> dict[str, int]:
    """Latent rows pushed through the generator and the DRM so far (the cost counters)."""
    return {"model_rows": policy.forward_rows, "drm_rows": drm.scored_rows}


@contextlib.contextmanager
def swapped_in(params, ema):
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


def _save(accelerator, out, policy, ema, params, optimizer, scheduler, iteration, cfg, base_name) -> None:
    if accelerator.is_main_process:
        # The snapshot first: the checkpoint is what --resume starts after, so a kill between the two
        # must leave the snapshot to be rewritten, never a checkpoint whose snapshot is missing.
        with swapped_in(params, ema):
            export_lora(policy.lora, cfg, base_name, iteration, out / "loras" / f"{base_name}-{iteration:05d}.safetensors")
        save_state(out, policy.lora, ema, optimizer, scheduler, iteration)
    accelerator.wait_for_everyone()


COLUMNS = ["iteration", "reward", "eval_reward", "loss", "ratio", "clip_frac", "kl", "seconds", "model_rows",
           "drm_rows"]
