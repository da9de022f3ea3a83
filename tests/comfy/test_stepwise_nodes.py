"""DRM Step-wise KSampler and SamplerDRMStepwise on the tiny model, through comfy.sample."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

STEPS = 5


@pytest.fixture(scope="module")
def setup(tiny_generator):
    from trainer.demo.tiny import tiny_conditioning

    return dict(model=tiny_generator[1], positive=tiny_conditioning(seed=0), negative=tiny_conditioning(seed=1))


def stepwise(nodes_mod, drm, setup, latent, **options):
    args = dict(seed=7, steps=STEPS, cfg=2.0, scheduler="simple", denoise=1.0, branches=4, eta=0.7, mode="greedy",
                beam_width=2, temperature=1.0, window_start=0, window_end=-1)
    args.update(options)
    return nodes_mod.stepwise.DRMStepwiseKSampler.execute(
        setup["model"], positive=setup["positive"], negative=setup["negative"], latent_image=latent, drm=drm, **args).args


def empty(batch=1):
    return {"samples": torch.zeros(batch, 16, 16, 16)}


def test_one_branch_without_noise_is_comfy_euler(nodes_mod, drm, setup):
    import nodes as comfy_nodes

    (reference,) = comfy_nodes.KSampler().sample(setup["model"], 7, STEPS, 2.0, "euler", "simple", setup["positive"],
                                                 setup["negative"], empty(2), denoise=1.0)
    latent, trace, spread, plot = stepwise(nodes_mod, drm, setup, empty(2), branches=1, eta=0.0)
    assert torch.allclose(latent["samples"], reference["samples"], atol=1e-5, rtol=0)
    # one candidate per step: a spread of exactly 0
    assert len(trace) == STEPS - 1 and all(s == 0 for s in spread)
    assert plot.shape[0] == 1 and plot.shape[-1] == 3


def test_branching_changes_result_and_is_deterministic(nodes_mod, drm, setup):
    first = stepwise(nodes_mod, drm, setup, empty(3))
    again = stepwise(nodes_mod, drm, setup, empty(3))
    plain = stepwise(nodes_mod, drm, setup, empty(3), branches=1)
    assert first[0]["samples"].shape == (3, 16, 16, 16)
    assert torch.equal(first[0]["samples"], again[0]["samples"]) and first[1] == again[1]
    assert not torch.allclose(first[0]["samples"], plain[0]["samples"])
    assert all(s > 0 for s in first[2])  # K = 4 distinct candidates


def test_window_limits_branching(nodes_mod, drm, setup):
    _, trace, _, _ = stepwise(nodes_mod, drm, setup, empty(), window_start=1, window_end=3)
    assert len(trace) == 2


def test_trace_score_equals_score_latent_on_that_step(nodes_mod, drm, setup):
    """The kept score at step i is what DRM Score Latent says of the latent the search kept there."""
    import comfy.sample

    from drm.stepwise import RewardTrace, schedule_sigmas

    model = setup["model"]
    trace = RewardTrace()
    sampler = nodes_mod.stepwise.stepwise_ksampler(drm, trace, branches=3, eta=0.7, window=(0, None))
    sigmas = schedule_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    kept = {}

    def callback(i, denoised, x, total):
        kept[i] = x.clone()  # x before step i = the state kept at step i - 1

    samples = empty()["samples"]
    comfy.sample.sample_custom(model, comfy.sample.prepare_noise(samples, 7), 2.0, sampler, sigmas,
                               setup["positive"], setup["negative"], samples, callback=callback, seed=7)
    latent_format = model.get_model_object("latent_format")
    assert trace.steps == list(range(STEPS - 1))  # every step but the last (to sigma 0) branched
    for n, step in enumerate(trace.steps):
        sigma = float(sigmas[step + 1])
        graph_latent = latent_format.process_out(kept[step + 1] / (1 - sigma))  # as KSamplerAdvanced leaves it
        (score,), _, _, _ = nodes_mod.score.DRMScoreLatent.execute(drm, {"samples": graph_latent}, setup["positive"],
                                                                 "sigma", sigma, 20, "simple", 20).args
        assert score == pytest.approx(trace.chosen[n], abs=1e-5)


def test_sampler_node_runs_under_sampler_custom_advanced(nodes_mod, drm, setup):
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as custom

    from drm.stepwise import schedule_sigmas

    model = setup["model"]
    sampler = nodes_mod.stepwise.SamplerDRMStepwise.execute(drm, 2, 0.7, "beam", 2, 1.0, 0, -1).args[0]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(setup["positive"], setup["negative"])
    guider.set_cfg(2.0)
    sigmas = schedule_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    out, _ = custom.SamplerCustomAdvanced().sample(custom.Noise_RandomNoise(7), guider, sampler, sigmas, empty(2))
    assert out["samples"].shape == (2, 16, 16, 16) and torch.isfinite(out["samples"]).all()


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_a_batch_item_is_the_same_alone_through_latent_from_batch(nodes_mod, drm, setup, mode):
    """Item 2 of a batch of 3, sampled again alone (LatentFromBatch, batch_index 2) with the same seed."""
    import nodes as comfy_nodes

    batch = empty(3)
    (alone,) = comfy_nodes.LatentFromBatch().frombatch(batch, 2, 1)
    together = stepwise(nodes_mod, drm, setup, batch, branches=3, mode=mode)[0]["samples"]
    single = stepwise(nodes_mod, drm, setup, alone, branches=3, mode=mode)[0]["samples"]
    assert (single[0] - together[2]).abs().max() < 1e-4, (single[0] - together[2]).abs().max()
    assert (together[2] - together[1]).abs().max() > 0.1  # items differ: the match above means something


def test_a_batch_item_is_the_same_alone_under_sampler_custom_advanced(nodes_mod, drm, setup):
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as custom

    import nodes as comfy_nodes
    from drm.stepwise import schedule_sigmas

    model = setup["model"]
    sampler = nodes_mod.stepwise.SamplerDRMStepwise.execute(drm, 3, 0.7, "greedy", 2, 1.0, 0, -1).args[0]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(setup["positive"], setup["negative"])
    guider.set_cfg(2.0)
    sigmas = schedule_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    batch = empty(3)
    (alone,) = comfy_nodes.LatentFromBatch().frombatch(batch, 2, 1)
    together, _ = custom.SamplerCustomAdvanced().sample(custom.Noise_RandomNoise(7), guider, sampler, sigmas, batch)
    single, _ = custom.SamplerCustomAdvanced().sample(custom.Noise_RandomNoise(7), guider, sampler, sigmas, alone)
    assert (single["samples"][0] - together["samples"][2]).abs().max() < 1e-4


@pytest.mark.parametrize("options, message", [
    (dict(branches=0), "branches must be >= 1"),
    (dict(eta=-0.1), "eta must be >= 0"),
    (dict(window_start=2, window_end=9), r"window_end <= steps \(5\); got 2 and 9"),
    (dict(window_start=4, window_end=2), "got 4 and 2"),
    (dict(mode="best-of"), "mode must be one of"),
])
def test_bad_search_settings_are_refused(nodes_mod, drm, setup, options, message):
    with pytest.raises(ValueError, match=message):
        stepwise(nodes_mod, drm, setup, empty(), **options)


def test_noise_mask_is_refused(nodes_mod, drm, setup):
    latent = dict(empty(), noise_mask=torch.ones(1, 1, 16, 16))
    with pytest.raises(ValueError, match="noise mask"):
        stepwise(nodes_mod, drm, setup, latent)


def narrowed_drm(pack, key: str, width: int):
    """A tiny DRM whose text input `key` reads `width` features instead of the MODEL's."""
    from trainer.demo.tiny import tiny_drm_state_dict, tiny_generator_state_dict

    sd = tiny_drm_state_dict(tiny_generator_state_dict())
    sd[key] = sd[key][:, :width].contiguous()
    return pack.drm.runtime.LoadedDRM(pack.drm.model.build_drm(sd, blocks=1))


