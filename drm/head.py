"""The DRM's scalar reward head (pure torch; no ComfyUI needed)."""

from __future__ import annotations

import torch
from torch import nn


class ConvGNHead(nn.Module):
    """ConvGN head: three stride-2 3x3 convs with GroupNorm(32) and ReLU, global average pool, MLP -> 1.

    Submodule names (down1..down3, mlp) match the authors' `reward_output.*` keys, so official
    checkpoints load without renaming. `operations` lets ComfyUI pass its cast-aware layer classes.
    """

    def __init__(self, in_channels: int = 16, base_channels: int = 256, groups: int = 32,
                 operations=nn, dtype=None, device=None):
        super().__init__()
        widths = [in_channels, base_channels, base_channels * 2, base_channels * 2]

        def down(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                operations.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, dtype=dtype, device=device),
                operations.GroupNorm(groups, c_out, dtype=dtype, device=device),
                nn.ReLU(),
            )

        self.down1 = down(widths[0], widths[1])
        self.down2 = down(widths[1], widths[2])
        self.down3 = down(widths[2], widths[3])
        self.mlp = nn.Sequential(
            operations.Linear(widths[3], 512, dtype=dtype, device=device),
            nn.ReLU(),
            nn.Dropout(0.1),
            operations.Linear(512, 1, dtype=dtype, device=device),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] feature map -> [B] scores."""
        h = self.down3(self.down2(self.down1(features)))
        return self.mlp(h.mean(dim=(2, 3))).squeeze(1)
