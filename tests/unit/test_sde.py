"""Unit tests for drm/sde.py: the flow-matching SDE transition, its log-probability and its noise.

A step is taken as production takes it (drm/search.py, trainer/grpo/rollout.py): sde_mean_std once,
then mean + std * z with z from item_noise, and sde_log_prob of the rounded sample."""

from __future__ import annotations

import pytest
import torch

from drm.sde import item_noise, sde_log_prob, sde_log_ratio, sde_mean_std

# Gaussian data x0 ~ N(MU, TAU^2 I): x_s = (1 - s) x0 + s e is Gaussian too, so the exact denoiser and
# the exact marginal of x_s are known in closed form.
MU, TAU = 0.5, 0.6


def gaussian_denoiser(x: torch.Tensor, s) -> torch.Tensor:
    """E[x0 | x_s] for x0 ~ N(MU, TAU^2): MU + (1-s) TAU^2 / ((1-s)^2 TAU^2 + s^2) (x_s - (1-s) MU)."""
    s = torch.as_tensor(s, dtype=x.dtype)
    return MU + (1 - s) * TAU**2 / ((1 - s) ** 2 * TAU**2 + s**2) * (x - (1 - s) * MU)


def marginal(s: float) -> tuple[float, float]:
    """Mean and variance of x_s: N((1-s) MU, (1-s)^2 TAU^2 + s^2)."""
    return (1 - s) * MU, (1 - s) ** 2 * TAU**2 + s**2


def random_inputs(seed: int = 0, shape=(3, 4, 5, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def step(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next, eta: float = 0.7, seed: int = 1):
    """One step as production takes it: (sample in x's dtype, mean, std), with z from one generator per row."""
    mean, std = sde_mean_std(x, denoised, sigma, sigma_next, eta)
    generators = [torch.Generator().manual_seed(seed + b) for b in range(x.shape[0])]
    z = item_noise(generators, torch.arange(x.shape[0]), 1, tuple(x.shape[1:]))[0]
    return (mean + std * z).to(x.dtype), mean, std


@pytest.mark.parametrize(("sigma", "sigma_next"), [(1.0, 0.9), (0.6, 0.55), (0.3, 0.1)])
def test_eta_zero_is_an_euler_step(sigma, sigma_next):
    x, denoised = random_inputs()
    sample, _, std = step(x, denoised, sigma, sigma_next, eta=0.0)
    euler = x + (x - denoised) / sigma * (sigma_next - sigma)
    torch.testing.assert_close(sample, euler, rtol=0, atol=1e-6)
    assert torch.all(std == 0)


def test_log_prob_matches_torch_normal():
    x, denoised = random_inputs()
    sample, mean, std = step(x, denoised, 0.7, 0.6, eta=0.7)
    log_prob = sde_log_prob(sample, mean, std)
    assert log_prob.shape == (x.shape[0],) and log_prob.dtype == torch.float32
    assert torch.all(std > 0)
    expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(sample)
    # Flow-GRPO's reduction: the mean over the elements, not the sum
    torch.testing.assert_close(log_prob, expected.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)


def test_log_ratio_is_the_elementwise_difference_of_log_probs():
    x, denoised = random_inputs()
    old_mean, std = sde_mean_std(x, denoised, 0.7, 0.6, 0.7)
    new_mean = old_mean + 0.01 * torch.randn(old_mean.shape, generator=torch.Generator().manual_seed(2))
    sample = old_mean + std * torch.randn(old_mean.shape, generator=torch.Generator().manual_seed(3))
    expected = sde_log_prob(sample, new_mean, std) - sde_log_prob(sample, old_mean, std)
    torch.testing.assert_close(sde_log_ratio(sample, new_mean, old_mean, std), expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(sde_log_ratio(sample, old_mean, old_mean, std), torch.zeros(3))  # on-policy: exactly 1


def test_transition_std_and_mean_follow_the_formula():
    x, denoised = random_inputs()
    s, s_next, a = 0.7, 0.6, 0.7
    mean, std = sde_mean_std(x, denoised, s, s_next, a)
    v = (x - denoised) / s
    base_std = a * (s / (1 - s)) ** 0.5
    expected_mean = x + (v + base_std**2 / (2 * s) * (x + (1 - s) * v)) * (s_next - s)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, torch.full((3, 1, 1, 1), base_std * (s - s_next) ** 0.5))


def test_sigma_one_uses_sigma_next_in_the_denominator_only_as_flow_grpo():
    """Flow-GRPO: std_t = eta * sqrt(s / (1 - where(s == 1, s_next, s))); the step's noise std at s = 1 is eta."""
    x, denoised = random_inputs()
    s_next = 0.960129  # the second sigma of the 10-step SD3 schedule
    _, std = sde_mean_std(x, denoised, 1.0, s_next, eta=0.7)
    expected = 0.7 * (1.0 / (1 - s_next)) ** 0.5 * (1 - s_next) ** 0.5
    torch.testing.assert_close(std, torch.full_like(std, expected))
    assert abs(std.flatten()[0].item() - 0.7) < 1e-6  # was 0.686 with s_next in the numerator as well


def test_item_noise_draws_each_items_rows_from_its_own_generator_alone():
    """Rows of item b (origin == b), in row order, are one randn((k, rows, *shape)) of generator b."""
    origin, shape = torch.tensor([0, 1, 0, 0]), (2, 3)
    noise = item_noise([torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)], origin, 2, shape)
    assert noise.shape == (2, 4, *shape) and noise.dtype == torch.float32
    first = torch.randn((2, 3, *shape), generator=torch.Generator().manual_seed(3))
    second = torch.randn((2, 1, *shape), generator=torch.Generator().manual_seed(4))
    assert torch.equal(noise[:, [0, 2, 3]], first) and torch.equal(noise[:, [1]], second)
    # item 1 alone gets what it got in the batch; another seed gives other noise
    alone = item_noise([torch.Generator().manual_seed(4)], torch.tensor([0]), 2, shape)
    assert torch.equal(alone, noise[:, [1]])
    assert not torch.equal(item_noise([torch.Generator().manual_seed(5)], torch.tensor([0]), 2, shape), alone)


def test_item_noise_leaves_the_generator_of_an_item_without_rows_untouched():
    """After resampling an item may have no rows left; its stream must not advance meanwhile."""
    idle, busy = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    before = idle.get_state()
    item_noise([idle, busy], torch.tensor([1, 1]), 3, (2,))
    assert torch.equal(idle.get_state(), before)


def test_gradients_flow_through_mean():
    x, denoised = random_inputs()
    sample, step_mean, std = step(x, denoised, 0.5, 0.4)
    mean = step_mean.clone().requires_grad_(True)
    sde_log_prob(sample, mean, std).sum().backward()
    # d/dmean log N(sample; mean, std^2) = (sample - mean) / std^2, over the D elements averaged
    elements = sample[0].numel()
    torch.testing.assert_close(mean.grad, (sample - step_mean) / std**2 / elements, rtol=1e-4, atol=1e-6)


def test_last_step_to_zero_returns_denoised_exactly():
    x, denoised = random_inputs()
    sample, mean, std = step(x, denoised, 0.2, 0.0, eta=0.7)
    assert torch.equal(mean, denoised) and torch.equal(sample, denoised)
    assert torch.all(std == 0)
    assert torch.equal(sde_log_prob(sample, mean, std), torch.zeros(x.shape[0]))


def test_per_row_sigmas_match_scalar_calls():
    x, denoised = random_inputs()
    sigmas, sigmas_next = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.9, 0.4, 0.0])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    mean, std = sde_mean_std(x, denoised, sigmas, sigmas_next)
    sample = mean + std * noise
    log_prob = sde_log_prob(sample, mean, std)
    for b in range(3):
        row_mean, row_std = sde_mean_std(x[b:b + 1], denoised[b:b + 1], sigmas[b].item(), sigmas_next[b].item())
        torch.testing.assert_close(mean[b:b + 1], row_mean)
        torch.testing.assert_close(std[b:b + 1], row_std)
        torch.testing.assert_close(log_prob[b:b + 1], sde_log_prob(sample[b:b + 1], row_mean, row_std))


