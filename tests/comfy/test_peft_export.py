"""The `--peft-export` file loads in diffusers and applies the trainer's own LoRA (issue 11, item 8).

diffusers' SD3 `load_lora_weights` refuses keys without "lora" in their name (the old `.alpha` keys) and
loads the rest with peft's alpha = rank, so the export folds alpha / rank into lora_B. Checked on a tiny
SD3.5-architecture MMDiT in both ComfyUI and diffusers: the load is clean, each adapted diffusers Linear
changes by the trainer's `merged_delta` slice, and the outputs match ComfyUI's with its stock LoRA loader.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

try:  # dev dependencies: the export is checked by loading it in diffusers, which loads LoRAs through peft
    import diffusers  # noqa: F401
    import peft  # noqa: F401
except ImportError as e:
    pytest.skip(f"the peft export test needs diffusers and peft (pip install diffusers peft): {e}",
                allow_module_level=True)

RANK, ALPHA = 4, 8.0  # alpha != rank on purpose: a lost alpha / rank shows as half strength
SIGMAS = (0.7, 0.3)

# The diffusers counterparts of ComfyUI's MMDiT layers, written out here rather than taken from the key map
# the export uses: (ComfyUI layer, diffusers modules; a fused qkv splits its rows into three equal slices).
DIFFUSERS_MODULES = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "context_block.attn.proj": ("attn.to_add_out",),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
}


def diffusers_slices(path: str, out_features: int) -> list[tuple[str, slice]]:
    """`joint_blocks.<i>.<layer>` -> [(transformer_blocks.<i>.<module>, rows of the ComfyUI weight)]."""
    _, block, layer = path.split(".", 2)
    modules = DIFFUSERS_MODULES[layer]
    width = out_features // len(modules)
    return [(f"transformer_blocks.{block}.{m}", slice(j * width, (j + 1) * width)) for j, m in enumerate(modules)]


@pytest.fixture(scope="module")
def world(comfyui):
    """A fresh tiny generator in ComfyUI, a random LoRA on all its attention and MLP layers, and inputs."""
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    from drm.lora import LoRA, target_paths
    from trainer.demo.tiny import tiny_conditioning, tiny_generator_config, tiny_generator_state_dict

    generator = tiny_generator_state_dict()
    mmdit = MMDiT(**tiny_generator_config(2), device="meta", operations=torch.nn)
    torch.manual_seed(3)
    lora = LoRA.for_module(mmdit, target_paths(mmdit, include_mlp=True), RANK, ALPHA)
    with torch.no_grad():
        for up in lora.up:
            up.normal_(std=0.05)
    cond = tiny_conditioning(seed=0, batch=len(SIGMAS))
    inputs = dict(x=torch.randn(len(SIGMAS), 16, 16, 16, generator=torch.Generator().manual_seed(1)),
                  sigma=torch.tensor(SIGMAS), context=cond[0][0], pooled=cond[0][1]["pooled_output"])
    return dict(generator=generator, base=comfy.sd.load_diffusion_model_state_dict(dict(generator)),
                lora=lora, **inputs)


@pytest.fixture
def pipe(world, to_diffusers):
    """A StableDiffusion3Pipeline around a fresh diffusers copy of the tiny generator (no text encoders or
    VAE: loading a LoRA needs only the transformer)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    none = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                          "text_encoder_3", "tokenizer_3"))
    return StableDiffusion3Pipeline(transformer=to_diffusers(world["generator"]),
                                    scheduler=FlowMatchEulerDiscreteScheduler(), **none)


def diffusers_velocity(transformer, world) -> torch.Tensor:
    with torch.no_grad():
        return transformer(hidden_states=world["x"], encoder_hidden_states=world["context"],
                           pooled_projections=world["pooled"], timestep=world["sigma"] * 1000).sample


