"""Per-item metrics of a prediction against its ground truth, and their aggregation.

A *shape* is a mesh, a ``64^3`` surface occupancy, or both (stage-1-only predictions have only the
occupancy). Metric names (columns of ``eval.csv``; ``*_back`` = restricted to the back half, see
:mod:`know3d_core.eval.geometry` for every definition):

=================  ===============================================================================
``iou_64``         IoU of the 64^3 occupancies (the paper's stage-1 ablation metric)
``iou_mesh``       IoU of the meshes' surface voxels at ``EvalSettings.mesh_resolution`` (128)
``chamfer``        L1 Chamfer distance after unit-sphere normalisation, 8192 FPS points per side
``fscore``         F-score at ``tau`` (0.05), with ``precision`` and ``recall``
``psnr_back`` ...  back-view normal-map PSNR / SSIM / LPIPS (meshes only; LPIPS when weights given)
=================  ===============================================================================

Where a side has no mesh, the surface points are the centres of its occupied voxels, and the 64^3
occupancy of a mesh without a stored one is :func:`geometry.surface_voxels` at 64 (both sides are
then voxelised the same way: a stored occupancy is used only when both sides have one).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import geometry as G

__all__ = ["Shape", "EvalSettings", "evaluate_pair", "aggregate", "ItemMetric", "METRICS", "LOWER_IS_BETTER"]

METRICS = ("iou_64", "iou_64_back", "iou_mesh", "iou_mesh_back", "chamfer", "chamfer_back", "fscore",
           "fscore_back", "precision", "recall", "psnr_back", "ssim_back", "lpips_back")
LOWER_IS_BETTER = frozenset({"chamfer", "chamfer_back", "lpips_back"})
MetricFn = Callable[["Shape", "Shape"], Optional[float]]


@dataclass
class Shape:
    """A mesh (``vertices [V, 3]`` float, ``faces [F, 3]`` int, model space) and/or ``occupancy [64]^3`` bool."""

    vertices: Optional[torch.Tensor] = None
    faces: Optional[torch.Tensor] = None
    occupancy: Optional[torch.Tensor] = None

    @property
    def has_mesh(self) -> bool:
        return self.vertices is not None and self.faces is not None and self.faces.shape[0] > 0

    def to(self, device) -> "Shape":
        move = (lambda t: None if t is None else t.to(device))
        return Shape(move(self.vertices), move(self.faces), move(self.occupancy))


@dataclass
class EvalSettings:
    samples: int = G.SURFACE_SAMPLES
    points: int = G.FPS_POINTS
    tau: float = G.FSCORE_TAU
    mesh_resolution: int = G.MESH_IOU_RESOLUTION
    normalize: str = "gt"          # "gt": the ground truth's transform for both; "each": own transform
    image_size: int = 256
    seed: int = 0
    fps_backend: str = "auto"
    device: str = "cpu"
    lpips_net: Optional[str] = None  # recorded when an LPIPS model is passed
    extra: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


class ItemMetric:
    """Columns that need the items' files as well as their shapes (e.g. the input image: the
    Uni3D image-to-shape similarity of :mod:`know3d_core.eval.similarity`).

    ``run_eval`` calls :meth:`check` once with every ``(pred item, gt item)`` pair before any
    metric is computed (raise ``UsageError`` there: missing inputs, bad weights), then the metric
    per pair; :meth:`describe` goes into ``eval.json`` under ``"item_metrics"``.
    """

    names: Tuple[str, ...] = ()

    def check(self, pairs: Sequence[tuple]) -> None:
        return None

    def __call__(self, pred: Shape, gt: Shape, pred_item, gt_item) -> Dict[str, Optional[float]]:
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        return {"columns": list(self.names)}


def _occupancy(shape: Shape) -> torch.Tensor:
    return G.surface_voxels(shape.vertices, shape.faces, G.OCCUPANCY_RESOLUTION)


def _occupancies(pred: Shape, gt: Shape):
    if pred.occupancy is not None and gt.occupancy is not None:
        return pred.occupancy.bool(), gt.occupancy.bool()
    if pred.has_mesh and gt.has_mesh:
        return _occupancy(pred), _occupancy(gt)
    return None, None


def _raw_points(shape: Shape, settings: EvalSettings) -> torch.Tensor:
    if shape.has_mesh:  # a fresh generator per shape: identical meshes give identical samples
        generator = torch.Generator().manual_seed(settings.seed)
        return G.sample_surface(shape.vertices, shape.faces, settings.samples, generator=generator)
    occ = shape.occupancy.bool()
    idx = occ.nonzero().float()
    return (idx + 0.5) / occ.shape[0] - 0.5


def _reference_vertices(shape: Shape) -> torch.Tensor:
    """Points whose bounding box and farthest point define the unit-sphere transform."""
    if shape.has_mesh:
        return shape.vertices
    idx = shape.occupancy.bool().nonzero().float()
    return (idx + 0.5) / shape.occupancy.shape[0] - 0.5


def _fps(points: torch.Tensor, settings: EvalSettings) -> torch.Tensor:
    return points[G.farthest_point_sampling(points, settings.points, backend=settings.fps_backend)]


def _point_metrics(pred: Shape, gt: Shape, settings: EvalSettings) -> Dict[str, float]:
    p_raw, g_raw = _raw_points(pred, settings), _raw_points(gt, settings)
    if p_raw.shape[0] == 0 or g_raw.shape[0] == 0:
        nan = float("nan")
        return {"chamfer": nan, "fscore": 0.0, "precision": 0.0, "recall": 0.0, "chamfer_back": nan, "fscore_back": 0.0}
    g_centre, g_radius = G.unit_sphere_transform(_reference_vertices(gt))
    if settings.normalize == "each":
        p_centre, p_radius = G.unit_sphere_transform(_reference_vertices(pred))
    elif settings.normalize == "gt":
        p_centre, p_radius = g_centre, g_radius
    else:
        raise ValueError(f"EvalSettings.normalize must be 'gt' or 'each', got {settings.normalize!r}")
    p = (p_raw - p_centre.to(p_raw)) / p_radius
    g = (g_raw - g_centre.to(g_raw)) / g_radius
    full = G.chamfer_fscore(_fps(p, settings), _fps(g, settings), settings.tau)
    # The back half of each normalised cloud: behind its (normalised) box centre, the origin.
    back = G.chamfer_fscore(_fps(p[G.back_half_mask(p)], settings), _fps(g[G.back_half_mask(g)], settings), settings.tau)
    return {"chamfer": full.chamfer, "fscore": full.fscore, "precision": full.precision, "recall": full.recall,
            "chamfer_back": back.chamfer, "fscore_back": back.fscore}


def evaluate_pair(pred: Shape, gt: Shape, settings: Optional[EvalSettings] = None, lpips=None,
                  with_images: bool = True, extra_metrics: Optional[Mapping[str, MetricFn]] = None
                  ) -> Dict[str, Optional[float]]:
    """Every metric of :data:`METRICS` that the two shapes allow (others are ``None``).

    ``extra_metrics`` ``{name: fn(pred, gt) -> float | None}`` adds columns (metrics that need the
    items' files, such as the Uni3D similarity, are :class:`ItemMetric` of ``run_eval``).
    """
    settings = settings or EvalSettings()
    pred, gt = pred.to(settings.device), gt.to(settings.device)
    out: Dict[str, Optional[float]] = {m: None for m in METRICS}
    occ_p, occ_g = _occupancies(pred, gt)
    if occ_p is not None:
        back = G.back_half_grid(occ_p.shape[0], occ_p.device)
        out["iou_64"], out["iou_64_back"] = G.voxel_iou(occ_p, occ_g), G.voxel_iou(occ_p, occ_g, back)
    if pred.has_mesh and gt.has_mesh:
        r = settings.mesh_resolution
        vp, vg = G.surface_voxels(pred.vertices, pred.faces, r), G.surface_voxels(gt.vertices, gt.faces, r)
        out["iou_mesh"], out["iou_mesh_back"] = G.voxel_iou(vp, vg), G.voxel_iou(vp, vg, G.back_half_grid(r, vp.device))
    if (pred.has_mesh or pred.occupancy is not None) and (gt.has_mesh or gt.occupancy is not None):
        out.update(_point_metrics(pred, gt, settings))
    if with_images and pred.has_mesh and gt.has_mesh:
        from .images import back_normals, image_metrics

        out.update(image_metrics(back_normals(pred.vertices, pred.faces, settings.image_size),
                                 back_normals(gt.vertices, gt.faces, settings.image_size), lpips))
    for name, fn in (extra_metrics or {}).items():
        out[name] = fn(pred, gt)
    return out


def _finite(values: List[Optional[float]]) -> List[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def aggregate(rows: List[Dict[str, Any]], extra: Sequence[str] = ()) -> Dict[str, Dict[str, Optional[float]]]:
    """Per metric (:data:`METRICS` and ``extra``): mean, median, std (population), min, max over items
    with a finite value, and ``n`` (items counted) / ``n_missing`` (None, nan, or inf such as the PSNR
    of identical images)."""
    out = {}
    for m in tuple(METRICS) + tuple(extra):
        vals = _finite([r.get(m) for r in rows])
        missing = len(rows) - len(vals)
        if not vals:
            if any(r.get(m) is not None for r in rows):
                out[m] = {"mean": None, "median": None, "std": None, "min": None, "max": None, "n": 0,
                          "n_missing": missing}
            continue
        t = torch.tensor(vals, dtype=torch.float64)
        out[m] = {"mean": float(t.mean()), "median": float(t.median()), "std": float(t.std(unbiased=False)),
                  "min": float(t.min()), "max": float(t.max()), "n": len(vals), "n_missing": missing}
    return out
