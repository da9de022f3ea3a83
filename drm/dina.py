"""`python -m trainer import-dina SNAPSHOT_DIR --out FILE`: a DiNa-LRM snapshot as one DRM file.

DiNa-LRM ("Beyond VLM-Based Rewards: Diffusion-Native Latent Reward Modeling", HKUST-C4G/diffusion-rm;
weights liuhuohuo/DiNa-LRM-SD35M-12layers) is a noisy-latent reward model on SD3.5-Medium's own MMDiT.
A snapshot folder holds:

    config.json                                  the training config; its `model` section describes the DRM
    checkpoint/backbone_lora/adapter_config.json a peft LoRA on the first `num_transformer_layers` blocks
    checkpoint/backbone_lora/adapter_model.safetensors
    checkpoint/rm_head.pt                        the reward head's state dict (read with weights_only=True)

The output is an `adapter`-format DRM (it runs on the generator's weights): the LoRA in ComfyUI's
MMDiT names, with diffusers' separate q, k and v adapters stacked into one adapter on ComfyUI's fused
qkv layer (block-diagonal up weights, so the sum is exact), the head under `reward_output.*`, and
the head's configuration plus the authors' scoring protocol in the metadata. Needs no ComfyUI.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import torch

from .checkpoint import FORMAT_KEY, HEAD_PREFIX, DRMCheckpointError, read_safetensors
from .files import atomic_save, read_utf8_text
from .head import DiNaHead
from .lora import PREFIX as LORA_PREFIX

# What the authors recommend for noising a clean latent before scoring: 0.4 for latents a sampler made,
# 0.1 for encoded photos (diffusion-rm README and infer/inference.py); their training pads T5 to 128.
NOISE_SIGMA_GENERATED = 0.4
NOISE_SIGMA_IMAGE = 0.1
T5_LENGTH = 128
MAX_BLOCKS = 38  # SD3.5-Large; SD3.5-Medium has 24
# torch.save's zip archive, or its legacy format (a pickle, whose first opcode is PROTO)
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")
HEAD_OPTIONS = {"width", "out_dim", "num_queries", "num_attn_heads", "dropout", "use_proj_in"}
# diffusers attention layer -> (ComfyUI layer, slot in a fused qkv or None)
LAYERS = {
    ("attn", "to_q"): ("x_block.attn.qkv", 0), ("attn", "to_k"): ("x_block.attn.qkv", 1),
    ("attn", "to_v"): ("x_block.attn.qkv", 2), ("attn", "to_out.0"): ("x_block.attn.proj", None),
    ("attn", "add_q_proj"): ("context_block.attn.qkv", 0), ("attn", "add_k_proj"): ("context_block.attn.qkv", 1),
    ("attn", "add_v_proj"): ("context_block.attn.qkv", 2), ("attn", "to_add_out"): ("context_block.attn.proj", None),
    ("attn2", "to_q"): ("x_block.attn2.qkv", 0), ("attn2", "to_k"): ("x_block.attn2.qkv", 1),
    ("attn2", "to_v"): ("x_block.attn2.qkv", 2), ("attn2", "to_out.0"): ("x_block.attn2.proj", None),
}
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?transformer_blocks\.(\d+)\.(attn2?)\."
                      r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)\.lora_([AB])\.weight$")


class SnapshotError(ValueError):
    """A snapshot this importer cannot convert; the message names the file or field."""


def import_dina(snapshot: str | Path, out: str | Path) -> dict[str, str]:
    """Convert a DiNa-LRM snapshot folder into the DRM file `out`; returns its metadata.

    Raises SnapshotError naming the file or config field at fault; `out` is written (atomically) only
    when everything converted.
    """
    root = Path(snapshot)
    if not root.is_dir():
        raise SnapshotError(f"{root} is not a folder. Pass the DiNa-LRM snapshot folder (the one holding config.json "
                            "and checkpoint/), e.g. from `hf download liuhuohuo/DiNa-LRM-SD35M-12layers --local-dir DIR`.")
    model = _model_config(root / "config.json")
    blocks = model["num_transformer_layers"]
    lora_dir = root / "checkpoint" / "backbone_lora"
    lora = _lora_config(lora_dir / "adapter_config.json")
    tensors = _comfy_lora(lora_dir / "adapter_model.safetensors", lora, blocks)
    _check_run_config(lora, model.get("lora_config"))
    token_dim = next(v for k, v in tensors.items() if k.endswith(".lora_down.weight")).shape[1]
    head_config = _head_config(model, token_dim)
    head = _head_state_dict(root / "checkpoint" / "rm_head.pt", head_config, token_dim)
    tensors.update({HEAD_PREFIX + k: v.float().contiguous() for k, v in head.items()})
    metadata = {
        FORMAT_KEY: "adapter",
        "drm.architecture": "sd3-mmdit",
        "drm.blocks": str(blocks),
        "drm.head": "dina",
        "drm.head_config": json.dumps(head_config),
        "drm.noise_sigma": str(NOISE_SIGMA_GENERATED),
        "drm.noise_sigma_image": str(NOISE_SIGMA_IMAGE),
        "drm.t5_length": str(T5_LENGTH),
        "drm.source": f"DiNa-LRM snapshot {root.name} ({model['backbone_model_id']})",
    }
    atomic_save(tensors, out, metadata)
    return metadata


def _read_json(path: Path, what: str, where: str):
    """A snapshot's JSON file; SnapshotError naming it when it is missing, not UTF-8 or not JSON."""
    if not path.is_file():
        raise SnapshotError(f"{path} is missing: {where}.")
    try:
        return json.loads(read_utf8_text(path, what, SnapshotError))
    except json.JSONDecodeError as e:
        raise SnapshotError(f"{path} is not JSON ({e}).") from None


