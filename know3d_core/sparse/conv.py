"""Submanifold 3-D convolution (stride 1, odd kernel, dilation d) on a SparseTensor, pure PyTorch.

Output voxels are the input voxels. For output row n and kernel offset v:
``out[n] = bias + sum_v W[:, v, :] @ feats[nbr[n, v]]`` where ``nbr[n, v]`` is the row holding the
voxel at ``coords[n] + d * (i - k//2, j - k//2, l - k//2)`` (``v = (i * k + j) * k + l``, the
FlexGEMM / official order on (x, y, z)); missing neighbours contribute zero.

Weights are stored like the official checkpoints: ``weight [Co, k, k, k, Ci]``, ``bias [Co]``, so
``weight.view(Co, k**3 * Ci)`` multiplies the taps laid out ``(v, ci)``. Equivalent dense op:
``F.conv3d(grid, weight.permute(0, 4, 1, 2, 3), bias, padding=d*(k//2), dilation=d)`` sampled at
the active voxels of a zero-filled grid.

Five ways to compute, same result (tests hold them to each other and to dense conv3d):
- ``"gather"``: gather the k^3 input taps of a chunk of rows into ``[m, k^3*Ci]`` and multiply
  by ``weight.view(Co, k^3*Ci)``; chunks keep the gathered block under ``chunk_bytes``.
- ``"offset"``: per kernel offset, gather the rows that have that neighbour, multiply by
  ``W_v`` and scatter-add into the output (skips missing neighbours: the fewest FLOPs).
- ``"bag"``: one dense GEMM gives every tap's product ``Y = feats @ W_v^T`` for all offsets of a
  group, then ``embedding_bag(sum)`` adds, per output row, the products of its existing
  neighbours (reads only those; fp32 accumulation). Offsets are grouped so ``Y`` stays under
  ``chunk_bytes``.
- ``"csr"``: as ``"bag"``, with the per-row sum done as a CSR sparse x dense product (cuSPARSE
  on CUDA); falls back to ``"bag"`` where the sparse product lacks the dtype (CPU half types).
- ``"implicit"``: Triton implicit GEMM (CUDA only, :mod:`.conv_triton`): rows grouped by
  neighbour pattern, each tile gathers and multiplies only the offsets its rows have, fp32
  accumulation, no temporary beyond a small per-coords tile layout.
``"auto"`` picks by :func:`choose_algorithm` (a rule from the H100 measurements of
``benchmarks/bench_sparse_conv.py``) and logs each new choice once.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import conv_triton, neighbour_triton
from .kernel_dispatch import grad_needed
from .tensor import SparseTensor

__all__ = [
    "SubMConv3d",
    "SparseConv3d",
    "NeighbourMap",
    "neighbour_map",
    "neighbour_map_key",
    "build_neighbour_map",
    "kernel_offsets",
    "submanifold_conv3d",
    "submanifold_conv3d_children",
    "submanifold_conv3d_skip",
    "add_repeated_rows_",
    "implicit_kernel_ok",
    "choose_algorithm",
    "ALGORITHMS",
]

ALGORITHMS = ("gather", "offset", "bag", "csr", "implicit")
DEFAULT_CHUNK_BYTES = 1 << 30
DEFAULT_TABLE_BYTES = 1 << 29  # dense lookup table for the neighbour map up to 512 MiB (512^3 grid)
MIN_BAG_ROW_EFFICIENCY = 0.75  # below this share of useful GEMM rows, "bag" groups offsets instead
_HALF = (torch.float16, torch.bfloat16)
_log = logging.getLogger(__name__)
_logged_choices: set = set()
_implicit_failed: list = []  # the exception of a failed first Triton launch ("auto" then stays on torch)


def kernel_offsets(kernel_size: int, dilation: int) -> list[tuple[int, int, int]]:
    """The ``kernel_size**3`` (dx, dy, dz) offsets in neighbour order ``v = (i*k + j)*k + l``."""
    r = kernel_size // 2
    steps = [(t - r) * dilation for t in range(kernel_size)]
    return [(dx, dy, dz) for dx in steps for dy in steps for dz in steps]


def build_neighbour_map(
    coords: torch.Tensor,
    spatial_shape,
    kernel_size: int = 3,
    dilation: int = 1,
    max_table_bytes: int = DEFAULT_TABLE_BYTES,
) -> torch.Tensor:
    """Neighbour rows of every voxel.

    Voxels are keyed on a grid padded by the kernel reach on every side, so a neighbour's key is
    the voxel's key plus a constant per offset and neighbours outside the grid land in empty
    padding (no bounds checks, no aliasing across rows or batch items). Lookup: a dense int32
    table over the padded grid when it fits ``max_table_bytes``, else sorted keys + searchsorted.

    Args:
        coords: ``[N, 4]`` int32 (b, x, y, z); unique rows.
        spatial_shape: ``(X, Y, Z)``.
    Returns:
        ``nbr [N, k^3]`` int32; ``nbr[n, v]`` is the row of voxel ``coords[n] + offset_v``, or ``N``
        when that voxel is not active (or outside the grid).
    On CUDA with Triton the map comes from :mod:`.neighbour_triton` (a GPU hash table; same result).
    """
    return _build_neighbour_map(coords, spatial_shape, kernel_size, dilation, max_table_bytes)[0]


def _build_neighbour_map(coords, spatial_shape, kernel_size=3, dilation=1, max_table_bytes=DEFAULT_TABLE_BYTES,
                         batch_size=None):
    """``(nbr, pattern bits [N] int32 or None)``: the Triton build where available (bits when
    ``k^3 <= 31``; ``batch_size``, when known without a host sync, lets it use smaller hash keys), else
    the PyTorch ops (no bits)."""
    if neighbour_triton.available(coords):
        return neighbour_triton.build_neighbour_map_triton(coords, spatial_shape, kernel_size, dilation, batch_size)
    return _build_neighbour_map_torch(coords, spatial_shape, kernel_size, dilation, max_table_bytes), None


def _build_neighbour_map_torch(coords, spatial_shape, kernel_size, dilation, max_table_bytes) -> torch.Tensor:
    """The PyTorch build of :func:`build_neighbour_map`."""
    N = coords.shape[0]
    K = kernel_size ** 3
    device = coords.device
    nbr = torch.empty((N, K), dtype=torch.int32, device=device)
    if N == 0:
        return nbr
    p = dilation * (kernel_size // 2)
    X, Y, Z = (int(s) + 2 * p for s in spatial_shape)
    c = coords.long()
    keys = ((c[:, 0] * X + c[:, 1] + p) * Y + c[:, 2] + p) * Z + c[:, 3] + p
    deltas = [(dx * Y + dy) * Z + dz for dx, dy, dz in kernel_offsets(kernel_size, dilation)]
    table_entries = (int(c[:, 0].max()) + 1) * X * Y * Z
    if table_entries * 4 <= max_table_bytes:
        table = torch.full((table_entries,), N, dtype=torch.int32, device=device)
        table[keys] = torch.arange(N, dtype=torch.int32, device=device)
        for v, delta in enumerate(deltas):
            nbr[:, v] = table[keys + delta]
        return nbr
    sorted_keys, order = torch.sort(keys)
    order = order.to(torch.int32)
    if dilation != 1 or kernel_size != 3:
        for v, delta in enumerate(deltas):
            _lookup_sorted(sorted_keys, order, keys + delta, N, nbr[:, v])
        return nbr
    # 3x3x3: one binary search per (dx, dy) column; the z neighbours of the found slot are the
    # adjacent sorted keys (keys are integers, so nothing lies between key - 1, key and key + 1)
    sentinel = torch.cat([sorted_keys, sorted_keys.new_full((1,), -1)])  # index N never matches
    for c in range(9):
        centre = keys + deltas[3 * c + 1]
        pos = torch.searchsorted(sorted_keys, centre)  # first slot with key >= centre
        hit = sentinel[pos] == centre
        for dz, cand in ((-1, pos - 1), (0, pos), (1, pos + hit.long())):
            cand = torch.where(cand < 0, N, cand)
            _lookup_sorted(sentinel, order, centre + dz, N, nbr[:, 3 * c + 1 + dz], cand)
    return nbr


def _lookup_sorted(sorted_keys, order, target, N: int, out: torch.Tensor, pos: Optional[torch.Tensor] = None):
    """``out[i] = order[j]`` where ``sorted_keys[j] == target[i]``, else N (``pos``: the candidate j,
    default a binary search)."""
    if pos is None:
        pos = torch.searchsorted(sorted_keys[:N], target).clamp_(max=N - 1)
    match = sorted_keys[pos] == target
    out.copy_(torch.where(match, order[pos.clamp(max=N - 1)], N))


class NeighbourMap:
    """Neighbour map of one coordinate set plus the index layouts derived from it (lazily).

    Attributes:
        nbr: ``[N, K]`` int32, missing = N.
        num_rows: N.  kernel_size, dilation: as built.
    """

    def __init__(self, nbr: torch.Tensor, kernel_size: int, dilation: int, bits: Optional[torch.Tensor] = None):
        self.nbr = nbr
        self.num_rows = nbr.shape[0]
        self.kernel_size = kernel_size
        self.dilation = dilation
        self._derived: dict = {} if bits is None else {"bits": bits}  # bits: [N] neighbour-pattern masks

    @property
    def volume(self) -> int:
        return self.nbr.shape[1]

    @property
    def fill(self) -> float:
        """Mean fraction of existing neighbours (one host sync, cached)."""
        if "fill" not in self._derived:
            n = max(self.num_rows * self.volume, 1)
            self._derived["fill"] = float((self.nbr < self.num_rows).sum().item()) / n
        return self._derived["fill"]

    def offset_pairs(self) -> list[Optional[tuple[torch.Tensor, torch.Tensor]]]:
        """Per offset v: ``(out_rows [P_v], in_rows [P_v])`` int64 of existing pairs, or None if none.

        Built once (one host sync for the counts) and cached.
        """
        if "pairs" not in self._derived:
            N = self.num_rows
            valid_t = (self.nbr < N).t()  # [K, N]
            counts = valid_t.sum(1).tolist()
            vn = valid_t.nonzero()  # [P, 2] (v, n), sorted by v then n
            src = self.nbr.t()[vn[:, 0], vn[:, 1]].long()
            out_rows = vn[:, 1].split(counts)
            in_rows = src.split(counts)
            self._derived["pairs"] = [
                (o, i) if c else None for o, i, c in zip(out_rows, in_rows, counts)
            ]
        return self._derived["pairs"]

    def bag_row_plan(self, budget_rows: int) -> Optional[list[tuple[int, int, int, int, torch.Tensor, torch.Tensor]]]:
        """Output-row chunks for the ``"bag"`` algorithm with all K taps at once.

        Each chunk is ``(a, b, lo, hi, indices [P_c], offsets [b - a])``: output rows ``[a, b)`` only
        read input rows ``[lo, hi)`` with ``hi - lo <= budget_rows``; bag n - a lists
        ``(src - lo) * K + v`` for the existing neighbours src of row n (offset order), i.e. rows of
        a table ``[(hi - lo) * K, Co]`` whose row ``(src - lo) * K + v`` is tap v of input ``src``.
        Relies on neighbours having nearby row numbers (coords sorted, or refined from sorted
        parents); returns None when no chunking meets the budget, or when the bands overlap so
        much that fewer than ``MIN_BAG_ROW_EFFICIENCY`` of the GEMM rows are useful (then the
        caller groups offsets over all rows instead).
        Cached per budget (a few host syncs when built).
        """
        key = ("bag_rows", budget_rows)
        if key not in self._derived:
            self._derived[key] = self._plan_row_chunks(budget_rows)
        return self._derived[key]

    def _plan_row_chunks(self, budget_rows: int):
        N, K = self.num_rows, self.volume
        valid = self.nbr < N
        if N <= budget_rows:
            bounds = [(0, N, 0, N)]
        else:
            row_lo = torch.where(valid, self.nbr, N).amin(1).cpu()
            row_hi = (torch.where(valid, self.nbr, -1).amax(1) + 1).cpu()
            bounds = _greedy_row_chunks(row_lo, row_hi, budget_rows)
            computed = sum(h - l for _, _, l, h in (bounds or []))
            if bounds is None or computed > N / MIN_BAG_ROW_EFFICIENCY:
                return None
        nv = valid.nonzero()  # [P, 2] (n, v), row-major
        flat = self.nbr[nv[:, 0], nv[:, 1]].long() * K + nv[:, 1]
        per_row = valid.sum(1)
        row_start = torch.cumsum(per_row, 0) - per_row
        cut = row_start[[a for a, _, _, _ in bounds]].tolist() + [flat.shape[0]]
        idx_dtype = torch.int32 if budget_rows * K < 2**31 - 1 else torch.int64
        plan = []
        for i, (a, b, lo, hi) in enumerate(bounds):
            indices = (flat[cut[i]:cut[i + 1]] - lo * K).to(idx_dtype)
            offsets = (row_start[a:b] - cut[i]).to(idx_dtype)
            plan.append((a, b, lo, hi, indices, offsets))
        return plan

    def tile_layout(self, bm: int, sort_rows: bool = True) -> "conv_triton.TileLayout":
        """Rows grouped by neighbour pattern in tiles of ``bm`` (``"implicit"``); cached per bm."""
        key = ("tiles", bm, sort_rows)
        if key not in self._derived:
            bits = self._derived.get("bits")
            if sort_rows and bits is not None and neighbour_triton.available(self.nbr):
                self._derived[key] = neighbour_triton.tile_layout_triton(self.nbr, bits, bm)
            else:
                self._derived[key] = conv_triton.tile_layout(self.nbr, bm, sort_rows)
        return self._derived[key]

    def bag_index(self, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bags for offsets ``v0 <= v < v1`` (group size g = v1 - v0).

        Returns ``(indices [P], offsets [N])`` for ``embedding_bag`` over a table ``[N*g, Co]``
        whose row ``n*g + (v - v0)`` is tap v's product of input row n: bag n lists the existing
        neighbours of output row n, in offset order. Cached per group.
        """
        key = ("bag", v0, v1)
        if key not in self._derived:
            N, g = self.num_rows, v1 - v0
            sub = self.nbr[:, v0:v1]
            valid = sub < N  # [N, g]
            nv = valid.nonzero()  # [P, 2] (n, vl), row-major
            idx_dtype = torch.int32 if N * g < 2**31 - 1 else torch.int64
            indices = (sub[nv[:, 0], nv[:, 1]].long() * g + nv[:, 1]).to(idx_dtype)
            per_row = valid.sum(1)
            offsets = (torch.cumsum(per_row, 0) - per_row).to(idx_dtype)
            self._derived[key] = (indices, offsets)
        return self._derived[key]


