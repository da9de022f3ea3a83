"""How trainer drm scores pairs: noise levels, Bradley-Terry pair scores on noisy latents, held-out accuracy
by sigma band, and the check that encoded pairs fit the base model."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import DRMTrainConfig

BUCKETS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
EVAL_SIGMAS_PER_BUCKET = 3


def check_pairs_fit(pairs, mmdit, data: str) -> None:
    """Refuse encoded pairs whose latents or prompts the base model cannot take, naming what differs (drm.fit)."""
    from drm.fit import Shapes, shape_differences

    latent, context, pooled = pairs.preferred, pairs.context, pairs.pooled
    base = Shapes.of_mmdit(mmdit)
    found = {d.name for d in shape_differences(Shapes.of_data(latent, context, pooled), base)}
    problems = []
    if latent.ndim != 4 or "latent_channels" in found or pairs.rejected.shape != latent.shape:
        problems.append(f"latents are {list(latent.shape)} and {list(pairs.rejected.shape)}, the base takes "
                        f"[N, {base.latent_channels}, h, w]")
    elif "latent_size" in found:
        limit = base.max_latent_size
        problems.append(f"latents are {latent.shape[-2]}x{latent.shape[-1]}, the base's position embedding covers "
                        f"{limit}x{limit} (resolution {limit * 8})")
    if context.ndim != 3 or "context" in found:
        problems.append(f"context is {list(context.shape)}, the base takes [P, T, {base.context}]")
    if pooled.ndim != 2 or "pooled" in found:
        problems.append(f"pooled is {list(pooled.shape)}, the base takes [P, {base.pooled}]")
    if problems:
        raise ValueError(f"data: {Path(data).name} does not fit the base model: {'; '.join(problems)}. Encode the "
                         "pairs with this base (pass the pairs .json/.jsonl instead of the .safetensors).")


class NonFiniteTrainingScores(ValueError):
    """The DRM's scores are NaN or infinite during training or its evaluation; the message says where, in the
    precision it ran in. (Not drm.runtime.NonFiniteScores, which the nodes and trainer grpo raise.)"""


def sample_sigmas(cfg: DRMTrainConfig, generator: torch.Generator, n: int, shift: float) -> torch.Tensor:
    """One noise level per pair, [n], in (0, 1]: u (logit-normal or uniform) picks a step of the base
    scheduler's 1000-step grid, whose shifted sigma is returned, as diffusers' SD3 training does
    (compute_density_for_timestep_sampling, then scheduler.timesteps[int(u * 1000)]). At SD3's shift 3
    the median is 0.75 and P(sigma > 0.9) is 13.6%; unshifted (sigma = u) they would be 0.50 and 1.4%."""
    if cfg.timestep_sampling == "uniform":
        u = torch.rand(n, generator=generator)
    else:
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    t = 1 - (u * 1000).long().clamp(max=999) / 1000  # the grid's timestep / 1000, from 1 down to 0.001
    return shift * t / (1 + (shift - 1) * t)


def pair_scores(drm, pairs, index: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor, latent_format,
                device, autocast: bool, posterior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DRM scores of the preferred and rejected latents of pairs `index`, each at its pair's sigma.

    noise: [2, n, C, H, W], independent for each image (preferred first). posterior: None for the latents as
    stored (the VAE posterior's mean), or N(0, I) noise [2, n, C, H, W] that draws each latent from its
    posterior (vae_latent = sample, as the DRM authors; EncodedPairs.latents).
    """
    from drm.conditioning import by_context_length

    x0 = latent_format.process_in(pairs.latents(index, posterior).float())
    s = sigmas.repeat(2).view(-1, 1, 1, 1)
    x_t = ((1 - s) * x0 + s * noise.flatten(0, 1)).to(device)
    prompt = pairs.prompt_index[index].repeat(2)
    lengths = None if pairs.context_length is None else pairs.context_length[prompt]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        # each prompt at its own length: zero padding would change the scores
        scores = by_context_length(lambda context, x, t, y: drm(x, t, context, y), pairs.context[prompt].to(device),
                                   lengths, x_t, (s.flatten() * 1000).to(device), pairs.pooled[prompt].to(device))
    return scores.float().chunk(2)


@torch.no_grad()
def evaluate(drm, pairs, cfg: DRMTrainConfig, latent_format, device, autocast: bool, batch: int = 32) -> dict:
    """Held-out preference accuracy overall and per sigma bucket, at fixed sigmas and fixed noise. Raises
    NonFiniteTrainingScores when a score is NaN or infinite."""
    was_training = drm.training
    drm.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    result, correct_all = {}, []
    for low, high in BUCKETS:
        correct = []
        for k in range(EVAL_SIGMAS_PER_BUCKET):
            sigma = low + (high - low) * (k + 0.5) / EVAL_SIGMAS_PER_BUCKET
            for start in range(0, len(pairs), batch):
                index = torch.arange(start, min(start + batch, len(pairs)))
                noise = torch.randn((2, len(index), *pairs.preferred.shape[1:]), generator=generator)
                good, bad = pair_scores(drm, pairs, index, torch.full((len(index),), sigma), noise,
                                        latent_format, device, autocast)
                if not (torch.isfinite(good).all() and torch.isfinite(bad).all()):
                    raise NonFiniteTrainingScores(f"the DRM's held-out scores at sigma {sigma:.3f} are NaN or infinite "
                                          f"(precision {'bf16' if autocast else 'fp32'})")
                correct.append((good > bad).float().cpu())
        correct = torch.cat(correct)
        result[f"acc_sigma_{low:.2f}_{high:.2f}"] = correct.mean().item()
        correct_all.append(correct)
    result["eval_acc"] = torch.cat(correct_all).mean().item()
    drm.train(was_training)
    return result
