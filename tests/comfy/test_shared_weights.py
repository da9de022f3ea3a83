"""An adapter DRM scores with the weights it was trained on, whatever else is patched onto the shared MODEL.

It runs on the generator's own modules, and ComfyUI writes a loaded clone's patches (a LoRA, a hooked
or scheduled LoRA, a replaced module) into those shared modules. The DRM must then score on the
unpatched weights (outside a sampler, by having ComfyUI restore them), or refuse with the fix (inside
a sampler that uses the patched clone), or keep its own copy (backbone "copy").
"""

from __future__ import annotations

import pytest
import torch

SIGMA = 0.3


@pytest.fixture(scope="module")
def world(comfyui, tmp_path_factory):
    """A fresh tiny generator (this module patches it), an adapter DRM for it, and two different LoRAs."""
    import comfy.sd

    from drm.files import atomic_save
    from trainer.demo.tiny import (
        tiny_adapter_drm_state_dict,
        tiny_conditioning,
        tiny_generator_state_dict,
        tiny_lora_state_dict,
    )

    generator = tiny_generator_state_dict()
    root = tmp_path_factory.mktemp("shared-weights")
    atomic_save(tiny_adapter_drm_state_dict(generator), root / "adapter.safetensors",
                {"drm.format": "adapter", "drm.blocks": "1"})
    base = comfy.sd.load_diffusion_model_state_dict(dict(generator))
    # Strong LoRAs on every attention layer, so scoring with them is far from scoring without.
    loras = [{k: v * 4 if k.endswith("lora_up.weight") else v for k, v in tiny_lora_state_dict(generator, seed=s).items()}
             for s in (5, 6)]
    cond = tiny_conditioning(seed=0)
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    return dict(base=base, path=root / "adapter.safetensors", loras=loras, cond=cond, x=x,
                negative=tiny_conditioning(seed=1))


def with_lora(world, index: int):
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(world["base"], None, world["loras"][index], 1.0, 0.0)
    return patched


def sample(model, world, sampler=None, positive=None):
    """Four euler steps with `model` (which leaves it loaded, its patches in the shared weights)."""
    import comfy.sample
    import comfy.samplers

    from drm.stepwise import schedule_sigmas

    sigmas = schedule_sigmas(model.get_model_object("model_sampling"), "simple", 4)
    latent = torch.zeros(1, 16, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 3)
    return comfy.sample.sample_custom(model, noise, 2.0, sampler or comfy.samplers.sampler_object("euler"), sigmas,
                                      positive or world["cond"], world["negative"], latent, disable_pbar=True, seed=3)


def scores(drm, world) -> torch.Tensor:
    return drm.score_latents(world["x"], SIGMA, world["cond"])


def loaded_holder(world):
    import comfy.model_management

    return next(m.model for m in comfy.model_management.current_loaded_models
                if m.model is not None and m.model.model is world["base"].model)


@pytest.fixture
def shared(world):
    from drm.runtime import load_drm

    return load_drm(world["path"], weight_dtype=torch.float32, base_model=world["base"])


def test_scores_after_sampling_with_a_lora_equal_scores_before(world, shared):
    before = scores(shared, world)
    lora = with_lora(world, 0)
    sample(lora, world)
    assert loaded_holder(world) is lora  # the LoRA'd clone holds the shared weights now
    after = scores(shared, world)
    assert torch.allclose(after, before, atol=1e-6, rtol=0), (before, after)
    # and a later prompt with another LoRA
    sample(with_lora(world, 1), world)
    assert torch.allclose(scores(shared, world), before, atol=1e-6, rtol=0)


def test_the_check_has_teeth_the_lora_changes_what_the_shared_modules_compute(world, shared):
    before = scores(shared, world)
    sample(with_lora(world, 0), world)
    patched = shared.model(shared.model_space(world["x"], SIGMA), torch.full((2,), SIGMA * 1000),
                           *shared.conditioning_tensors(world["cond"], 2))  # the module call, no loading
    assert (patched - before).abs().max() > 1e-2


def test_a_model_patch_that_replaces_a_module_is_undone_too(world, shared):
    before = scores(shared, world)
    clone = world["base"].clone()
    zero = torch.nn.Linear(128, 128)
    torch.nn.init.zeros_(zero.weight)
    clone.add_object_patch("diffusion_model.joint_blocks.0.x_block.attn.proj", zero)
    sample(clone, world)
    assert torch.allclose(scores(shared, world), before, atol=1e-6, rtol=0)


def test_stepwise_search_with_a_lora_clone_is_refused_with_the_fix(world, shared):
    from drm.runtime import SharedWeightsPatched
    from drm.stepwise import stepwise_ksampler

    with pytest.raises(SharedWeightsPatched, match=r"changes them \(.*LoRA.*backbone to 'copy'"):
        sample(with_lora(world, 0), world, stepwise_ksampler(shared, branches=2))


def test_stepwise_search_with_a_scheduled_lora_hook_is_refused(world, shared):
    """A LoRA hooked on the conditioning (ComfyUI's scheduled LoRA strengths) patches the weights inside the sampler."""
    import comfy.hooks

    from drm.runtime import SharedWeightsPatched
    from drm.stepwise import stepwise_ksampler

    hooks = comfy.hooks.create_hook_lora(world["loras"][0], strength_model=1.0, strength_clip=0.0)
    positive = comfy.hooks.set_hooks_for_conditioning(world["cond"], hooks)
    with pytest.raises(SharedWeightsPatched, match="LoRA"):
        sample(world["base"], world, stepwise_ksampler(shared, branches=2), positive=positive)


def test_a_patched_model_at_the_loader_is_refused(world):
    from drm.checkpoint import DRMCheckpointError
    from drm.runtime import load_drm

    with pytest.raises(DRMCheckpointError, match="changes its weights .* Connect the MODEL from before the LoRA"):
        load_drm(world["path"], base_model=with_lora(world, 0))


def test_backbone_copy_scores_like_shared_and_samples_under_a_lora(world, shared):
    from drm.runtime import load_drm
    from drm.stepwise import RewardTrace, stepwise_ksampler

    expected = scores(shared, world)
    copy = load_drm(world["path"], weight_dtype=torch.float32, base_model=world["base"], own_backbone=True)
    assert copy.base_model is None and not copy.model.shared_backbone
    assert torch.allclose(scores(copy, world), expected, atol=1e-5, rtol=0)
    trace = RewardTrace()
    out = sample(with_lora(world, 0), world, stepwise_ksampler(copy, trace, branches=2))
    assert torch.isfinite(out).all() and len(trace.chosen) == 3
    assert torch.allclose(scores(copy, world), expected, atol=1e-5, rtol=0)
