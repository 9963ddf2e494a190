"""Normalisation layers of the TRELLIS.2 DiTs, computed in fp32 whatever the activation dtype."""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LayerNorm32", "MultiHeadRMSNorm"]


class LayerNorm32(nn.LayerNorm):
    """``nn.LayerNorm`` evaluated in fp32; the result is cast back to the input dtype.

    x: ``[..., C]`` -> ``[..., C]`` (same dtype as x). Parameters (when affine) stay fp32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm of queries/keys: ``normalize(x) * gamma * sqrt(head_dim)`` in fp32.

    Parameter ``gamma [num_heads, head_dim]`` (checkpoint key ``*.q_rms_norm.gamma``).
    x: ``[..., num_heads, head_dim]`` -> same shape and dtype.
    """

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__()
        self.scale = head_dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)
