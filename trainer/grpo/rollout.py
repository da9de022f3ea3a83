"""Rollouts for Step-GRPO and GRPO, and the policy loss over what they recorded (torch + drm.sde only).

`policy.predict(x, sigma, context, pooled, lora=True)` returns the denoised x0 for a batch; CFG is
combined here from two calls, conditional and unconditional, each with the batch composition the
training pass uses again, so a log-prob recomputed on-policy equals the rollout's exactly.
`reward(x, sigma, prompt_rows)` scores latents at noise level sigma (the DRM).

Randomness comes from one generator per prompt (seeded by the caller from the seed, the iteration and
the prompt's global index), drawn through drm.sde.item_noise, so a run gives the same numbers however its
prompts are split over processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from drm.sde import item_noise, sde_mean_std

from .loss import gaussian_kl, group_advantages, transition_loss

Advantages = Callable[[torch.Tensor], torch.Tensor]
"""rewards [groups, members] -> advantages of the same shape (group_advantages, or its global-std form)."""


@dataclass
class Conditioning:
    context: torch.Tensor  # [B, T, C], one row per prompt of the batch, right-padded with zeros
    pooled: torch.Tensor  # [B, D]
    negative_context: torch.Tensor  # [1, T', C]
    negative_pooled: torch.Tensor  # [1, D]
    context_length: torch.Tensor | None = None  # [B] tokens each row's prompt has (None: all T)

    def rows(self, index: torch.Tensor) -> Conditioning:
        lengths = None if self.context_length is None else self.context_length[index.to(self.context_length.device)]
        return Conditioning(self.context[index], self.pooled[index], self.negative_context, self.negative_pooled,
                            lengths)


@dataclass
class StepRecord:
    """What the loss needs of one trained step: the parents, the actions taken and their advantages."""

    step: int
    sigma: float
    sigma_next: float
    parent: torch.Tensor  # [N, ...]
    uncond: torch.Tensor  # [N, ...] the unconditional prediction at the parent (no gradient flows through it)
    samples: torch.Tensor  # [K, N, ...] actions: K siblings (Step-GRPO) or the trajectory's next latent (K = 1)
    old_mean: torch.Tensor  # [N, ...] the rollout's transition mean, for the log ratios
    advantages: torch.Tensor  # [K, N]


def cfg_predict(policy, x, sigma: float, cond: Conditioning, cfg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(CFG-combined prediction, unconditional prediction), from two calls of batch len(x)."""
    sigmas = torch.full((x.shape[0],), sigma, device=x.device)
    conditional = policy.predict(x, sigmas, cond.context, cond.pooled, context_length=cond.context_length)
    if cfg == 1.0:
        return conditional, conditional.detach()
    n = x.shape[0]
    unconditional = policy.predict(x, sigmas, cond.negative_context.expand(n, -1, -1),
                                   cond.negative_pooled.expand(n, -1)).detach()
    return unconditional + cfg * (conditional - unconditional), unconditional


@torch.no_grad()
def rollout_step_grpo(policy, reward, cond: Conditioning, generators: list[torch.Generator], sigmas: torch.Tensor,
                      shape: tuple[int, ...], cfg: float, eta: float, branches: int, trained: set[int],
                      device, advantages_of: Advantages = group_advantages) -> tuple[list[StepRecord], torch.Tensor, dict]:
    """One trajectory per prompt; at each trained step K siblings from the shared parent, scored by the DRM.

    The siblings' rewards, normalised within the K, are the step's advantages; the trajectory goes on
    from a random sibling. Returns the records (rows: the prompts of `cond`), the final latents and
    reward statistics.
    """
    batch = len(generators)
    prompts = torch.arange(batch)
    x = item_noise(generators, prompts, 1, shape, device)[0]
    records, chosen_rewards = [], []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised, uncond = cfg_predict(policy, x, sigma, cond, cfg)
        mean, std = sde_mean_std(x, denoised, sigma, sigma_next, eta)
        if i not in trained or sigma_next == 0:
            x = mean + std * item_noise(generators, prompts, 1, shape, device)[0]
            continue
        samples = mean + std * item_noise(generators, prompts, branches, shape, device)  # [K, B, ...]
        rows = torch.arange(batch, device=device).repeat(branches)
        scores = reward(samples.flatten(0, 1), sigma_next, rows).view(branches, batch)
        advantages = advantages_of(scores.T).T
        records.append(StepRecord(i, sigma, sigma_next, x, uncond, samples, mean, advantages))
        pick = torch.stack([torch.randint(branches, (), generator=g) for g in generators]).to(device)
        x = samples[pick, torch.arange(batch, device=device)]
        chosen_rewards.append(scores[pick.cpu(), torch.arange(batch)].mean().item())
    stats = {"step_reward": sum(chosen_rewards) / max(1, len(chosen_rewards))}
    return records, x, stats


