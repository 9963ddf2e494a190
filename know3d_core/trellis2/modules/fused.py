"""Fused elementwise kernels of the flow DiT blocks (Triton, CUDA only) and the switch for them.

Each kernel replaces a chain of PyTorch ops that each read and write the whole token tensor:
- :func:`residual_layer_norm_modulate`: the gated residual ``x + y * gate[g]`` and then
  ``LayerNorm(.) * (offset + mul[g]) + add[g]`` per row, fp32 math, one pass writing both the new
  residual stream and the normalised input of the next sub-layer (the block's ``norm1/norm3`` +
  adaLN modulation, ``norm2`` with its affine weight/bias, and the residual adds before them);
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
import logging
from typing import Iterator, Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

_log = logging.getLogger(__name__)

__all__ = [
    "fused_enabled", "use_fused_kernels", "layer_norm_modulate", "residual_layer_norm_modulate", "gated_residual",
    "qk_norm_rope", "qk_norm_rope_pair",
]

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


class _Launcher:
    """Launch a ``@triton.jit`` kernel with less host time.

    The first launch of each specialisation goes through Triton's JIT (compile + launch) and keeps
    the compiled kernel; later launches with the same key call it directly, skipping Triton's
    per-call argument binding (about 35 us of host time per launch, which adds up to several ms
    per DiT forward where the GPU would otherwise wait). The key holds everything Triton
    specialises on here: each tensor's dtype and 16-byte alignment, the specialised ints, the
    constexprs. Any error on the direct path switches it off for good (plain JIT launches).
    """

    def __init__(self, fn):
        self.fn = fn
        self.compiled: dict = {}
        self.direct = True

    def __call__(self, grid: int, args: list, spec: tuple, constexprs: dict, num_warps: int) -> None:
        key = (spec, num_warps, tuple(constexprs.values()),
               tuple((a.dtype, a.data_ptr() % 16 == 0) for a in args if isinstance(a, torch.Tensor)))
        kernel = self.compiled.get(key) if self.direct else None
        if kernel is not None:
            try:
                from triton import knobs
                from triton.runtime import driver
                all_args = (*args, *constexprs.values())
                stream = driver.active.get_current_stream(driver.active.get_current_device())
                meta = kernel.launch_metadata((grid, 1, 1), stream, *all_args)
                kernel.run(grid, 1, 1, stream, kernel.function, kernel.packed_metadata, meta,
                           knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *all_args)
                return
            except Exception as exc:  # noqa: BLE001 - Triton internals differ between versions
                self.direct = False
                _log.info("direct Triton launch unavailable (%s: %s); using the JIT launcher", type(exc).__name__, exc)
        compiled = self.fn[(grid,)](*args, **constexprs, num_warps=num_warps)
        if self.direct and compiled is not None:
            self.compiled[key] = compiled


if triton is not None:

    # Flags are run-time ints (not constexpr, not specialised): one compiled kernel serves every
    # call site, so a fresh process compiles two kernels in all.
    @triton.jit(do_not_specialize=["Ta", "stride_a", "stride_b", "rope_rows", "use_norm", "use_rope"])
    def _qk_norm_rope_kernel(
        a_ptr, a_out, ga_ptr, b_ptr, b_out, gb_ptr, rope_ptr,
        Ta, stride_a, stride_b, H, rope_rows, eps, use_norm, use_rope,
        D: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if pid < Ta:  # rows of the first tensor (queries), then of the second (keys)
            t = pid
            src = a_ptr + t.to(tl.int64) * stride_a
            dst = a_out + t.to(tl.int64) * (H * D)
            gamma = ga_ptr
        else:
            t = pid - Ta
            src = b_ptr + t.to(tl.int64) * stride_b
            dst = b_out + t.to(tl.int64) * (H * D)
            gamma = gb_ptr
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, D)[None, :]
        ok = (h < H) & (d < D)
        x = tl.load(src + h * D + d, mask=ok, other=0.0).to(tl.float32)
        if use_norm != 0:
            r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
            x = x * r * tl.load(gamma + h * D + d, mask=ok, other=0.0).to(tl.float32)
        if use_rope != 0:
            x0, x1 = tl.split(tl.reshape(x, (BLOCK_H, D // 2, 2)))
            i = tl.arange(0, D // 2)
            rp = rope_ptr + (t % rope_rows).to(tl.int64) * D + 2 * i
            c = tl.load(rp)[None, :]
            s = tl.load(rp + 1)[None, :]
            x = tl.reshape(tl.join(x0 * c - x1 * s, x0 * s + x1 * c), (BLOCK_H, D))
        tl.store(dst + h * D + d, x.to(dst.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["rows_per_group", "gate_stride", "mul_stride", "add_stride",
                                   "residual", "use_gate", "use_z", "norm", "norm2", "use_index"])
    def _residual_ln_kernel(
        x_ptr, y_ptr, gate_ptr, z_ptr, xout_ptr, out_ptr, mul_ptr, add_ptr, out2_ptr, w2_ptr, b2_ptr, group_ptr,
        C, rows_per_group, gate_stride, mul_stride, add_stride, eps, offset,
        residual, use_gate, use_z, norm, norm2, use_index,
        BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        ok = cols < C
        at = row.to(tl.int64) * C + cols
        g = row // rows_per_group
        if use_index != 0:
            g = tl.load(group_ptr + row).to(tl.int32)
        x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
        if residual != 0:
            y = tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float32)
            if use_gate != 0:
                y = y * tl.load(gate_ptr + g * gate_stride + cols, mask=ok, other=0.0).to(tl.float32)
            if use_z != 0:
                y = y + tl.load(z_ptr + at, mask=ok, other=0.0).to(tl.float32)
            xr = (x + y).to(xout_ptr.dtype.element_ty)
            tl.store(xout_ptr + at, xr, mask=ok)
            x = xr.to(tl.float32)  # normalise the rounded residual stream, as the unfused ops do
        if norm != 0:
            mean = tl.sum(x, axis=0) / C
            xc = tl.where(ok, x - mean, 0.0)
            rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / C + eps)
            mul = tl.load(mul_ptr + g * mul_stride + cols, mask=ok, other=0.0).to(tl.float32)
            add = tl.load(add_ptr + g * add_stride + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + at, (xc * rstd * (offset + mul) + add).to(out_ptr.dtype.element_ty), mask=ok)
            if norm2 != 0:  # a second affine LayerNorm of the same row (same statistics)
                w2 = tl.load(w2_ptr + cols, mask=ok, other=0.0).to(tl.float32)
                b2 = tl.load(b2_ptr + cols, mask=ok, other=0.0).to(tl.float32)
                tl.store(out2_ptr + at, (xc * rstd * w2 + b2).to(out2_ptr.dtype.element_ty), mask=ok)


if triton is not None:
    _residual_ln_launch = _Launcher(_residual_ln_kernel)
    _qk_norm_rope_launch = _Launcher(_qk_norm_rope_kernel)


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
        x: ``[B, L, C]`` (CUDA).
        mul, add: ``[G, C]`` per group (``[C]`` for one shared row, e.g. an affine LN weight/bias).
        group_index: ``[B*L]`` int group of each row; None: rows are in ``G`` equal consecutive groups
            (``[B, L, C]`` with per-sample ``[B, C]`` modulation) or all share row 0 when ``[C]``.
    Returns:
        ``[B, L, C]``.
    """
    return residual_layer_norm_modulate(x, None, None, mul, add, eps, offset, group_index)[1]


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, group_index: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``x + y * gate[g]`` in one pass (fp32 math, one rounding); shapes as in
    :func:`residual_layer_norm_modulate`."""
    return residual_layer_norm_modulate(x, y, gate, None, None, 0.0, 0.0, group_index)[0]


def residual_layer_norm_modulate(
    x: torch.Tensor,
    y: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    mul: Optional[torch.Tensor],
    add: Optional[torch.Tensor],
    eps: float,
    offset: float = 1.0,
    group_index: Optional[torch.Tensor] = None,
    *,
    z: Optional[torch.Tensor] = None,
    second: Optional[tuple] = None,
):
    """``x' = x + y * gate[g] (+ z)`` (y None: ``x' = x``; gate None: no gate), then
    ``h = LayerNorm(x') * (offset + mul[g]) + add[g]``; one pass, fp32 math, one rounding of x'.

    x, y, z: ``[B, L, C]``; gate ``[G, C]`` like mul/add (see :func:`layer_norm_modulate`);
    mul/add None: no norm (h is None). ``z`` (needs ``y``) is a second residual term.
    ``second = (weight [C], bias [C])``: also return ``h2 = LayerNorm(x') * weight + bias``, another
    affine LayerNorm of the same rows with the same eps (needs mul/add).
    Returns ``(x', h)``, or ``(x', h, h2)`` with ``second``; all ``[B, L, C]`` in x's dtype (x' is x
    itself when y is None).
    """
    C = x.shape[-1]
    x2 = _flat_rows(x)
    rows = x2.shape[0]
    norm = mul is not None
    if (z is not None and y is None) or (second is not None and not norm):
        raise ValueError("residual_layer_norm_modulate: z needs y, second needs mul/add")
    out = torch.empty_like(x2) if norm else x2
    if not norm:  # placeholders, never read
        mul = add = x2[:1] if gate is None else gate
    if y is not None:
        y2 = _flat_rows(y)
        x_out = torch.empty_like(x2)
    else:
        y2, x_out = x2, x2
    z2 = _flat_rows(z) if z is not None else y2
    mul2, add2 = mul.reshape(-1, C), add.reshape(-1, C)
    gate2 = gate.reshape(-1, C) if gate is not None else mul2
    groups = max(mul2.shape[0], gate2.shape[0])
    if second is not None:
        w2, b2 = second
        out2 = torch.empty_like(x2)
    else:
        w2, b2, out2 = mul2, add2, out  # placeholders, never read (same dtypes: no extra compile)

    def stride(t):
        return 0 if t.shape[0] == 1 else t.stride(0)

    if rows:
        _residual_ln_launch(
            rows,
            [x2, y2, gate2, z2, x_out, out, mul2, add2, out2, w2, b2,
             group_index if group_index is not None else x2,
             C, max(1, rows // groups), stride(gate2), stride(mul2), stride(add2), float(eps), float(offset),
             int(y is not None), int(gate is not None), int(z is not None), int(norm), int(second is not None),
             int(group_index is not None)],
            (C, rows < 2**31), {"BLOCK_C": triton.next_power_of_2(C)}, 4 if C <= 2048 else 8,
        )
    x_new = x if y is None else x_out.view(x.shape)
    h = out.view(x.shape) if norm else None
    return (x_new, h) if second is None else (x_new, h, out2.view(x.shape))


def _flat_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` -> contiguous ``[M, C]`` (a view when already contiguous)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.is_contiguous() else t2.contiguous()


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
    return qk_norm_rope_pair(src, None, gamma, None, rope, eps)[0]


def _rows(src: torch.Tensor) -> torch.Tensor:
    """src ``[B, L, H, D]`` with token rows at one stride and contiguous ``[H, D]`` rows."""
    B, L, H, D = src.shape
    if src.stride(3) != 1 or src.stride(2) != D or (B > 1 and src.stride(0) != L * src.stride(1)):
        src = src.contiguous()
    return src


def qk_norm_rope_pair(
    a: torch.Tensor,
    b: Optional[torch.Tensor],
    gamma_a: Optional[torch.Tensor],
    gamma_b: Optional[torch.Tensor],
    rope: Optional[torch.Tensor],
    eps: float,
):
    """:func:`qk_norm_rope` of queries ``a`` and keys ``b`` (``[B', L', H, D]``, any lengths) in one
    launch; the same rope (or none) and norm flag for both. Returns ``(a', b')`` (b' None if b is)."""
    a = _rows(a)
    B, L, H, D = a.shape
    out_a = torch.empty(B, L, H, D, dtype=a.dtype, device=a.device)
    Ta = B * L
    if b is not None:
        b = _rows(b)
        out_b = torch.empty(b.shape, dtype=b.dtype, device=b.device)
        Tb = b.shape[0] * b.shape[1]
    else:
        b, out_b, Tb = a, out_a, 0
    norm = gamma_a is not None
    if rope is not None:
        rope_real = torch.view_as_real(rope.reshape(-1, D // 2).contiguous())
        rope_rows = rope_real.shape[0]
        if Ta % rope_rows or Tb % rope_rows:
            raise ValueError(f"RoPE table of {rope_rows} rows does not tile {Ta} / {Tb} tokens")
    else:
        rope_real, rope_rows = None, 1
    dummy = gamma_a if norm else (rope_real if rope_real is not None else a)
    if Ta + Tb:
        _qk_norm_rope_launch(
            Ta + Tb,
            [a, out_a, gamma_a if norm else dummy, b, out_b, (gamma_b if gamma_b is not None else gamma_a) if norm else dummy,
             rope_real if rope_real is not None else dummy,
             Ta, a.stride(1), b.stride(1), H, rope_rows, float(eps), int(norm), int(rope is not None)],
            (H, max(Ta + Tb, a.stride(1), b.stride(1)) < 2**31), {"D": D, "BLOCK_H": triton.next_power_of_2(H)}, 4,
        )
    return out_a, (out_b if Tb else None)
