"""3-D rotary position embedding of the TRELLIS.2 DiTs.

Each head of size D is split into D/2 adjacent pairs ``(x[2i], x[2i+1])``; pair i is rotated by an
angle. With ``F = D // 2 // 3`` frequencies ``f_j = f0 / base**(j / F)``, the angles of a token at
integer position ``(x, y, z)`` are ``[x*f_0..x*f_{F-1}, y*f_0.., z*f_0..]`` followed by zero angles
(identity rotations) up to D/2. All of it is computed in fp32.
"""
from typing import Sequence

import torch

__all__ = ["rope_frequencies", "rope_phases", "apply_rope"]


def rope_frequencies(head_dim: int, dims: int = 3, rope_freq: Sequence[float] = (1.0, 10000.0)) -> torch.Tensor:
    """Frequencies ``[head_dim // 2 // dims]`` (fp32)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    freq_dim = head_dim // 2 // dims
    exponents = torch.arange(freq_dim, dtype=torch.float32) / freq_dim
    return rope_freq[0] / (rope_freq[1] ** exponents)


def rope_phases(
    positions: torch.Tensor, head_dim: int, rope_freq: Sequence[float] = (1.0, 10000.0)
) -> torch.Tensor:
    """Unit complex rotations ``exp(i * angle)`` of each token (complex64).

    Args:
        positions: ``[..., dims]`` integer (or float) coordinates.
        head_dim: D.
    Returns:
        ``[..., D // 2]`` complex64 on the device of ``positions``.
    """
    dims = positions.shape[-1]
    freqs = rope_frequencies(head_dim, dims, rope_freq).to(positions.device)
    angles = (positions.float().unsqueeze(-1) * freqs).flatten(-2)  # [..., dims * F]
    pad = head_dim // 2 - angles.shape[-1]
    if pad:
        angles = torch.cat([angles, angles.new_zeros(*angles.shape[:-1], pad)], dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim of ``x`` in fp32; result in x's dtype.

    Args:
        x: ``[..., L, H, D]``.
        phases: ``[..., L, D // 2]`` complex64 (broadcast over the heads H and leading dims).
    Returns:
        ``[..., L, H, D]``: pair ``(x0, x1)`` as ``x0 + i x1`` times the phase, i.e.
        ``(x0 cos - x1 sin, x0 sin + x1 cos)`` (one complex multiply kernel).
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * phases.unsqueeze(-2)).flatten(-2).to(x.dtype)
