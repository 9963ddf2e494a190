"""Variable-length attention on torch's scaled_dot_product_attention.

Tokens of all batch items are packed along dim 0: ``q [Tq, H, D]`` holds ``q_seqlens[b]`` rows
for item b, in order (the same packing as SparseTensor rows). No flash_attn is needed; SDPA picks
its own kernel (flash / cuDNN / memory-efficient / math) for each call.

Strategy, chosen from the lengths alone:
- all items the same length (q and kv each): one batched SDPA ``[B, H, L, D]``, no padding;
- keys/values all the same length but queries differ: queries padded to the longest, no mask
  (padded query rows are computed and thrown away; every real row sees exactly its own keys);
- otherwise: one SDPA per batch item (each item's own lengths, no mask, no padding).
Each path computes per row exactly ``softmax(q k^T * scale) v`` over that item's keys.

Plan builds: on CUDA, SDPA's default kernel for the flows (cuDNN) builds an execution plan the first time a
thread calls it with new sizes and strides (40-60 ms on an H100). :func:`flash_for_new_shapes` lets a
caller run such first calls with FlashAttention-2 instead (no plan), leaving the builds to later calls
that the host makes while the GPU is busy.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["varlen_attention", "dense_attention", "AttentionPlans", "record_attention_plans", "flash_for_new_shapes"]

SeqLens = Union[Sequence[int], torch.Tensor]


class AttentionPlans:
    """Signatures of the dense SDPA calls made while recording (:func:`record_attention_plans`), to
    build torch's cuDNN attention plans for another batch size before that batch size is used.

    cuDNN attention builds an execution plan on its first call with each new (batch, lengths,
    strides) and keeps it in a per-thread cache: 40-60 ms a build on an H100
    (benchmarks/probe_sdpa_plans.py). torch keys that cache on the device, dtype, the q/k/v sizes and
    strides and the call's flags (causal, dropout, statistics, bias), not on data pointers or the scale
    (``MHAParams`` in torch's ``aten/src/ATen/native/cudnn/MHA.cpp``; the cache is ``thread_local``), so a
    call on another buffer with the recorded sizes and strides, on the same thread, builds the very plan
    the real call will look up. A flow's unguided steps run at half its guided batch, so
    for a new token count their plans are new too; :meth:`prebuild` makes those calls early, on
    the caller's thread, while the GPU still runs the work queued before.
    """

    def __init__(self):
        self.signatures: dict = {}  # (q, k, v shape/stride, dtype, device, scale) -> None, in call order
        self.recording = True
        self.thread = threading.get_ident()  # the plan cache is per thread: only this thread's calls count

    def note(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> None:
        """Remember one call's ``q/k/v [B, H, L, D]`` (as passed to SDPA) when recording and made on the
        recorder's thread (another thread's calls, e.g. a kernel warm-up's forward, build their own plans)."""
        if self.recording and threading.get_ident() == self.thread:
            views = tuple((tuple(t.shape), t.stride(), t.storage_offset()) for t in (q, k, v))
            self.signatures.setdefault(views + (q.dtype, q.device, scale), None)

    def prebuild(self, batch: int) -> int:
        """Stop recording; call SDPA once per recorded signature with the batch dim set to ``batch``
        (signatures already at ``batch`` are skipped), on uninitialised tensors of the same strides and
        storage offsets (so the same alignment) sharing one buffer. Returns the number of calls made."""
        self.recording = False
        calls = 0
        for *tensors, dtype, device, scale in self.signatures:
            if tensors[0][0][0] == batch:
                continue
            views = [((batch, *size[1:]), stride, offset) for size, stride, offset in tensors]
            need = max(offset + 1 + sum((n - 1) * st for n, st in zip(size, stride)) for size, stride, offset in views)
            buf = torch.empty(need, dtype=dtype, device=device)
            q, k, v = (buf.as_strided(*view) for view in views)
            F.scaled_dot_product_attention(q, k, v, scale=scale)
            if q.device.type in PLAN_DEVICES:
                _new_shapes.seen.add(_plan_key(q, k, v))  # built: the later real call is not a first call
            calls += 1
        return calls


_recorders: List[AttentionPlans] = []


@contextlib.contextmanager
def record_attention_plans() -> Iterator[AttentionPlans]:
    """Inside the block, every :func:`dense_attention` call this thread makes has its signature noted by
    the yielded :class:`AttentionPlans`."""
    plans = AttentionPlans()
    _recorders.append(plans)
    try:
        yield plans
    finally:
        _recorders.remove(plans)


PLAN_DEVICES = ("cuda",)  # device types whose default SDPA kernel builds a plan per new signature
NO_PLAN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
SEEN_LIMIT = 4096  # signatures remembered per thread; past it the memory starts again (a later first call
#                    may then take FlashAttention-2 once more: slower, never wrong)


class _NewShapes(threading.local):
    """Per thread, like torch's plan cache: the signatures this thread has run with SDPA's default
    kernels (so their plans exist), whether :func:`flash_for_new_shapes` is on, and its count of calls
    that took FlashAttention-2."""

    def __init__(self):
        self.seen: set = set()
        self.active = False
        self.flash_calls = 0


_new_shapes = _NewShapes()


@contextlib.contextmanager
def flash_for_new_shapes() -> Iterator[Callable[[], None]]:
    """Inside the block (until the yielded ``stop()`` is called), a :func:`dense_attention` call on a
    plan-building device (``PLAN_DEVICES``) whose signature (q/k/v sizes and strides, dtype, device: what
    torch keys its plans on, see :class:`AttentionPlans`) this thread has not yet run with the default
    kernels runs with FlashAttention-2 (then the memory-efficient kernel, then math), which builds no
    plan; every other call runs as usual. Elsewhere it changes nothing."""
    before = _new_shapes.active
    _new_shapes.active = True

    def stop() -> None:
        _new_shapes.active = False

    try:
        yield stop
    finally:
        _new_shapes.active = before


def _plan_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    return tuple((tuple(t.shape), t.stride()) for t in (q, k, v)) + (q.dtype, q.device)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    """SDPA on ``[B, H, L, D]``; on a plan-building device, the first call of a signature takes
    FlashAttention-2 while :func:`flash_for_new_shapes` is on, else it is remembered as built."""
    state = _new_shapes
    if q.device.type in PLAN_DEVICES:
        key = _plan_key(q, k, v)
        if key not in state.seen:
            if state.active:
                state.flash_calls += 1
                with sdpa_kernel(NO_PLAN_BACKENDS):
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)
            if len(state.seen) >= SEEN_LIMIT:
                state.seen.clear()
            state.seen.add(key)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None
) -> torch.Tensor:
    """Batched attention in token-major layout.

    Args:
        q: ``[B, Lq, H, D]``; k: ``[B, Lk, H, D]``; v: ``[B, Lk, H, Dv]``.
    Returns:
        ``[B, Lq, H, Dv]``.
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    for plans in _recorders:
        plans.note(q, k, v, scale)
    return _sdpa(q, k, v, scale).transpose(1, 2)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_seqlens: SeqLens,
    kv_seqlens: Optional[SeqLens] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention of each batch item's queries over that item's keys only.

    Args:
        q: ``[Tq, H, D]`` packed queries, ``Tq = sum(q_seqlens)``.
        k: ``[Tk, H, D]`` packed keys, ``Tk = sum(kv_seqlens)``.
        v: ``[Tk, H, Dv]`` packed values.
        q_seqlens: query rows per item (python ints or a LongTensor[B]; a tensor costs a host sync).
        kv_seqlens: key rows per item; None means the same as q_seqlens (self-attention).
        scale: softmax scale; None means ``1/sqrt(D)``.
    Returns:
        ``[Tq, H, Dv]`` packed like q.
    """
    q_lens = _as_list(q_seqlens)
    kv_lens = q_lens if kv_seqlens is None else _as_list(kv_seqlens)
    _check_inputs(q, k, v, q_lens, kv_lens)
    B = len(q_lens)
    if B == 0 or q.shape[0] == 0:
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2])

    kv_equal = all(n == kv_lens[0] for n in kv_lens)
    if kv_equal and all(n == q_lens[0] for n in q_lens):
        return _equal_lengths(q, k, v, B, scale)
    if kv_equal:
        return _padded_queries(q, k, v, q_lens, scale)
    return _per_item(q, k, v, q_lens, kv_lens, scale)