def _greedy_row_chunks(row_lo: torch.Tensor, row_hi: torch.Tensor, budget_rows: int):
    """Split rows into consecutive chunks ``[a, b)`` whose input band ``[lo, hi)`` (the smallest
    and largest neighbour row + 1) spans at most budget_rows; each chunk as long as possible.

    Args: ``row_lo``/``row_hi`` ``[N]`` int (CPU): per row, its smallest / largest neighbour + 1.
    Returns ``[(a, b, lo, hi), ...]`` or None when a single row's band exceeds the budget.
    """
    N = row_lo.shape[0]
    bounds, a = [], 0
    while a < N:
        lo = torch.cummin(row_lo[a:a + budget_rows], 0).values
        hi = torch.cummax(row_hi[a:a + budget_rows], 0).values
        fits = int(((hi - lo) <= budget_rows).sum())  # the band only grows: a prefix fits
        if fits == 0:
            return None
        bounds.append((a, a + fits, int(lo[fits - 1]), int(hi[fits - 1])))
        a += fits
    return bounds


def neighbour_map_key(kernel_size: int = 3, dilation: int = 1) -> tuple:
    """The key of a coordinate set's :class:`NeighbourMap` in its tensor's ``cache``."""
    return ("subm_neighbour_map", int(kernel_size), int(dilation))


