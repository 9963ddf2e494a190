"""OpenCLIP's ``VisionTransformer`` image tower (``visual.*`` of an OpenCLIP checkpoint such as
ViT-bigG-14 ``laion2b_s39b_b160k``, ULIP-2's image encoder), without open_clip.

``[B, 3, S, S]`` normalised pixels -> ``conv1`` (patch, no bias) -> ``[class_embedding; patches] +
positional_embedding`` -> ``ln_pre`` -> ``transformer.resblocks`` (pre-norm: ``x + attn(ln_1(x))``,
``x + mlp(ln_2(x))``; attention = ``nn.MultiheadAttention``'s ``in_proj`` / ``out_proj``; MLP =
``c_fc``, exact GELU, ``c_proj``) -> ``ln_post`` -> class token -> ``@ proj`` -> ``[B, E]``.
LayerNorm eps 1e-5. Sizes are read from the tensors; the head count is an argument (the keys
cannot tell it; :data:`HEADS_BY_WIDTH` has OpenCLIP's ViT-B/L/H/bigG).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClipViT", "HEADS_BY_WIDTH"]

HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1664: 16}  # ViT-B, L, H, bigG (head width 104)


class _Attention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (``in_proj_weight [3C, C]``, ``in_proj_bias``, ``out_proj``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2)
                   for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width), _Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ClipViT(nn.Module):
    """OpenCLIP ``VisionTransformer`` (class-token pooling, ``ln_post`` before pooling, ``proj``)."""

    def __init__(self, width: int, layers: int, heads: int, hidden: int, patch: int, grid: int, embed: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(_Block(width, heads, hidden) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, embed))
        self.image_size = patch * grid

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], prefix: str = "visual.", heads: Optional[int] = None
                   ) -> "ClipViT":
        """A tower shaped like the tensors ``{prefix}*`` (``KeyError`` naming a needed key that is absent)."""
        def need(key):
            if prefix + key not in state:
                raise KeyError(prefix + key)
            return state[prefix + key]

        width, _, patch, _ = need("conv1.weight").shape
        grid = int(round((need("positional_embedding").shape[0] - 1) ** 0.5))
        layers = 0
        while prefix + f"transformer.resblocks.{layers}.ln_1.weight" in state:
            layers += 1
        heads = heads or HEADS_BY_WIDTH.get(width)
        if heads is None:
            raise KeyError(f"heads for width {width} (known: {sorted(HEADS_BY_WIDTH)})")
        hidden = need("transformer.resblocks.0.mlp.c_fc.weight").shape[0]
        return cls(width, layers, heads, hidden, patch, grid, need("proj").shape[1])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised pixels -> ``[B, E]`` (not normalised)."""
        x = self.conv1(pixels).flatten(2).transpose(1, 2)                      # [B, grid^2, C]
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = self.ln_pre(torch.cat((cls, x), dim=1) + self.positional_embedding)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x)[:, 0] @ self.proj
