"""`python -m trainer drm`: train a DRM from preference pairs (Bradley-Terry on noisy latents).

One readable loop. Each pair shares one noise level s (logit-normal by default, uniform for SD3.5-Large); each image gets its
own noise; the DRM scores both noisy latents and the loss is -log sigmoid(r_preferred - r_rejected).
Modes: `adapter` (LoRA on the generator's blocks + final layer + head; the file shares the base
model's weights), `full` (the kept blocks, final layer and head), `head` (only the head).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch.nn import functional as F

from ..config import ConfigError, shareable_dict
from ..runs import (
    RunInterrupted,
    WeightWatch,
    append_csv,
    diverged,
    load_checkpoint,
    rewind_metrics,
    save_checkpoint,
    stop_on_signals,
    use_lr,
    warmup_scheduler,
    write_run_file,
)
from .config import DRMTrainConfig, base_depth
from .scoring import BUCKETS, NonFiniteTrainingScores, check_pairs_fit, evaluate, pair_scores, sample_sigmas

COLUMNS = ["step", "loss", "train_acc", "lr", "eval_acc"] + [f"acc_sigma_{low:.2f}_{high:.2f}" for low, high in BUCKETS]


def non_finite(cfg: DRMTrainConfig, error: NonFiniteTrainingScores, weights_of: int, trained: bool,
               autocast: bool) -> ValueError:
    """The error for NaN or infinite scores of the weights after step `weights_of`: divergence (runs.diverged)
    when this run has `trained` them; otherwise the weights it started from overflow on the data, and the
    learning rate is not the cause. Precision fp32 is advised only where bf16 ran (autocast: bf16 on a GPU)."""
    fp32 = "It ran in bf16: --precision fp32 (in a new --out) also keeps the scores finite longer." if autocast else ""
    if trained:
        return diverged(cfg, f"training diverged: {error}", fp32, failed=weights_of)
    cause = ("use --precision fp32" if autocast else
             "the pairs' latents are far outside the base model's range; encode them with this base's VAE")
    return ValueError(f"{error}, so this step is not applied. The weights are those the run started from, so the "
                      f"learning rate is not the cause: {cause}.")


# ---- the DRM to train ----

def kept_blocks(cfg: DRMTrainConfig, depth: int) -> int:
    """The joint blocks the DRM runs, of a base with `depth`: cfg.blocks, or for 0 the DRM authors' count (they
    skip 3 of SD3.5-Medium's 24 and 5 of SD3.5-Large's 38: utils.py:13-16 at jjaxonx/DRM@5c3c101) and depth - 3
    for any other depth, at least 1. Raises ConfigError for more blocks than the base has."""
    from drm.checkpoint import OFFICIAL_SKIPPED_BLOCKS

    blocks = cfg.blocks or max(1, depth - OFFICIAL_SKIPPED_BLOCKS.get(depth, 3))
    if blocks > depth:
        raise ConfigError(f"blocks: {blocks} is more than the base model's {depth} joint blocks")
    return blocks


def build_trainable_drm(cfg: DRMTrainConfig, base, device):
    """The DRM for `cfg.mode`, with requires_grad set on exactly the trained parameters."""
    import comfy.ops

    from drm.checkpoint import feeds_nothing
    from drm.head import ConvGNHead
    from drm.lora import LoRA, target_paths
    from drm.model import DRM, build_drm, load_checked, new_final_layer

    mmdit = base.model.model.diffusion_model
    blocks = kept_blocks(cfg, len(mmdit.joint_blocks))
    torch.manual_seed(cfg.seed)
    if cfg.mode in ("adapter", "head"):
        # Shared, frozen base weights; trained parts stay fp32 (manual_cast follows the input dtype).
        mmdit.requires_grad_(False)
        final_layer = new_final_layer(mmdit, dtype=torch.float32, operations=comfy.ops.manual_cast)
        load_checked(final_layer, new_final_layer(mmdit, device="meta", operations=torch.nn),
                     mmdit.final_layer.state_dict(), "final layer", torch.float32)
        final_layer.requires_grad_(cfg.mode == "adapter")
        lora = None
        if cfg.mode == "adapter":
            lora = LoRA.for_module(mmdit, target_paths(mmdit, cfg.lora_mlp, blocks), cfg.lora_rank, cfg.lora_alpha)
        # A freshly initialised head: plain torch layers (comfy's ops skip weight init).
        drm = DRM(mmdit, blocks, final_layer, ConvGNHead(mmdit.out_channels), lora=lora, shared_backbone=True)
        mmdit.to(device)
    else:  # the base was loaded in float32 (base_dtype), so these are the file's values exactly
        state = {k: v.float() for k, v in mmdit.state_dict().items()}
        head = ConvGNHead(mmdit.out_channels)
        state.update({"reward_output." + k: v for k, v in head.state_dict().items()})
        drm = build_drm(state, blocks, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
        drm.requires_grad_(cfg.mode == "full")
        drm.reward_output.requires_grad_(True)
        # The text tokens leaving the last kept block feed nothing, so the layers that make them get no
        # gradient; DDP refuses trainable parameters without one.
        for name, parameter in drm.backbone.named_parameters():
            if feeds_nothing(name, blocks):
                parameter.requires_grad_(False)
    drm.reward_output.mlp[2].p = cfg.head_dropout
    drm.checkpointing = cfg.grad_checkpointing
    return drm.to(device), blocks


def base_dtype(cfg: DRMTrainConfig, autocast: bool) -> torch.dtype:
    """The dtype the base model is loaded in. `full` trains float32 copies of its weights, so it loads float32:
    a file's bf16, fp16 or fp32 values are then kept exactly (a bf16 load would round fp32 and fp16 weights
    first). adapter and head train on the frozen shared base, which is bf16 where autocast runs it in bf16."""
    return torch.bfloat16 if autocast and cfg.mode != "full" else torch.float32


# ---- checkpoints ----

def save_state(out: Path, drm, optimizer, scheduler, step: int, largest_at_start: float) -> None:
    """The trained parameters, optimizer, scheduler and step: everything --resume needs (each step seeds
    its own randomness from (seed, step), so there is no RNG state to keep), and the run's WeightWatch start."""
    save_checkpoint(out, {k: p for k, p in drm.named_parameters() if p.requires_grad},
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                     "largest_weight_at_start": largest_at_start})


