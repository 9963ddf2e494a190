"""The shape decoder's ConvNeXt tail in one pass: ``x + fc2(silu(fc1(LayerNorm(h))))`` (Triton on CUDA).

:func:`convnext_mlp_` replaces the chain the ConvNeXt block ran after its conv: LayerNorm (fp32
statistics, rounded to the body dtype), ``fc1`` (C -> 4C), SiLU, ``fc2`` (4C -> C) and the residual
add. As PyTorch ops that is five kernels, and the ``[N, 4C]`` hidden activation goes through memory
four times (written by ``fc1``, read and written by SiLU, read by ``fc2``): the H100 profile of the
1024 decoder had 17 ms of SiLU and residual adds beside 22 ms of GEMMs (session5/NOTES.md).

The kernel keeps a tile of ``BM`` rows on chip, the way flash attention keeps its scores: LayerNorm
of the conv output rows (same formula as :func:`.fused_norm.layer_norm_act`, rounded to the body
dtype), then for each ``BH``-wide slice of the hidden layer ``z = silu(a @ W1[j]^T + b1[j])`` (fp32,
rounded once to the body dtype for the tensor cores) and ``acc += z @ W2[:, j]^T``; finally
``acc + b2 + x`` rounded once. Memory per block: read ``h`` and ``x``, write the result (in place
over ``h``); the hidden layer never leaves the chip. Rounding differs from the PyTorch path (which
rounds after ``fc1``, after SiLU, after ``fc2`` and after the add) by a few units of the body dtype.

Switches: ``ENABLED_BY_DEFAULT`` (on, measured), :func:`set_fused_mlp`, :func:`use_fused_mlp`. Runs where :func:`.fused.fused_enabled` holds, the dtype is fp16/bf16, no input needs a gradient
(no backward: :mod:`know3d_core.sparse.kernel_dispatch`) and ``C`` has a configuration in
:data:`MLP_CONFIGS`; elsewhere the PyTorch ops in row chunks. A failing launch (compiler/driver
errors vary) is logged once and the process keeps to the PyTorch ops. The kernel uses portable
``tl`` ops only, so it also runs under Triton's CPU interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import logging
from typing import ContextManager, Dict, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...sparse.kernel_dispatch import KernelSwitch, check_no_grad, use_kernel
from .fused import fused_enabled
from .fused_norm import layer_norm_act

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

__all__ = ["MlpConfig", "Fc2Config", "MLP_CONFIGS", "FC2_CONFIGS", "SWEEP_CONFIGS", "convnext_mlp_",
           "convnext_mlp_chunks_", "convnext_mlp_triton", "silu_linear_residual_triton", "mlp_kernel_ok",
           "fc2_kernel_ok", "use_fused_mlp", "set_fused_mlp", "ENABLED_BY_DEFAULT"]

_log = logging.getLogger(__name__)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


class MlpConfig(NamedTuple):
    """Rows per program, hidden slice width, warps, software pipeline stages."""
    BM: int
    BH: int
    warps: int
    stages: int


# Per channel width C (hidden 4C): the fastest of the H100 sweep (session6/NOTES.md; 1.24M rows at 128:
# 1.135 ms vs 2.714 ms as PyTorch ops, 350k rows at 256: 1.111 vs 1.545 ms). Widths not measured (64)
# keep the PyTorch ops; 512 / 1024 too: their whole-tail forms were 3x slower (a [64, 512] fp32
# accumulator), see FC2_CONFIGS for the other form.
MLP_CONFIGS: Dict[int, MlpConfig] = {
    128: MlpConfig(128, 32, 4, 3),
    256: MlpConfig(128, 32, 8, 3),
}


class Fc2Config(NamedTuple):
    """Tile of the SiLU-prologue GEMM: rows, output columns, K slice, warps, pipeline stages."""
    BM: int
    BN: int
    BK: int
    warps: int
    stages: int


# Widths without a fused-tail configuration keep cuBLAS for fc1 and run ``fc2`` as a Triton GEMM that
# applies SiLU to the hidden tile as it loads it and adds bias and residual in its epilogue: the SiLU
# pass over ``[N, 4C]`` and the residual add disappear (same rounding of the SiLU input as the PyTorch
# ops: fc1's fp16 output, SiLU in fp32 rounded to fp16).
# Empty by default: on the H100 the form gained 3 % of the tail at 512 (0.957 vs 0.988 ms a block) and
# lost 13 % at 1024 (0.803 vs 0.712), while its compile was the longest job of a first call (1.4 s).
FC2_CONFIGS: Dict[int, Fc2Config] = {}
FC2_SWEPT = Fc2Config(128, 256, 64, 8, 3)  # the configuration those figures are for
# The configurations benchmarks/bench_neighbour_map.py --mlp-sweep times against the defaults (and the
# CUDA tests check), per C; each fits the H100's 227 KiB of shared memory per block with room to
# spare (fused tail: the [BM, C] input tile plus STAGES copies of the [C, BH] and [BH, C] weight
# slices; fc2 GEMM: STAGES copies of the [BM, BK] and [BK, BN] tiles).
SWEEP_CONFIGS: Dict[int, tuple] = {
    128: (MlpConfig(64, 64, 4, 2), MlpConfig(128, 64, 8, 2), MlpConfig(128, 128, 8, 2)),
    256: (MlpConfig(64, 64, 4, 2), MlpConfig(64, 64, 8, 2), MlpConfig(128, 64, 8, 2)),
    512: (MlpConfig(64, 32, 8, 2), MlpConfig(64, 64, 8, 1), FC2_SWEPT, Fc2Config(128, 128, 64, 8, 4),
          Fc2Config(128, 128, 64, 4, 4)),
    1024: (FC2_SWEPT, Fc2Config(128, 128, 64, 8, 4)),
}
_failed: list = []
# On: the H100 run of session 6 (benchmarks/results/session6/NOTES.md) timed the decoder 512 / 1024 at
# 81.3 / 179.1 ms with these kernels against 84.4 / 190.0 ms without, same process.
# ``benchmarks/bench_neighbour_map.py --mlp-sweep --mlp-adopt`` repeats that measurement.
ENABLED_BY_DEFAULT = True
_switch = KernelSwitch(ENABLED_BY_DEFAULT)


def set_fused_mlp(enabled: bool) -> None:
    """Switch the fused MLP kernels on or off for the rest of the process (see ``ENABLED_BY_DEFAULT``)."""
    _switch.set(enabled)


def use_fused_mlp(enabled: bool) -> ContextManager[None]:
    """Context manager: the fused MLP kernel on or off inside the block (A/B runs; the other fused
    kernels keep their own switch, :func:`.fused.use_fused_kernels`, which also turns this one off)."""
    return _switch.use(enabled)


if triton is not None:

    @triton.jit(do_not_specialize=["n_rows"])
    def _convnext_mlp_kernel(
        h_ptr, x_ptr, out_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
        n_rows, h_stride, x_stride, out_stride, eps,
        C: tl.constexpr, H: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, STAGES: tl.constexpr,
    ):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        row_ok = rows < n_rows
        r = rows.to(tl.int64)
        cols = tl.arange(0, C)
        v = tl.load(h_ptr + r[:, None] * h_stride + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        mean = tl.sum(v, axis=1) / C
        vc = v - mean[:, None]
        rstd = 1.0 / tl.sqrt(tl.sum(vc * vc, axis=1) / C + eps)
        nw = tl.load(nw_ptr + cols).to(tl.float32)
        nb = tl.load(nb_ptr + cols).to(tl.float32)
        a = (vc * rstd[:, None] * nw[None, :] + nb[None, :]).to(out_ptr.dtype.element_ty)  # [BM, C]
        acc = tl.zeros((BM, C), dtype=tl.float32)
        hid = tl.arange(0, BH)
        for j in tl.range(0, H, BH, num_stages=STAGES):
            w1 = tl.load(w1_ptr + (j + hid)[None, :] * C + cols[:, None])  # [C, BH] = W1[j:j+BH, :]^T
            z = tl.dot(a, w1) + tl.load(b1_ptr + j + hid).to(tl.float32)[None, :]  # [BM, BH] fp32
            z = z / (1.0 + tl.exp(-z))  # SiLU
            w2 = tl.load(w2_ptr + cols[None, :] * H + (j + hid)[:, None])  # [BH, C] = W2[:, j:j+BH]^T
            acc = tl.dot(z.to(a.dtype), w2, acc)
        acc += tl.load(b2_ptr + cols).to(tl.float32)[None, :]
        acc += tl.load(x_ptr + r[:, None] * x_stride + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        tl.store(out_ptr + r[:, None] * out_stride + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])


if triton is not None:

    # N and K are run-time ints (both multiples of 16 at every width): the 512 and 1024 levels of the
    # decoder share one compiled kernel (a first call compiles one variant fewer)
    @triton.jit(do_not_specialize=["n_rows"])
    def _silu_linear_residual_kernel(
        a_ptr, w_ptr, b_ptr, x_ptr, out_ptr, n_rows, a_stride, x_stride, out_stride, N, K,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
    ):
        pid = tl.program_id(0)
        col_tiles = N // BN
        rows = (pid // col_tiles) * BM + tl.arange(0, BM)  # the column tiles of a row tile run side by side
        cols = (pid % col_tiles) * BN + tl.arange(0, BN)
        row_ok = rows < n_rows
        r = rows.to(tl.int64)
        kk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.range(0, K, BK, num_stages=STAGES):
            a = tl.load(a_ptr + r[:, None] * a_stride + (k + kk)[None, :], mask=row_ok[:, None], other=0.0)
            a = a.to(tl.float32)
            a = (a / (1.0 + tl.exp(-a))).to(out_ptr.dtype.element_ty)  # SiLU, rounded as the PyTorch op rounds
            w = tl.load(w_ptr + cols[None, :] * K + (k + kk)[:, None])  # [BK, BN] = W[cols, k:k+BK]^T
            acc = tl.dot(a, w, acc)
        acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
        acc += tl.load(x_ptr + r[:, None] * x_stride + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        tl.store(out_ptr + r[:, None] * out_stride + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])


def _kernel_ok(configs: dict, h: torch.Tensor, params) -> bool:
    """CUDA fp16/bf16 ``h [N, C]``, Triton, switch on, a configuration for C in ``configs``, no gradient
    needed (no backward), no earlier failure of either kernel."""
    device_ok = (_switch.enabled and fused_enabled(h) and h.dtype in _KERNEL_DTYPES and h.dim() == 2
                 and h.shape[1] in configs and not _failed)
    return use_kernel(device_ok, False, h, *params)


def fc2_kernel_ok(h: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    """Whether the PyTorch-path tail runs ``fc2`` (with SiLU and the residual) as the Triton GEMM for
    ``h [N, C]`` (:func:`_kernel_ok` with :data:`FC2_CONFIGS`)."""
    return _kernel_ok(FC2_CONFIGS, h, params)


def mlp_kernel_ok(h: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    """Whether :func:`convnext_mlp_` launches the fused tail for ``h [N, C]`` (:func:`_kernel_ok` with
    :data:`MLP_CONFIGS`)."""
    return _kernel_ok(MLP_CONFIGS, h, params)


def _launched(name: str, launch, *args) -> bool:
    """Run ``launch(*args)``; False, logged once and the PyTorch ops for the rest of the process, where a
    launch fails (compiler/driver errors vary; the torch path still works)."""
    try:
        launch(*args)
        return True
    except Exception as exc:  # noqa: BLE001
        _failed.append(exc)
        _log.warning("Triton %s failed (%s: %s); using the PyTorch ops", name, type(exc).__name__, exc)
        return False


def convnext_mlp_(h: torch.Tensor, norm: nn.LayerNorm, fc1: nn.Linear, fc2: nn.Linear, x: torch.Tensor,
                  chunk_rows: int = 1 << 18) -> torch.Tensor:
    """In place ``h <- x + fc2(silu(fc1(LayerNorm(h))))``; returns ``h``.

    Args:
        h: ``[N, C]`` the block's conv output (overwritten; channels contiguous).
        norm: affine LayerNorm over C (fp32 statistics; output rounded to h's dtype).
        fc1, fc2: ``Linear(C, 4C)`` and ``Linear(4C, C)`` in h's dtype.
        x: ``[N, C]`` the block's input (the residual), not aliasing ``h``.
        chunk_rows: rows per step of the PyTorch path (bounds its ``[rows, 4C]`` hidden temporary).
    """
    if x.shape != h.shape:
        raise ValueError(f"convnext_mlp_: residual {tuple(x.shape)} and h {tuple(h.shape)} differ")
    params = (norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    if h.shape[0] and mlp_kernel_ok(h, x, *params) and _launched(
            "ConvNeXt MLP", convnext_mlp_triton, h, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias,
            fc2.weight, fc2.bias, x, h):
        return h
    fc2_cfg = FC2_CONFIGS[h.shape[1]] if h.shape[0] and fc2_kernel_ok(h, x, fc2.weight, fc2.bias) else None
    return convnext_mlp_chunks_(h, norm, fc1, fc2, x, chunk_rows, fc2_cfg)


def convnext_mlp_chunks_(h, norm, fc1, fc2, x, chunk_rows: int = 1 << 18, fc2_cfg: Optional[Fc2Config] = None):
    """:func:`convnext_mlp_` in row chunks: LayerNorm (fused_norm), ``fc1`` (cuBLAS), then SiLU, ``fc2`` and
    the residual as PyTorch ops (the reference's rounding: after each op) or, with ``fc2_cfg``, as one
    Triton GEMM (:func:`silu_linear_residual_triton`)."""
    for start in range(0, h.shape[0], chunk_rows):
        rows, res = h[start:start + chunk_rows], x[start:start + chunk_rows]
        layer_norm_act(rows, norm.weight, norm.bias, norm.eps, out=rows)
        hidden = F.linear(rows, fc1.weight, fc1.bias)  # [m, 4C]
        if fc2_cfg is not None and _launched("SiLU-GEMM", silu_linear_residual_triton, hidden, fc2.weight, fc2.bias,
                                             res, rows, fc2_cfg):
            continue
        torch.addmm(fc2.bias, F.silu(hidden, inplace=True), fc2.weight.t(), out=rows)
        del hidden
        rows += res
    return h


def silu_linear_residual_triton(a, w, b, x, out, cfg: Optional[Fc2Config] = None):
    """``out = x + silu(a) @ w^T + b`` as one Triton GEMM (CUDA, or CPU tensors under the interpreter).

    a ``[M, K]`` (fc1's output), w ``[N, K]``, b ``[N]``, x and out ``[M, N]`` (out may alias x, not a),
    all one dtype; K a multiple of ``cfg.BK``, N of ``cfg.BN``. ``cfg`` defaults to ``FC2_CONFIGS[N]``.
    """
    if triton is None:
        raise RuntimeError("silu_linear_residual_triton needs Triton")
    check_no_grad("silu_linear_residual_triton", a, w, b, x)
    M, K = a.shape
    N = w.shape[0]
    cfg = cfg or FC2_CONFIGS[N]
    if w.shape != (N, K) or K % cfg.BK or N % cfg.BN or x.shape != (M, N) or out.shape != (M, N):
        raise ValueError(f"silu_linear_residual_triton: need w [N, K] with K % {cfg.BK} == 0 and N % {cfg.BN} == 0, "
                         f"x and out [M, N]; got a {tuple(a.shape)}, w {tuple(w.shape)}, x {tuple(x.shape)}, "
                         f"out {tuple(out.shape)}")
    if not w.is_contiguous() or a.stride(1) != 1 or x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("silu_linear_residual_triton needs a contiguous weight and contiguous channels")
    if M == 0:
        return out
    _silu_linear_residual_kernel[(triton.cdiv(M, cfg.BM) * (N // cfg.BN),)](
        a, w, b, x, out, M, a.stride(0), x.stride(0), out.stride(0), N, K,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, STAGES=cfg.stages, num_warps=cfg.warps,
    )
    return out


def convnext_mlp_triton(h, norm_w, norm_b, eps, w1, b1, w2, b2, x, out, cfg: Optional[MlpConfig] = None):
    """The kernel on any device Triton runs on (CUDA, or CPU tensors under the interpreter).

    h, x, out ``[N, C]`` (``out`` may be ``h``); norm_w/norm_b ``[C]``; w1 ``[H, C]``, b1 ``[H]``,
    w2 ``[C, H]``, b2 ``[C]`` in h's dtype (H a multiple of ``cfg.BH``); C a power of two (>= 16 on a GPU).
    ``cfg`` defaults to ``MLP_CONFIGS[C]``.
    """
    if triton is None:
        raise RuntimeError("convnext_mlp_triton needs Triton")
    check_no_grad("convnext_mlp_triton", h, x, norm_w, norm_b, w1, b1, w2, b2)
    n, C = h.shape
    H = w1.shape[0]
    cfg = cfg or MLP_CONFIGS[C]
    if C & (C - 1) or H % cfg.BH or w1.shape != (H, C) or w2.shape != (C, H):
        raise ValueError(f"convnext_mlp_triton: need C a power of two and H % {cfg.BH} == 0, "
                         f"got h {tuple(h.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if not (w1.is_contiguous() and w2.is_contiguous()) or h.stride(1) != 1 or x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("convnext_mlp_triton needs contiguous weights and contiguous channels")
    if n == 0:
        return out
    _convnext_mlp_kernel[(triton.cdiv(n, cfg.BM),)](
        h, x, out, norm_w, norm_b, w1, b1, w2, b2,
        n, h.stride(0), x.stride(0), out.stride(0), float(eps),
        C=C, H=H, BM=cfg.BM, BH=cfg.BH, STAGES=cfg.stages, num_warps=cfg.warps,
    )
    return out
