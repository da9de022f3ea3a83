"""DRM Loader and DRM Score Latent nodes, run in-process on the tiny model."""

from __future__ import annotations

import hashlib

import pytest
import torch

DRM_FILE = "tiny-drm.safetensors"


@pytest.fixture(scope="module")
def nodes_mod(pack):
    return pack.nodes


@pytest.fixture(scope="module")
def drm(nodes_mod):
    return nodes_mod.loader.DRMLoader.execute(DRM_FILE, "fp32").args[0]


@pytest.fixture(scope="module")
def prompts():
    from drm.tiny import tiny_conditioning

    return tiny_conditioning(seed=0), tiny_conditioning(seed=1)


def score(nodes_mod, drm, latent, positive, **where):
    args = dict(position="sigma", sigma=0.0, steps=20, scheduler="simple", step=20)
    args.update(where)
    return nodes_mod.score.DRMScoreLatent.execute(drm, latent, positive, **args).args


def test_loader_lists_the_drm_folder_and_loads(nodes_mod, drm):
    schema = nodes_mod.loader.DRMLoader.define_schema()
    assert DRM_FILE in schema.inputs[0].options
    assert all(i.tooltip for i in schema.inputs)
    assert drm.model.blocks == 1 and drm.dtype == torch.float32


def test_every_input_has_a_tooltip(nodes_mod):
    for node in nodes_mod.NODES:
        for inp in node.define_schema().inputs:
            assert inp.tooltip, f"{node.__name__}.{inp.id} has no tooltip"


def test_scores_sort_the_batch_best_first(nodes_mod, drm, prompts):
    gen = torch.Generator().manual_seed(5)
    latent = {"samples": torch.randn(4, 16, 32, 32, generator=gen), "batch_index": [10, 11, 12, 13]}
    scores, summary, ranked = score(nodes_mod, drm, latent, prompts[0])
    assert len(scores) == 4 and len(set(scores)) == 4
    order = sorted(range(4), key=lambda i: -scores[i])
    assert torch.equal(ranked["samples"], latent["samples"][order])
    assert ranked["batch_index"] == [10 + i for i in order]
    assert f"#{order[0]}: {scores[order[0]]:+.4f}" in summary.splitlines()[1]
    # each score is the latent's own: scoring one latent alone gives the same number
    alone, _, _ = score(nodes_mod, drm, {"samples": latent["samples"][2:3]}, prompts[0])
    assert alone[0] == pytest.approx(scores[2], abs=1e-5)


def test_score_depends_on_prompt_and_noise_level(nodes_mod, drm, prompts):
    latent = {"samples": torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(6))}
    clean, _, _ = score(nodes_mod, drm, latent, prompts[0])
    other_prompt, _, _ = score(nodes_mod, drm, latent, prompts[1])
    noisy, _, _ = score(nodes_mod, drm, latent, prompts[0], sigma=0.5)
    assert min(abs(a - b) for a, b in zip(clean, other_prompt)) > 1e-5
    assert min(abs(a - b) for a, b in zip(clean, noisy)) > 1e-5


@pytest.mark.parametrize("sampler", ["euler", "dpm_2"])  # dpm_2 drops a sigma from a longer schedule
def test_leftover_noise_latent_scores_like_the_sampler_x_t(nodes_mod, drm, prompts, tiny_generator, sampler):
    """KSamplerAdvanced leaves process_out(x_s / (1 - s)); scoring it must equal scoring x_s itself."""
    import comfy.sample
    import comfy.samplers

    import nodes as comfy_nodes

    _, model = tiny_generator
    positive, negative = prompts
    latent = {"samples": torch.zeros(2, 16, 16, 16)}
    steps, stop, seed = 6, 3, 42
    (noisy,) = comfy_nodes.KSamplerAdvanced().sample(model, "enable", seed, steps, 2.0, sampler, "simple",
                                                      positive, negative, latent, 0, stop, "enable")
    # The same run one step further: the callback sees the sampler's x at step `stop`, in model space.
    seen = {}

    def callback(i, denoised, x, total):
        if i == stop:
            seen["x"] = x.clone()

    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    comfy.sample.sample(model, noise, steps, 2.0, sampler, "simple", positive, negative, latent["samples"],
                        last_step=stop + 1, callback=callback, seed=seed)

    from_node, _, _ = score(nodes_mod, drm, noisy, positive, position="schedule", steps=steps, step=stop,
                            sampler_name=sampler, model=model)
    sigma = float(comfy.samplers.KSampler(model, steps, "cpu", sampler=sampler, scheduler="simple").sigmas[stop])
    assert 0.1 < sigma < 0.9
    direct = drm.score(seen["x"], sigma, *drm.conditioning_tensors(positive, 2))
    assert torch.allclose(torch.tensor(from_node), direct, atol=1e-5, rtol=0)
    # and the noise level matters: the same LATENT read as clean scores differently
    as_clean, _, _ = score(nodes_mod, drm, noisy, positive, sigma=0.0)
    assert max(abs(a - b) for a, b in zip(as_clean, from_node)) > 1e-4


