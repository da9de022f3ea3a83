"""The DRM trainer's noise levels (pure torch; the training runs are in the comfy tier)."""

from __future__ import annotations

import pytest
import torch

from trainer.reward.config import DRMTrainConfig
from trainer.reward.scoring import sample_sigmas


def draws(n=200_000, shift=3.0, **config) -> torch.Tensor:
    return sample_sigmas(DRMTrainConfig(**config), torch.Generator().manual_seed(0), n, shift)


def test_logit_normal_on_the_shifted_grid_has_the_authors_median():
    """diffusers' SD3 recipe: u = sigmoid(N(0, 1)) picks a step of the shift-3 grid: median 0.75, P(>0.9) 13.6%."""
    sigmas = draws()
    assert sigmas.median().item() == pytest.approx(0.75, abs=0.005)
    assert (sigmas > 0.9).float().mean().item() == pytest.approx(0.136, abs=0.005)
    assert sigmas.min() > 0 and sigmas.max() <= 1


def test_shift_one_is_the_unshifted_logit_normal():
    sigmas = draws(shift=1.0)
    assert sigmas.median().item() == pytest.approx(0.5, abs=0.005)
    assert (sigmas > 0.9).float().mean().item() == pytest.approx(0.014, abs=0.003)


def test_sigmas_lie_on_the_schedulers_grid():
    shift = 3.0
    grid = torch.arange(1, 1001) / 1000
    grid = shift * grid / (1 + (shift - 1) * grid)
    sigmas = draws(n=5000, timestep_sampling="uniform")
    distance = (sigmas[:, None] - grid[None]).abs().min(dim=1).values
    assert distance.max() < 1e-6
