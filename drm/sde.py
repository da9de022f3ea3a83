"""Flow-matching SDE step with a Gaussian log-probability (the Flow-GRPO form), and its noise. Pure torch.

Conventions (rectified flow, SD3 / ComfyUI CONST): x_s = (1 - s) x0 + s e with s in [0, 1] ("sigma").
The model returns the denoised x0, so the velocity is v = (x - x0) / s.

One step from s to s_next < s (dt = s_next - s < 0) with noise level a ("eta"):

    std   = a * sqrt(s / (1 - s))             (at s == 1, s_next stands in for s in the denominator only)
    mean  = x + (v + std^2 / (2 s) * (x + (1 - s) v)) * dt
    x'    = mean + std * sqrt(-dt) * z,       z ~ N(0, I)

The drift term is the score correction -(std^2 / 2) * grad log p_s, with grad log p_s = -(x + (1 - s) v) / s,
so every a >= 0 keeps the marginals of the probability-flow ODE; a = 0 is exactly the Euler step x + v dt.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Sigma = float | Tensor
"""A noise level: a python float, a 0-dim tensor, or a [B] tensor (one sigma per batch row)."""


def sde_mean_std(x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma,
                 eta: float = 0.7) -> tuple[Tensor, Tensor]:
    """Mean and std of the Gaussian transition from `sigma` to `sigma_next`, both float32.

    The std is the transition's own std (std * sqrt(-dt)), shaped [B, 1, ..., 1] to broadcast over x.
    Branching samplers call this once per parent and draw any number of children as mean + std * z.
    A step to sigma_next == 0 is deterministic: the mean is `denoised` and the std is 0.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}; pass a non-negative noise level "
                         "(0 gives the deterministic Euler step).")
    s, s_next = _sigma_columns(sigma, sigma_next, x)
    x, x0 = x.float(), denoised.float()
    dt = s_next - s

    # s == 0 can only occur together with s_next == 0, whose rows are replaced below; dividing by 1
    # there keeps the unused branch finite, so no NaN leaks into gradients.
    s_div = torch.where(s > 0, s, 1.0)
    v = (x - x0) / s_div
    # Flow-GRPO's form (sd3_sde_with_logprob): 1 - s is 0 at s == 1, so there s_next stands in for s in
    # the denominator only; the step's noise std std * sqrt(-dt) is then exactly eta.
    std = eta * torch.sqrt(s / (1 - torch.where(s == 1, s_next, s)))
    # A zero-length step (s == s_next) adds no noise; this also drops the infinite std at s == s_next == 1.
    std = torch.where(dt < 0, std, 0.0)

    mean = x + (v + std**2 / (2 * s_div) * (x + (1 - s) * v)) * dt
    step_std = std * torch.sqrt(-dt)

    last = s_next == 0
    mean = torch.where(last, x0, mean)
    step_std = torch.where(last, 0.0, step_std)
    return mean, step_std


