"""Transformer blocks of the TRELLIS.2 flow DiTs (shared by the dense and the sparse model).

Block (``ModulatedTransformerCrossBlock``; the sparse model uses the same block on its voxel tokens):
    shift/scale/gate (msa, mlp) = chunk6(modulation + mod)            # share_mod
    x += gate_msa * SelfAttn(norm1(x) * (1 + scale_msa) + shift_msa)   # RoPE, q/k RMS norm
    x += CrossAttn(norm2(x), cond) [+ knowledge_attn(x, ctx)]          # no modulation, no gate
    x += gate_mlp * MLP(norm3(x) * (1 + scale_mlp) + shift_mlp)
norm1/norm3: LayerNorm without affine, norm2: affine; all eps 1e-6, computed in fp32.

On CUDA with Triton (``fused.fused_enabled``) the same block runs with fused kernels: each
residual add (gated or not) together with the following LayerNorm and modulation in one pass,
q/k RMS norm + RoPE in one pass, the MLP's GELU in the GEMM epilogue (fp16/bf16), and with a
Know3D branch its LayerNorm in norm2's pass and its delta in the next residual; results agree
with the PyTorch path to half-precision rounding (one rounding where the reference has several).
The fused block is differentiable (the kernels have Triton backward passes; the MLP takes the plain
``Linear -> GELU -> Linear`` path when gradients are needed).
"""
from typing import Any, Optional

import torch
import torch.nn as nn

from .attention import MultiHeadAttention, TokenLayout
from ...sparse.kernel_dispatch import use_kernel
from .fused import fused_enabled, gated_residual, layer_norm_modulate, residual_layer_norm_modulate
from .norm import LayerNorm32

__all__ = ["FeedForwardNet", "ModulatedTransformerCrossBlock"]


