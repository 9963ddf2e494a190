"""Sparse voxel toolkit in pure PyTorch: SparseTensor, submanifold conv, norms, channel<->space,
variable-length attention. See docs/internals.md ("Contract: sparse toolkit")."""
from .tensor import SparseTensor, flat_keys, sparse_cat_channels
from .attention import dense_attention, varlen_attention

__all__ = [
    "SparseTensor",
    "flat_keys",
    "sparse_cat_channels",
    "dense_attention",
    "varlen_attention",
]