def sde_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Gaussian log density of `sample` under N(mean, std^2), averaged over all non-batch dims -> float32 [B].

    The mean per element, not the sum, as Flow-GRPO (sd3_sde_with_logprob) reduces it: a policy ratio
    exp(log p - log p_old) is then the geometric mean of the per-element ratios, which its clip range
    (1e-4) is tuned for. `std` broadcasts against `sample` (e.g. [B, 1, ..., 1] from `sde_mean_std`).
    Gradients flow through `mean` (and `std`). Rows whose std is 0 (eta 0, or the last step to sigma 0)
    are deterministic; their log-prob is defined as 0.
    """
    sample, mean, std = sample.float(), mean.float(), std.float()
    noisy = std > 0
    safe_std = torch.where(noisy, std, 1.0)
    log_prob = (-((sample - mean) ** 2) / (2 * safe_std**2)
                - torch.log(safe_std) - 0.5 * math.log(2 * math.pi))
    log_prob = torch.where(noisy, log_prob, 0.0)
    return log_prob.reshape(sample.shape[0], -1).mean(dim=1)


def sde_log_ratio(sample: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor) -> Tensor:
    """log p(sample | mean) - log p(sample | old_mean) under the same N(., std^2), per element, then averaged
    over the non-batch dims -> float32 [B] (Flow-GRPO's mean form).

    Taking the difference element by element, ((x - old_mean)^2 - (x - mean)^2) / (2 std^2), before
    averaging keeps a recompute that differs from the rollout only by float rounding at a ratio of 1
    to within that rounding; the difference of two averaged log-probs would not. Rows with std 0 give 0.
    """
    sample, mean, old_mean, std = sample.float(), mean.float(), old_mean.float(), std.float()
    noisy = std > 0
    safe_std = torch.where(noisy, std, 1.0)
    log_ratio = ((sample - old_mean) ** 2 - (sample - mean) ** 2) / (2 * safe_std**2)
    return torch.where(noisy, log_ratio, 0.0).reshape(sample.shape[0], -1).mean(dim=1)


def _sigma_columns(sigma: Sigma, sigma_next: Sigma, x: Tensor) -> tuple[Tensor, Tensor]:
    """Validate the two noise levels and shape them as float32 [B, 1, ..., 1] to broadcast over x."""
    column = (x.shape[0],) + (1,) * (x.ndim - 1)
    shaped = []
    for name, value in (("sigma", sigma), ("sigma_next", sigma_next)):
        t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"{name} must be a float, a 0-dim tensor or a [B] tensor with B = {x.shape[0]}, "
                             f"got shape {tuple(t.shape)}; pass one noise level per batch row.")
        if ((t < 0) | (t > 1)).any():
            raise ValueError(f"{name} must lie in [0, 1] (rectified-flow noise level), got {value}; "
                             "use a flow-matching (CONST) schedule that starts at 1 and ends at 0.")
        shaped.append(t.reshape(-1, *column[1:]).expand(column))
    s, s_next = shaped
    if (s_next > s).any():
        raise ValueError(f"sigma_next must be <= sigma, got sigma={sigma}, sigma_next={sigma_next}; "
                         "sampling runs from noise to data, so pass a decreasing schedule.")
    return s, s_next


def renoise(x: Tensor, sigma: float, target_sigma: float, noise: Tensor) -> Tensor:
    """A latent at noise level `sigma` moved forward to `target_sigma` >= sigma (the rectified-flow forward process).

    With x_s = (1 - s) x0 + s e, x_u = a x_s + sqrt(u^2 - a^2 s^2) z with a = (1 - u) / (1 - s) and z ~ N(0, I)
    has exactly the marginal (1 - u) x0 + u e'; at s = 0 it is DiNa-LRM's (1 - u) x0 + u z. Shapes as x.
    """
    if not 0.0 <= sigma <= target_sigma < 1.0:
        raise ValueError(f"renoise from sigma {sigma} to {target_sigma}: expected 0 <= sigma <= target < 1")
    a = (1.0 - target_sigma) / (1.0 - sigma)
    return a * x + math.sqrt(max(target_sigma ** 2 - (a * sigma) ** 2, 0.0)) * noise.to(x)


def item_noise(generators: list[torch.Generator], origin: Tensor, k: int, shape: tuple[int, ...],
               device: torch.device | str | None = None) -> Tensor:
    """Standard normal noise [k, len(origin), *shape], float32, on `device` (None: the generators').

    Row r belongs to batch item origin[r] (an index into `generators`). Each item's rows draw, in row
    order, from that item's generator alone, as one torch.randn((k, rows, *shape)) on the generator's
    device; an item with no rows draws nothing. So no item's noise depends on the others: an item gets
    the same noise alone or in any batch, given the same generator. Step-wise search and the GRPO
    rollouts draw all their noise here; how each seeds its generators is its own (drm.search, trainer).
    """
    device = generators[0].device if device is None else device
    noise = torch.empty((k, len(origin), *shape), device=device, dtype=torch.float32)
    origin = origin.to(device)
    for item, generator in enumerate(generators):
        rows = (origin == item).nonzero().flatten()
        if len(rows):
            noise[:, rows] = torch.randn((k, len(rows), *shape), generator=generator,
                                         device=generator.device).to(device)
    return noise
