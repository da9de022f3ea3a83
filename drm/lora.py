"""LoRA for MMDiT linear layers, applied through forward hooks, saved in ComfyUI's native key names.

Hooks add `scale * up(down(x))` to a target Linear's output only while `applied(root)` is active,
so the same LoRA serves three uses without touching the base weights:
- an adapter DRM on the generator's shared MMDiT (hooks live only during the DRM forward);
- a policy under training (hooks on) and its reference model (hooks off) in one module tree;
- export: `merged_delta` and `state_dict_comfy` give what ComfyUI's loaders read.

File keys (DESIGN §4): `diffusion_model.<module path>.lora_up.weight` [out, r],
`.lora_down.weight` [r, in] and `.alpha` (always written: without it ComfyUI uses scale 1.0).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator

import torch
from torch import nn

from .checkpoint import beyond_blocks, feeds_nothing

PREFIX = "diffusion_model."
# Joint attention of both streams (SD3.5's second x-block attention included), optionally the MLPs.
ATTENTION_TARGETS = r"joint_blocks\.\d+\.(x_block|context_block)\.(attn|attn2)\.(qkv|proj)$"
MLP_TARGETS = r"joint_blocks\.\d+\.(x_block|context_block)\.mlp\.(fc1|fc2)$"


def target_paths(root: nn.Module, include_mlp: bool = False, blocks: int | None = None) -> list[str]:
    """Paths of the Linear layers a LoRA adapts, in module order.

    With `blocks` (a DRM's kept blocks), only layers that can change its output: joint blocks below
    `blocks`, and in the last kept block only the context stream's qkv, since the text tokens leaving
    that block are never used.
    """
    patterns = [ATTENTION_TARGETS] + ([MLP_TARGETS] if include_mlp else [])
    paths = []
    for name, module in root.named_modules():
        if not isinstance(module, nn.Linear) or not any(re.search(p, name) for p in patterns):
            continue
        if blocks is not None and (beyond_blocks(name, blocks) or feeds_nothing(name, blocks)):
            continue
        paths.append(name)
    return paths


class LoRA(nn.Module):
    """Low-rank adapters for named Linear layers of one root module.

    up starts at zero, so a fresh LoRA changes nothing; down gets Kaiming-uniform init as in peft.
    `rank` and `alpha` are one value for every layer (what the trainers make), or one per path (an
    imported LoRA whose fused qkv layers hold three adapters side by side); `rank` and `alpha` are
    then None and `scales` holds each layer's alpha / rank.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int | dict[str, int], alpha: float | dict[str, float],
                 dtype=torch.float32):
        super().__init__()
        ranks = rank if isinstance(rank, dict) else dict.fromkeys(shapes, rank)
        alphas = alpha if isinstance(alpha, dict) else dict.fromkeys(shapes, alpha)
        if any(r < 1 for r in ranks.values()) or (not isinstance(rank, dict) and rank < 1):
            raise ValueError(f"lora rank={rank}: expected an integer >= 1.")
        uniform = len(set(ranks.values())) <= 1 and len(set(alphas.values())) <= 1
        self.rank = next(iter(ranks.values()), rank) if uniform else None
        self.alpha = float(next(iter(alphas.values()), alpha)) if uniform else None
        self.paths = list(shapes)
        self.scales = [float(alphas[p]) / ranks[p] for p in self.paths]
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        for path, (out_features, in_features) in shapes.items():
            down = torch.empty(ranks[path], in_features, dtype=dtype)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.down.append(nn.Parameter(down))
            self.up.append(nn.Parameter(torch.zeros(out_features, ranks[path], dtype=dtype)))

    @classmethod
    def for_module(cls, root: nn.Module, paths: list[str], rank: int, alpha: float, dtype=torch.float32) -> LoRA:
        shapes = {p: tuple(root.get_submodule(p).weight.shape) for p in paths}
        return cls(shapes, rank, alpha, dtype)

    @property
    def scale(self) -> float:
        """alpha / rank of a uniform LoRA (see `scales` for one with a rank per layer)."""
        if self.rank is None:
            raise ValueError("this LoRA has a rank per layer; use scales[i]")
        return self.alpha / self.rank

    @contextlib.contextmanager
    def applied(self, root: nn.Module, within: str = "") -> Iterator[None]:
        """Add the adapters to `root`'s target layers (those under the path prefix `within`) while the block runs."""
        handles = [root.get_submodule(path).register_forward_hook(self._hook(i))
                   for i, path in enumerate(self.paths) if path.startswith(within)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, index: int):
        def add_delta(module, args, output):
            down, up = self.down[index], self.up[index]
            x = args[0].to(down.dtype)
            return output + (self.scales[index] * nn.functional.linear(nn.functional.linear(x, down), up)).to(output.dtype)
        return add_delta

    def merged_delta(self, index: int) -> torch.Tensor:
        """The weight change of target `index`: alpha / rank * up @ down, [out, in]."""
        return self.scales[index] * (self.up[index] @ self.down[index])

    def state_dict_comfy(self) -> dict[str, torch.Tensor]:
        """Tensors under ComfyUI's native LoRA names, for LoraLoaderModelOnly and for adapter DRMs."""
        out = {}
        for path, down, up, scale in zip(self.paths, self.down, self.up, self.scales):
            out[f"{PREFIX}{path}.lora_down.weight"] = down.detach().contiguous().cpu()
            out[f"{PREFIX}{path}.lora_up.weight"] = up.detach().contiguous().cpu()
            out[f"{PREFIX}{path}.alpha"] = torch.tensor(scale * down.shape[0])
        return out

    @classmethod
    def from_state_dict_comfy(cls, tensors: dict[str, torch.Tensor]) -> LoRA:
        """Rebuild from ComfyUI-native keys (the inverse of state_dict_comfy). Each layer's rank is its
        down weight's height; its alpha is its `.alpha` (absent: alpha = rank, as ComfyUI reads it)."""
        suffix = ".lora_down.weight"
        paths = [k[len(PREFIX):-len(suffix)] for k in tensors if k.startswith(PREFIX) and k.endswith(suffix)]
        if not paths:
            raise ValueError("no LoRA tensors (diffusion_model.*.lora_down.weight) found")
        for p in paths:
            down, up = tensors[f"{PREFIX}{p}{suffix}"], tensors.get(f"{PREFIX}{p}.lora_up.weight")
            if up is None:
                raise ValueError(f"the LoRA for {p} has lora_down but no lora_up weight")
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
                raise ValueError(f"the LoRA for {p} does not fit together: lora_down is {list(down.shape)}, lora_up "
                                 f"{list(up.shape)} (expected [rank, in] and [out, rank])")
        ranks = {p: tensors[f"{PREFIX}{p}{suffix}"].shape[0] for p in paths}
        alphas = {p: float(tensors.get(f"{PREFIX}{p}.alpha", torch.tensor(float(ranks[p])))) for p in paths}
        shapes = {p: (tensors[f"{PREFIX}{p}.lora_up.weight"].shape[0], tensors[f"{PREFIX}{p}{suffix}"].shape[1])
                  for p in paths}
        lora = cls(shapes, ranks, alphas)
        with torch.no_grad():
            for i, p in enumerate(paths):
                lora.down[i].copy_(tensors[f"{PREFIX}{p}{suffix}"])
                lora.up[i].copy_(tensors[f"{PREFIX}{p}.lora_up.weight"])
        return lora
