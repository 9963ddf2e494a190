"""TRELLIS sparse-structure decoder (checkpoint ``ss_dec_conv3d_16l8_fp16``).

A dense 3-D conv decoder: latent ``[B, 8, 16, 16, 16]`` -> occupancy logits ``[B, 1, 64, 64, 64]``
(two x2 pixel-shuffle upsamplings). Module names follow the official checkpoint:
``input_layer``, ``middle_block.{i}``, ``blocks.{i}``, ``out_layer.{0,2}``.

Precision follows the official model: with ``use_fp16`` the convolutions inside ``blocks`` and
``middle_block`` hold fp16 weights and run in fp16, while ``input_layer``, ``out_layer`` and every
channel LayerNorm stay fp32 (norms compute in fp32 and cast back).

``decode_occupancy`` turns the logits into the int32 voxel coords the next stage consumes.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "SparseStructureDecoder",
    "ResBlock3d",
    "UpsampleBlock3d",
    "ChannelLayerNorm32",
    "pixel_shuffle_3d",
    "decode_occupancy",
    "coarsen_coords",
    "TINY_ARGS",
]

# Tiny config (same structure as the real one: latent 8 @ 16^3 -> 64^3, two upsamplings).
TINY_ARGS = {
    "out_channels": 1,
    "latent_channels": 8,
    "num_res_blocks": 1,
    "channels": [16, 8, 8],
    "num_res_blocks_middle": 1,
    "norm_type": "layer",
    "use_fp16": True,
}


class ChannelLayerNorm32(nn.LayerNorm):
    """LayerNorm over the channel dim of ``[B, C, *spatial]``, computed in fp32, cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = x.dim()
        h = x.float().movedim(1, dims - 1)
        h = F.layer_norm(h, self.normalized_shape, self.weight, self.bias, self.eps)
        return h.movedim(dims - 1, 1).to(x.dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32, cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def _norm_layer(norm_type: str, channels: int) -> nn.Module:
    if norm_type == "layer":
        return ChannelLayerNorm32(channels)
    if norm_type == "group":
        return GroupNorm32(32, channels)
    raise ValueError(f"SparseStructureDecoder: norm_type must be 'layer' or 'group', got {norm_type!r}")


def pixel_shuffle_3d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """``[B, C*f^3, H, W, D] -> [B, C, f*H, f*W, f*D]``.

    ``out[b, c, f*h+i, f*w+j, f*d+k] = x[b, c*f^3 + i*f^2 + j*f + k, h, w, d]``.
    """
    b, c, h, w, d = x.shape
    if c % factor**3:
        raise ValueError(f"pixel_shuffle_3d: channels {c} not divisible by {factor}^3")
    c_out = c // factor**3
    x = x.reshape(b, c_out, factor, factor, factor, h, w, d)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # b, c, h, i, w, j, d, k
    return x.reshape(b, c_out, h * factor, w * factor, d * factor)


class ResBlock3d(nn.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))))))`` with 3x3x3 convs, ``[B, C, *S] -> same``."""

    def __init__(self, channels: int, norm_type: str = "layer"):
        super().__init__()
        self.norm1 = _norm_layer(norm_type, channels)
        self.norm2 = _norm_layer(norm_type, channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + x


class UpsampleBlock3d(nn.Module):
    """3x3x3 conv to ``8*out`` channels then x2 pixel shuffle: ``[B, Ci, S] -> [B, Co, 2S]``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


class HalfPrecisionConvs:
    """The reference's mixed precision for the dense VAEs: with ``use_fp16`` the convs of ``blocks``
    and ``middle_block`` run in fp16; the input/output layers and the channel norms stay fp32."""

    dtype: torch.dtype

    @property
    def use_fp16(self) -> bool:
        return self.dtype == torch.float16

    def convert_to(self, dtype: torch.dtype) -> None:
        """Cast the convs of ``blocks`` and ``middle_block`` to ``dtype`` (norms stay fp32)."""
        self.dtype = dtype
        for module in (*self.middle_block.modules(), *self.blocks.modules()):
            if isinstance(module, nn.Conv3d):
                module.to(dtype)

    def convert_to_fp16(self) -> None:
        self.convert_to(torch.float16)

    def convert_to_fp32(self) -> None:
        self.convert_to(torch.float32)


