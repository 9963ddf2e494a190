"""The validation sheet of the flow tasks: every ``--val-every`` steps, meshes generated from a few
held-out pairs (the ``val`` split; the first training pairs when it is empty) with the flow being
trained, each with and without its knowledge for ``know3d``, shown as normal renders (front and
back) beside the input front view: ``RUN/validation/step_XXXXXXX.png``.

The other networks of the pipeline type (``512`` for the ``ss`` / ``shape512`` stages,
``1024_cascade`` for ``shape1024``) come from the base folder (for ``know3d`` with the branches of
``--init`` or zero-output ones, as in the export) and stay loaded between sheets.
"""
from __future__ import annotations

import io
import os
from typing import Any, Optional

import numpy as np
import torch

from ..fileio import atomic_write_bytes

__all__ = ["ValidationSheet", "VALIDATION_DIR"]

VALIDATION_DIR = "validation"
TILE = 128


def _tiles(mesh, size: int) -> torch.Tensor:
    """Front and back normal renders side by side ``[size, 2 * size, 3]`` in [0, 1]."""
    from ..mesh import render_normals

    images = render_normals(mesh.cpu(), views=("front", "back"), size=size, background=(0.1, 0.1, 0.1))
    return torch.cat(list(images), dim=1)


class ValidationSheet:
    """``sheet(step) -> path``: generate the held-out pairs' meshes with the current weights."""

    def __init__(self, task: Any, n_pairs: int, steps: int):
        self.task = task
        self.steps = int(steps)
        from .dataset import DatasetIndex
        from ..errors import UsageError

        try:
            val = DatasetIndex.load(task.index.root, "val", task.index.sets)
            pairs = val.pairs
        except UsageError:  # no val split: the first training pairs (say so in the sheet's name)
            pairs = task.index.pairs
        self.pairs = pairs[: max(1, int(n_pairs))]
        self._geometry = None

    def _pipeline(self):
        if self._geometry is None:
            from ..geometry_pipeline import Trellis2GeometryPipeline
            from ..plan import required_models
            from ..trellis2.loading import load_pipeline_models

            task = self.task
            self.pipeline_type = "1024_cascade" if task.cfg.stage == "shape1024" else "512"
            keys = [k for k in required_models(self.pipeline_type) if k != task.key]
            flows = [k for k in keys if "flow" in k]
            models = task.companion_flows(flows)
            models.update(load_pipeline_models(task.config.folder, keys=[k for k in keys if k not in flows],
                                               device=task.device))
            models[task.key] = task.flow
            self._geometry = Trellis2GeometryPipeline(models, task.config, task.geometry.image_cond_model,
                                                      device=task.device, kernel_warmup=False)  # mid-training: no background compiles
        return self._geometry

    def _knowledge(self, pair) -> Optional[Any]:
        if not self.task.branch:
            return None
        return self.task.spec.wrap(self.task.knowledge(pair).to(self.task.device)[None])

    @torch.no_grad()
    def __call__(self, step: int, out: str) -> str:
        from .dataset import open_view

        flow = self.task.flow
        was_training = flow.training
        geometry = self._pipeline()
        rows = []
        try:
            for pair in self.pairs:
                front = geometry.preprocess(open_view(pair.view("front")))
                tiles = [torch.from_numpy(np.array(front.resize((TILE, TILE)))).float() / 255]
                variants = [self._knowledge(pair), None] if self.task.branch else [None]
                for knowledge in variants:
                    tiles.append(self._mesh_tiles(geometry, front, knowledge))
                rows.append(torch.cat(tiles, dim=1))
        finally:
            flow.train(was_training)
        return self._write(torch.cat(rows, dim=0), step, out)

    def _mesh_tiles(self, geometry, front, knowledge) -> torch.Tensor:
        params = {"steps": self.steps}
        try:
            result = geometry.run(front, knowledge=knowledge, pipeline_type=self.pipeline_type, preprocess=False,
                                  ss_params=params, shape_params=params)
            return _tiles(result.mesh, TILE)
        except Exception:  # noqa: BLE001 - an early model may give no surface: a grey tile, training goes on
            return torch.full((TILE, 2 * TILE, 3), 0.5)

    @staticmethod
    def _write(image: torch.Tensor, step: int, out: str) -> str:
        from PIL import Image

        arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="PNG")
        path = os.path.join(out, VALIDATION_DIR, f"step_{step:07d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
        return path
