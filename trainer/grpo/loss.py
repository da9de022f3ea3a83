"""The policy-gradient pieces shared by Step-GRPO and GRPO (pure torch, no ComfyUI).

- Step-GRPO: K siblings drawn from one parent at one step; their DRM scores, normalised within the
  siblings, are the advantages of that step's actions.
- GRPO (Flow-GRPO): G trajectories per prompt; the terminal reward minus its prompt's mean, over the
  std of all rewards of the batch, is every step's advantage.
Both use the PPO-clipped ratio exp(log p_theta - log p_old) times the advantage, with log-probs in
Flow-GRPO's per-element mean form (drm.sde), advantages clipped at +-5 and Flow-GRPO's KL.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, std_of: torch.Tensor | None = None) -> torch.Tensor:
    """(R - group mean) / (std + eps) along the last dim (one group per row); a group of equal rewards gives 0.

    std: the population std of each group, or, given `std_of`, of those rewards (Flow-GRPO's
    global_std: all the batch's rewards, over every process). Raises ValueError for a group of one or
    non-finite rewards. Source: flow_grpo/stat_tracking.py (per-prompt mean, np.std, + 1e-4).
    """
    if rewards.shape[-1] < 2:
        raise ValueError(f"a group needs at least 2 members to normalise rewards, got {rewards.shape[-1]}")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"{(~torch.isfinite(rewards)).sum().item()} rewards are NaN or infinite; their advantages "
                         "would be too. Load the reward model in bf16 or fp32 if it is fp16; otherwise the rollouts "
                         "diverged (check cfg, eta and the learning rate).")
    mean = rewards.mean(dim=-1, keepdim=True)
    if std_of is None:
        std = rewards.std(dim=-1, keepdim=True, unbiased=False)
    else:
        std = std_of.float().std(unbiased=False)
    advantages = (rewards - mean) / (std + eps)
    # float rounding of the mean of equal rewards would otherwise leave a spurious nonzero advantage
    all_equal = (rewards == rewards[..., :1]).all(dim=-1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(advantages), advantages)


def clipped_policy_loss(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                        advantage_clip: float = 5.0) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, to minimise: mean of max(-A r, -A clip(r, 1 - c, 1 + c)), r = exp(log_ratio).

    `advantages` are first clamped to +-advantage_clip (0: no clamp), as Flow-GRPO's adv_clip_max.
    Returns the loss and diagnostics: the mean ratio and the fraction of clipped terms.
    Source: flow_grpo scripts/train_sd3.py (the policy loss).
    """
    if advantage_clip > 0:
        advantages = advantages.clamp(-advantage_clip, advantage_clip)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {"ratio": ratio.detach().mean().item(),
             "clip_frac": ((ratio.detach() - 1).abs() > clip_range).float().mean().item()}
    return loss, stats


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor, dt: float) -> torch.Tensor:
    """Flow-GRPO's KL between the policy's and the reference's transitions, per sample [B].

    mean over elements of (mean - reference)^2 / (2 std_t^2), with std_t = std / sqrt(-dt) the SDE's
    noise scale before the step size (`std` is the step's own std, as sde_mean_std returns it): the
    exact per-element KL times -dt. Source: flow_grpo scripts/train_sd3.py (kl_loss).
    """
    squared = ((mean - reference_mean) ** 2).flatten(1).mean(dim=1)
    return squared * (-dt) / (2 * std.flatten(1)[:, 0] ** 2)


def transition_loss(denoised: torch.Tensor, parent: torch.Tensor, sigma, sigma_next, eta: float,
                    samples: torch.Tensor, old_mean: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                    advantage_clip: float = 5.0) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """Clipped loss of the actions `samples` [K, B, ...] taken from `parent` [B, ...] at one step.

    `denoised` is the policy's (CFG-combined) prediction for the parent, carrying the gradient. All K
    siblings share it, so one forward pass serves them all. `old_mean` [B, ...] is the rollout's
    transition mean; the log ratio of each sibling is taken element by element against it
    (drm.sde.sde_log_ratio). advantages are [K, B]. Returns the loss, diagnostics, and the
    transition mean (for a KL term).
    """
    from drm.sde import sde_log_ratio, sde_mean_std

    mean, std = sde_mean_std(parent, denoised, sigma, sigma_next, eta)
    log_ratio = torch.stack([sde_log_ratio(sample, mean, old_mean, std) for sample in samples])
    loss, stats = clipped_policy_loss(log_ratio, advantages, clip_range, advantage_clip)
    return loss, stats, mean
