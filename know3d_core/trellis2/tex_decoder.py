"""TRELLIS.2 texture SLat decoder (checkpoint ``tex_dec_next_dc_f16c32_fp16``).

The reference ``SparseUnetVaeDecoder`` with ``pred_subdiv=False`` and 6 output channels: the same
sparse conv U-Net "up" path as the shape decoder (``from_latent``, 5 levels of ConvNeXt blocks, 4
channel-to-space blocks, non-affine LayerNorm, ``output_layer``), except that its C2S blocks carry no
``to_subdiv``: each subdivides where the shape decoder's subdivision logits of the same level are
positive (``guide_subs``, from ``FlexiDualGridVaeDecoder.forward(x, return_subs=True)``). Texture SLat
``[N, 32]`` on the shape SLat's coords -> PBR voxels ``[N', 6]`` on the mesh grid, rows aligned with
the shape decoder's output voxels: base colour (0:3), metallic (3), roughness (4), alpha (5)
(``plan.PBR_LAYOUT``); :meth:`decode` maps the raw head to [0, 1] as the reference pipeline does
(``* 0.5 + 0.5``; values are not clamped there, the baker clamps).

Module names, dtypes (fp16 body, fp32 ``from_latent`` / ``output_layer`` / LayerNorms) and memory
behaviour are those of :class:`.shape_decoder.FlexiDualGridVaeDecoder`, whose body this class shares.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..sparse import SparseLinear, SparseTensor
from ..sparse.kernel_dispatch import KernelWarmup
from .shape_decoder import (
    FlexiDualGridVaeDecoder,
    SparseResBlockC2S3d,
    _BLOCK_ARG_NAMES,
    _BLOCK_TYPES,
    _check_block_args,
)

__all__ = ["SparseUnetVaeDecoder", "TINY_ARGS", "CHECKPOINT_REFERENCE"]

CHECKPOINT_REFERENCE = "ckpts/tex_dec_next_dc_f16c32_fp16"

# Tiny config with the real structure (as shape_decoder.TINY_ARGS: same levels, so the tiny shape
# decoder's subdivisions guide it).
TINY_ARGS = {
    "out_channels": 6,
    "model_channels": [32, 16, 16, 8, 8],
    "latent_channels": 32,
    "num_blocks": [1, 1, 1, 1, 0],
    "block_type": ["SparseConvNeXtBlock3d"] * 5,
    "up_block_type": ["SparseResBlockC2S3d"] * 4,
    "block_args": [{}] * 5,
    "use_fp16": True,
    "pred_subdiv": False,
}


class SparseUnetVaeDecoder(FlexiDualGridVaeDecoder):
    """Texture SLat -> per-voxel PBR attributes on the grid 16x finer, guided by the shape decoder.

    Args mirror the official JSON (``out_channels``, ``model_channels``, ``latent_channels``,
    ``num_blocks``, ``block_type``, ``up_block_type``, ``block_args``, ``use_fp16``, ``pred_subdiv``);
    only ``pred_subdiv=False`` (the texture decoder) is supported: a decoder that predicts its own
    subdivisions is the shape decoder's job.
    """

    supports_empty_init = True

    def __init__(
        self,
        out_channels: int,
        model_channels: Sequence[int],
        latent_channels: int,
        num_blocks: Sequence[int],
        block_type: Sequence[str],
        up_block_type: Sequence[str],
        block_args: Optional[Sequence[Dict[str, Any]]] = None,
        use_fp16: bool = False,
        pred_subdiv: bool = False,
    ):
        nn.Module.__init__(self)
        if pred_subdiv:
            raise ValueError("SparseUnetVaeDecoder: only pred_subdiv=False (the texture decoder) is supported")
        levels = len(num_blocks)
        block_args = [{} for _ in range(levels)] if block_args is None else [dict(a) for a in block_args]
        if not (len(model_channels) == len(block_type) == len(block_args) == levels
                and len(up_block_type) == levels - 1):
            raise ValueError(
                "SparseUnetVaeDecoder: model_channels, num_blocks, block_type, block_args need one entry "
                "per level and up_block_type one per level but the last"
            )
        self.resolution = None
        self.model_channels = list(model_channels)
        self.latent_channels = latent_channels
        self.num_blocks = list(num_blocks)
        self.out_channels = int(out_channels)
        self.pred_subdiv = False
        self.from_latent = SparseLinear(latent_channels, self.model_channels[0])
        self.output_layer = SparseLinear(self.model_channels[-1], self.out_channels)
        self.blocks = nn.ModuleList()
        for i in range(levels):
            level = nn.ModuleList()
            for _ in range(self.num_blocks[i]):
                level.append(self._make(block_type[i], _BLOCK_TYPES, block_args[i], self.model_channels[i]))
            if i < levels - 1:
                if up_block_type[i] != "SparseResBlockC2S3d":
                    raise ValueError(f"SparseUnetVaeDecoder: unsupported up block type {up_block_type[i]!r} "
                                     "(supported: ['SparseResBlockC2S3d'])")
                _check_block_args(up_block_type[i], block_args[i], _BLOCK_ARG_NAMES[up_block_type[i]])
                level.append(SparseResBlockC2S3d(self.model_channels[i], self.model_channels[i + 1],
                                                 pred_subdiv=False, **block_args[i]))
            self.blocks.append(level)
        self.dtype = torch.float32
        self.convert_to(torch.float16 if use_fp16 else torch.float32)
        self._warmup = KernelWarmup()

    # ------------------------------------------------------------------ forward
    def _check_guides(self, x: SparseTensor, guide_subs: Sequence[SparseTensor]) -> None:
        if len(guide_subs) != self.num_subdivisions:
            raise ValueError(f"SparseUnetVaeDecoder: need {self.num_subdivisions} guide subdivisions (the shape "
                             f"decoder's return_subs), got {len(guide_subs)}")
        first = guide_subs[0]
        if first.coords.shape != x.coords.shape or not torch.equal(first.coords.to(x.device), x.coords):
            raise ValueError("SparseUnetVaeDecoder: the texture latent must live on the shape latent's coords "
                             "(same rows, same order) that produced guide_subs")

    @torch.no_grad()
    def forward(self, x: SparseTensor, guide_subs: Sequence[SparseTensor]) -> SparseTensor:
        """Texture SLat ``x`` (feats ``[N, latent]``) and the shape decoder's 4 subdivision logit
        tensors (``[N_l, 8]`` on the coarse coords of each level) -> raw head ``[N', out]`` fp32 on the
        shape decoder's output voxels (same coords, same row order)."""
        self._ensure_kernels(x.feats.device)
        self._check_guides(x, guide_subs)
        h = self._from_latent(x)
        for i, level in enumerate(self.blocks):
            for block in level:
                if isinstance(block, SparseResBlockC2S3d):
                    logits = guide_subs[i].feats.to(h.device)
                    if logits.shape != (h.feats.shape[0], 8):
                        raise ValueError(f"SparseUnetVaeDecoder: guide_subs[{i}] holds {tuple(logits.shape)}, level "
                                         f"{i} has {h.feats.shape[0]} voxels (expected [{h.feats.shape[0]}, 8])")
                    h, _ = block(h, subdiv=logits, release_input_maps=True)
                else:
                    h = block(h)
        return self._head(h)

    @torch.no_grad()
    def decode(self, x: SparseTensor, guide_subs: Sequence[SparseTensor]) -> SparseTensor:
        """``forward * 0.5 + 0.5``: PBR attributes, nominally in [0, 1] (the reference pipeline's
        ``decode_tex_slat``)."""
        out = self.forward(x, guide_subs)
        return out.replace(out.feats * 0.5 + 0.5)

    def upsample(self, x: SparseTensor, upsample_times: int = 4) -> torch.Tensor:
        raise TypeError("the texture decoder follows the shape decoder's subdivisions; upsample with the shape decoder")

    def to_meshes(self, head: SparseTensor, resolution: Optional[int] = None) -> List[Any]:
        raise TypeError("the texture decoder makes PBR voxels, not meshes; decode the shape with the shape decoder")
