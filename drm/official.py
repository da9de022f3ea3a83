"""The authors' DRM files (jjaxonx/DRM `model.safetensors`): their backbone in ComfyUI's MMDiT names, and the
input conventions their code applies but their files do not record.

Line references are to jjaxonx/DRM at commit 5c3c101.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .checkpoint import HEAD_PREFIX, OFFICIAL_PREFIX, OFFICIAL_SKIPPED_BLOCKS, count_blocks

# What an official file is trained and scored on, as metadata keys the runtime reads (an official file has
# none of its own):
# - drm.t5_length: T5 padded and truncated to 512 tokens (train.py:80 and :166-177; pipeline.py:48, :130-138);
# - drm.prompt_text "plain": prompts tokenised as plain text, CLIP cut at 77 tokens (train.py:182-187), so
#   nothing longer than 77 + 512 tokens was ever seen;
# - drm.image_size: images squashed to 512 x 512 before encoding (pipeline.py:47, :204).
AUTHORS_T5_LENGTH = 512
AUTHORS_IMAGE_SIZE = 512
OFFICIAL_METADATA = {"drm.t5_length": str(AUTHORS_T5_LENGTH), "drm.prompt_text": "plain",
                     "drm.image_size": str(AUTHORS_IMAGE_SIZE)}


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


def squash_8bit(image: Image.Image, size: int) -> np.ndarray:
    """An 8-bit Pillow image squashed to size x size, as float32 [size, size, 3] RGB in [0, 1].

    The authors' preprocessing for training and inference (dataset.py:79-80, pipeline.py:197-206):
    `convert("RGB")` (an alpha channel is dropped, not composited), then Pillow's bicubic resize of the
    8-bit image straight to the square (the aspect ratio is not kept), then / 255.
    """
    square = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32) / 255.0


def squash_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """A ComfyUI IMAGE batch [B, H, W, C >= 3] (floats in [0, 1]) squashed as `squash_8bit` does, [B, size, size, 3].

    The pixels are rounded to 8 bits first, as the authors' images are read (an image from Load Image is
    exactly n / 255, so nothing changes there); channels after the third (alpha) are dropped.
    """
    pixels = (images[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return torch.from_numpy(np.stack([squash_8bit(Image.fromarray(p, "RGB"), size) for p in pixels])).to(images.device)
