"""Timestep embedder of the TRELLIS.2 flow DiTs (fp32)."""
import functools
import math

import torch
import torch.nn as nn

__all__ = ["TimestepEmbedder", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` (cos first), ``f_i = max_period**(-i / (dim/2))``.

    t: ``[B]`` (any float scale; the flows get ``1000 * t``) -> ``[B, dim]`` fp32.
    """
    half = dim // 2
    freqs = _frequencies(half, float(max_period), t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


@functools.lru_cache(maxsize=16)
def _frequencies(half: int, max_period: float, device: torch.device) -> torch.Tensor:
    """``[half]`` fp32 frequencies, computed on the CPU like the reference and moved to ``device`` once
    (a per-forward host-to-device copy would also make the forward impossible to capture in a CUDA graph)."""
    with torch.inference_mode(False):  # a normal tensor, usable later with autograd on
        return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(device)


class TimestepEmbedder(nn.Module):
    """``t [B] -> [B, hidden]``: sinusoid(256) -> Linear -> SiLU -> Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))
