"""TRELLIS.2 shape SLat flow DiT (``ckpts/slat_flow_img2shape_dit_1_3B_{512,1024}_bf16``).

A plain DiT over sparse voxel tokens (one token per active voxel of the 32^3 / 64^3 / 96^3 grid):
full self-attention among the tokens of each sample with 3-D RoPE on the voxel coords,
cross-attention to the DINOv3 image tokens. No down/upsampling, no sparse conv.
Official config: in/out 32, model_channels 1536, cond 1024, 30 blocks, 12 heads, mlp_ratio 5.3334,
pe_mode rope, share_mod, qk_rms_norm(+cross), dtype bfloat16 (``resolution`` only matters for
the unused absolute position embedding). ``ElasticSLatFlowModel`` (upstream: the same network with a
training-time memory mixin) loads as this class.

The texture flows (``ckpts/slat_flow_imgshape2tex_dit_1_3B_{512,1024}_bf16``) are this network with
in_channels 64, out_channels 32: the noisy texture latent ``[N, 32]`` and the normalised shape latent
``[N, 32]`` on the same coords, concatenated on channels (``concat_cond``, the reference's
``sparse_cat([x, concat_cond], dim=-1)``).
"""
from typing import Any, Optional, Tuple

import torch

from ..sparse import SparseTensor
from .modules.attention import TokenLayout
from .modules.dit import FlowDiT
from .modules.rope import rope_phases

__all__ = ["SLatFlowModel", "ElasticSLatFlowModel"]


class SLatFlowModel(FlowDiT):
    """Velocity model of the shape-SLat stage. See :class:`FlowDiT` for the arguments.

    Batches: a CFG pair on shared coords (all samples the same number of tokens) runs as a plain
    ``[B, L, C]`` batch; samples of different lengths are packed ``[1, N, C]`` and attend only
    within themselves (varlen attention).
    """

    def _rope_tables(self, x: SparseTensor) -> torch.Tensor:
        """Complex RoPE phases ``[N, D/2]`` of the voxel coords of x (cached in x.cache)."""
        key = ("trellis2_rope", self.head_dim, self.rope_freq)
        if key not in x.cache:
            x.cache[key] = rope_phases(x.coords[:, 1:], self.head_dim, self.rope_freq)
        return x.cache[key]

    def _token_layout(self, x: SparseTensor) -> Optional[TokenLayout]:
        """None when every sample has the same token count (dense batch), else the packed layout."""
        if x.batch_size == 1:
            return None
        lens = x.seqlens_list
        if all(n == lens[0] for n in lens):
            return None
        return TokenLayout(seqlens=x.seqlens, seqlens_list=lens, batch_index=x.batch_index)

    def _warmup_inputs(self, device: torch.device) -> Tuple[SparseTensor, torch.Tensor, torch.Tensor]:
        """16 zero tokens of one sample (the first voxels of the grid, every input channel)."""
        R, n = self.resolution, 16
        i = torch.arange(n, device=device) % R ** 3
        coords = torch.stack([torch.zeros_like(i), i // (R * R), i // R % R, i % R], 1).int()
        x = SparseTensor(torch.zeros(n, self.in_channels, device=device), coords, (R,) * 3, batch_size=1)
        return (x, *self._warmup_cond(device))

    def forward(
        self, x: SparseTensor, t: torch.Tensor, cond: torch.Tensor, knowledge: Any = None,
        concat_cond: Optional[torch.Tensor] = None, zero_cond_from: Optional[int] = None,
    ) -> SparseTensor:
        """Predict the velocity.

        Args:
            x: noisy latent, SparseTensor with feats ``[N, in_channels]`` (fp32) on coords
                ``[N, 4]`` (b, x, y, z), rows contiguous per sample.
            t: ``[B]`` times on the reference scale, i.e. ``1000 * t`` with t in [0, 1].
            cond: image tokens ``[B, Lc, cond_channels]`` (1029 DINOv3 tokens at 512 px, 4101 at 1024).
            knowledge: optional Know3D knowledge, passed to ``knowledge_proj`` (see docs/internals.md).
            concat_cond: feats ``[N, in_channels - C_x]`` (a tensor or a SparseTensor on x's coords)
                appended to x's channels (texture flows: the normalised shape latent).
            zero_cond_from: samples from this index on have an all-zero ``cond`` (a guided pair's negative
                half): their cross-attention is computed once as one row (equal up to rounding).
        Returns:
            velocity, SparseTensor with feats ``[N, out_channels]`` in x's dtype on x's coords.
        """
        self._ensure_kernels(x.feats.device)
        if concat_cond is not None:
            extra = concat_cond.feats if isinstance(concat_cond, SparseTensor) else concat_cond
            if extra.dim() != 2 or extra.shape[0] != x.feats.shape[0]:
                raise ValueError(f"concat_cond must have shape [{x.feats.shape[0]}, C], got {tuple(extra.shape)}")
            x = x.replace(torch.cat([x.feats, extra.to(x.feats.dtype)], dim=1))
        if x.feats.dim() != 2 or x.feats.shape[1] != self.in_channels:
            raise ValueError(f"x.feats must have shape [N, {self.in_channels}], got {tuple(x.feats.shape)}")
        B = x.batch_size
        N = x.feats.shape[0]
        mod = self._time_modulation(t, B)
        cond = self._check_cond(cond, B)
        ctx = self._knowledge_context(knowledge)
        phases = self._rope_tables(x)
        layout = self._token_layout(x)
        h = self.input_layer(x.feats.float()).to(self.dtype)
        if layout is None:
            h = h.reshape(B, N // B, -1)
            rope = phases.reshape(B, N // B, -1)
        else:
            h = h.unsqueeze(0)
            rope = phases.unsqueeze(0)
        for block in self.blocks:
            h = block(h, mod, cond, rope=rope, layout=layout, knowledge_ctx=ctx, sparse=x,
                      zero_cond_from=zero_cond_from)
        out = self._head(h.reshape(N, -1))
        return x.replace(out.to(x.dtype))


ElasticSLatFlowModel = SLatFlowModel