@pytest.mark.parametrize("key, message", [
    ("context_embedder.weight", "text context is 4096 wide but the DRM's is 2048"),
    ("y_embedder.mlp.0.weight", "pooled text embedding is 2048 wide but the DRM's is 1024"),
])
def test_drm_for_other_text_widths_is_refused_by_both_nodes(nodes_mod, pack, setup, key, message):
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as custom

    narrow = narrowed_drm(pack, key, 2048 if key.startswith("context") else 1024)
    with pytest.raises(ValueError, match=message):
        stepwise(nodes_mod, narrow, setup, empty())
    sampler = nodes_mod.stepwise.SamplerDRMStepwise.execute(narrow, 2, 0.7, "greedy", 2, 1.0, 0, -1).args[0]
    guider = comfy.samplers.CFGGuider(setup["model"])
    guider.set_conds(setup["positive"], setup["negative"])
    sigmas = pack.drm.stepwise.schedule_sigmas(setup["model"].get_model_object("model_sampling"), "simple", STEPS)
    with pytest.raises(ValueError, match=message):
        custom.SamplerCustomAdvanced().sample(custom.Noise_RandomNoise(7), guider, sampler, sigmas, empty())


def test_drm_for_another_model_family_is_refused(pack, drm):
    """Flux also makes 16-channel latents, with another scale and shift: the model class decides."""
    flux_like = SimpleNamespace(model=type("Flux", (), {})())
    with pytest.raises(ValueError, match="the MODEL is Flux, not SD3 / SD3.5"):
        pack.drm.stepwise.check_fits(drm, flux_like)


