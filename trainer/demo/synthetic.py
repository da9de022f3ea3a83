"""Synthetic preference data with a hidden rule, and a tiny random-weight VAE, for tests and the demo.

The image rule: in every pair the preferred image is warmer, its mean red minus mean blue (`warmth`)
is higher by at least `WARMTH_MARGIN`. Both images are independent smooth random textures with
random brightness, so warmth is not the only difference, but it is the only one that decides.

The latent rule (`synthetic_latent_pairs`, no VAE): the preferred latent has the higher mean of
channel 0 over its top half (`latent_rule_score`), by at least `LATENT_MARGIN`.

`tiny_dina_snapshot` writes a DiNa-LRM snapshot folder with random weights, for `trainer import-dina`.

Nothing here imports ComfyUI at module level; `tiny_vae` imports it when called.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from drm.checkpoint import count_blocks
from drm.conditioning import CONTEXT_WIDTH, POOLED_WIDTH
from drm.head import DiNaHead

from ..reward.encoded import EncodedPairs

PROMPTS = ("a red fox", "a blue lake", "a green forest", "an orange sunset")
WARMTH_MARGIN = 0.1  # in [0, 1] pixel units: about 25 of 255 levels
LATENT_MARGIN = 0.5


def sd3_latent_scale_shift() -> tuple[float, float]:
    """(scale, shift) of SD3's latent format, process_in(x) = (x - shift) * scale: ComfyUI's
    comfy.latent_formats.SD3. Without ComfyUI (the torch-only test tier) they are SD3's VAE config's
    scaling_factor and shift_factor, the numbers ComfyUI holds."""
    try:
        from comfy.latent_formats import SD3
    except ImportError:
        return 1.5305, 0.0609
    sd3 = SD3()
    return sd3.scale_factor, sd3.shift_factor


def warmth(image: torch.Tensor) -> float:
    """Mean red minus mean blue of an image [H, W, 3] in [0, 1]: the hidden rule's score."""
    return float(image[..., 0].mean() - image[..., 2].mean())


def _smooth(gen: torch.Generator, channels: int, resolution: int, grid: int = 5) -> torch.Tensor:
    """Smooth random blobs in (-1, 1): a coarse random grid upsampled bicubically, squashed by tanh."""
    coarse = torch.randn(1, channels, grid, grid, generator=gen)
    return torch.tanh(F.interpolate(coarse, size=(resolution, resolution), mode="bicubic", align_corners=False))[0]


def _texture(gen: torch.Generator, resolution: int, target_warmth: float) -> torch.Tensor:
    """A random texture [H, W, 3] whose warmth is exactly `target_warmth` (before 8-bit rounding).

    Ranges keep every pixel inside [0.08, 0.92] for |target_warmth| <= 0.3, so nothing clips and the
    warmth survives saving: gray blobs (0.35..0.65), zero-mean colour blobs (within +-0.12), then red
    raised and blue lowered by half the target each.
    """
    brightness = 0.5 + 0.15 * _smooth(gen, 1, resolution)
    colour = 0.06 * _smooth(gen, 3, resolution)
    colour = colour - colour.mean(dim=(1, 2), keepdim=True)
    tint = torch.tensor([target_warmth / 2, 0.0, -target_warmth / 2]).view(3, 1, 1)
    return (brightness + colour + tint).permute(1, 2, 0)


def make_synthetic_dataset(folder: str | os.PathLike, n_pairs: int, resolution: int = 64, seed: int = 0) -> Path:
    """Write `n_pairs` PNG pairs and `pairs.jsonl` into `folder`; return the pairs file's path.

    Every third line carries a confidence in 0.3..1.0, so confidence filtering can be exercised.
    """
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be at least 1, got {n_pairs}.")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n_pairs):
        gap, low_end = torch.rand(2, generator=gen).tolist()
        gap = WARMTH_MARGIN + 0.15 * gap  # 0.10..0.25
        low = -0.3 + (0.6 - gap) * low_end  # so that low + gap <= 0.3
        names = (f"images/pair{i:05d}_a.png", f"images/pair{i:05d}_b.png")
        for name, target in zip(names, (low + gap, low)):
            pixels = (_texture(gen, resolution, target) * 255).round().to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / name)
        line = {"prompt": PROMPTS[i % len(PROMPTS)], "path1": names[0], "path2": names[1]}
        if i % 3 == 1:
            line["confidence"] = round(0.3 + 0.7 * torch.rand(1, generator=gen).item(), 3)
        lines.append(json.dumps(line))
    pairs = folder / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pairs


