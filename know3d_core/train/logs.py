"""What a run shows and leaves behind: a tqdm bar (loss, lr, samples/s), ``RUN/metrics.csv``,
TensorBoard event files in ``RUN/tensorboard/`` (through ``tensorboardX``, the light writer; skipped
with a note when it is not installed) and ``RUN/loss.png``.

Only the main process writes. On resume the CSV keeps its rows up to the resumed step and the
TensorBoard writer purges later events, so an interrupted run's files read like an uninterrupted one's.
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
from typing import List, Optional, Tuple

from ..fileio import atomic_write_bytes

__all__ = ["RunLogger", "read_metrics", "plot_loss", "METRICS_FILE", "PLOT_FILE", "TENSORBOARD_DIR"]

METRICS_FILE = "metrics.csv"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
COLUMNS = ("step", "loss", "lr", "grad_norm", "samples_per_s")


def read_metrics(path: str) -> List[dict]:
    """Rows of a metrics CSV as dicts of floats (``step`` an int)."""
    if not os.path.isfile(path):
        return []
    with open(path, "r", encoding="utf-8", newline="") as f:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


class RunLogger:
    def __init__(self, out: str, active: bool, start: int, total: int, progress: bool = True):
        self.active = active
        self.out = out
        self.path = os.path.join(out, METRICS_FILE)
        self.rows: List[dict] = []
        self.bar = None
        self.tb = None
        if not active:
            return
        os.makedirs(out, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r["step"] <= start]
        self._write(kept, mode="w")
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            print("know3d train: tensorboardX is not installed; losses go to metrics.csv only "
                  "(pip install 'comfyui-know3d[train]')", file=sys.stderr)
        else:
            self.tb = SummaryWriter(os.path.join(out, TENSORBOARD_DIR), purge_step=start + 1 if start else None)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def _write(self, rows: List[dict], mode: str = "a") -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        if mode == "w":
            writer.writeheader()
        for r in rows:
            writer.writerow({k: r[k] for k in COLUMNS})
        if mode == "w":
            atomic_write_bytes(self.path, buf.getvalue().encode())
        else:
            with open(self.path, "a", encoding="utf-8", newline="") as f:
                f.write(buf.getvalue())

    def log(self, step: int, loss: float, lr: float, grad_norm: float, samples_per_s: float, every: int = 1) -> None:
        if not self.active:
            return
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "samples_per_s": samples_per_s}
        self.rows.append(row)
        if self.tb is not None:
            for key in COLUMNS[1:]:
                self.tb.add_scalar(f"train/{key}", row[key], step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.2g}", samples_s=f"{samples_per_s:.3g}")
        if len(self.rows) >= max(1, every):
            self.flush()

    def flush(self) -> None:
        if self.active and self.rows:
            self._write(self.rows)
            self.rows = []
            if self.tb is not None:
                self.tb.flush()

    def plot(self) -> Optional[str]:
        if not self.active:
            return None
        self.flush()
        return plot_loss(read_metrics(self.path), os.path.join(self.out, PLOT_FILE))

    def close(self) -> None:
        if not self.active:
            return
        self.flush()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _smooth(values: List[float], window: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss(rows: List[dict], path: str, size: Tuple[int, int] = (800, 400)) -> Optional[str]:
    """PNG of the loss per step (raw in grey, moving average in blue, log scale when it spans
    more than a decade). Returns the path, or None with no finite row."""
    from PIL import Image, ImageDraw

    pts = [(r["step"], r["loss"]) for r in rows if math.isfinite(r["loss"])]
    if not pts:
        return None
    w, h = size
    left, right, top, bottom = 60, 20, 20, 40
    steps = [p[0] for p in pts]
    losses = [p[1] for p in pts]
    use_log = min(losses) > 0 and max(losses) / min(losses) > 10
    ys = [math.log10(v) for v in losses] if use_log else losses
    y0, y1 = min(ys), max(ys)
    x0, x1 = min(steps), max(steps)
    y1 = y1 if y1 > y0 else y0 + 1.0
    x1 = x1 if x1 > x0 else x0 + 1

    def xy(s, v):
        return (left + (s - x0) / (x1 - x0) * (w - left - right), top + (y1 - v) / (y1 - y0) * (h - top - bottom))

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for series, colour in ((ys, (170, 170, 170)), (_smooth(ys, max(1, len(ys) // 20)), (30, 90, 200))):
        line = [xy(s, v) for s, v in zip(steps, series)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        else:
            draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
    fmt = (lambda v: f"{10 ** v:.3g}") if use_log else (lambda v: f"{v:.3g}")
    draw.text((4, top), fmt(y1), fill="black")
    draw.text((4, h - bottom - 10), fmt(y0), fill="black")
    draw.text((left, h - bottom + 8), f"step {x0}", fill="black")
    draw.text((w - right - 80, h - bottom + 8), f"step {x1}", fill="black")
    draw.text((left + 10, 4), "training loss" + (" (log scale)" if use_log else ""), fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path