def test_low_precision_input_gives_float32_statistics_of_the_rounded_sample():
    x, denoised = random_inputs()
    sample, mean, std = step(x.bfloat16(), denoised.bfloat16(), 0.5, 0.4)
    assert sample.dtype == torch.bfloat16
    assert mean.dtype == torch.float32 and std.dtype == torch.float32
    log_prob = sde_log_prob(sample, mean, std)
    assert log_prob.dtype == torch.float32
    # evaluated at the stored (rounded) sample, so a recompute from it gives the same value
    expected = torch.distributions.Normal(mean.double(), std.double().expand_as(mean)).log_prob(sample.double())
    torch.testing.assert_close(log_prob, expected.mean(dim=(1, 2, 3)).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_sampling_gaussian_data_keeps_the_analytic_marginal(eta):
    steps, n, dim = 50, 20000, 4
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    everyone = torch.zeros(n, dtype=torch.long)  # one population, one generator
    checked = []
    for i in range(steps):
        mean, std = sde_mean_std(x, gaussian_denoiser(x, sigmas[i]), sigmas[i], sigmas[i + 1], eta)
        x = mean + std * item_noise([g], everyone, 1, (dim,))[0]
        if i + 1 in (steps // 2, steps):
            mean, var = marginal(sigmas[i + 1].item())
            # Tolerances cover the O(1/steps) discretisation error; the sampling error is far smaller.
            assert abs(x.mean().item() - mean) < 0.05
            assert abs(x.var().item() / var - 1) < 0.10
            checked.append(i + 1)
    assert checked == [steps // 2, steps]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sigma": 0.5, "sigma_next": 0.4, "eta": -0.1}, "eta"),
        ({"sigma": 0.4, "sigma_next": 0.5}, "sigma_next"),
        ({"sigma": 1.5, "sigma_next": 0.5}, "sigma"),
        ({"sigma": 0.5, "sigma_next": -0.1}, "sigma_next"),
        ({"sigma": torch.tensor([0.5, 0.5]), "sigma_next": 0.4}, "sigma"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(kwargs, name):
    x, denoised = random_inputs()
    with pytest.raises(ValueError, match=rf"^{name} must"):
        sde_mean_std(x, denoised, **kwargs)