class FeedForwardNet(nn.Module):
    """``[.., C] -> [.., C]``: Linear(C, int(C*ratio)) -> GELU(tanh) -> Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.mlp[0], self.mlp[2]
        device_ok = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and fused_enabled(x) \
            and isinstance(fc1, nn.Linear) and fc1.bias is not None and fc1.weight.dtype == x.dtype
        if use_kernel(device_ok, False, x, fc1.weight, fc1.bias):  # aten's _addmm_activation has no backward
            # GELU(tanh) in cuBLASLt's GEMM epilogue: the [.., hidden] activation is written once
            h = torch._addmm_activation(fc1.bias, x.reshape(-1, x.shape[-1]), fc1.weight.t(), use_gelu=True)
            return fc2(h).reshape(*x.shape[:-1], fc2.out_features)
        return self.mlp(x)


class ModulatedTransformerCrossBlock(nn.Module):
    """Self-attention + image cross-attention + MLP with adaLN modulation.

    Knowledge hook (docs/internals.md): ``knowledge_attn`` is None by default; when the Know3D
    branch is installed it is called parallel to the image cross-attention with the block input
    ``x`` (dense ``[B, L, C]``, or a SparseTensor for the sparse model) and the projected knowledge.
    """

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        use_rope: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        qkv_bias: bool = True,
        share_mod: bool = False,
    ):
        super().__init__()
        self.share_mod = share_mod
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = MultiHeadAttention(
            channels, num_heads, type="self", qkv_bias=qkv_bias, use_rope=use_rope, qk_rms_norm=qk_rms_norm
        )
        self.cross_attn = MultiHeadAttention(
            channels, num_heads, ctx_channels=ctx_channels, type="cross", qkv_bias=qkv_bias,
            qk_rms_norm=qk_rms_norm_cross,
        )
        self.mlp = FeedForwardNet(channels, mlp_ratio)
        if share_mod:
            self.modulation = nn.Parameter(torch.zeros(6 * channels))
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))
        self.knowledge_attn: Optional[nn.Module] = None

    def _modulation(self, mod: torch.Tensor):
        """mod ``[B, 6C]`` -> six ``[B, C]`` chunks in mod's dtype."""
        if self.share_mod:
            return (self.modulation + mod).type(mod.dtype).chunk(6, dim=1)
        return self.adaLN_modulation(mod).chunk(6, dim=1)

    def _knowledge_delta(self, x: torch.Tensor, ctx: Any, sparse: Any, **kw) -> torch.Tensor:
        """``knowledge_attn`` on the block input, in the representation the model uses.

        Dense models pass rows ``[B, L, C]`` as they are. The sparse model passes its input
        SparseTensor as ``sparse``: the rows go in as a SparseTensor on those coords
        (feats ``[N, C]``) and the returned SparseTensor's feats come back as rows. ``kw`` goes to
        ``knowledge_attn`` (``prenormed=True`` when x is already its norm's output).
        """
        if sparse is None:
            return self.knowledge_attn(x, ctx, **kw)
        h = sparse.replace(x.reshape(-1, x.shape[-1]))
        return self.knowledge_attn(h, ctx, **kw).feats.reshape(x.shape)

    def _branch_prenorm(self, eps: float) -> Optional[tuple]:
        """``(weight, bias)`` of the knowledge branch's LayerNorm when the fused norm2 pass can
        compute it too (the branch exposes ``prenorm()`` and uses the same eps); else None."""
        prenorm = getattr(self.knowledge_attn, "prenorm", None)
        if prenorm is None:
            return None
        weight, bias, branch_eps = prenorm()
        return (weight, bias) if branch_eps == eps else None

    def forward(
        self,
        x: torch.Tensor,
        mod: torch.Tensor,
        context: torch.Tensor,
        rope: Optional[torch.Tensor] = None,
        layout: Optional[TokenLayout] = None,
        knowledge_ctx: Any = None,
        sparse: Any = None,
        zero_cond_from: Optional[int] = None,
    ) -> torch.Tensor:
        """One block.

        Args:
            x: ``[B, L, C]`` (or packed ``[1, N, C]`` with ``layout``), block dtype.
            mod: ``[B, 6C]`` shared modulation (share_mod) or the timestep embedding ``[B, C]``.
            context: image tokens ``[B, Lc, Cc]``.
            rope: complex RoPE phases broadcastable to ``[B, L, D/2]``.
            knowledge_ctx: projected knowledge for ``knowledge_attn`` (None: branch off).
            sparse: the sparse model's input SparseTensor (its rows are the tokens of x), so that
                ``knowledge_attn`` receives a SparseTensor; None for the dense model.
            zero_cond_from: samples from this index on have an all-zero context (their cross-attention
                is one row, see ``MultiHeadAttention._zero_context_tail``); None: no such samples known.
        Returns:
            ``[B, L, C]``.
        """
        if fused_enabled(x):
            return self._forward_fused(x, mod, context, rope, layout, knowledge_ctx, sparse, zero_cond_from)
        chunks = self._modulation(mod)
        if layout is None:
            chunks = [c.unsqueeze(1) for c in chunks]
        else:
            chunks = [layout.per_row(c) for c in chunks]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks

        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + self.self_attn(h, rope=rope, layout=layout) * gate_msa
        branch = self.cross_attn(self.norm2(x), context, layout=layout, zero_from=zero_cond_from)
        if self.knowledge_attn is not None and knowledge_ctx is not None:
            x = x + branch + self._knowledge_delta(x, knowledge_ctx, sparse)
        else:
            x = x + branch
        h = self.norm3(x) * (1 + scale_mlp) + shift_mlp
        return x + self.mlp(h) * gate_mlp

    def _forward_fused(self, x, mod, context, rope, layout, knowledge_ctx, sparse,
                       zero_cond_from=None) -> torch.Tensor:
        """The same block with fused kernels (CUDA + Triton); same arguments and hook semantics."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._modulation(mod)
        rows = None if layout is None else layout.batch_index
        h = layer_norm_modulate(x, scale_msa, shift_msa, self.norm1.eps, 1.0, rows)
        attn = self.self_attn(h, rope=rope, layout=layout)
        knowledge = self.knowledge_attn is not None and knowledge_ctx is not None
        prenorm = self._branch_prenorm(self.norm2.eps) if knowledge else None
        if prenorm is not None:  # norm2 and the branch's norm of the same rows in one pass
            x, h, hk = residual_layer_norm_modulate(x, attn, gate_msa, self.norm2.weight, self.norm2.bias,
                                                    self.norm2.eps, 0.0, rows, second=prenorm)
        else:
            x, h = residual_layer_norm_modulate(x, attn, gate_msa, self.norm2.weight, self.norm2.bias,
                                                self.norm2.eps, 0.0, rows)
        branch = self.cross_attn(h, context, layout=layout, zero_from=zero_cond_from)
        delta = None
        if prenorm is not None:
            delta = self._knowledge_delta(hk, knowledge_ctx, sparse, prenormed=True)
        elif knowledge:
            delta = self._knowledge_delta(x, knowledge_ctx, sparse)
        # x + cross + knowledge in one rounding, then norm3 (a zero delta leaves x + cross exact)
        x, h = residual_layer_norm_modulate(x, branch, None, scale_mlp, shift_mlp, self.norm3.eps, 1.0, rows, z=delta)
        return gated_residual(x, self.mlp(h), gate_mlp, rows)
