"""Multi-head attention of the TRELLIS.2 DiTs (dense batches and packed variable-length batches).

Hidden states are always a 3-D tensor ``[B', L', C]``:
- dense / equal-length batches: ``[B, L, C]``, ``layout=None``;
- packed batches of different lengths: ``[1, N, C]`` with a :class:`TokenLayout` that says which
  rows belong to which sample (attention never mixes samples).
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ...sparse import dense_attention, varlen_attention
from ...sparse.kernel_dispatch import grad_needed
from .fused import fused_enabled, qk_norm_rope_pair
from .norm import MultiHeadRMSNorm
from .rope import apply_rope

__all__ = ["TokenLayout", "attend", "MultiHeadAttention"]


@dataclass
class TokenLayout:
    """Rows of a packed ``[1, N, C]`` hidden-state tensor holding B samples back to back.

    Attributes:
        seqlens: ``LongTensor[B]`` rows per sample (device of the features).
        seqlens_list: the same as python ints.
        batch_index: ``LongTensor[N]`` sample of each row.
    """

    seqlens: torch.Tensor
    seqlens_list: list
    batch_index: torch.Tensor

    @property
    def batch_size(self) -> int:
        return len(self.seqlens_list)

    def per_row(self, v: torch.Tensor) -> torch.Tensor:
        """Per-sample ``[B, C]`` -> per-row ``[1, N, C]``."""
        return v[self.batch_index].unsqueeze(0)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_layout: Optional[TokenLayout] = None,
    kv_layout: Optional[TokenLayout] = None,
) -> torch.Tensor:
    """Scaled dot-product attention (scale ``1/sqrt(D)``), no mask across samples.

    SDPA keeps torch's own kernel choice: measured on an H100 (torch 2.11) it already picks cuDNN
    attention, the fastest there (1.6-1.9x FlashAttention-2 at the flows' shapes; forcing it
    bought nothing: benchmarks/results/perf_profile.log).

    Args:
        q: ``[B, Lq, H, D]``, or ``[1, Nq, H, D]`` packed per ``q_layout``.
        k, v: ``[B, Lk, H, D]``, or ``[1, Nk, H, D]`` packed per ``kv_layout``.
    Returns:
        ``[B, Lq, H, D]`` (or ``[1, Nq, H, D]`` when q is packed).
    """
    if q_layout is None and kv_layout is None:
        return dense_attention(q, k, v)
    layout = q_layout if q_layout is not None else kv_layout
    B = layout.batch_size

    def packed(x, lay):
        if lay is not None:
            return x[0], lay.seqlens_list
        return x.reshape(-1, *x.shape[2:]), [x.shape[1]] * B

    q2, q_lens = packed(q, q_layout)
    k2, kv_lens = packed(k, kv_layout)
    v2, _ = packed(v, kv_layout)
    out = varlen_attention(q2, k2, v2, q_lens, kv_lens)
    return out.unsqueeze(0) if q_layout is not None else out.reshape(q.shape[0], q.shape[1], *out.shape[1:])




class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with optional per-head q/k RMS norm and RoPE (self only).

    Keys: self: ``to_qkv``; cross: ``to_q``, ``to_kv``; both: ``to_out``, ``q_rms_norm.gamma``,
    ``k_rms_norm.gamma`` (when ``qk_rms_norm``).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        ctx_channels: Optional[int] = None,
        type: str = "self",
        qkv_bias: bool = True,
        use_rope: bool = False,
        qk_rms_norm: bool = False,
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        if type not in ("self", "cross"):
            raise ValueError(f"attention type must be 'self' or 'cross', got {type!r}")
        if type == "cross" and use_rope:
            raise ValueError("RoPE is only used in self-attention")
        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.ctx_channels = channels if ctx_channels is None else ctx_channels
        self._type = type
        self.use_rope = use_rope
        self.qk_rms_norm = qk_rms_norm
        if type == "self":
            self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(self.ctx_channels, 2 * channels, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(
        self,
        x: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        rope: Optional[torch.Tensor] = None,
        layout: Optional[TokenLayout] = None,
        zero_from: Optional[int] = None,
    ) -> torch.Tensor:
        """x ``[B, L, C]`` (packed ``[1, N, C]`` with ``layout``); context ``[B, Lc, Cc]`` (cross);
        rope: complex phases broadcastable to ``[B, L, D/2]`` (self with RoPE). Returns ``[B, L, C]``.
        ``zero_from`` (cross only): samples ``zero_from..`` have an all-zero context (the negative half of a
        guided pair), see :meth:`_zero_context_tail`."""
        if zero_from is not None and self._type == "cross":
            return self._zero_context_tail(x, context, layout, zero_from)
        B, L, _ = x.shape
        if self.use_rope and rope is None:
            raise ValueError("this attention uses RoPE: pass rope=phases")
        if fused_enabled(x) and _pow2(self.head_dim // 2) and not grad_needed(rope):
            q, k, v = self._qkv_fused(x, context, rope)  # differentiable in x and the gammas
        else:
            q, k, v = self._qkv(x, context, rope)
        h = attend(q, k, v, q_layout=layout, kv_layout=layout if self._type == "self" else None)
        return self.to_out(h.reshape(B, L, -1))

    def _zero_context_tail(self, x: torch.Tensor, context: torch.Tensor, layout: Optional[TokenLayout],
                           first: int) -> torch.Tensor:
        """Cross-attention where samples ``first..B-1`` have an all-zero context ``[Lc, Cc]``.

        Every key of such a sample is ``to_kv(0)``'s key (normed or not), so each query's logits are
        all equal: the softmax is uniform and the attention returns ``to_kv(0)``'s value, the same for
        every query. Their rows are therefore one row, ``to_out(value of a zero token)``, computed once:
        no ``to_q``, no attention, no ``to_out`` over them; the samples before ``first`` run as usual (so
        SDPA sees the unguided steps' batch and shapes). Equal to the plain path up to rounding.
        """
        B = layout.batch_size if layout is not None else x.shape[0]
        if not 0 <= first <= B:
            raise ValueError(f"zero_from must be in [0, {B}], got {first}")
        if first == B:
            return self.forward(x, context, layout=layout)
        zero = context.new_zeros(1, 1, self.ctx_channels)
        value = self.to_kv(zero).reshape(1, 1, 2, self.channels)[:, :, 1]  # [1, 1, C]: (H, D) flattened
        row = self.to_out(value)  # [1, 1, C]
        if layout is None:
            tail = row.expand(B - first, x.shape[1], -1)
            if first == 0:
                return tail.contiguous()
            return torch.cat([self.forward(x[:first], context[:first]), tail], dim=0)
        rows = sum(layout.seqlens_list[:first])
        tail = row.expand(1, x.shape[1] - rows, -1)
        if first == 0:
            return tail.contiguous()
        head = TokenLayout(layout.seqlens[:first], layout.seqlens_list[:first], layout.batch_index[:rows])
        return torch.cat([self.forward(x[:, :rows], context[:first], layout=head), tail], dim=1)

    def _project(self, x: torch.Tensor, context: Optional[torch.Tensor]):
        """q, k, v ``[B', L', H, D]`` views of the projections (before norm/RoPE)."""
        B, L, _ = x.shape
        H = self.num_heads
        if self._type == "self":
            return self.to_qkv(x).reshape(B, L, 3, H, -1).unbind(dim=2)
        q = self.to_q(x).reshape(B, L, H, -1)
        k, v = self.to_kv(context).reshape(context.shape[0], context.shape[1], 2, H, -1).unbind(dim=2)
        return q, k, v

    def _qkv(self, x, context, rope):
        """PyTorch path: the reference's op sequence."""
        q, k, v = self._project(x, context)
        if self.qk_rms_norm:
            q = self.q_rms_norm(q)
            k = self.k_rms_norm(k)
        if self.use_rope:
            q = apply_rope(q, rope)
            k = apply_rope(k, rope)
        return q, k, v

    def _qkv_fused(self, x, context, rope):
        """Triton path: RMS norm and RoPE of q and k in one kernel each (fp32 math, one rounding)."""
        q, k, v = self._project(x, context)
        if not (self.qk_rms_norm or self.use_rope):
            return q, k, v
        rope = rope if self.use_rope else None
        gq = self.q_rms_norm.gamma if self.qk_rms_norm else None
        gk = self.k_rms_norm.gamma if self.qk_rms_norm else None
        eps = self.q_rms_norm.eps if self.qk_rms_norm else 0.0
        q, k = qk_norm_rope_pair(q, k, gq, gk, rope, eps)
        return q, k, v


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