def _model_config(path: Path) -> dict:
    """The `model` section of config.json, checked for what this importer supports."""
    config = _read_json(path, "DiNa-LRM config", "a DiNa-LRM snapshot has config.json at its top level")
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise SnapshotError(f"{path} has no `model` section; it is not a DiNa-LRM training config.")

    def need(field: str, ok, expected: str):
        if field not in model or not ok(model[field]):
            raise SnapshotError(f"{path}: model.{field} = {model.get(field)!r}; this importer supports {expected}.")
        return model[field]

    backbone = need("backbone_model_id", lambda v: isinstance(v, str), "a Hugging Face model id")
    if not re.search(r"stable-diffusion-3(\.5)?-(medium|large)", backbone.lower()):
        raise SnapshotError(f"{path}: model.backbone_model_id = {backbone!r}; only SD3 / SD3.5 backbones can run in "
                            "this pack (Flux, Z-Image and Qwen-Image DiNa-LRM models cannot).")
    need("num_transformer_layers", lambda v: _is_int(v) and 1 <= v <= MAX_BLOCKS,
         f"a block count in 1..{MAX_BLOCKS} (SD3.5-Large has {MAX_BLOCKS} blocks)")
    need("use_lora", lambda v: v is True, "true (a LoRA checkpoint; a full fine-tune is not a DiNa-LRM release)")
    for flag in ("freeze_backbone", "use_logistic", "use_text_features"):
        if flag in model:
            need(flag, lambda v: isinstance(v, bool), "true or false (a JSON boolean)")
    if model.get("freeze_backbone", False):
        raise SnapshotError(f"{path}: model.freeze_backbone = true (a head-only checkpoint); this importer supports "
                            "the LoRA release layout.")
    if model.get("use_logistic", False):
        raise SnapshotError(f"{path}: model.use_logistic = true; its logistic parameters are not in rm_head.pt, so "
                            "the snapshot cannot be scored as trained.")
    blocks = model["num_transformer_layers"]
    for field in ("visual_head_idx", "text_head_idx"):
        taps = need(field, lambda v: isinstance(v, list) and all(_is_int(i) for i in v), "a list of block counts")
        if (field == "visual_head_idx" and not taps) or taps != sorted(set(taps)) or any(not 0 <= i <= blocks for i in taps):
            raise SnapshotError(f"{path}: model.{field} = {taps}; expected increasing block counts in 0..{blocks} "
                                "(0 is the embedded input), at least one for the image stream.")
    if not model.get("use_text_features", True) and model["text_head_idx"]:
        raise SnapshotError(f"{path}: model.use_text_features = false with text_head_idx {model['text_head_idx']}; "
                            "this importer supports text features on (the release) or an empty text_head_idx.")
    head = need("reward_head", lambda v: isinstance(v, dict), "a reward_head section")
    unknown = sorted(set(head) - HEAD_OPTIONS)
    if unknown:
        raise SnapshotError(f"{path}: model.reward_head has options this importer does not know: {unknown} "
                            f"(known: {sorted(HEAD_OPTIONS)}).")
    rules = {"width": (lambda v: v is None or (_is_int(v) and (v == -1 or v > 0)), "a positive width, or -1"),
             "out_dim": (lambda v: _is_int(v) and v == 1, "1 (a DRM gives one score)"),
             "num_queries": (lambda v: _is_int(v) and v >= 1, "a query count >= 1"),
             "num_attn_heads": (lambda v: _is_int(v) and v >= 1, "a head count >= 1"),
             "dropout": (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1,
                         "a probability in [0, 1)"),
             "use_proj_in": (lambda v: isinstance(v, bool), "true or false (a JSON boolean)")}
    for field, (ok, expected) in rules.items():
        if field in head and not ok(head[field]):
            raise SnapshotError(f"{path}: model.reward_head.{field} = {head[field]!r}; this importer supports {expected}.")
    return model


