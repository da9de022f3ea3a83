"""DRM Loader and the cached-conditioning loader."""

import os

import folder_paths
from comfy_api.latest import io

from ..drm.conditioning import load_conditioning
from ..drm.runtime import WEIGHT_DTYPES, load_drm
from .types import DRMModel, check_combos


def listed_in(folder: str, name: str, what: str) -> bool | str:
    """True, or the validation error that names a missing file, as ComfyUI names a missing checkpoint.

    Both ComfyUI versions call a node's validate_inputs before running the graph; 0.3.64 does not
    check V3 combo values itself, and newer versions report an empty list only as "not in []".
    """
    if name in folder_paths.get_filename_list(folder):
        return True
    return (f"{what} '{name}' is not in ComfyUI/models/{folder}/ (or an extra_model_paths.yaml folder for "
            f"'{folder}'). Put the file there and refresh the browser; `python -m trainer demo --install` puts "
            "the example workflows' files there.")


def file_state(folder: str, name: str) -> str:
    """The file's path, size and modification time, as the node's fingerprint (ComfyUI's IS_CHANGED): a file
    replaced under the same name (a retrained DRM copied over the old one) changes it, so ComfyUI runs the
    loader again instead of reusing its cached output. A file that is not there has none (validation names it)."""
    path = folder_paths.get_full_path(folder, name)
    try:
        stat = os.stat(path) if path else None
    except OSError:
        stat = None
    return "missing" if stat is None else f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


class DRMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DRMLoader",
            display_name="DRM Loader",
            category="DRM",
            description="Loads a DRM reward model (adapter, full or official format) from ComfyUI/models/drm.",
            inputs=[
                io.Combo.Input("drm_name", options=folder_paths.get_filename_list("drm"),
                               tooltip="DRM checkpoint (.safetensors) in ComfyUI/models/drm."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Weight precision. default lets ComfyUI pick for your device (bf16 or fp16 on GPUs)."),
                io.Model.Input("model", optional=True,
                               tooltip="The generator MODEL, from before any LoRA loader. Only adapter-format DRMs "
                                       "use it, to share its weights."),
                io.Combo.Input("backbone", options=["shared", "copy"], default="shared", optional=True,
                               tooltip="Adapter DRMs only. shared: run on the MODEL's own weights (no extra memory). "
                                       "copy: keep a copy of the blocks the DRM runs, so it scores the same while a "
                                       "LoRA'd clone of the MODEL samples (needed for step-wise sampling with a LoRA). "
                                       "fp8, scaled-fp8 and GGUF MODELs are dequantized into the copy."),
            ],
            outputs=[DRMModel.Output(display_name="drm")],
        )

    @classmethod
    def validate_inputs(cls, drm_name, weight_dtype=None, backbone=None) -> bool | str:
        listed = listed_in("drm", drm_name, "DRM file")
        return check_combos(cls, weight_dtype=weight_dtype, backbone=backbone) if listed is True else listed

    @classmethod
    def fingerprint_inputs(cls, drm_name, **inputs) -> str:
        return file_state("drm", drm_name)

    @classmethod
    def execute(cls, drm_name, weight_dtype, model=None, backbone="shared") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("drm", drm_name)
        return io.NodeOutput(load_drm(path, weight_dtype=WEIGHT_DTYPES[weight_dtype], base_model=model,
                                      own_backbone=backbone == "copy"))


class DRMLoadConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DRMLoadConditioning",
            display_name="DRM Load Cached Conditioning",
            category="DRM",
            description="Loads prompt conditioning cached by the DRM trainer, so no text encoder is needed.",
            inputs=[
                io.Combo.Input("conditioning_name", options=folder_paths.get_filename_list("drm_conditioning"),
                               tooltip="Cached conditioning (.safetensors with context and pooled) in ComfyUI/models/drm_conditioning."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def validate_inputs(cls, conditioning_name) -> bool | str:
        return listed_in("drm_conditioning", conditioning_name, "cached conditioning file")

    @classmethod
    def fingerprint_inputs(cls, conditioning_name, **inputs) -> str:
        return file_state("drm_conditioning", conditioning_name)

    @classmethod
    def execute(cls, conditioning_name) -> io.NodeOutput:
        return io.NodeOutput(load_conditioning(folder_paths.get_full_path_or_raise("drm_conditioning", conditioning_name)))
