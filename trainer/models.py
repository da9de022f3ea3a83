"""Loading the SD3-family base model (and its VAE and text encoders) through ComfyUI, for training.

Import this module only after drm.host.import_comfy() has run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import comfy.model_base
import comfy.sd

from drm.checkpoint import read_safetensors


class BaseModelError(ValueError):
    """A base model, VAE or text-encoder file that cannot be used for training."""


@dataclass
class BaseModel:
    model: object  # comfy ModelPatcher
    vae: object | None  # comfy.sd.VAE
    clip: object | None  # comfy.sd.CLIP
    name: str
    vae_id: str = ""  # the files the VAE and text encoders came from, for the encoding cache's keys
    text_encoder_id: str = ""


def load_base(path: str, vae_path: str = "", clip_paths: list[str] | None = None, need_encoders: bool = False,
              dtype=None) -> BaseModel:
    """A ComfyUI checkpoint (model + VAE + text encoders) or a bare diffusion model, SD3-family only.

    `vae_path` and `clip_paths` (CLIP-L, CLIP-G, T5-XXL files) supply what a bare diffusion model lacks.
    `dtype` sets the diffusion model's weight dtype (None: ComfyUI's choice for the device).
    """
    file = Path(path)
    tensors, metadata = _read(file, "base")
    if any(k.startswith("reward_output.") for k in tensors) or metadata.get("drm.format"):
        raise BaseModelError(f"base: {file.name} is a DRM (reward model) file, not a generator. Pass the SD3 / SD3.5 "
                             "model as --base and the DRM as --drm.")
    options = {} if dtype is None else {"dtype": dtype}
    if any(k.startswith("model.diffusion_model.") for k in tensors):
        out = comfy.sd.load_state_dict_guess_config(tensors, output_vae=True, output_clip=True, metadata=metadata,
                                                     model_options=options)
        model, clip, vae = (out[0], out[1], out[2]) if out is not None else (None, None, None)
    else:
        model, clip, vae = comfy.sd.load_diffusion_model_state_dict(tensors, model_options=options), None, None
    if model is None or not isinstance(model.model, comfy.model_base.SD3):
        found = "nothing ComfyUI recognises" if model is None else type(model.model).__name__
        raise BaseModelError(f"base: {file.name} is not an SD3-family model (found {found}). "
                             "Use an SD3 / SD3.5 checkpoint or diffusion model.")
    if vae_path:
        try:
            vae = comfy.sd.VAE(sd=_read(Path(vae_path), "vae")[0])
        except (RuntimeError, KeyError, AttributeError, TypeError) as e:  # what ComfyUI raises for a non-VAE
            raise BaseModelError(f"vae: {Path(vae_path).name} is not a VAE ComfyUI can load ({str(e)[:120]}). "
                                 "Pass SD3's VAE (16 latent channels).") from None
    if clip_paths:
        for p in clip_paths:
            _read(Path(p), "clip")
        try:
            clip = comfy.sd.load_clip(clip_paths, clip_type=comfy.sd.CLIPType.SD3)
        except (RuntimeError, KeyError, AttributeError, TypeError) as e:
            raise BaseModelError(f"clip: {', '.join(Path(p).name for p in clip_paths)} are not text encoders ComfyUI "
                                 f"can load ({str(e)[:120]}). Pass SD3's CLIP-L, CLIP-G and T5-XXL files.") from None
    if need_encoders and (vae is None or clip is None):
        missing = " and ".join(n for n, v in (("a VAE (--vae)", vae), ("text encoders (--clip)", clip)) if v is None)
        raise BaseModelError(f"base: {file.name} has no VAE or text encoders, and image data needs them: pass {missing}.")
    return BaseModel(model, vae, clip, file.stem, vae_id=file_identity(Path(vae_path) if vae_path else file),
                     text_encoder_id="+".join(file_identity(Path(p)) for p in (clip_paths or [file])))


def file_identity(path: Path) -> str:
    """Name, size and modification time: a replaced or re-exported model file gets a new identity."""
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


def _read(path: Path, what: str):
    """safetensors only; errors name the flag."""
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise BaseModelError(f"{what}: {path.name} is not a .safetensors file; pickled weights are refused.")
    try:
        return read_safetensors(path, what=f"{what}:", where=f"Check the --{what} path.")
    except ValueError as e:
        raise BaseModelError(str(e)) from None