def _is_int(value) -> bool:
    """A JSON integer (true and false are not numbers here, although Python counts them as ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _lora_config(path: Path) -> dict:
    """The snapshot's peft LoRA config, after refusing the peft options that change its math: r, lora_alpha
    and the fields the tensors must agree with (target_modules, exclude_modules, layers_to_transform)."""
    config = _read_json(path, "LoRA config", "the snapshot's LoRA config (checkpoint/backbone_lora/adapter_config.json)")
    if not isinstance(config, dict):
        raise SnapshotError(f"{path} is not a peft LoRA config (a JSON object).")
    if config.get("peft_type", "LORA") != "LORA":
        raise SnapshotError(f"{path}: peft_type = {config['peft_type']!r}; expected LORA.")
    for field, plain in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False), ("lora_bias", False),
                         ("bias", "none"), ("rank_pattern", {}), ("alpha_pattern", {}), ("modules_to_save", None),
                         ("layer_replication", None)):
        if config.get(field) not in (None, plain):
            raise SnapshotError(f"{path}: {field} = {config[field]!r}; this importer supports only {plain!r}.")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not _is_int(r) or r < 1 or not isinstance(alpha, int | float) or isinstance(alpha, bool) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise SnapshotError(f"{path}: r = {r!r}, lora_alpha = {alpha!r}; expected a positive integer and a positive "
                            "finite number.")
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if value is not None and not _valid_modules(value):
            raise SnapshotError(f"{path}: {field} = {value!r}; expected a list of module names or a regular expression.")
    layers = config.get("layers_to_transform")
    layers = [layers] if _is_int(layers) else layers
    if layers is not None and not (isinstance(layers, list) and layers and all(_is_int(i) and i >= 0 for i in layers)):
        raise SnapshotError(f"{path}: layers_to_transform = {config['layers_to_transform']!r}; expected block indices.")
    return {"r": r, "alpha": alpha, "path": path, "targets": config.get("target_modules"),
            "excluded": config.get("exclude_modules"), "layers": layers}


def _valid_modules(value) -> bool:
    if isinstance(value, list):
        return all(isinstance(v, str) for v in value)
    try:
        return isinstance(value, str) and re.compile(value) is not None
    except re.error:
        return False


def _names(pattern, module: str) -> bool:
    """Whether a peft target_modules / exclude_modules value names `module` (transformer_blocks.N.attn.to_q) as
    peft matches it: a string is a regular expression for the whole name, a list holds names or name endings."""
    if isinstance(pattern, str):
        return pattern == "all-linear" or re.fullmatch(pattern, module) is not None
    return any(module == name or module.endswith("." + name) for name in pattern)


def _comfy_lora(path: Path, lora: dict, blocks: int) -> dict[str, torch.Tensor]:
    """The peft LoRA tensors under ComfyUI's MMDiT names (fused qkv adapters stacked), float32, after checking
    them against their config `lora` (_lora_config)."""
    if not path.is_file():
        raise SnapshotError(f"{path} is missing: the snapshot's LoRA weights (checkpoint/backbone_lora/).")
    try:
        peft, _ = read_safetensors(path, what="LoRA file", where="It belongs in the snapshot's checkpoint/backbone_lora/.")
    except DRMCheckpointError as e:
        raise SnapshotError(str(e)) from None
    parts: dict[str, dict[int | None, dict[str, torch.Tensor]]] = {}
    modules: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in peft.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise SnapshotError(f"{path}: tensor {key!r} is not a LoRA on an SD3 attention layer this importer knows.")
        if not tensor.is_floating_point() or tensor.ndim != 2 or not torch.isfinite(tensor).all():
            raise SnapshotError(f"{path}: tensor {key!r} is {tensor.dtype} {list(tensor.shape)}"
                                f"{'' if torch.isfinite(tensor.float()).all() else ' with NaN or infinite values'}; "
                                "a LoRA weight is a 2-D matrix of finite floats.")
        block, attn, layer, ab = int(match[1]), match[2], match[3], match[4]
        if block >= blocks:
            raise SnapshotError(f"{path}: tensor {key!r} is in block {block}, but config.json keeps {blocks} blocks.")
        target, slot = LAYERS[(attn, layer)]
        parts.setdefault(f"joint_blocks.{block}.{target}", {}).setdefault(slot, {})[ab] = tensor.float()
        modules.setdefault((block, attn, layer), {})[ab] = tensor
    _check_against_config(path, modules, lora, blocks)
    scale = lora["alpha"] / lora["r"]
    out = {}
    width = next(iter(peft.values())).shape[1] if peft else 0  # SD3 attention layers are all width x width
    for target, slots in parts.items():
        for slot, pair in slots.items():
            if set(pair) != {"A", "B"} or pair["A"].shape[0] != pair["B"].shape[1]:
                raise SnapshotError(f"{path}: the LoRA on {target} (slot {slot}) lacks lora_A or lora_B, or their ranks differ.")
            if pair["A"].shape[1] != width or pair["B"].shape[0] != width:
                raise SnapshotError(f"{path}: the LoRA on {target} (slot {slot}) is {pair['B'].shape[0]}x"
                                    f"{pair['A'].shape[1]}, but the others are {width}x{width}: not one SD3 model.")
        if None in slots:  # a plain layer
            down, up = slots[None]["A"], slots[None]["B"]
        else:  # q, k, v adapters side by side: down stacks them, up is block-diagonal over the fused output
            width = next(iter(slots.values()))["B"].shape[0]
            down = torch.cat([slots[s]["A"] for s in sorted(slots)])
            up = torch.zeros(3 * width, down.shape[0])
            column = 0
            for s in sorted(slots):
                b = slots[s]["B"]
                up[s * width:(s + 1) * width, column:column + b.shape[1]] = b
                column += b.shape[1]
        out[f"{LORA_PREFIX}{target}.lora_down.weight"] = down.contiguous()
        out[f"{LORA_PREFIX}{target}.lora_up.weight"] = up.contiguous()
        out[f"{LORA_PREFIX}{target}.alpha"] = torch.tensor(scale * down.shape[0])
    if not out:
        raise SnapshotError(f"{path} holds no tensors.")
    return out


def _check_against_config(path: Path, modules: dict, lora: dict, blocks: int) -> None:
    """Refuse LoRA tensors that are not what adapter_config.json says they are: another rank (peft refuses that
    pair too), a layer its target_modules / exclude_modules / layers_to_transform leaves out, or a targeted
    layer of a kept block without a LoRA. `modules`: (block, attention, layer) -> {"A": lora_A, "B": lora_B}."""
    config, r, targets, excluded = lora["path"].name, lora["r"], lora["targets"], lora["excluded"]
    again = "The two files do not belong together: download the snapshot again."

    def targeted(name: str) -> bool:
        return (targets is None or _names(targets, name)) and (excluded is None or not _names(excluded, name))

    for (block, attn, layer), pair in sorted(modules.items()):
        name, rank = f"transformer_blocks.{block}.{attn}.{layer}", pair["A"].shape[0] if "A" in pair else pair["B"].shape[1]
        if rank != r:
            raise SnapshotError(f"{path}: the LoRA on {name} has rank {rank}, but {config} says r = {r} (it would run at "
                                f"{rank}/{r} of its strength; peft refuses such a pair). {again}")
        if not targeted(name):
            raise SnapshotError(f"{path} holds a LoRA on {name}, which {config} does not target (target_modules = "
                                f"{targets!r}, exclude_modules = {excluded!r}). {again}")
    layers = lora["layers"]
    if layers is not None and max(layers) >= blocks:
        raise SnapshotError(f"{lora['path']}: layers_to_transform = {layers}, but config.json keeps {blocks} blocks.")
    adapted = sorted(set(layers)) if layers is not None else list(range(blocks))
    stray = sorted({block for block, _, _ in modules} - set(adapted))
    if stray:
        raise SnapshotError(f"{path} holds a LoRA on block {stray[0]}, which {config}'s layers_to_transform = {layers} "
                            f"leaves out. {again}")
    if targets is None:
        return
    for block in adapted:
        for attn in ("attn", "attn2"):
            if attn == "attn2" and not any(key[:2] == (block, "attn2") for key in modules):
                continue  # only some SD3.5 blocks have a second attention
            # the last block of a whole SD3 model outputs no text tokens, so it has no to_add_out
            missing = [f"transformer_blocks.{block}.{attn}.{layer}" for a, layer in LAYERS if a == attn
                       and (block, attn, layer) not in modules and targeted(f"transformer_blocks.{block}.{attn}.{layer}")
                       and not (layer == "to_add_out" and block == blocks - 1)]
            if missing:
                raise SnapshotError(f"{path} has no LoRA on {', '.join(missing[:3])}, which {config} targets (config.json "
                                    f"keeps {blocks} blocks): the file is incomplete. Download the snapshot again.")


def _check_run_config(lora: dict, trained) -> None:
    """Refuse an adapter_config.json that disagrees with config.json's model.lora_config (the run's own LoRA
    settings) on r, lora_alpha or target_modules."""
    stated = {"r": lora["r"], "lora_alpha": lora["alpha"], "target_modules": lora["targets"]}
    for field, value in trained.items() if isinstance(trained, dict) else ():
        if stated.get(field) is not None and value != stated[field]:
            raise SnapshotError(f"{lora['path']}: {field} = {stated[field]!r}, but config.json's model.lora_config."
                                f"{field} = {value!r}: the two files are not from one training run. Download the "
                                "snapshot again.")


def _head_config(model: dict, token_dim: int) -> dict:
    """DiNaHead's arguments for this snapshot (json-able)."""
    head = model["reward_head"]
    width = head.get("width", -1)
    return {"image_taps": model["visual_head_idx"], "text_taps": model["text_head_idx"],
            "width": token_dim if width in (-1, None) else width, "num_queries": head.get("num_queries", 4),
            "num_attn_heads": head.get("num_attn_heads", 8), "use_proj_in": bool(head.get("use_proj_in", False))}


