"""The Know3D injection branch (paper §3.2.1) for both TRELLIS.2 flow DiTs.

    P = LayerNorm(Linear(C))                          once per generation (KnowledgeProjector)
    h = h + CrossAttn(norm2(h), cond) + ZeroLinear(KnowledgeAttn(norm(h), P))      every block

``KnowledgeCrossAttention`` is the flow models' own cross-attention class (same ``to_q``,
``to_kv``, q/k RMS norm, ``to_out`` and attention kernel, so packed variable-length voxel
queries work) plus its own affine ``norm``; its ``to_out`` is the zero-initialised linear layer, so
an untrained branch adds exactly zero. The keys/values of the knowledge (``to_kv(P)`` and the k RMS
norm) depend only on the knowledge, so a :class:`KnowledgeContext` computes them once per block
and reuses them at every sampling step and for both CFG passes.

Hook contract (docs/internals.md): ``model.knowledge_proj`` and ``block.knowledge_attn``;
``model.forward(..., knowledge=k)`` calls ``ctx = model.knowledge_proj(k)`` once per forward and
every block calls ``block.knowledge_attn(h, ctx)``. ``k`` may be a :class:`Knowledge`, a raw
``[B, N, D]`` tensor, or a context from :func:`prepare_knowledge` (returned as is: no recompute).

Precision: like the reference, the linear layers inside ``blocks`` run in the model dtype (bf16);
the projector (outside the blocks), every LayerNorm and the RMS gammas stay fp32.

Speed (CUDA + Triton, ``fused_enabled``, no autograd): the branch's LayerNorm and the q/k RMS norms
run as the flow blocks' fused kernels (one pass each, fp32 math, one rounding; no fp32 copies of the
tokens), and the queries stay one contiguous ``[1, B*L, H, D]`` tensor from the RMS norm to the
attention and ``to_out`` (no copies). CPU and autograd runs take the PyTorch ops unchanged.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..trellis2.modules.attention import MultiHeadAttention, TokenLayout, attend
from ..trellis2.modules.fused import fused_enabled, layer_norm_modulate, qk_norm_rope
from ..trellis2.modules.norm import LayerNorm32
from .kinds import Knowledge, check_knowledge, describe_expected

__all__ = [
    "KnowledgeProjector",
    "KnowledgeCrossAttention",
    "KnowledgeContext",
    "install_branch",
    "remove_branch",
    "has_branch",
    "require_branch",
    "prepare_knowledge",
    "branch_state_dict",
    "BRANCH_PREFIXES",
]

BRANCH_PREFIXES = ("knowledge_proj.", "knowledge_attn.")
LN_EPS = 1e-6

KnowledgeInput = Union[Knowledge, torch.Tensor, "KnowledgeContext"]


class KnowledgeContext:
    """Projected knowledge for one model, with per-block keys/values cached on first use.

    Attributes:
        tokens: ``P [Bk, N, C]`` in the model's block dtype.
        kind, provenance: copied from the :class:`Knowledge` (None / {} for a raw tensor).
    Valid as long as the branch weights do not change (one generation); build a new one for new
    knowledge. ``Bk`` is 1 (shared by every sample and both CFG passes) or divides the batch
    (tiled: samples ``[k0..k_{Bk-1}, k0..]``, the order of a concatenated CFG pair).
    """

    def __init__(self, tokens: torch.Tensor, projector: "KnowledgeProjector", kind=None, provenance=None):
        self.tokens = tokens
        self.kind = kind
        self.provenance = dict(provenance or {})
        self._projector = weakref.ref(projector)
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    def made_by(self, projector: "KnowledgeProjector") -> bool:
        return self._projector() is projector

    def kv(self, attn: "KnowledgeCrossAttention") -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[Bk, N, H, D]`` of ``attn``'s block (computed once, then cached)."""
        key = id(attn)
        if key not in self._kv:
            self._kv[key] = attn.project_kv(self.tokens)
        return self._kv[key]

    def clear(self) -> None:
        """Drop the cached keys/values (memory: 2 x Bk x N x C per block)."""
        self._kv.clear()


