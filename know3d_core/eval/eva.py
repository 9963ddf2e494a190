"""EVA transformer blocks and the EVA02-E image tower, in the module layout of ``timm``'s ``Eva``
(so official checkpoints load by their own key names; nothing here imports timm).

Used by :mod:`know3d_core.eval.uni3d`: Uni3D's point encoder runs the ``blocks`` / ``norm`` /
``fc_norm`` of a timm EVA model (``eva02_{tiny,small,base,large}_patch14_*``, ``eva_giant_patch14_560``)
on point-patch tokens, and pairs with OpenCLIP's ``EVA02-E-14-plus`` image tower (timm
``eva02_enormous_patch14_clip_224`` under ``visual.trunk.``).

A block's variant is read from its keys (:func:`block_spec`): fused ``qkv`` with ``q_bias`` /
``v_bias`` or separate ``q_proj`` / ``k_proj`` (no bias) / ``v_proj``; MLP = GELU ``fc1``/``fc2``,
packed GLU ``fc1`` (``2H`` outputs, ``silu(first half) * second half``) or SwiGLU ``fc1_g`` /
``fc1_x``, with or without ``mlp.norm``; optional ``attn.norm`` and layer scales ``gamma_1`` /
``gamma_2``. Two things the keys cannot tell are arguments: the head count and pre- vs post-norm.
LayerNorm eps is timm's ``1e-6`` unless the spec says otherwise (the PointBERT blocks of ULIP-2 are
the same pre-norm ViT block with torch's ``1e-5``, fused ``qkv`` without bias, GELU MLP).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BlockSpec", "block_spec", "EvaBlock", "EvaImageTower", "count_blocks", "state_subset", "LN_EPS"]

LN_EPS = 1e-6


@dataclass(frozen=True)
class BlockSpec:
    """One EVA block: ``dim`` width, ``heads``, ``hidden`` MLP width and the variant flags."""

    dim: int
    heads: int
    hidden: int
    qkv: str = "fused"        # "fused" (qkv + q_bias/v_bias), "fused_nobias", "split"
    mlp: str = "gelu"         # "gelu", "glu" (packed), "swiglu" (fc1_g / fc1_x)
    mlp_norm: bool = False
    attn_norm: bool = False
    layer_scale: bool = False
    post_norm: bool = False
    eps: float = LN_EPS       # LayerNorm eps (timm EVA: 1e-6; PointBERT's torch default: 1e-5)


def count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of consecutive ``{prefix}blocks.{i}.`` groups in ``state``."""
    n = 0
    while any(k.startswith(f"{prefix}blocks.{n}.") for k in state):
        n += 1
    return n


def block_spec(state: Mapping[str, torch.Tensor], prefix: str, heads: int, post_norm: bool = False,
               eps: float = LN_EPS) -> BlockSpec:
    """The :class:`BlockSpec` of block ``{prefix}blocks.0.`` from its key names and shapes.

    Raises ``KeyError`` naming the first key that is needed and absent.
    """
    b = f"{prefix}blocks.0."
    dim = _need(state, b + "norm1.weight").shape[0]
    if b + "attn.qkv.weight" in state:
        qkv = "fused" if b + "attn.q_bias" in state else "fused_nobias"
    else:
        _need(state, b + "attn.q_proj.weight")
        qkv = "split"
    if b + "mlp.fc1_g.weight" in state:
        mlp, hidden = "swiglu", state[b + "mlp.fc1_g.weight"].shape[0]
    else:
        fc1, fc2 = _need(state, b + "mlp.fc1.weight").shape[0], _need(state, b + "mlp.fc2.weight").shape[1]
        mlp, hidden = ("glu", fc2) if fc1 == 2 * fc2 else ("gelu", fc1)
    return BlockSpec(dim=dim, heads=heads, hidden=hidden, qkv=qkv, mlp=mlp,
                     mlp_norm=b + "mlp.norm.weight" in state, attn_norm=b + "attn.norm.weight" in state,
                     layer_scale=b + "gamma_1" in state, post_norm=post_norm, eps=eps)


def _need(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise KeyError(key)
    return state[key]


def _norm(dim: int, eps: float = LN_EPS) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=eps)


