"""Unit tests for the Step-GRPO / GRPO math: trainer/grpo/loss.py, trainer/grpo/rollout.py and the pure parts of
trainer/grpo/train.py (GRPOConfig.validate, trained_steps, prompt_generators). Torch only, no ComfyUI.

A tiny differentiable "policy" stands in for the LoRA'd MMDiT: its x0 prediction depends on learnable
parameters theta (reference value: all zeros, i.e. "LoRA off"), on x, on sigma and on the text conditioning.
It uses elementwise ops and per-row reductions only, so a row's prediction does not depend on the other rows
of the batch (unlike a real MMDiT, whose outputs shift slightly with batch size).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from drm.conditioning import by_context_length
from drm.sde import sde_mean_std
from trainer.config import ConfigError
from trainer.grpo.config import GRPOConfig
from trainer.grpo.loss import clipped_policy_loss, gaussian_kl, group_advantages, transition_loss
from trainer.grpo.rollout import Conditioning, group_rows, policy_loss, rollout_grpo, rollout_step_grpo
from trainer.grpo.train import prompt_generators, run_seed, trained_steps

REPO = Path(__file__).resolve().parents[2]
SHAPE = (4, 4, 4)  # latent [C, H, W]
TOKENS, CONTEXT_DIM, POOLED_DIM = 3, 8, 6
SIGMAS = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.0])  # T = 4 steps; the last one (to 0) is deterministic
CPU = torch.device("cpu")


class TinyPolicy(torch.nn.Module):
    """x0 = (1 - s) x (1/2 + scale_c) + bias_c + (1 + s) t_n, t_n = mean_T(context) . (w0 + ctx) + mean(pooled) / 4.

    theta = (scale, bias, ctx); lora=False evaluates the prediction at theta = 0 (the reference).
    batch_sensitive adds 1e-3 * (batch size), mimicking an MMDiT whose outputs shift with batch composition.
    """

    def __init__(self, seed: int = 0, init: float = 0.1, batch_sensitive: bool = False):
        super().__init__()
        self.batch_sensitive = batch_sensitive
        g = torch.Generator().manual_seed(seed)
        channels = SHAPE[0]
        self.scale = torch.nn.Parameter(init * torch.randn(channels, generator=g))
        self.bias = torch.nn.Parameter(init * torch.randn(channels, generator=g))
        self.ctx = torch.nn.Parameter(init * torch.randn(CONTEXT_DIM, generator=g))
        self.register_buffer("w0", torch.linspace(-0.5, 0.5, CONTEXT_DIM))
        self.calls: list[int] = []

    def predict(self, x, sigma, context, pooled, context_length=None, lora=True):
        if context_length is not None:  # as the real Policy: each prompt at its own length
            return by_context_length(lambda c, x_, s_, p_: self.predict(x_, s_, c, p_, lora=lora),
                                     context, context_length, x, sigma, pooled)
        self.calls.append(x.shape[0])
        assert sigma.shape == (x.shape[0],) and context.shape[0] == x.shape[0] == pooled.shape[0]
        if lora:
            scale, bias, ctx = self.scale, self.bias, self.ctx
        else:
            scale, bias, ctx = (torch.zeros_like(p) for p in (self.scale, self.bias, self.ctx))
        s = sigma.float().view(-1, 1, 1, 1)
        text = (context.mean(dim=1) * (self.w0 + ctx)).sum(dim=-1) + pooled.mean(dim=-1) / 4
        x0 = ((1 - s) * x * (0.5 + scale.view(1, -1, 1, 1)) + bias.view(1, -1, 1, 1)
              + (1 + s) * text.view(-1, 1, 1, 1))
        return x0 + 1e-3 * x.shape[0] if self.batch_sensitive else x0


def make_bank(prompts: int = 4, seed: int = 123) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(prompts, TOKENS, CONTEXT_DIM, generator=g),
                        torch.randn(prompts, POOLED_DIM, generator=g),
                        torch.randn(1, TOKENS + 1, CONTEXT_DIM, generator=g),
                        torch.randn(1, POOLED_DIM, generator=g))


class RecordingReward:
    """A DRM stand-in: each row's score depends only on that row's latent and that row's prompt.

    `prompt_weight` holds one weight per row of the rollout's `cond` (the rows it passes index it).
    """

    def __init__(self, prompt_weight: torch.Tensor):
        self.prompt_weight = prompt_weight
        self.calls: list[tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, sigma, rows):
        flat = x.float().flatten(1)
        scores = flat.mean(dim=1) + self.prompt_weight[rows] * (flat**2).mean(dim=1)
        self.calls.append((x.clone(), float(sigma), rows.clone(), scores.clone()))
        return scores


def seeded_generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def step_rollout(policy, reward, cond, seeds, cfg=4.5, branches=3, trained=None, eta=0.7):
    trained = set(range(len(SIGMAS) - 1)) if trained is None else trained
    return rollout_step_grpo(policy, reward, cond, seeded_generators(seeds), SIGMAS, SHAPE, cfg, eta, branches,
                             trained, CPU)


def grpo_rollout(policy, reward, cond, seeds, cfg=4.5, group=3, trained=None, eta=0.7):
    trained = set(range(len(SIGMAS) - 1)) if trained is None else trained
    return rollout_grpo(policy, reward, cond, seeded_generators(seeds), SIGMAS, SHAPE, cfg, eta, group, trained, CPU)


def grads(policy) -> list[torch.Tensor]:
    return [p.grad.clone() for p in (policy.scale, policy.bias, policy.ctx)]


def zero_grads(policy) -> None:
    for p in policy.parameters():
        p.grad = None


def standardised(group: list[float]) -> list[float]:
    """Flow-GRPO's advantages of one group, written out in float64: (r - mean) / (population std + 1e-4)."""
    mean = sum(group) / len(group)
    std = math.sqrt(sum((r - mean) ** 2 for r in group) / len(group))
    return [(r - mean) / (std + 1e-4) for r in group]


