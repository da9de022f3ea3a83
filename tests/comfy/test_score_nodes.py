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
    from trainer.demo.tiny import tiny_conditioning

    return tiny_conditioning(seed=0), tiny_conditioning(seed=1)


def score(nodes_mod, drm, latent, positive, **where):
    args = dict(position="sigma", sigma=0.0, steps=20, scheduler="simple", step=20)
    args.update(where)
    return nodes_mod.score.DRMScoreLatent.execute(drm, latent, positive, **args).args[:3]


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
    from trainer.demo.tiny import tiny_conditioning

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
    with pytest.raises(ValueError, match=r"NaN or infinite scores for 2 of 2 latents: its "
                                         r"float16 weights overflowed.*bf16 or fp32"):
        score(nodes_mod, drm, latent, prompts[0])


def test_a_prompt_encoded_shorter_than_the_drm_was_trained_on_is_refused(nodes_mod, models_dir, prompts):
    """A DRM trained with T5 padded to N tokens records N; a context of fewer than 77 + N tokens was encoded
    otherwise (ComfyUI's default is 77), and the error names the stock node that fixes it."""
    from drm.checkpoint import read_safetensors
    from drm.files import atomic_save

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


def test_top_k_and_threshold_select_and_the_rest_is_rejected(nodes_mod, drm, prompts):
    from comfy_execution.graph_utils import ExecutionBlocker

    latent = {"samples": torch.randn(5, 16, 32, 32, generator=torch.Generator().manual_seed(8))}
    args = dict(position="sigma", sigma=0.0, steps=20, scheduler="simple", step=20)
    execute = nodes_mod.score.DRMScoreLatent.execute
    scores, _, kept, rejected = execute(drm, latent, prompts[0], **args, top_k=2).args
    order = torch.tensor(scores).argsort(descending=True)
    assert torch.equal(kept["samples"], latent["samples"][order[:2]])
    assert torch.equal(rejected["samples"], latent["samples"][order[2:]])
    middle = sorted(scores)[2]
    _, summary, kept, rejected = execute(drm, latent, prompts[0], **args, threshold=middle).args
    assert kept["samples"].shape[0] == 3 and rejected["samples"].shape[0] == 2
    assert summary.count("(rejected)") == 2
    _, _, kept, rejected = execute(drm, latent, prompts[0], **args).args  # defaults keep every item
    assert torch.equal(kept["samples"], latent["samples"][order]) and isinstance(rejected, ExecutionBlocker)
    with pytest.raises(ValueError, match="no item reached threshold"):
        execute(drm, latent, prompts[0], **args, threshold=max(scores) + 1)


def test_score_image_encodes_and_scores_as_score_latent_does(nodes_mod, drm, prompts):
    from trainer.demo.synthetic import tiny_vae

    vae = tiny_vae()
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    scores, summary, best_first, rejected = nodes_mod.score.DRMScoreImage.execute(
        drm, images, vae, prompts[0], noise_sigma=0.2, seed=5, top_k=1).args
    latent = {"samples": vae.encode(images)}
    expected = nodes_mod.score.DRMScoreLatent.execute(drm, latent, prompts[0], "sigma", 0.0, 20, "simple", 20,
                                                      noise_sigma=0.2, seed=5).args[0]
    assert scores == pytest.approx(expected, abs=1e-6)
    order = torch.tensor(scores).argsort(descending=True)
    assert torch.equal(best_first, images[order[:1]]) and torch.equal(rejected, images[order[1:]])
    assert "noised to sigma 0.2000" in summary


@pytest.mark.parametrize(("node", "values", "name"), [
    ("loader.DRMLoader", dict(drm_name=DRM_FILE, weight_dtype="int8"), "weight_dtype"),
    ("loader.DRMLoader", dict(drm_name=DRM_FILE, weight_dtype="fp32", backbone="bogus"), "backbone"),
    ("score.DRMScoreLatent", dict(position="bogus"), "position"),
    ("score.DRMScoreLatent", dict(sampler_name="bogus"), "sampler_name"),
    ("stepwise.DRMStepwiseKSampler", dict(scheduler="bogus"), "scheduler"),
    ("stepwise.SamplerDRMStepwise", dict(mode="bogus"), "mode"),
])
def test_combo_values_are_checked_before_running(nodes_mod, node, values, name):
    """ComfyUI 0.3.64 leaves V3 combo values unchecked; the nodes check them by name."""
    module, cls = node.split(".")
    check = getattr(getattr(nodes_mod, module), cls).validate_inputs
    assert check(**values).startswith(f"{name}: 'bogus'" if name != "weight_dtype" else "weight_dtype: 'int8'")
    good = {k: v for k, v in values.items() if k in ("drm_name",)}
    assert check(**good) is True


