"""Fused elementwise kernels of the flow DiT blocks (Triton, CUDA only) and the switch for them.

Each kernel replaces a chain of PyTorch ops that each read and write the whole token tensor:
- :func:`layer_norm_modulate`: ``LayerNorm(x) * (offset + mul[g]) + add[g]`` per row, fp32 math,
  one read of x and one write (the block's ``norm1/norm3`` + adaLN modulation, and ``norm2``
  with its affine weight/bias);
- :func:`qk_norm_rope`: per-head RMS norm times gamma, then the RoPE rotation, on queries or
  keys read straight out of the fused qkv projection, one write in ``[.., L, H, D]`` layout.
Both compute in fp32 and round once, where the reference rounds after every op; results agree with
the PyTorch path to bf16/fp16 rounding (tests/test_trellis2_fused.py on CUDA).

:func:`fused_enabled` says whether a tensor takes the fused path (CUDA, Triton importable, and not
switched off with :func:`use_fused_kernels`); everything else runs the PyTorch ops. Kernels compile
at first use (well under a second each) and stay cached in-process.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

__all__ = ["fused_enabled", "use_fused_kernels", "layer_norm_modulate", "qk_norm_rope"]

_state = {"enabled": True}


def fused_enabled(x: torch.Tensor) -> bool:
    """True when ``x`` should take the Triton path (CUDA tensor, Triton present, switch on)."""
    return _state["enabled"] and triton is not None and x.is_cuda


@contextlib.contextmanager
def use_fused_kernels(enabled: bool) -> Iterator[None]:
    """Context manager: switch the fused kernels on or off inside the block (for A/B checks)."""
    previous = _state["enabled"]
    _state["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _state["enabled"] = previous


if triton is not None:

    @triton.jit
    def _ln_modulate_kernel(
        x_ptr, out_ptr, mul_ptr, add_ptr, group_ptr,
        C, rows_per_group, mul_stride, add_stride, eps, offset,
        GROUP_INDEX: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        ok = cols < C
        x = tl.load(x_ptr + row.to(tl.int64) * C + cols, mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / C
        xc = tl.where(ok, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / C + eps)
        if GROUP_INDEX:
            g = tl.load(group_ptr + row)
        else:
            g = row // rows_per_group
        mul = tl.load(mul_ptr + g * mul_stride + cols, mask=ok, other=0.0).to(tl.float32)
        add = tl.load(add_ptr + g * add_stride + cols, mask=ok, other=0.0).to(tl.float32)
        y = xc * rstd * (offset + mul) + add
        tl.store(out_ptr + row.to(tl.int64) * C + cols, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _qk_norm_rope_kernel(
        src_ptr, out_ptr, gamma_ptr, rope_ptr,
        src_row_stride, H, rope_rows, eps,
        HALF_D: tl.constexpr, BLOCK_H: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)[:, None]
        i = tl.arange(0, HALF_D)[None, :]
        ok = (h < H) & (i < HALF_D)
        base = src_ptr + t.to(tl.int64) * src_row_stride + h * (2 * HALF_D) + 2 * i
        x0 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
        x1 = tl.load(base + 1, mask=ok, other=0.0).to(tl.float32)
        if NORM:
            ms = (tl.sum(x0 * x0, axis=1) + tl.sum(x1 * x1, axis=1)) / (2 * HALF_D)
            r = tl.rsqrt(ms + eps)[:, None]
            g = gamma_ptr + h * (2 * HALF_D) + 2 * i
            x0 = x0 * r * tl.load(g, mask=ok, other=0.0)
            x1 = x1 * r * tl.load(g + 1, mask=ok, other=0.0)
        if ROPE:
            rp = rope_ptr + (t % rope_rows).to(tl.int64) * (2 * HALF_D) + 2 * i
            c = tl.load(rp)
            s = tl.load(rp + 1)
            x0, x1 = x0 * c - x1 * s, x0 * s + x1 * c
        dst = out_ptr + t.to(tl.int64) * (H * 2 * HALF_D) + h * (2 * HALF_D) + 2 * i
        tl.store(dst, x0.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + 1, x1.to(out_ptr.dtype.element_ty), mask=ok)


def layer_norm_modulate(
    x: torch.Tensor,
    mul: torch.Tensor,
    add: torch.Tensor,
    eps: float,
    offset: float = 1.0,
    group_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``LayerNorm(x) * (offset + mul[g]) + add[g]`` (no LN affine), fp32 math, x's dtype out.

    Args:
        x: ``[B, L, C]`` (CUDA, contiguous rows).
        mul, add: ``[G, C]`` per group (``[C]`` for one shared row, e.g. an affine LN weight/bias).
        group_index: ``[B*L]`` int group of each row; None: rows are in ``G`` equal consecutive groups
            (``[B, L, C]`` with per-sample ``[B, C]`` modulation) or all share row 0 when ``[C]``.
    Returns:
        ``[B, L, C]``.
    """
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty_like(x2)
    mul2, add2 = mul.reshape(-1, C), add.reshape(-1, C)
    groups = mul2.shape[0]
    shared = groups == 1 and group_index is None
    if rows:
        _ln_modulate_kernel[(rows,)](
            x2, out, mul2, add2, group_index if group_index is not None else x2,
            C, max(1, rows // groups), 0 if shared else mul2.stride(0), 0 if shared else add2.stride(0),
            float(eps), float(offset),
            GROUP_INDEX=group_index is not None, BLOCK_C=triton.next_power_of_2(C),
            num_warps=4 if C <= 2048 else 8,
        )
    return out.view(x.shape)


def qk_norm_rope(
    src: torch.Tensor,
    gamma: Optional[torch.Tensor],
    rope: Optional[torch.Tensor],
    eps: float,
) -> torch.Tensor:
    """Per-head RMS norm (``x * rsqrt(mean(x^2) + eps) * gamma``) then RoPE, fp32 math.

    Args:
        src: ``[B, L, H, D]`` view whose rows (``L`` dim) may be strided, e.g. a slice of the qkv
            projection; each ``[H, D]`` row must be contiguous.
        gamma: ``[H, D]`` fp32 (None: no norm). rope: complex phases whose rows are the tokens
            (``[L, D/2]`` shared by the batch, or one per row of ``B*L``); None: no rotation.
    Returns:
        ``[B, L, H, D]`` contiguous, src's dtype.
    """
    B, L, H, D = src.shape
    if src.stride(3) != 1 or src.stride(2) != D or src.stride(0) != L * src.stride(1):
        src = src.contiguous()
    out = torch.empty(B, L, H, D, dtype=src.dtype, device=src.device)
    T = B * L
    if rope is not None:
        rope_real = torch.view_as_real(rope.reshape(-1, D // 2).contiguous())
        rope_rows = rope_real.shape[0]
        if T % rope_rows:
            raise ValueError(f"RoPE table of {rope_rows} rows does not tile {T} tokens")
    else:
        rope_real, rope_rows = src, 1
    if T:
        _qk_norm_rope_kernel[(T,)](
            src, out, gamma if gamma is not None else src, rope_real,
            src.stride(1), H, rope_rows, float(eps),
            HALF_D=D // 2, BLOCK_H=triton.next_power_of_2(H), NORM=gamma is not None, ROPE=rope is not None,
            num_warps=4,
        )
    return out
