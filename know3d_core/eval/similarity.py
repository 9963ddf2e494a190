"""Image-to-shape similarity columns of ``know3d eval`` (the paper's Table 1 "ULIP-2" and "Uni3D" scores).

Per item and model (``uni3d``: Uni3D point encoder + OpenCLIP EVA02-E-14-plus; ``ulip2``: ULIP-2
PointBERT + OpenCLIP ViT-bigG-14): ``<model>`` = cosine similarity between the 3D embedding of the
**predicted** shape and the image embedding of the item's **input front view**; ``<model>_gt`` = the
same for the ground-truth shape with the same image (the value a perfect prediction would get under
these encoders; read ``<model>`` against it). Both in [-1, 1], higher is better.

The front view of an item (:func:`front_image`): the image its generation recorded
(``record.json`` ``inputs.image``, as ``know3d generate`` / ``batch`` write it) when that file
exists; else the ground truth's front render from a ``know3d data prepare`` dataset (the view of
``cameras.json`` in the back-view ring at azimuth 0, the camera at -Y). Shapes: the mesh (surface
samples, :func:`know3d_core.eval.uni3d.prepare_points`); an item with only an occupancy grid gets no
value (``None``: counted in ``n_missing``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from ..data import layout as L
from ..errors import UsageError
from .evaluate import ItemMetric, Shape

__all__ = ["front_image", "ImageShapeSimilarity"]


def _json(path: str) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _recorded_image(item) -> Optional[str]:
    path = ((item.info or {}).get("inputs") or {}).get("image")
    return path if isinstance(path, str) and os.path.isfile(path) else None


def _dataset_front(item) -> Optional[str]:
    if not item.folder:
        return None
    cameras = _json(os.path.join(item.folder, L.CAMERAS_FILE))
    views = cameras.get("views", cameras) if isinstance(cameras, dict) else cameras
    for view in views if isinstance(views, list) else ():
        if isinstance(view, dict) and view.get("set") == L.SET_BACKVIEW and view.get("ring") == 0:
            path = os.path.join(item.folder, str(view.get("file")))
            return path if os.path.isfile(path) else None
    return None


def front_image(pred_item, gt_item) -> Optional[str]:
    """Path of the input front view of a prediction (see the module docstring), or ``None``."""
    return _recorded_image(pred_item) or _dataset_front(gt_item) or _recorded_image(gt_item)


class ImageShapeSimilarity(ItemMetric):
    """:class:`~know3d_core.eval.evaluate.ItemMetric` giving ``<name>`` and ``<name>_gt`` per item.

    ``load()`` returns ``(point model, image tower)``: ``(Uni3D, ClipImageTower)`` of
    :mod:`~know3d_core.eval.uni3d` or ``(Ulip2, ClipViTTower)`` of :mod:`~know3d_core.eval.ulip2`
    (``model(xyz, rgb [1, N, 3]) -> [1, E]``, ``tower(pixels) -> [1, E]``, ``tower.image_size``); it
    is called in :meth:`check`, after every item's front view is found, so a missing image or a
    wrong checkpoint stops the run before any metric. Embeddings are cached per image and per
    ground truth.
    """

    def __init__(self, name: str, load: Callable[[], Tuple[Any, Any]], device: str = "cpu",
                 points: Optional[int] = None, seed: int = 0, info: Optional[Dict[str, Any]] = None):
        from .uni3d import POINTS

        self.name, self.names = name, (name, name + "_gt")
        self._load, self.device, self.points, self.seed = load, device, points or POINTS, seed
        self.info = dict(info or {})
        self.model = self.tower = None
        self._images: Dict[str, str] = {}
        self._image_embed: Dict[str, torch.Tensor] = {}
        self._gt_embed: Dict[str, Optional[torch.Tensor]] = {}

    def check(self, pairs: Sequence[tuple]) -> None:
        missing = []
        for p, g in pairs:
            path = front_image(p, g)
            if path is None:
                missing.append(p.id)
            else:
                self._images[p.id + "\0" + g.id] = path
        if missing:
            raise UsageError(f"the {self.name} similarity needs each item's input front view: {len(missing)} item(s) "
                             f"have none (first: {missing[0]!r}); it is read from the item's record.json "
                             f"inputs.image or, for a --gt dataset, the ground truth's {L.CAMERAS_FILE} front view "
                             f"(azimuth 0); leave --{self.name} out to skip this metric")
        if self.model is None:
            self.model, self.tower = self._load()
            self.model.to(self.device)
            self.tower.to(self.device)

    @torch.no_grad()
    def _image(self, path: str) -> torch.Tensor:
        if path not in self._image_embed:
            from .uni3d import image_pixels

            pixels = image_pixels(path, self.tower.image_size).to(self.device)
            self._image_embed[path] = self.tower(pixels).float().cpu()
        return self._image_embed[path]

    @torch.no_grad()
    def _shape(self, shape: Shape) -> Optional[torch.Tensor]:
        if not shape.has_mesh:
            return None
        from .uni3d import prepare_points

        xyz, rgb = prepare_points(shape.vertices, shape.faces, self.points, self.seed)
        return self.model(xyz.to(self.device), rgb.to(self.device)).float().cpu()

    def __call__(self, pred: Shape, gt: Shape, pred_item, gt_item) -> Dict[str, Optional[float]]:
        from .uni3d import cosine

        image = self._image(self._images[pred_item.id + "\0" + gt_item.id])
        if gt_item.id not in self._gt_embed:
            self._gt_embed[gt_item.id] = self._shape(gt)
        out: Dict[str, Optional[float]] = {}
        for name, embed in zip(self.names, (self._shape(pred), self._gt_embed[gt_item.id])):
            out[name] = None if embed is None else float(cosine(embed, image)[0])
        return out

    def describe(self) -> Dict[str, Any]:
        out = {"columns": list(self.names), "points": self.points, "seed": self.seed,
               "image": "input front view (record.json inputs.image, else the dataset's azimuth-0 render)",
               **self.info}
        if self.model is not None:
            out["model"] = self.model.describe()
        return out
