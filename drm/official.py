"""The authors' DRM files (jjaxonx/DRM `model.safetensors`): diffusers-named backbone to ComfyUI's MMDiT names."""

from __future__ import annotations

import torch

from .checkpoint import HEAD_PREFIX, OFFICIAL_PREFIX, OFFICIAL_SKIPPED_BLOCKS, count_blocks


def official_to_comfy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Authors' diffusers-named backbone -> comfy MMDiT names, through ComfyUI's own key map.

    ComfyUI's map swaps (scale, shift) -> (shift, scale) for norm_out and the last block's
    norm1_context; copying those rows unswapped would give wrong scores with no error.
    """
    import comfy.model_detection

    # The converter swaps those rows in place: it gets copies of them, so the caller's tensors (and a
    # second conversion of the same dict) stay as they were.
    diffusers_sd = {k[len(OFFICIAL_PREFIX):]: v.clone() if "norm_out" in k or "norm1_context" in k else v
                    for k, v in state_dict.items() if k.startswith(OFFICIAL_PREFIX)}
    try:
        converted = comfy.model_detection.convert_diffusers_mmdit(diffusers_sd, "")
    except RuntimeError as e:  # q, k and v of other sizes cannot be fused into one qkv
        raise ValueError(f"weights do not fit: the transformer.* tensors do not form one SD3 MMDiT "
                         f"({str(e).splitlines()[0]})") from None
    if converted is None:
        raise ValueError("transformer.* keys are not an SD3 MMDiT in diffusers names")
    converted.update({k: v for k, v in state_dict.items() if k.startswith(HEAD_PREFIX)})
    return converted


def official_blocks(state_dict: dict[str, torch.Tensor]) -> int:
    """Blocks the official forward runs: the blocks present when the file was cut short, else depth - skip."""
    depth = state_dict["x_embedder.proj.weight"].shape[0] // 64
    present = count_blocks(state_dict)
    if present < depth:
        return present
    if depth not in OFFICIAL_SKIPPED_BLOCKS:
        raise ValueError(f"backbone depth {depth} is neither SD3.5-Medium (24) nor SD3.5-Large (38); "
                         "pass the number of blocks to keep explicitly")
    return depth - OFFICIAL_SKIPPED_BLOCKS[depth]
