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

Training: both have a backward pass in Triton (``torch.autograd.Function``), taken whenever autograd
records and an input requires grad; without autograd the kernels launch directly (no Function
overhead). Gradients match the PyTorch path's (tests/test_fused_autograd.py on CUDA).

:func:`fused_enabled` says whether a tensor takes the fused path (CUDA, Triton importable, and not
switched off with :func:`use_fused_kernels`); everything else runs the PyTorch ops. Kernels compile
at first use (well under a second each) and stay cached in-process.
"""
from __future__ import annotations

from typing import ContextManager, Optional

import torch

from ...sparse.kernel_dispatch import KernelSwitch, grad_needed
from ...sparse.triton_launch import TritonLauncher

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

__all__ = [
    "fused_enabled", "use_fused_kernels", "layer_norm_modulate", "residual_layer_norm_modulate", "gated_residual",
    "qk_norm_rope", "qk_norm_rope_pair",
]

_switch = KernelSwitch(True)


def fused_enabled(x: torch.Tensor) -> bool:
    """True when ``x`` should take the Triton path (CUDA tensor, Triton present, switch on)."""
    return _switch.enabled and triton is not None and x.is_cuda


def use_fused_kernels(enabled: bool) -> ContextManager[None]:
    """Context manager: switch the fused kernels on or off inside the block (for A/B checks)."""
    return _switch.use(enabled)


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


    @triton.jit(do_not_specialize=[
        "n_rows", "rows_per_group", "gate_stride", "mul_stride", "dgate_stride", "dmul_stride", "dadd_stride",
        "use_gate", "norm", "norm2", "use_index", "has_dxo", "want_gate", "want_mul", "want_add", "want_w2",
        "want_b2", "rows_per_prog"])
    def _residual_ln_bwd_kernel(
        xr_ptr, y_ptr, gate_ptr, mul_ptr, w2_ptr, group_ptr, dxo_ptr, dh_ptr, dh2_ptr, dx_ptr, dy_ptr,
        dgate_ptr, dmul_ptr, dadd_ptr, dw2_ptr, db2_ptr,
        n_rows, C, rows_per_group, gate_stride, mul_stride, dgate_stride, dmul_stride, dadd_stride, eps, offset,
        use_gate, norm, norm2, use_index, has_dxo, want_gate, want_mul, want_add, want_w2, want_b2, rows_per_prog,
        BLOCK_C: tl.constexpr,
    ):
        """Backward of ``_residual_ln_kernel`` for ``rows_per_prog`` consecutive rows.

        With ``xhat = (x' - mean) * rstd`` recomputed from the saved (rounded) x' and
        ``dxhat = dh * (offset + mul[g]) + dh2 * w2``:
        ``dx' = dxo + rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))``; then
        ``dx = dz = dx'``, ``dy = dx' * gate[g]``, ``dgate[g] += dx' * y``, ``dmul[g] += dh * xhat``,
        ``dadd[g] += dh``, ``dw2 += dh2 * xhat``, ``db2 += dh2``. The parameter sums stay in
        registers while the group is unchanged and go out with one atomic add per group change.
        """
        cols = tl.arange(0, BLOCK_C)
        ok = cols < C
        zero = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_gate = zero
        acc_mul = zero
        acc_add = zero
        acc_w2 = zero
        acc_b2 = zero
        first = tl.program_id(0) * rows_per_prog
        cur = first // rows_per_group
        if use_index != 0:
            cur = tl.load(group_ptr + first).to(tl.int32)
        w2 = tl.load(w2_ptr + cols, mask=ok & ((cols * 0 + norm2) != 0), other=0.0).to(tl.float32)
        for i in range(0, rows_per_prog):
            row = first + i
            if row < n_rows:
                g = row // rows_per_group
                if use_index != 0:
                    g = tl.load(group_ptr + row).to(tl.int32)
                if g != cur:
                    tl.atomic_add(dgate_ptr + cur * dgate_stride + cols, acc_gate, mask=ok & ((cols * 0 + want_gate) != 0))
                    tl.atomic_add(dmul_ptr + cur * dmul_stride + cols, acc_mul, mask=ok & ((cols * 0 + want_mul) != 0))
                    tl.atomic_add(dadd_ptr + cur * dadd_stride + cols, acc_add, mask=ok & ((cols * 0 + want_add) != 0))
                    acc_gate = zero
                    acc_mul = zero
                    acc_add = zero
                    cur = g
                at = row.to(tl.int64) * C + cols
                dxr = zero
                if norm != 0:
                    x = tl.load(xr_ptr + at, mask=ok, other=0.0).to(tl.float32)
                    mean = tl.sum(x, axis=0) / C
                    xc = tl.where(ok, x - mean, 0.0)
                    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / C + eps)
                    xhat = xc * rstd
                    dh = tl.load(dh_ptr + at, mask=ok, other=0.0).to(tl.float32)
                    m = tl.load(mul_ptr + g * mul_stride + cols, mask=ok, other=0.0).to(tl.float32)
                    dxhat = dh * (offset + m)
                    acc_mul += dh * xhat
                    acc_add += dh
                    if norm2 != 0:
                        dh2 = tl.load(dh2_ptr + at, mask=ok, other=0.0).to(tl.float32)
                        dxhat += dh2 * w2
                        acc_w2 += dh2 * xhat
                        acc_b2 += dh2
                    dxhat = tl.where(ok, dxhat, 0.0)
                    c1 = tl.sum(dxhat, axis=0) / C
                    c2 = tl.sum(dxhat * xhat, axis=0) / C
                    dxr = tl.where(ok, rstd * (dxhat - c1 - xhat * c2), 0.0)
                if has_dxo != 0:
                    dxr += tl.load(dxo_ptr + at, mask=ok, other=0.0).to(tl.float32)
                tl.store(dx_ptr + at, dxr.to(dx_ptr.dtype.element_ty), mask=ok)
                if use_gate != 0:
                    gt = tl.load(gate_ptr + g * gate_stride + cols, mask=ok, other=0.0).to(tl.float32)
                    tl.store(dy_ptr + at, (dxr * gt).to(dy_ptr.dtype.element_ty), mask=ok)
                    acc_gate += dxr * tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float32)
        tl.atomic_add(dgate_ptr + cur * dgate_stride + cols, acc_gate, mask=ok & ((cols * 0 + want_gate) != 0))
        tl.atomic_add(dmul_ptr + cur * dmul_stride + cols, acc_mul, mask=ok & ((cols * 0 + want_mul) != 0))
        tl.atomic_add(dadd_ptr + cur * dadd_stride + cols, acc_add, mask=ok & ((cols * 0 + want_add) != 0))
        tl.atomic_add(dw2_ptr + cols, acc_w2, mask=ok & ((cols * 0 + want_w2) != 0))
        tl.atomic_add(db2_ptr + cols, acc_b2, mask=ok & ((cols * 0 + want_b2) != 0))

    @triton.jit(do_not_specialize=["Ta", "T", "stride_a", "stride_b", "H", "rope_rows", "use_norm", "use_rope",
                                   "want_a", "want_b", "rows_per_prog"])
    def _qk_norm_rope_bwd_kernel(
        a_ptr, b_ptr, ga_ptr, gb_ptr, rope_ptr, go_a, go_b, dx_a, dx_b, dg_a, dg_b,
        Ta, T, stride_a, stride_b, H, rope_rows, eps, use_norm, use_rope, want_a, want_b, rows_per_prog,
        D: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """Backward of ``_qk_norm_rope_kernel`` for ``rows_per_prog`` consecutive token rows (the
        first ``Ta`` of a, then b). RoPE's gradient is the inverse rotation
        ``(g0 c + g1 s, -g0 s + g1 c)``; with ``n = x * r``, ``r = rsqrt(mean(x^2) + eps)`` per head:
        ``dgamma += du * n`` and ``dx = r * (du * gamma - n * mean(du * gamma * n))``."""
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, D)[None, :]
        ok = (h < H) & (d < D)
        acc = tl.zeros((BLOCK_H, D), dtype=tl.float32)
        first = tl.program_id(0) * rows_per_prog
        cur = (first >= Ta).to(tl.int32)
        for i in range(0, rows_per_prog):
            pid = first + i
            if pid < T:
                side = (pid >= Ta).to(tl.int32)
                if side != cur:  # crossed from the queries' rows to the keys'
                    tl.atomic_add(dg_a + h * D + d, acc, mask=ok & ((h * 0 + d * 0 + want_a) != 0))
                    acc = tl.zeros((BLOCK_H, D), dtype=tl.float32)
                    cur = side
                if side == 0:
                    t = pid
                    src = a_ptr + t.to(tl.int64) * stride_a
                    go = go_a + t.to(tl.int64) * (H * D)
                    dst = dx_a + t.to(tl.int64) * (H * D)
                    gamma = ga_ptr
                else:
                    t = pid - Ta
                    src = b_ptr + t.to(tl.int64) * stride_b
                    go = go_b + t.to(tl.int64) * (H * D)
                    dst = dx_b + t.to(tl.int64) * (H * D)
                    gamma = gb_ptr
                du = tl.load(go + h * D + d, mask=ok, other=0.0).to(tl.float32)
                if use_rope != 0:
                    g0, g1 = tl.split(tl.reshape(du, (BLOCK_H, D // 2, 2)))
                    j = tl.arange(0, D // 2)
                    rp = rope_ptr + (t % rope_rows).to(tl.int64) * D + 2 * j
                    c = tl.load(rp)[None, :]
                    s = tl.load(rp + 1)[None, :]
                    du = tl.reshape(tl.join(g0 * c + g1 * s, g1 * c - g0 * s), (BLOCK_H, D))
                if use_norm != 0:
                    x = tl.load(src + h * D + d, mask=ok, other=0.0).to(tl.float32)
                    r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
                    n = x * r
                    acc += du * n
                    dn = du * tl.load(gamma + h * D + d, mask=ok, other=0.0).to(tl.float32)
                    du = r * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
                tl.store(dst + h * D + d, du.to(dst.dtype.element_ty), mask=ok)
        if cur == 0:
            tl.atomic_add(dg_a + h * D + d, acc, mask=ok & ((h * 0 + d * 0 + want_a) != 0))
        else:
            tl.atomic_add(dg_b + h * D + d, acc, mask=ok & ((h * 0 + d * 0 + want_b) != 0))


if triton is not None:
    _residual_ln_launch = TritonLauncher(_residual_ln_kernel)
    _residual_ln_bwd_launch = TritonLauncher(_residual_ln_bwd_kernel)
    _qk_norm_rope_bwd_launch = TritonLauncher(_qk_norm_rope_bwd_kernel)
    _qk_norm_rope_launch = TritonLauncher(_qk_norm_rope_kernel)


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

    Differentiable: when autograd records and an input requires grad, the kernel runs inside
    :class:`_ResidualLayerNorm` whose backward (:func:`_residual_ln_backward`, one Triton pass)
    gives x, y, z, gate, mul, add and the second affine pair their gradients.
    """
    norm = mul is not None
    if (z is not None and y is None) or (second is not None and not norm):
        raise ValueError("residual_layer_norm_modulate: z needs y, second needs mul/add")
    w2, b2 = second if second is not None else (None, None)
    if grad_needed(x, y, gate, z, mul, add, w2, b2):
        outs = list(_ResidualLayerNorm.apply(x, y, gate, z, mul, add, w2, b2, group_index, float(eps), float(offset)))
        x_new = outs.pop(0) if y is not None else x
        h = outs.pop(0) if norm else None
        h2 = outs.pop(0) if second is not None else None
    else:
        x_new, h, h2 = _residual_ln_forward(x, y, gate, z, mul, add, w2, b2, group_index, eps, offset)
    return (x_new, h) if second is None else (x_new, h, h2)


def _residual_ln_forward(x, y, gate, z, mul, add, w2, b2, group_index, eps, offset):
    """The forward kernel launch; arguments as :func:`residual_layer_norm_modulate` (``w2``/``b2``
    the second affine pair or None). Returns ``(x', h or None, h2 or None)``."""
    C = x.shape[-1]
    x2 = _flat_rows(x)
    rows = x2.shape[0]
    norm = mul is not None
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
    second = w2 is not None
    if second:
        out2 = torch.empty_like(x2)
    else:
        w2, b2, out2 = mul2, add2, out  # placeholders, never read (same dtypes: no extra compile)

    if rows:
        _residual_ln_launch(
            rows,
            [x2, y2, gate2, z2, x_out, out, mul2, add2, out2, w2, b2,
             group_index if group_index is not None else x2,
             C, max(1, rows // groups), _row_stride(gate2), _row_stride(mul2), _row_stride(add2),
             float(eps), float(offset),
             int(y is not None), int(gate is not None), int(z is not None), int(norm), int(second),
             int(group_index is not None)],
            (C, rows < 2**31), {"BLOCK_C": triton.next_power_of_2(C)}, 4 if C <= 2048 else 8,
        )
    x_new = x if y is None else x_out.view(x.shape)
    h = out.view(x.shape) if norm else None
    return x_new, h, (out2.view(x.shape) if second else None)


def _row_stride(t: torch.Tensor) -> int:
    """Row stride of a per-group ``[G, C]`` table (0 for one shared row)."""
    return 0 if t.shape[0] == 1 else t.stride(0)


class _ResidualLayerNorm(torch.autograd.Function):
    """Autograd wrapper of the residual + LayerNorm + modulation kernel (forward and backward in
    Triton). Outputs: ``x'`` (when y is given), ``h`` (when mul is given), ``h2`` (when w2 is)."""

    @staticmethod
    def forward(ctx, x, y, gate, z, mul, add, w2, b2, group_index, eps, offset):
        x_new, h, h2 = _residual_ln_forward(x, y, gate, z, mul, add, w2, b2, group_index, eps, offset)
        norm = mul is not None
        ctx.flags = (y is not None, gate is not None, z is not None, norm, w2 is not None)
        ctx.eps, ctx.offset = eps, offset
        ctx.save_for_backward(x_new if norm else None, y if gate is not None else None, gate, mul, add, w2, b2,
                              group_index)
        return tuple(t for t in (x_new if y is not None else None, h, h2) if t is not None)

    @staticmethod
    def backward(ctx, *grads):
        residual, use_gate, use_z, norm, norm2 = ctx.flags
        x_new, y, gate, mul, add, w2, b2, group_index = ctx.saved_tensors
        it = iter(grads)
        dxo = next(it) if residual else None
        dh = next(it) if norm else None
        dh2 = next(it) if norm2 else None
        need = ctx.needs_input_grad
        dx, dy, dgate, dmul, dadd, dw2, db2 = _residual_ln_backward(
            x_new, y, gate, mul, add, w2, b2, group_index, dxo, dh, dh2, ctx.eps, ctx.offset, ctx.flags,
            want=(need[2], need[4], need[5], need[6], need[7]), shape=grads[0].shape,
        )
        dz = dx if use_z and need[3] else None
        return dx, (dy if residual else None), dgate, dz, dmul, dadd, dw2, db2, None, None, None


def _residual_ln_backward(x_new, y, gate, mul, add, w2, b2, group_index, dxo, dh, dh2, eps, offset, flags,
                          want, shape):
    """Gradients of :func:`_residual_ln_forward` (see :func:`_residual_ln_bwd_kernel` for the math).

    Per-group parameter gradients (gate/mul/add ``[G, C]``, w2/b2 ``[C]``) are summed in fp32 over
    each program's rows and added once per program and group (``atomic_add``; the summation order
    varies from run to run at fp32 rounding level). Returns
    ``(dx, dy, dgate, dmul, dadd, dw2, db2)`` (None where not given or not wanted).
    """
    residual, use_gate, _use_z, norm, norm2 = flags
    want_gate, want_mul, want_add, want_w2, want_b2 = want
    ref = dxo if dxo is not None else dh
    C = shape[-1]
    dev = ref.device
    rows = ref.numel() // C
    dtype = ref.dtype
    dx = torch.empty(rows, C, dtype=dtype, device=dev)
    dy = torch.empty(rows, C, dtype=dtype, device=dev) if residual and use_gate else dx
    ph = dx  # placeholder for absent tensors (never read)

    def flat(t):
        return _flat_rows(t) if t is not None else ph

    def table(t):
        return t.reshape(-1, C) if t is not None else ph[:1]

    gate2, mul2 = table(gate), table(mul)
    groups = max(gate2.shape[0] if gate is not None else 1, mul2.shape[0] if mul is not None else 1)

    def acc(t, wanted):
        return torch.zeros(table(t).shape, dtype=torch.float32, device=dev) if wanted and t is not None else None

    dgate, dmul, dadd, dw2, db2 = acc(gate, want_gate), acc(mul, want_mul), acc(add, want_add), acc(w2, want_w2), \
        acc(b2, want_b2)
    fp = torch.zeros(1, C, dtype=torch.float32, device=dev) if None in (dgate, dmul, dadd, dw2, db2) else None

    def buf(t):
        return t if t is not None else fp

    rows_per_prog = max(1, min(64, rows // 1024))
    if rows:
        _residual_ln_bwd_launch(
            triton.cdiv(rows, rows_per_prog),
            [flat(x_new), flat(y), gate2, mul2, table(w2),
             group_index if group_index is not None else ph,
             flat(dxo), flat(dh), flat(dh2), dx, dy,
             buf(dgate), buf(dmul), buf(dadd), buf(dw2), buf(db2),
             rows, C, max(1, rows // groups), _row_stride(gate2), _row_stride(mul2),
             0 if dgate is None or dgate.shape[0] == 1 else C, 0 if dmul is None or dmul.shape[0] == 1 else C,
             0 if dadd is None or dadd.shape[0] == 1 else C,
             float(eps), float(offset),
             int(residual and use_gate), int(norm), int(norm2), int(group_index is not None), int(dxo is not None),
             int(dgate is not None), int(dmul is not None), int(dadd is not None), int(dw2 is not None),
             int(db2 is not None), rows_per_prog],
            (C,), {"BLOCK_C": triton.next_power_of_2(C)}, 4 if C <= 2048 else 8,
        )

    def out(g, like):
        return None if g is None else g.view(like.shape).to(like.dtype)

    return (dx.view(shape), dy.view(shape) if residual else None, out(dgate, gate), out(dmul, mul), out(dadd, add),
            out(dw2, w2), out(db2, b2))


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
    launch; the same rope (or none) and norm flag for both. Returns ``(a', b')`` (b' None if b is).

    Differentiable in a, b and the gammas (:class:`_QKNormRope`, backward in Triton); the RoPE
    phases are constants (raises if they require grad while autograd records).
    """
    if grad_needed(a, b, gamma_a, gamma_b, rope):
        if grad_needed(rope):
            raise RuntimeError("qk_norm_rope: the fused kernel has no gradient for the RoPE phases; "
                               "use the PyTorch path (apply_rope) to differentiate them")
        outs = _QKNormRope.apply(a, b, gamma_a, gamma_b, rope, float(eps))
        return outs[0], (outs[1] if b is not None else None)
    return _qk_norm_rope_forward(a, b, gamma_a, gamma_b, rope, eps)[:2]


def _rope_table(rope: Optional[torch.Tensor], D: int, Ta: int, Tb: int):
    """Complex phases -> ``([rows, D/2, 2] fp32 or None, rows)``; rows must tile both token counts."""
    if rope is None:
        return None, 1
    rope_real = torch.view_as_real(rope.reshape(-1, D // 2).contiguous())
    rope_rows = rope_real.shape[0]
    if Ta % rope_rows or Tb % rope_rows:
        raise ValueError(f"RoPE table of {rope_rows} rows does not tile {Ta} / {Tb} tokens")
    return rope_real, rope_rows


def _qk_norm_rope_forward(a, b, gamma_a, gamma_b, rope, eps):
    """Forward launch. Returns ``(a', b' or None, a rows, b rows or None, rope table)`` (the row
    views are the kernel's inputs, kept for the backward)."""
    a = _rows(a)
    B, L, H, D = a.shape
    out_a = torch.empty(B, L, H, D, dtype=a.dtype, device=a.device)
    Ta = B * L
    b_in = b
    if b is not None:
        b = _rows(b)
        out_b = torch.empty(b.shape, dtype=b.dtype, device=b.device)
        Tb = b.shape[0] * b.shape[1]
    else:
        b, out_b, Tb = a, out_a, 0
    norm = gamma_a is not None
    rope_real, rope_rows = _rope_table(rope, D, Ta, Tb)
    dummy = gamma_a if norm else (rope_real if rope_real is not None else a)
    if Ta + Tb:
        _qk_norm_rope_launch(
            Ta + Tb,
            [a, out_a, gamma_a if norm else dummy, b, out_b, (gamma_b if gamma_b is not None else gamma_a) if norm else dummy,
             rope_real if rope_real is not None else dummy,
             Ta, a.stride(1), b.stride(1), H, rope_rows, float(eps), int(norm), int(rope is not None)],
            (H, max(Ta + Tb, a.stride(1), b.stride(1)) < 2**31), {"D": D, "BLOCK_H": triton.next_power_of_2(H)}, 4,
        )
    return out_a, (out_b if Tb else None), a, (b if b_in is not None else None), rope_real


class _QKNormRope(torch.autograd.Function):
    """Autograd wrapper of the q/k RMS norm + RoPE kernel; outputs ``a'`` (and ``b'`` when b is given)."""

    @staticmethod
    def forward(ctx, a, b, gamma_a, gamma_b, rope, eps):
        out_a, out_b, a_rows, b_rows, rope_real = _qk_norm_rope_forward(a, b, gamma_a, gamma_b, rope, eps)
        ctx.eps = eps
        ctx.has_b = b is not None
        ctx.save_for_backward(a_rows if gamma_a is not None else None, b_rows if gamma_a is not None else None,
                              gamma_a, gamma_b, rope_real)
        ctx.shapes = (a_rows.shape, b_rows.shape if b_rows is not None else None)
        ctx.gamma_b_given = gamma_b is not None
        return (out_a, out_b) if b is not None else (out_a,)

    @staticmethod
    def backward(ctx, *grads):
        a_rows, b_rows, gamma_a, gamma_b, rope_real = ctx.saved_tensors
        (B, L, H, D), b_shape = ctx.shapes
        go_a = grads[0].contiguous()
        go_b = grads[1].contiguous() if ctx.has_b else go_a
        Ta = B * L
        Tb = b_shape[0] * b_shape[1] if ctx.has_b else 0
        dx_a = torch.empty_like(go_a)
        dx_b = torch.empty_like(go_b) if ctx.has_b else dx_a
        norm = gamma_a is not None
        need = ctx.needs_input_grad
        g_b = gamma_b if ctx.gamma_b_given else gamma_a  # the forward's rule: gamma_b None -> gamma_a
        dg_a = torch.zeros(gamma_a.shape, dtype=torch.float32, device=go_a.device) if norm else None
        dg_b = torch.zeros(gamma_a.shape, dtype=torch.float32, device=go_a.device) if norm and Tb else None
        ph = go_a
        rows_per_prog = max(1, min(64, (Ta + Tb) // 2048))
        if Ta + Tb:
            _qk_norm_rope_bwd_launch(
                triton.cdiv(Ta + Tb, rows_per_prog),
                [a_rows if norm else ph, b_rows if (norm and Tb) else (a_rows if norm else ph),
                 gamma_a if norm else ph, g_b if norm else ph, rope_real if rope_real is not None else ph,
                 go_a, go_b, dx_a, dx_b,
                 dg_a if dg_a is not None else _fp32_placeholder(ph.device, gamma_a),
                 dg_b if dg_b is not None else _fp32_placeholder(ph.device, gamma_a),
                 Ta, Ta + Tb, a_rows.stride(1) if norm else H * D,
                 (b_rows.stride(1) if (norm and Tb) else H * D), H, rope_real.shape[0] if rope_real is not None else 1,
                 float(ctx.eps), int(norm), int(rope_real is not None), int(norm), int(norm and Tb > 0), rows_per_prog],
                (H, max(Ta + Tb, H * D) < 2**31), {"D": D, "BLOCK_H": triton.next_power_of_2(H)}, 4,
            )
        da = dx_a if need[0] else None
        db = dx_b if ctx.has_b and need[1] else None
        if not norm:
            return da, db, None, None, None, None
        if ctx.gamma_b_given:
            dga = dg_a.to(gamma_a.dtype) if need[2] else None
            dgb = (dg_b if dg_b is not None else torch.zeros_like(dg_a)).to(gamma_b.dtype) if need[3] else None
        else:  # one gamma served both
            dga = (dg_a + dg_b if dg_b is not None else dg_a).to(gamma_a.dtype) if need[2] else None
            dgb = None
        return da, db, dga, dgb, None, None


def _fp32_placeholder(device, like):
    """A small fp32 buffer standing in for an absent gradient accumulator (never written)."""
    n = like.numel() if like is not None else 1
    return torch.zeros(n, dtype=torch.float32, device=device)
