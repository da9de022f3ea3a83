"""The DRM's scalar reward heads (pure torch; no ComfyUI needed): the paper's ConvGN head, and DiNa-LRM's."""

from __future__ import annotations

import torch
from torch import nn


class ConvGNHead(nn.Module):
    """ConvGN head: three stride-2 3x3 convs with GroupNorm(32) and ReLU, global average pool, MLP -> 1.

    Submodule names (down1..down3, mlp) match the authors' `reward_output.*` keys, so official
    checkpoints load without renaming. `operations` lets ComfyUI pass its cast-aware layer classes.
    It scores the DRM's final-layer output map.
    """

    uses_final_layer = True

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


# torch's nn.RMSNorm with eps=None uses float32's machine epsilon; DiNa-LRM's head was trained so.
RMS_EPS = torch.finfo(torch.float32).eps


class DiNaHead(nn.Module):
    """DiNa-LRM's query-attention head over several backbone taps (a choice beside ConvGNHead).

    Architecture from "Beyond VLM-Based Rewards: Diffusion-Native Latent Reward Modeling" (HKUST-C4G/
    diffusion-rm, `reward_head.py`); submodule names follow its `rm_head.pt` keys so the file loads as is:

    1. each tap (image or text tokens after a block, [B, N, token_dim]) goes through a FiLM adapter
       conditioned on the timestep + pooled-text embedding c [B, cond_dim], to width // 4 features;
    2. the image adapters' outputs are concatenated and projected to `width` (the same for text);
    3. `num_queries` learned query tokens attend to the image and text tokens (two softmaxes, summed,
       with per-token sigmoid gates on the values), then to the image tokens alone;
    4. an RMSNorm feed-forward (exact GELU), a linear to one score, and the mean over the queries.

    `image_taps` / `text_taps`: 1-based block counts after which the DRM reads the image / text token
    streams (0: the embedded input before block 1), in increasing order.
    """

    uses_final_layer = False

    def __init__(self, token_dim: int, cond_dim: int, image_taps: tuple[int, ...], text_taps: tuple[int, ...],
                 width: int | None = None, num_queries: int = 4, num_attn_heads: int = 8, use_proj_in: bool = False,
                 dtype=None, device=None):
        super().__init__()
        width = width or token_dim
        if width % 4 or width % num_attn_heads:
            raise ValueError(f"DiNa head width {width} must be divisible by 4 and by num_attn_heads {num_attn_heads}")
        self.image_taps, self.text_taps = tuple(image_taps), tuple(text_taps)
        kw = dict(dtype=dtype, device=device)

        def adapters(n: int) -> nn.ModuleList:
            return nn.ModuleList(FiLMAdapter(token_dim, cond_dim, width, use_proj_in, **kw) for _ in range(n))

        self.layer_adapters_visual = adapters(len(image_taps))
        self.layer_adapters_text = adapters(len(text_taps))
        self.agg_visual = nn.Linear(len(image_taps) * (width // 4), width, **kw)
        self.agg_text = nn.Linear(len(text_taps) * (width // 4), width, **kw) if text_taps else None
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, width, **kw))
        self.attn1 = GatedCrossAttention(width, num_attn_heads, with_text=bool(text_taps), gated=True, **kw)
        self.attn2 = GatedCrossAttention(width, num_attn_heads, with_text=False, gated=False, **kw)
        self.norm_ff = nn.RMSNorm(width, eps=RMS_EPS, **kw)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width, **kw), nn.GELU(), nn.Linear(4 * width, width, **kw))
        self.head = nn.Linear(width, 1, **kw)

    def forward(self, image: list[torch.Tensor], text: list[torch.Tensor], c: torch.Tensor) -> torch.Tensor:
        """Image taps [B, N_img, D] each, text taps [B, N_txt, D] each, c [B, cond_dim] -> scores [B]."""
        image_tokens = self.agg_visual(torch.cat([a(x, c) for a, x in zip(self.layer_adapters_visual, image)], -1))
        text_tokens = None
        if self.agg_text is not None:
            text_tokens = self.agg_text(torch.cat([a(x, c) for a, x in zip(self.layer_adapters_text, text)], -1))
        q = self.query_tokens.expand(image_tokens.shape[0], -1, -1)
        q = self.attn1(q, image_tokens, text_tokens)
        q = self.attn2(q, image_tokens)
        q = q + self.ff(self.norm_ff(q))
        return self.head(q).mean(dim=1).squeeze(1)