class KnowledgeProjector(nn.Module):
    """``P = LayerNorm(Linear(C))``: knowledge ``[B, N, D]`` -> context tokens ``[B, N, C]``.

    Keys: ``linear.{weight [C, D], bias}``, ``norm.{weight, bias} [C]``.

    Args:
        knowledge_dim: D.
        channels: C, the flow model's width.
        kind: the knowledge kind the weights were trained for (None: not checked).
        mmdit_layers, sigma: for ``mmdit_hidden``, the capture the weights were trained for.
        out_dtype: dtype of ``P`` (the model's block dtype).
    """

    def __init__(
        self,
        knowledge_dim: int,
        channels: int,
        kind: Optional[str] = None,
        mmdit_layers: Optional[list[int]] = None,
        sigma: Optional[float] = None,
        out_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.knowledge_dim = int(knowledge_dim)
        self.channels = int(channels)
        self.kind = kind
        self.mmdit_layers = None if mmdit_layers is None else [int(i) for i in mmdit_layers]
        self.sigma = None if sigma is None else float(sigma)
        self.out_dtype = out_dtype
        self.linear = nn.Linear(self.knowledge_dim, self.channels)
        self.norm = LayerNorm32(self.channels, elementwise_affine=True, eps=LN_EPS)
        self._last: Optional[tuple[weakref.ref, int, KnowledgeContext]] = None

    def describe(self) -> str:
        """What the branch was trained for, e.g. ``mmdit_hidden (D=12288, layers [..], sigma 0.25)``."""
        return describe_expected(self.kind, self.knowledge_dim, self.mmdit_layers, self.sigma)

    def check(self, knowledge: Union[Knowledge, torch.Tensor]) -> None:
        """Raise :class:`KnowledgeMismatchError` naming both sides when ``knowledge`` does not fit."""
        check_knowledge(knowledge, self.kind, self.knowledge_dim, self.mmdit_layers, self.sigma,
                        origin="the Know3D branch")

    def project(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` -> ``P [B, N, C]`` in ``out_dtype`` (computed in fp32)."""
        w = self.linear.weight
        h = self.linear(tensor.to(device=w.device, dtype=w.dtype))
        return self.norm(h.float()).to(self.out_dtype)

    def forward(self, knowledge: KnowledgeInput) -> KnowledgeContext:
        """Knowledge -> :class:`KnowledgeContext` (a context made by this projector passes through).

        Without autograd the last context is reused while the same knowledge tensor (same object,
        not modified in place; for inference-mode tensors, which keep no version counter, the same
        object) comes back, so per-step calls compute the keys/values only once.
        """
        if isinstance(knowledge, KnowledgeContext):
            if not knowledge.made_by(self):
                raise ValueError(
                    "this KnowledgeContext was prepared for another model; call "
                    "prepare_knowledge(model, knowledge) once per flow model"
                )
            return knowledge
        self.check(knowledge)
        tensor = knowledge.tensor if isinstance(knowledge, Knowledge) else knowledge
        cache = not torch.is_grad_enabled()
        if cache and self._last is not None:
            ref, version, ctx = self._last
            if ref() is tensor and _version(tensor) == version:
                return ctx
        kind = knowledge.kind if isinstance(knowledge, Knowledge) else None
        prov = knowledge.provenance if isinstance(knowledge, Knowledge) else None
        ctx = KnowledgeContext(self.project(tensor), self, kind, prov)
        self._last = (weakref.ref(tensor), _version(tensor), ctx) if cache else None
        return ctx

    def clear_cache(self) -> None:
        """Forget the last context (frees its cached keys/values)."""
        self._last = None

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half(): a cached context would live on the old device / dtype
        self._last = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._last = None  # new weights: the cached context is stale
        return super()._load_from_state_dict(*args, **kwargs)


def _version(tensor: torch.Tensor) -> int:
    """In-place modification counter; inference-mode tensors have none (then identity alone counts)."""
    return -1 if tensor.is_inference() else tensor._version


class KnowledgeCrossAttention(MultiHeadAttention):
    """Per-block knowledge cross-attention: ``ZeroLinear(Attn(norm(h), P))``.

    Keys: ``norm.{weight, bias}``, ``to_q``, ``to_kv`` (``[2C, C]``: the knowledge enters already
    projected to C), ``q_rms_norm.gamma``, ``k_rms_norm.gamma`` (when ``qk_rms_norm``), ``to_out``
    (zero-initialised).

    forward(h, ctx): ``h`` dense ``[B, L, C]`` or a SparseTensor with feats ``[N, C]``; returns the
    delta in the same form.
    """

    def __init__(self, channels: int, num_heads: int, qk_rms_norm: bool = True, qkv_bias: bool = True):
        super().__init__(channels, num_heads, ctx_channels=channels, type="cross", qkv_bias=qkv_bias,
                         qk_rms_norm=qk_rms_norm)
        self.norm = LayerNorm32(channels, elementwise_affine=True, eps=LN_EPS)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def project_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``P [Bk, N, C]`` -> keys, values ``[Bk, N, H, D]`` (k RMS-normed), both contiguous
        (v is copied out of the projection so the cache holds 2, not 3, x Bk x N x C)."""
        Bk, N, _ = tokens.shape
        w = self.to_kv.weight
        k, v = self.to_kv(tokens.to(device=w.device, dtype=w.dtype)).reshape(Bk, N, 2, self.num_heads, -1).unbind(2)
        if self.qk_rms_norm:
            k = self._rms_norm(k, self.k_rms_norm)
        return k.contiguous(), v.contiguous()

    def _fused(self, x: torch.Tensor) -> bool:
        """Fused kernels for ``x``: CUDA + Triton + switch on, and no autograd (the kernels have no backward)."""
        return fused_enabled(x) and not torch.is_grad_enabled()

    def _rms_norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """Per-head RMS norm of ``[B', L', H, D]`` (rows may be strided views) by ``norm``'s gamma."""
        if self._fused(x) and _pow2(self.head_dim // 2):
            return qk_norm_rope(x, norm.gamma, None, norm.eps)
        return norm(x)

    def _layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The branch's affine LayerNorm of ``[B', L', C]`` rows (fp32 statistics, x's dtype out)."""
        if self._fused(x):
            # LayerNorm(x) * (0 + weight) + bias in one pass, the blocks' norm2 kernel
            return layer_norm_modulate(x, self.norm.weight, self.norm.bias, self.norm.eps, 0.0)
        return self.norm(x)

    def prenorm(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(weight, bias, eps)`` of the branch's LayerNorm: a block whose fused kernel already
        normalises the same rows computes this norm in that pass and calls ``forward(.., prenormed=True)``."""
        return self.norm.weight, self.norm.bias, self.norm.eps

    def _query(self, x: torch.Tensor, prenormed: bool = False) -> torch.Tensor:
        """Rows ``[B', L', C]`` (already through ``norm`` when ``prenormed``) -> queries ``[B', L', H, D]``."""
        q = self.to_q(x if prenormed else self._layer_norm(x)).reshape(*x.shape[:2], self.num_heads, -1)
        return self._rms_norm(q, self.q_rms_norm) if self.qk_rms_norm else q

    def _attend_rows(self, x: torch.Tensor, ctx: KnowledgeContext, layout: Optional[TokenLayout],
                     prenormed: bool = False) -> torch.Tensor:
        """x ``[B, L, C]`` (or packed ``[1, N, C]`` with ``layout``) -> delta of the same shape.

        One knowledge sample shared by the whole batch (the usual case: every sample and both CFG
        passes): every row attends to the same keys, so all rows go into one attention call as a
        single long query ``[1, B*L, H, D]``; no copies of the keys, no per-sample layout.
        """
        B = x.shape[0] if layout is None else layout.batch_size
        k, v = ctx.kv(self)
        q = self._query(x, prenormed)
        if k.shape[0] == 1:
            h = attend(q.reshape(1, -1, *q.shape[2:]), k, v)
        else:
            h = attend(q, _match_batch(k, B), _match_batch(v, B), q_layout=layout)
        return self.to_out(h.reshape(*x.shape[:2], -1))

    def forward(self, h: Any, ctx: KnowledgeContext, prenormed: bool = False) -> Any:
        """Delta for block input ``h`` (``prenormed``: ``h`` is already ``norm(block input)``)."""
        if not isinstance(ctx, KnowledgeContext):
            raise TypeError(f"knowledge_attn needs a KnowledgeContext (model.knowledge_proj output), got {type(ctx).__name__}")
        if isinstance(h, torch.Tensor):
            return self._attend_rows(h, ctx, None, prenormed)
        if ctx.batch_size == 1:
            delta = self._attend_rows(h.feats.unsqueeze(0), ctx, None, prenormed)
        else:
            lens = h.seqlens_list
            if all(n == lens[0] for n in lens):
                # equal token counts (a CFG pair on shared coords): a plain [B, L, C] batch
                delta = self._attend_rows(h.feats.reshape(len(lens), lens[0], -1), ctx, None, prenormed)
            else:
                delta = self._attend_rows(h.feats.unsqueeze(0), ctx, _sparse_layout(h), prenormed)
        return h.replace(delta.reshape(h.feats.shape))


def _pow2(n: int) -> bool:
    """The fused RMS-norm kernel tiles the head dim in powers of two (``head_dim // 2`` too)."""
    return n > 0 and n & (n - 1) == 0


def _match_batch(kv: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Keys/values of ``Bk`` knowledge samples for a batch of ``B`` (Bk == B, or tiled when Bk divides B)."""
    bk = kv.shape[0]
    if bk == batch_size:
        return kv
    if batch_size % bk == 0:
        return kv.repeat(batch_size // bk, *([1] * (kv.dim() - 1)))
    raise ValueError(f"knowledge has batch {bk} but the model runs a batch of {batch_size}; use 1 or a divisor")


def _sparse_layout(x: Any) -> TokenLayout:
    """TokenLayout of a SparseTensor's rows, cached in its (coords-shared) cache."""
    layout = x.cache.get("know3d_token_layout")
    if layout is None:
        layout = TokenLayout(seqlens=x.seqlens, seqlens_list=x.seqlens_list, batch_index=x.batch_index)
        x.cache["know3d_token_layout"] = layout
    return layout


def has_branch(model: nn.Module) -> bool:
    """True when ``model`` carries a Know3D branch."""
    return getattr(model, "knowledge_proj", None) is not None


def require_branch(models: Mapping[str, nn.Module], kind: str) -> None:
    """The one "no branch" check: ValueError naming every model of ``models`` (name -> flow) that
    has no Know3D branch, for ``kind`` knowledge that must be injected."""
    plain = [name for name, model in models.items() if not has_branch(model)]
    if plain:
        raise ValueError(
            f"{kind} knowledge needs a Know3D branch, but {', '.join(plain)} ha{'s' if len(plain) == 1 else 've'} "
            "none: load the pipeline with know3d=<a Know3D checkpoint with weights for them> "
            "(or use variant 'multiview' / 'none', which inject nothing)"
        )


def install_branch(
    model: nn.Module,
    knowledge_dim: int,
    kind: Optional[str] = None,
    mmdit_layers: Optional[list[int]] = None,
    sigma: Optional[float] = None,
    num_heads: Optional[int] = None,
    qk_rms_norm: bool = True,
    empty: bool = False,
) -> nn.Module:
    """Add a fresh (zero-output) Know3D branch to a TRELLIS.2 flow model, in place.

    Sets ``model.knowledge_proj`` and every ``block.knowledge_attn`` on the model's device; the
    attention linear layers take the model's block dtype. Returns ``model``.

    Args:
        knowledge_dim: D of the knowledge tokens.
        kind, mmdit_layers, sigma: what the branch is for (checked at every forward; see
            :meth:`KnowledgeProjector.check`).
        num_heads: heads of the knowledge attention (default: the model's).
        qk_rms_norm: per-head RMS norm of q and k, like TRELLIS.2's image cross-attention.
        empty: allocate without initialising (every branch tensor must be loaded afterwards; the
            checkpoint loaders do this, which skips ~0.3 B parameters of random init per model).
    """
    if not hasattr(model, "knowledge_proj") or not hasattr(model, "blocks"):
        raise TypeError(f"{type(model).__name__} has no Know3D hooks (knowledge_proj, blocks[*].knowledge_attn)")
    if has_branch(model):
        raise ValueError(f"{type(model).__name__} already has a Know3D branch; remove_branch(model) first")
    channels = int(model.model_channels)
    heads = int(num_heads or model.num_heads)
    device = next(model.parameters()).device
    dtype = getattr(model, "dtype", torch.float32)

    def place(module: nn.Module) -> nn.Module:
        return module.to_empty(device=device) if empty else module.to(device)

    with torch.device("meta") if empty else contextlib.nullcontext():
        proj = KnowledgeProjector(knowledge_dim, channels, kind, mmdit_layers, sigma, out_dtype=dtype)
        attns = [KnowledgeCrossAttention(channels, heads, qk_rms_norm=qk_rms_norm) for _ in model.blocks]
    model.knowledge_proj = place(proj)
    for block, attn in zip(model.blocks, attns):
        for module in attn.modules():
            if isinstance(module, nn.Linear):
                module.to(dtype)
        block.knowledge_attn = place(attn)
    return model


def remove_branch(model: nn.Module) -> nn.Module:
    """Remove the Know3D branch (the model is plain TRELLIS.2 again). Returns ``model``."""
    model.knowledge_proj = None
    for block in model.blocks:
        block.knowledge_attn = None
    return model


def prepare_knowledge(model: nn.Module, knowledge: Union[Knowledge, torch.Tensor]) -> KnowledgeContext:
    """Project the knowledge and compute every block's keys/values once, for a whole generation.

    Pass the result as ``model(x, t, cond, knowledge=ctx)`` at every step and for both CFG passes.
    Each flow model needs its own context (the weights differ).
    """
    if not has_branch(model):
        raise ValueError(f"{type(model).__name__} has no Know3D branch: load a Know3D checkpoint first")
    ctx = model.knowledge_proj(knowledge)
    for block in model.blocks:
        ctx.kv(block.knowledge_attn)
    return ctx


def branch_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The branch's tensors under the model's key names (``knowledge_proj.*``, ``blocks.i.knowledge_attn.*``)."""
    return {
        k: v for k, v in model.state_dict().items()
        if k.startswith(BRANCH_PREFIXES[0]) or f".{BRANCH_PREFIXES[1]}" in k
    }