def latent_rule_score(latents: torch.Tensor) -> torch.Tensor:
    """The latent rule's score of latents [B, C, h, w]: mean of channel 0 over the top half, [B]."""
    return latents[:, 0, : latents.shape[2] // 2].mean(dim=(1, 2))


def synthetic_latent_pairs(n: int, size: int = 8, seed: int = 0, tokens: int = 8) -> EncodedPairs:
    """`n` pairs of VAE-space latents [16, size, size] obeying the latent rule, with random conditioning.

    Latents are drawn so that process_in (SD3's latent format) makes them about unit Gaussian, as real
    SD3 latents are. One random context [tokens, 4096] and pooled [2048] per prompt in PROMPTS.
    """
    if n < 1 or size < 2:
        raise ValueError(f"need n >= 1 and size >= 2, got n={n}, size={size}.")
    gen = torch.Generator().manual_seed(seed)
    scale, shift = sd3_latent_scale_shift()
    preferred = torch.randn(n, 16, size, size, generator=gen) / scale + shift
    rejected = torch.randn(n, 16, size, size, generator=gen) / scale + shift
    low = -1.0 + torch.rand(n, generator=gen)  # -1..0
    gap = LATENT_MARGIN + 0.5 * torch.rand(n, generator=gen)  # 0.5..1.0
    for latents, target in ((preferred, low + gap), (rejected, low)):
        top = latents[:, 0, : size // 2]
        top += (target - latent_rule_score(latents)).view(n, 1, 1)
    prompts = list(PROMPTS[: min(n, len(PROMPTS))])
    context = torch.randn(len(prompts), tokens, CONTEXT_WIDTH, generator=gen)
    pooled = torch.randn(len(prompts), POOLED_WIDTH, generator=gen)
    prompt_index = torch.arange(n) % len(prompts)
    return EncodedPairs(preferred, rejected, context, pooled, prompt_index, prompts)


def tiny_vae(seed: int = 0):
    """A random-weight TAESD with 16 latent channels as a comfy.sd.VAE: 64x64 images -> [B, 16, 8, 8].

    About 2.5M parameters, fast on a CPU. Its latents carry the image's content (it is a conv net),
    not SD3's meaning. Needs drm.host.import_comfy() to have run.
    """
    import comfy.sd

    return comfy.sd.VAE(sd=tiny_vae_state_dict(seed))


@torch.no_grad()
def tiny_vae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """tiny_vae's weights as a TAESD-format state dict, which ComfyUI's VAELoader loads from a file."""
    from comfy.taesd.taesd import TAESD

    model = TAESD(latent_channels=16)
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.ndim > 1:  # comfy's disable_weight_init layers leave weights uninitialised
            param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(math.prod(param.shape[1:])))
    # the encoder's last conv: scale its output so latents have about SD3's spread (std ~ 1 / scale_factor)
    model.taesd_encoder[-1].weight.mul_(4.0)
    state = dict(model.state_dict())
    # what ComfyUI's VAELoader sets for taesd3, SD3's latent scale and shift
    state["vae_scale"], state["vae_shift"] = (torch.tensor(v) for v in sd3_latent_scale_shift())
    return {k: v.contiguous() for k, v in state.items()}


# ---- DiNa-LRM snapshots (what `trainer import-dina` converts) ----

# The release's target modules (diffusion_rm/models/sd3_rm.py); peft matches them by name suffix, so
# `to_q` also lands on attn2.to_q.
DINA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def dina_model_section(blocks: int, image_taps: list[int], text_taps: list[int], rank: int, alpha: float) -> dict:
    return {
        "model_type": "thurstone", "backbone_model_id": "stabilityai/stable-diffusion-3.5-medium",
        "num_transformer_layers": blocks, "freeze_backbone": False, "use_ema": True, "ema_decay": 0.995,
        "use_lora": True, "use_text_features": True,
        "lora_config": {"r": rank, "lora_alpha": alpha, "init_lora_weights": "gaussian"},
        "use_logistic": False, "visual_head_idx": image_taps, "text_head_idx": text_taps, "use_t_embed": True,
        "reward_head": {"use_proj_in": False, "width": -1, "out_dim": 1, "num_queries": 4, "num_attn_heads": 8,
                        "dropout": 0.0},
    }


def dina_adapter_config(rank: int, alpha: float) -> dict:
    """What peft's save_pretrained writes for the release's LoraConfig (the fields an importer reads)."""
    return {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": DINA_TARGET_MODULES,
            "exclude_modules": None, "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": False, "init_lora_weights": "gaussian", "rank_pattern": {}, "alpha_pattern": {},
            "modules_to_save": None, "layers_to_transform": None, "lora_bias": False, "task_type": None}


def random_dina_head(token_dim: int, image_taps: list[int], text_taps: list[int], seed: int = 3) -> DiNaHead:
    """A DiNaHead with every parameter random (norm scales near 1), so each part changes the score."""
    torch.manual_seed(seed)
    head = DiNaHead(token_dim, token_dim, tuple(image_taps), tuple(text_taps))
    with torch.no_grad():
        for name, p in head.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / max(p.shape[-1], 1) ** 0.5)
    return head