# ---- 1. group_advantages ----

def test_group_advantages_standardise_each_row():
    rewards = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 3 + 2
    adv = group_advantages(rewards)
    assert adv.shape == rewards.shape
    torch.testing.assert_close(adv.mean(dim=-1), torch.zeros(5), rtol=0, atol=1e-5)
    torch.testing.assert_close(adv.std(dim=-1, unbiased=False), torch.ones(5), rtol=0, atol=1e-3)
    # the ordering inside each group is kept (higher reward, higher advantage)
    assert torch.equal(adv.argsort(dim=-1), rewards.argsort(dim=-1))


@pytest.mark.parametrize("value", [0.0, 1.0, -3.5, 0.75])
@pytest.mark.parametrize("members", [2, 3, 4, 8])
def test_group_advantages_of_equal_rewards_are_exactly_zero(value, members):
    rewards = torch.tensor([[value] * members, [1.0] + [2.0] * (members - 1)])
    adv = group_advantages(rewards)
    assert not torch.isnan(adv).any()
    assert torch.equal(adv[0], torch.zeros(members))
    assert adv[1].abs().sum() > 0  # the other row (not all equal) is not zeroed


@pytest.mark.parametrize(("value", "members"), [(0.7, 8), (1e6 + 0.1, 3)])
def test_group_advantages_of_equal_inexact_rewards_are_exactly_zero(value, members):
    adv = group_advantages(torch.full((members,), value))
    assert torch.equal(adv, torch.zeros(members))


@pytest.mark.parametrize("shape", [(1,), (4, 1), (0,)])
def test_group_advantages_need_two_members(shape):
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.ones(shape))


# ---- 2. clipped_policy_loss ----

def test_clipped_policy_loss_is_the_ppo_formula():
    g = torch.Generator().manual_seed(1)
    log_prob = torch.randn(4, 6, generator=g) * 0.3
    old = torch.randn(4, 6, generator=g) * 0.3
    adv = torch.randn(4, 6, generator=g)
    clip = 0.2
    loss, stats = clipped_policy_loss(log_prob - old, adv, clip, advantage_clip=0)
    ratio = (log_prob - old).exp()
    expected = torch.stack([-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)]).max(dim=0).values.mean()
    # equivalently PPO's -min(A r, A clip(r)):
    ppo = -torch.min(adv * ratio, adv * ratio.clamp(1 - clip, 1 + clip)).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, ppo)
    assert stats["ratio"] == pytest.approx(ratio.mean().item(), rel=1e-6)
    assert stats["clip_frac"] == pytest.approx(((ratio - 1).abs() > clip).float().mean().item())
    assert 0 < stats["clip_frac"] < 1  # the random inputs cover both cases


@pytest.mark.parametrize(("advantage", "log_ratio", "clipped"), [
    (1.0, 1.0, True),     # A > 0, r = e >> 1 + c: no incentive to raise r further
    (-1.0, -1.0, True),   # A < 0, r = 1/e << 1 - c: no incentive to lower r further
    (1.0, -1.0, False),   # A > 0, r << 1 - c: the unclipped (pessimistic) term is active
    (-1.0, 1.0, False),   # A < 0, r >> 1 + c: the unclipped term is active
    (1.0, 0.0, False),    # inside the trust region
    (-1.0, 0.0, False),
])
def test_clipped_side_has_zero_gradient(advantage, log_ratio, clipped):
    clip = 0.2
    log_ratios = torch.full((2,), log_ratio).requires_grad_(True)
    adv = torch.full((2,), advantage)
    loss, stats = clipped_policy_loss(log_ratios, adv, clip)
    loss.backward()
    if clipped:
        assert torch.equal(log_ratios.grad, torch.zeros(2))
    else:
        # d/dlogr of mean(-A r) = -A r / n
        ratio = torch.full((2,), float(torch.tensor(log_ratio).exp()))
        torch.testing.assert_close(log_ratios.grad, -adv * ratio / 2)
        assert (log_ratios.grad != 0).all()
    assert stats["clip_frac"] == (0.0 if log_ratio == 0 else 1.0)
    assert stats["ratio"] == pytest.approx(float(torch.tensor(log_ratio).exp()), rel=1e-6)


# ---- 3. gaussian_kl ----

