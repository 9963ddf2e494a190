"""TRELLIS sparse-structure encoder (checkpoint ``ss_enc_conv3d_16l8_fp16``).

The mirror of :mod:`.sparse_structure_decoder`: occupancy ``[B, 1, 64, 64, 64]`` -> dense 3-D
conv blocks with two 2x2x2 stride-2 downsamplings -> the posterior mean ``[B, 8, 16, 16, 16]``.
Module names follow the official checkpoint: ``input_layer``, ``blocks.{i}`` (ResBlock3d, or
``DownsampleBlock3d`` with ``conv``), ``middle_block.{i}``, ``out_layer.{0,2}``.

Precision as the reference: with ``use_fp16`` the convolutions inside ``blocks`` and
``middle_block`` are fp16, ``input_layer``, ``out_layer`` and the channel LayerNorms fp32.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from .sparse_structure_decoder import HalfPrecisionConvs, ResBlock3d, _norm_layer

__all__ = ["SparseStructureEncoder", "DownsampleBlock3d", "TINY_ARGS", "CHECKPOINT_REFERENCE"]

# Where TRELLIS.2's data toolkit loads it from (encode_ss_latent.py): the TRELLIS v1 repo, found in a
# sibling TRELLIS-image-large folder or FOLDER/ckpts by trellis2.loading.resolve_checkpoint.
CHECKPOINT_REFERENCE = "microsoft/TRELLIS-image-large/ckpts/ss_enc_conv3d_16l8_fp16"

# Tiny config (same structure as the real one: 64^3 -> latent 8 @ 16^3, two downsamplings).
TINY_ARGS = {
    "in_channels": 1,
    "latent_channels": 8,
    "num_res_blocks": 1,
    "channels": [8, 8, 16],
    "num_res_blocks_middle": 1,
    "norm_type": "layer",
    "use_fp16": True,
}


class DownsampleBlock3d(nn.Module):
    """2x2x2 conv with stride 2: ``[B, Ci, S] -> [B, Co, S/2]``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SparseStructureEncoder(HalfPrecisionConvs, nn.Module):
    """Dense conv encoder ``[B, in, 4R, 4R, 4R] -> [B, latent, R, R, R]`` (for 3 channel levels).

    Args mirror the official JSON: ``in_channels``, ``latent_channels``, ``num_res_blocks`` (per
    level), ``channels`` (per level, first is the narrowest), ``num_res_blocks_middle``,
    ``norm_type`` ('layer' | 'group'), ``use_fp16``.
    """

    supports_empty_init = True

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        num_res_blocks: int,
        channels: Sequence[int],
        num_res_blocks_middle: int = 2,
        norm_type: str = "layer",
        use_fp16: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.channels: List[int] = list(channels)
        self.input_layer = nn.Conv3d(in_channels, self.channels[0], 3, padding=1)
        blocks: List[nn.Module] = []
        for i, ch in enumerate(self.channels):
            blocks.extend(ResBlock3d(ch, norm_type) for _ in range(num_res_blocks))
            if i < len(self.channels) - 1:
                blocks.append(DownsampleBlock3d(ch, self.channels[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.middle_block = nn.Sequential(
            *[ResBlock3d(self.channels[-1], norm_type) for _ in range(num_res_blocks_middle)]
        )
        self.out_layer = nn.Sequential(
            _norm_layer(norm_type, self.channels[-1]),
            nn.SiLU(),
            nn.Conv3d(self.channels[-1], latent_channels * 2, 3, padding=1),
        )
        self.dtype = torch.float32
        self.convert_to(torch.float16 if use_fp16 else torch.float32)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, in, S, S, S]`` (occupancy as 0/1 floats) -> posterior mean
        ``[B, latent, S/f, S/f, S/f]`` in ``x.dtype`` (f = :attr:`downsample_factor`)."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseStructureEncoder: expected [B, {self.in_channels}, S, S, S], got {tuple(x.shape)}")
        if any(s % self.downsample_factor for s in x.shape[2:]):
            raise ValueError(f"SparseStructureEncoder: grid {tuple(x.shape[2:])} not divisible by {self.downsample_factor}")
        h = self.input_layer(x.to(self.input_layer.weight.dtype)).to(self.dtype)
        for block in self.blocks:
            h = block(h)
        h = self.middle_block(h)
        h = self.out_layer(h.to(self.out_layer[2].weight.dtype))
        return h[:, : self.latent_channels].to(x.dtype)
