"""``run_eval``: every item of one or more prediction folders (variants) against a ground-truth
folder; writes the report files of :mod:`know3d_core.eval.report` and returns the report dict."""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from .. import __version__
from . import report as R
from .evaluate import METRICS, EvalSettings, ItemMetric, Shape, aggregate, evaluate_pair
from .items import list_items, load_shape, match_items

__all__ = ["run_eval", "picture"]

SHEET_RENDER = 128  # pixels of each worst-sheet render


def picture(shape: Shape, size: int, view: str = "back"):
    """``[H, W, 3]`` numpy normal map of a shape from ``view`` (its mesh, else its occupancy as cubes)."""
    from . import geometry as G
    from .images import back_normals

    if shape.has_mesh:
        v, f = shape.vertices, shape.faces
    elif shape.occupancy is not None:
        v, f = G.occupancy_mesh(_coarsest(shape.occupancy.cpu().bool()))
    else:
        return None
    return back_normals(v.cpu(), f.cpu(), size, view).permute(1, 2, 0).numpy()


def _coarsest(grid):
    """The coarsest grid whose nearest upsampling is ``grid`` (fewer faces to draw, same picture)."""
    for f in (8, 4, 2):
        if grid.shape[0] % f == 0:
            sub = grid[::f, ::f, ::f]
            up = sub.repeat_interleave(f, 0).repeat_interleave(f, 1).repeat_interleave(f, 2)
            if torch.equal(up, grid):
                return sub
    return grid


def run_eval(variants: Mapping[str, str], gt_root: str, out: str, settings: Optional[EvalSettings] = None,
             lpips=None, worst: int = 12, up: Optional[str] = None, progress: bool = True,
             extra_columns: Optional[Mapping[str, Mapping[str, Any]]] = None, plot: bool = True,
             extra_metrics: Optional[Mapping[str, Any]] = None,
             item_metrics: Sequence[ItemMetric] = ()) -> Dict[str, Any]:
    """Evaluate ``{variant name: prediction folder}`` against ``gt_root``; write into ``out``.

    ``extra_columns[variant][item id]`` adds free columns (e.g. the experiment's prompt) to the rows;
    ``extra_metrics`` (see :func:`evaluate.evaluate_pair`) and ``item_metrics``
    (:class:`~know3d_core.eval.evaluate.ItemMetric`: Uni3D image-to-shape similarity) add metric columns;
    ``plot=False`` leaves eval.png out (``report.write_plot`` can draw it later from eval.csv's rows).
    Bad folders (and an item metric's :meth:`check`) raise :class:`~know3d_core.errors.UsageError`
    before any metric is computed.
    """
    from tqdm.auto import tqdm

    settings = settings or EvalSettings()
    gt_items = list_items(gt_root, "--gt")
    plan: List[tuple] = []
    for name, root in variants.items():
        for p, g in match_items(list_items(root, f"--pred {name}"), gt_items, root, gt_root):
            plan.append((name, p, g))
    for metric in item_metrics:
        metric.check([(p, g) for _, p, g in plan])
    os.makedirs(out, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    gt_cache: Dict[str, Shape] = {}
    start = time.perf_counter()
    for name, p, g in tqdm(plan, desc="eval", disable=not progress, unit="item"):
        if g.id not in gt_cache:
            gt_cache = {g.id: load_shape(g, up)}  # items are sorted: one ground truth at a time is enough
        pred = load_shape(p, up)
        metrics = evaluate_pair(pred, gt_cache[g.id], settings, lpips, extra_metrics=extra_metrics)
        for metric in item_metrics:
            metrics.update(metric(pred, gt_cache[g.id], p, g))
        row = {"variant": name, "item": p.id, "gt": g.id, **metrics}
        row.update((extra_columns or {}).get(name, {}).get(p.id, {}))
        rows.append(row)
    extra = sorted({k for r in rows for k in r} - set(R.ID_COLUMNS) - set(METRICS))  # extra metrics included
    names = tuple(extra_metrics or ()) + tuple(n for m in item_metrics for n in m.names)
    aggregates = {v: aggregate([r for r in rows if r["variant"] == v], names) for v in variants}
    report = {"know3d": __version__, "gt": os.path.abspath(gt_root),
              "variants": {v: os.path.abspath(p) for v, p in variants.items()},
              "settings": settings.as_dict(), "seconds": time.perf_counter() - start,
              "aggregate": aggregates, "items": rows}
    if item_metrics:
        report["item_metrics"] = [m.describe() for m in item_metrics]
    R.write_csv(os.path.join(out, R.CSV_NAME), rows, extra)
    if plot:
        R.write_plot(os.path.join(out, R.PLOT_NAME), rows, list(variants), names)
    metric = R.worst_metric(rows)
    if metric and worst > 0:
        _write_worst(out, rows, plan, metric, worst, settings, up)
    report["worst_metric"] = metric
    R.write_json(os.path.join(out, R.JSON_NAME), report)
    return report


def _write_worst(out: str, rows, plan, metric: str, count: int, settings: EvalSettings, up) -> None:
    finite = [i for i, r in enumerate(rows) if R._clean(r.get(metric)) is not None]
    finite.sort(key=lambda i: float(rows[i][metric]), reverse=metric in R.LOWER_IS_BETTER)
    images = {}
    for i in finite[:count]:
        _, p, g = plan[i]
        a, b = picture(load_shape(p, up), SHEET_RENDER), picture(load_shape(g, up), SHEET_RENDER)
        if a is not None and b is not None:
            images[i] = (a, b)
    R.write_worst_sheet(os.path.join(out, R.WORST_NAME), rows, images, metric, count)
