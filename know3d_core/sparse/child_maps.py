"""A subdivision's 3x3x3 neighbour map derived from its parents' map, without hashing.

The decoders' channel-to-space blocks subdivide a coarse coordinate set (parents, whose 3x3x3 map the
block's first conv has built) into children (:func:`.spatial.channel_to_spatial` with a mask; child k
of parent voxel ``P`` sits at ``2 P + bits(k)``, children ordered parent-major, k ascending). A child's
neighbour at offset ``d`` in ``{-1, 0, 1}^3`` sits at ``2 P + bits(k) + d``; per axis
``bits(k) + d`` lies in ``-1..2``, so that voxel is child ``k'`` of the parent at offset
``e = floor((bits(k) + d) / 2)`` in ``{-1, 0, 1}^3`` from ``P`` (a parent-map entry), with
``bits(k') = bits(k) + d - 2 e``. The fine grid is exactly twice the coarse one, so a neighbour
outside the fine grid has its parent outside the coarse grid: missing in both maps.

So the children's map is two gathers per entry (:func:`child_neighbour_map`), equal to the hashed
build on the children's coords (tests/test_child_maps.py); only for kernel 3, dilation 1.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import neighbour_triton
from .conv import NeighbourMap, kernel_offsets, neighbour_map_key
from .kernel_dispatch import KernelSwitch
from .spatial import child_bits
from .tensor import SparseTensor

__all__ = ["child_neighbour_map", "inherit_child_map", "use_child_maps", "CHILD_MAPS_BY_DEFAULT"]

# Derive children's maps at all (the PyTorch gathers off CUDA; on CUDA the Triton kernel, which has its own
# switch, neighbour_triton.CHILD_MAPS_BY_DEFAULT: without it a CUDA map is hashed as before).
CHILD_MAPS_BY_DEFAULT = True
CHUNK_ROWS = 1 << 16  # children per step of the PyTorch gathers (bounds their [rows, 27] int64 temporaries)
_switch = KernelSwitch(CHILD_MAPS_BY_DEFAULT)


def use_child_maps(enabled: bool):
    """Context manager: derive children's maps inside the block (default on) or hash them (A/B runs, tests)."""
    return _switch.use(enabled)


def _step_tables(device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(parent offset [8, 27], child slot [8, 27])`` int64: for child k and offset v, the parent-map
    column of ``e = floor((bits(k) + d_v) / 2)`` and the k' with ``bits(k') = bits(k) + d_v - 2 e``."""
    d = torch.tensor(kernel_offsets(3, 1), device=device)  # [27, 3] (dx, dy, dz)
    s = child_bits(device).long()[:, None, :] + d[None, :, :] + 2  # [8, 27, 3] in 1..4
    e, o = torch.div(s, 2, rounding_mode="floor"), s % 2  # e + 1 in 0..2, the new child bits
    column = (e[..., 0] * 3 + e[..., 1]) * 3 + e[..., 2]
    slot = o[..., 0] + 2 * o[..., 1] + 4 * o[..., 2]
    return column, slot


def _child_rows(src: torch.Tensor, num_parents: int) -> torch.Tensor:
    """``[num_parents * 8]`` int32: the row of child ``parent * 8 + k``, or the child count when absent."""
    n = src.shape[0]
    rows = torch.full((num_parents * 8,), n, dtype=torch.int32, device=src.device)
    rows[src.long()] = torch.arange(n, dtype=torch.int32, device=src.device)
    return rows


def child_neighbour_map(parent_nbr: torch.Tensor, src: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The children's 3x3x3 map from their parents'.

    Args:
        parent_nbr: ``[M, 27]`` int32, the parents' map (missing = M).
        src: ``[n]`` int (int32 or int64): ``parent * 8 + k`` of each child, in child order (distinct).
    Returns:
        ``(nbr [n, 27] int32 (missing = n), bits [n] int32 or None)``: the map of the children's coords
        (what :func:`.conv.build_neighbour_map` gives on them); pattern bits with the Triton kernel.
    """
    M = parent_nbr.shape[0]
    if parent_nbr.dim() != 2 or parent_nbr.shape[1] != 27:
        raise ValueError(f"child_neighbour_map: parent map must be [M, 27], got {tuple(parent_nbr.shape)}")
    child_rows = _child_rows(src, M)
    if neighbour_triton.child_maps_available(parent_nbr):
        return neighbour_triton.child_map_triton(parent_nbr, src, child_rows)
    n = src.shape[0]
    column, slot = _step_tables(src.device)
    padded = torch.cat([parent_nbr.long(), parent_nbr.new_full((1, 27), M).long()])  # row M: a missing parent
    rows = torch.cat([child_rows, child_rows.new_full((8,), n)])  # parent M's children: missing
    nbr = torch.empty((n, 27), dtype=torch.int32, device=src.device)
    for a in range(0, n, CHUNK_ROWS):
        s = src[a:a + CHUNK_ROWS].long()
        p, k = s // 8, s % 8
        q = padded[p[:, None], column[k]]  # [m, 27] parent rows of the neighbours
        nbr[a:a + CHUNK_ROWS] = rows[q * 8 + slot[k]]
    return nbr, None


def inherit_child_map(parent: SparseTensor, children: SparseTensor, src: torch.Tensor) -> bool:
    """Cache on ``children`` its 3x3x3 map derived from ``parent``'s cached one (when that exists,
    ``children`` has none yet and the switch is on); True when it did.

    ``children`` must be ``channel_to_spatial(parent, mask)`` (or its ``replace``) and ``src [n]`` its
    ``parent * 8 + k`` rows in child order.
    """
    key = neighbour_map_key(3, 1)
    parent_map = parent.cache.get(key)
    if not _switch.enabled or parent_map is None or key in children.cache:
        return False
    if parent_map.nbr.is_cuda and not neighbour_triton.child_maps_available(parent_map.nbr):
        return False  # the PyTorch gathers are not measured against the CUDA hash build
    if src.shape[0] != children.num_voxels:
        raise ValueError(f"inherit_child_map: {src.shape[0]} source rows for {children.num_voxels} children")
    nbr, bits = child_neighbour_map(parent_map.nbr, src)
    children.cache[key] = NeighbourMap(nbr, 3, 1, bits)
    return True
