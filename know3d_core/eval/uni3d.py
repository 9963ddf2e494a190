"""Uni3D (Zhou et al. 2023, "Uni3D: Exploring Unified 3D Representation at Scale") from the published
checkpoints, without its code: the point-cloud encoder and the image tower it is aligned with.

Point encoder (module names = the checkpoint's keys, ``point_encoder.*``):

1. **grouping**: ``groups`` (512) centres by farthest-point sampling from point 0, each with its
   ``group_size`` (64) nearest points (squared Euclidean distance); a patch is its points' offsets
   from the centre and their colours, ``[B, G, M, 6]``;
2. **patch embed** (``encoder``, PointNet): ``first_conv`` (1x1 Conv 6->128, BatchNorm, ReLU, Conv
   128->256), max over the patch, that maximum concatenated *before* every point's feature (512),
   ``second_conv`` (Conv 512->512, BatchNorm, ReLU, Conv 512->C_enc), max over the patch;
   ``encoder2trans`` to the transformer width D;
3. ``[cls_token; tokens] + [cls_pos; pos_embed(centre)]`` (``pos_embed``: Linear 3->128, GELU,
   Linear 128->D), then the ``blocks`` of a timm EVA model (``visual.blocks``; no RoPE: the
   reference calls the blocks without it), ``visual.norm`` and ``visual.fc_norm`` on the class
   token (timm makes one of them the identity), ``trans2embed`` to the CLIP width E -> ``[B, E]``.

The checkpoint's other EVA tensors (``visual.patch_embed``, ``visual.pos_embed``,
``visual.cls_token``, ``visual.head``: the image ViT the blocks were initialised from) and
``logit_scale`` are unused by design (:data:`UNUSED`); every other key must match exactly.

Image tower: OpenCLIP ``EVA02-E-14-plus`` (``open_clip_pytorch_model.bin`` of
``laion2b_s9b_b144k``): its ``visual.trunk.*`` tensors (timm ``eva02_enormous_patch14_clip_224``:
post-norm blocks, class-token pooling, linear head to 1024); the text tower is unused by design.
Pixels: RGB (an alpha channel is composited over white), bicubic resize of the short side to 224,
centre crop, OpenAI CLIP mean / std.

Inputs as the reference evaluates them (``scripts/inference.sh``): 10,000 points, centred on their
mean and scaled to a unit farthest point, Y up (OpenShape's Objaverse frame; our Z-up model space is
turned with :func:`know3d_core.mesh.export.z_up_to_y_up`), colour 0.4 grey where the shape has none
(as the training's colour drop). Similarity = cosine of the two L2-normalised embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import geometry as G
from .eva import BlockSpec, EvaBlock, EvaImageTower, block_spec, count_blocks
from .weights import WeightsError, load_strict, read_state

__all__ = ["Uni3DConfig", "Uni3D", "ClipImageTower", "group_points", "prepare_points", "image_pixels",
           "HEADS_BY_WIDTH", "CLIP_HEADS_BY_WIDTH", "UNUSED", "POINTS", "GROUPS", "GROUP_SIZE", "GREY",
           "CLIP_MEAN", "CLIP_STD", "WeightsError"]

POINTS, GROUPS, GROUP_SIZE = 10_000, 512, 64   # the reference's --npoints / --num-group / --group-size
GREY = 0.4                                     # colour of colourless points (the reference's value)
# timm EVA widths -> heads (eva02 tiny / small / base / large, eva giant): the keys cannot tell heads.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1408: 16}
CLIP_HEADS_BY_WIDTH = {1792: 16}               # eva02_enormous_patch14_clip_224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_PREFIX = "visual.trunk."
_UNUSED_VISUAL = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "head.weight",
                  "head.bias")
UNUSED = frozenset({"logit_scale"} | {"point_encoder.visual." + k for k in _UNUSED_VISUAL})
WHAT = "a Uni3D checkpoint (model.pt of BAAI/Uni3D modelzoo/uni3d-*: keys point_encoder.*)"
CLIP_WHAT = "an OpenCLIP EVA02-E-14-plus checkpoint (open_clip_pytorch_model.bin: keys visual.trunk.*)"


@dataclass(frozen=True)
class Uni3DConfig:
    """Sizes of a Uni3D point encoder (all but ``heads``, ``groups``, ``group_size`` are in the checkpoint)."""

    blocks: BlockSpec
    depth: int
    encoder_dim: int
    embed_dim: int
    final_norm: bool
    fc_norm: bool
    groups: int = GROUPS
    group_size: int = GROUP_SIZE

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], heads: Optional[int] = None, groups: int = GROUPS,
                   group_size: int = GROUP_SIZE) -> "Uni3DConfig":
        """Read the sizes from a checkpoint's tensors (``KeyError`` naming a needed key that is absent)."""
        p = "point_encoder."
        if p + "cls_token" not in state:
            raise KeyError(p + "cls_token")
        width = state[p + "cls_token"].shape[-1]
        heads = heads or HEADS_BY_WIDTH.get(width)
        if heads is None:
            raise KeyError(f"heads for width {width} (known: {sorted(HEADS_BY_WIDTH)}); pass heads=")
        spec = block_spec(state, p + "visual.", heads)
        return cls(spec, count_blocks(state, p + "visual."), state[p + "encoder2trans.weight"].shape[1],
                   state[p + "trans2embed.weight"].shape[0], p + "visual.norm.weight" in state,
                   p + "visual.fc_norm.weight" in state, groups, group_size)