def _equal_lengths(q, k, v, B: int, scale) -> torch.Tensor:
    """All items equal length: reshape to ``[B, L, H, D]`` and run one SDPA."""
    out = dense_attention(
        q.reshape(B, -1, *q.shape[1:]), k.reshape(B, -1, *k.shape[1:]), v.reshape(B, -1, *v.shape[1:]), scale
    )
    return out.reshape(q.shape[0], q.shape[1], v.shape[2])


def _padded_queries(q, k, v, q_lens: list[int], scale) -> torch.Tensor:
    """Equal key counts, ragged queries: pad queries to ``[B, Lq_max, H, D]``, no mask needed."""
    B, L = len(q_lens), max(q_lens)
    H, D = q.shape[1], q.shape[2]
    row_idx = _padding_index(q_lens, L, q.device)
    q_pad = q.new_zeros(B * L, H, D).index_copy_(0, row_idx, q)
    out = dense_attention(q_pad.view(B, L, H, D), k.view(B, -1, *k.shape[1:]), v.view(B, -1, *v.shape[1:]), scale)
    return out.reshape(B * L, H, v.shape[2]).index_select(0, row_idx)


def _per_item(q, k, v, q_lens: list[int], kv_lens: list[int], scale) -> torch.Tensor:
    """Ragged keys: one SDPA per batch item; items with no queries are skipped."""
    outs = []
    q0 = k0 = 0
    for nq, nk in zip(q_lens, kv_lens):
        if nq:
            outs.append(dense_attention(q[None, q0:q0 + nq], k[None, k0:k0 + nk], v[None, k0:k0 + nk], scale)[0])
        q0 += nq
        k0 += nk
    return torch.cat(outs, dim=0)