def load_state(out: Path, drm, optimizer, scheduler) -> tuple[int, float | None]:
    """Restore what save_state wrote; returns (step, the largest trained weight at the run's start, if saved)."""
    tensors, state = load_checkpoint(out)
    params = dict(drm.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], state.get("largest_weight_at_start")


def drm_path(cfg: DRMTrainConfig, base_name: str) -> Path:
    """Where the run writes its DRM, last."""
    return Path(cfg.out) / f"drm-{base_name}-{cfg.mode}.safetensors"


def write_drm(cfg: DRMTrainConfig, drm, base_name: str, step: int, metrics: dict) -> Path:
    from drm.checkpoint import save_adapter, save_full

    path = drm_path(cfg, base_name)
    meta = {"drm.base_model": base_name, "drm.train_mode": cfg.mode, "drm.train_steps": str(step),
            "drm.eval": json.dumps(metrics), "drm.config": json.dumps(shareable_dict(cfg))}
    if not cfg.data.endswith(".safetensors"):  # the trainer encoded the prompts itself, so it knows how
        meta["drm.t5_length"] = str(cfg.t5_length)
        if cfg.prompt_text == "plain":  # prompts cut at 77 CLIP and t5_length T5 tokens, as the authors'
            meta["drm.prompt_text"] = "plain"
        if cfg.image_resize == "squash":  # DRM Score Image's resize "auto" squashes images as in training
            meta["drm.image_size"] = str(cfg.resolution)
    # adapter and head DRMs run on the base model's own weights, so only their own parts are written
    (save_full if cfg.mode == "full" else save_adapter)(drm, path, meta)
    return path


# ---- the loop ----

