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

from dataclasses import dataclass
from typing import Optional

import torch

from .kernel_dispatch import check_no_grad

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

__all__ = ["triton_available", "supports", "kernel_config", "tile_layout", "TileLayout", "conv_implicit_gemm"]

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


def kernel_config(in_channels: int, out_channels: int, dtype: torch.dtype) -> KernelConfig:
    """Block sizes by rule (measured on an H100, benchmarks/results/perf_conv_sweep.log).

    BN covers the output channels up to 128 (one gather per 128 outputs), BK the input channels up
    to 64; fp32 halves BK (twice the bytes per element).
    """
    bn = 128 if out_channels > 64 else max(16, triton.next_power_of_2(out_channels))
    bk_max = 32 if dtype == torch.float32 else 64
    bk = min(bk_max, max(16, triton.next_power_of_2(in_channels)))
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
        bits = torch.zeros(N, dtype=torch.int32, device=device)  # bit v: neighbour v exists
        for v in range(K):
            bits |= (nbr[:, v] < N).to(torch.int32) << v
        order = torch.sort(bits, stable=True).indices
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


if triton is not None:

    @triton.jit(do_not_specialize=["N", "P"])  # voxel counts vary per call: no recompiles
    def _subm_conv_kernel(
        feats_ptr, w_ptr, bias_ptr, out_ptr,
        nbr_ptr, rows_ptr, offs_ptr, cnt_ptr,
        N, Ci, Co, P,
        K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_n = tl.program_id(0)  # fastest: the column tiles of one row tile run together (L2 reuse)
        pid_m = tl.program_id(1)
        pos = pid_m * BM + tl.arange(0, BM)
        in_range = pos < N  # the last tile is partial
        cols = pid_n * BN + tl.arange(0, BN)
        col_ok = cols < Co
        kk = tl.arange(0, BK)
        n_kc = tl.cdiv(Ci, BK)
        count = tl.load(cnt_ptr + pid_m)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        w_cols = cols.to(tl.int64)[None, :] * (K * Ci)  # weight [Co, K, Ci]: column n starts at n*K*Ci
        for it in range(0, count * n_kc):
            i = it // n_kc
            kc = it - i * n_kc
            v = tl.load(offs_ptr + pid_m * K + i)
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
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        rows = tl.load(rows_ptr + pos, mask=in_range, other=N)
        ptrs = out_ptr + rows.to(tl.int64)[:, None] * Co + cols[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < N)[:, None] & col_ok[None, :])


def conv_implicit_gemm(
    feats: torch.Tensor,
    layout: TileLayout,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    config: Optional[KernelConfig] = None,
) -> torch.Tensor:
    """feats ``[N, Ci]`` (CUDA), weight ``[Co, k, k, k, Ci]`` and bias ``[Co]`` in feats' dtype,
    layout from :func:`tile_layout` -> ``[N, Co]`` in feats' dtype (fp32 accumulation; fp32 inputs
    multiply in full fp32, no TF32)."""
    check_no_grad("conv_implicit_gemm", feats, weight, bias)  # autograd: conv._ImplicitConv
    N, Ci = feats.shape
    Co = weight.shape[0]
    K = layout.nbr.shape[0]
    cfg = config or kernel_config(Ci, Co, feats.dtype)
    if cfg.BM != layout.bm:
        raise ValueError(f"tile layout was built for BM={layout.bm}, kernel config has BM={cfg.BM}")
    out = torch.empty(N, Co, dtype=feats.dtype, device=feats.device)
    if N == 0 or Co == 0:
        return out
    feats = feats.contiguous()
    weight = weight.contiguous()
    grid = (triton.cdiv(Co, cfg.BN), layout.num_tiles)
    _subm_conv_kernel[grid](
        feats, weight, bias if bias is not None else weight, out,
        layout.nbr, layout.rows, layout.offsets, layout.counts,
        N, Ci, Co, layout.nbr.shape[1],
        K=K, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, HAS_BIAS=bias is not None,
        IEEE=feats.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
