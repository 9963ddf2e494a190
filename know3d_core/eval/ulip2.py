"""ULIP-2 (Xue et al., CVPR 2024) PointBERT point encoder from the published checkpoint, and its image
encoder (OpenCLIP ViT-bigG-14, :class:`~know3d_core.eval.clip_vit.ClipViT`), without their code.

Point encoder (``models/pointbert/point_encoder.py`` ``PointTransformer_Colored``; module names =
the checkpoint's keys after ULIP's own ``module.`` removal):

1. grouping and patch embed exactly as Uni3D's (:func:`know3d_core.eval.uni3d.group_points`,
   :class:`~know3d_core.eval.uni3d.PatchEncoder`: the two share the Point-BERT tokenizer), with the
   config of ``ULIP_2_PointBERT_10k_colored_pointclouds.yaml``: 512 groups of 32 points, patch
   features 256; ``reduce_dim`` to the width D (384);
2. ``x = [cls_token; tokens]``, ``pos = [cls_pos; pos_embed(centre)]``, then every block of
   ``blocks.blocks`` takes ``x + pos`` (the position is re-added before each block); blocks: pre-norm
   ViT, fused ``qkv`` without bias, GELU MLP, LayerNorm eps 1e-5 (6 heads);
3. ``norm``, then ``[x_cls, max over the patch tokens]`` (2D = 768) ``@ pc_projection`` (768 x 1280).

``logit_scale`` and any ``open_clip_model.*`` tensors of the checkpoint are unused by design (the
image tower comes from its own OpenCLIP file); every other key must match. Inputs as the reference
evaluates colourless clouds: 10,000 points, centred, unit farthest point, colour 0.4, Y up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from .clip_vit import ClipViT
from .eva import BlockSpec, EvaBlock, block_spec, count_blocks
from .uni3d import PatchEncoder, group_points
from .weights import WeightsError, load_strict, read_state

__all__ = ["Ulip2Config", "Ulip2", "ClipViTTower", "GROUPS", "GROUP_SIZE", "HEADS_BY_WIDTH"]

GROUPS, GROUP_SIZE = 512, 32         # ULIP_2_PointBERT_10k_colored_pointclouds.yaml
HEADS_BY_WIDTH = {384: 6}            # the same yaml: trans_dim 384, num_heads 6
POINTBERT_EPS = 1e-5
WHAT = "a ULIP-2 PointBERT checkpoint (keys point_encoder.*, pc_projection)"
CLIP_WHAT = "an OpenCLIP ViT checkpoint (open_clip_pytorch_model.bin of ViT-bigG-14 laion2b_s39b_b160k: keys visual.*)"
CLIP_PREFIXES = ("visual.", "open_clip_model.visual.")


def _unused(key: str) -> bool:
    return key == "logit_scale" or key.startswith("open_clip_model.")


@dataclass(frozen=True)
class Ulip2Config:
    blocks: BlockSpec
    depth: int
    encoder_dim: int
    embed_dim: int
    groups: int = GROUPS
    group_size: int = GROUP_SIZE

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], heads: Optional[int] = None, groups: int = GROUPS,
                   group_size: int = GROUP_SIZE) -> "Ulip2Config":
        p = "point_encoder."
        for key in (p + "cls_token", p + "reduce_dim.weight", "pc_projection"):
            if key not in state:
                raise KeyError(key)
        width = state[p + "cls_token"].shape[-1]
        heads = heads or HEADS_BY_WIDTH.get(width)
        if heads is None:
            raise KeyError(f"heads for width {width} (known: {sorted(HEADS_BY_WIDTH)}); pass heads=")
        spec = block_spec(state, p + "blocks.", heads, eps=POINTBERT_EPS)
        return cls(spec, count_blocks(state, p + "blocks."), state[p + "reduce_dim.weight"].shape[1],
                   state["pc_projection"].shape[1], groups, group_size)


class _Blocks(nn.Module):
    """``blocks``: ``blocks.blocks.{i}``, each fed ``x + pos``."""

    def __init__(self, spec: BlockSpec, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(EvaBlock(spec) for _ in range(depth))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointBert(nn.Module):
    """``point_encoder``: ``xyz, rgb [B, N, 3]`` -> ``[B, 2D]`` (class token and max-pooled tokens)."""

    def __init__(self, cfg: Ulip2Config):
        super().__init__()
        d = cfg.blocks.dim
        self.cfg = cfg
        self.encoder = PatchEncoder(cfg.encoder_dim)
        self.reduce_dim = nn.Linear(cfg.encoder_dim, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, d))
        self.blocks = _Blocks(cfg.blocks, cfg.depth)
        self.norm = nn.LayerNorm(d, eps=POINTBERT_EPS)

    def forward(self, xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        centres, patches = group_points(xyz, rgb, self.cfg.groups, self.cfg.group_size)
        tokens = self.reduce_dim(self.encoder(patches))                       # [B, G, D]
        b = tokens.shape[0]
        x = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        pos = torch.cat((self.cls_pos.expand(b, -1, -1), self.pos_embed(centres)), dim=1)
        x = self.norm(self.blocks(x, pos))
        return torch.cat((x[:, 0], x[:, 1:].amax(dim=1)), dim=-1)


class Ulip2(nn.Module):
    """ULIP-2's point side under its checkpoint's names: ``(xyz, rgb [B, N, 3]) -> [B, 1280]``."""

    def __init__(self, cfg: Ulip2Config):
        super().__init__()
        self.point_encoder = PointBert(cfg)
        self.pc_projection = nn.Parameter(torch.zeros(2 * cfg.blocks.dim, cfg.embed_dim))

    def forward(self, xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        return self.point_encoder(xyz, rgb) @ self.pc_projection

    def describe(self) -> Dict[str, object]:
        """The sizes read from the checkpoint (recorded in eval.json)."""
        c = self.point_encoder.cfg
        return {"kind": "ULIP-2 PointBERT", "width": c.blocks.dim, "depth": c.depth, "heads": c.blocks.heads,
                "embed": c.embed_dim, "groups": c.groups, "group_size": c.group_size}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], path: str = "<state>", heads: Optional[int] = None,
                   groups: int = GROUPS, group_size: int = GROUP_SIZE) -> "Ulip2":
        """Strictly load a ULIP-2 state dict (:class:`WeightsError` naming ``path`` otherwise)."""
        state = {k.replace("module.", ""): v for k, v in state.items()}  # as ULIP's loader does
        try:
            cfg = Ulip2Config.from_state(state, heads, groups, group_size)
        except KeyError as e:
            raise WeightsError(f"{path} is not {WHAT}: missing {e.args[0]}") from None
        return load_strict(cls(cfg), state, path, WHAT, unused=_unused)

    @classmethod
    def from_file(cls, path: str, heads: Optional[int] = None, groups: int = GROUPS,
                  group_size: int = GROUP_SIZE) -> "Ulip2":
        return cls.from_state(read_state(path, "ULIP-2 checkpoint"), path, heads, groups, group_size)


class ClipViTTower(nn.Module):
    """ULIP-2's image encoder under OpenCLIP's names (``visual`` = :class:`ClipViT`)."""

    def __init__(self, visual: ClipViT):
        super().__init__()
        self.visual = visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], path: str = "<state>", heads: Optional[int] = None
                   ) -> "ClipViTTower":
        """Strictly load the ``visual.*`` tensors of an OpenCLIP state dict (also found under
        ``open_clip_model.visual.*`` in a whole ULIP-2 model's state); the text tower is unused."""
        prefix = next((p for p in CLIP_PREFIXES if p + "conv1.weight" in state), CLIP_PREFIXES[0])
        try:
            visual = ClipViT.from_state(state, prefix, heads)
        except KeyError as e:
            raise WeightsError(f"{path} is not {CLIP_WHAT}: missing or unknown {e.args[0]}") from None
        tower = cls(visual)
        load_strict(tower.visual, state, path, CLIP_WHAT, prefix=prefix)
        return tower.eval()

    @classmethod
    def from_file(cls, path: str, heads: Optional[int] = None) -> "ClipViTTower":
        return cls.from_state(read_state(path, "OpenCLIP checkpoint"), path, heads)
