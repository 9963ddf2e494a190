"""TRELLIS.2 shape SLat encoder (checkpoint ``shape_enc_next_dc_f16c32_fp16``).

``FlexiDualGridVaeEncoder``: the mirror of :mod:`.shape_decoder`. A flexible dual grid on the
mesh grid (1024 in the data toolkit) -> per-voxel input ``[dual - 0.5, intersected - 0.5]``
``[N, 6]`` -> ``input_layer`` -> 5 levels of ConvNeXt blocks, the first four ending in a
space-to-channel block that halves the resolution (x16 in total) -> LayerNorm -> ``to_latent``
-> the posterior mean ``[M, latent]`` on the token grid (64^3 for 1024). The token coords are the
dual grid's coords ``// 16``.

Module names follow the official checkpoint: ``input_layer``, ``blocks.L.j.{conv, norm, mlp.0,
mlp.2}``, S2C at ``blocks.L.{num_blocks[L]}.{norm1, conv1, conv2}``, ``to_latent``. Sparse conv
weights are ``[Co, 3, 3, 3, Ci]``. With ``use_fp16`` the convs and linears inside ``blocks`` are
fp16 (LayerNorms compute in fp32) while ``input_layer`` / ``to_latent`` stay fp32, as in the
reference (``SparseUnetVaeEncoder``). Inference only.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..sparse import SparseLinear, SparseTensor, SubMConv3d, spatial_to_channel
from .shape_decoder import HalfPrecisionBlocks, SparseConvNeXtBlock3d, _check_block_args, _norm

__all__ = ["FlexiDualGridVaeEncoder", "SparseResBlockS2C3d", "encoder_input", "TINY_ARGS", "CHECKPOINT_REFERENCE"]

# Where TRELLIS.2's data toolkit loads it from (encode_shape_latent.py); found next to a TRELLIS.2-4B
# folder by trellis2.loading.resolve_checkpoint (FOLDER/ckpts/NAME).
CHECKPOINT_REFERENCE = "microsoft/TRELLIS.2-4B/ckpts/shape_enc_next_dc_f16c32_fp16"

# Tiny config with the real structure (5 levels, 4 halvings, no blocks at the first level).
TINY_ARGS = {
    "model_channels": [8, 16, 16, 32, 32],
    "latent_channels": 32,
    "num_blocks": [0, 1, 1, 1, 1],
    "block_type": ["SparseConvNeXtBlock3d"] * 5,
    "down_block_type": ["SparseResBlockS2C3d"] * 4,
    "block_args": [{}] * 5,
    "use_fp16": True,
}


class SparseResBlockS2C3d(nn.Module):
    """Residual block that halves the resolution (space-to-channel).

    ``h = conv1(silu(norm1(x)))`` (Ci -> Co/8) moved into the parents' channels (child k -> block
    k, absent children zero) -> ``conv2(silu(norm2(h)))``; skip: the parent's ``[8*Ci]`` children
    features averaged in ``Co`` consecutive groups of ``8*Ci/Co``. ``[N, Ci] -> [M, Co]`` on the
    parents (sorted by b, x, y, z).
    """

    def __init__(self, channels: int, out_channels: int, use_checkpoint: bool = False):
        super().__init__()
        if out_channels % 8 or (8 * channels) % out_channels:
            raise ValueError(
                f"SparseResBlockS2C3d: need out_channels % 8 == 0 and 8 * channels % out_channels == 0, "
                f"got {channels} -> {out_channels}"
            )
        self.channels = channels
        self.out_channels = out_channels
        self.norm1 = nn.LayerNorm(channels, eps=1e-6)
        self.conv1 = SubMConv3d(channels, out_channels // 8, 3)
        self.conv2 = SubMConv3d(out_channels, out_channels, 3)

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.conv1(x.replace(_norm(x.feats, self.norm1, silu=True)))  # [N, Co/8]
        coarse = spatial_to_channel(h)  # [M, Co]
        feats = _norm(coarse.feats, None, silu=True, out=coarse.feats)
        out = self.conv2(coarse.replace(feats)).feats
        parents = spatial_to_channel(x).feats  # [M, 8*Ci], same parents (cached S2C map)
        out += parents.view(-1, self.out_channels, 8 * self.channels // self.out_channels).mean(dim=-1)
        return coarse.replace(out)


_BLOCK_TYPES = {"SparseConvNeXtBlock3d": SparseConvNeXtBlock3d}
_DOWN_BLOCK_TYPES = {"SparseResBlockS2C3d": SparseResBlockS2C3d}
_BLOCK_ARG_NAMES = {"SparseConvNeXtBlock3d": ("mlp_ratio", "use_checkpoint"), "SparseResBlockS2C3d": ("use_checkpoint",)}


def encoder_input(dual_vertices: torch.Tensor, intersected: torch.Tensor) -> torch.Tensor:
    """Per-voxel encoder input ``[N, 6]`` fp32: ``[dual - 0.5, intersected - 0.5]`` (dual in
    voxel units ``0..1``, intersected ``[N, 3]`` bool), as the reference's ``forward`` builds it."""
    return torch.cat([dual_vertices.float() - 0.5, intersected.float() - 0.5], dim=1)


