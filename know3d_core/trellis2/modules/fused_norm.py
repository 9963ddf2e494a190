"""Row LayerNorm with fp32 statistics and an optional SiLU, one pass (Triton on CUDA).

:func:`layer_norm_act` replaces the decoder's ``LayerNorm32`` chain ``x.float() -> layer_norm ->
.to(x.dtype) -> silu`` (four full passes and two fp32 copies) with one kernel that reads each row
once (optionally through a row index, i.e. a fused gather), computes mean/variance in fp32, applies
the affine weight/bias and SiLU in fp32 and rounds once to the output dtype. Output may alias the
input (in place) when no index is given.

CUDA tensors take the kernel when :func:`.fused.fused_enabled` says so (Triton present, switch on)
and no gradient is needed (the kernel has no backward: :mod:`know3d_core.sparse.kernel_dispatch`);
everything else runs the PyTorch ops in row chunks (bounded fp32 temporaries), rounding like the
reference (LayerNorm rounded to the input dtype, then SiLU in that dtype). The kernel uses only
portable ``tl`` ops, so it also runs under Triton's CPU interpreter (``TRITON_INTERPRET=1``).

:func:`layer_norm_linear_triton` is the decoders' head in one pass: the non-affine fp32 LayerNorm
of each row and a small fp32 linear layer (``[C] -> [O]``, O = 7 for the shape decoder) on it, so
that the normalised rows never go to memory in fp32 (the PyTorch path writes and reads them:
~0.9 ms of cuBLAS on 4.9 M rows of the 1024 decoder, H100 profile of session 6). Checked on CUDA (H200);
off by default: no gain measured (``HEAD_BY_DEFAULT``, :func:`set_fused_head`, :func:`use_fused_head`).
"""
from __future__ import annotations

from typing import ContextManager, Optional

import torch
import torch.nn.functional as F

from ...sparse.kernel_dispatch import KernelSwitch, check_no_grad, use_kernel
from .fused import fused_enabled

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

__all__ = ["layer_norm_act", "layer_norm_act_triton", "TORCH_CHUNK_ROWS", "head_kernel_ok", "layer_norm_linear_triton",
           "use_fused_head", "set_fused_head", "HEAD_BY_DEFAULT"]

TORCH_CHUNK_ROWS = 1 << 18
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TILE_ELEMENTS = 4096  # rows per program = this / padded channels (C=64: 64 rows, C=1024: 4 rows)


