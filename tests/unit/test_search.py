"""Unit tests for drm/search.py: step-wise reward search, on Gaussian data with an exact denoiser."""

from __future__ import annotations

import pytest
import torch

from drm.search import sample_drm_stepwise

# x0 ~ N(MU, TAU^2 I) in DIM dimensions, so E[x0 | x_s] is exact (see test_sde.py for the derivation).
MU, TAU, DIM, BATCH = 0.5, 0.6, 8, 64
# Linear reward w . x0 with |w| = 1; at noise level s it is scored on the exact denoised estimate.
W = torch.ones(DIM) / DIM**0.5


def gaussian_model(x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
    """k-diffusion style model: (x, sigma * s_in) -> E[x0 | x_s] for Gaussian data."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return MU + (1 - s) * TAU**2 / ((1 - s) ** 2 * TAU**2 + s**2) * (x - (1 - s) * MU)


def linear_reward(candidates: torch.Tensor, sigma_next: torch.Tensor, parent_index: torch.Tensor) -> torch.Tensor:
    return gaussian_model(candidates, sigma_next * candidates.new_ones(candidates.shape[0])) @ W


def identity_model(x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
    """denoised = x: the velocity is 0, so with eta = 0 every child is an exact copy of its parent."""
    return x.clone()


def start_noise(batch: int = BATCH, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, DIM, generator=torch.Generator().manual_seed(seed))


SIGMAS = torch.linspace(1.0, 0.0, 11)


def run(x=None, sigmas=SIGMAS, **kwargs) -> torch.Tensor:
    kwargs = {"model": gaussian_model, "reward_fn": linear_reward, "disable": True, **kwargs}
    return sample_drm_stepwise(x=start_noise() if x is None else x, sigmas=sigmas, **kwargs)


@pytest.mark.parametrize(("mode", "window"), [("greedy", (0, None)), ("beam", (0, None)), ("greedy", (0, 0))])
def test_one_branch_without_noise_is_the_euler_sampler(mode, window):
    x = start_noise(8)
    out = run(x, branches=1, eta=0.0, mode=mode, window=window)
    euler = x.clone()
    for i in range(len(SIGMAS) - 1):
        s, s_next = SIGMAS[i], SIGMAS[i + 1]
        euler = euler + (euler - gaussian_model(euler, s.expand(8))) / s * (s_next - s)
    torch.testing.assert_close(out, euler, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["greedy", "beam", "resample"])
def test_same_seed_same_output_and_different_seeds_differ(mode):
    a = run(mode=mode, seed=7)
    assert torch.equal(a, run(mode=mode, seed=7))
    assert not torch.equal(a, run(mode=mode, seed=8))
    # Without `seed`, the sampler falls back to extra_args["seed"] (ComfyUI passes the noise seed there).
    assert torch.equal(a, run(mode=mode, extra_args={"seed": 7}))


def test_greedy_reward_rises_with_branches():
    rewards = [(run(branches=k, seed=0) @ W).mean().item() for k in (1, 2, 4, 8)]
    assert all(lo < hi for lo, hi in zip(rewards, rewards[1:], strict=False)), rewards
    # K = 1 is plain SDE sampling: its mean reward is close to w . mu.
    assert abs(rewards[0] - (W * MU).sum().item()) < 0.2


@pytest.mark.parametrize(("mode", "extra"), [("beam", {"beam_width": 2}), ("resample", {"temperature": 0.1})])
def test_beam_and_resample_do_at_least_as_well_as_greedy(mode, extra):
    # Per-step reward gaps are ~0.1-0.5 here, so resampling needs a temperature below them to select.
    for k in (2, 4):
        greedy = (run(branches=k, seed=0) @ W).mean().item()
        other = (run(branches=k, seed=0, mode=mode, **extra) @ W).mean().item()
        assert other >= greedy - 0.02, (k, greedy, other)


def test_branching_happens_only_inside_the_window():
    sigmas = torch.linspace(1.0, 0.0, 9)  # 8 steps
    calls, steps = [], {}

    def reward(candidates, sigma_next, parent_index):
        calls.append(candidates.shape[0])
        return linear_reward(candidates, sigma_next, parent_index)

    def on_step(i, chosen, candidates):
        steps[i] = (chosen, candidates)

    run(sigmas=sigmas, branches=3, window=(2, 5), reward_fn=reward, on_step=on_step, seed=0)
    assert calls == [BATCH * 3] * 3
    assert sorted(steps) == list(range(8))
    for i, (chosen, candidates) in steps.items():
        assert chosen.shape == (BATCH,)
        if i in (2, 3, 4):
            assert candidates.shape == (BATCH, 3)
            torch.testing.assert_close(chosen, candidates.max(dim=1).values)
        else:
            assert candidates is None and torch.isnan(chosen).all()

    # The default window branches at every step except the last one, which lands on sigma 0.
    calls.clear()
    run(sigmas=sigmas, branches=3, reward_fn=reward, seed=0)
    assert len(calls) == 7


@pytest.mark.parametrize(("mode", "candidates_per_item"), [("greedy", 4), ("beam", 3 * 4), ("resample", 4)])
def test_reward_fn_gets_all_candidates_in_one_call_with_their_parent_rows(mode, candidates_per_item):
    # With denoised = x and eta = 0 every candidate is an exact copy of the original row it descends from.
    x = start_noise(5) * 3 + torch.arange(5.0)[:, None]
    sigmas = torch.linspace(1.0, 0.0, 5)
    seen = []

    def reward(candidates, sigma_next, parent_index):
        seen.append(sigma_next.item())
        assert parent_index.dtype == torch.long
        assert candidates.shape == (5 * candidates_per_item, DIM)
        assert torch.equal(candidates, x[parent_index])
        return candidates.sum(dim=1)

    out = run(x, sigmas=sigmas, model=identity_model, reward_fn=reward, eta=0.0, branches=4, mode=mode,
              beam_width=3, seed=0)
    assert seen == sigmas[1:-1].tolist()  # one call per branching step, at the next noise level
    if mode == "resample":
        # Particles migrate between rows: the high-reward rows have taken over the population.
        assert (out.sum(dim=1) >= x.sum(dim=1).median()).all()
    else:
        assert torch.equal(out, x)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_the_best_candidate_per_item_is_kept(mode):
    # One branching step right before the last step; with denoised = x the last step returns the kept rows.
    x = start_noise(6)
    sigmas = torch.linspace(1.0, 0.0, 6)
    seen = {}

    def reward(candidates, sigma_next, parent_index):
        scores = candidates @ W
        seen.update(candidates=candidates, parent_index=parent_index, scores=scores)
        return scores

    out = run(x, sigmas=sigmas, model=identity_model, reward_fn=reward, branches=5, mode=mode,
              window=(3, 4), seed=1)
    for b in range(6):
        rows = (seen["parent_index"] == b).nonzero().squeeze(1)
        best = rows[seen["scores"][rows].argmax()]
        assert torch.equal(out[b], seen["candidates"][best])


def test_callback_sees_the_original_batch_and_interrupt_runs_before_each_call():
    x = start_noise(3)
    events, shapes = [], []

    def model(x, sigma, **extra_args):
        events.append("model")
        return gaussian_model(x, sigma)

    def reward(candidates, sigma_next, parent_index):
        events.append("reward")
        return linear_reward(candidates, sigma_next, parent_index)

    def callback(info):
        shapes.append((info["i"], tuple(info["x"].shape), tuple(info["denoised"].shape)))

    run(x, model=model, reward_fn=reward, mode="beam", beam_width=2, callback=callback,
        interrupt=lambda: events.append("interrupt"), seed=0)
    steps = len(SIGMAS) - 1
    assert shapes == [(i, (3, DIM), (3, DIM)) for i in range(steps)]
    assert events == ["interrupt", "model", "interrupt", "reward"] * (steps - 1) + ["interrupt", "model"]

    def cancel():
        raise InterruptedError

    with pytest.raises(InterruptedError):
        run(x, interrupt=cancel)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"branches": 0}, "branches"),
        ({"eta": -0.5}, "eta"),
        ({"mode": "best-of-n"}, "mode"),
        ({"beam_width": 0}, "beam_width"),
        ({"temperature": 0.0}, "temperature"),
        ({"window": (-1, None)}, "window_start and window_end"),
        ({"window": (6, 3)}, "window_start and window_end"),
        ({"window": (0, 11)}, "window_start and window_end"),
        ({"reward_fn": lambda c, s, p: torch.zeros(2)}, "reward_fn"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        run(**kwargs)


@pytest.mark.parametrize(("mode", "extra"), [("greedy", {}), ("beam", {"beam_width": 3})])
def test_an_item_gives_the_same_result_alone_or_in_any_batch(mode, extra):
    """Each item draws its candidates from its own generator (seed + its starting latent), as ComfyUI's
    prepare_noise gives item b the same starting noise alone (LatentFromBatch) or in a batch."""
    x = start_noise(5, seed=3)
    together = run(x, mode=mode, branches=3, seed=11, **extra)
    alone = run(x[2:3], mode=mode, branches=3, seed=11, **extra)
    reordered = run(x[[4, 2, 0]], mode=mode, branches=3, seed=11, **extra)
    torch.testing.assert_close(alone[0], together[2], rtol=0, atol=0)
    torch.testing.assert_close(reordered[1], together[2], rtol=0, atol=0)
    # and items still get different noise: two items that start alike end alike, others do not
    twins = run(torch.cat([x[:1], x[:1], x[1:2]]), mode=mode, branches=3, seed=11, **extra)
    assert torch.equal(twins[0], twins[1]) and not torch.equal(twins[0], twins[2])


@pytest.mark.parametrize("mode", ["greedy", "beam", "resample"])
def test_non_finite_rewards_stop_the_search(mode):
    def some_nan(candidates, sigma_next, parent_index):
        scores = linear_reward(candidates, sigma_next, parent_index)
        scores[1] = float("nan")
        return scores

    with pytest.raises(ValueError, match="NaN or infinite scores at step 0"):
        run(mode=mode, reward_fn=some_nan)
