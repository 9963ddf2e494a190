"""Normalisation layers on SparseTensor features.

- ``SparseLayerNorm``: LayerNorm over the channels of each voxel (row-wise; what the TRELLIS.2
  decoders apply to ``x.feats``). Parameters ``weight [C]``, ``bias [C]``.
- ``SparseGroupNorm``: GroupNorm per batch item: statistics over the channels of a group and all
  voxels of that item (the reference loops over items and runs ``nn.GroupNorm`` on
  ``[1, C, N_b]``; this computes the same in one pass). Parameters ``weight [C]``, ``bias [C]``.
- ``*32`` variants compute in float32 and return the input dtype (the reference's
  ``SparseLayerNorm32`` / ``SparseGroupNorm32`` / ``LayerNorm32``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tensor import SparseTensor

__all__ = [
    "SparseLayerNorm",
    "SparseLayerNorm32",
    "SparseGroupNorm",
    "SparseGroupNorm32",
    "sparse_group_norm",
]


class SparseLayerNorm(nn.LayerNorm):
    """LayerNorm over the last dims of feats (per voxel). forward(SparseTensor) -> SparseTensor."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))


class SparseLayerNorm32(nn.LayerNorm):
    """SparseLayerNorm computed in float32; output in the input dtype."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        out = F.layer_norm(x.feats.float(), self.normalized_shape, w, b, self.eps)
        return x.replace(out.to(x.dtype))


def sparse_group_norm(
    x: SparseTensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """GroupNorm of feats ``[N, C]`` with statistics per (batch item, group).

    Mean and biased variance run over the ``C / num_groups`` channels of a group and the voxels of
    one batch item, computed in feats' dtype (two passes: mean, then centred squares).
    Returns normalised feats ``[N, C]`` (affine applied when weight/bias are given).
    """
    N, C = x.feats.shape
    if C % num_groups:
        raise ValueError(f"sparse_group_norm: {C} channels not divisible by {num_groups} groups")
    B, cpg = x.batch_size, C // num_groups
    bi = x.batch_index
    h = x.feats.view(N, num_groups, cpg)
    count = (x.seqlens.to(h.dtype) * cpg).clamp_min(1).unsqueeze(1)  # [B, 1]
    mean = h.new_zeros(B, num_groups).index_add_(0, bi, h.sum(-1)) / count
    centred = h - mean[bi].unsqueeze(-1)
    var = h.new_zeros(B, num_groups).index_add_(0, bi, centred.square().sum(-1)) / count
    out = (centred * torch.rsqrt(var + eps)[bi].unsqueeze(-1)).view(N, C)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


class SparseGroupNorm(nn.GroupNorm):
    """GroupNorm per batch item over voxels. forward(SparseTensor feats [N, C]) -> same shape."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(sparse_group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class SparseGroupNorm32(nn.GroupNorm):
    """SparseGroupNorm computed in float32; output in the input dtype."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        out = sparse_group_norm(x.float(), self.num_groups, w, b, self.eps)
        return x.replace(out.to(x.dtype))
