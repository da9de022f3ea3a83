"""`python -m trainer grpo`: Step-wise GRPO (dense DRM rewards per step) or Flow-GRPO, writing a ComfyUI LoRA.

One readable loop: roll out with the current policy (no gradient), then one optimizer step on the
clipped policy loss of what the rollout recorded. Step-GRPO branches K siblings from one parent at
each trained step and normalises their DRM scores within the siblings; GRPO samples G trajectories
per prompt and normalises their terminal DRM rewards within the group. Rewards and evaluation are in
evaluate.py, the LoRA and checkpoint files in export.py, the reward curve in trainer/figures.py.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from pathlib import Path

import torch

from ..config import ConfigError
from ..figures import eval_grid_png, reward_curve_png
from ..runs import (
    RunInterrupted,
    WeightWatch,
    append_csv,
    diverged,
    remove_files_after,
    rewind_metrics,
    stop_on_signals,
    use_lr,
    warmup_scheduler,
    write_run_file,
)
from .config import GRPOConfig
from .evaluate import (
    NonFiniteLatents,
    bank_conditioning,
    check_prompt_padding,
    evaluate,
    latent_images,
    prompt_reward,
)
from .export import export_lora, load_state, save_snapshot, swapped_in
from .rollout import group_rows, policy_loss, rollout_grpo, rollout_step_grpo

RENOISE_SEED_OFFSET = 2**62  # a prompt's DRM re-noising draws from another seed than its rollout noise
COLUMNS = ["iteration", "reward", "eval_reward", "loss", "ratio", "clip_frac", "kl", "seconds", "model_rows",
           "drm_rows"]


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
        order = torch.randperm(len(trainable), generator=torch.Generator().manual_seed(run_seed(cfg.seed, 7919, iteration)))
        return {int(i) for i in order[: cfg.random_steps]}
    return set(trainable)


def run_seed(seed: int, stride: int, iteration: int) -> int:
    """A generator seed for `iteration` of the run seeded `seed`: seed * stride + iteration, modulo 2**64
    (torch's seed range), so neighbouring --seed values do not replay each other's iterations shifted by
    one, and any --seed the config accepts works."""
    return (seed * stride + iteration) % 2**64


def prompt_seeds(cfg: GRPOConfig, iteration: int, micro: int, positions: range) -> list[int]:
    """One seed per prompt, from (seed, iteration, micro-batch, global position) only: the same numbers
    however the prompts are split over processes."""
    return [(((cfg.seed * 100_003 + iteration) * 101 + micro) * 10_007 + p) % 2**64 for p in positions]


def prompt_generators(cfg: GRPOConfig, iteration: int, micro: int, positions: range) -> list[torch.Generator]:
    """One generator per prompt (prompt_seeds): the rollout's noise."""
    return [torch.Generator().manual_seed(s) for s in prompt_seeds(cfg, iteration, micro, positions)]


def micro_step(cfg: GRPOConfig, policy, drm, bank, iteration: int, micro: int, positions: range, sigmas, shape,
               device, advantages_of) -> dict[str, float]:
    """Roll out this process's prompts of micro-batch `micro`, score them with the DRM and backpropagate the
    policy loss, times 1 / grad_accum. Returns the rollout's reward and the loss diagnostics."""
    order = torch.randperm(len(bank), generator=torch.Generator().manual_seed(run_seed(cfg.seed, 1_000_003, iteration)))
    global_index = order[(torch.arange(cfg.batch_size) + micro * cfg.batch_size) % len(bank)]
    cond = bank_conditioning(bank.rows(global_index[list(positions)]), device)
    generators = prompt_generators(cfg, iteration, micro, positions)
    reward = prompt_reward(drm, cond, [s + RENOISE_SEED_OFFSET for s in prompt_seeds(cfg, iteration, micro, positions)])
    trained = trained_steps(cfg, iteration)
    if cfg.algorithm == "step-grpo":
        records, _, stats = rollout_step_grpo(policy, reward, cond, generators, sigmas, shape, cfg.cfg, cfg.eta,
                                              cfg.branches, trained, device, advantages_of)
        record_cond = cond
    else:
        records, _, stats = rollout_grpo(policy, reward, cond, generators, sigmas, shape, cfg.cfg, cfg.eta,
                                         cfg.group, trained, device, advantages_of)
        record_cond = cond.rows(group_rows(len(generators), cfg.group).to(device))
    losses = policy_loss(policy, records, record_cond, cfg.cfg, cfg.eta, cfg.clip_range, cfg.kl_beta,
                         scale=1.0 / cfg.grad_accum, advantage_clip=cfg.advantage_clip)
    return {**stats, **losses}


def train_grpo(cfg: GRPOConfig) -> dict:
    """Train and write the LoRA; returns the last metrics row.

    Ctrl-C or SIGTERM saves a resumable checkpoint after the current iteration and raises RunInterrupted.
    """
    import comfy.model_management
    import comfy.samplers
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from drm.runtime import NonFiniteScores, load_drm
    from drm.stepwise import schedule_sigmas

    from ..models import load_base
    from ..prompts import load_prompt_bank
    from .loss import group_advantages
    from .policy import Policy

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
    # the reward model sees prompts padded as in its training (drm.t5_length), or the run is refused
    check_prompt_padding(drm, [(cfg.prompts, bank), (cfg.eval_prompts or cfg.prompts, eval_bank)])
    policy = Policy(base.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_mlp, device, cfg.seed,
                    checkpointing=cfg.grad_checkpointing)
    comfy.model_management.load_models_gpu([base.model, drm.patcher])
    sigmas = schedule_sigmas(base.model.get_model_object("model_sampling"), cfg.scheduler, cfg.steps)
    shape = (16, cfg.resolution // 8, cfg.resolution // 8)

    params = list(policy.lora.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_scheduler(optimizer, cfg.warmup_steps)
    iteration, ema, largest_at_start = (load_state(out, policy.lora, optimizer, scheduler) if cfg.resume
                                        else (0, None, None))
    if cfg.resume:
        use_lr(optimizer, scheduler, cfg.lr)  # the run's own, unless --resume-with-new-lr changed it
    final = out / f"{base.name}-{cfg.algorithm}.safetensors"
    # a run stopped (by a full disk) after its last checkpoint but before its LoRA resumes to write it
    if cfg.resume and iteration >= cfg.iterations and final.exists():
        raise ConfigError(f"iterations: the run in {cfg.out} already finished {iteration} iterations; to train on, "
                          f"resume with --iterations above {iteration}")
    if cfg.ema and ema is None:
        ema = [p.detach().clone() for p in params]
    watch, first_iteration = WeightWatch(params, largest_at_start), iteration
    # Only the optimizer: DDP cannot wrap the LoRA, whose weights act through hooks inside ComfyUI's model and
    # never through a forward of its own, so DDP's gradient hooks would not fire; accelerate's reduce below
    # averages the gradients over the processes instead.
    optimizer = accelerator.prepare(optimizer)
    metrics_file = out / "metrics.csv"
    if accelerator.is_main_process:
        write_run_file(cfg)
        # What was written after the checkpoint (before a kill) is written again from here; a run
        # starting over keeps none of the one before.
        done = iteration if cfg.resume else -1
        rewind_metrics(metrics_file, "iteration", done)
        remove_files_after(out / "eval", r"step(\d+)\.png", done)
        remove_files_after(out / "loras", re.escape(base.name) + r"-(\d+)\.safetensors", done)

    def advantages_of(rewards):
        if resolved_advantage_std(cfg) == "group":
            return group_advantages(rewards)
        # Flow-GRPO's global_std: the std of every process's rewards (all ranks reach this point together)
        return group_advantages(rewards, std_of=accelerator.gather(rewards.contiguous()))

    def not_finite(what: str, error: ValueError | None = None) -> ValueError:
        """The error for NaN or infinite outputs (`what`, e.g. "the rollouts of iteration 3 gave NaN or infinite
        latents") of the weights of `iteration`: divergence once this run has changed them; before, the settings
        or the files are the cause (a DRM's NonFiniteScores `error` says which; its text speaks of ComfyUI's
        samplers, so it is shown only then)."""
        if iteration > first_iteration:
            return diverged(cfg, f"training diverged: {what}", failed=iteration)
        fix = (str(error) if isinstance(error, NonFiniteScores) else
               f"lower cfg (now {cfg.cfg:g}) or eta (now {cfg.eta:g}), or check the base model file")
        return ValueError(f"{what} before this run changed the LoRA, so the learning rate is not the cause: {fix}")

    def run_eval(tag: str) -> float:
        with swapped_in(params, ema):
            try:
                value, samples = evaluate(policy, drm, eval_bank, cfg, sigmas, shape, device)
            except NonFiniteLatents:
                raise not_finite(f"the evaluation after iteration {iteration} gave NaN or infinite latents") from None
            except NonFiniteScores as e:
                raise not_finite(f"the DRM gave NaN or infinite rewards in the evaluation after iteration {iteration}",
                                 e) from None
        if accelerator.is_main_process:
            eval_grid_png(latent_images(samples, base), out / "eval" / f"{tag}.png", columns=len(eval_bank))
        return value

    def save(at: int) -> None:
        save_snapshot(accelerator, out, policy.lora, ema, optimizer, scheduler, at, cfg, base.name, watch.start)

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
            rows_before = {"model_rows": policy.forward_rows, "drm_rows": drm.scored_rows}  # the cost counters
            totals: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                try:
                    stats = micro_step(cfg, policy, drm, bank, iteration, micro, positions, sigmas, shape, device,
                                       advantages_of)
                except NonFiniteLatents:
                    raise not_finite(f"the rollouts of iteration {iteration + 1} gave NaN or infinite latents") from None
                except NonFiniteScores as e:
                    raise not_finite(f"the DRM gave NaN or infinite rewards to the rollouts of iteration "
                                     f"{iteration + 1}", e) from None
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value / cfg.grad_accum
            if not math.isfinite(totals["loss"]):
                raise not_finite(f"the policy loss of iteration {iteration + 1} is {totals['loss']} (its step is not "
                                 "applied)")
            if world > 1:  # data parallel over the LoRA parameters: the mean of the processes' gradients
                for p, grad in zip(params, accelerator.reduce([p.grad for p in params], "mean")):
                    p.grad = grad
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                with torch.no_grad():
                    for shadow, p in zip(ema, params):
                        shadow.lerp_(p, 1 - cfg.ema)
            iteration += 1
            problem = watch.problem()  # before anything is saved: a checkpoint never holds diverged weights
            if problem:
                raise diverged(cfg, f"training diverged at iteration {iteration}: {problem}")

            reward_key = "step_reward" if cfg.algorithm == "step-grpo" else "terminal_reward"
            row = {"iteration": iteration, "reward": totals[reward_key], "loss": totals["loss"],
                   "ratio": totals["ratio"], "clip_frac": totals["clip_frac"], "kl": totals["kl"],
                   "seconds": time.perf_counter() - start_time,
                   "model_rows": policy.forward_rows - rows_before["model_rows"],
                   "drm_rows": drm.scored_rows - rows_before["drm_rows"]}
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
                save(iteration)
    if stopping:
        message = f"Interrupted at iteration {iteration}; a checkpoint is saved. Continue with --resume."
        raise RunInterrupted(message)  # the command line prints it; the demo says it in its own words
    save(iteration)
    if not last:  # resumed after its last iteration (to write the LoRA): the same evaluation as the loop's last
        last = {"iteration": iteration, "eval_reward": run_eval(f"step{iteration:04d}")}
    if accelerator.is_main_process:
        # the LoRA is written last: a resume writes whatever a full disk stopped before it (the check above)
        reward_curve_png(metrics_file, out / "reward_curve.png", f"{cfg.algorithm} on {base.name}")
        with swapped_in(params, ema):
            export_lora(policy.lora, cfg, base.name, iteration, final)
        also = f" (and {final.with_name(final.stem + '.peft.safetensors').name} for diffusers/peft)" if cfg.peft_export else ""
        print(f"LoRA written to {final}{also}; eval reward {last.get('eval_reward', float('nan')):.4f}")
    return last