def comfy_outputs(patcher, world) -> tuple[torch.Tensor, torch.Tensor]:
    """(the MMDiT's raw output, ComfyUI's denoised) with `patcher`'s patches in the weights."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    model = patcher.model
    with torch.no_grad():
        raw = model.diffusion_model(world["x"], world["sigma"] * 1000, context=world["context"], y=world["pooled"])
        denoised = model.apply_model(world["x"], world["sigma"], c_crossattn=world["context"], y=world["pooled"])
    return raw, denoised


def assert_matches_comfy(velocity, raw, denoised, world):
    torch.testing.assert_close(velocity, raw, atol=1e-4, rtol=1e-5)
    # ComfyUI's SD3 (CONST flow): denoised = x - sigma * output, with the model's timestep sigma * 1000
    torch.testing.assert_close(world["x"] - world["sigma"].view(-1, 1, 1, 1) * velocity, denoised, atol=1e-4, rtol=1e-5)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_diffusers_copy_of_the_tiny_generator_computes_what_comfyui_does(world, pipe):
    """The builder in conftest is trustworthy: same output as ComfyUI's MMDiT, in the same convention."""
    assert pipe.transformer.config.dual_attention_layers == (0,)
    assert_matches_comfy(diffusers_velocity(pipe.transformer, world), *comfy_outputs(world["base"], world), world)


def test_the_old_format_with_alpha_keys_is_refused(world, pipe):
    """The export this replaces (lora_B unscaled, plus `.alpha`): the pipeline loader rejects the file."""
    old = {}
    for i, path in enumerate(world["lora"].paths):
        up = world["lora"].up[i].detach()
        for module, rows in diffusers_slices(path, up.shape[0]):
            old[f"transformer.{module}.lora_A.weight"] = world["lora"].down[i].detach().clone()
            old[f"transformer.{module}.lora_B.weight"] = up[rows].clone()
            old[f"transformer.{module}.alpha"] = torch.tensor(ALPHA)
    with pytest.raises(ValueError, match="lora"):
        pipe.load_lora_weights(old)


def test_the_export_loads_in_diffusers_with_the_trainers_weight_change(world, pipe, tmp_path):
    from peft.tuners.lora import LoraLayer

    from drm.files import atomic_save
    from trainer.grpo.peft_export import peft_state_dict

    lora = world["lora"]
    tensors = peft_state_dict(lora)
    assert not [k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    path = tmp_path / "tiny-sd35-step-grpo.peft.safetensors"
    atomic_save(tensors, path, {"drm.lora_rank": str(RANK), "drm.lora_alpha": str(ALPHA)})

    records = Records()
    logging.getLogger("diffusers").addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path), adapter_name="drm")
    finally:
        logging.getLogger("diffusers").removeHandler(records)
    # diffusers notes that the file has nothing for the text encoders (none here, and none trained)
    problems = [m for m in records.messages if "prefix='text_encoder" not in m]
    problems += [str(w.message) for w in caught if any(s in str(w.message).lower() for s in ("key", "lora", "adapter"))]
    assert not problems, problems

    adapted = {name: m for name, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    expected = {}
    for i, path_ in enumerate(lora.paths):
        delta = lora.merged_delta(i).detach()
        expected.update({module: delta[rows] for module, rows in diffusers_slices(path_, delta.shape[0])})
    assert sorted(adapted) == sorted(expected)
    with torch.no_grad():
        for module, delta in expected.items():
            torch.testing.assert_close(adapted[module].get_delta_weight("drm"), delta, atol=1e-6, rtol=0,
                                       msg=lambda m, module=module: f"{module}: {m}")


def test_diffusers_with_the_export_computes_what_comfyui_does_with_the_lora(world, pipe):
    """The same LoRA, through ComfyUI's stock loader (native keys) and through diffusers (the export)."""
    import comfy.sd

    from trainer.grpo.peft_export import peft_state_dict

    lora = world["lora"]
    without = diffusers_velocity(pipe.transformer, world)
    pipe.load_lora_weights(peft_state_dict(lora))
    patched, _ = comfy.sd.load_lora_for_models(world["base"], None, lora.state_dict_comfy(), 1.0, 0.0)
    assert len(patched.patches) == len(lora.paths)  # ComfyUI loaded every layer of the LoRA
    velocity = diffusers_velocity(pipe.transformer, world)
    assert (velocity - without).abs().max() > 0.1  # the LoRA changes the output: the match below means something
    assert_matches_comfy(velocity, *comfy_outputs(patched, world), world)
