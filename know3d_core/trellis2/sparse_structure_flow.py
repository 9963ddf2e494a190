"""TRELLIS.2 sparse-structure flow DiT (``ckpts/ss_flow_img_dit_1_3B_64_bf16``).

A dense DiT on the ``[B, 8, 16, 16, 16]`` structure latent: every voxel is a token (x slowest, z
fastest), full self-attention with 3-D RoPE, cross-attention to the DINOv3 image tokens.
Official config: resolution 16, in/out 8, model_channels 1536, cond 1024, 30 blocks, 12 heads,
mlp_ratio 5.3334, pe_mode rope, share_mod, qk_rms_norm(+cross), dtype bfloat16.
"""
from typing import Any, Dict, Optional, Tuple

import torch

from .modules.dit import FlowDiT
from .modules.rope import rope_phases

__all__ = ["SparseStructureFlowModel"]


class SparseStructureFlowModel(FlowDiT):
    """Velocity model of the sparse-structure stage.

    State-dict keys equal the official checkpoint's (no ``rope_phases``: RoPE tables are rebuilt
    per device and cached outside the state dict). See :class:`FlowDiT` for the arguments.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rope_cache: Dict[Tuple[str, int], torch.Tensor] = {}

    def _rope_tables(self, device: torch.device) -> torch.Tensor:
        """Complex RoPE phases ``[R^3, D/2]`` of the ``indexing='ij'`` meshgrid of the latent grid."""
        key = (str(device), self.resolution)
        if key not in self._rope_cache:
            r = torch.arange(self.resolution, device=device)
            grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
            self._rope_cache[key] = rope_phases(grid, self.head_dim, self.rope_freq)
        return self._rope_cache[key]

    def reference_buffers(self) -> Dict[str, torch.Tensor]:
        """Buffers the reference class registers but this one rebuilds: ``{"rope_phases": [R^3, D/2]}``
        (complex64, CPU). State dicts saved by the reference code carry them; loaders check them
        against these values and drop them (``trellis2.loading.drop_reference_buffers``)."""
        device = self.input_layer.weight.device
        return {"rope_phases": self._rope_tables(device if device.type == "meta" else torch.device("cpu"))}

    def _warmup_inputs(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zeros shaped as the sampler's first call: a CFG pair ``[2, in_channels, R, R, R]`` and a
        512-px image condition (1029 tokens), so that the attention's execution plans for those shapes
        (cuDNN builds one per new shape, 50-110 ms each on the H100) are built by the warm-up too."""
        from ..conditioning.dinov3 import num_feature_tokens

        R = self.resolution
        return (torch.zeros(2, self.in_channels, R, R, R, device=device),
                *self._warmup_cond(device, 2, num_feature_tokens(512)))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, knowledge: Any = None,
        zero_cond_from: Optional[int] = None,
    ) -> torch.Tensor:
        """Predict the velocity.

        Args:
            x: noisy latent ``[B, in_channels, R, R, R]`` (fp32).
            t: ``[B]`` times on the reference scale, i.e. ``1000 * t`` with t in [0, 1].
            cond: image tokens ``[B, Lc, cond_channels]`` (1029 DINOv3 tokens at 512 px).
            knowledge: optional Know3D knowledge, passed to ``knowledge_proj`` (see docs/internals.md).
            zero_cond_from: samples from this index on have an all-zero ``cond`` (a guided pair's negative
                half): their cross-attention is computed once as one row (equal up to rounding).
        Returns:
            velocity ``[B, out_channels, R, R, R]`` in x's dtype.
        """
        self._ensure_kernels(x.device)
        R = self.resolution
        B = x.shape[0]
        if tuple(x.shape[1:]) != (self.in_channels, R, R, R):
            raise ValueError(
                f"x must have shape [B, {self.in_channels}, {R}, {R}, {R}], got {tuple(x.shape)}"
            )
        h = self.input_layer(x.reshape(B, self.in_channels, -1).transpose(1, 2).float())
        mod = self._time_modulation(t, B)
        cond = self._check_cond(cond, B)
        ctx = self._knowledge_context(knowledge)
        rope = self._rope_tables(x.device)
        h = h.to(self.dtype)
        for block in self.blocks:
            h = block(h, mod, cond, rope=rope, knowledge_ctx=ctx, zero_cond_from=zero_cond_from)
        h = self._head(h)
        return h.transpose(1, 2).reshape(B, self.out_channels, R, R, R).to(x.dtype)
