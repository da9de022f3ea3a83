"""A conditioning batch beside a latent batch follows ComfyUI's own rule in every node (issue 24, kind 6).

ComfyUI's samplers give latent row r of a batch of B the prompt r % n of a conditioning batch of n (fewer
prompts are repeated, more are cut to the first B). The expected rows here are recorded from ComfyUI
itself: what its sampler hands the model. DRM Score Latent and DRM Score Image must score row r against
those same rows, and the step-wise sampler samples and scores each row as it would alone with its prompt.
"""

from __future__ import annotations

import pytest
import torch

SIGMA = 0.4
# (latent batch, conditioning batch): fewer prompts than latents (dividing or not), more, one, as many
PAIRS = [(4, 2), (4, 3), (2, 4), (4, 1), (3, 3)]


def prompts(n: int) -> list:
    """A CONDITIONING of n different prompts (one entry, batch n), as a batched text encode gives."""
    from trainer.demo.tiny import tiny_conditioning

    return tiny_conditioning(seed=10, batch=n)


def prompt(cond: list, i: int) -> list:
    """Prompt i of a batched CONDITIONING, alone (batch 1)."""
    return [[cond[0][0][i:i + 1], {"pooled_output": cond[0][1]["pooled_output"][i:i + 1]}]]


def sampler_rows(model, cond: list, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) that ComfyUI's sampler gives the model for a latent batch of `batch` with this positive
    conditioning: recorded in one euler step at cfg 1 (ComfyUI then runs the positive prompt alone)."""
    import comfy.sample
    import comfy.samplers

    from drm.stepwise import schedule_sigmas

    seen = {}

    def record(apply_model, args):
        seen["context"], seen["pooled"] = args["c"]["c_crossattn"].clone(), args["c"]["y"].clone()
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = model.clone()
    patched.set_model_unet_function_wrapper(record)
    latent = torch.zeros(batch, 16, 8, 8)
    comfy.sample.sample_custom(patched, comfy.sample.prepare_noise(latent, 0), 1.0, comfy.samplers.sampler_object("euler"),
                               schedule_sigmas(patched.get_model_object("model_sampling"), "simple", 1), cond, cond,
                               latent, disable_pbar=True, seed=0)
    return seen["context"].cpu(), seen["pooled"].cpu()


@pytest.mark.parametrize("batch, n", PAIRS)
def test_comfyui_gives_latent_row_r_prompt_r_mod_n(tiny_generator, batch, n):
    """The rule itself, read off ComfyUI's sampler on both versions (what the scorers must follow)."""
    cond = prompts(n)
    context, pooled = sampler_rows(tiny_generator[1], cond, batch)
    rows = [r % n for r in range(batch)]
    assert torch.equal(context, cond[0][0][rows]) and torch.equal(pooled, cond[0][1]["pooled_output"][rows])


@pytest.mark.parametrize("batch, n", PAIRS)
def test_score_latent_scores_each_row_against_the_prompt_comfyui_gives_it(nodes_mod, drm, tiny_generator, batch, n):
    cond = prompts(n)
    samples = torch.randn(batch, 16, 16, 16, generator=torch.Generator().manual_seed(batch * 10 + n))
    scores, summary, _ = nodes_mod.score.DRMScoreLatent.execute(
        drm, {"samples": samples}, cond, "sigma", SIGMA, 20, "simple", 20).args[:3]
    context, pooled = sampler_rows(tiny_generator[1], cond, batch)
    expected = drm.score(drm.model_space(samples, SIGMA), SIGMA, context, pooled)
    assert torch.allclose(torch.tensor(scores), expected, atol=1e-5, rtol=0), (scores, expected)
    alone = [drm.score_latents(samples[r:r + 1], SIGMA, prompt(cond, r % n)).item() for r in range(batch)]
    assert scores == pytest.approx(alone, abs=1e-5)
    assert f"({batch} item" in summary


def test_the_prompt_changes_the_score_so_the_rows_above_mean_something(drm):
    samples = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = prompts(2)
    first, second = (drm.score_latents(samples, SIGMA, prompt(cond, i)).item() for i in (0, 1))
    assert abs(first - second) > 1e-3


def test_score_image_tiles_the_prompts_as_score_latent_does(nodes_mod, drm):
    """Clean latents (noise_sigma 0), so each row's score is its own and can be checked alone."""
    from trainer.demo.synthetic import tiny_vae

    vae, cond = tiny_vae(), prompts(2)
    images = torch.rand(4, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    scores = nodes_mod.score.DRMScoreImage.execute(drm, images, vae, cond, noise_sigma=0.0).args[0]
    latents = vae.encode(images)
    alone = [drm.score_latents(latents[r:r + 1], 0.0, prompt(cond, r % 2)).item() for r in range(4)]
    assert scores == pytest.approx(alone, abs=1e-5)


def test_stepwise_samples_each_row_as_alone_with_its_prompt(nodes_mod, drm, tiny_generator):
    """Row 3 of a batch of 4 with 2 prompts equals row 3 sampled alone (LatentFromBatch keeps its noise) with
    prompt 3 % 2 = 1: the generator and the DRM both gave it that prompt."""
    import nodes as comfy_nodes
    from trainer.demo.tiny import tiny_conditioning

    cond, negative = prompts(2), tiny_conditioning(seed=1)
    row = 3
    args = dict(seed=7, steps=3, cfg=2.0, scheduler="simple", denoise=1.0, branches=3, eta=0.7, mode="greedy",
                beam_width=2, temperature=1.0, window_start=0, window_end=-1)

    def run(latent, positive):
        return nodes_mod.stepwise.DRMStepwiseKSampler.execute(
            tiny_generator[1], positive=positive, negative=negative, latent_image=latent, drm=drm, **args).args[0]

    batch = {"samples": torch.zeros(4, 16, 8, 8)}
    (alone,) = comfy_nodes.LatentFromBatch().frombatch(batch, row, 1)
    together = run(batch, cond)["samples"]
    single = run(alone, prompt(cond, row % 2))["samples"]
    assert (single[0] - together[row]).abs().max() < 1e-4
    other = run(alone, prompt(cond, 1 - row % 2))["samples"]
    assert (other[0] - together[row]).abs().max() > 1e-2  # with the other prompt it differs


def test_an_empty_conditioning_batch_is_refused(drm):
    """ComfyUI cannot tile zero prompts either (it divides by the batch); the scorers say so."""
    cond = prompts(1)
    empty = [[cond[0][0][:0], {"pooled_output": cond[0][1]["pooled_output"][:0]}]]
    with pytest.raises(ValueError, match=r"conditioning has batch 0 \(no prompt\)"):
        drm.score_latents(torch.zeros(2, 16, 16, 16), SIGMA, empty)
