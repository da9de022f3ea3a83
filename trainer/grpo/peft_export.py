"""A trained LoRA under diffusers/peft names (lora_A / lora_B on SD3Transformer2DModel), for other tools.

The file holds, for each adapted diffusers Linear `<module>` [out, in], only
`transformer.<module>.lora_A.weight` [r, in] (the LoRA's down) and
`transformer.<module>.lora_B.weight` [out, r] (its up, times alpha / rank). diffusers' SD3
`load_lora_weights` refuses a file with any key lacking "lora" (an `.alpha` key, say), then hands the
rest to `SD3Transformer2DModel.load_lora_adapter(sd, prefix="transformer")`, which gives peft a config
with lora_alpha = r: peft applies `lora_B @ lora_A`, scale 1. With alpha / rank folded into lora_B,
that is the trainer's and ComfyUI's `alpha / rank * up @ down`, at full strength.

ComfyUI's fused qkv layers map to diffusers' separate to_q / to_k / to_v (add_q_proj / add_k_proj /
add_v_proj for the text stream, attn2.to_q / to_k / to_v for SD3.5's second x-block attention): each
gets the shared lora_A and its slice of lora_B. proj maps to to_out.0 (to_add_out for the text
stream), the MLPs to ff(_context).net.0.proj / net.2. The correspondence is ComfyUI's own SD3 key map.
"""

from __future__ import annotations

import torch

HEAD_DIM = 64  # SD3 attention heads are 64 wide: ComfyUI's key map counts hidden size as depth * 64


def peft_state_dict(lora, depth: int | None = None) -> dict[str, torch.Tensor]:
    """`lora` (drm.lora.LoRA on a ComfyUI MMDiT) as diffusers/peft tensors; see the module docstring.

    `depth`: the MMDiT's depth (hidden size / 64); by default read from the LoRA's attention shapes.
    """
    import comfy.utils

    blocks = 1 + max(int(p.split(".")[1]) for p in lora.paths)
    if depth is None:
        # qkv and proj layers read the hidden size; the MLPs' fc1 does too, fc2 reads the MLP width
        hidden = next(lora.down[i].shape[1] for i, p in enumerate(lora.paths) if not p.endswith(".fc2"))
        depth = hidden // HEAD_DIM
    key_map = comfy.utils.mmdit_to_diffusers({"depth": depth, "num_blocks": blocks})
    by_target: dict[str, list[tuple[str, tuple | None]]] = {}
    for diffusers_key, target in key_map.items():
        name, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
        if diffusers_key.endswith(".weight"):
            by_target.setdefault(name, []).append((diffusers_key[: -len(".weight")], offset))
    out = {}
    for i, path in enumerate(lora.paths):
        modules = by_target.get(path + ".weight")
        if not modules:
            raise ValueError(f"peft export: {path} has no diffusers SD3 counterpart")
        down = lora.down[i].detach().cpu()
        up = lora.up[i].detach().cpu()
        up = (up.float() * lora.scale).to(up.dtype)  # peft loads these with alpha = r, i.e. scale 1
        for module, offset in modules:
            b = up if offset is None else up.narrow(offset[0], offset[1], offset[2])
            out[f"transformer.{module}.lora_A.weight"] = down.clone()  # q, k and v each get their own copy
            out[f"transformer.{module}.lora_B.weight"] = b.clone(memory_format=torch.contiguous_format)
    return out
