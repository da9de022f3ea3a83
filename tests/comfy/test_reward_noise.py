"""The trainer's DRM rewards take drm.runtime's one re-noising path (LoadedDRM.score_noised): with a noise level
recommended (DiNa-LRM's drm.noise_sigma), each row's noise comes from its own seed, so one prompt's siblings
share their noise and a prompt's reward does not depend on the batch (or process) it is scored in."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def noised_drm(tiny_generator):
    from drm.model import build_drm
    from drm.runtime import LoadedDRM
    from trainer.demo.tiny import tiny_drm_state_dict

    return LoadedDRM(build_drm(tiny_drm_state_dict(tiny_generator[0]), blocks=1), metadata={"drm.noise_sigma": "0.4"})


def inputs(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 16, 8, 8, generator=gen), torch.randn(n, 8, 4096, generator=gen),
            torch.randn(n, 2048, generator=gen))


def test_a_seed_per_row_noises_each_row_as_its_seed_alone(noised_drm):
    x, context, pooled = inputs(3)
    seeds = [5, 9, 5]
    batch = noised_drm.score_noised(x, 0.0, context, pooled, 0.4, seeds)
    # by hand: from sigma 0, the forward process to 0.4 is 0.6 x0 + 0.4 z, z from the row's seed
    for row, seed in enumerate(seeds):
        z = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(seed))
        expected = noised_drm.score(0.6 * x[row:row + 1] + 0.4 * z, 0.4, context[row:row + 1], pooled[row:row + 1])
        torch.testing.assert_close(batch[row], expected[0], rtol=0, atol=1e-5)
    twins = x[:1].expand(2, -1, -1, -1)
    same = noised_drm.score_noised(twins, 0.0, context[:1].expand(2, -1, -1), pooled[:1].expand(2, -1), 0.4, [7, 7])
    other = noised_drm.score_noised(twins, 0.0, context[:1].expand(2, -1, -1), pooled[:1].expand(2, -1), 0.4, [7, 8])
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=1e-6)
    assert (other[0] - other[1]).abs() > 1e-4
    with pytest.raises(ValueError, match="2 seeds for 3 latents"):
        noised_drm.score_noised(x, 0.0, context, pooled, 0.4, [1, 2])


def test_trainer_rewards_share_noise_within_a_prompt_and_do_not_depend_on_the_batch(noised_drm):
    from trainer.grpo.evaluate import prompt_reward
    from trainer.grpo.rollout import Conditioning

    _, context, pooled = inputs(2, seed=1)
    cond = Conditioning(context, pooled, torch.zeros(1, 8, 4096), torch.zeros(1, 2048))
    x = inputs(4, seed=2)[0]
    x[2] = x[0]  # the two siblings of prompt 0 are the same latent
    rows = torch.tensor([0, 1, 0, 1])  # K = 2 siblings of 2 prompts, sibling-major as Step-GRPO scores them
    rewards = prompt_reward(noised_drm, cond, [11, 12])(x, 0.0, rows)
    torch.testing.assert_close(rewards[0], rewards[2], rtol=0, atol=1e-6)  # same latent and prompt: same noise
    # prompt 1 alone (another process's share of the batch) gets the rewards it gets in the batch
    alone = prompt_reward(noised_drm, cond.rows(torch.tensor([1])), [12])(x[[1, 3]], 0.0, torch.tensor([0, 0]))
    torch.testing.assert_close(alone, rewards[[1, 3]], rtol=0, atol=1e-5)
