"""DRM checkpoint files: reading, format detection and saving (the official format's conversion is in official.py).

Formats (DESIGN §4), all safetensors:
- full:     comfy MMDiT keys for the kept blocks + final layer, `reward_output.*` head, metadata.
- official: the authors' `transformer.*` (diffusers SD3 names) + `reward_output.*`.
- adapter:  LoRA on the generator's MMDiT + head; needs the generator MODEL at load time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .files import atomic_save

FORMAT_KEY = "drm.format"
FORMATS = ("full", "official", "adapter")
# Official variants: joint blocks the authors skip at the end of the backbone, by backbone depth.
OFFICIAL_SKIPPED_BLOCKS = {24: 3, 38: 5}  # 2BConvGN (SD3.5-M), 7BConvGN (SD3.5-L)
OFFICIAL_PREFIX = "transformer."
HEAD_PREFIX = "reward_output."
PLAIN_FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # read as they are; others are dequantized
MAX_HEADER_BYTES = 100_000_000  # the largest header the safetensors library reads (its MAX_HEADER_SIZE)


def count_blocks(state_dict: dict[str, torch.Tensor], prefix: str = "joint_blocks.") -> int:
    """Joint blocks in a comfy-named state dict (highest index + 1)."""
    indices = {int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def beyond_blocks(path: str, blocks: int) -> bool:
    """Whether a comfy-named key or module path lies in a joint block at index >= `blocks`: one that a DRM
    running `blocks` blocks leaves out."""
    parts = path.split(".")
    return parts[0] == "joint_blocks" and len(parts) > 1 and int(parts[1]) >= blocks


def feeds_nothing(path: str, blocks: int) -> bool:
    """Whether a comfy-named key or module path is a layer of the last kept block's text stream after its
    attention's qkv (context_block.attn.proj, context_block.mlp): the text tokens that block puts out are read
    by no later block in a DRM running `blocks` blocks, so these layers get no gradient."""
    parts = path.split(".")
    return (len(parts) > 3 and parts[0] == "joint_blocks" and int(parts[1]) == blocks - 1
            and parts[2] == "context_block" and (parts[3] == "mlp" or parts[3:5] == ["attn", "proj"]))


def keep_blocks(state_dict: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """A comfy-named MMDiT state dict without its joint blocks from index `blocks` on (the tensors are
    shared, not copied): the part a DRM that runs `blocks` blocks keeps."""
    return {k: v for k, v in state_dict.items() if not beyond_blocks(k, blocks)}


class DRMCheckpointError(ValueError):
    """A DRM file that cannot be used; the message names the file and what to do."""


class HeaderNotUTF8(DRMCheckpointError):
    """A safetensors file whose header (tensor names and metadata text) is not UTF-8."""


@dataclass
class DRMCheckpoint:
    format: str
    state_dict: dict[str, torch.Tensor]  # for `full` and `official`: comfy MMDiT keys + reward_output.*
    blocks: int
    metadata: dict[str, str]


def read_safetensors(path: str | os.PathLike, what: str = "DRM file",
                     where: str = "Put DRM checkpoints in ComfyUI/models/drm/.") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a clear DRMCheckpointError for anything else.

    `what` names the file in messages; `where` says where such files belong.
    """
    path = Path(path)
    if not path.is_file():
        raise DRMCheckpointError(f"{what} {path} does not exist. {where}")
    with open(path, "rb") as f:
        head = f.read(9)
    # A safetensors file starts with a u64 header length and then its JSON header's "{"; a pickle
    # starts with a zip magic (torch.save) or the pickle protocol opcode.
    if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise DRMCheckpointError(
            f"{what} {path.name} is a PyTorch pickle, not safetensors. Pickles can run code when loaded, so "
            "only .safetensors is accepted: convert it with safetensors.torch.save_file on a trusted machine.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        bad = _first_non_utf8_header_byte(path)
        if bad is not None:  # safetensors refuses the whole header, and would say only "invalid UTF-8"
            raise HeaderNotUTF8(
                f"{what} {path.name}: its header (tensor names and metadata text, such as a prompt) is not UTF-8 "
                f"(byte 0x{bad[1]:02x} at byte offset {bad[0]} of the file), and safetensors reads only UTF-8. "
                "Write the file again with its text as UTF-8 (safetensors.torch.save_file, given Python strings, "
                "always does).") from None
        raise DRMCheckpointError(
            f"{what} {path.name} is not a readable safetensors file ({e}). It may be truncated: "
            "download or export it again.") from None
    return tensors, metadata


def _first_non_utf8_header_byte(path: Path) -> tuple[int, int] | None:
    """(offset in the file, value) of the first byte of a complete safetensors header that is not UTF-8, else None."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = f.read(min(length, MAX_HEADER_BYTES))
    except OSError:
        return None
    if len(header) < length:  # a cut-off header: the "truncated" message is the right one
        return None
    try:
        header.decode("utf-8")
    except UnicodeDecodeError as e:
        return 8 + e.start, header[e.start]
    return None


def describe_foreign(keys: list[str]) -> str:
    """A short guess at what a non-DRM state dict is, for error messages."""
    joined = " ".join(keys[:2000])
    if "input_blocks." in joined:
        return "an SD1/SDXL UNet"
    if "double_blocks." in joined:
        return "a Flux model"
    if "lora_up" in joined or "lora_A" in joined:  # before the block names: a LoRA's keys hold them too
        return "a LoRA"
    if "joint_blocks." in joined or "transformer_blocks." in joined:
        return "an SD3 diffusion model without a reward head (reward_output.*)"
    return f"an unknown model (first keys: {keys[:3]})"


def detect_format(keys: list[str], metadata: dict[str, str]) -> str:
    """`full`, `official` or `adapter`, from metadata first, then from the key names."""
    declared = metadata.get(FORMAT_KEY)
    if declared in FORMATS:
        return declared
    has_head = any(k.startswith(HEAD_PREFIX) for k in keys)
    if has_head and any(k.startswith(OFFICIAL_PREFIX + "transformer_blocks.") for k in keys):
        return "official"
    if has_head and any(k.startswith("joint_blocks.") for k in keys):
        return "full"
    raise ValueError(f"not a DRM checkpoint: it looks like {describe_foreign(keys)}")


def load_checkpoint(path: str | os.PathLike, blocks: int | None = None) -> DRMCheckpoint:
    """Read any DRM file into comfy-named tensors. `blocks` overrides the file's kept-block count. An official
    file's metadata gains the authors' conventions (drm.official.OFFICIAL_METADATA) where it names none."""
    name = Path(path).name
    tensors, metadata = read_safetensors(path)
    try:
        fmt = detect_format(list(tensors), metadata)
        if fmt == "adapter":
            # The adapter format's weights are applied on the generator's MODEL by the loader.
            return DRMCheckpoint(fmt, tensors, int(metadata.get("drm.blocks", 0)), metadata)
        if fmt == "official":
            from .official import (  # official.py reads this module's constants
                OFFICIAL_METADATA,
                official_blocks,
                official_to_comfy,
            )

            tensors = official_to_comfy(tensors)
            default_blocks = official_blocks(tensors)
            # the authors' T5 length, prompt and image conventions, which their files do not record
            metadata = {**OFFICIAL_METADATA, **metadata}
        else:
            default_blocks = int(metadata.get("drm.blocks") or count_blocks(tensors))
        if "x_embedder.proj.weight" not in tensors or tensors["x_embedder.proj.weight"].shape[1] != 16:
            raise ValueError("the backbone is not SD3-family (x_embedder must take 16 latent channels)")
    except (ValueError, KeyError) as e:
        raise DRMCheckpointError(f"DRM file {name}: {e}. Expected a DRM checkpoint for an SD3-family model "
                                 "(formats: full, official, adapter).") from None
    return DRMCheckpoint(fmt, tensors, blocks or default_blocks, metadata)


def _metadata(drm, fmt: str, extra: dict[str, str] | None) -> dict[str, str]:
    meta = {
        FORMAT_KEY: fmt,
        "drm.architecture": "sd3-mmdit",
        "drm.depth": str(drm.backbone.depth),
        "drm.blocks": str(drm.blocks),
        "drm.head": "convgn",
    }
    meta.update(extra or {})
    return meta


def _own_parts(drm) -> dict[str, torch.Tensor]:
    """Final layer (if the head uses one) and head tensors, under their file names."""
    state = {} if drm.final_layer is None else {"final_layer." + k: v for k, v in drm.final_layer.state_dict().items()}
    state.update({HEAD_PREFIX + k: v for k, v in drm.reward_output.state_dict().items()})
    return state


def full_state_dict(drm, dtype: torch.dtype | None = None, device=None) -> dict[str, torch.Tensor]:
    """A DRM's tensors in the `full` layout, on the CPU: its kept blocks (a LoRA, if any, merged in),
    final layer and head. For an adapter DRM, the blocks are read from the generator it shares, each layer
    as that generator computes with it (backbone_weights: fp8, scaled fp8, GGUF and other quantized layers
    are dequantized), and the LoRA is merged in float32.

    `dtype`: the dtype of dequantized and merged layers (default: float32, or a merged layer's own 16/32-bit
    float dtype); `device`: where quantized layers are run to read them (backbone_weights). Raises
    UnreadableWeights when a kept layer cannot be read.
    """
    def kept(path: str) -> bool:  # a shared generator backbone has its own final layer
        return path.split(".")[0] != "final_layer" and not beyond_blocks(path, drm.blocks)

    state = backbone_weights(drm.backbone, kept, dtype, device)
    if drm.lora is not None:
        for i, module_path in enumerate(drm.lora.paths):
            key = module_path + ".weight"
            # A 16-bit weight would lose small LoRA changes before the sum: merge in float32 always.
            merged = state[key].float() + drm.lora.merged_delta(i).detach().cpu().float()
            state[key] = merged.to(dtype or (state[key].dtype if state[key].dtype in PLAIN_FLOATS else torch.float32))
    state.update(_own_parts(drm))
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


class UnreadableWeights(ValueError):
    """A layer of a model whose weights cannot be read as plain tensors (the message names it and its storage)."""


def backbone_weights(root: nn.Module, keep=lambda path: True, dtype: torch.dtype | None = None,
                     device=None) -> dict[str, torch.Tensor]:
    """The tensors of `root`'s modules whose path `keep(path)` accepts, as the model computes with them,
    under state-dict names, on the CPU.

    - float32, float16 and bfloat16 tensors come as they are;
    - float8 tensors without a scale are cast to `dtype` (default float32), which is how ComfyUI computes
      with them;
    - a linear layer holding anything else (ComfyUI 0.3.64's scaled fp8 with its scale_weight, 0.26's
      comfy_quant layers, a GGUF file's packed blocks, which its state dict shows as meta tensors) is read by
      running it on `device`: its float32 outputs for the rows of an identity matrix, less its output for
      zeros, are its weight [out, in], dequantized exactly as it dequantizes for every forward.

    Raises UnreadableWeights naming any other tensor that is not stored as its plain values.
    """
    out = {}
    for path, module in root.named_modules():
        tensors = {name: t for name, t in [*module._parameters.items(), *module._buffers.items()]
                   if t is not None and name not in module._non_persistent_buffers_set}
        if not tensors or not keep(path):
            continue
        prefix = f"{path}." if path else ""
        if _is_linear(module) and (set(tensors) - {"weight", "bias"} or not all(map(_is_plain, tensors.values()))):
            weight, bias = _run_linear(module, prefix[:-1], device)
            run = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
            out.update({prefix + name: t.to(dtype or torch.float32) for name, t in run.items()})
            continue
        for name, t in tensors.items():
            value = _plain_value(t)
            if value is None:
                raise UnreadableWeights(f"layer {prefix}{name} is stored as {_describe_storage(t)}, not as its values")
            if value.is_floating_point() and value.dtype not in PLAIN_FLOATS:  # float8, unscaled: ComfyUI casts it
                value = value.to(dtype or torch.float32)
            out[prefix + name] = value.detach().cpu()
    return out


def _is_linear(module: nn.Module) -> bool:
    """torch's Linear, ComfyUI's ops (0.26's quantized Linear is no nn.Linear) and GGUF's: y = x W^T + b."""
    return isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)


def _is_plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter) and not t.is_meta


def _plain_value(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor as a plain torch.Tensor of its values, or None when its storage does not hold them as they are."""
    if _is_plain(t):
        return t
    if t.is_meta or not t.is_floating_point():
        return None
    try:  # a subclass (GGUF keeps its unquantized tensors so) whose storage is the values, shaped as it reports
        data = t.as_subclass(torch.Tensor)
    except (RuntimeError, TypeError):
        return None
    return data if tuple(data.shape) == tuple(t.shape) and data.dtype == t.dtype else None


def _describe_storage(t: torch.Tensor) -> str:
    quant = getattr(getattr(t, "tensor_type", None), "name", None)  # GGUF's GGMLTensor names its block format
    where = "a meta tensor (no data)" if t.is_meta else f"{type(t).__name__} data of dtype {str(t.dtype).replace('torch.', '')}"
    return where + (f" in {quant} blocks" if quant else "")


def _run_linear(layer: nn.Module, path: str, device=None, rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias [out] or None), float32 on the CPU: what `layer` computes with, read off its outputs."""
    device = device or next((t.device for t in layer.parameters() if not t.is_meta), torch.device("cpu"))
    n = layer.in_features

    def unit_rows(start: int) -> torch.Tensor:  # rows start, start + 1, ... of the n x n identity, float32
        count = min(rows, n - start)
        return torch.cat([torch.zeros(count, start, device=device), torch.eye(count, n - start, device=device)], 1)

    try:
        with torch.no_grad():
            offset = layer(torch.zeros(1, n, device=device)).float()
            columns = [(layer(unit_rows(start)).float() - offset).cpu() for start in range(0, n, rows)]
    except (RuntimeError, TypeError, ValueError) as e:  # NotImplementedError is a RuntimeError
        raise UnreadableWeights(f"layer {path} ({type(layer).__name__}) could not be run to read its weights "
                                f"({type(e).__name__}: {e})") from None
    weight = torch.cat(columns).T.contiguous()
    if tuple(weight.shape) != (layer.out_features, n):
        raise UnreadableWeights(f"layer {path} ({type(layer).__name__}) gives {weight.shape[0]} outputs, not its "
                                f"out_features {layer.out_features}")
    bias = offset[0].cpu() if getattr(layer, "bias", None) is not None else None
    return weight, bias


def save_full(drm, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a DRM as a `full` checkpoint (a LoRA, if any, merged into the kept blocks), atomically."""
    atomic_save(full_state_dict(drm), path, _metadata(drm, "full", metadata))


def save_adapter(drm, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a DRM as an `adapter` checkpoint: LoRA (if any) + final layer + head, for the generator's MMDiT."""
    state = drm.lora.state_dict_comfy() if drm.lora is not None else {}
    state.update({k: v.detach().contiguous().cpu() for k, v in _own_parts(drm).items()})
    meta = _metadata(drm, "adapter", metadata)
    if drm.lora is not None and drm.lora.rank is not None:
        meta.update({"drm.lora_rank": str(drm.lora.rank), "drm.lora_alpha": str(drm.lora.alpha)})
    atomic_save(state, path, meta)
