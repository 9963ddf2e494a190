"""Latent packing and Edit-Plus sequence layout of Qwen-Image.

VAE latents are 5-D ``[B, 16, 1, H/8, W/8]`` (per-channel normalised ``(z - mean) / std``); the
MMDiT sees them packed in 2x2 patches: ``[B, (H/16)*(W/16), 64]``, row-major over the patch grid.
Edit-Plus image stream = ``[target | ref_1 | ref_2 | ...]`` with ``img_shapes`` per batch item
``[(1, H/16, W/16), (1, h_1/16, w_1/16), ...]``.
"""
from __future__ import annotations

import math

import torch

VAE_SCALE_FACTOR = 8       # AutoencoderKLQwenImage: 2 ** len(temperal_downsample)
PATCH = 2                  # MMDiT patch size on the latent grid
CONDITION_IMAGE_AREA = 384 * 384   # the Qwen2.5-VL copy of each reference image
VAE_IMAGE_AREA = 1024 * 1024       # the VAE copy of each reference image (independent of output size)


def dimensions_for_area(area: int, ratio: float, multiple: int = 32) -> tuple[int, int]:
    """(width, height) with width/height ~= ratio and width*height ~= area, multiples of ``multiple``."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return int(round(width / multiple) * multiple), int(round(height / multiple) * multiple)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, H, W] or [B, C, H, W] latents -> [B, (H/2)*(W/2), 4C] 2x2 patch tokens."""
    if latents.dim() == 5:
        if latents.shape[2] != 1:
            raise ValueError(f"expected one latent frame, got {latents.shape[2]}")
        latents = latents[:, :, 0]
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height/width must be even, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """[B, (h/2)*(w/2), 4C] -> [B, C, 1, h, w] (inverse of ``pack_latents``)."""
    b, n, c4 = tokens.shape
    if n != (latent_h // 2) * (latent_w // 2):
        raise ValueError(f"{n} tokens do not fit a {latent_h}x{latent_w} latent")
    x = tokens.view(b, latent_h // 2, latent_w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, 1, latent_h, latent_w)


def token_grid(height: int, width: int, vae_scale_factor: int = VAE_SCALE_FACTOR) -> tuple[int, int]:
    """Target token grid (H/16, W/16) of an image of ``height`` x ``width`` pixels."""
    f = vae_scale_factor * PATCH
    if height % f or width % f:
        raise ValueError(f"image size {width}x{height} must be a multiple of {f}")
    return height // f, width // f


def normalize_latents(z: torch.Tensor, mean, std) -> torch.Tensor:
    """(z - mean) / std per channel; z [B, C, T, H, W]."""
    c = z.shape[1]
    m = torch.as_tensor(mean).view(1, c, 1, 1, 1).to(z.device, z.dtype)
    s = torch.as_tensor(std).view(1, c, 1, 1, 1).to(z.device, z.dtype)
    return (z - m) / s


def denormalize_latents(z: torch.Tensor, mean, std) -> torch.Tensor:
    """z * std + mean per channel; z [B, C, T, H, W]. Same arithmetic as diffusers' pipelines."""
    c = z.shape[1]
    m = torch.as_tensor(mean).view(1, c, 1, 1, 1).to(z.device, z.dtype)
    inv = 1.0 / torch.as_tensor(std).view(1, c, 1, 1, 1).to(z.device, z.dtype)
    return z / inv + m
