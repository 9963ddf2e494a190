"""Finding and reading the items of ``--pred`` and ``--gt`` folders.

A folder of items is either

* a dataset written by ``know3d data prepare`` (it has ``manifest.jsonl``): one item per asset whose
  status is ok, id = its SHA-256, mesh = ``mesh.safetensors``, occupancy = ``occupancy_64.safetensors``;
* a folder of item folders (``know3d batch`` output, the experiment's output): id = folder name; the
  item holds ``mesh.<glb|obj|ply|stl|safetensors>`` and/or ``occupancy_64.safetensors``, and may name
  its ground truth in ``record.json`` (key ``"gt"``; default: the same id);
* a flat folder of mesh files: id = file name without extension.

Mesh files in glb / obj / ply are read as Y-up (the pack's export default) and turned to Z-up model
space; stl and safetensors are Z-up. ``up="z"`` / ``up="y"`` overrides for every text/binary format.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from ..data import layout as L
from ..errors import UsageError

__all__ = ["Item", "MESH_NAMES", "list_items", "load_shape", "match_items"]

MESH_EXTENSIONS = (".glb", ".obj", ".ply", ".stl", ".safetensors")
MESH_NAMES = tuple("mesh" + e for e in MESH_EXTENSIONS)
Y_UP_EXTENSIONS = (".glb", ".obj", ".ply")
RECORD_NAME = "record.json"
GT_KEY = "gt"


@dataclass
class Item:
    id: str
    mesh: Optional[str]          # path of the mesh file, if any
    occupancy: Optional[str]     # path of occupancy_64.safetensors, if any
    gt: str                      # id of the ground-truth item it is compared with
    folder: Optional[str] = None
    info: Optional[Dict] = None  # record.json / asset.json contents, when present


def _read_json(path: str) -> Optional[Dict]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} cannot be read as JSON ({' '.join(str(e).split())})") from None


def _dataset_items(root: str) -> List[Item]:
    items = []
    with open(L.manifest_path(root), "r", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("status") != L.STATUS_OK:
                continue
            folder = L.asset_dir(root, row["sha256"])
            mesh = os.path.join(folder, L.MESH_FILE)
            occ = os.path.join(folder, L.OCCUPANCY_FILE)
            items.append(Item(row["sha256"], mesh if os.path.isfile(mesh) else None,
                              occ if os.path.isfile(occ) else None, row["sha256"], folder,
                              _read_json(os.path.join(folder, L.ASSET_RECORD))))
    return items


def _folder_item(folder: str, name: str) -> Optional[Item]:
    mesh = next((os.path.join(folder, n) for n in MESH_NAMES if os.path.isfile(os.path.join(folder, n))), None)
    occ = os.path.join(folder, L.OCCUPANCY_FILE)
    occ = occ if os.path.isfile(occ) else None
    if mesh is None and occ is None:
        return None
    info = _read_json(os.path.join(folder, RECORD_NAME))
    gt = str((info or {}).get(GT_KEY) or name)
    return Item(name, mesh, occ, gt, folder, info)


def list_items(root: str, what: str = "--pred") -> List[Item]:
    """Items of ``root`` sorted by id; :class:`UsageError` if there are none."""
    if not os.path.isdir(root):
        raise UsageError(f"{what} {root} is not a folder")
    if os.path.isfile(L.manifest_path(root)):
        items = _dataset_items(root)
    else:
        items = []
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if name.startswith("."):
                continue
            if os.path.isdir(path):
                item = _folder_item(path, name)
                if item is not None:
                    items.append(item)
            elif name.lower().endswith(MESH_EXTENSIONS):
                stem = os.path.splitext(name)[0]
                items.append(Item(stem, path, None, stem))
    if not items:
        raise UsageError(f"{what} {root} holds no items (item folders with mesh.* or {L.OCCUPANCY_FILE}, "
                         f"mesh files, or a dataset with {L.MANIFEST_NAME})")
    return sorted(items, key=lambda it: it.id)


def match_items(pred: List[Item], gt: List[Item], pred_root: str, gt_root: str):
    """``[(pred item, gt item)]``; :class:`UsageError` naming the first prediction without a ground truth."""
    by_id = {it.id: it for it in gt}
    missing = [p for p in pred if p.gt not in by_id]
    if missing:
        raise UsageError(f"--pred {pred_root}: {len(missing)} item(s) have no ground truth in --gt {gt_root} "
                         f"(first: {missing[0].id!r} -> {missing[0].gt!r}); name it in {RECORD_NAME} key "
                         f"{GT_KEY!r} or use the same folder names")
    return [(p, by_id[p.gt]) for p in pred]


def _read_mesh(path: str, up: Optional[str]):
    import numpy as np
    import torch

    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors.torch import load_file

        t = load_file(path)
        if L.KEY_VERTICES not in t or L.KEY_FACES not in t:
            raise UsageError(f"{path}: expected tensors {L.KEY_VERTICES!r} and {L.KEY_FACES!r}")
        return t[L.KEY_VERTICES].float(), t[L.KEY_FACES].long()
    import trimesh

    try:
        tm = trimesh.load(path, force="mesh", process=False)
    except Exception as e:  # noqa: BLE001 - any reader failure is an unreadable input
        raise UsageError(f"{path} cannot be read as a mesh ({type(e).__name__}: {' '.join(str(e).split())})") from None
    v = np.asarray(tm.vertices, dtype=np.float64)
    if (up or ("y" if ext in Y_UP_EXTENSIONS else "z")) == "y":
        from ..mesh.export import y_up_to_z_up

        v = y_up_to_z_up(v)
    return torch.from_numpy(v).float(), torch.from_numpy(np.asarray(tm.faces, dtype=np.int64))


def load_shape(item: Item, up: Optional[str] = None):
    """The item's :class:`~know3d_core.eval.evaluate.Shape` (CPU tensors)."""
    from safetensors.torch import load_file

    from .evaluate import Shape

    shape = Shape()
    if item.mesh:
        shape.vertices, shape.faces = _read_mesh(item.mesh, up)
    if item.occupancy:
        t = load_file(item.occupancy)
        if L.KEY_OCCUPANCY not in t:
            raise UsageError(f"{item.occupancy}: expected a tensor {L.KEY_OCCUPANCY!r}")
        shape.occupancy = t[L.KEY_OCCUPANCY].bool()
    return shape
