"""Find ComfyUI and import its `comfy` package as a library (for the trainer, tests and benchmarks).

Inside a running ComfyUI server none of this is needed: ComfyUI has already set everything up.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent


class ComfyUINotFound(RuntimeError):
    pass


def _is_comfyui_tree(path: Path) -> bool:
    return (path / "comfy" / "model_management.py").is_file() and (path / "folder_paths.py").is_file()


def locate_comfyui(explicit: str | os.PathLike | None = None) -> Path:
    """Return the ComfyUI tree to use: `explicit`, then $COMFYUI_PATH, then the ComfyUI holding this pack."""
    candidates = []
    if explicit:
        candidates.append(("--comfyui", Path(explicit)))
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(("COMFYUI_PATH", Path(os.environ["COMFYUI_PATH"])))
    # .../ComfyUI/custom_nodes/<this pack>
    candidates.append(("the ComfyUI containing this pack", PACK_ROOT.parent.parent))
    for source, path in candidates:
        if _is_comfyui_tree(path):
            return path.resolve()
        if source != "the ComfyUI containing this pack":
            raise ComfyUINotFound(f"{source} points at {path}, which is not a ComfyUI tree (no comfy/ or folder_paths.py).")
    raise ComfyUINotFound(
        "ComfyUI was not found. Pass --comfyui /path/to/ComfyUI, or set COMFYUI_PATH, "
        "or install this pack under ComfyUI/custom_nodes/."
    )


def import_comfy(explicit: str | os.PathLike | None = None, cpu: bool | None = None) -> Path:
    """Make `comfy`, `folder_paths` and ComfyUI's `nodes` importable, in library mode.

    `cpu=None` means: use the CPU when torch sees no CUDA device. Safe to call more than once.
    """
    root = locate_comfyui(explicit)
    if "comfy.model_management" in sys.modules:
        return root
    # ComfyUI's own top-level modules (nodes, utils, folder_paths) must win over anything else.
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))

    import comfy.cli_args
    import torch

    if cpu is None:
        cpu = not torch.cuda.is_available()
    # Under accelerate/torchrun each rank must own its GPU: ComfyUI picks the current CUDA device
    # (and reads its memory) when comfy.model_management is first imported.
    if not cpu and os.environ.get("LOCAL_RANK") is not None:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # Must be set before comfy.model_management is first imported, or it probes CUDA and fails.
    comfy.cli_args.args.cpu = bool(cpu)
    # utils.extra_config first: `import nodes` later puts comfy/ first on sys.path, and `utils`
    # would then resolve to comfy/utils.py.
    importlib.import_module("utils.extra_config")
    importlib.import_module("comfy.model_management")
    return root


MODEL_FOLDERS = {
    "drm": "DRM reward model checkpoints",
    "drm_conditioning": "cached prompt conditioning (CONDITIONING tensors saved as safetensors)",
}


def register_model_folders() -> None:
    """Register ComfyUI/models/drm and ComfyUI/models/drm_conditioning, safetensors only.

    Paths added earlier by extra_model_paths.yaml are kept.
    """
    import folder_paths

    for name in MODEL_FOLDERS:
        paths = folder_paths.folder_names_and_paths.get(name, ([], set()))[0]
        default = os.path.join(folder_paths.models_dir, name)
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[name] = (paths, {".safetensors"})