class FiLMAdapter(nn.Module):
    """Tokens [B, N, token_dim] -> [B, N, width // 4], scaled and shifted by an MLP of c [B, cond_dim]."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, use_proj_in: bool, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.proj_in = nn.Linear(token_dim, width, **kw) if use_proj_in or token_dim != width else nn.Identity()
        self.layer_embed = nn.Parameter(torch.zeros(1, 1, width, **kw))
        self.cond_mlp = nn.Sequential(nn.Linear(cond_dim, 2 * width, **kw), nn.SiLU(),
                                      nn.Linear(2 * width, 2 * width, **kw))
        self.proj = nn.Linear(width, width // 4, **kw)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.cond_mlp(c).unsqueeze(1).chunk(2, dim=-1)
        return self.proj(self.proj_in(x) * (1 + scale) + shift + self.layer_embed)


class GatedCrossAttention(nn.Module):
    """Queries attend to image tokens and, optionally, text tokens: one softmax per stream, outputs summed.

    With `gated`, each context token's value is scaled by a sigmoid gate computed from that token.
    Returns queries + out-projection (a residual). `to_out` is a Sequential so its key is `to_out.0`.
    """

    def __init__(self, width: int, heads: int, with_text: bool, gated: bool, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.heads = heads
        self.norm_q = nn.RMSNorm(width, eps=RMS_EPS, **kw)
        self.norm_v = nn.RMSNorm(width, eps=RMS_EPS, **kw)
        self.to_q = nn.Linear(width, width, **kw)
        self.to_k_vis = nn.Linear(width, width, **kw)
        self.to_v_vis = nn.Linear(width, width, **kw)
        self.gate_vis = self._gate(width, kw) if gated else None
        self.norm_t = nn.RMSNorm(width, eps=RMS_EPS, **kw) if with_text else None
        self.to_k_text = nn.Linear(width, width, **kw) if with_text else None
        self.to_v_text = nn.Linear(width, width, **kw) if with_text else None
        self.gate_text = self._gate(width, kw) if gated and with_text else None
        self.to_out = nn.Sequential(nn.Linear(width, width, **kw))

    @staticmethod
    def _gate(width: int, kw: dict) -> nn.Sequential:
        return nn.Sequential(nn.Linear(width, width, **kw), nn.SiLU(), nn.Linear(width, 1, **kw))

    def forward(self, queries: torch.Tensor, image: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        q = self._split(self.to_q(self.norm_q(queries)))
        out = self._attend(q, self.norm_v(image), self.to_k_vis, self.to_v_vis, self.gate_vis)
        if text is not None and self.norm_t is not None:
            out = out + self._attend(q, self.norm_t(text), self.to_k_text, self.to_v_text, self.gate_text)
        b, h, n, d = out.shape
        return queries + self.to_out(out.transpose(1, 2).reshape(b, n, h * d))

    def _attend(self, q, context, to_k, to_v, gate) -> torch.Tensor:
        v = to_v(context)
        if gate is not None:
            v = v * torch.sigmoid(gate(context))
        return nn.functional.scaled_dot_product_attention(q, self._split(to_k(context)), self._split(v))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, width] -> [B, heads, N, width // heads]."""
        b, n, w = x.shape
        return x.view(b, n, self.heads, w // self.heads).transpose(1, 2)
