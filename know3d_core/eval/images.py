"""Back-view normal maps of a prediction against the ground truth: PSNR, SSIM (always) and LPIPS
(when the user supplies its weights, see :mod:`know3d_core.eval.lpips`).

Both meshes are rendered by ``know3d_core.mesh.render.render_normals`` from the ``back`` camera (at
+Y, looking along -Y, orthographic, extent 0.55) at ``IMAGE_SIZE`` pixels, black background, so the
comparison needs no stored renders and the two images share one camera exactly.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

__all__ = ["IMAGE_SIZE", "BACK_VIEW", "back_normals", "image_metrics"]

IMAGE_SIZE = 256
BACK_VIEW = "back"


def back_normals(vertices: torch.Tensor, faces: torch.Tensor, size: int = IMAGE_SIZE, view: str = BACK_VIEW) -> torch.Tensor:
    """``[3, H, W]`` float in [0, 1]: the normal map of a model-space mesh from ``view`` (default the back)."""
    from ..mesh.render import render_normals
    from ..mesh.types import Mesh

    image = render_normals(Mesh(vertices, faces), views=(view,), size=size)[0]
    return image.permute(2, 0, 1).contiguous()


def image_metrics(pred: torch.Tensor, gt: torch.Tensor, lpips=None) -> Dict[str, Optional[float]]:
    """``{"psnr_back", "ssim_back", "lpips_back"}`` of two ``[3, H, W]`` images in [0, 1].

    PSNR is ``inf`` for identical images; ``lpips_back`` is ``None`` without an LPIPS model.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = pred.unsqueeze(0).float(), gt.unsqueeze(0).float()
    out = {
        "psnr_back": float(peak_signal_noise_ratio(a, b, data_range=1.0)),
        "ssim_back": float(structural_similarity_index_measure(a, b, data_range=1.0)),
        "lpips_back": None,
    }
    if lpips is not None:
        dev = next(lpips.parameters()).device
        out["lpips_back"] = float(lpips(a.to(dev), b.to(dev))[0])
    return out