def test_gaussian_kl_is_flow_grpos_kl():
    """Flow-GRPO: mean_CHW((mu - mu_ref)^2) / (2 std_dev_t^2), std_dev_t = the step std / sqrt(-dt):
    the exact per-element KL (torch.distributions) times -dt."""
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(3, *SHAPE, generator=g)
    reference = torch.randn(3, *SHAPE, generator=g)
    std = torch.rand(3, 1, 1, 1, generator=g) + 0.2  # the step's std, std_dev_t * sqrt(-dt)
    dt = -0.05
    kl = gaussian_kl(mean, reference, std, dt)
    std_dev_t = std / (-dt) ** 0.5
    flow_grpo = ((mean - reference) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std.expand_as(mean)),
                                              torch.distributions.Normal(reference, std.expand_as(reference)))
    assert kl.shape == (3,)
    torch.testing.assert_close(kl, flow_grpo.flatten(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kl, exact.flatten(1).mean(dim=1) * (-dt), rtol=1e-5, atol=1e-7)
    assert torch.equal(gaussian_kl(mean, mean, std, dt), torch.zeros(3))


def test_the_loss_is_flow_grpos_on_a_hand_made_example():
    """Two siblings, four elements each: log-probs in the per-element mean form, advantages clamped at 5."""
    mean = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    old_mean = torch.tensor([[0.01, 0.99, 2.0, 3.02]])
    std = torch.tensor([[0.5]])
    samples = torch.tensor([[[0.2, 0.8, 2.1, 2.9]], [[-0.1, 1.3, 1.8, 3.1]]])
    advantages = torch.tensor([[7.0], [-0.5]])  # 7 is clamped to 5
    log_prob_new = -((samples - mean) ** 2) / (2 * 0.25) - torch.log(torch.tensor(0.5)) - 0.5 * math.log(2 * math.pi)
    log_prob_old = -((samples - old_mean) ** 2) / (2 * 0.25) - torch.log(torch.tensor(0.5)) - 0.5 * math.log(2 * math.pi)
    ratio = torch.exp(log_prob_new.mean(dim=-1) - log_prob_old.mean(dim=-1))  # Flow-GRPO: exp(mean lp - mean lp_old)
    clamped = torch.tensor([[5.0], [-0.5]])
    clip = 1e-3
    expected = torch.maximum(-clamped * ratio, -clamped * ratio.clamp(1 - clip, 1 + clip)).mean()
    from drm.sde import sde_log_ratio

    log_ratio = torch.stack([sde_log_ratio(x, mean, old_mean, std) for x in samples])
    loss, _ = clipped_policy_loss(log_ratio, advantages, clip)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_float_noise_in_the_recompute_clips_almost_nothing():
    """With the mean form, a recompute that differs only by bf16 rounding keeps the ratio inside 1 +- 1e-4;
    with the sum over a 512 px latent (65,536 elements) about half the terms clipped on noise alone."""
    from drm.sde import sde_log_ratio

    g = torch.Generator().manual_seed(3)
    old_mean = torch.randn(8, 16, 64, 64, generator=g)
    std = torch.full((8, 1, 1, 1), 0.3)
    samples = (old_mean + std * torch.randn(old_mean.shape, generator=g))[None]
    mean = old_mean.bfloat16().float()  # the recompute, rounded as bf16 would
    log_ratio = torch.stack([sde_log_ratio(x, mean, old_mean, std) for x in samples])
    _, stats = clipped_policy_loss(log_ratio, torch.ones(1, 8), 1e-4)
    assert stats["clip_frac"] < 0.2, stats
    summed = log_ratio * old_mean[0].numel()  # what the summed log-probs give for the same recompute
    assert ((summed.exp() - 1).abs() > 1e-4).float().mean() > 0.4


# ---- 4. on-policy ratio is exactly 1 ----

@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_step_grpo_on_policy_ratio_is_exactly_one(cfg):
    policy, cond = TinyPolicy(batch_sensitive=True), make_bank(3)
    records, _, _ = step_rollout(policy, RecordingReward(torch.ones(3)), cond, [5, 6, 7], cfg=cfg)
    assert len(records) == 3
    policy.calls.clear()
    out = policy_loss(policy, records, cond, cfg, 0.7, clip_range=1e-4)
    assert out["ratio"] == 1.0
    assert out["clip_frac"] == 0.0
    # one forward with gradient per record, with the rollout's batch composition (the conditional only)
    assert policy.calls == [3] * len(records)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (policy.scale, policy.bias, policy.ctx))


@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_grpo_on_policy_ratio_is_exactly_one(cfg):
    policy, cond = TinyPolicy(batch_sensitive=True), make_bank(2)
    group = 3
    records, _, _ = grpo_rollout(policy, RecordingReward(torch.ones(2)), cond, [5, 6], cfg=cfg, group=group)
    assert len(records) == 3
    policy.calls.clear()
    out = policy_loss(policy, records, cond.rows(group_rows(2, group)), cfg, 0.7, clip_range=1e-4)
    assert out["ratio"] == 1.0
    assert out["clip_frac"] == 0.0
    assert policy.calls == [2 * group] * len(records)
    assert policy.bias.grad is not None and policy.bias.grad.abs().sum() > 0


def test_ratio_moves_off_one_when_the_policy_changes():
    """Control for the tests above: the recomputed log-prob does depend on the parameters."""
    policy, cond = TinyPolicy(), make_bank(3)
    records, _, _ = step_rollout(policy, RecordingReward(torch.ones(3)), cond, [5, 6, 7])
    with torch.no_grad():
        policy.bias.add_(0.05)
    out = policy_loss(policy, records, cond, 4.5, 0.7, clip_range=1e-4)
    assert out["ratio"] != 1.0 and out["clip_frac"] > 0


