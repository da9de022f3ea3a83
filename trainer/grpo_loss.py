"""The policy-gradient pieces shared by Step-GRPO and GRPO (pure torch, no ComfyUI).

- Step-GRPO: K siblings drawn from one parent at one step; their DRM scores, normalised within the
  siblings, are the advantages of that step's actions.
- GRPO (Flow-GRPO): G trajectories per prompt; the terminal reward, normalised within the group, is
  every step's advantage.
Both use the PPO-clipped ratio exp(log p_theta - log p_old) times the advantage.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(R - mean) / (std + eps) along the last dim (one group per row). A group of equal rewards gives 0."""
    if rewards.shape[-1] < 2:
        raise ValueError(f"a group needs at least 2 members to normalise rewards, got {rewards.shape[-1]}")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"{(~torch.isfinite(rewards)).sum().item()} rewards are NaN or infinite; their advantages "
                         "would be too. Run the reward model in bf16 or fp32.")
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, unbiased=False)
    advantages = (rewards - mean) / (std + eps)
    # float rounding of the mean of equal rewards would otherwise leave a spurious nonzero advantage
    all_equal = (rewards == rewards[..., :1]).all(dim=-1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(advantages), advantages)


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, to minimise: mean of max(-A r, -A clip(r, 1 - c, 1 + c)), r = exp(logp - logp_old).

    Returns the loss and diagnostics: the mean ratio and the fraction of clipped terms.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {"ratio": ratio.detach().mean().item(),
             "clip_frac": ((ratio.detach() - 1).abs() > clip_range).float().mean().item()}
    return loss, stats


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two transitions with the same std, per sample: ||mean - ref||^2 / (2 std^2), summed over dims."""
    kl = (mean - reference_mean) ** 2 / (2 * std ** 2)
    return kl.flatten(1).sum(dim=1)


def transition_loss(denoised: torch.Tensor, parent: torch.Tensor, sigma, sigma_next, eta: float,
                    samples: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                    clip_range: float) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """Clipped loss of the actions `samples` [K, B, ...] taken from `parent` [B, ...] at one step.

    `denoised` is the policy's (CFG-combined) prediction for the parent, carrying the gradient. All K
    siblings share it, so one forward pass serves them all. old_log_prob and advantages are [K, B].
    Returns the loss, diagnostics, and the transition mean (for a KL term).
    """
    from drm.sde import sde_log_prob, sde_mean_std

    mean, std = sde_mean_std(parent, denoised, sigma, sigma_next, eta)
    log_prob = torch.stack([sde_log_prob(sample, mean, std) for sample in samples])
    loss, stats = clipped_policy_loss(log_prob, old_log_prob, advantages, clip_range)
    return loss, stats, mean
