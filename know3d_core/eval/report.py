"""What ``know3d eval`` writes: ``eval.json``, ``eval.csv``, ``eval.png`` (metric distributions per
variant) and ``worst.png`` (contact sheet of the worst items). Every file is written atomically.

JSON holds ``null`` where a value is missing or not finite (the PSNR of identical images is infinite);
the CSV leaves those cells empty.
"""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Dict, List, Optional, Sequence

from ..fileio import atomic_write_bytes
from .evaluate import LOWER_IS_BETTER, METRICS

__all__ = ["JSON_NAME", "CSV_NAME", "PLOT_NAME", "WORST_NAME", "write_json", "write_csv", "write_plot",
           "write_worst_sheet", "worst_metric", "format_table"]

JSON_NAME, CSV_NAME, PLOT_NAME, WORST_NAME = "eval.json", "eval.csv", "eval.png", "worst.png"
ID_COLUMNS = ("variant", "item", "gt")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_json(path: str, report: Dict[str, Any]) -> str:
    text = json.dumps(_clean(report), indent=1, sort_keys=False, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode())


def write_csv(path: str, rows: Sequence[Dict[str, Any]], extra: Sequence[str] = ()) -> str:
    buf = io.StringIO()
    columns = list(ID_COLUMNS) + list(extra) + [m for m in METRICS if any(r.get(m) is not None for r in rows)]
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if _clean(r.get(k)) is None else r.get(k)) for k in columns})
    return atomic_write_bytes(path, buf.getvalue().encode())


def _present_metrics(rows: Sequence[Dict[str, Any]], extra: Sequence[str] = ()) -> List[str]:
    return [m for m in tuple(METRICS) + tuple(extra) if any(_clean(r.get(m)) is not None for r in rows)]


def write_plot(path: str, rows: Sequence[Dict[str, Any]], variants: Sequence[str], extra: Sequence[str] = ()
               ) -> Optional[str]:
    """One panel per metric (:data:`METRICS`, then ``extra`` such as ``uni3d``): each variant's
    per-item values (dots) over a box plot."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    metrics = _present_metrics(rows, extra)
    if not metrics:
        return None
    cols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * nrows), dpi=100)
    for k, m in enumerate(metrics):
        ax = fig.add_subplot(nrows, cols, k + 1)
        data = [[float(r[m]) for r in rows if r["variant"] == v and _clean(r.get(m)) is not None] for v in variants]
        shown = [(v, d) for v, d in zip(variants, data) if d]
        if shown:
            ax.boxplot([d for _, d in shown], showfliers=False)
            for i, (_, d) in enumerate(shown):
                xs = [i + 1 + 0.25 * ((j * 0.618) % 1 - 0.5) for j in range(len(d))]
                ax.plot(xs, d, ".", alpha=0.5, markersize=3)
            ax.set_xticks(range(1, len(shown) + 1), [v for v, _ in shown], rotation=30, fontsize=7)
        ax.set_title(m + (" (lower better)" if m in LOWER_IS_BETTER else ""), fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def worst_metric(rows: Sequence[Dict[str, Any]]) -> Optional[str]:
    """The metric the contact sheet ranks by: back-half Chamfer, else back-half 64^3 IoU, else any."""
    present = _present_metrics(rows)
    for m in ("chamfer_back", "iou_64_back", "chamfer", "iou_64"):
        if m in present:
            return m
    return present[0] if present else None


def write_worst_sheet(path: str, rows: Sequence[Dict[str, Any]], images: Dict[int, Any], metric: str,
                      count: int = 12, tile: int = 160) -> Optional[str]:
    """Contact sheet of the ``count`` worst rows by ``metric``: prediction | ground truth (back normals).

    ``images[i]`` = ``(pred [H, W, 3], gt [H, W, 3])`` float arrays in [0, 1] for row ``i``.
    """
    from PIL import Image, ImageDraw

    ranked = [i for i in range(len(rows)) if _clean(rows[i].get(metric)) is not None and i in images]
    ranked.sort(key=lambda i: float(rows[i][metric]), reverse=metric in LOWER_IS_BETTER)
    ranked = ranked[:count]
    if not ranked:
        return None
    label_h = 28
    sheet = Image.new("RGB", (2 * tile, len(ranked) * (tile + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, i in enumerate(ranked):
        y = k * (tile + label_h)
        for j, arr in enumerate(images[i]):
            im = Image.fromarray((arr.clip(0, 1) * 255).round().astype("uint8")).resize((tile, tile))
            sheet.paste(im, (j * tile, y + label_h))
        r = rows[i]
        draw.text((3, y + 2), f"{r['variant']}/{r['item']}"[:2 * tile // 6], fill="black")
        draw.text((3, y + 14), f"{metric} {float(r[metric]):.4f}   pred | gt", fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def format_table(aggregates: Dict[str, Dict[str, Dict[str, Any]]], metrics: Optional[Sequence[str]] = None,
                 extra: Sequence[str] = ()) -> str:
    """Plain-text table: one row per variant, the mean of each metric (``extra`` after :data:`METRICS`)."""
    variants = list(aggregates)
    metrics = list(metrics or [m for m in tuple(METRICS) + tuple(extra) if any(m in aggregates[v] for v in variants)])
    head = ["variant"] + metrics
    lines = [head]
    for v in variants:
        cells = [v]
        for m in metrics:
            s = aggregates[v].get(m)
            cells.append("-" if not s or s.get("mean") is None else f"{s['mean']:.4f}")
        lines.append(cells)
    widths = [max(len(row[c]) for row in lines) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines)