def _conv_bn(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(c_in, c_mid, 1), nn.BatchNorm1d(c_mid), nn.ReLU(), nn.Conv1d(c_mid, c_out, 1))


class PatchEncoder(nn.Module):
    """PointNet over each patch: ``[B, G, M, 6]`` -> ``[B, G, C_enc]``."""

    def __init__(self, encoder_dim: int):
        super().__init__()
        self.first_conv = _conv_bn(6, 128, 256)
        self.second_conv = _conv_bn(512, 512, encoder_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, g, m, c = patches.shape
        x = self.first_conv(patches.reshape(b * g, m, c).transpose(1, 2))      # [BG, 256, M]
        pooled = x.amax(dim=2, keepdim=True).expand(-1, -1, m)
        x = self.second_conv(torch.cat((pooled, x), dim=1))                   # [BG, C_enc, M]
        return x.amax(dim=2).reshape(b, g, -1)


class _Backbone(nn.Module):
    """``visual``: the EVA blocks and final norms (the checkpoint's ``point_encoder.visual.*``)."""

    def __init__(self, cfg: Uni3DConfig):
        super().__init__()
        d = cfg.blocks.dim
        self.blocks = nn.ModuleList(EvaBlock(cfg.blocks) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6) if cfg.final_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(d, eps=1e-6) if cfg.fc_norm else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.fc_norm(self.norm(tokens[:, 0]))


class PointEncoder(nn.Module):
    """``point_encoder``: points ``xyz, rgb [B, N, 3]`` -> ``[B, E]`` (not normalised)."""

    def __init__(self, cfg: Uni3DConfig):
        super().__init__()
        d = cfg.blocks.dim
        self.cfg = cfg
        self.encoder = PatchEncoder(cfg.encoder_dim)
        self.encoder2trans = nn.Linear(cfg.encoder_dim, d)
        self.trans2embed = nn.Linear(d, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, d))
        self.visual = _Backbone(cfg)

    def forward(self, xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        centres, patches = group_points(xyz, rgb, self.cfg.groups, self.cfg.group_size)
        tokens = self.encoder2trans(self.encoder(patches))                    # [B, G, D]
        b = tokens.shape[0]
        x = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        pos = torch.cat((self.cls_pos.expand(b, -1, -1), self.pos_embed(centres)), dim=1)
        return self.trans2embed(self.visual(x + pos))


class Uni3D(nn.Module):
    """The Uni3D point encoder under its checkpoint's names: ``(xyz, rgb [B, N, 3]) -> [B, E]``."""

    def __init__(self, cfg: Uni3DConfig):
        super().__init__()
        self.point_encoder = PointEncoder(cfg)

    def forward(self, xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        return self.point_encoder(xyz, rgb)

    def describe(self) -> Dict[str, object]:
        """The sizes read from the checkpoint (recorded in eval.json)."""
        c = self.point_encoder.cfg
        return {"kind": "Uni3D", "width": c.blocks.dim, "depth": c.depth, "heads": c.blocks.heads,
                "embed": c.embed_dim, "mlp": c.blocks.mlp, "qkv": c.blocks.qkv, "groups": c.groups,
                "group_size": c.group_size}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], path: str = "<state>", heads: Optional[int] = None,
                   groups: int = GROUPS, group_size: int = GROUP_SIZE) -> "Uni3D":
        """Strictly load a Uni3D state dict (:class:`WeightsError` naming ``path`` otherwise)."""
        try:
            cfg = Uni3DConfig.from_state(state, heads, groups, group_size)
        except KeyError as e:
            raise WeightsError(f"{path} is not {WHAT}: missing {e.args[0]}") from None
        return load_strict(cls(cfg), state, path, WHAT, unused=UNUSED.__contains__)

    @classmethod
    def from_file(cls, path: str, heads: Optional[int] = None, groups: int = GROUPS,
                  group_size: int = GROUP_SIZE) -> "Uni3D":
        return cls.from_state(read_state(path, "Uni3D checkpoint"), path, heads, groups, group_size)


