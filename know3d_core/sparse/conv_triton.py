"""Submanifold 3-D conv as a Triton implicit GEMM (CUDA; compiled at run time, no autotuning).

``out[n] = bias + sum_v W_v @ feats[nbr[n, v]]`` over the existing neighbours only, with fp32
accumulation. Rows are reordered so that rows with the same neighbour pattern share a tile: each
row's pattern is the bitmask of its existing neighbours, rows are stably sorted by it and cut into
tiles of ``BM`` rows; a tile visits only the offsets that some row of it has (for surface-like
voxel sets about 2/3 of the 27, instead of all of them). One program computes ``BM x BN`` outputs:
for each active offset and each ``BK`` slice of the input channels it gathers ``[BM, BK]`` input
rows (missing neighbours read as zeros), loads ``W_v[BN, BK]`` straight from the checkpoint layout
``[Co, k, k, k, Ci]`` and accumulates one ``tl.dot``; the tile is written to its rows' original
positions (every output row exactly once).

The tile layout (:func:`tile_layout`) depends only on the coordinates and ``BM``; it is cached on
the :class:`~know3d_core.sparse.conv.NeighbourMap` and built without host syncs. Kernel
configurations come from a fixed rule (:func:`kernel_config`); compiled kernels are cached by
Triton in-process (one compile per configuration and dtype, about a second each).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from .kernel_dispatch import check_no_grad
from .triton_launch import TritonLauncher, in_int32

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

__all__ = ["triton_available", "supports", "kernel_config", "tile_layout", "TileLayout", "conv_implicit_gemm",
           "ChildTileLayout", "child_tile_layout", "pattern_bits", "conv_children_implicit_gemm", "use_config_rule",
           "RULES", "CONV_FORMS"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """True when Triton imported (the kernel itself still needs a CUDA tensor)."""
    return triton is not None


def supports(feats: torch.Tensor) -> bool:
    """Whether :func:`conv_implicit_gemm` can run on these features (CUDA, Triton, fp16/bf16/fp32)."""
    return triton is not None and feats.is_cuda and feats.dtype in _SUPPORTED_DTYPES


@dataclass(frozen=True)
class KernelConfig:
    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


RULES = ("base", "wide", "uniform")
_rule = {"name": "base"}


@contextlib.contextmanager
def use_config_rule(name: str) -> Iterator[None]:
    """Context manager: :func:`kernel_config` by rule ``name`` (one of :data:`RULES`; A/B runs)."""
    if name not in RULES:
        raise ValueError(f"unknown conv config rule {name!r}; known: {RULES}")
    previous = _rule["name"]
    _rule["name"] = name
    try:
        yield
    finally:
        _rule["name"] = previous


# Conv forms (what the launch does beyond a plain submanifold conv): ``child`` computes only the existing
# children of a subdivision (C2S conv1), ``skip`` adds the skip connection in its epilogue (C2S conv2).
CONV_FORMS = ("plain", "child", "skip")


def kernel_config(in_channels: int, out_channels: int, dtype: torch.dtype, form: str = "plain") -> KernelConfig:
    """Block sizes by rule (measured on an H100, benchmarks/results/perf_conv_sweep.log).

    ``base``: BN covers the output channels up to 128 (one gather per 128 outputs), BK the input
    channels up to 64; fp32 halves BK (twice the bytes per element). ``wide``: BN 256 for half
    precision from 256 output channels on (twice the multiplies per weight byte read). ``uniform``:
    every form as a plain conv (the rule before the forms had their own; the A/B baseline).
    ``form`` (one of :data:`CONV_FORMS`): in half precision the ``child`` and ``skip`` launches take 4
    warps and 4 stages, same tiles: each of the 1024 decoder's was 1.1-1.5x faster so (H100, every size;
    14 ms of its 129 ms of convs, benchmarks/results/session9). Plain convs keep 8 warps and 3 stages,
    their fastest there.
    """
    if form not in CONV_FORMS:
        raise ValueError(f"unknown conv form {form!r}; known: {CONV_FORMS}")
    bn = 128 if out_channels > 64 else max(16, _next_pow2(out_channels))
    if _rule["name"] == "wide" and out_channels >= 256 and dtype != torch.float32:
        bn = 256
    bk_max = 32 if dtype == torch.float32 else 64
    bk = min(bk_max, max(16, _next_pow2(in_channels)))
    if form != "plain" and dtype != torch.float32 and _rule["name"] != "uniform":
        return KernelConfig(BM=128, BN=bn, BK=bk, num_warps=4, num_stages=4)
    warps = 8 if bn >= 128 else 4
    return KernelConfig(BM=128, BN=bn, BK=bk, num_warps=warps, num_stages=3)


@dataclass
class TileLayout:
    """Rows regrouped by neighbour pattern, for one ``BM``.

    Attributes:
        bm: rows per tile. num_tiles: T = ceil(N / bm).
        rows: ``[N]`` int32, original row of each sorted position.
        nbr: ``[K, N]`` int32, ``nbr[v, p]`` = neighbour v of row ``rows[p]`` (N = missing).
        offsets: ``[T, K]`` int32, per tile the offsets some row of it has, ascending, then padding.
        counts: ``[T]`` int32, how many entries of ``offsets`` are real.
    """

    bm: int
    num_tiles: int
    rows: torch.Tensor
    nbr: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor

    @property
    def mean_active_offsets(self) -> float:
        """Mean offsets visited per tile (host sync; for benchmarks and logs)."""
        return float(self.counts.float().mean()) if self.num_tiles else 0.0


def tile_layout(nbr: torch.Tensor, bm: int, sort_rows: bool = True) -> TileLayout:
    """Build the :class:`TileLayout` of a neighbour map ``nbr [N, K]`` (missing = N).

    ``sort_rows=False`` keeps the original row order (tiles then visit nearly every offset).
    Temporaries stay at ``[N]`` ints apart from the ``[K, N]`` result (no ``[N, K]`` int64 masks).
    """
    N, K = nbr.shape
    device = nbr.device
    T = -(-N // bm)
    if sort_rows and K <= 31:
        order = torch.sort(pattern_bits(nbr), stable=True).indices
    else:  # kernels larger than 3 (K > 31 bits) keep the row order
        order = torch.arange(N, device=device)
    rows = order.to(torch.int32)
    nbr_sorted = torch.index_select(nbr.t(), 1, order).to(torch.int32)  # [K, N]
    present = torch.zeros(T * bm, dtype=torch.bool, device=device)
    active = torch.empty(T, K, dtype=torch.bool, device=device)
    for v in range(K):
        present[:N] = nbr_sorted[v] < N
        active[:, v] = present.view(T, bm).any(1)
    counts = active.sum(1).to(torch.int32)
    offsets = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
    return TileLayout(bm, T, rows, nbr_sorted, offsets.contiguous(), counts)


@dataclass
class ChildTileLayout:
    """Tiles of the existing children of a channel-to-space conv (:func:`conv_children_implicit_gemm`).

    Child i is block ``slot_i`` of parent row ``parent_i`` (``src_i = parent_i * S + slot_i``). Children
    are grouped by slot (a tile multiplies one slot's weight block) and, within a slot, sorted by
    their parent's neighbour pattern; each slot's group starts on a new tile (padding rows between);
    the tiles of the slots may be interleaved (see :func:`child_tile_layout`).

    Attributes:
        bm: rows per tile. num_tiles: T (an upper bound: ``ceil(M / bm) + S - 1``; spare tiles are empty).
        rows: ``[T * bm]`` int32, child row of each position (M = padding).
        parents: ``[T * bm]`` int32, parent row of each position (N = padding).
        slots: ``[T]`` int32, the slot (weight block) of each tile.
        offsets: ``[T, K]`` int32 and counts: ``[T]`` int32, as in :class:`TileLayout` (OR of the
            tile's parent patterns).
    """

    bm: int
    num_tiles: int
    rows: torch.Tensor
    parents: torch.Tensor
    slots: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor


def pattern_bits(nbr: torch.Tensor) -> torch.Tensor:
    """``[N]`` int32: bit v set where neighbour v of the row exists (``nbr [N, K]``, K <= 31)."""
    N, K = nbr.shape
    bits = torch.zeros(N, dtype=torch.int32, device=nbr.device)
    for v in range(K):
        bits |= (nbr[:, v] < N).to(torch.int32) << v
    return bits


def child_tile_layout(nbr: torch.Tensor, bits: Optional[torch.Tensor], src: torch.Tensor, bm: int,
                      num_slots: int = 8, tile_flags=None, interleave: bool = True) -> ChildTileLayout:
    """The :class:`ChildTileLayout` of children ``src [M]`` (``parent * num_slots + slot``) of the
    rows of the neighbour map ``nbr [N, K]`` (K <= 27), with the rows' pattern ``bits [N]`` (None:
    computed here). ``tile_flags``: a function ``(parents, bits, N, K, bm) -> (offsets, counts)``
    (the Triton one of :mod:`.neighbour_triton`); None: PyTorch ops. ``interleave``: tiles ordered by
    their relative position in their slot's group (tile j of each slot side by side, so programs
    running together gather the same parents' neighbours), else slot-major. No host sync."""
    N, K = nbr.shape
    if K > 27:
        raise ValueError(f"child_tile_layout: kernels up to 3x3x3 (K <= 27), got K={K}")
    M = src.shape[0]
    device = nbr.device
    if bits is None:
        bits = pattern_bits(nbr)
    src = src.long()
    parent, slot = src // num_slots, src % num_slots
    order = torch.sort((slot << K) | bits[parent].long(), stable=True).indices  # slot-major, then pattern
    per_slot = torch.bincount(slot, minlength=num_slots)
    tiles = (per_slot + bm - 1) // bm
    tile_end = torch.cumsum(tiles, 0)
    first = torch.cumsum(per_slot, 0) - per_slot  # sorted index of each slot's first child
    s_sorted = slot[order]
    pos = (tile_end - tiles)[s_sorted] * bm + torch.arange(M, device=device) - first[s_sorted]
    T = -(-M // bm) + num_slots - 1
    rows = torch.full((T * bm,), M, dtype=torch.int32, device=device)
    rows[pos] = order.to(torch.int32)
    parents = torch.full((T * bm,), N, dtype=torch.int32, device=device)
    parents[pos] = parent[order].to(torch.int32)
    tile = torch.arange(T, device=device)
    slots = torch.searchsorted(tile_end, tile, right=True).clamp_(max=num_slots - 1)
    if interleave:  # tile j of every slot's group side by side: their parents overlap (L2 reuse of gathers)
        frac = (tile - (tile_end - tiles)[slots] + 0.5) / tiles[slots].clamp(min=1)
        perm = torch.sort(torch.where(tile < tile_end[-1], frac, 2.0), stable=True).indices
        rows, parents, slots = rows.view(T, bm)[perm].view(-1), parents.view(T, bm)[perm].view(-1), slots[perm]
    if tile_flags is not None:
        offsets, counts = tile_flags(parents, bits, N, K, bm)
    else:
        padded = torch.cat([bits, bits.new_zeros(1)])[parents.long()].view(T, bm)  # padding: no neighbours
        active = torch.stack([((padded >> v) & 1).any(1) for v in range(K)], 1)
        counts = active.sum(1).to(torch.int32)
        offsets = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices.to(torch.int32).contiguous()
    return ChildTileLayout(bm, T, rows, parents, slots.to(torch.int32), offsets, counts)


if triton is not None:

    @triton.jit(do_not_specialize=["N", "P", "M", "skip_c", "repeat"])  # counts vary per call: no recompiles
    def _subm_conv_kernel(
        feats_ptr, w_ptr, bias_ptr, out_ptr,
        nbr_ptr, rows_ptr, offs_ptr, cnt_ptr,
        par_ptr, slot_ptr, skip_ptr, skip_idx_ptr,
        N, Ci, Co, P, M, skip_c, repeat,
        K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, CHILD: tl.constexpr, SKIP: tl.constexpr,
    ):
        """One ``BM x BN`` output tile. Plain (CHILD off): position p of the tile layout is row
        ``rows[p]`` and its neighbour v is ``nbr[v, p]`` (``[K, P]``). CHILD: position p is child
        ``rows[p]`` of parent ``par[p]`` (N = padding), neighbour v is ``nbr[par[p], v]`` (``[N, K]``),
        and the tile uses weight/bias block ``slot[tile]`` (``Co`` rows each). Output has M rows.
        SKIP: adds ``skip[skip_idx[row], col // repeat]`` (``skip_c`` columns) before rounding."""
        # one grid axis (a second one stops at 65535 tiles, 8.4M rows at BM 128); the column tiles of
        # one row tile are consecutive programs and run together (L2 reuse of the gathered rows)
        n_col = tl.cdiv(Co, BN)
        pid = tl.program_id(0)
        pid_m = pid // n_col
        pid_n = pid - pid_m * n_col
        pos = pid_m * BM + tl.arange(0, BM)
        if CHILD:
            par = tl.load(par_ptr + pos)  # the child layout is padded to whole tiles
            in_range = par < N
            nbr_row = par.to(tl.int64) * K
            block = tl.load(slot_ptr + pid_m).to(tl.int64)
        else:
            in_range = pos < N  # the last tile is partial
            block = 0
        cols = pid_n * BN + tl.arange(0, BN)
        col_ok = cols < Co
        kk = tl.arange(0, BK)
        n_kc = tl.cdiv(Ci, BK)
        count = tl.load(cnt_ptr + pid_m)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        # weight [S*Co, K, Ci]: column n of block s starts at (s*Co + n)*K*Ci
        w_cols = (block * Co + cols.to(tl.int64))[None, :] * (K * Ci)
        for it in range(0, count * n_kc):
            i = it // n_kc
            kc = it - i * n_kc
            v = tl.load(offs_ptr + pid_m * K + i)
            if CHILD:
                src = tl.load(nbr_ptr + nbr_row + v, mask=in_range, other=N)
            else:
                src = tl.load(nbr_ptr + v * P + pos, mask=in_range, other=N)
            present = src < N
            ks = kc * BK + kk
            k_ok = ks < Ci
            a = tl.load(feats_ptr + src.to(tl.int64)[:, None] * Ci + ks[None, :],
                        mask=present[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + w_cols + (v * Ci + ks)[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + block * Co + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        rows = tl.load(rows_ptr + pos, mask=in_range, other=M)
        row_ok = rows < M
        if SKIP:
            s_row = tl.load(skip_idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            acc += tl.load(skip_ptr + s_row[:, None] * skip_c + (cols // repeat)[None, :],
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        ptrs = out_ptr + rows.to(tl.int64)[:, None] * Co + cols[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


if triton is not None:
    _conv_launch = TritonLauncher(_subm_conv_kernel)


def _grid(Co: int, cfg, num_tiles: int) -> int:
    """Programs on the one grid axis, ``cdiv(Co, BN) x num_tiles``, column tiles fastest: the order
    ``_subm_conv_kernel`` derives ``(pid_m, pid_n)`` from (a second axis stops at 65535 tiles)."""
    return triton.cdiv(Co, cfg.BN) * num_tiles


def conv_implicit_gemm(
    feats: torch.Tensor,
    layout: TileLayout,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    config: Optional[KernelConfig] = None,
    skip: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """feats ``[N, Ci]`` (CUDA), weight ``[Co, k, k, k, Ci]`` and bias ``[Co]`` in feats' dtype,
    layout from :func:`tile_layout` -> ``[N, Co]`` in feats' dtype (fp32 accumulation; fp32 inputs
    multiply in full fp32, no TF32).

    ``skip = (table [R, c], index [N])``: also adds ``table[index[n], j // (Co // c)]`` to output
    column j of row n before the one rounding (``Co % c == 0``; the channel-to-space skip)."""
    check_no_grad("conv_implicit_gemm", feats, weight, bias)  # autograd: conv._ImplicitConv
    N, Ci = feats.shape
    Co = weight.shape[0]
    K = layout.nbr.shape[0]
    cfg = config or kernel_config(Ci, Co, feats.dtype, "plain" if skip is None else "skip")
    if cfg.BM != layout.bm:
        raise ValueError(f"tile layout was built for BM={layout.bm}, kernel config has BM={cfg.BM}")
    out = torch.empty(N, Co, dtype=feats.dtype, device=feats.device)
    if N == 0 or Co == 0:
        return out
    table, index, skip_c, repeat = _skip_args(skip, N, Co, out)
    P = layout.nbr.shape[1]
    _conv_launch(
        _grid(Co, cfg, layout.num_tiles),
        [feats.contiguous(), weight.contiguous(), bias if bias is not None else weight, out,
         layout.nbr, layout.rows, layout.offsets, layout.counts,
         layout.rows, layout.counts, table, index,
         N, Ci, Co, P, N, skip_c, repeat],
        (Ci, Co, in_int32(N * max(Ci, Co), P * K)),
        _conv_constexprs(K, cfg, bias is not None, feats.dtype, child=False, skip=skip is not None),
        cfg.num_warps, cfg.num_stages,
    )
    return out


def _conv_constexprs(K: int, cfg, has_bias: bool, dtype: torch.dtype, child: bool, skip: bool) -> dict:
    """``_subm_conv_kernel``'s constexprs, in its parameter order."""
    return {"K": K, "BM": cfg.BM, "BN": cfg.BN, "BK": cfg.BK, "HAS_BIAS": has_bias,
            "IEEE": dtype == torch.float32, "CHILD": child, "SKIP": skip}


def _skip_args(skip, rows: int, Co: int, out: torch.Tensor):
    """``(table, index, c, repeat)`` kernel arguments of ``skip`` (placeholders when None)."""
    if skip is None:
        return out, out, 1, 1
    table, index = skip
    c = table.shape[1]
    if table.dim() != 2 or table.stride(1) != 1 or Co % c or index.shape != (rows,):
        raise ValueError(f"conv skip: table [R, c] (Co={Co} a multiple of c, contiguous rows) and index "
                         f"[{rows}] needed, got {tuple(table.shape)} / {tuple(index.shape)}")
    if table.dtype != out.dtype:
        raise ValueError(f"conv skip: table dtype {table.dtype} differs from the output's {out.dtype}")
    return table.contiguous(), index.contiguous(), c, Co // c


def conv_children_implicit_gemm(
    feats: torch.Tensor,
    nbr: torch.Tensor,
    layout: ChildTileLayout,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    num_children: int,
    num_slots: int = 8,
    config: Optional[KernelConfig] = None,
) -> torch.Tensor:
    """Only the existing children's blocks of a channel-to-space conv.

    feats ``[N, Ci]``, ``nbr [N, K]`` (the map the layout was built from), weight
    ``[S * Co, k, k, k, Ci]`` and bias ``[S * Co]`` (block s = child slot s), layout from
    :func:`child_tile_layout` (same ``num_slots`` S) -> ``[M, Co]`` (M = ``num_children``): row i equals block ``slot_i`` of
    the full conv's output row ``parent_i``, i.e. ``conv(x).view(N * S, Co)[src_i]``, computed without
    the absent children's blocks (same fp32 accumulation, one rounding).
    """
    check_no_grad("conv_children_implicit_gemm", feats, weight, bias)
    N, Ci = feats.shape
    K = nbr.shape[1]
    if weight.shape[0] % num_slots:
        raise ValueError(f"conv_children_implicit_gemm: weight rows {weight.shape[0]} not a multiple of {num_slots} slots")
    Co = weight.shape[0] // num_slots
    cfg = config or kernel_config(Ci, Co, feats.dtype, "child")
    if cfg.BM != layout.bm:
        raise ValueError(f"child tile layout was built for BM={layout.bm}, kernel config has BM={cfg.BM}")
    out = torch.empty(num_children, Co, dtype=feats.dtype, device=feats.device)
    if num_children == 0 or N == 0:
        return out
    _conv_launch(
        _grid(Co, cfg, layout.num_tiles),
        [feats.contiguous(), weight.contiguous(), bias if bias is not None else weight, out,
         nbr.contiguous(), layout.rows, layout.offsets, layout.counts,
         layout.parents, layout.slots, out, out,
         N, Ci, Co, N, num_children, 1, 1],
        (Ci, Co, in_int32(N * max(Ci, Co), N * K, num_children * Co)),
        _conv_constexprs(K, cfg, bias is not None, feats.dtype, child=True, skip=False),
        cfg.num_warps, cfg.num_stages,
    )
    return out
