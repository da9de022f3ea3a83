"""A tiny SD3.5-architecture generator and a tiny DRM, generated on the spot (no downloads).

The generator has SD3.5-Medium's structure (rms qk-norm, x-block self-attention in block 0,
16 latent channels, 4096-wide context, 2048-wide pooled text) at depth 2: hidden 128, about 2M
parameters in the MMDiT. ComfyUI detects it as SD3. Its weights are random, so its pictures are
noise: it exists to show and test the pipeline, not to make images.
"""

from __future__ import annotations

import math

import torch
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT, get_2d_sincos_pos_embed

from drm.checkpoint import HEAD_PREFIX, count_blocks, keep_blocks
from drm.conditioning import CONTEXT_WIDTH, POOLED_WIDTH
from drm.head import ConvGNHead
from drm.lora import LoRA, target_paths

POS_EMBED_MAX = 32  # latents up to 64x64 (512x512 pixels)


def tiny_generator_config(depth: int = 2, pos_embed_max: int = POS_EMBED_MAX) -> dict:
    """SD3.5-Medium's MMDiT layout at any depth (depth 24 is SD3.5-M's size), for latents up to
    2 * pos_embed_max wide (16 * pos_embed_max pixels; SD3.5-M's own is 384)."""
    hidden = 64 * depth
    return dict(
        in_channels=16, out_channels=16, patch_size=2, depth=depth, input_size=None,
        adm_in_channels=POOLED_WIDTH,
        context_embedder_config={"target": "torch.nn.Linear",
                                 "params": {"in_features": CONTEXT_WIDTH, "out_features": hidden}},
        num_patches=pos_embed_max ** 2, pos_embed_max_size=pos_embed_max, pos_embed_scaling_factor=None,
        # SD3.5-M adds x-block self-attention to its first 13 of 24 blocks
        qk_norm="rms", x_block_self_attn_layers=list(range(max(1, round(depth * 13 / 24)))),
    )


@torch.no_grad()
def tiny_generator_state_dict(depth: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Comfy-named MMDiT weights, deterministic for a given seed, fp32 on the CPU."""
    # Plain torch layers: ComfyUI's ops may build Linear layers without weights (Dynamic VRAM).
    model = init_random_(MMDiT(**tiny_generator_config(depth), operations=torch.nn), seed)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@torch.no_grad()
def init_random_(model: MMDiT, seed: int = 0) -> MMDiT:
    """Fill an MMDiT's weights in place, deterministically for a given seed, and return it: unit-variance
    outputs for unit-variance inputs, zero biases, unit norm scales, the sin-cos position embedding."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.ndim == 1:  # norm scales
            param.fill_(1.0)
        else:  # drawn in float32 on the CPU, so every dtype and device gets the same weights
            fan_in = math.prod(param.shape[1:])
            param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))
    pos = get_2d_sincos_pos_embed(model.hidden_size, model.pos_embed_max_size)
    model.pos_embed.copy_(torch.from_numpy(pos).float().unsqueeze(0))
    return model


@torch.no_grad()
def tiny_drm_state_dict(generator_sd: dict[str, torch.Tensor], blocks: int = 1, seed: int = 1) -> dict[str, torch.Tensor]:
    """A `full`-layout DRM: the generator's first `blocks` joint blocks and final layer, plus a random head."""
    sd = {k: v.clone() for k, v in keep_blocks(generator_sd, blocks).items()}
    torch.manual_seed(seed)
    head = ConvGNHead(in_channels=16)
    sd.update({HEAD_PREFIX + k: v.clone() for k, v in head.state_dict().items()})
    return sd


@torch.no_grad()
def tiny_lora_state_dict(generator_sd: dict[str, torch.Tensor], blocks: int | None = None, rank: int = 4,
                         alpha: float = 8.0, seed: int = 2) -> dict[str, torch.Tensor]:
    """A random attention LoRA for the tiny generator in ComfyUI's native names (with `.alpha`).

    `blocks`: only the layers a DRM keeping that many blocks uses. Its up weights are not zero, so
    it changes what it is applied to.
    """
    mmdit = MMDiT(**tiny_generator_config(count_blocks(generator_sd)), device="meta", operations=torch.nn)
    torch.manual_seed(seed)
    lora = LoRA.for_module(mmdit, target_paths(mmdit, blocks=blocks), rank, alpha)
    for up in lora.up:
        up.normal_(std=0.05)
    return lora.state_dict_comfy()


@torch.no_grad()
def tiny_adapter_drm_state_dict(generator_sd: dict[str, torch.Tensor], blocks: int = 1,
                                seed: int = 1) -> dict[str, torch.Tensor]:
    """An `adapter`-layout DRM for the tiny generator: a random LoRA on its first `blocks` blocks, the
    generator's final layer and a random head. Save it with metadata {"drm.format": "adapter",
    "drm.blocks": str(blocks)}."""
    sd = tiny_lora_state_dict(generator_sd, blocks=blocks, seed=seed)
    sd.update({k: v.clone() for k, v in generator_sd.items() if k.startswith("final_layer.")})
    torch.manual_seed(seed)
    sd.update({HEAD_PREFIX + k: v.clone() for k, v in ConvGNHead(in_channels=16).state_dict().items()})
    return sd


def tiny_conditioning(seed: int = 0, tokens: int = 8, batch: int = 1) -> list:
    """A ComfyUI CONDITIONING in SD3's shapes, standing in for encoded text (no text encoders needed)."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, CONTEXT_WIDTH, generator=gen)
    pooled = torch.randn(batch, POOLED_WIDTH, generator=gen)
    return [[context, {"pooled_output": pooled}]]
