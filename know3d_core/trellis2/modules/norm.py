"""Normalisation layers of the TRELLIS.2 DiTs, computed in fp32 whatever the activation dtype."""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LayerNorm32", "MultiHeadRMSNorm"]


class LayerNorm32(nn.LayerNorm):
    """``nn.LayerNorm`` evaluated in fp32; the result is cast back to the input dtype.

    x: ``[..., C]`` -> ``[..., C]`` (same dtype as x). Parameters (when affine) stay fp32.
    Without affine parameters the half-precision input goes straight to ``F.layer_norm``, whose
    CPU and CUDA kernels accumulate in fp32 and round once (two fewer passes over x).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None and self.bias is None:
            return F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        return super().forward(x.float()).to(x.dtype)


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm of queries/keys: ``normalize(x) * gamma * sqrt(head_dim)`` in fp32.

    ``x / ||x|| * sqrt(D)`` is ``x / rms(x)``, so this runs as ``F.rms_norm(x) * gamma``
    (eps far below any real mean square; zero rows stay zero).
    Parameter ``gamma [num_heads, head_dim]`` (checkpoint key ``*.q_rms_norm.gamma``).
    x: ``[..., num_heads, head_dim]`` -> same shape and dtype.
    """

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__()
        self.scale = head_dim ** 0.5
        self.eps = 1e-24 / head_dim  # = F.normalize's 1e-12 floor on the norm, as a mean square
        self.gamma = nn.Parameter(torch.ones(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.rms_norm(x.float(), x.shape[-1:], eps=self.eps) * self.gamma.float()).to(x.dtype)
