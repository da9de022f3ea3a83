"""Helpers shared by the comfy tier's modules."""

from __future__ import annotations

import pytest


def official_state_dict(drm_sd: dict, depth: int) -> dict:
    """The tiny DRM in the authors' layout: diffusers SD3 names under transformer.*, built with ComfyUI's key map."""
    import comfy.utils

    from drm.checkpoint import count_blocks

    key_map = comfy.utils.mmdit_to_diffusers({"depth": depth, "num_blocks": count_blocks(drm_sd)})
    out = {}
    for diffusers_key, target in key_map.items():
        if isinstance(target, str):
            if target in drm_sd:
                out["transformer." + diffusers_key] = drm_sd[target].clone()
            continue
        name, offset = target[0], target[1]
        if name not in drm_sd:
            continue
        tensor = drm_sd[name]
        if offset is not None:
            tensor = tensor.narrow(offset[0], offset[1], offset[2])
        if len(target) > 2:
            tensor = target[2](tensor)  # swap_scale_shift is its own inverse
        out["transformer." + diffusers_key] = tensor.clone().contiguous()
    out.update({k: v.clone() for k, v in drm_sd.items() if k.startswith("reward_output.")})
    return out


@pytest.fixture(scope="session")
def to_official():
    """official_state_dict, for tests that write DRMs in the authors' layout."""
    return official_state_dict


def diffusers_sd3_transformer(comfy_sd: dict):
    """A diffusers SD3Transformer2DModel (fp32, eval) holding a ComfyUI-named SD3 MMDiT's weights.

    Its config is read from the tensors' shapes, so `trainer.demo.tiny.tiny_generator_state_dict(depth)` gives a
    tiny SD3.5-architecture model in diffusers (rms qk-norm, dual attention in its first blocks); the
    names go through ComfyUI's own key map (official_state_dict). Its forward(hidden_states=x,
    encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma * 1000).sample equals the
    MMDiT's raw output (velocity-like: ComfyUI's denoised is x - sigma * output). Needs diffusers.
    """
    from diffusers import SD3Transformer2DModel

    from drm.checkpoint import count_blocks

    depth = count_blocks(comfy_sd)
    hidden, in_channels, patch, _ = comfy_sd["x_embedder.proj.weight"].shape
    pos_max = round(comfy_sd["pos_embed"].shape[1] ** 0.5)
    model = SD3Transformer2DModel(
        sample_size=pos_max * patch, patch_size=patch, in_channels=in_channels,
        out_channels=comfy_sd["final_layer.linear.weight"].shape[0] // patch ** 2, num_layers=depth,
        attention_head_dim=64, num_attention_heads=hidden // 64,
        joint_attention_dim=comfy_sd["context_embedder.weight"].shape[1], caption_projection_dim=hidden,
        pooled_projection_dim=comfy_sd["y_embedder.mlp.0.weight"].shape[1], pos_embed_max_size=pos_max,
        dual_attention_layers=tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in comfy_sd),
        qk_norm="rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in comfy_sd else None,
    )
    # ComfyUI's SD3 key map sizes the q/k/v split as depth * 64: SD3 models are 64 * depth wide
    official = official_state_dict(comfy_sd, depth=hidden // 64)
    model.load_state_dict({k.removeprefix("transformer."): v for k, v in official.items()}, strict=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def to_diffusers():
    """diffusers_sd3_transformer: a fresh diffusers SD3 transformer from comfy-named weights (skips without diffusers)."""
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        pytest.skip(f"needs diffusers (pip install diffusers peft): {e}")
    return diffusers_sd3_transformer


@pytest.fixture(scope="module")
def nodes_mod(pack):
    """The pack's nodes package, as ComfyUI imported it."""
    return pack.nodes


@pytest.fixture(scope="module")
def drm(nodes_mod):
    """The tiny full DRM (tiny-drm.safetensors) through DRM Loader, in fp32."""
    return nodes_mod.loader.DRMLoader.execute("tiny-drm.safetensors", "fp32").args[0]


@pytest.fixture(scope="session")
def tiny_run_files(comfyui, tmp_path_factory):
    """The trainers' small inputs: the tiny generator, a random adapter DRM on its first block, 4 pre-encoded
    prompts and 256 latent pairs (tiny-sd35, drm-tiny-sd35, prompts and pairs .safetensors in one folder)."""
    import torch

    from drm.files import atomic_save
    from trainer.demo.synthetic import synthetic_latent_pairs
    from trainer.demo.tiny import tiny_adapter_drm_state_dict, tiny_conditioning, tiny_generator_state_dict
    from trainer.prompts import PromptBank

    root = tmp_path_factory.mktemp("tiny-run-files")
    generator = tiny_generator_state_dict()
    atomic_save(generator, root / "tiny-sd35.safetensors", {})
    atomic_save(tiny_adapter_drm_state_dict(generator, blocks=1), root / "drm-tiny-sd35.safetensors",
                {"drm.format": "adapter", "drm.blocks": "1"})
    conds = [tiny_conditioning(seed=i, tokens=8) for i in range(4)]
    PromptBank([f"tiny prompt {i}" for i in range(4)], torch.cat([c[0][0] for c in conds]),
               torch.cat([c[0][1]["pooled_output"] for c in conds]), torch.zeros(1, 8, 4096),
               torch.zeros(1, 2048)).save(root / "prompts.safetensors")
    synthetic_latent_pairs(256, size=8).save(root / "pairs.safetensors")
    return root
