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
from pathlib import Path

import torch

from drm.files import atomic_path

from ..config import ConfigError, shareable_dict
from ..runs import (
    RunInterrupted,
    append_csv,
    load_checkpoint,
    remove_files_after,
    rewind_metrics,
    save_checkpoint,
    stop_on_signals,
    warmup_scheduler,
    write_run_file,
)
from .config import GRPOConfig


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
    from drm.files import atomic_save

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

    from ..models import load_base
    from ..prompts import load_prompt_bank
    from .loss import group_advantages
    from .policy import Policy
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
