"""Row-wise linear layer on SparseTensor features."""
from __future__ import annotations

import torch.nn as nn

from .tensor import SparseTensor

__all__ = ["SparseLinear"]


class SparseLinear(nn.Linear):
    """``nn.Linear`` on feats: ``[N, ..., in] -> [N, ..., out]``, same coords (shared cache).

    Parameters ``weight [out, in]``, ``bias [out]`` as in the official checkpoints.
    """

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))