def write_dina_snapshot(root: Path, lora: dict[str, torch.Tensor], head_state: dict[str, torch.Tensor], model: dict,
                   rank: int, alpha: float) -> Path:
    """The snapshot folder layout: config.json, checkpoint/backbone_lora/{adapter_config.json,
    adapter_model.safetensors}, checkpoint/rm_head.pt. `lora` uses peft's saved names."""
    (root / "checkpoint" / "backbone_lora").mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model": model, "training": {"add_noise": True}}))
    (root / "checkpoint" / "backbone_lora" / "adapter_config.json").write_text(json.dumps(dina_adapter_config(rank, alpha)))
    save_file({k: v.contiguous() for k, v in lora.items()}, str(root / "checkpoint" / "backbone_lora" / "adapter_model.safetensors"))
    torch.save(head_state, root / "checkpoint" / "rm_head.pt")
    return root


def random_peft_lora(width: int, blocks: int, dual_attention: int, rank: int, seed: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA in peft's saved names for an SD3 MMDiT `width` wide: every target in the first `blocks`
    blocks, attn2 in the first `dual_attention` of them."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(blocks):
        layers = [f"attn.{t}" for t in DINA_TARGET_MODULES]
        if i < dual_attention:
            layers += [f"attn2.{t}" for t in ("to_q", "to_k", "to_v", "to_out.0")]
        for layer in layers:
            key = f"base_model.model.transformer_blocks.{i}.{layer}"
            out[f"{key}.lora_A.weight"] = torch.randn(rank, width, generator=gen) / width ** 0.5
            out[f"{key}.lora_B.weight"] = torch.randn(width, rank, generator=gen) * 0.05
    return out


def tiny_dina_snapshot(root: Path, generator_sd: dict[str, torch.Tensor], seed: int = 3) -> Path:
    """A DiNa-LRM snapshot folder for a tiny generator (drm.tiny), in the published layout, with random
    weights: a LoRA on its first `depth - 1` blocks, image and text taps after the last of them.
    `trainer import-dina` turns it into a DRM file, as it does the real snapshot."""
    width = generator_sd["x_embedder.proj.weight"].shape[0]
    blocks = max(1, count_blocks(generator_sd) - 1)  # the generator's last block leaves no text tokens
    dual = sum(f"joint_blocks.{i}.x_block.attn2.qkv.weight" in generator_sd for i in range(blocks))
    head = random_dina_head(width, [blocks], [blocks], seed=seed)
    return write_dina_snapshot(root, random_peft_lora(width, blocks, dual, rank=4, seed=seed + 1), head.state_dict(),
                               dina_model_section(blocks, [blocks], [blocks], 4, 8.0), 4, 8.0)