def train_drm(cfg: DRMTrainConfig) -> dict:
    """Train and write the DRM; returns the last evaluation.

    Ctrl-C or SIGTERM saves a resumable checkpoint after the current step and raises RunInterrupted.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from ..figures import training_curves_png
    from ..models import load_base
    from .encoded import EncodedPairs
    from .pairs import load_pairs

    cfg = cfg.resolved(base_depth(cfg.base))  # SD3.5-Large's and the recipe's defaults, for what is unset
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    if cfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"batch_size: {cfg.batch_size} does not split over {accelerator.num_processes} processes")
    autocast = cfg.precision == "bf16" and device.type == "cuda"
    out = Path(cfg.out)
    # The data is read (not yet encoded) first, so a bad file fails before any model loads.
    pre_encoded = cfg.data.endswith(".safetensors")
    pairs = EncodedPairs.load(cfg.data) if pre_encoded else None
    if pre_encoded and cfg.vae_latent == "sample" and pairs.preferred_std is None:
        raise ConfigError(f"vae_latent: sample draws each latent from its VAE posterior, and {Path(cfg.data).name} "
                          "holds no posterior std (preferred_std, rejected_std); pass the pairs .json/.jsonl, which "
                          "the trainer encodes keeping the std, or use vae_latent = mean")
    records = None if pre_encoded else load_pairs(cfg.data, cfg.min_confidence)
    base = load_base(cfg.base, cfg.vae, cfg.clip, need_encoders=not pre_encoded, dtype=base_dtype(cfg, autocast))
    if records is not None:  # one process encodes (and caches); the others read what it wrote
        encoded = out / "cache" / "pairs.safetensors"
        if accelerator.is_main_process:
            encode_records(cfg, base, records).save(encoded)
        accelerator.wait_for_everyone()
        pairs = EncodedPairs.load(encoded)
    check_pairs_fit(pairs, base.model.model.diffusion_model, cfg.data)
    train, heldout = pairs.split(cfg.holdout, cfg.seed)
    cfg = cfg.with_epochs(len(train))
    latent_format = base.model.get_model_object("latent_format")
    shift = cfg.timestep_shift or base.model.get_model_object("model_sampling").shift

    drm, blocks = build_trainable_drm(cfg, base, device)
    params = [p for p in drm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_scheduler(optimizer, cfg.warmup_steps)
    step, largest_at_start = load_state(out, drm, optimizer, scheduler) if cfg.resume else (0, None)
    if cfg.resume:
        use_lr(optimizer, scheduler, cfg.lr)  # the run's own, unless --resume-with-new-lr changed it
    # a run stopped (by a full disk) after its last checkpoint but before its DRM resumes to write it
    if cfg.resume and step >= cfg.max_steps and drm_path(cfg, base.name).exists():
        raise ConfigError(f"max_steps: the run in {cfg.out} already finished {step} steps; to train on, resume with "
                          f"--max-steps above {step}")
    watch, first_step = WeightWatch(params, largest_at_start), step
    model, optimizer = accelerator.prepare(drm, optimizer)
    metrics_file = out / "metrics.csv"
    if accelerator.is_main_process:
        write_run_file(cfg)
        # The rows logged after the checkpoint (before a kill) are logged again from here; a run
        # starting over keeps none of the one before.
        rewind_metrics(metrics_file, "step", step if cfg.resume else -1)

    per_rank = cfg.batch_size // accelerator.num_processes
    last_eval: dict = {}
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not accelerator.is_main_process, desc="DRM")
    stopping = False
    with stop_on_signals() as stop_request, contextlib.closing(bar):
        while step < cfg.max_steps and not stopping:
            # The same pairs, noise levels and noise for step `step` whatever the process count or resume point.
            step_seed = (cfg.seed * 1_000_003 + step) % 2**64  # torch's seed range; any accepted --seed works
            generator = torch.Generator().manual_seed(step_seed)
            # The head's dropout draws from the global RNG (CUDA's on a GPU): seed it per step and rank too.
            torch.manual_seed((step_seed + 7_919 * (1 + accelerator.process_index)) % 2**64)
            # seed * 999_983 + epoch: neighbouring --seed values do not replay each other's orders one epoch apart
            epoch_order = torch.randperm(len(train), generator=torch.Generator().manual_seed(
                (cfg.seed * 999_983 + (step * cfg.batch_size) // len(train)) % 2**64))
            start = (step * cfg.batch_size) % len(train)
            index = epoch_order[torch.arange(start, start + cfg.batch_size) % len(train)]
            sigmas = sample_sigmas(cfg, generator, cfg.batch_size, shift)
            noise = torch.randn((2, cfg.batch_size, *train.preferred.shape[1:]), generator=generator)
            posterior = (torch.randn((2, cfg.batch_size, *train.preferred.shape[1:]), generator=generator)
                         if cfg.vae_latent == "sample" else None)
            rows = slice(accelerator.process_index * per_rank, (accelerator.process_index + 1) * per_rank)
            good, bad = pair_scores(model, train, index[rows], sigmas[rows], noise[:, rows], latent_format, device,
                                    autocast, None if posterior is None else posterior[:, rows])
            loss = -F.logsigmoid(good - bad).mean()
            if not torch.isfinite(loss):
                nan = NonFiniteTrainingScores(f"the DRM's scores are NaN or infinite at step {step + 1} (precision "
                                      f"{'bf16' if autocast else 'fp32'})")  # bf16 runs only on a GPU
                raise non_finite(cfg, nan, step, step > first_step, autocast)
            accelerator.backward(loss)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            problem = watch.problem()  # before anything is saved: a checkpoint never holds diverged weights
            if problem:
                raise diverged(cfg, f"training diverged at step {step}: {problem}")

            row = {"step": step, "loss": accelerator.reduce(loss.detach(), "mean").item(),
                   "train_acc": accelerator.reduce((good > bad).float().mean(), "mean").item(),
                   "lr": scheduler.get_last_lr()[0]}
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                try:
                    last_eval = evaluate(accelerator.unwrap_model(model), heldout, cfg, latent_format, device, autocast)
                except NonFiniteTrainingScores as e:
                    raise non_finite(cfg, e, step, True, autocast) from None
                row.update(last_eval)
            if accelerator.is_main_process:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", **({"acc": f"{last_eval['eval_acc']:.2f}"}
                                                              if "eval_acc" in last_eval else {}))
                if step % cfg.log_every == 0 or "eval_acc" in row:
                    append_csv(metrics_file, row, COLUMNS)
            stopping = stop_request.agreed(accelerator)
            if step % cfg.save_every == 0 or stopping:
                _save(accelerator, out, model, optimizer, scheduler, step, watch.start)
    if stopping:
        message = f"Interrupted at step {step}; a checkpoint is saved. Continue with --resume."
        raise RunInterrupted(message)  # the command line prints it; the demo says it in its own words
    _save(accelerator, out, model, optimizer, scheduler, step, watch.start)
    if not last_eval:  # resumed after its last step (to write the DRM): the same evaluation as the loop's last
        try:
            last_eval = evaluate(accelerator.unwrap_model(model), heldout, cfg, latent_format, device, autocast)
        except NonFiniteTrainingScores as e:
            raise non_finite(cfg, e, step, True, autocast) from None
    if accelerator.is_main_process:
        # the DRM is written last: a resume writes whatever a full disk stopped before it (the check above)
        training_curves_png(metrics_file, out / "curves.png", title=f"DRM training ({cfg.mode})")
        path = write_drm(cfg, accelerator.unwrap_model(model), base.name, step, last_eval)
        print(f"DRM written to {path}; held-out accuracy {last_eval.get('eval_acc', float('nan')):.3f}")
        print("  " + "  ".join(f"{k[10:]}: {v:.3f}" for k, v in last_eval.items() if k.startswith("acc_sigma_")))
    return last_eval


def _save(accelerator, out, model, optimizer, scheduler, step, largest_at_start) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_state(out, accelerator.unwrap_model(model), optimizer, scheduler, step, largest_at_start)



def encode_records(cfg: DRMTrainConfig, base, records):
    """Images and prompts encoded (and cached) with the base's VAE and text encoders."""
    from .encoded import encode_pairs
    from .encoders import clip_prompt_encoder, prompt_cache_id

    return encode_pairs(records, base.vae, clip_prompt_encoder(base.clip, cfg.t5_length, cfg.prompt_text),
                        cfg.resolution, cfg.cache_dir or Path(cfg.out) / "cache", on_bad_image=cfg.on_bad_image,
                        vae_id=base.vae_id,
                        text_encoder_id=prompt_cache_id(base.text_encoder_id, cfg.t5_length, cfg.prompt_text),
                        image_resize=cfg.image_resize, vae_latent=cfg.vae_latent)