if triton is not None:

    @triton.jit
    def _normalise_rows(x, ok, C, eps):
        """``[BLOCK_R, BLOCK_C]`` fp32 rows (masked entries 0) -> non-affine LayerNorm of each row over ``C``."""
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(ok, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
        return xc * rstd[:, None]

    # The flags are run-time ints (not constexpr, not specialised) and absent tensors are passed as
    # placeholders of the dtypes the real ones have (int32 index, fp32 affine): one compiled kernel
    # per channel width and dtype pair serves every call site (the shape decoder compiles 6, not 13).
    @triton.jit(do_not_specialize=["n_rows", "HAS_INDEX", "AFFINE", "SILU"])
    def _layer_norm_act_kernel(
        x_ptr, idx_ptr, w_ptr, b_ptr, out_ptr,
        n_rows, C, x_stride, out_stride, eps,
        HAS_INDEX, AFFINE, SILU,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < n_rows
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        dst = rows.to(tl.int64)
        if HAS_INDEX != 0:
            src = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            src = dst
        x = tl.load(x_ptr + src[:, None] * x_stride + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        y = _normalise_rows(x, ok, C, eps)
        if AFFINE != 0:
            w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = y * w[None, :] + b[None, :]
        if SILU != 0:
            e = tl.exp(-tl.abs(y))  # sigmoid without overflow for either sign
            y = y * tl.where(y >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        tl.store(out_ptr + dst[:, None] * out_stride + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


def _check_args(x, weight, bias, index, out, out_dtype):
    if x.dim() != 2:
        raise ValueError(f"layer_norm_act needs x [M, C], got {tuple(x.shape)}")
    C = x.shape[1]
    if (weight is None) != (bias is None):
        raise ValueError("layer_norm_act: give both weight and bias [C] or neither")
    if weight is not None and (weight.shape != (C,) or bias.shape != (C,)):
        raise ValueError(f"layer_norm_act: weight/bias must be [{C}], got {tuple(weight.shape)} / {tuple(bias.shape)}")
    rows = x.shape[0] if index is None else index.shape[0]
    if index is not None and (index.dim() != 1 or index.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"layer_norm_act: index must be int32/int64 [N'], got {index.dtype} {tuple(index.shape)}")
    if out is None:
        out = torch.empty(rows, C, dtype=out_dtype or x.dtype, device=x.device)
    elif out.shape != (rows, C) or (out_dtype is not None and out.dtype != out_dtype):
        raise ValueError(f"layer_norm_act: out must be [{rows}, {C}] {out_dtype or ''}, got {out.dtype} {tuple(out.shape)}")
    elif index is not None and out.data_ptr() == x.data_ptr():
        raise ValueError("layer_norm_act: out may alias x only without an index")
    return out


def layer_norm_act(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    silu: bool = False,
    index: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``silu?(LayerNorm(x[index]) * weight + bias)`` over the last dim, fp32 statistics.

    Args:
        x: ``[M, C]`` (rows may be strided, channels contiguous).
        weight, bias: ``[C]`` affine parameters (any float dtype; used in fp32), or both None.
        index: ``[N']`` int32/int64 rows of ``x`` to normalise (None: all ``M`` rows, ``N' = M``).
        out: ``[N', C]`` destination (may be ``x`` itself when ``index`` is None), else a new tensor
            of ``out_dtype`` (default ``x.dtype``).
    Returns:
        ``[N', C]`` (``out`` when given).
    """
    out = _check_args(x, weight, bias, index, out, out_dtype)
    device_ok = fused_enabled(x) and x.dtype in _KERNEL_DTYPES and out.dtype in _KERNEL_DTYPES
    if use_kernel(device_ok, False, x, weight, bias):  # no backward: autograd takes the PyTorch ops
        return layer_norm_act_triton(x, weight, bias, eps, silu, index, out)
    return _layer_norm_act_torch(x, weight, bias, eps, silu, index, out)


def _layer_norm_act_torch(x, weight, bias, eps, silu, index, out):
    """PyTorch ops in row chunks: fp32 LayerNorm rounded to ``out``'s dtype, then SiLU."""
    C = x.shape[1]
    for start in range(0, out.shape[0], TORCH_CHUNK_ROWS):
        rows = slice(start, start + TORCH_CHUNK_ROWS)
        src = x[rows] if index is None else x[index[rows]]
        y = F.layer_norm(src.float(), (C,), None if weight is None else weight.float(),
                         None if bias is None else bias.float(), eps).to(out.dtype)
        out[rows] = F.silu(y) if silu else y
    return out


def layer_norm_act_triton(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    silu: bool,
    index: Optional[torch.Tensor],
    out: torch.Tensor,
) -> torch.Tensor:
    """The Triton kernel on any device Triton runs on (CUDA, or CPU tensors under the interpreter);
    arguments as :func:`layer_norm_act` with ``out`` given."""
    if triton is None:
        raise RuntimeError("layer_norm_act_triton needs Triton")
    check_no_grad("layer_norm_act_triton", x, weight, bias)
    if x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("layer_norm_act_triton needs contiguous channels in x and out")
    n_rows, C = out.shape
    if n_rows == 0:
        return out
    if index is not None and not index.is_contiguous():
        index = index.contiguous()
    block_c = triton.next_power_of_2(C)
    block_r = max(1, _TILE_ELEMENTS // block_c)
    affine, has_index = weight is not None, index is not None
    if not has_index:
        index = _placeholder(x.device, torch.int32)
    if not affine:
        weight = bias = _placeholder(x.device, torch.float32)
    _layer_norm_act_kernel[(triton.cdiv(n_rows, block_r),)](
        x, index, weight, bias, out,
        n_rows, C, x.stride(0), out.stride(0), float(eps),
        int(has_index), int(affine), int(bool(silu)),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4 if block_c <= 4096 else 8,
    )
    return out


_PLACEHOLDERS: dict = {}


def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small tensor standing in for an absent argument (never read by the kernel)."""
    key = (str(device), dtype)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = torch.zeros(16, dtype=dtype, device=device)
    return _PLACEHOLDERS[key]


# Off: no gain measured (H100, session 9, bench_neighbour_map.py --enable head against torch_head: decoder
# 86.2 / 181.7 ms against 85.6 / 182.2 ms at 512 / 1024). Its CUDA tests passed on an H200 (session 8).
HEAD_BY_DEFAULT = False
_head_switch = KernelSwitch(HEAD_BY_DEFAULT)
_HEAD_MAX_OUT = 16


def set_fused_head(enabled: bool) -> None:
    """Switch the one-pass head on or off for the rest of the process (see ``HEAD_BY_DEFAULT``)."""
    _head_switch.set(enabled)


def use_fused_head(enabled: bool) -> ContextManager[None]:
    """Context manager: the decoders' head as :func:`layer_norm_linear_triton` (where it runs) or
    LayerNorm then ``addmm``, inside the block."""
    return _head_switch.use(enabled)


def head_kernel_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The head kernel may run: fused kernels on here (CUDA, Triton, switch), the head switch on, a
    kernel dtype, contiguous channels, at most 16 outputs, and no gradient needed."""
    return (_head_switch.enabled and fused_enabled(x) and x.dtype in _KERNEL_DTYPES and x.dim() == 2
            and x.stride(1) == 1 and weight.dim() == 2 and weight.shape[0] <= _HEAD_MAX_OUT
            and use_kernel(True, False, x, weight))


if triton is not None:

    @triton.jit(do_not_specialize=["n_rows"])
    def _layer_norm_linear_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, n_rows, C, x_stride, eps,
        O: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < n_rows
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)
        x = tl.load(x_ptr + r64[:, None] * x_stride + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        y = _normalise_rows(x, ok, C, eps)
        for o in tl.static_range(O):
            w = tl.load(w_ptr + o * C + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc = tl.sum(y * w[None, :], axis=1) + tl.load(b_ptr + o).to(tl.float32)
            tl.store(out_ptr + r64 * O + o, acc, mask=row_ok)


def layer_norm_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.linear(LayerNorm(x.float()), weight, bias)`` (non-affine LayerNorm, fp32 statistics and
    products) in one Triton pass: ``x [N, C]`` (contiguous channels) -> ``[N, O]`` fp32, with
    ``weight [O, C]`` and ``bias [O]`` (used in fp32, O <= 16). Same values as the PyTorch path up to
    fp32 summation order. Runs where Triton runs (CUDA, or CPU tensors under the interpreter)."""
    if triton is None:
        raise RuntimeError("layer_norm_linear_triton needs Triton")
    check_no_grad("layer_norm_linear_triton", x, weight, bias)
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"layer_norm_linear_triton needs x [N, C] with contiguous channels, got {tuple(x.shape)}")
    n, C = x.shape
    O = weight.shape[0]
    if weight.shape != (O, C) or bias.shape != (O,) or O > _HEAD_MAX_OUT:
        raise ValueError(f"layer_norm_linear_triton: weight [O <= {_HEAD_MAX_OUT}, {C}] and bias [O] wanted, got "
                         f"{tuple(weight.shape)} / {tuple(bias.shape)}")
    out = torch.empty(n, O, dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    block_c = triton.next_power_of_2(C)
    block_r = max(1, _TILE_ELEMENTS // block_c)
    _layer_norm_linear_kernel[(triton.cdiv(n, block_r),)](
        x, weight.float().contiguous(), bias.float().contiguous(), out, n, C, x.stride(0), float(eps),
        O=O, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out