def _padding_index(lens: list[int], L: int, device) -> torch.Tensor:
    """``row_idx [T]``: packed row t (items of lengths ``lens``) sits at slot ``row_idx[t]`` of a
    ``[B * L]`` padded layout. Made on ``device`` (a copy of host data would wait for the GPU's queue)."""
    return torch.cat([torch.arange(b * L, b * L + n, device=device) for b, n in enumerate(lens)])


def _as_list(seqlens: SeqLens) -> list[int]:
    if isinstance(seqlens, torch.Tensor):
        return [int(n) for n in seqlens.tolist()]
    return [int(n) for n in seqlens]


def _check_inputs(q, k, v, q_lens: list[int], kv_lens: list[int]) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"varlen_attention needs q/k/v of ndim 3 ([T, H, D]); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if len(q_lens) != len(kv_lens):
        raise ValueError(f"varlen_attention: {len(q_lens)} query lengths but {len(kv_lens)} key lengths")
    if sum(q_lens) != q.shape[0]:
        raise ValueError(f"varlen_attention: q has {q.shape[0]} rows but q_seqlens sum to {sum(q_lens)}")
    if sum(kv_lens) != k.shape[0] or k.shape[0] != v.shape[0]:
        raise ValueError(
            f"varlen_attention: k has {k.shape[0]} rows, v {v.shape[0]}, but kv_seqlens sum to {sum(kv_lens)}"
        )
    if q.shape[1] != k.shape[1] or k.shape[1] != v.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"varlen_attention: head/dim mismatch q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if any(nk == 0 and nq > 0 for nq, nk in zip(q_lens, kv_lens)):
        raise ValueError("varlen_attention: a batch item has queries but no keys (softmax over nothing)")
    if any(n < 0 for n in q_lens + kv_lens):
        raise ValueError("varlen_attention: negative sequence length")
