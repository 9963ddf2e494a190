"""Front-image preprocessing for TRELLIS.2 conditioning (the reference ``preprocess_image``).

Steps, in the reference order:

1. Foreground alpha: an explicit ``mask`` if given; else the image's own alpha when it is RGBA
   (or LA / PA / P with transparency) and some alpha differs from 255; else, with
   ``assume_foreground=True``, the whole image is foreground. Otherwise a ``ValueError`` asks for a
   mask: the reference runs BiRefNet here, which this package does not ship (use a background-removal
   node, or pass an RGBA image).
2. Downscale so the longer side is at most ``max_size`` (1024), PIL LANCZOS, alpha included.
3. Bounding box of ``alpha > 0.8 * 255``; a square crop centred on it with side ``max(w, h)`` (the
   reference's ``max - min`` extents); pixels outside the image become zeros.
4. Premultiply by alpha (black background) -> RGB uint8.

Accepted inputs (one image at a time):
  * ``PIL.Image.Image`` in mode RGB, RGBA, L, LA, P or PA;
  * float tensor ``[H, W, 3|4]`` (or ``[1, H, W, 3|4]``, a ComfyUI IMAGE of batch 1) in ``[0, 1]``;
    channel 4 is alpha (1 = object).
  * ``mask``: PIL mode L/1/F or float tensor ``[H, W]`` / ``[1, H, W]`` in ``[0, 1]``, 1 = object
    (note ComfyUI's LoadImage MASK is ``1 - alpha``: invert it before calling).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

__all__ = [
    "preprocess_image",
    "preprocess_image_tensor",
    "image_to_pil",
    "mask_to_pil",
    "pil_to_tensor",
    "foreground_bbox",
    "ALPHA_THRESHOLD",
    "NoTransparencyError",
]

ImageLike = Union[Image.Image, torch.Tensor]
ALPHA_THRESHOLD = 0.8 * 255
_MODES_WITH_ALPHA = ("RGBA", "LA", "PA")
_SUPPORTED_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA")


class NoTransparencyError(ValueError):
    """No mask, and the image has no pixel with alpha below 255 (hosts name their own way to say
    "use the whole frame": ``assume_foreground=True`` here, ``--full-frame`` in the CLI)."""


def _float_to_uint8(x: torch.Tensor, what: str) -> np.ndarray:
    """Float tensor in [0, 1] -> uint8 array (round(x * 255)); values outside [0, 1] are clamped."""
    if not torch.is_floating_point(x):
        raise ValueError(f"{what} must be a float tensor in [0, 1], got dtype {x.dtype}")
    x = x.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or infinite values")
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _squeeze_batch(x: torch.Tensor, image_dims: int, what: str) -> torch.Tensor:
    if x.dim() == image_dims + 1:
        if x.shape[0] != 1:
            raise ValueError(f"{what} has batch size {x.shape[0]}; preprocess one image at a time")
        x = x[0]
    if x.dim() != image_dims:
        raise ValueError(f"{what} must have {image_dims} dims (or a leading batch of 1), got shape {tuple(x.shape)}")
    return x


def image_to_pil(image: ImageLike) -> Image.Image:
    """PIL image (returned as is) or float tensor ``[H, W, 3|4]`` / ``[1, H, W, 3|4]`` -> PIL RGB/RGBA."""
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a PIL image or a float tensor [H, W, C], got {type(image).__name__}")
    x = _squeeze_batch(image, 3, "image tensor")
    if x.shape[-1] not in (3, 4):
        raise ValueError(f"image tensor must have 3 (RGB) or 4 (RGBA) channels last, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"image tensor is empty: shape {tuple(x.shape)}")
    arr = _float_to_uint8(x, "image tensor")
    return Image.fromarray(arr, "RGBA" if arr.shape[-1] == 4 else "RGB")


def mask_to_pil(mask: ImageLike) -> Image.Image:
    """Mask (PIL L/1/F, or float tensor ``[H, W]`` / ``[1, H, W]`` in [0, 1], 1 = object) -> PIL L."""
    if isinstance(mask, Image.Image):
        if mask.mode == "L":
            return mask
        if mask.mode == "1":
            return mask.convert("L")
        if mask.mode == "F":
            return mask_to_pil(torch.from_numpy(np.asarray(mask, dtype=np.float32)))
        raise ValueError(f"mask must be a PIL image in mode L, 1 or F, got mode {mask.mode!r}")
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a PIL image or a float tensor [H, W], got {type(mask).__name__}")
    m = _squeeze_batch(mask, 2, "mask tensor")
    return Image.fromarray(_float_to_uint8(m, "mask tensor"), "L")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor ``[H, W, 3]`` in [0, 1] (uint8 / 255, ComfyUI IMAGE without batch)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)


def _opaque_rgb(image: Image.Image) -> Image.Image:
    """RGB colours; palette images go through RGBA (PIL warns on a direct P -> RGB with tRNS bytes)."""
    return image.convert("RGBA").convert("RGB") if image.mode in ("P", "PA") else image.convert("RGB")


def _rgba_with_alpha(image: Image.Image, mask: Optional[ImageLike], assume_foreground: bool) -> Image.Image:
    """RGBA image whose alpha is the foreground (explicit mask > own transparency > assume_foreground)."""
    if image.mode not in _SUPPORTED_MODES:
        raise ValueError(
            f"unsupported image mode {image.mode!r}; convert it to RGB or RGBA first "
            f"(supported: {', '.join(_SUPPORTED_MODES)})"
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image is empty: size {image.size}")
    if mask is not None:
        m = mask_to_pil(mask)
        if m.size != image.size:
            raise ValueError(f"mask size {m.size} differs from image size {image.size} (W, H)")
        rgba = _opaque_rgb(image).convert("RGBA")
        rgba.putalpha(m)
        return rgba
    has_alpha_mode = image.mode in _MODES_WITH_ALPHA or (image.mode == "P" and "transparency" in image.info)
    if has_alpha_mode:
        rgba = image.convert("RGBA")
        if not bool(np.all(np.asarray(rgba)[:, :, 3] == 255)):
            return rgba
    if assume_foreground:
        rgba = _opaque_rgb(image).convert("RGBA")  # alpha 255 everywhere
        return rgba
    raise NoTransparencyError(
        "the image has no transparency and no mask was given: supply a foreground mask "
        "(e.g. from a background-removal node), an RGBA image with the background transparent, "
        "or set assume_foreground=True to treat the whole image as the object"
    )


def _downscale(image: Image.Image, max_size: int) -> Image.Image:
    """Shrink so the longer side is at most ``max_size`` (LANCZOS); never enlarges."""
    scale = min(1, max_size / max(image.size))
    if scale < 1:
        image = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.LANCZOS)
    return image


def foreground_bbox(alpha: np.ndarray) -> Tuple[int, int, int, int]:
    """Inclusive pixel bbox ``(x0, y0, x1, y1)`` of ``alpha > 0.8 * 255`` for a uint8 alpha ``[H, W]``."""
    ys, xs = np.nonzero(alpha > ALPHA_THRESHOLD)
    if xs.size == 0:
        raise ValueError(
            "the foreground mask is empty: no pixel has alpha above 0.8 (is the image fully "
            "transparent, or the mask inverted?)"
        )
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _square_crop_box(bbox: Tuple[int, int, int, int]) -> Tuple[float, float, float, float]:
    """Square box centred on ``bbox`` with side ``max(x1 - x0, y1 - y0)`` (PIL rounds half to even)."""
    x0, y0, x1, y1 = bbox
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    size = int(max(x1 - x0, y1 - y0))
    half = size // 2
    if half == 0:
        raise ValueError(f"the foreground is too small to crop (bbox {bbox}): it must span at least 2 pixels")
    return cx - half, cy - half, cx + half, cy + half


def preprocess_image(
    image: ImageLike,
    mask: Optional[ImageLike] = None,
    *,
    assume_foreground: bool = False,
    max_size: int = 1024,
) -> Image.Image:
    """Reference TRELLIS.2 preprocessing: foreground crop, premultiplied on black.

    Args:
        image: PIL image or float tensor ``[H, W, 3|4]`` / ``[1, H, W, 3|4]`` in [0, 1].
        mask: optional foreground mask, same ``H, W`` (PIL or float ``[H, W]``, 1 = object); it
            overrides the image's own alpha.
        assume_foreground: with no mask and no transparency, use the whole image as the object
            (a square crop of the full frame, padded with black). Otherwise that case is an error.
        max_size: longer side after the first downscale (reference: 1024).

    Returns:
        PIL RGB image, square (side = the foreground bbox's longer extent, rounded by PIL's crop).

    Raises:
        ValueError: unsupported mode or tensor shape, mask size mismatch, no mask for an opaque
            image, an empty (all-transparent) foreground, or one thinner than 2 pixels.
    """
    pil = image_to_pil(image)
    rgba = _rgba_with_alpha(pil, mask, assume_foreground)
    rgba = _downscale(rgba, max_size)
    bbox = foreground_bbox(np.asarray(rgba)[:, :, 3])
    cropped = rgba.crop(_square_crop_box(bbox))  # outside the image -> (0, 0, 0, 0)
    arr = np.asarray(cropped).astype(np.float32) / 255
    rgb = arr[:, :, :3] * arr[:, :, 3:4]
    return Image.fromarray((rgb * 255).astype(np.uint8), "RGB")


def preprocess_image_tensor(
    image: ImageLike,
    mask: Optional[ImageLike] = None,
    *,
    assume_foreground: bool = False,
    max_size: int = 1024,
) -> torch.Tensor:
    """``preprocess_image`` returning a float tensor ``[S, S, 3]`` in [0, 1] (uint8 / 255)."""
    return pil_to_tensor(
        preprocess_image(image, mask, assume_foreground=assume_foreground, max_size=max_size)
    )