class _Attention(nn.Module):
    """Multi-head self-attention, ``[B, N, C] -> [B, N, C]`` (EVA: no key bias)."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        c = spec.dim
        self.heads, self.kind = spec.heads, spec.qkv
        if spec.qkv == "split":
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(c, c), nn.Linear(c, c, bias=False), nn.Linear(c, c)
        else:
            self.qkv = nn.Linear(c, 3 * c, bias=False)
            if spec.qkv == "fused":
                self.q_bias, self.v_bias = nn.Parameter(torch.zeros(c)), nn.Parameter(torch.zeros(c))
        self.norm = _norm(c, spec.eps) if spec.attn_norm else nn.Identity()
        self.proj = nn.Linear(c, c)

    def _qkv(self, x: torch.Tensor):
        if self.kind == "split":
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        bias = None
        if self.kind == "fused":
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        return F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self._qkv(x))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(self.norm(out))


class _Mlp(nn.Module):
    """``[..., C] -> [..., C]``: GELU MLP, packed GLU or SwiGLU (SiLU gate), optional inner LayerNorm."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        c, h = spec.dim, spec.hidden
        self.kind = spec.mlp
        if spec.mlp == "swiglu":
            self.fc1_g, self.fc1_x = nn.Linear(c, h), nn.Linear(c, h)
        else:
            self.fc1 = nn.Linear(c, 2 * h if spec.mlp == "glu" else h)
        self.norm = _norm(h, spec.eps) if spec.mlp_norm else nn.Identity()
        self.fc2 = nn.Linear(h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.fc1_g(x)) * self.fc1_x(x)
        elif self.kind == "glu":
            gate, value = self.fc1(x).chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(self.fc1(x))
        return self.fc2(self.norm(h))


class EvaBlock(nn.Module):
    """One EVA block ``[B, N, C] -> [B, N, C]``: pre-norm (``x + g1 * attn(norm1(x))``, then the MLP
    alike) or post-norm (``x + norm1(attn(x))``, ``x + norm2(mlp(x))``)."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.post_norm = spec.post_norm
        self.norm1, self.attn = _norm(spec.dim, spec.eps), _Attention(spec)
        self.norm2, self.mlp = _norm(spec.dim, spec.eps), _Mlp(spec)
        if spec.layer_scale:
            self.gamma_1, self.gamma_2 = nn.Parameter(torch.ones(spec.dim)), nn.Parameter(torch.ones(spec.dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = x + self.norm1(self.attn(x))
            return x + self.norm2(self.mlp(x))
        a = self.attn(self.norm1(x))
        x = x + (a if self.gamma_1 is None else self.gamma_1 * a)
        m = self.mlp(self.norm2(x))
        return x + (m if self.gamma_2 is None else self.gamma_2 * m)


class EvaImageTower(nn.Module):
    """timm ``Eva`` as an OpenCLIP image tower (absolute position embedding, no RoPE, class-token
    pooling, linear head): ``[B, 3, H, W]`` normalised pixels -> ``[B, embed]``.

    Module names are timm's: ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks``,
    ``norm``, ``fc_norm`` (absent = identity), ``head``.
    """

    def __init__(self, spec: BlockSpec, depth: int, patch: int, grid: int, embed: int, fc_norm: bool = False,
                 final_norm: bool = True):
        super().__init__()
        c = spec.dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, c, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, c))
        self.blocks = nn.ModuleList(EvaBlock(spec) for _ in range(depth))
        self.norm = _norm(c) if final_norm else nn.Identity()
        self.fc_norm = _norm(c) if fc_norm else nn.Identity()
        self.head = nn.Linear(c, embed)
        self.image_size = patch * grid

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], prefix: str, heads: int, post_norm: bool) -> "EvaImageTower":
        """A tower shaped like the tensors ``{prefix}*`` of ``state`` (weights not copied)."""
        spec = block_spec(state, prefix, heads, post_norm)
        w = _need(state, prefix + "patch_embed.proj.weight")
        tokens = _need(state, prefix + "pos_embed").shape[1] - 1
        grid = int(round(tokens ** 0.5))
        return cls(spec, count_blocks(state, prefix), w.shape[-1], grid, _need(state, prefix + "head.weight").shape[0],
                   fc_norm=prefix + "fc_norm.weight" in state, final_norm=prefix + "norm.weight" in state)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)           # [B, grid^2, C]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.fc_norm(self.norm(x)[:, 0]))


def state_subset(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """``{key without prefix: tensor}`` for the keys of ``state`` under ``prefix``."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