def neighbour_map(x: SparseTensor, kernel_size: int = 3, dilation: int = 1) -> NeighbourMap:
    """The NeighbourMap of x's coords, cached in ``x.cache`` under :func:`neighbour_map_key`."""
    key = neighbour_map_key(kernel_size, dilation)
    nm = x.cache.get(key)
    if nm is None:
        nbr, bits = _build_neighbour_map(x.coords, x.spatial_shape, kernel_size, dilation,
                                         batch_size=x.cache.get("batch_size"))
        nm = NeighbourMap(nbr, kernel_size, dilation, bits)
        x.cache[key] = nm
    return nm


def choose_algorithm(
    device: torch.device,
    in_channels: int,
    out_channels: int,
    fill: Optional[float] = None,
    dtype: Optional[torch.dtype] = None,
) -> str:
    """Rule for ``algo="auto"`` (H100 bf16: benchmarks/results/perf_conv_sweep.log, perf_conv.log).

    - CUDA, fp16/bf16 features and Triton present: ``"implicit"`` (fastest at every size measured,
      and no gathered temporaries).
    - Few neighbours present (``fill < 0.25``): ``"offset"`` (does only the existing taps).
    - CUDA otherwise: ``"csr"`` up to 256 channels (one GEMM for all taps, cuSPARSE row sums),
      ``"gather"`` from 512 channels on or when the output is much wider than the input
      (``Co > 2*Ci``: the tap products would be larger than the gathered inputs).
    - CPU: ``"bag"`` (one GEMM per row chunk, few large ops; the steadiest on a loaded 2-core CPU).
    """
    cuda = torch.device(device).type == "cuda"
    if cuda and dtype in _HALF and conv_triton.triton_available() and not _implicit_failed:
        return "implicit"
    if fill is not None and fill < 0.25:
        return "offset"
    if cuda:
        if max(in_channels, out_channels) >= 512 or out_channels > 2 * in_channels:
            return "gather"
        return "csr"
    return "bag"


