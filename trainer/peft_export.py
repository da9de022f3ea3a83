"""A trained LoRA under diffusers/peft names (lora_A / lora_B on SD3Transformer2DModel), for other tools.

ComfyUI's fused qkv layers map to diffusers' separate to_q / to_k / to_v: each gets the shared
lora_A (down) and its slice of lora_B (up). The correspondence is ComfyUI's own SD3 key map.
Each module also gets an `.alpha` tensor, so loaders that read it apply alpha / rank.
"""

from __future__ import annotations

import torch


def peft_state_dict(lora, depth: int | None = None) -> dict[str, torch.Tensor]:
    import comfy.utils

    blocks = 1 + max(int(p.split(".")[1]) for p in lora.paths)
    depth = depth or blocks
    key_map = comfy.utils.mmdit_to_diffusers({"depth": depth, "num_blocks": blocks})
    by_target: dict[str, list[tuple[str, tuple | None]]] = {}
    for diffusers_key, target in key_map.items():
        name, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
        if diffusers_key.endswith(".weight"):
            by_target.setdefault(name, []).append((diffusers_key[: -len(".weight")], offset))
    out = {}
    for i, path in enumerate(lora.paths):
        down, up = lora.down[i].detach().cpu(), lora.up[i].detach().cpu()
        for module, offset in by_target.get(path + ".weight", []):
            b = up if offset is None else up.narrow(offset[0], offset[1], offset[2])
            out[f"transformer.{module}.lora_A.weight"] = down.clone()  # q, k and v each get their own copy
            out[f"transformer.{module}.lora_B.weight"] = b.contiguous()
            out[f"transformer.{module}.alpha"] = torch.tensor(lora.alpha)
    return out
