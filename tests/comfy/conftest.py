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