def _log_choice(device, dtype, ci: int, co: int, algo: str) -> None:
    key = (torch.device(device).type, dtype, ci, co, algo)
    if key not in _logged_choices:
        _logged_choices.add(key)
        _log.info("submanifold conv %d->%d %s on %s: algo=%s", ci, co, dtype, key[0], algo)


def submanifold_conv3d(
    x: SparseTensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    dilation: int = 1,
    algo: str = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> SparseTensor:
    """Submanifold conv of ``x`` (feats ``[N, Ci]``) with ``weight [Co, k, k, k, Ci]``, ``bias [Co]``.

    Weight and bias are cast to ``x.dtype``. Returns a tensor on the same coords (shared cache)
    with feats ``[N, Co]``.
    """
    _check_conv_args("submanifold_conv3d", x, weight)
    Co, k, Ci = weight.shape[0], weight.shape[1], weight.shape[4]
    if algo not in ALGORITHMS and algo != "auto":
        raise ValueError(f"submanifold_conv3d algo must be one of {ALGORITHMS + ('auto',)}, got {algo!r}")
    feats = x.feats
    w = weight.to(feats.dtype)
    b = None if bias is None else bias.to(feats.dtype)
    nm = neighbour_map(x, k, dilation)
    if x.num_voxels == 0:
        return x.replace(feats.new_zeros(0, Co))
    auto = algo == "auto"
    if auto:
        algo = choose_algorithm(feats.device, Ci, Co, None, feats.dtype)
        if algo != "implicit":  # the fill (one host sync, cached) only matters to the torch paths
            algo = choose_algorithm(feats.device, Ci, Co, nm.fill if nm.num_rows else None, feats.dtype)
        _log_choice(feats.device, feats.dtype, Ci, Co, algo)
    if algo == "implicit":
        out = _conv_implicit(feats, nm, w, b, fallback=auto)
        if out is None:  # the first Triton launch failed ("auto" only): use the torch rule from now on
            return submanifold_conv3d(x, weight, bias, dilation, "auto", chunk_bytes)
    elif algo == "gather":
        out = _conv_gather(feats, nm, w, b, chunk_bytes)
    elif algo == "offset":
        out = _conv_offset(feats, nm, w, b, chunk_bytes)
    else:
        out = _conv_bag(feats, nm, w, b, chunk_bytes, use_csr=algo == "csr")
    return x.replace(out)


def _check_conv_args(name: str, x: SparseTensor, weight: torch.Tensor) -> None:
    """feats ``[N, Ci]`` and weight ``[Co, k, k, k, Ci]`` with odd k, or a ValueError naming ``name``."""
    if x.feats.dim() != 2:
        raise ValueError(f"{name} needs feats [N, C], got {tuple(x.feats.shape)}")
    if weight.dim() != 5 or not (weight.shape[1] == weight.shape[2] == weight.shape[3]) or weight.shape[1] % 2 == 0:
        raise ValueError(f"{name} weight must be [Co, k, k, k, Ci] with odd k, got {tuple(weight.shape)}")
    if x.feats.shape[1] != weight.shape[4]:
        raise ValueError(f"{name}: input has {x.feats.shape[1]} channels, weight expects {weight.shape[4]}")


def implicit_kernel_ok(feats: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    """Whether ``algo="auto"`` runs the Triton implicit GEMM on ``feats`` and no input needs a
    gradient (the kernels of :func:`submanifold_conv3d_children` / ``_skip`` have no backward)."""
    return (conv_triton.supports(feats) and not _implicit_failed and not grad_needed(feats, *params)
            and choose_algorithm(feats.device, feats.shape[1], feats.shape[1], None, feats.dtype) == "implicit")


def submanifold_conv3d_children(x: SparseTensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                src: torch.Tensor, num_slots: int = 8) -> torch.Tensor:
    """Selected output blocks of a submanifold conv: ``conv(x).view(N * S, Co)[src]``.

    x feats ``[N, Ci]``; weight ``[S * Co, k, k, k, Ci]``, bias ``[S * Co]`` (S = ``num_slots``; the
    channel-to-space conv of the decoders, block s = child s); ``src [M]`` int: ``row * S + slot``.
    Returns ``[M, Co]`` in x's dtype. With the Triton implicit GEMM (CUDA half, no grad, k = 3)
    only the selected blocks are computed (:func:`.conv_triton.conv_children_implicit_gemm`; about
    half the FLOPs and memory of the full conv for a surface's children); elsewhere the full conv
    is gathered (same values: the kernel adds the same products in the same order).
    """
    _check_conv_args("submanifold_conv3d_children", x, weight)
    if weight.shape[0] % num_slots:
        raise ValueError(f"submanifold_conv3d_children: {weight.shape[0]} output channels are not {num_slots} blocks")
    w = weight.to(x.feats.dtype)
    b = None if bias is None else bias.to(x.feats.dtype)
    k = weight.shape[1]
    if x.num_voxels and src.numel() and k == 3 and implicit_kernel_ok(x.feats, w, b):
        nm = neighbour_map(x, k, 1)
        Co = weight.shape[0] // num_slots
        cfg = conv_triton.kernel_config(weight.shape[4], Co, x.feats.dtype, "child")
        flags = neighbour_triton.child_tile_flags if neighbour_triton.available(x.coords) else None
        out = _first_launch_guard(lambda: conv_triton.conv_children_implicit_gemm(
            x.feats, nm.nbr, conv_triton.child_tile_layout(nm.nbr, nm._derived.get("bits"), src, cfg.BM, num_slots,
                                                           flags), w, b, src.shape[0], num_slots, cfg))
        if out is not None:
            return out
    full = submanifold_conv3d(x, weight, bias).feats
    return full.view(-1, full.shape[1] // num_slots)[src]


def submanifold_conv3d_skip(x: SparseTensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``submanifold_conv3d(x, weight, bias).feats + skip`` with ``skip[n, j] = table[index[n], j // r]``
    (``table [R, c]``, ``r = Co // c``; the channel-to-space skip of the decoders) -> ``[N, Co]``.

    With the Triton implicit GEMM the skip is added in the conv's epilogue (fp32, one rounding, no
    gathered temporary); elsewhere conv then :func:`add_repeated_rows_` (rounded twice).
    """
    _check_conv_args("submanifold_conv3d_skip", x, weight)
    w = weight.to(x.feats.dtype)
    b = None if bias is None else bias.to(x.feats.dtype)
    if x.num_voxels and implicit_kernel_ok(x.feats, w, b) and table.dtype == x.feats.dtype:
        nm = neighbour_map(x, weight.shape[1], 1)
        cfg = conv_triton.kernel_config(weight.shape[4], weight.shape[0], x.feats.dtype, "skip")
        out = _first_launch_guard(lambda: conv_triton.conv_implicit_gemm(x.feats, nm.tile_layout(cfg.BM), w, b, cfg,
                                                                         skip=(table, index)))
        if out is not None:
            return out
    out = submanifold_conv3d(x, weight, bias).feats
    return add_repeated_rows_(out, table, index)


def _first_launch_guard(launch) -> Optional[torch.Tensor]:
    """``launch()``, or None after logging a failing launch (compiler/driver errors vary): from then on
    ``"auto"`` and :func:`implicit_kernel_ok` keep to the PyTorch paths, as for the plain conv."""
    try:
        return launch()
    except Exception as exc:  # noqa: BLE001
        _implicit_failed.append(exc)
        _log.warning("Triton sparse conv failed (%s: %s); using the PyTorch algorithms", type(exc).__name__, exc)
        return None


def add_repeated_rows_(out: torch.Tensor, table: torch.Tensor, index: torch.Tensor,
                       chunk_rows: int = 1 << 18) -> torch.Tensor:
    """In place ``out[n, j] += table[index[n], j // r]`` (``out [N, Co]``, ``table [R, c]``,
    ``r = Co // c``), in row chunks; returns ``out``."""
    repeat = out.shape[1] // table.shape[1]
    for start in range(0, out.shape[0], chunk_rows):
        stop = start + chunk_rows
        # channel j*repeat + r gets table channel j: a broadcast add over r
        out[start:stop].view(-1, table.shape[1], repeat).add_(table[index[start:stop]].unsqueeze(-1))
    return out


def _conv_implicit(feats, nm: NeighbourMap, w, b, fallback: bool) -> Optional[torch.Tensor]:
    """Triton implicit GEMM; with ``fallback`` a failing launch is logged and returns None."""
    if not conv_triton.supports(feats):
        raise ValueError(
            "submanifold_conv3d algo='implicit' needs Triton and a CUDA fp16/bf16/fp32 tensor "
            f"(got {feats.dtype} on {feats.device}, Triton {'present' if conv_triton.triton_available() else 'missing'}); "
            "use algo='auto'"
        )
    cfg = conv_triton.kernel_config(feats.shape[1], w.shape[0], feats.dtype)
    layout = nm.tile_layout(cfg.BM)
    if grad_needed(feats, w, b):
        return _ImplicitConv.apply(feats, w, b, nm, cfg)
    if not fallback:
        return conv_triton.conv_implicit_gemm(feats, layout, w, b, cfg)
    try:
        return conv_triton.conv_implicit_gemm(feats, layout, w, b, cfg)
    except Exception as exc:  # noqa: BLE001 - compiler/driver errors vary; the torch paths still work
        _implicit_failed.append(exc)
        _log.warning("Triton sparse conv failed (%s: %s); using the PyTorch algorithms", type(exc).__name__, exc)
        return None


class _ImplicitConv(torch.autograd.Function):
    """The Triton implicit GEMM with a backward pass.

    Submanifold offsets come in mirror pairs (row m is neighbour v of row n exactly when n is
    neighbour ``K-1-v`` of m), so the input gradient is the same conv of ``grad_out`` with the
    weight flipped in space and transposed, ``W'[ci, v, co] = W[co, K-1-v, ci]`` (same kernel, same
    tile layout). Weight gradient ``dW[:, v, :] = sum_n g[n] feats[nbr[n, v]]^T``: gathered taps in
    row chunks times ``grad_out`` (PyTorch GEMMs, fp32 sums across chunks); bias: ``sum_n g[n]``.
    """

    @staticmethod
    def forward(ctx, feats, w, b, nm, cfg):
        ctx.nm, ctx.has_bias = nm, b is not None
        ctx.save_for_backward(feats, w)
        return conv_triton.conv_implicit_gemm(feats, nm.tile_layout(cfg.BM), w, b, cfg)

    @staticmethod
    def backward(ctx, grad_out):
        feats, w = ctx.saved_tensors
        nm: NeighbourMap = ctx.nm
        grad_out = grad_out.contiguous()
        d_feats = d_w = d_b = None
        Co, Ci = w.shape[0], w.shape[4]
        if ctx.needs_input_grad[0]:
            w_t = w.flip(1, 2, 3).permute(4, 1, 2, 3, 0).contiguous()  # [Ci, k, k, k, Co]
            cfg_t = conv_triton.kernel_config(Co, Ci, grad_out.dtype)
            d_feats = conv_triton.conv_implicit_gemm(grad_out, nm.tile_layout(cfg_t.BM), w_t, None, cfg_t)
        if ctx.needs_input_grad[1]:
            d_w = _weight_grad(feats, grad_out, nm, DEFAULT_CHUNK_BYTES).view(w.shape).to(w.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_b = grad_out.float().sum(0).to(w.dtype)
        return d_feats, d_w, d_b, None, None


def _weight_grad(feats: torch.Tensor, grad_out: torch.Tensor, nm: NeighbourMap, chunk_bytes: int) -> torch.Tensor:
    """``dW [Co, K*Ci]`` (fp32) ``= sum_n grad_out[n]^T taps[n]`` with ``taps[n] = feats[nbr[n]]``
    (missing neighbours zero), gathered in row chunks under ``chunk_bytes``."""
    N, Ci = feats.shape
    K = nm.volume
    x_pad = torch.cat([feats, feats.new_zeros(1, Ci)], 0)
    rows = max(1, chunk_bytes // (K * Ci * feats.element_size()))
    d_w = None
    for a in range(0, N, rows):
        taps = x_pad[nm.nbr[a:a + rows]].view(-1, K * Ci)
        part = (grad_out[a:a + rows].t() @ taps).float()
        d_w = part if d_w is None else d_w.add_(part)
    if d_w is None:
        d_w = feats.new_zeros(grad_out.shape[1], K * Ci, dtype=torch.float32)
    return d_w


def _conv_gather(feats, nm: NeighbourMap, w, b, chunk_bytes: int) -> torch.Tensor:
    """Gathered taps ``[m, K*Ci]`` @ ``w.view(Co, K*Ci)^T`` per chunk of m rows."""
    N, Ci = feats.shape
    Co, K = w.shape[0], nm.volume
    w2 = w.reshape(Co, K * Ci).t()
    x_pad = torch.cat([feats, feats.new_zeros(1, Ci)], 0)  # row N is the zero "missing" row
    rows = max(1, chunk_bytes // (K * Ci * feats.element_size()))
    outs = []
    for a in range(0, N, rows):
        taps = x_pad[nm.nbr[a:a + rows]].view(-1, K * Ci)
        outs.append(taps @ w2 if b is None else torch.addmm(b, taps, w2))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def _conv_offset(feats, nm: NeighbourMap, w, b, chunk_bytes: int) -> torch.Tensor:
    """Per offset: ``out[rows_v] += feats[src_v] @ W_v^T`` (existing pairs only).

    Half-precision inputs accumulate in fp32 (as GEMM kernels do), then round once.
    """
    N, Ci = feats.shape
    Co, K = w.shape[0], nm.volume
    wv = w.reshape(Co, K, Ci)
    acc_dtype = torch.float32 if feats.element_size() < 4 else feats.dtype
    center = K // 2
    out = (feats @ wv[:, center].t()).to(acc_dtype)  # the centre tap: every row is its own neighbour
    rows_per_chunk = max(1, chunk_bytes // ((Ci + Co) * feats.element_size()))
    for v, pair in enumerate(nm.offset_pairs()):
        if v == center or pair is None:
            continue
        out_rows, in_rows = pair
        wt = wv[:, v].t()
        for a in range(0, out_rows.shape[0], rows_per_chunk):
            prod = feats[in_rows[a:a + rows_per_chunk]] @ wt
            out.index_add_(0, out_rows[a:a + rows_per_chunk], prod.to(acc_dtype))
    if b is not None:
        out += b.to(acc_dtype)
    return out.to(feats.dtype)


def _bag_groups(K: int, bytes_per_offset: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Split offsets 0..K-1 into near-equal consecutive groups whose products fit chunk_bytes."""
    per = max(1, min(K, chunk_bytes // max(bytes_per_offset, 1)))
    n_groups = math.ceil(K / per)
    size = math.ceil(K / n_groups)
    return [(v0, min(K, v0 + size)) for v0 in range(0, K, size)]


def _conv_bag(feats, nm: NeighbourMap, w, b, chunk_bytes: int, use_csr: bool = False) -> torch.Tensor:
    """``Y = feats[lo:hi] @ W_all^T`` (every tap of a band of input rows), then for each output row
    the sum of its existing neighbours' taps (``embedding_bag`` with fp32 accumulation, or a CSR
    product). Output rows are chunked so ``Y`` fits ``chunk_bytes``; if neighbours lie too far
    apart in row order the offsets are split into groups instead.
    """
    N, Ci = feats.shape
    Co, K = w.shape[0], nm.volume
    budget_rows = max(1, chunk_bytes // (K * Co * feats.element_size()))
    plan = nm.bag_row_plan(budget_rows)
    if plan is None:
        return _conv_bag_offset_groups(feats, nm, w, b, chunk_bytes)
    use_csr = use_csr and (feats.is_cuda or feats.dtype in (torch.float32, torch.float64))
    w_all = w.reshape(Co, K, Ci).transpose(0, 1).reshape(K * Co, Ci).t()  # column v*Co + co
    outs = []
    for i, (a, b_end, lo, hi, indices, offsets) in enumerate(plan):
        y = (feats[lo:hi] @ w_all).view(-1, Co)  # row r*K + v = tap v of input row lo + r
        if use_csr:
            outs.append(_csr_matrix(nm, budget_rows, i, feats.dtype, y.shape[0]) @ y)
        else:
            outs.append(F.embedding_bag(indices, y, offsets, mode="sum"))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    if b is not None:
        out += b
    return out


def _csr_matrix(nm: NeighbourMap, budget_rows: int, i: int, dtype, num_cols: int) -> torch.Tensor:
    """0/1 CSR ``[b - a, num_cols]`` summing chunk i's bags (cached per chunk and dtype)."""
    key = ("csr", budget_rows, i, dtype)
    if key not in nm._derived:
        a, b, _, _, indices, offsets = nm.bag_row_plan(budget_rows)[i]
        crow = torch.cat([offsets, offsets.new_full((1,), indices.shape[0])])
        values = torch.ones(indices.shape[0], dtype=dtype, device=indices.device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta" (emitted once per process)
            warnings.simplefilter("ignore")
            nm._derived[key] = torch.sparse_csr_tensor(
                crow, indices, values, (b - a, num_cols), check_invariants=False
            )
    return nm._derived[key]


def _conv_bag_offset_groups(feats, nm: NeighbourMap, w, b, chunk_bytes: int) -> torch.Tensor:
    """Bag algorithm over all rows, offsets in groups: ``Y_g = feats @ W_g^T`` ([N, g*Co])."""
    N, Ci = feats.shape
    Co, K = w.shape[0], nm.volume
    wv = w.reshape(Co, K, Ci)
    out = None
    for v0, v1 in _bag_groups(K, N * Co * feats.element_size(), chunk_bytes):
        g = v1 - v0
        wg = wv[:, v0:v1].transpose(0, 1).reshape(g * Co, Ci)
        y = (feats @ wg.t()).view(N * g, Co)  # row n*g + vl = tap (v0+vl) of input row n
        indices, offsets = nm.bag_index(v0, v1)
        part = F.embedding_bag(indices, y, offsets, mode="sum")
        out = part if out is None else out.add_(part)
    if b is not None:
        out += b
    return out


class SubMConv3d(nn.Module):
    """Submanifold sparse conv, official parameter layout.

    Args:
        in_channels, out_channels: Ci, Co.
        kernel_size: odd k (3 in TRELLIS.2). dilation: d.
        bias: add a ``bias [Co]`` parameter.
        algo: ``"auto" | "gather" | "offset" | "bag" | "csr" | "implicit"`` (see module docstring).
        chunk_bytes: memory budget of the largest temporary block.
    Parameters: ``weight [Co, k, k, k, Ci]``, ``bias [Co]``.
    forward(x: SparseTensor feats [N, Ci]) -> SparseTensor feats [N, Co] on the same coords.
    The neighbour map is cached in ``x.cache`` keyed by (kernel, dilation).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        dilation: int = 1,
        bias: bool = True,
        algo: str = "auto",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"SubMConv3d kernel_size must be odd, got {kernel_size}")
        if algo not in ALGORITHMS and algo != "auto":
            raise ValueError(f"SubMConv3d algo must be one of {ALGORITHMS + ('auto',)}, got {algo!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.algo = algo
        self.chunk_bytes = chunk_bytes
        k = kernel_size
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, k, k, k, in_channels, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch Conv3d's default init, in the [Co, k, k, k, Ci] layout."""
        fan_in = self.in_channels * self.kernel_size ** 3
        bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
        nn.init.uniform_(self.weight, -bound, bound)  # == kaiming_uniform_(a=sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return submanifold_conv3d(x, self.weight, self.bias, self.dilation, self.algo, self.chunk_bytes)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, bias={self.bias is not None}, algo={self.algo!r}"
        )


SparseConv3d = SubMConv3d  # the reference's name for the same layer
