"""Conditional flow matching as TRELLIS.2's trainers define it (``trainers/flow_matching``).

    x_t = (1 - t) x_0 + (sigma_min + (1 - sigma_min) t) eps,      t in [0, 1], eps ~ N(0, I)
    v   = (1 - sigma_min) eps - x_0                                (the velocity target)
    loss = mean((model(x_t, 1000 t, cond) - v)^2)

The sampler (``sampling.flow_euler``) integrates the same ODE, so a model trained here samples there.
Time schedules: ``logit_normal(mean 1, std 1)`` for the structure flow, ``uniform`` for the shape
flows (the reference configs). Qwen-Image's flow (back-view LoRA) is the same formula with
``sigma_min = 0`` (``x_s = (1 - s) x_0 + s eps``, target ``eps - x_0``).

Every draw takes an explicit ``torch.Generator`` on the CPU (then moves to the device), so a step's
noise is a function of the run seed and the step's micro-batch index only: resumed, multi-process
and single-process runs draw the same numbers.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["SIGMA_MIN", "T_SCHEDULES", "sample_t", "noise_like", "interpolate", "velocity_target", "drop_mask"]

SIGMA_MIN = 1e-5
T_SCHEDULES = ("logit_normal", "uniform")


def sample_t(n: int, schedule: str, generator: torch.Generator, mean: float = 1.0, std: float = 1.0) -> torch.Tensor:
    """``n`` times in (0, 1), float32 on the CPU.

    ``logit_normal``: ``sigmoid(N(mean, std^2))`` (reference ``logitNormal``, mean 1, std 1 for the
    structure flow); ``uniform``: U(0, 1).
    """
    if schedule == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    if schedule == "uniform":
        return torch.rand(n, generator=generator)
    raise ValueError(f"unknown t schedule {schedule!r}; use one of {T_SCHEDULES}")


def noise_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise of x's shape, drawn on the CPU in float32, returned on x's device/dtype."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """``x_t = (1 - t) x_0 + (sigma_min + (1 - sigma_min) t) eps``; ``t`` broadcasts against x0
    (``[B, 1, ...]`` for a dense batch, ``[N, 1]`` per token for a packed sparse batch)."""
    return (1 - t) * x0 + (sigma_min + (1 - sigma_min) * t) * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """``v = (1 - sigma_min) eps - x_0``."""
    return (1 - sigma_min) * eps - x0


def drop_mask(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Bool ``[n]``: True where a sample's condition is dropped (probability ``p``, CFG training)."""
    if p <= 0:
        return torch.zeros(n, dtype=torch.bool)
    return torch.rand(n, generator=generator) < p


def per_row(values: torch.Tensor, batch_index: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """Per-sample values ``[B]`` -> per-token ``[N, 1]`` for a packed sparse batch (``batch_index [N]``)."""
    return values.to(device or batch_index.device)[batch_index.long()].unsqueeze(1)