class SparseStructureDecoder(HalfPrecisionConvs, nn.Module):
    """Dense conv decoder ``[B, latent, R, R, R] -> [B, out, 4R, 4R, 4R]`` (for 3 channel levels).

    Parameters are allocated in ``__init__`` and may be built on the meta device
    (``supports_empty_init``) before a checkpoint is loaded.

    Args mirror the official JSON: ``out_channels``, ``latent_channels``, ``num_res_blocks``
    (per level), ``channels`` (per level, first is the widest), ``num_res_blocks_middle``,
    ``norm_type`` ('layer' | 'group'), ``use_fp16``.
    """

    supports_empty_init = True

    def __init__(
        self,
        out_channels: int,
        latent_channels: int,
        num_res_blocks: int,
        channels: Sequence[int],
        num_res_blocks_middle: int = 2,
        norm_type: str = "layer",
        use_fp16: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.num_res_blocks = num_res_blocks
        self.channels: List[int] = list(channels)
        self.num_res_blocks_middle = num_res_blocks_middle
        self.norm_type = norm_type

        self.input_layer = nn.Conv3d(latent_channels, self.channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(
            *[ResBlock3d(self.channels[0], norm_type) for _ in range(num_res_blocks_middle)]
        )
        blocks: List[nn.Module] = []
        for i, ch in enumerate(self.channels):
            blocks.extend(ResBlock3d(ch, norm_type) for _ in range(num_res_blocks))
            if i < len(self.channels) - 1:
                blocks.append(UpsampleBlock3d(ch, self.channels[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = nn.Sequential(
            _norm_layer(norm_type, self.channels[-1]),
            nn.SiLU(),
            nn.Conv3d(self.channels[-1], out_channels, 3, padding=1),
        )
        self.dtype = torch.float32
        self.convert_to(torch.float16 if use_fp16 else torch.float32)

    @property
    def upsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, latent, R, R, R]`` (fp32) -> logits ``[B, out, 4R, 4R, 4R]`` in ``x.dtype``."""
        if x.dim() != 5 or x.shape[1] != self.latent_channels:
            raise ValueError(
                f"SparseStructureDecoder: expected [B, {self.latent_channels}, R, R, R], got {tuple(x.shape)}"
            )
        h = self.input_layer(x.to(self.input_layer.weight.dtype)).to(self.dtype)
        h = self.middle_block(h)
        for block in self.blocks:
            h = block(h)
        h = h.to(self.out_layer[2].weight.dtype)
        return self.out_layer(h).to(x.dtype)


def decode_occupancy(logits: torch.Tensor, resolution: int) -> torch.Tensor:
    """Occupancy logits ``[B, 1, G, G, G]`` -> int32 coords ``[N, 4]`` = ``(b, x, y, z)``.

    Voxels with logit > 0 are occupied. For ``resolution < G`` (e.g. 32 from a 64 grid) the grid is
    max-pooled by ``G // resolution``: a coarse voxel is occupied if any fine voxel is.
    Rows are ordered batch-major then x, y, z ascending (row-major ``argwhere`` order).
    """
    if logits.dim() != 5 or logits.shape[1] != 1:
        raise ValueError(f"decode_occupancy: expected logits [B, 1, G, G, G], got {tuple(logits.shape)}")
    grid = logits.shape[2]
    if resolution <= 0 or grid % resolution:
        raise ValueError(f"decode_occupancy: resolution {resolution} must divide the grid size {grid}")
    occupied = logits > 0
    if resolution != grid:
        ratio = grid // resolution
        occupied = F.max_pool3d(occupied.float(), ratio, ratio, 0) > 0.5
    return torch.argwhere(occupied[:, 0]).int()


def coarsen_coords(coords: torch.Tensor, factor: int) -> torch.Tensor:
    """Occupied coords ``[N, 4]`` (b, x, y, z) on a grid ``factor`` times coarser: a coarse voxel is
    occupied if any of its fine voxels is (the coords form of :func:`decode_occupancy`'s max-pool).
    Rows come out in the same batch-major, x/y/z-ascending order; int32."""
    if factor == 1:
        return coords
    coarse = torch.cat([coords[:, :1], torch.div(coords[:, 1:], factor, rounding_mode="floor")], 1)
    return torch.unique(coarse, dim=0).to(torch.int32)
