"""Find ComfyUI and import its `comfy` package as a library (for the trainer, tests and benchmarks).

Inside a running ComfyUI server none of this is needed: ComfyUI has already set everything up.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent


class ComfyUIUnavailable(RuntimeError):
    """ComfyUI cannot be used as a library; the message says why and what to do."""


class ComfyUINotFound(ComfyUIUnavailable):
    pass


class ComfyUIImportFailed(ComfyUIUnavailable):
    """The tree is there, but importing it fails (usually a package from its requirements is missing)."""


# What the pack and the trainer use; importing them up front turns a missing package into one clear
# message instead of a traceback in the middle of a run.
COMFY_MODULES = ("comfy.model_management", "comfy.sd", "comfy.samplers", "comfy.sample", "folder_paths")


# The trainer's own requirements (requirements.txt) that ComfyUI's do not bring.
TRAINER_PACKAGES = ("safetensors", "einops", "transformers", "accelerate", "matplotlib")


def missing_trainer_packages() -> str | None:
    """None when the trainer's packages are installed, else a message naming them and the pip command."""
    import importlib.util

    missing = [name for name in TRAINER_PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    requirements = Path(__file__).resolve().parent.parent / "requirements.txt"
    return (f"this Python environment lacks {', '.join(missing)}, which the trainer needs; install the pack's "
            f"requirements: pip install -r {requirements}")


def _is_comfyui_tree(path: Path) -> bool:
    return (path / "comfy" / "model_management.py").is_file() and (path / "folder_paths.py").is_file()


def locate_comfyui(explicit: str | os.PathLike | None = None) -> Path:
    """Return the ComfyUI tree to use: `explicit`, then $COMFYUI_PATH, then the ComfyUI holding this pack."""
    candidates = []
    if explicit:
        candidates.append(("--comfyui", Path(explicit)))
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(("COMFYUI_PATH", Path(os.environ["COMFYUI_PATH"])))
    # .../ComfyUI/custom_nodes/<this pack>; a pack linked into custom_nodes/ is found through the shell's
    # working directory ($PWD keeps the link; the resolved path leaves the ComfyUI tree)
    logical = Path(os.environ.get("PWD", "."))
    if logical != PACK_ROOT and logical.resolve() == PACK_ROOT:
        candidates.append(("the ComfyUI containing this pack", logical.parent.parent))
    candidates.append(("the ComfyUI containing this pack", PACK_ROOT.parent.parent))
    for source, path in candidates:
        if _is_comfyui_tree(path):
            return path.resolve()
        if source != "the ComfyUI containing this pack":
            raise ComfyUINotFound(f"{source} points at {path}, which is not a ComfyUI tree (no comfy/ or folder_paths.py); "
                                  "point it at the folder that holds ComfyUI's main.py.")
    raise ComfyUINotFound(
        "ComfyUI was not found. Pass --comfyui /path/to/ComfyUI (e.g. `python -m trainer demo --comfyui PATH`), "
        "or set COMFYUI_PATH, or install this pack under ComfyUI/custom_nodes/ and run from the pack's folder."
    )


def comfyui_version(root: Path) -> str:
    """The version in the tree's comfyui_version.py, or "unknown"."""
    try:
        text = (root / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def import_comfy(explicit: str | os.PathLike | None = None, cpu: bool | None = None) -> Path:
    """Make `comfy`, `folder_paths` and ComfyUI's `nodes` importable, in library mode.

    `cpu=None` means: use the CPU when torch sees no CUDA device. Safe to call more than once.
    Raises ComfyUINotFound when no tree is found, and ComfyUIImportFailed, naming the tree, the
    missing package and the pip command that installs it, when the tree cannot be imported.
    """
    root = locate_comfyui(explicit)
    if all(name in sys.modules for name in COMFY_MODULES):
        return root
    try:
        _import_tree(root, cpu)
    except (ImportError, RuntimeError) as e:  # a broken torchvision raises RuntimeError on import
        missing = f"the module {e.name!r} is missing" if isinstance(e, ImportError) and e.name else \
            f"importing it failed ({type(e).__name__}: {e})"
        raise ComfyUIImportFailed(
            f"ComfyUI {comfyui_version(root)} at {root} cannot be imported: {missing}. Install the tree's "
            f"requirements into this Python environment: pip install -r {root / 'requirements.txt'}") from e
    return root


def _import_tree(root: Path, cpu: bool | None) -> None:
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
    for name in COMFY_MODULES:
        importlib.import_module(name)


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


def import_comfy_or_exit(explicit: str | os.PathLike | None = None) -> Path:
    """import_comfy for command-line scripts (the benchmarks): a one-line error and exit code 2, not a traceback."""
    try:
        return import_comfy(explicit)
    except ComfyUIUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