def test_kl_term_is_zero_at_the_reference_and_positive_away_from_it():
    cond = make_bank(2)
    at_reference = TinyPolicy(init=0.0)
    records, _, _ = step_rollout(at_reference, RecordingReward(torch.ones(2)), cond, [1, 2], cfg=1.0)
    out = policy_loss(at_reference, records, cond, 1.0, 0.7, clip_range=0.2, kl_beta=0.5)
    assert out["kl"] == 0.0

    policy = TinyPolicy(init=0.1)
    records, _, _ = step_rollout(policy, RecordingReward(torch.ones(2)), cond, [1, 2], cfg=1.0)
    out = policy_loss(policy, records, cond, 1.0, 0.7, clip_range=0.2, kl_beta=0.5)
    expected = []
    for r in records:
        sig = torch.full((2,), r.sigma)
        mean, std = sde_mean_std(r.parent, policy.predict(r.parent, sig, cond.context, cond.pooled), r.sigma,
                                 r.sigma_next, 0.7)
        ref = policy.predict(r.parent, sig, cond.context, cond.pooled, lora=False)
        ref_mean, _ = sde_mean_std(r.parent, ref, r.sigma, r.sigma_next, 0.7)
        expected.append(gaussian_kl(mean, ref_mean, std, r.sigma_next - r.sigma).mean().item())
    assert out["kl"] > 0
    assert out["kl"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_kl_reference_is_the_lora_off_cfg_transition():
    policy, cond, cfg, n = TinyPolicy(init=0.1), make_bank(2), 4.5, 2
    records, _, _ = step_rollout(policy, RecordingReward(torch.ones(n)), cond, [1, 2], cfg=cfg)
    out = policy_loss(policy, records, cond, cfg, 0.7, clip_range=0.2, kl_beta=0.5)
    negative = (cond.negative_context.expand(n, -1, -1), cond.negative_pooled.expand(n, -1))
    expected = []
    with torch.no_grad():
        for r in records:
            sig = torch.full((n,), r.sigma)

            def transition(lora, r=r, sig=sig):
                c = policy.predict(r.parent, sig, cond.context, cond.pooled, lora=lora)
                u = policy.predict(r.parent, sig, *negative, lora=lora)
                return sde_mean_std(r.parent, u + cfg * (c - u), r.sigma, r.sigma_next, 0.7)

            (mean, std), (ref_mean, _) = transition(True), transition(False)
            expected.append(gaussian_kl(mean, ref_mean, std, r.sigma_next - r.sigma).mean().item())
    assert out["kl"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)


# ---- 5. one shared parent forward == K separate forwards ----

@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_shared_parent_gradient_equals_separate_children(cfg):
    policy, cond = TinyPolicy(), make_bank(3)
    branches, eta, clip = 4, 0.7, 0.2
    records, _, _ = step_rollout(policy, RecordingReward(torch.tensor([0.5, 1.0, 2.0])), cond, [3, 4, 5],
                                 cfg=cfg, branches=branches)
    record = records[1]
    with torch.no_grad():  # off-policy, so the ratios differ from 1 and some terms clip
        policy.scale.add_(0.03)
        policy.bias.sub_(0.02)

    def denoised():
        sig = torch.full((3,), record.sigma)
        conditional = policy.predict(record.parent, sig, cond.context, cond.pooled)
        return record.uncond + cfg * (conditional - record.uncond) if cfg != 1.0 else conditional

    zero_grads(policy)
    shared_loss, shared_stats, _ = transition_loss(denoised(), record.parent, record.sigma, record.sigma_next, eta,
                                                   record.samples, record.old_mean, record.advantages, clip)
    shared_loss.backward()
    shared = grads(policy)

    zero_grads(policy)
    separate_loss, clip_fracs = 0.0, []
    for k in range(branches):
        loss, stats, _ = transition_loss(denoised(), record.parent, record.sigma, record.sigma_next, eta,
                                         record.samples[k:k + 1], record.old_mean,
                                         record.advantages[k:k + 1], clip)
        (loss / branches).backward()
        separate_loss += loss.item() / branches
        clip_fracs.append(stats["clip_frac"])
    separate = grads(policy)

    assert shared_stats["ratio"] != 1.0
    assert shared_loss.item() == pytest.approx(separate_loss, rel=1e-6, abs=1e-7)
    assert shared_stats["clip_frac"] == pytest.approx(sum(clip_fracs) / branches)
    for a, b in zip(shared, separate):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---- 6. rollout invariances ----

def _assert_records_equal(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert (ra.step, ra.sigma, ra.sigma_next) == (rb.step, rb.sigma, rb.sigma_next)
        for name in ("parent", "uncond", "samples", "old_mean", "advantages"):
            assert torch.equal(getattr(ra, name), getattr(rb, name)), name


@pytest.mark.parametrize("algorithm", ["step-grpo", "grpo"])
def test_same_generators_give_identical_rollouts(algorithm):
    policy, cond, weight = TinyPolicy(), make_bank(3), torch.tensor([0.5, 1.0, 2.0])
    run = step_rollout if algorithm == "step-grpo" else grpo_rollout
    rec_a, x_a, stats_a = run(policy, RecordingReward(weight), cond, [11, 12, 13])
    rec_b, x_b, stats_b = run(policy, RecordingReward(weight), cond, [11, 12, 13])
    rec_c, x_c, _ = run(policy, RecordingReward(weight), cond, [11, 12, 14])
    _assert_records_equal(rec_a, rec_b)
    assert torch.equal(x_a, x_b) and stats_a == stats_b
    assert not torch.equal(x_a, x_c)  # a different seed does change the rollout


@pytest.mark.parametrize("algorithm", ["step-grpo", "grpo"])
def test_prompts_split_over_calls_equal_one_call(algorithm):
    """Rolling out prompts [0..3] at once equals [0, 1] and [2, 3] separately: multi-process == one process."""
    config = GRPOConfig(seed=7, branches=3, group=3)
    policy, bank, weight = TinyPolicy(), make_bank(4), torch.tensor([0.5, 1.0, 2.0, -1.0])
    iteration, micro = 2, 1

    def run(positions):
        ids = torch.tensor(list(positions))
        generators = prompt_generators(config, iteration, micro, positions)
        trained = {0, 1, 2}
        if algorithm == "step-grpo":
            return rollout_step_grpo(policy, RecordingReward(weight[ids]), bank.rows(ids), generators, SIGMAS,
                                     SHAPE, 4.5, 0.7, config.branches, trained, CPU)
        return rollout_grpo(policy, RecordingReward(weight[ids]), bank.rows(ids), generators, SIGMAS, SHAPE, 4.5,
                            0.7, config.group, trained, CPU)

    whole, x_whole, _ = run(range(0, 4))
    first, x_first, _ = run(range(0, 2))
    second, x_second, _ = run(range(2, 4))
    assert len(whole) == len(first) == len(second) == 3
    assert torch.equal(x_whole, torch.cat([x_first, x_second]))
    for w, a, b in zip(whole, first, second):
        assert torch.equal(w.parent, torch.cat([a.parent, b.parent]))
        assert torch.equal(w.uncond, torch.cat([a.uncond, b.uncond]))
        assert torch.equal(w.samples, torch.cat([a.samples, b.samples], dim=1))
        assert torch.equal(w.old_mean, torch.cat([a.old_mean, b.old_mean]))
        assert torch.equal(w.advantages, torch.cat([a.advantages, b.advantages], dim=1))


def test_prompt_generators_depend_on_position_not_on_the_split():
    config = GRPOConfig(seed=3)
    whole = [torch.randn(5, generator=g) for g in prompt_generators(config, 4, 0, range(0, 4))]
    split = [torch.randn(5, generator=g) for g in
             prompt_generators(config, 4, 0, range(0, 2)) + prompt_generators(config, 4, 0, range(2, 4))]
    assert all(torch.equal(a, b) for a, b in zip(whole, split))
    firsts = {round(t[0].item(), 6) for t in whole}
    assert len(firsts) == 4  # every prompt has its own stream
    for other in (prompt_generators(config, 5, 0, range(1)), prompt_generators(config, 4, 1, range(1)),
                  prompt_generators(GRPOConfig(seed=4), 4, 0, range(1))):
        assert not torch.equal(torch.randn(5, generator=other[0]), whole[0])


def test_any_accepted_seed_works_and_neighbouring_seeds_do_not_replay_each_other():
    """--seed goes up to 2**63 - 1; torch seeds stop at 2**64 - 1. Seeds s and s + 1 are separate replications,
    so seed 1's iteration 0 must not be seed 0's iteration 1 (as it was with seed + iteration)."""
    largest = GRPOConfig(seed=2**63 - 1)
    assert [torch.randn(3, generator=g).shape for g in prompt_generators(largest, 299, 3, range(2))] == [(3,), (3,)]
    assert len(trained_steps(GRPOConfig(seed=2**63 - 1, steps=10, train_steps="random", random_steps=3), 5)) == 3
    seed0 = [run_seed(0, 1_000_003, i) for i in range(4)]
    assert seed0 == [0, 1, 2, 3]  # seed 0's orders are as before (the demo's figures depend on them)
    assert not {run_seed(1, 1_000_003, i) for i in range(300)} & {run_seed(0, 1_000_003, i) for i in range(300)}
    assert 0 <= run_seed(2**63 - 1, 1_000_003, 299) < 2**64


# ---- 7. Step-GRPO records ----

def test_step_grpo_records():
    batch, branches = 3, 4
    policy, cond = TinyPolicy(), make_bank(batch)
    reward = RecordingReward(torch.tensor([0.5, 1.0, 2.0]))
    records, final, stats = step_rollout(policy, reward, cond, [21, 22, 23], branches=branches,
                                         trained=set(range(len(SIGMAS) - 1)))
    steps = len(SIGMAS) - 1
    assert [r.step for r in records] == list(range(steps - 1))  # every trained step but the last
    assert all(r.sigma_next > 0 for r in records)
    assert final.shape == (batch, *SHAPE)
    assert len(reward.calls) == len(records)  # all K * B candidates of a step in one call
    for r, (x, sigma, rows, scores) in zip(records, reward.calls):
        assert (r.sigma, r.sigma_next) == (float(SIGMAS[r.step]), float(SIGMAS[r.step + 1]))
        assert r.parent.shape == r.uncond.shape == (batch, *SHAPE)
        assert r.samples.shape == (branches, batch, *SHAPE)
        assert r.old_mean.shape == r.parent.shape and r.advantages.shape == (branches, batch)
        assert sigma == r.sigma_next
        assert x.shape == (branches * batch, *SHAPE)
        assert torch.equal(x, r.samples.flatten(0, 1))  # row k * B + b is sibling k of prompt b
        assert torch.equal(x[1 * batch + 2], r.samples[1, 2])
        assert torch.equal(rows, torch.arange(batch).repeat(branches))
        # advantages: the sibling scores normalised per prompt, over its K siblings (rows b, B + b, 2B + b, ...)
        for b in range(batch):
            siblings = [scores[k * batch + b].item() for k in range(branches)]
            torch.testing.assert_close(r.advantages[:, b], torch.tensor(standardised(siblings)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r.advantages.mean(dim=0), torch.zeros(batch), rtol=0, atol=1e-5)
        # std is 1 up to the eps in (R - mean) / (std + eps)
        torch.testing.assert_close(r.advantages.std(dim=0, unbiased=False), torch.ones(batch), rtol=0, atol=1e-2)
        # the siblings are distinct draws from one parent
        assert not torch.equal(r.samples[0], r.samples[1])
    # the trajectory goes on from one of the K siblings, per prompt
    for prev, nxt in zip(records, records[1:]):
        for b in range(batch):
            assert any(torch.equal(nxt.parent[b], prev.samples[k, b]) for k in range(branches)), (prev.step, b)
    assert "step_reward" in stats


def test_step_grpo_records_only_the_trained_steps():
    policy, cond = TinyPolicy(), make_bank(2)
    reward = RecordingReward(torch.ones(2))
    records, _, _ = step_rollout(policy, reward, cond, [1, 2], trained={1, 3})  # 3 is the last step
    assert [r.step for r in records] == [1]
    assert len(reward.calls) == 1 and reward.calls[0][1] == float(SIGMAS[2])
    records, _, _ = step_rollout(policy, RecordingReward(torch.ones(2)), cond, [1, 2], trained=set())
    assert records == []


def test_step_grpo_old_mean_is_the_rollouts_transition_mean():
    policy, cond, cfg = TinyPolicy(), make_bank(2), 4.5
    records, _, _ = step_rollout(policy, RecordingReward(torch.ones(2)), cond, [8, 9], cfg=cfg, branches=3)
    for r in records:
        sig = torch.full((2,), r.sigma)
        with torch.no_grad():
            conditional = policy.predict(r.parent, sig, cond.context, cond.pooled)
            uncond = policy.predict(r.parent, sig, cond.negative_context.expand(2, -1, -1),
                                    cond.negative_pooled.expand(2, -1))
        assert torch.equal(uncond, r.uncond)
        mean, _ = sde_mean_std(r.parent, uncond + cfg * (conditional - uncond), r.sigma, r.sigma_next, 0.7)
        torch.testing.assert_close(r.old_mean, mean)


# ---- 8. GRPO records ----

def test_grpo_records():
    batch, group = 3, 4
    policy, cond = TinyPolicy(), make_bank(batch)
    reward = RecordingReward(torch.tensor([0.5, 1.0, 2.0]))
    records, final, stats = grpo_rollout(policy, reward, cond, [31, 32, 33], group=group)
    steps = len(SIGMAS) - 1
    assert [r.step for r in records] == list(range(steps - 1))
    assert final.shape == (batch * group, *SHAPE)
    # one reward call, at sigma 0, on the final latents, rows prompt-major (b repeated G times)
    assert len(reward.calls) == 1
    x, sigma, rows, scores = reward.calls[0]
    assert sigma == 0.0
    assert torch.equal(x, final)
    assert torch.equal(rows, torch.arange(batch).repeat_interleave(group))
    assert torch.equal(group_rows(batch, group), rows)
    # each prompt's G trajectories are rows b * G .. b * G + G - 1 (prompt-major)
    expected = torch.tensor([a for b in range(batch) for a in standardised(scores[b * group:(b + 1) * group].tolist())])
    for r in records:
        assert r.parent.shape == r.uncond.shape == (batch * group, *SHAPE)
        assert r.samples.shape == (1, batch * group, *SHAPE)
        assert r.old_mean.shape == r.parent.shape and r.advantages.shape == (1, batch * group)
        assert torch.equal(r.advantages, records[0].advantages)  # the same advantage at every trained step
        torch.testing.assert_close(r.advantages[0], expected, rtol=1e-4, atol=1e-4)
    per_group = records[0].advantages.view(batch, group)
    torch.testing.assert_close(per_group.mean(dim=1), torch.zeros(batch), rtol=0, atol=1e-5)
    torch.testing.assert_close(per_group.std(dim=1, unbiased=False), torch.ones(batch), rtol=0, atol=1e-2)
    # each row is one trajectory: a record's action is the next record's parent
    for prev, nxt in zip(records, records[1:]):
        assert torch.equal(nxt.parent, prev.samples[0])
    # the G trajectories of one prompt start from different noise
    start = records[0].parent.view(batch, group, -1)
    assert not torch.equal(start[0, 0], start[0, 1])
    assert stats["terminal_reward"] == pytest.approx(scores.mean().item())


def test_grpo_records_only_trained_steps_and_still_rewards_at_the_end():
    policy, cond = TinyPolicy(), make_bank(2)
    reward = RecordingReward(torch.ones(2))
    records, _, _ = grpo_rollout(policy, reward, cond, [1, 2], trained={0, 3})
    assert [r.step for r in records] == [0]
    assert len(reward.calls) == 1 and reward.calls[0][1] == 0.0


# ---- 9. a few optimizer steps raise the reward ----

class MeanReward:
    def __call__(self, x, sigma, rows):
        return x.float().flatten(1).mean(dim=1)


@torch.no_grad()
def final_reward(policy, cond) -> float:
    """Mean reward of final latents for fixed noise (common random numbers before and after training)."""
    _, x, _ = step_rollout(policy, MeanReward(), cond, range(100, 100 + cond.context.shape[0]), cfg=4.5, trained=set())
    return MeanReward()(x, 0.0, None).mean().item()


@pytest.mark.parametrize("algorithm", ["step-grpo", "grpo"])
def test_a_few_updates_raise_the_reward(algorithm):
    torch.manual_seed(0)
    batch, cfg, eta = 4, 4.5, 0.7
    policy, cond = TinyPolicy(seed=1), make_bank(batch)
    optimizer = torch.optim.Adam([policy.scale, policy.bias, policy.ctx], lr=1e-2)
    before = final_reward(policy, cond)
    bias_before = policy.bias.detach().clone()
    for iteration in range(8):
        seeds = [1000 * iteration + p for p in range(batch)]
        if algorithm == "step-grpo":
            records, _, _ = step_rollout(policy, MeanReward(), cond, seeds, cfg=cfg, branches=4, eta=eta)
            record_cond = cond
        else:
            records, _, _ = grpo_rollout(policy, MeanReward(), cond, seeds, cfg=cfg, group=4, eta=eta)
            record_cond = cond.rows(group_rows(batch, 4))
        out = policy_loss(policy, records, record_cond, cfg, eta, clip_range=0.2)
        assert out["ratio"] == 1.0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = final_reward(policy, cond)
    assert after > before + 0.05, (before, after)
    assert (policy.bias.detach() - bias_before).mean() > 0.02  # the learnable bias moved up


# ---- 10. GRPOConfig.validate, trained_steps ----

@pytest.fixture
def run_files(tmp_path) -> dict[str, str]:
    shapes = {"x_embedder.proj.weight": (128, 16, 2, 2), "context_embedder.weight": (128, 4096)}
    save_file({k: torch.zeros(v) for k, v in shapes.items()}, str(tmp_path / "base.safetensors"))
    save_file({k: torch.zeros(v) for k, v in shapes.items()}, str(tmp_path / "drm.safetensors"))
    (tmp_path / "prompts.txt").write_text("a red cube\na blue sphere\n", encoding="utf-8")
    return {"base": str(tmp_path / "base.safetensors"), "drm": str(tmp_path / "drm.safetensors"),
            "prompts": str(tmp_path / "prompts.txt"), "out": str(tmp_path / "run")}


def make_config(run_files, **overrides) -> GRPOConfig:
    return GRPOConfig(**{**run_files, **overrides})


@pytest.mark.parametrize("overrides", [
    {},
    {"algorithm": "grpo"},
    {"algorithm": "step-grpo", "group": 1},  # G only matters for grpo
    {"algorithm": "grpo", "branches": 1},  # K only matters for step-grpo
    {"steps": 2},
    {"train_steps": "window", "window_start": 2, "window_end": 5, "steps": 6},
    {"train_steps": "window", "window_start": 0, "window_end": 0},  # end 0 means steps
    {"train_steps": "random", "random_steps": 2},
])
def test_validate_accepts_good_configs(run_files, overrides):
    make_config(run_files, **overrides).validate()


@pytest.mark.parametrize(("overrides", "name"), [
    ({"algorithm": "step-grpo", "branches": 1}, "branches"),
    ({"algorithm": "grpo", "group": 1}, "group"),
    ({"steps": 1}, "steps"),
    ({"steps": 0}, "steps"),
    ({"train_steps": "window", "window_start": 3, "window_end": 2, "steps": 6}, "window_start"),
    ({"train_steps": "window", "window_start": 2, "window_end": 2, "steps": 6}, "window_start"),
    ({"train_steps": "window", "window_start": 0, "window_end": 7, "steps": 6}, "window_start"),
    ({"train_steps": "window", "window_start": -1, "window_end": 3, "steps": 6}, "window_start"),
    ({"train_steps": "window", "window_start": 6, "window_end": 0, "steps": 6}, "window_start"),
    ({"train_steps": "sometimes"}, "train_steps"),
    ({"eta": 0.0}, "eta"),
    ({"eta": -0.5}, "eta"),
    ({"algorithm": "ppo"}, "algorithm"),
    ({"random_steps": 0, "train_steps": "random"}, "random_steps"),
    ({"warmup_steps": -1}, "warmup_steps"),
])
def test_validate_refuses_naming_the_field(run_files, overrides, name):
    with pytest.raises(ConfigError) as info:
        make_config(run_files, **overrides).validate()
    assert str(info.value).startswith(name), str(info.value)


@pytest.mark.parametrize("content, suffix, message", [
    ("\n# only a comment\n", ".txt", "holds no prompts"),
    ('{"text": "a red cube"}\n', ".jsonl", 'line 1: expected an object with a "prompt" string'),
    ("a red cube\n", ".csv", "neither .txt, .jsonl nor"),
])
def test_validate_reads_prompt_files_before_any_model_loads(run_files, tmp_path, content, suffix, message):
    path = tmp_path / f"bad-prompts{suffix}"
    path.write_text(content, encoding="utf-8")
    for name in ("prompts", "eval_prompts"):
        with pytest.raises(ConfigError, match=f"^{name}: .*{message}"):
            make_config(run_files, **{name: str(path)}).validate()


@pytest.mark.parametrize("name", ["prompts", "base", "drm"])
def test_validate_refuses_a_missing_file(run_files, tmp_path, name):
    with pytest.raises(ConfigError, match=f"^{name}: file .*does not exist"):
        make_config(run_files, **{name: str(tmp_path / "missing" / f"{name}.safetensors")}).validate()
    with pytest.raises(ConfigError, match=f"^{name}: required"):
        make_config(run_files, **{name: ""}).validate()


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_validate_refuses_a_drm_that_does_not_fit_the_base(run_files, tmp_path, prefix):
    base = {prefix + "x_embedder.proj.weight": torch.zeros(128, 16, 2, 2),
            prefix + "context_embedder.weight": torch.zeros(128, 4096)}
    save_file(base, str(tmp_path / "base.safetensors"))
    make_config(run_files).validate()  # the matching DRM fits with or without the checkpoint prefix
    save_file({"x_embedder.proj.weight": torch.zeros(128, 16, 2, 2), "context_embedder.weight": torch.zeros(128, 2048)},
              str(tmp_path / "drm.safetensors"))
    with pytest.raises(ConfigError, match=r"^drm: .*context_embedder\.weight"):
        make_config(run_files).validate()


def test_validate_refuses_an_out_dir_holding_another_run(run_files):
    from trainer.runs import save_checkpoint

    Path(run_files["out"]).mkdir()
    (Path(run_files["out"]) / "run.json").write_text("{}", encoding="utf-8")
    save_checkpoint(Path(run_files["out"]), {"w": torch.zeros(1)}, {"iteration": 1})
    with pytest.raises(ConfigError, match="^out: "):
        make_config(run_files).validate()


def test_validate_refuses_a_window_with_no_trainable_step(run_files):
    config = make_config(run_files, steps=6, train_steps="window", window_start=5, window_end=0)
    assert trained_steps(config, 0) == set()
    with pytest.raises(ConfigError, match="^window_start"):
        config.validate()


def test_trained_steps_all_and_window():
    assert trained_steps(GRPOConfig(steps=6), 0) == {0, 1, 2, 3, 4}
    assert trained_steps(GRPOConfig(steps=2), 3) == {0}
    assert trained_steps(GRPOConfig(steps=6, train_steps="window", window_start=1, window_end=4), 0) == {1, 2, 3}
    # end 0 means steps; the last (deterministic) step is still never trained
    assert trained_steps(GRPOConfig(steps=6, train_steps="window", window_start=2, window_end=0), 0) == {2, 3, 4}
    assert trained_steps(GRPOConfig(steps=6, train_steps="window", window_start=2, window_end=6), 0) == {2, 3, 4}


def test_trained_steps_random_is_distinct_and_deterministic():
    config = GRPOConfig(steps=10, train_steps="random", random_steps=3, seed=5)
    draws = [trained_steps(config, it) for it in range(12)]
    for steps in draws:
        assert len(steps) == 3 and steps <= set(range(9))  # distinct, never the last step (9)
    assert draws == [trained_steps(config, it) for it in range(12)]  # deterministic per (seed, iteration)
    assert len({frozenset(s) for s in draws}) > 1  # changes with the iteration
    other_seed = [trained_steps(GRPOConfig(steps=10, train_steps="random", random_steps=3, seed=6), it)
                  for it in range(12)]
    assert other_seed != draws
    # more steps asked than trainable: all trainable steps
    assert trained_steps(GRPOConfig(steps=4, train_steps="random", random_steps=10), 0) == {0, 1, 2}


def test_trainer_modules_do_not_import_comfy():
    code = ("import sys, trainer.grpo.train, trainer.grpo.rollout, trainer.grpo.loss; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('comfy', 'comfy_extras', 'folder_paths', 'nodes', 'accelerate')); "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_are_refused_before_they_become_advantages(bad):
    rewards = torch.tensor([[0.1, 0.5, bad, 0.2]])
    with pytest.raises(ValueError, match="1 rewards are NaN or infinite"):
        group_advantages(rewards)


def test_global_std_divides_by_the_std_of_all_the_batchs_rewards():
    """Flow-GRPO's global_std: per-prompt mean, population std over every reward of the batch, + 1e-4."""
    rewards = torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.5, 11.0]])
    everything = torch.cat([rewards.flatten(), torch.tensor([0.0, 20.0])])  # other processes' rewards too
    expected = (rewards - rewards.mean(dim=1, keepdim=True)) / (everything.std(unbiased=False) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, std_of=everything), expected)
    # per group, a nearly flat group's tiny spread becomes +-1.2; over the batch it stays small
    assert group_advantages(rewards)[1].abs().max() > 1.2 > group_advantages(rewards, std_of=everything)[1].abs().max()


@pytest.mark.parametrize(("algorithm", "setting", "resolved"), [
    ("grpo", "auto", "global"), ("step-grpo", "auto", "group"), ("grpo", "group", "group"),
    ("step-grpo", "global", "global")])
def test_advantage_std_auto_is_flow_grpos_for_grpo_and_the_papers_for_step_grpo(algorithm, setting, resolved):
    from trainer.grpo.train import resolved_advantage_std

    assert resolved_advantage_std(GRPOConfig(algorithm=algorithm, advantage_std=setting)) == resolved


def test_flow_grpo_defaults():
    config = GRPOConfig()
    assert (config.scheduler, config.eta, config.cfg, config.clip_range, config.advantage_clip) == \
        ("normal", 0.7, 4.5, 1e-4, 5.0)
