"""Multi-head attention of the TRELLIS.2 DiTs (dense batches and packed variable-length batches).

Hidden states are always a 3-D tensor ``[B', L', C]``:
- dense / equal-length batches: ``[B, L, C]``, ``layout=None``;
- packed batches of different lengths: ``[1, N, C]`` with a :class:`TokenLayout` that says which
  rows belong to which sample (attention never mixes samples).
"""
import contextlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...sparse import varlen_attention
from .fused import fused_enabled, qk_norm_rope_pair
from .norm import MultiHeadRMSNorm
from .rope import apply_rope

__all__ = ["TokenLayout", "attend", "MultiHeadAttention", "record_attention_layouts", "rebatch_layout",
           "prebuild_attention_plans"]

# (shape, stride, dtype, device) of q, k and v as handed to SDPA ([B, H, L, D] views).
TensorLayout = Tuple[Tuple[int, ...], Tuple[int, ...], torch.dtype, torch.device]
SdpaLayout = Tuple[TensorLayout, TensorLayout, TensorLayout]
_recorders: List[set] = []


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
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if _recorders:
            _recorders[-1].add(tuple(_layout_of(a) for a in (qt, kt, vt)))
        return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
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


def _layout_of(t: torch.Tensor) -> TensorLayout:
    return tuple(t.shape), tuple(t.stride()), t.dtype, t.device


@contextlib.contextmanager
def record_attention_layouts() -> Iterator[set]:
    """Collect the distinct q/k/v layouts of the dense attention calls made inside the block.

    Yields a set of :data:`SdpaLayout` (``[B, H, L, D]`` shape, stride, dtype, device of q, k, v)
    that fills as :func:`attend` runs; packed (``TokenLayout``) calls are not recorded.
    """
    layouts: set = set()
    _recorders.append(layouts)
    try:
        yield layouts
    finally:
        _recorders.remove(layouts)


def _zeros_like_layout(layout: TensorLayout) -> torch.Tensor:
    """Zeros with ``layout``'s shape, strides, dtype and device."""
    shape, stride, dtype, device = layout
    storage = 1 + sum((n - 1) * st for n, st in zip(shape, stride))
    return torch.zeros(storage, dtype=dtype, device=device).as_strided(shape, stride)


def rebatch_layout(layout: SdpaLayout, from_batch: int, to_batch: int) -> SdpaLayout:
    """The q/k/v layout the same attention call has when the model runs ``to_batch`` samples
    instead of ``from_batch``.

    Tensors whose batch dim is ``from_batch`` get ``to_batch`` (their strides do not depend on the
    batch: they are views of per-token projections). A query of batch 1 while the model ran
    ``from_batch > 1`` samples is a folded batch (``[1, H, B*L, D]``: the knowledge branch puts
    every sample's rows into one long query against shared keys): its length scales instead.
    With ``from_batch == 1`` the two readings coincide and the unfolded one is taken.
    """
    q, k, v = layout
    folded = q[0][0] == 1 and from_batch > 1

    def retarget(t: TensorLayout, is_query: bool) -> TensorLayout:
        shape, stride, dtype, device = t
        if is_query and folded:
            length = shape[2] // from_batch * to_batch
            return (shape[0], shape[1], length, shape[3]), (length * stride[2], *stride[1:]), dtype, device
        if shape[0] == from_batch:
            return (to_batch, *shape[1:]), stride, dtype, device
        return t

    return retarget(q, True), retarget(k, False), retarget(v, False)


def prebuild_attention_plans(layouts, from_batch: int, to_batch: int) -> int:
    """Run SDPA once on zeros for every recorded layout, re-batched from ``from_batch`` to
    ``to_batch`` samples (:func:`rebatch_layout`).

    Why: torch's cuDNN attention builds an execution plan per new (batch, lengths, strides),
    60-80 ms of host time each on an H100 (benchmarks/results/sdpa_first_call.log), and its plan
    cache is per thread. Called while the GPU is still busy with a queued forward, the builds for
    the batch size the sampler switches to later cost no wall time; the real forwards then find
    their plans. A layout is the exact q/k/v shape and strides, so the plans match. CUDA only
    (elsewhere there is nothing to prebuild): returns the number of SDPA calls made.
    """
    calls = 0
    for layout in sorted(layouts, key=repr):
        if layout[0][3].type != "cuda":
            continue
        F.scaled_dot_product_attention(*(_zeros_like_layout(t) for t in rebatch_layout(layout, from_batch, to_batch)))
        calls += 1
    return calls


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
    ) -> torch.Tensor:
        """x ``[B, L, C]`` (packed ``[1, N, C]`` with ``layout``); context ``[B, Lc, Cc]`` (cross);
        rope: complex phases broadcastable to ``[B, L, D/2]`` (self with RoPE). Returns ``[B, L, C]``."""
        B, L, _ = x.shape
        H = self.num_heads
        if self.use_rope and rope is None:
            raise ValueError("this attention uses RoPE: pass rope=phases")
        if fused_enabled(x) and _pow2(self.head_dim // 2):
            q, k, v = self._qkv_fused(x, context, rope)
        else:
            q, k, v = self._qkv(x, context, rope)
        h = attend(q, k, v, q_layout=layout, kv_layout=layout if self._type == "self" else None)
        return self.to_out(h.reshape(B, L, -1))

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
