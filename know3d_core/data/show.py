"""``know3d data show``: counts and a contact sheet of a prepared dataset.

Counts (from the asset records): assets ok, failed by reason, pairs per set, annotated pairs, and
voxels / latent tokens per resolution where the voxelize / encode steps recorded them. The contact
sheet has one row per asset: the first back-view pair (front | back, on grey), the voxelisation as
normal renders from the front-right and back-left (``occupancy_64``, else the coarsest dual grid,
else the normalised mesh, labelled as such) and the feature and annotations as text.
"""
from __future__ import annotations

import io
import textwrap
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import layout

__all__ = ["dataset_counts", "format_counts", "voxels_to_mesh", "write_contact_sheet"]


def _latent_tokens(root: str, sha256: str) -> Dict[str, int]:
    """Rows of each shape_latent_<res>.safetensors of an asset (header only)."""
    import os

    from safetensors import safe_open

    out = {}
    for res in layout.DUAL_GRID_RESOLUTIONS:
        path = os.path.join(layout.asset_dir(root, sha256), layout.shape_latent_file(res))
        if os.path.isfile(path):
            with safe_open(path, "np") as f:
                out[str(res)] = int(f.get_slice(layout.KEY_FEATS).get_shape()[0])
    return out


def dataset_counts(records: Sequence[Dict], root: Optional[str] = None) -> Dict:
    """Counts of a dataset's records; with ``root``, latent tokens are read from the shape-latent
    files of records that do not list them."""
    ok = [r for r in records if r.get("status") == layout.STATUS_OK]
    failed = Counter(r.get("reason") or "unknown" for r in records if r.get("status") != layout.STATUS_OK)
    steps = Counter(s for r in ok for s in r.get("steps") or ())
    voxels: Counter = Counter()
    tokens: Counter = Counter()
    for r in ok:
        for res, n in (r.get("voxels") or {}).items():
            voxels[str(res)] += int(n)
        tokens_of = r.get("tokens") or (_latent_tokens(root, r["sha256"]) if root else {})
        for res, n in tokens_of.items():
            tokens[str(res)] += int(n)
    return {"assets": len(records), "ok": len(ok), "failed": dict(sorted(failed.items())),
            "pairs": int(sum(int(r.get("n_pairs") or 0) for r in ok)), "steps": dict(steps),
            "voxels": dict(voxels), "tokens": dict(tokens),
            "splits": dict(Counter(r.get("split") for r in ok))}


def format_counts(c: Dict) -> str:
    lines = [f"assets: {c['assets']}  ok: {c['ok']}  failed: {sum(c['failed'].values())}"]
    for reason, n in c["failed"].items():
        lines.append(f"  failed ({reason}): {n}")
    lines.append(f"pairs: {c['pairs']}  splits: " + ", ".join(f"{k} {v}" for k, v in sorted(c["splits"].items())))
    lines.append("steps done: " + (", ".join(f"{s} {c['steps'].get(s, 0)}" for s in layout.STEPS)))
    for key in ("voxels", "tokens"):
        if c[key]:
            lines.append(f"{key}: " + ", ".join(f"{n} at {res}" for res, n in sorted(c[key].items(), key=lambda kv: int(kv[0]))))
    return "\n".join(lines)


