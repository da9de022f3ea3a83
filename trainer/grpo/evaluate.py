"""`trainer grpo`'s DRM rewards (through drm.runtime's one re-noising path) and its evaluation on ODE samples."""

from __future__ import annotations

from pathlib import Path

import torch

from drm.sde import sde_mean_std

from .rollout import Conditioning, cfg_predict

EVAL_NOISE_SEED = 12345  # the same starting noise at every evaluation
EVAL_RENOISE_SEED = 54321  # the same re-noising (DiNa-LRM) at every evaluation, apart from the starting noise


class NonFiniteLatents(ValueError):
    """The policy's latents hold NaN or infinite values, so no reward can be given to them."""


def bank_conditioning(bank, device) -> Conditioning:
    """A prompt bank's rows as the rollout's Conditioning, on `device`."""
    lengths = None if bank.context_length is None else bank.context_length.to(device)
    return Conditioning(bank.context.to(device), bank.pooled.to(device), bank.negative_context.to(device),
                        bank.negative_pooled.to(device), lengths)


def check_prompt_padding(drm, banks: list[tuple[str, object]]) -> None:
    """Refuse a prompt bank (named by its file) padded shorter than the DRM's training prompts (drm.t5_length)."""
    for name, bank in banks:
        shortest = bank.context.shape[1] if bank.context_length is None else int(bank.context_length.min())
        drm.check_text_length(bank.context[:, :shortest], f"prompts {Path(name).name}",
                              fix=f"Pass --t5-length {drm.metadata.get('drm.t5_length')} (text prompts), or a bank "
                                  "encoded with T5 padded that far.")


def drm_reward(drm, cond: Conditioning, x: torch.Tensor, sigma, seed: int | list[int] = 0) -> torch.Tensor:
    """DRM scores [B] (float32, on x's device) of latents x [B, ...] at noise level sigma, row b scored against
    cond's prompt b at its own length (zero padding would change the score).

    A DRM whose file recommends a noise level (DiNa-LRM: 0.4) scores latents below it noised forward to it, as
    its authors score clean latents: LoadedDRM.score_noised, with noise from `seed` (one int for the batch, or
    one per row: rows with equal seeds get equal noise). Raises NonFiniteLatents for NaN or infinite latents
    (the trainer words what that means; the DRM's own message speaks of ComfyUI's samplers).
    """
    if not torch.isfinite(x).all():
        raise NonFiniteLatents(f"{(~torch.isfinite(x)).flatten(1).any(1).sum().item()} of {len(x)} latents at sigma "
                               f"{float(sigma):.3f} hold NaN or infinite values")
    return drm.score_noised(x, float(sigma), cond.context, cond.pooled, drm.recommended_noise_sigma(), seed,
                            context_length=cond.context_length)


def prompt_reward(drm, cond: Conditioning, seeds: list[int]):
    """The rollouts' reward(x, sigma, rows): drm_reward of latents x [N, ...] against cond's prompts `rows` [N],
    re-noised with the seed of each row's prompt (seeds[prompt]), so the siblings (or the GRPO group) of one
    prompt share their noise and their rewards compare the latents alone."""
    def reward(x: torch.Tensor, sigma: float, rows: torch.Tensor) -> torch.Tensor:
        return drm_reward(drm, cond.rows(rows), x, sigma, [seeds[r] for r in rows.tolist()])

    return reward


@torch.no_grad()
def evaluate(policy, drm, bank, cfg, sigmas: torch.Tensor, shape: tuple[int, ...], device) -> tuple[float, torch.Tensor]:
    """(Mean DRM reward, samples [len(bank) * cfg.eval_seeds, *shape]) of ODE samples of every eval prompt and
    seed (rows prompt-fastest), from fixed noise: the same numbers at every evaluation of the same weights.

    ODE: drm.sde's step with eta = 0, the Euler step x + (x - x0) / s * (s_next - s), CFG as the rollouts'.
    """
    rows = torch.arange(len(bank)).repeat(cfg.eval_seeds)
    cond = bank_conditioning(bank.rows(rows), device)
    x = torch.randn((len(rows), *shape), generator=torch.Generator().manual_seed(EVAL_NOISE_SEED)).to(device)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        denoised, _ = cfg_predict(policy, x, sigma, cond, cfg.cfg)
        x, _ = sde_mean_std(x, denoised, sigma, sigma_next, eta=0.0)
    return drm_reward(drm, cond, x, 0.0, EVAL_RENOISE_SEED).mean().item(), x


@torch.no_grad()  # ComfyUI's VAE keeps requires_grad on its weights; a decode would build a graph
def latent_images(latents: torch.Tensor, base) -> torch.Tensor:
    """Pictures [B, 3, H, W] in [0, 1] of model-space latents [B, 16, h, w]: VAE-decoded when the base has a VAE
    (H = 8h), else ComfyUI's latent RGB preview factors, each latent pixel shown as 8x8."""
    latent_format = base.model.get_model_object("latent_format")
    latents = latent_format.process_out(latents.detach().cpu().float())
    if base.vae is not None:
        return base.vae.decode(latents).clamp(0, 1).movedim(-1, 1)
    factors = torch.tensor(latent_format.latent_rgb_factors)
    bias = torch.tensor(latent_format.latent_rgb_factors_bias or [0.0, 0.0, 0.0])
    rgb = torch.einsum("bchw,cr->brhw", latents, factors) + bias[:, None, None]
    return torch.nn.functional.interpolate(((rgb + 1) / 2).clamp(0, 1), scale_factor=8, mode="nearest")