class FlexiDualGridVaeEncoder(HalfPrecisionBlocks, nn.Module):
    """Flexible dual grid -> shape SLat (posterior mean) on a grid 16x coarser.

    Args mirror the official JSON: ``model_channels`` / ``num_blocks`` / ``block_type`` /
    ``block_args`` per level, ``down_block_type`` per halving, ``latent_channels``, ``use_fp16``.
    """

    supports_empty_init = True
    in_channels = 6

    def __init__(
        self,
        model_channels: Sequence[int],
        latent_channels: int,
        num_blocks: Sequence[int],
        block_type: Sequence[str],
        down_block_type: Sequence[str],
        block_args: Optional[Sequence[Dict[str, Any]]] = None,
        use_fp16: bool = False,
    ):
        super().__init__()
        levels = len(num_blocks)
        block_args = [{} for _ in range(levels)] if block_args is None else [dict(a) for a in block_args]
        if not (len(model_channels) == len(block_type) == len(block_args) == levels and len(down_block_type) == levels - 1):
            raise ValueError(
                "FlexiDualGridVaeEncoder: model_channels, num_blocks, block_type, block_args need one entry "
                "per level and down_block_type one per level but the last"
            )
        self.model_channels = list(model_channels)
        self.latent_channels = latent_channels
        self.num_blocks = list(num_blocks)
        self.input_layer = SparseLinear(self.in_channels, self.model_channels[0])
        self.to_latent = SparseLinear(self.model_channels[-1], 2 * latent_channels)
        self.blocks = nn.ModuleList()
        for i in range(levels):
            level = nn.ModuleList()
            for _ in range(self.num_blocks[i]):
                level.append(self._make(block_type[i], _BLOCK_TYPES, block_args[i], self.model_channels[i]))
            if i < levels - 1:
                level.append(self._make(down_block_type[i], _DOWN_BLOCK_TYPES, block_args[i],
                                        self.model_channels[i], self.model_channels[i + 1]))
            self.blocks.append(level)
        self.dtype = torch.float32
        self.convert_to(torch.float16 if use_fp16 else torch.float32)

    @staticmethod
    def _make(name: str, table: Dict[str, type], args: Dict[str, Any], *channels: int) -> nn.Module:
        if name not in table:
            raise ValueError(f"FlexiDualGridVaeEncoder: unsupported block type {name!r} (supported: {list(table)})")
        _check_block_args(name, args, _BLOCK_ARG_NAMES[name])
        return table[name](*channels, **args)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.blocks) - 1)

    @torch.no_grad()
    def forward(self, x: SparseTensor) -> SparseTensor:
        """Input ``x`` (feats ``[N, 6]`` from :func:`encoder_input`, coords ``[N, 4]`` on the mesh
        grid) -> posterior mean ``[M, latent]`` fp32 on the token grid (coords ``// 16``)."""
        if x.feats.dim() != 2 or x.feats.shape[1] != self.in_channels:
            raise ValueError(f"FlexiDualGridVaeEncoder: expected feats [N, {self.in_channels}], got {tuple(x.feats.shape)}")
        w, b = self.input_layer.weight, self.input_layer.bias
        batch = {"batch_size": x.cache["batch_size"]} if "batch_size" in x.cache else None
        h = SparseTensor(F.linear(x.feats.to(w.dtype), w, b).to(self.dtype), x.coords, x.spatial_shape, cache=batch)
        for level in self.blocks:
            for block in level:
                h = block(h)
        z = F.layer_norm(h.feats.float(), h.feats.shape[-1:])
        w, b = self.to_latent.weight, self.to_latent.bias
        mean = F.linear(z.to(w.dtype), w, b)[:, : self.latent_channels].float()
        return SparseTensor(mean, h.coords, h.spatial_shape, cache={"batch_size": h.batch_size})

    def encode(self, coords: torch.Tensor, dual_vertices: torch.Tensor, intersected: torch.Tensor,
               resolution: int) -> SparseTensor:
        """One dual grid (coords ``[N, 3]``, dual ``[N, 3]`` in 0..1, intersected ``[N, 3]``) on a
        ``resolution`` grid -> its SLat (batch index 0)."""
        dev = self.input_layer.weight.device
        c = torch.cat([torch.zeros_like(coords[:, :1]), coords], dim=1).int().to(dev)
        feats = encoder_input(dual_vertices, intersected).to(dev)
        return self.forward(SparseTensor(feats, c, (resolution,) * 3, batch_size=1))
