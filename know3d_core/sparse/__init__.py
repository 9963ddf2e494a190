"""Sparse voxel toolkit in pure PyTorch: SparseTensor, submanifold conv, norms, channel<->space,
variable-length attention. See docs/internals.md ("Contract: sparse toolkit")."""
from .tensor import SparseTensor, flat_keys, sparse_cat, sparse_cat_channels
from .attention import AttentionPlans, dense_attention, flash_for_new_shapes, record_attention_plans, varlen_attention
from .conv import (
    ALGORITHMS,
    NeighbourMap,
    SparseConv3d,
    SubMConv3d,
    build_neighbour_map,
    choose_algorithm,
    kernel_offsets,
    neighbour_map,
    submanifold_conv3d,
)
from .linear import SparseLinear
from .nonlinearity import SparseActivation, SparseGELU, SparseReLU, SparseSiLU, sparse_apply
from .norm import SparseGroupNorm, SparseGroupNorm32, SparseLayerNorm, SparseLayerNorm32, sparse_group_norm
from .spatial import channel_to_spatial, child_bits, spatial_to_channel

__all__ = [
    "SparseTensor",
    "flat_keys",
    "sparse_cat",
    "sparse_cat_channels",
    "AttentionPlans",
    "flash_for_new_shapes",
    "dense_attention",
    "record_attention_plans",
    "varlen_attention",
    "ALGORITHMS",
    "NeighbourMap",
    "SparseConv3d",
    "SubMConv3d",
    "build_neighbour_map",
    "choose_algorithm",
    "kernel_offsets",
    "neighbour_map",
    "submanifold_conv3d",
    "SparseLinear",
    "SparseActivation",
    "SparseGELU",
    "SparseReLU",
    "SparseSiLU",
    "sparse_apply",
    "SparseGroupNorm",
    "SparseGroupNorm32",
    "SparseLayerNorm",
    "SparseLayerNorm32",
    "sparse_group_norm",
    "channel_to_spatial",
    "child_bits",
    "spatial_to_channel",
]