def test_cancel_stops_sampling(nodes_mod, drm, setup):
    """A user's cancel (ComfyUI's interrupt flag) stops the search at the next candidate batch."""
    import comfy.model_management as mm

    scored = []
    original = drm.score

    def cancel_after_first_batch(*args, **kwargs):
        scored.append(1)
        mm.interrupt_current_processing(True)
        return original(*args, **kwargs)

    drm.score = cancel_after_first_batch
    try:
        with pytest.raises(mm.InterruptProcessingException):
            stepwise(nodes_mod, drm, setup, empty())
    finally:
        drm.score = original
        mm.interrupt_current_processing(False)
    assert len(scored) == 1


def test_scoring_does_not_reload_models_every_step(nodes_mod, drm, setup, monkeypatch):
    """ComfyUI loads the model and the DRM once before sampling; each step's scoring must not ask again
    (every load_models_gpu call frees inference memory, which on a full GPU evicts the generator)."""
    import comfy.model_management as mm

    calls = []
    original = mm.load_models_gpu

    def counting(models, *args, **kwargs):
        calls.append(list(models))
        return original(models, *args, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", counting)
    stepwise(nodes_mod, drm, setup, empty())
    assert len(calls) == 1 and drm.patcher in calls[0]


@pytest.mark.parametrize("mode", ["greedy", "beam", "resample"])
def test_overflowing_drm_scores_stop_the_search_naming_the_dtype(nodes_mod, setup, mode):
    """An fp16 DRM on huge latents would otherwise "keep the best" of NaNs and return a trace of NaNs.

    Candidates of an img2img start at 1e5 (1.5e5 in model space) pass fp16's largest value, 65504.
    (Matched as a ValueError: the node raises the ComfyUI-loaded package's NonFiniteScores.)"""
    fp16 = nodes_mod.loader.DRMLoader.execute("tiny-drm.safetensors", "fp16").args[0]
    latent = {"samples": torch.full((2, 16, 16, 16), 1e5)}
    with pytest.raises(ValueError, match="NaN or infinite scores.*float16.*bf16 or fp32"):
        stepwise(nodes_mod, fp16, setup, latent, mode=mode, denoise=0.3)


@pytest.mark.parametrize("bad", [dict(eta=float("nan")), dict(temperature=float("inf"))])
def test_non_finite_search_settings_are_refused_by_name(nodes_mod, drm, bad):
    """A posted workflow can carry NaN, which passes ComfyUI's min/max checks."""
    args = dict(branches=2, eta=0.7, mode="greedy", beam_width=2, temperature=1.0, window_start=0, window_end=-1)
    args.update(bad)
    with pytest.raises(ValueError, match=f"{next(iter(bad))} is (nan|inf); expected a finite number"):
        nodes_mod.stepwise.SamplerDRMStepwise.execute(drm, *args.values())
