"""The DRM network: SD3's MMDiT cut after `blocks` joint blocks, and a reward head on what they produce.

Forward (DESIGN §4): embed x_t, timestep, pooled text and context as the MMDiT does; run joint
blocks 0 .. blocks-1. Then one of two heads (drm.head in the file's metadata):
- `convgn` (the paper's): the final layer (adaLN norm + linear), unpatchified to [B, 16, H, W], and a
  ConvGN head on that map;
- `dina` (DiNa-LRM's): a query-attention head on the image and text tokens after chosen blocks.
"""

from __future__ import annotations

import contextlib
import json

import comfy.model_detection
import comfy.ops
import torch
import torch.utils.checkpoint
from comfy.ldm.modules.diffusionmodules.mmdit import FinalLayer, MMDiT
from torch import nn

from .checkpoint import HEAD_PREFIX, count_blocks, keep_blocks
from .fit import Shapes
from .head import ConvGNHead, DiNaHead
from .lora import PREFIX as LORA_PREFIX
from .lora import LoRA

HEADS = ("convgn", "dina")


class DRM(nn.Module):
    """Reward model: the first `blocks` joint blocks of an MMDiT and a scalar head (with, for the ConvGN
    head, a final layer).

    `backbone` is either this DRM's own truncated MMDiT (full format) or, with `shared_backbone=True`,
    the generator's MMDiT: then it is not registered as a submodule (the generator's ModelPatcher
    owns and moves those weights) and `lora`, if given, adapts it only while the DRM runs.
    """

    def __init__(self, backbone: MMDiT, blocks: int, final_layer: nn.Module | None, head: nn.Module,
                 lora: LoRA | None = None, shared_backbone: bool = False):
        super().__init__()
        if not 1 <= blocks <= len(backbone.joint_blocks):
            raise ValueError(f"blocks={blocks}: expected 1..{len(backbone.joint_blocks)} (joint blocks in the backbone).")
        if head.uses_final_layer != (final_layer is not None):
            raise ValueError(f"{type(head).__name__} {'needs' if head.uses_final_layer else 'takes no'} final layer")
        taps = getattr(head, "image_taps", ()) + getattr(head, "text_taps", ())
        if any(not 0 <= t <= blocks for t in taps):
            raise ValueError(f"the head reads blocks {sorted(set(taps))}, but the DRM runs {blocks}")
        if shared_backbone:
            object.__setattr__(self, "backbone", backbone)
        else:
            self.backbone = backbone
        self.shared_backbone = shared_backbone
        self.blocks = blocks
        self.final_layer = final_layer
        self.reward_output = head
        self.lora = lora
        self.checkpointing = False  # activation checkpointing of the joint blocks, for training

    @property
    def shapes(self) -> Shapes:
        """What its inputs must fit: latent channels, text widths, the largest latent side (drm.fit)."""
        return Shapes.of_mmdit(self.backbone)

    def run_blocks(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                   image_taps: tuple[int, ...] = (), text_taps: tuple[int, ...] = ()):
        """Run the kept blocks. Returns (image tokens, c, image taps, text taps).

        Image tokens [B, N_img, D] leave the last kept block; c [B, D] is the timestep + pooled-text
        embedding; the taps are the image / text tokens after each listed block count (0: the embedded
        input), in increasing order.
        """
        m = self.backbone
        h = m.x_embedder(x) + comfy.ops.cast_to_input(m.cropped_pos_embed(x.shape[-2:], device=x.device), x)
        c = m.t_embedder(timesteps, dtype=x.dtype)
        if y is not None and m.y_embedder is not None:
            c = c + m.y_embedder(y)
        context = m.context_embedder(context)
        image = [h] if 0 in image_taps else []
        text = [context] if 0 in text_taps else []
        for i in range(self.blocks):
            if self.checkpointing:  # recompute in backward; the LoRA hooks are entered again there
                context, h = torch.utils.checkpoint.checkpoint(self._block, i, context, h, c, use_reentrant=False)
            else:
                context, h = self._block(i, context, h, c)
            if i + 1 in image_taps:
                image.append(h)
            if i + 1 in text_taps:
                text.append(context)
        return h, c, image, text

    def features(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        """The ConvGN head's input: the truncated MMDiT's output map, [B, out_channels, H, W]."""
        h, c, _, _ = self.run_blocks(x, timesteps, context, y)
        hw = x.shape[-2:]
        return self.backbone.unpatchify(self.final_layer(h, c), hw=hw)[:, :, : hw[-2], : hw[-1]]

    def _block(self, i: int, context: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """Joint block i, with this DRM's LoRA (if any) on it for the duration of the call."""
        adapted = self.lora.applied(self.backbone, f"joint_blocks.{i}.") if self.lora is not None \
            else contextlib.nullcontext()
        with adapted:
            return self.backbone.joint_blocks[i](context, h, c=c, use_checkpoint=False, transformer_options={})

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        """Scores [B], float32. `x` is a model-space latent at noise level timesteps / 1000; pass float32
        timesteps (ComfyUI's sinusoidal embedding rounds them to their dtype first)."""
        head = self.reward_output
        if head.uses_final_layer:
            inputs = (self.features(x, timesteps, context, y).float(),)
        else:
            _, c, image, text = self.run_blocks(x, timesteps, context, y, head.image_taps, head.text_taps)
            inputs = ([t.float() for t in image], [t.float() for t in text], c.float())
        # The head is float32, autocast or not: bf16 scores are 0.03 apart at |r| ~ 4, which makes ties
        # among K candidates and +-1 advantages.
        with torch.autocast(x.device.type, enabled=False):
            return head(*inputs)


def new_head(head_config: dict | None, backbone: MMDiT, dtype=None, device=None, operations=None) -> nn.Module:
    """The reward head a DRM file names: None or {"kind": "convgn"} is the paper's ConvGN head, {"kind":
    "dina", ...DiNaHead arguments} DiNa-LRM's. Raises ValueError for another kind or argument."""
    config = dict(head_config or {"kind": "convgn"})
    kind = config.pop("kind", None)
    if kind == "convgn" and not config:
        return ConvGNHead(in_channels=backbone.out_channels, operations=operations or nn, dtype=dtype, device=device)
    if kind == "dina":
        try:
            return DiNaHead(token_dim=backbone.hidden_size, cond_dim=backbone.hidden_size, **config,
                            dtype=dtype, device=device)
        except TypeError as e:
            raise ValueError(f"head config {json.dumps(head_config)} does not fit DiNaHead ({e})") from None
    raise ValueError(f"head config {json.dumps(head_config)}: expected kind {' or '.join(HEADS)}")


def head_config_of(metadata: dict[str, str]) -> dict | None:
    """The head a DRM file's metadata names (drm.head, drm.head_config); None for the ConvGN default."""
    kind = metadata.get("drm.head", "convgn")
    if kind == "convgn":
        return None
    try:
        config = json.loads(metadata.get("drm.head_config", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"metadata drm.head_config is not JSON ({e})") from None
    return {**config, "kind": kind}


def backbone_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """MMDiT constructor arguments read from comfy-named backbone keys (ComfyUI's own detection)."""
    config = comfy.model_detection.detect_unet_config(state_dict, "")
    if config is None or "depth" not in config:
        raise ValueError("not an MMDiT state dict (no joint_blocks / x_embedder keys)")
    config.setdefault("out_channels", config["in_channels"])
    return config


def build_drm(state_dict: dict[str, torch.Tensor], blocks: int, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None, operations=None, head_config: dict | None = None) -> DRM:
    """Build a DRM from comfy MMDiT keys plus `reward_output.*` head keys (the `full` layout).

    `head_config`: the head (new_head); the ConvGN head also takes `final_layer.*` keys.

    Joint blocks at index >= `blocks` in the state dict are ignored. Raises ValueError on a key or
    shape mismatch, naming the key. Every tensor is cast to `dtype` here, whatever ComfyUI's ops do
    on load (see load_checked).
    """
    operations = operations or comfy.ops.disable_weight_init
    backbone_sd = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIX)}
    head_sd = {k[len(HEAD_PREFIX):]: v for k, v in state_dict.items() if k.startswith(HEAD_PREFIX)}
    config = backbone_config(backbone_sd)
    available = count_blocks(backbone_sd)
    if not 1 <= blocks <= available:
        raise ValueError(f"blocks={blocks}: the checkpoint holds {available} joint blocks.")
    backbone_sd = keep_blocks(backbone_sd, blocks)

    final_sd = {k[len("final_layer."):]: v for k, v in backbone_sd.items() if k.startswith("final_layer.")}
    backbone_sd = {k: v for k, v in backbone_sd.items() if not k.startswith("final_layer.")}

    def parts(dtype, device, operations) -> tuple[MMDiT, FinalLayer | None, nn.Module]:
        # SD3's last block is context-pre-only (MMDiT builds it so when final_layer=True); a truncated
        # backbone's last kept block is a full block. The final layer itself lives on the DRM.
        keeps_all = blocks == config["depth"]
        backbone = MMDiT(**config, num_blocks=blocks, final_layer=keeps_all, dtype=dtype, device=device,
                         operations=operations)
        if keeps_all:
            del backbone.final_layer
        head_dtype = None if device == "meta" else torch.float32  # see DRM.forward
        head = new_head(head_config, backbone, dtype=head_dtype, device=device, operations=operations)
        final_layer = new_final_layer(backbone, dtype=dtype, device=device, operations=operations) \
            if head.uses_final_layer else None
        return backbone, final_layer, head

    built = parts(dtype, device, operations)
    templates = parts(None, "meta", nn)  # the shapes the architecture expects, at no memory cost
    for module, template, sd, what, part_dtype in zip(built, templates, (backbone_sd, final_sd, head_sd),
                                                      ("backbone", "final layer", "head (reward_output.*)"),
                                                      (dtype, dtype, torch.float32)):
        if module is not None:
            load_checked(module, template, sd, what, part_dtype)
    backbone, final_layer, head = built
    return DRM(backbone, blocks, final_layer, head)


def new_final_layer(backbone: MMDiT, dtype=None, device=None, operations=None) -> FinalLayer:
    """A final layer (adaLN norm + linear to patch pixels) shaped for this backbone."""
    return FinalLayer(backbone.hidden_size, backbone.patch_size, backbone.out_channels, dtype=dtype, device=device,
                      operations=operations or comfy.ops.disable_weight_init)


def load_checked(module: nn.Module, template: nn.Module, state_dict: dict[str, torch.Tensor], what: str,
                 dtype: torch.dtype | None) -> None:
    """Load `state_dict` into `module` after checking every key and shape against `template`, cast to `dtype`.

    `template` is the same architecture built from plain torch layers on the meta device, so its
    shapes hold whatever `module`'s layers are. ComfyUI's ops cannot be trusted to check or cast:
    under Dynamic VRAM (ComfyUI 0.26 on Windows, later everywhere) their Linear layers take the
    file's tensors as they are. Raises ValueError naming the wrong keys or shapes; `module` is then
    unchanged.
    """
    expected = {k: tuple(v.shape) for k, v in template.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what} keys do not match: missing {missing[:6]}, unexpected {unexpected[:6]}")
    wrong = [f"{k} is {list(v.shape)} in the file but {list(expected[k])} in the model"
             for k, v in state_dict.items() if tuple(v.shape) != expected[k]]
    if wrong:
        raise ValueError(f"{what} weights do not fit: {'; '.join(wrong[:3])}")
    module.load_state_dict({k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                            for k, v in state_dict.items()}, strict=False)


def build_adapter_drm(state_dict: dict[str, torch.Tensor], blocks: int, backbone: MMDiT, dtype=None, device=None,
                      operations=None, head_config: dict | None = None) -> DRM:
    """An `adapter` DRM on a generator's MMDiT: LoRA (optional) + head (+ a final layer for the ConvGN
    head, see new_head); base weights shared."""
    operations = operations or comfy.ops.disable_weight_init
    if not 1 <= blocks <= len(backbone.joint_blocks):
        raise ValueError(f"the adapter keeps {blocks} blocks but the MODEL's MMDiT has {len(backbone.joint_blocks)}")
    lora_sd = {k: v for k, v in state_dict.items() if k.startswith(LORA_PREFIX)}
    lora = LoRA.from_state_dict_comfy(lora_sd) if lora_sd else None
    if lora is not None:
        for path, up, down in zip(lora.paths, lora.up, lora.down):
            try:
                weight = backbone.get_submodule(path).weight
            except AttributeError:
                raise ValueError(f"the adapter's LoRA targets {path}, which the MODEL does not have") from None
            if tuple(weight.shape) != (up.shape[0], down.shape[1]):
                raise ValueError(f"the adapter's LoRA for {path} is {up.shape[0]}x{down.shape[1]} but the MODEL's "
                                 f"layer is {tuple(weight.shape)}: the DRM was trained on another base model")
    head = new_head(head_config, backbone, dtype=torch.float32, device=device, operations=operations)
    load_checked(head, new_head(head_config, backbone, device="meta"),
                 {k[len(HEAD_PREFIX):]: v for k, v in state_dict.items() if k.startswith(HEAD_PREFIX)},
                 "head (reward_output.*)", torch.float32)
    final_layer = None
    if head.uses_final_layer:
        final_layer = new_final_layer(backbone, dtype=dtype, device=device, operations=operations)
        load_checked(final_layer, new_final_layer(backbone, device="meta", operations=nn),
                     {k[len("final_layer."):]: v for k, v in state_dict.items() if k.startswith("final_layer.")},
                     "final layer", dtype)
    return DRM(backbone, blocks, final_layer, head, lora=lora, shared_backbone=True)