def _looks_like(start: bytes) -> str:
    """What a file that is no torch file seems to be, from its first bytes (or nothing)."""
    if start.lstrip().startswith(b"<"):
        return ": an HTML page, such as a download site's error or sign-in page"
    if start.startswith(b"version https://git-lfs"):
        return ": a Git LFS pointer, not the file it points to"
    return ""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else f"{type(error).__name__}, e.g. an empty file"


def _head_state_dict(path: Path, head_config: dict, token_dim: int) -> dict[str, torch.Tensor]:
    """rm_head.pt's tensors, read without running pickled code and checked against the head's shapes."""
    if not path.is_file():
        raise SnapshotError(f"{path} is missing: the snapshot's reward head (checkpoint/rm_head.pt).")
    with open(path, "rb") as f:
        start = f.read(64)
    if not start.startswith(TORCH_FILE_STARTS):  # e.g. a site's error page saved under the file's name
        what = "it is empty" if not start else f"it starts with {start[:24]!r}{_looks_like(start)}"
        raise SnapshotError(f"{path} is not a PyTorch file ({what}); download it again.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):  # a real pickle holding objects other than tensors
            raise SnapshotError(f"{path} needs full unpickling, which can run code; only a plain state dict of tensors "
                                "is read (torch.load with weights_only=True refused it). Download the snapshot again "
                                "from its release, or, on a machine you trust with code from its source, load it and "
                                "torch.save its state dict of tensors.") from None
        raise SnapshotError(f"{path} is not a readable torch file ({_first_line(e)}); download it again.") from None
    except Exception as e:  # torch's unpickler raises many kinds on bytes that are not a torch file
        raise SnapshotError(f"{path} is not a readable torch file ({_first_line(e)}); download it again.") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SnapshotError(f"{path} is not a state dict of tensors.")
    bad = [k for k, v in state.items() if not v.is_floating_point() or not torch.isfinite(v).all()]
    if bad:
        raise SnapshotError(f"{path}: {bad[:3]} are not finite float tensors (NaN, infinite or integer values).")
    try:
        template = DiNaHead(token_dim=token_dim, cond_dim=token_dim, **head_config, device="meta")
    except ValueError as e:
        raise SnapshotError(f"config.json's reward head: {e}") from None
    expected = {k: tuple(v.shape) for k, v in template.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise SnapshotError(f"{path} does not fit the head config.json describes: missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]}.")
    wrong = [f"{k} is {list(v.shape)}, expected {list(expected[k])}" for k, v in state.items() if tuple(v.shape) != expected[k]]
    if wrong:
        raise SnapshotError(f"{path} does not fit the head config.json describes: {'; '.join(wrong[:3])}.")
    return state
