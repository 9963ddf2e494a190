"""Noise schedules of the hosts that run Qwen-Image, and mapping a noise level sigma to a step.

Knowledge is defined by a noise level sigma, not by a step index: the same step index is a
different sigma under diffusers' Qwen-Image scheduler and under ComfyUI's shifted "simple"
schedule. Every function here returns the sigma of each step (a forward is run at sigma[i]);
schedules that end with the terminal 0 say so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# scheduler/scheduler_config.json of Qwen-Image, Qwen-Image-Edit, -2509 and -2511 (diffusers layout).
QWEN_IMAGE_SCHEDULER_CONFIG: dict = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "stochastic_sampling": False,
}

_UNSUPPORTED_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                      "invert_sigmas", "stochastic_sampling")


def qwen_shift_mu(image_seq_len: int, config: dict | None = None) -> float:
    """Dynamic-shift exponent mu, linear in the number of TARGET image tokens (H/16 * W/16).

    At 1024x1024 (4096 tokens) with the Qwen-Image config: mu = 0.6935 (effective shift e^mu ~ 2.0).
    """
    cfg = {**QWEN_IMAGE_SCHEDULER_CONFIG, **(config or {})}
    base_len, max_len = cfg["base_image_seq_len"], cfg["max_image_seq_len"]
    base_shift, max_shift = cfg["base_shift"], cfg["max_shift"]
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def flow_match_sigmas(num_steps: int, image_seq_len: int, config: dict | None = None) -> torch.Tensor:
    """Sigmas of diffusers' FlowMatchEulerDiscreteScheduler as the Qwen-Image pipelines set it.

    Start from linspace(1, 1/N, N), apply the (dynamic exponential or static) shift, stretch so the
    last sigma equals ``shift_terminal``, append the terminal 0. Arithmetic is float32 numpy like
    diffusers', so the values are bit-identical to ``scheduler.sigmas``.

    Returns: float32 CPU tensor [num_steps + 1] (last entry 0).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    cfg = {**QWEN_IMAGE_SCHEDULER_CONFIG, **(config or {})}
    bad = [k for k in _UNSUPPORTED_FLAGS if cfg.get(k)]
    if bad:
        raise ValueError(f"scheduler config sets {bad}; the Qwen-Image sampler supports none of these")
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if cfg["use_dynamic_shifting"]:
        mu = qwen_shift_mu(image_seq_len, cfg)
        if cfg["time_shift_type"] == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        elif cfg["time_shift_type"] == "linear":
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
        else:
            raise ValueError(f"unknown time_shift_type {cfg['time_shift_type']!r}")
    else:
        shift = cfg["shift"]
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if cfg.get("shift_terminal"):
        one_minus = 1 - sigmas
        scale = one_minus[-1] / (1 - cfg["shift_terminal"])
        sigmas = 1 - (one_minus / scale)
    sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def time_snr_shift(shift: float, t: torch.Tensor) -> torch.Tensor:
    """Flow shift sigma(t) = shift*t / (1 + (shift-1)*t) (ComfyUI ModelSamplingDiscreteFlow/AuraFlow)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def comfy_simple_flow_sigmas(num_steps: int, shift: float = 3.1) -> torch.Tensor:
    """ComfyUI's "simple" scheduler over a discrete-flow model sampling (1000 training sigmas).

    The official Qwen-Image-Edit-2511 ComfyUI graph uses ModelSamplingAuraFlow shift 3.1 and the
    simple scheduler; step i of 40 then runs at sigma = shift(1 - floor(i*1000/N)/1000).

    Returns: float32 tensor [num_steps + 1] (last entry 0).
    """
    train = time_snr_shift(shift, torch.arange(1, 1001, 1) / 1000)
    stride = len(train) / num_steps
    sig = [float(train[-(1 + int(x * stride))]) for x in range(num_steps)] + [0.0]
    return torch.tensor(sig, dtype=torch.float32)


@dataclass(frozen=True)
class StepChoice:
    """The step of a schedule that a requested noise level maps to."""
    index: int             # step index: the forward at sigmas[index]
    sigma: float           # sigma actually used
    sigma_requested: float
    num_steps: int         # forwards in the full schedule


def nearest_step(schedule_sigmas: Sequence[float] | torch.Tensor, sigma: float) -> StepChoice:
    """Map a requested sigma to the step whose sigma is nearest.

    ``schedule_sigmas`` may end with the terminal 0 (no forward runs there): a trailing exact 0 is
    ignored when the schedule has other entries. Ties go to the earlier step (fewer forwards).
    """
    s = [float(v) for v in (schedule_sigmas.tolist() if torch.is_tensor(schedule_sigmas) else schedule_sigmas)]
    if len(s) > 1 and s[-1] == 0.0:
        s = s[:-1]
    if not s:
        raise ValueError("empty sigma schedule")
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"sigma must be a flow-matching noise level in [0, 1], got {sigma}")
    dist = [abs(v - sigma) for v in s]
    idx = min(range(len(s)), key=lambda i: (dist[i], i))
    return StepChoice(index=idx, sigma=s[idx], sigma_requested=float(sigma), num_steps=len(s))
