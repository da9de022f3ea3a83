"""Test tiers (DESIGN §6): unit (torch only), comfy (COMFYUI_PATH), server (COMFYUI_PATH, real server).

Comfy and server tests are skipped with a visible reason when no ComfyUI tree is configured.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui_drm"


def comfyui_path() -> Path | None:
    value = os.environ.get("COMFYUI_PATH")
    if value and (Path(value) / "comfy" / "model_management.py").is_file():
        return Path(value)
    return None


@functools.cache
def comfy_skip_reason() -> str | None:
    """Why the comfy and server tiers cannot run here, or None when they can.

    The tree is imported for real (once per session; the tests reuse it), so a package missing from
    the tree's requirements is named in the skip line with the pip command that installs it.
    """
    value = os.environ.get("COMFYUI_PATH")
    if not value:
        return "COMFYUI_PATH is not set (point it at a ComfyUI 0.3.64+ tree to run this tier)"
    if comfyui_path() is None:
        return f"COMFYUI_PATH={value} is not a ComfyUI tree"
    from drm.host import ComfyUIUnavailable, import_comfy

    try:
        import_comfy(comfyui_path())
    except ComfyUIUnavailable as e:
        return str(e)
    return None


def tier_of(item) -> str:
    parts = Path(str(item.fspath)).relative_to(REPO / "tests").parts
    return parts[0] if parts[0] in ("unit", "comfy", "server") else "unit"


def pytest_report_header(config):
    reason = comfy_skip_reason()
    state = "run" if reason is None else f"SKIPPED: {reason}"
    return [f"tiers: unit run; comfy {state}; server {state}"]


def pytest_collection_modifyitems(config, items):
    reason = comfy_skip_reason()
    for item in items:
        tier = tier_of(item)
        if tier != "unit":
            item.add_marker(getattr(pytest.mark, tier))
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"{tier} tier: {reason}"))


@pytest.fixture(scope="session")
def comfyui():
    """ComfyUI imported in library mode; the path of the tree."""
    from drm.host import import_comfy

    return import_comfy(comfyui_path())


@pytest.fixture(scope="session")
def models_dir(comfyui, tmp_path_factory) -> Path:
    """A models folder with the tiny generator, the tiny DRM and cached conditioning, wired into folder_paths."""
    import folder_paths

    from drm.conditioning import save_conditioning
    from drm.files import atomic_save
    from drm.host import register_model_folders
    from trainer.demo.tiny import tiny_conditioning, tiny_drm_state_dict, tiny_generator_state_dict

    root = tmp_path_factory.mktemp("models")
    generator = tiny_generator_state_dict()
    atomic_save(generator, root / "diffusion_models" / "tiny-sd35.safetensors", {})
    atomic_save(tiny_drm_state_dict(generator), root / "drm" / "tiny-drm.safetensors",
                {"drm.format": "full", "drm.blocks": "1"})
    for seed in (0, 1):
        cond = tiny_conditioning(seed=seed)
        save_conditioning(root / "drm_conditioning" / f"tiny-prompt-{seed}.safetensors",
                          cond[0][0], cond[0][1]["pooled_output"], prompt=f"tiny prompt {seed}")
    register_model_folders()
    for name in ("diffusion_models", "drm", "drm_conditioning"):
        folder_paths.add_model_folder_path(name, str(root / name), is_default=True)
    return root


@pytest.fixture(scope="session")
def pack(comfyui, models_dir):
    """This repository imported the way ComfyUI imports a custom node folder (as a package)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_generator(comfyui):
    """(comfy-named state dict, ComfyUI ModelPatcher) of the tiny SD3.5-architecture generator."""
    import comfy.sd

    from trainer.demo.tiny import tiny_generator_state_dict

    sd = tiny_generator_state_dict()
    return sd, comfy.sd.load_diffusion_model_state_dict(dict(sd))



class FillingFile:
    """A binary file on a disk with `room` bytes left: a write beyond it writes what fits, then raises ENOSPC."""

    def __init__(self, path, room: int) -> None:
        self.file, self.room = open(path, "wb"), room

    def write(self, data) -> int:
        import errno

        data = bytes(data)
        if len(data) > self.room:
            self.file.write(data[: self.room])
            self.room = 0
            self.file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.fixture(scope="session")
def filling_file() -> type[FillingFile]:
    """FillingFile(path, room): a file opened for writing on a disk that is full after `room` more bytes."""
    return FillingFile