@pytest.mark.parametrize("samples, message", [
    (torch.zeros(1, 4, 32, 32), r"latent has shape \(1, 4, 32, 32\).*\[B, 16, H, W\]"),
    (torch.zeros(1, 16, 80, 80), r"80x80.*at most 64x64"),
    (torch.full((1, 16, 32, 32), float("nan")), "NaN"),
])
def test_bad_latents_are_refused(nodes_mod, drm, prompts, samples, message):
    with pytest.raises(ValueError, match=message):
        score(nodes_mod, drm, {"samples": samples}, prompts[0])


@pytest.mark.parametrize("sigma", [-0.1, 1.0, 1.5])
def test_sigma_outside_range_is_refused(nodes_mod, drm, prompts, sigma):
    with pytest.raises(ValueError, match=rf"sigma={sigma}: expected 0 <= sigma < 1"):
        score(nodes_mod, drm, {"samples": torch.zeros(1, 16, 32, 32)}, prompts[0], sigma=sigma)


def test_step_outside_schedule_is_refused(nodes_mod, drm, prompts):
    with pytest.raises(ValueError, match=r"step=25: expected 0..steps \(20\)"):
        score(nodes_mod, drm, {"samples": torch.zeros(1, 16, 32, 32)}, prompts[0], position="schedule", step=25)


def test_conditioning_of_another_model_is_refused(nodes_mod, drm):
    sd15 = [[torch.zeros(1, 77, 768), {}]]
    with pytest.raises(ValueError, match="pooled_output"):
        score(nodes_mod, drm, {"samples": torch.zeros(1, 16, 32, 32)}, sd15)
    sdxl_like = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    with pytest.raises(ValueError, match="width 2048.*expects 4096 and 2048"):
        score(nodes_mod, drm, {"samples": torch.zeros(1, 16, 32, 32)}, sdxl_like)


def test_foreign_checkpoint_in_drm_folder_is_refused_and_untouched(nodes_mod, models_dir):
    from safetensors.torch import save_file

    path = models_dir / "drm" / "sdxl-unet.safetensors"
    save_file({"input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        with pytest.raises(ValueError, match="sdxl-unet.safetensors.*SD1/SDXL UNet"):
            nodes_mod.loader.DRMLoader.execute("sdxl-unet.safetensors", "default")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    finally:
        path.unlink()


def test_cached_conditioning_node_round_trips(nodes_mod):
    from drm.tiny import tiny_conditioning

    (cond,) = nodes_mod.loader.DRMLoadConditioning.execute("tiny-prompt-0.safetensors").args
    expected = tiny_conditioning(seed=0)
    assert torch.equal(cond[0][0], expected[0][0])
    assert torch.equal(cond[0][1]["pooled_output"], expected[0][1]["pooled_output"])


@pytest.mark.parametrize("weight_dtype, overflows", [("fp16", True), ("bf16", False), ("fp32", False)])
def test_a_score_that_overflows_is_refused_naming_the_dtype(nodes_mod, prompts, weight_dtype, overflows):
    """A latent of 1e5 is 1.5e5 in model space, past fp16's largest value (65504); bf16 and fp32 hold it.

    (The error is matched as a ValueError: the node raises the pack's NonFiniteScores, imported as part of
    the package ComfyUI loads, which is another class object than drm.runtime's here.)"""
    drm = nodes_mod.loader.DRMLoader.execute(DRM_FILE, weight_dtype).args[0]
    latent = {"samples": torch.full((2, 16, 16, 16), 1e5)}
    if not overflows:
        scores, _, _ = score(nodes_mod, drm, latent, prompts[0])
        assert all(torch.isfinite(torch.tensor(scores)))
        return
    with pytest.raises(ValueError, match=r"NaN or infinite scores for 2 of 2 latents, with its weights in "
                                         r"float16.*bf16 or fp32"):
        score(nodes_mod, drm, latent, prompts[0])


def test_a_prompt_encoded_shorter_than_the_drm_was_trained_on_is_refused(nodes_mod, models_dir, prompts):
    """A DRM trained with T5 padded to N tokens records N; a context of fewer than 77 + N tokens was encoded
    otherwise (ComfyUI's default is 77), and the error names the stock node that fixes it."""
    from drm.checkpoint import atomic_save, read_safetensors

    tensors, metadata = read_safetensors(models_dir / "drm" / DRM_FILE)
    path = models_dir / "drm" / "t5-256.safetensors"
    atomic_save(tensors, path, dict(metadata, **{"drm.t5_length": "256"}))
    try:
        drm = nodes_mod.loader.DRMLoader.execute("t5-256.safetensors", "fp32").args[0]
        latent = {"samples": torch.zeros(1, 16, 16, 16)}
        short = [[torch.randn(1, 154, 4096), {"pooled_output": torch.randn(1, 2048)}]]
        with pytest.raises(ValueError, match=r"154 tokens.*padded to 256 tokens \(333 with CLIP's 77\).*"
                                             r"T5TokenizerOptions node with min_length 256"):
            score(nodes_mod, drm, latent, short)
        long_enough = [[torch.randn(1, 333, 4096), {"pooled_output": torch.randn(1, 2048)}]]
        (value,), _, _ = score(nodes_mod, drm, latent, long_enough)
        assert value == value  # scored
    finally:
        path.unlink()
