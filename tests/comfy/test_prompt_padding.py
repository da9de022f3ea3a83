"""Zero padding never changes a score or a prediction: a prompt stacked into a bank beside a longer one
(right-padded with zeros) gives what it gives alone, at its own length, as ComfyUI runs it."""

from __future__ import annotations

import pytest
import torch

SHORT, LONG = 8, 20


@pytest.fixture(scope="module")
def bank(tiny_generator):
    from trainer.demo.tiny import tiny_conditioning

    short, long = tiny_conditioning(seed=1, tokens=SHORT), tiny_conditioning(seed=2, tokens=LONG)
    context = torch.zeros(2, LONG, 4096)
    context[0, :SHORT], context[1] = short[0][0][0], long[0][0][0]
    pooled = torch.cat([short[0][1]["pooled_output"], long[0][1]["pooled_output"]])
    return dict(context=context, pooled=pooled, lengths=torch.tensor([SHORT, LONG]), short=short)


@pytest.fixture(scope="module")
def drm(tiny_generator):
    from drm.model import build_drm
    from trainer.demo.tiny import tiny_drm_state_dict

    return build_drm(tiny_drm_state_dict(tiny_generator[0]), blocks=1).eval()


def test_zero_tokens_are_not_inert(drm, bank):
    """The premise: scoring the padded row as it is differs from scoring the prompt alone."""
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    with torch.no_grad():
        alone = drm(x, t, bank["context"][:1, :SHORT], bank["pooled"][:1])
        padded = drm(x, t, bank["context"][:1], bank["pooled"][:1])
    assert (alone - padded).abs().max() > 1e-4


def test_drm_training_scores_a_prompt_as_alone(drm, bank, comfyui):
    import comfy.latent_formats

    from trainer.reward.encoded import EncodedPairs
    from trainer.reward.scoring import pair_scores

    gen = torch.Generator().manual_seed(1)
    pairs = EncodedPairs(torch.randn(4, 16, 8, 8, generator=gen), torch.randn(4, 16, 8, 8, generator=gen),
                         bank["context"], bank["pooled"], torch.tensor([0, 1, 0, 1]), ["short", "long"],
                         context_length=bank["lengths"])
    sigmas, noise = torch.full((4,), 0.4), torch.randn(2, 4, 16, 8, 8, generator=gen)
    latent_format = comfy.latent_formats.SD3()
    with torch.no_grad():
        good, bad = pair_scores(drm, pairs, torch.arange(4), sigmas, noise, latent_format, torch.device("cpu"), False)
        alone = EncodedPairs(pairs.preferred[[0]], pairs.rejected[[0]], bank["context"][:1, :SHORT], bank["pooled"][:1],
                             torch.tensor([0]), ["short"])
        good_alone, bad_alone = pair_scores(drm, alone, torch.tensor([0]), sigmas[:1], noise[:, :1], latent_format,
                                            torch.device("cpu"), False)
    torch.testing.assert_close(good[0], good_alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(bad[0], bad_alone[0], rtol=0, atol=1e-5)


def test_grpo_rewards_and_policy_predictions_are_as_alone(bank, tiny_generator):
    import comfy.sd

    from drm.runtime import LoadedDRM
    from trainer.demo.tiny import tiny_generator_state_dict
    from trainer.grpo.evaluate import drm_reward
    from trainer.grpo.policy import Policy
    from trainer.grpo.rollout import Conditioning

    negative = (torch.zeros(1, 5, 4096), torch.zeros(1, 2048))
    cond = Conditioning(bank["context"], bank["pooled"], *negative, context_length=bank["lengths"])
    alone = Conditioning(bank["context"][:1, :SHORT], bank["pooled"][:1], *negative)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))

    from drm.model import build_drm
    from trainer.demo.tiny import tiny_drm_state_dict

    loaded = LoadedDRM(build_drm(tiny_drm_state_dict(tiny_generator[0]), blocks=1))
    torch.testing.assert_close(drm_reward(loaded, cond, x, 0.3)[0], drm_reward(loaded, alone, x[:1], 0.3)[0],
                               rtol=0, atol=1e-5)

    policy = Policy(comfy.sd.load_diffusion_model_state_dict(tiny_generator_state_dict()), 4, 4.0, False,
                    torch.device("cpu"), seed=0)
    sigma = torch.full((2,), 0.6)
    with torch.no_grad():
        together = policy.predict(x, sigma, cond.context, cond.pooled, context_length=cond.context_length)
        single = policy.predict(x[:1], sigma[:1], alone.context, alone.pooled)
    torch.testing.assert_close(together[0], single[0], rtol=0, atol=1e-4)