@torch.no_grad()
def rollout_grpo(policy, reward, cond: Conditioning, generators: list[torch.Generator], sigmas: torch.Tensor,
                 shape: tuple[int, ...], cfg: float, eta: float, group: int, trained: set[int],
                 device, advantages_of: Advantages = group_advantages) -> tuple[list[StepRecord], torch.Tensor, dict]:
    """Flow-GRPO: G SDE trajectories per prompt; the terminal DRM rewards, normalised by `advantages_of`
    per prompt, are the advantage of every trained step. Record rows are prompt-major (row b * G + g):
    pass `cond.rows(group_rows(len(generators), group))` to policy_loss."""
    batch = len(generators)
    rows = group_rows(batch, group).to(device)
    cond = cond.rows(rows)
    x = item_noise(generators, rows, 1, shape, device)[0]
    records = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised, uncond = cfg_predict(policy, x, sigma, cond, cfg)
        mean, std = sde_mean_std(x, denoised, sigma, sigma_next, eta)
        sample = mean + std * item_noise(generators, rows, 1, shape, device)[0]
        if i in trained and sigma_next > 0:
            records.append(StepRecord(i, sigma, sigma_next, x, uncond, sample[None], mean, torch.empty(0)))
        x = sample
    scores = reward(x, 0.0, rows).view(batch, group)
    advantages = advantages_of(scores).flatten()[None]
    for record in records:
        record.advantages = advantages
    return records, x, {"terminal_reward": scores.mean().item()}


def group_rows(batch: int, group: int) -> torch.Tensor:
    """The prompt of each GRPO trajectory row: prompt-major, b repeated G times."""
    return torch.arange(batch).repeat_interleave(group)


def policy_loss(policy, records: list[StepRecord], cond: Conditioning, cfg: float, eta: float, clip_range: float,
                kl_beta: float = 0.0, scale: float = 1.0, advantage_clip: float = 5.0) -> dict:
    """Backpropagate the clipped loss of every record (one forward with gradient per record), times `scale`.

    `cond` has one row per record row. The unconditional prediction is the rollout's, detached; only
    the conditional one carries the gradient. With kl_beta > 0, Flow-GRPO's KL to the reference (LoRA
    off) transition is added. Returns mean diagnostics.
    """
    totals = {"loss": 0.0, "ratio": 0.0, "clip_frac": 0.0, "kl": 0.0}
    for record in records:
        sigmas = torch.full((record.parent.shape[0],), record.sigma, device=record.parent.device)
        conditional = policy.predict(record.parent, sigmas, cond.context, cond.pooled,
                                     context_length=cond.context_length)
        denoised = record.uncond + cfg * (conditional - record.uncond) if cfg != 1.0 else conditional
        loss, stats, mean = transition_loss(denoised, record.parent, record.sigma, record.sigma_next, eta,
                                            record.samples, record.old_mean, record.advantages, clip_range,
                                            advantage_clip)
        if kl_beta > 0:
            with torch.no_grad():  # the reference is the whole CFG transition with the LoRA off
                reference, _ = cfg_predict(_ReferencePolicy(policy), record.parent, record.sigma, cond, cfg)
                reference_mean, std = sde_mean_std(record.parent, reference, record.sigma, record.sigma_next, eta)
            kl = gaussian_kl(mean, reference_mean, std, record.sigma_next - record.sigma).mean()
            loss = loss + kl_beta * kl
            totals["kl"] += kl.item()
        (loss * scale / len(records)).backward()
        totals["loss"] += loss.item()
        totals["ratio"] += stats["ratio"]
        totals["clip_frac"] += stats["clip_frac"]
    return {k: v / max(1, len(records)) for k, v in totals.items()}


class _ReferencePolicy:
    """The policy with its LoRA switched off: the KL reference."""

    def __init__(self, policy):
        self.policy = policy

    def predict(self, x, sigma, context, pooled, context_length=None):
        return self.policy.predict(x, sigma, context, pooled, context_length=context_length, lora=False)
