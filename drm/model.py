"""The DRM network: SD3's MMDiT cut after `blocks` joint blocks, its final layer, and a ConvGN head.

Forward (DESIGN §4): embed x_t, timestep, pooled text and context as the MMDiT does; run joint
blocks 0 .. blocks-1; apply the final layer (adaLN norm + linear); unpatchify to [B, 16, H, W]; the
head turns that map into one score per sample.
"""

from __future__ import annotations

import contextlib

import comfy.model_detection
import comfy.ops
import torch
import torch.utils.checkpoint
from comfy.ldm.modules.diffusionmodules.mmdit import FinalLayer, MMDiT
from torch import nn

from .checkpoint import HEAD_PREFIX, count_blocks
from .head import ConvGNHead
from .lora import PREFIX as LORA_PREFIX
from .lora import LoRA


class DRM(nn.Module):
    """Reward model: the first `blocks` joint blocks of an MMDiT, a final layer, and a scalar head.

    `backbone` is either this DRM's own truncated MMDiT (full format) or, with `shared_backbone=True`,
    the generator's MMDiT: then it is not registered as a submodule (the generator's ModelPatcher
    owns and moves those weights) and `lora`, if given, adapts it only while the DRM runs.
    """

    def __init__(self, backbone: MMDiT, blocks: int, final_layer: nn.Module, head: ConvGNHead,
                 lora: LoRA | None = None, shared_backbone: bool = False):
        super().__init__()
        if not 1 <= blocks <= len(backbone.joint_blocks):
            raise ValueError(f"blocks={blocks}: expected 1..{len(backbone.joint_blocks)} (joint blocks in the backbone).")
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
    def in_channels(self) -> int:
        return self.backbone.in_channels

    @property
    def context_dim(self) -> int | None:
        embedder = self.backbone.context_embedder
        return getattr(embedder, "in_features", None)

    @property
    def pooled_dim(self) -> int | None:
        y = self.backbone.y_embedder
        return None if y is None else y.mlp[0].in_features

    @property
    def max_latent_size(self) -> int | None:
        """Largest latent height/width the position embedding covers (None: unbounded)."""
        m = self.backbone
        return None if m.pos_embed_max_size is None else m.pos_embed_max_size * m.patch_size

    def features(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        """The truncated MMDiT's output map, [B, out_channels, H, W]."""
        m = self.backbone
        hw = x.shape[-2:]
        h = m.x_embedder(x) + comfy.ops.cast_to_input(m.cropped_pos_embed(hw, device=x.device), x)
        c = m.t_embedder(timesteps, dtype=x.dtype)
        if y is not None and m.y_embedder is not None:
            c = c + m.y_embedder(y)
        context = m.context_embedder(context)
        for i in range(self.blocks):
            if self.checkpointing:  # recompute in backward; the LoRA hooks are entered again there
                context, h = torch.utils.checkpoint.checkpoint(self._block, i, context, h, c, use_reentrant=False)
            else:
                context, h = self._block(i, context, h, c)
        h = self.final_layer(h, c)
        return m.unpatchify(h, hw=hw)[:, :, : hw[-2], : hw[-1]]

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
        features = self.features(x, timesteps, context, y)
        # The head is float32, autocast or not: bf16 scores are 0.03 apart at |r| ~ 4, which makes ties
        # among K candidates and +-1 advantages.
        with torch.autocast(features.device.type, enabled=False):
            return self.reward_output(features.float())


def backbone_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """MMDiT constructor arguments read from comfy-named backbone keys (ComfyUI's own detection)."""
    config = comfy.model_detection.detect_unet_config(state_dict, "")
    if config is None or "depth" not in config:
        raise ValueError("not an MMDiT state dict (no joint_blocks / x_embedder keys)")
    config.setdefault("out_channels", config["in_channels"])
    return config


def build_drm(state_dict: dict[str, torch.Tensor], blocks: int, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None, operations=None) -> DRM:
    """Build a DRM from comfy MMDiT keys plus `reward_output.*` head keys (the `full` layout).

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
    backbone_sd = {k: v for k, v in backbone_sd.items()
                   if not (k.startswith("joint_blocks.") and int(k.split(".")[1]) >= blocks)}

    final_sd = {k[len("final_layer."):]: v for k, v in backbone_sd.items() if k.startswith("final_layer.")}
    backbone_sd = {k: v for k, v in backbone_sd.items() if not k.startswith("final_layer.")}

    def parts(dtype, device, operations) -> tuple[MMDiT, FinalLayer, ConvGNHead]:
        # SD3's last block is context-pre-only (MMDiT builds it so when final_layer=True); a truncated
        # backbone's last kept block is a full block. The final layer itself lives on the DRM.
        keeps_all = blocks == config["depth"]
        backbone = MMDiT(**config, num_blocks=blocks, final_layer=keeps_all, dtype=dtype, device=device,
                         operations=operations)
        if keeps_all:
            del backbone.final_layer
        head_dtype = None if device == "meta" else torch.float32  # see DRM.forward
        return (backbone, new_final_layer(backbone, dtype=dtype, device=device, operations=operations),
                ConvGNHead(in_channels=backbone.out_channels, operations=operations, dtype=head_dtype, device=device))

    built = parts(dtype, device, operations)
    templates = parts(None, "meta", nn)  # the shapes the architecture expects, at no memory cost
    for module, template, sd, what, part_dtype in zip(built, templates, (backbone_sd, final_sd, head_sd),
                                                      ("backbone", "final layer", "head (reward_output.*)"),
                                                      (dtype, dtype, torch.float32)):
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
                      operations=None) -> DRM:
    """An `adapter` DRM on a generator's MMDiT: LoRA (optional) + own final layer + head; base weights shared."""
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
    final_layer = new_final_layer(backbone, dtype=dtype, device=device, operations=operations)
    head = ConvGNHead(in_channels=backbone.out_channels, operations=operations, dtype=torch.float32, device=device)
    load_checked(final_layer, new_final_layer(backbone, device="meta", operations=nn),
                 {k[len("final_layer."):]: v for k, v in state_dict.items() if k.startswith("final_layer.")},
                 "final layer", dtype)
    load_checked(head, ConvGNHead(in_channels=backbone.out_channels, device="meta"),
                 {k[len(HEAD_PREFIX):]: v for k, v in state_dict.items() if k.startswith(HEAD_PREFIX)},
                 "head (reward_output.*)", torch.float32)
    return DRM(backbone, blocks, final_layer, head, lora=lora, shared_backbone=True)