class ClipImageTower(nn.Module):
    """OpenCLIP's EVA02-E-14-plus image tower under its names (``trunk`` = ``visual.trunk``):
    ``[B, 3, 224, 224]`` normalised pixels -> ``[B, 1024]`` (not normalised)."""

    def __init__(self, trunk: EvaImageTower):
        super().__init__()
        self.trunk = trunk

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk(pixels)

    @property
    def image_size(self) -> int:
        return self.trunk.image_size

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], path: str = "<state>", heads: Optional[int] = None
                   ) -> "ClipImageTower":
        """Strictly load the ``visual.*`` tensors of an OpenCLIP state dict (the rest is the text tower)."""
        try:
            width = state[CLIP_PREFIX + "cls_token"].shape[-1]
            heads = heads or CLIP_HEADS_BY_WIDTH[width]
            trunk = EvaImageTower.from_state(state, CLIP_PREFIX, heads, post_norm=True)
        except KeyError as e:
            raise WeightsError(f"{path} is not {CLIP_WHAT}: missing or unknown {e.args[0]}") from None
        return load_strict(cls(trunk), state, path, CLIP_WHAT, prefix="visual.")

    @classmethod
    def from_file(cls, path: str, heads: Optional[int] = None) -> "ClipImageTower":
        return cls.from_state(read_state(path, "OpenCLIP checkpoint"), path, heads)


# ------------------------------------------------------------------------------- inputs
def _square_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[B, S, 3], [B, N, 3] -> [B, S, N]`` squared distances (expanded form, as the reference)."""
    d = -2 * a @ b.transpose(1, 2)
    return d + a.square().sum(-1, keepdim=True) + b.square().sum(-1).unsqueeze(1)


def group_points(xyz: torch.Tensor, rgb: torch.Tensor, groups: int, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``xyz, rgb [B, N, 3]`` -> ``(centres [B, G, 3], patches [B, G, M, 6])``: farthest-point centres
    (greedy from point 0), their ``size`` nearest points as offsets from the centre, then colours."""
    idx = torch.stack([G.farthest_point_sampling(p, groups, start=0, backend="torch") for p in xyz])  # [B, G]
    centres = torch.gather(xyz, 1, idx.unsqueeze(-1).expand(-1, -1, 3))
    near = _square_distance(centres, xyz).topk(size, dim=-1, largest=False).indices                 # [B, G, M]
    rows = torch.arange(xyz.shape[0], device=xyz.device).view(-1, 1, 1)
    return centres, torch.cat((xyz[rows, near] - centres.unsqueeze(2), rgb[rows, near]), dim=-1)


def prepare_points(vertices: torch.Tensor, faces: torch.Tensor, count: int = POINTS, seed: int = 0
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A Z-up mesh -> ``(xyz, rgb) [1, count, 3]`` as Uni3D reads clouds: area-uniform surface samples
    (seeded), Y up, centred on their mean, farthest point at radius 1; grey colour."""
    from ..mesh.export import z_up_to_y_up

    gen = torch.Generator().manual_seed(seed)
    p = G.sample_surface(vertices.cpu(), faces.cpu(), count, generator=gen).double()
    p = torch.from_numpy(z_up_to_y_up(p.numpy()))
    p = p - p.mean(dim=0)
    p = p / p.norm(dim=1).max().clamp_min(1e-12)
    xyz = p.float().unsqueeze(0)
    return xyz, torch.full_like(xyz, GREY)


def image_pixels(image, size: int = 224) -> torch.Tensor:
    """A PIL image (or path) -> ``[1, 3, size, size]`` as OpenCLIP's EVA preprocessing: RGBA over white,
    bicubic resize of the short side to ``size``, centre crop, OpenAI mean / std."""
    from PIL import Image

    if isinstance(image, str):
        with Image.open(image) as im:
            image = im.copy()
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    image = image.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
    w, h = image.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    x = x.permute(2, 0, 1).float() / 255.0
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[B, E], [B, E] -> [B]`` cosine similarity of L2-normalised embeddings (float32)."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)
