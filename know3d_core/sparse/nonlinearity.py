"""Activations applied row-wise to SparseTensor features."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .tensor import SparseTensor

__all__ = ["SparseReLU", "SparseSiLU", "SparseGELU", "SparseActivation", "sparse_apply"]


def sparse_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: SparseTensor) -> SparseTensor:
    """``x.replace(fn(x.feats))``: any row-wise function on the features."""
    return x.replace(fn(x.feats))


class SparseReLU(nn.ReLU):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))


class SparseSiLU(nn.SiLU):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))


class SparseGELU(nn.GELU):
    """``nn.GELU(approximate=...)`` on feats."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))


class SparseActivation(nn.Module):
    """Wrap any ``nn.Module`` acting on ``[N, C]`` so it acts on a SparseTensor's feats."""

    def __init__(self, activation: nn.Module):
        super().__init__()
        self.activation = activation

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(self.activation(x.feats))