# ------------------------------------------------------------------------- voxel meshes
def voxels_to_mesh(occupied: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Boundary quads of a bool grid [R, R, R] (index = x, y, z) as triangles in [-0.5, 0.5]^3:
    vertices float32 [V, 3], faces int64 [F, 3] (faces between two occupied voxels are dropped)."""
    occ = np.asarray(occupied, dtype=bool)
    res = occ.shape[0]
    pad = np.pad(occ, 1)
    corners = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]])
    # (axis, direction) -> the 4 cube corners of that face
    quads = {(0, -1): (0, 3, 7, 4), (0, 1): (1, 5, 6, 2), (1, -1): (0, 4, 5, 1), (1, 1): (3, 2, 6, 7),
             (2, -1): (0, 1, 2, 3), (2, 1): (4, 7, 6, 5)}
    verts, faces = [], []
    base = 0
    for (axis, d), quad in quads.items():
        neighbour = np.roll(pad, -d, axis=axis)[1:-1, 1:-1, 1:-1]
        idx = np.argwhere(occ & ~neighbour)
        if not len(idx):
            continue
        q = idx[:, None, :] + corners[list(quad)][None]  # [N, 4, 3]
        verts.append(q.reshape(-1, 3))
        n = np.arange(len(idx))[:, None] * 4 + base
        faces.append(np.concatenate([n + np.array([0, 1, 2]), n + np.array([0, 2, 3])]))
        base += len(idx) * 4
    if not verts:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    v = np.concatenate(verts).astype(np.float32) / res - 0.5
    return v, np.concatenate(faces).astype(np.int64)


def _voxel_source(folder: str) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], str]:
    import os

    from safetensors.numpy import load_file

    occ_path = os.path.join(folder, layout.OCCUPANCY_FILE)
    if os.path.isfile(occ_path):
        v, f = voxels_to_mesh(load_file(occ_path)[layout.KEY_OCCUPANCY])
        return v, f, f"occupancy {layout.OCCUPANCY_RESOLUTION}^3"
    for res in layout.DUAL_GRID_RESOLUTIONS:
        p = os.path.join(folder, layout.dual_grid_file(res))
        if os.path.isfile(p):
            coords = load_file(p)[layout.KEY_COORDS].astype(np.int64)
            grid = np.zeros((res,) * 3, dtype=bool)
            grid[coords[:, 0], coords[:, 1], coords[:, 2]] = True
            v, f = voxels_to_mesh(grid)
            return v, f, f"dual grid {res}^3 ({len(coords)} voxels)"
    p = os.path.join(folder, layout.MESH_FILE)
    if os.path.isfile(p):
        t = load_file(p)
        return t[layout.KEY_VERTICES], t[layout.KEY_FACES].astype(np.int64), "mesh (not voxelised)"
    return None, None, "no geometry"


# The voxelisation is shown from two three-quarter views (front-right, back-left), elevation 25
# degrees: head-on views of voxels show one flat normal colour.
_SHEET_VIEWS = ((45.0, 25.0), (225.0, 25.0))


def _turned(vertices: np.ndarray, azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """Rotate model space so that the camera at (azimuth, elevation) (layout's convention) becomes the
    ``front`` camera of ``mesh.render`` (at -Y): Rx(elevation) @ Rz(-azimuth)."""
    a, e = np.radians(azimuth_deg), np.radians(elevation_deg)
    rz = np.array([[np.cos(-a), -np.sin(-a), 0], [np.sin(-a), np.cos(-a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(e), -np.sin(e)], [0, np.sin(e), np.cos(e)]])
    return (np.asarray(vertices, np.float64) @ (rx @ rz).T).astype(np.float32)


def _normal_tiles(vertices, faces, size: int):
    import torch
    from PIL import Image

    from ..mesh.render import render_normals
    from ..mesh.types import Mesh

    if vertices is None or len(faces) == 0:
        return [Image.new("RGB", (size, size), (60, 60, 60))] * len(_SHEET_VIEWS)
    tiles = []
    for az, el in _SHEET_VIEWS:
        mesh = Mesh(torch.from_numpy(_turned(vertices, az, el)), torch.from_numpy(np.asarray(faces, np.int64)))
        img = render_normals(mesh, views=("front",), size=size, extent=0.8, background=(0.2, 0.2, 0.2))[0]
        tiles.append(Image.fromarray((img.numpy() * 255).round().astype(np.uint8)))
    return tiles


def _view_tile(path: str, size: int):
    from PIL import Image

    tile = Image.new("RGBA", (size, size), (128, 128, 128, 255))
    try:
        with Image.open(path) as im:
            tile.alpha_composite(im.convert("RGBA").resize((size, size), Image.BILINEAR))
    except OSError:
        pass
    return tile.convert("RGB")


def write_contact_sheet(root: str, path: str, records: Sequence[Dict], tile: int = 128, text_width: int = 260,
                        max_assets: int = 24) -> Optional[str]:
    """One row per ok asset (up to ``max_assets``); returns the PNG written, or None if none is ok."""
    import json
    import os

    from PIL import Image, ImageDraw

    from ..fileio import atomic_write_bytes

    rows = [r for r in records if r.get("status") == layout.STATUS_OK][:max_assets]
    if not rows:
        return None
    label_h = 14
    sheet = Image.new("RGB", (4 * tile + text_width, len(rows) * (tile + label_h)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, rec in enumerate(rows):
        folder = layout.asset_dir(root, rec["sha256"])
        y = i * (tile + label_h)
        pairs: List[Dict] = []
        pairs_path = os.path.join(folder, layout.PAIRS_FILE)
        if os.path.isfile(pairs_path):
            with open(pairs_path, "r", encoding="utf-8") as f:
                pairs = json.load(f)
        pair = next((p for p in pairs if p.get("set") == layout.SET_BACKVIEW), None)
        v, f, what = _voxel_source(folder)
        tiles = ([_view_tile(os.path.join(folder, pair["front"]), tile), _view_tile(os.path.join(folder, pair["back"]), tile)]
                 if pair else [Image.new("RGB", (tile, tile), (60, 60, 60))] * 2)
        tiles += _normal_tiles(v, f, tile)
        name = os.path.basename(str(rec.get("source") or ""))
        draw.text((4, y + 1), f"{rec['sha256'][:12]}  {name}  | front | back | {what}: front-right | back-left", fill=(230, 230, 230))
        for k, t in enumerate(tiles):
            sheet.paste(t, (k * tile, y + label_h))
        lines = [f"feature: {rec['feature']}"] if rec.get("feature") else []
        for a in (pair or {}).get("annotations", []) or ["(no annotations)"]:
            lines += textwrap.wrap("- " + a, width=max(10, text_width // 6))
        draw.multiline_text((4 * tile + 6, y + label_h + 2), "\n".join(lines[: tile // 12]), fill=(230, 230, 230))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