def test_a_malformed_adapter_drm_is_refused_naming_the_layer(nodes_mod, models_dir):
    """(Matched as a ValueError: the node raises the ComfyUI-loaded package's DRMCheckpointError.)"""
    import comfy.sd

    from drm.files import atomic_save
    from trainer.demo.tiny import tiny_adapter_drm_state_dict, tiny_generator_state_dict

    generator = tiny_generator_state_dict()
    no_up = {k: v for k, v in tiny_adapter_drm_state_dict(generator).items() if not k.endswith("qkv.lora_up.weight")}
    atomic_save(no_up, models_dir / "drm" / "broken-adapter.safetensors", {"drm.format": "adapter", "drm.blocks": "1"})
    base = comfy.sd.load_diffusion_model_state_dict(dict(generator))
    with pytest.raises(ValueError, match=r"broken-adapter.safetensors: the LoRA for joint_blocks\.0\.\w+_block\.attn\.qkv "
                                         r"has lora_down but no lora_up"):
        nodes_mod.loader.DRMLoader.execute("broken-adapter.safetensors", "fp32", model=base)


def test_bad_cached_conditioning_is_refused_naming_the_file(nodes_mod, models_dir):
    from drm.conditioning import save_conditioning

    save_conditioning(models_dir / "drm_conditioning" / "nan.safetensors", torch.full((1, 4, 4096), float("nan")),
                      torch.zeros(1, 2048))
    save_conditioning(models_dir / "drm_conditioning" / "narrow.safetensors", torch.zeros(1, 4, 768),
                      torch.zeros(1, 2048))
    for name, problem in (("nan", "NaN or infinite"), ("narrow", "768 wide")):
        with pytest.raises(ValueError, match=f"conditioning file {name}.safetensors: .*{problem}"):
            nodes_mod.loader.DRMLoadConditioning.execute(f"{name}.safetensors")


def test_a_batch_that_does_not_fit_in_memory_is_scored_in_halves(nodes_mod, drm, prompts, monkeypatch):
    """K candidates at 1024^2 may not fit on a GPU: an out-of-memory error splits the batch, same scores."""
    import comfy.model_management

    latent = {"samples": torch.randn(5, 16, 32, 32, generator=torch.Generator().manual_seed(12))}
    expected, _, _ = score(nodes_mod, drm, latent, prompts[0])
    forward, sizes = drm.model.forward, []

    def small_memory(x, *args):
        sizes.append(x.shape[0])
        if x.shape[0] > 2:
            raise comfy.model_management.OOM_EXCEPTION("CUDA out of memory (simulated)")
        return forward(x, *args)

    monkeypatch.setattr(drm.model, "forward", small_memory)
    scores, _, _ = score(nodes_mod, drm, latent, prompts[0])
    assert scores == pytest.approx(expected, abs=1e-5)
    assert sizes == [5, 2, 3, 1, 2]


def test_odd_protocol_values_are_named_or_handled(nodes_mod, drm, prompts):
    from trainer.demo.synthetic import tiny_vae

    latent = {"samples": torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(3))}
    args = dict(position="sigma", sigma=0.0, steps=20, scheduler="simple", step=20)
    execute = nodes_mod.score.DRMScoreLatent.execute
    # the widget's largest seed, plus draws: the seeds wrap around instead of overflowing
    scores = execute(drm, latent, prompts[0], **args, noise_sigma=0.3, noise_draws=2, seed=0xFFFFFFFFFFFFFFFF).args[0]
    assert all(torch.isfinite(torch.tensor(scores)))
    with pytest.raises(ValueError, match="threshold is NaN"):
        execute(drm, latent, prompts[0], **args, threshold=float("nan"))
    vae = tiny_vae()
    for image, message in ((torch.rand(2, 1, 1, 3), "at least 8x8"), (torch.rand(2, 16, 16, 1), r"\[B, H, W, 3 or 4\]"),
                           (torch.full((1, 16, 16, 3), float("nan")), "NaN or infinite pixel")):
        with pytest.raises(ValueError, match=message):
            nodes_mod.score.DRMScoreImage.execute(drm, image, vae, prompts[0])
