"""Procedural assets for tests and the small-scale experiment: one front, several named backs.

``make_asset(seed, feature)`` builds a textured object in model space (Z up, front faces -Y, see
``know3d_core.data.layout``): a block standing on a base plate. The seed fixes the block's
proportions, colours and front texture; the feature only changes the part behind the plane
``y = BACK_PLANE`` (inside the back half), and every object of one seed has the same bounding box,
so after normalisation the fronts of one seed are identical and only the backs differ. Each feature
has a clearly different back geometry (a loop, a recess, bars, a plate, bumps, nothing) and the
short component descriptions a vision-language model would give for the back view.

Geometry is built with manifold3d (watertight, no inner faces), textured by box projection and
written as GLB (glTF is Y up: exported as (x, z, -y)) through trimesh.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = ["FEATURES", "ANNOTATIONS", "SyntheticAsset", "make_asset", "write_glb", "write_dataset_folder",
           "BACK_PLANE", "to_gltf_axes", "from_gltf_axes"]

FEATURES = ("flat_back", "handle", "hole", "slats", "shelf", "knobs")
ANNOTATIONS: Dict[str, List[str]] = {
    "flat_back": ["a thick, flat back panel", "a base plate under the body"],
    "handle": ["a vertical loop handle in the middle of the back", "a base plate under the body"],
    "hole": ["a thick back panel with a large square hole through its middle", "a base plate under the body"],
    "slats": ["three vertical slats standing off the back", "a base plate under the body"],
    "shelf": ["a horizontal shelf sticking out of the back", "a base plate under the body"],
    "knobs": ["four round knobs on the back", "a base plate under the body"],
}
# The block's back face (the centre plane); features live behind it (y > BACK_PLANE), up to the base
# plate's depth, so after normalisation the back half holds the feature and the back of the thin base.
BACK_PLANE = 0.0
_FRONT_Y, _BACK_Y, _BASE_H, _PANEL = -0.3, 0.3, 0.05, 0.15
_TEXTURE_SIZE = 128


@dataclass
class SyntheticAsset:
    """A procedural object: vertices float32 [V, 3] (Z up), faces int32 [F, 3], per-vertex uv float32
    [V, 2], base-colour texture uint8 [T, T, 3], metallic and roughness factors, feature, annotations."""

    vertices: np.ndarray
    faces: np.ndarray
    uv: np.ndarray
    texture: np.ndarray
    metallic: float
    roughness: float
    feature: str
    annotations: List[str]
    seed: int


def _box(lo: Sequence[float], hi: Sequence[float]):
    import manifold3d as m3

    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    return m3.Manifold.cube(tuple(hi - lo)).translate(tuple(lo))


def _cylinder_y(center_xz: Tuple[float, float], radius: float, y0: float, y1: float, segments: int = 32):
    """A cylinder along +Y from y0 to y1."""
    import manifold3d as m3

    c = m3.Manifold.cylinder(y1 - y0, radius, radius, segments)  # along +Z from 0
    return c.rotate((-90.0, 0.0, 0.0)).translate((center_xz[0], y0, center_xz[1]))


def _sphere(center, radius: float, segments: int = 24):
    import manifold3d as m3

    return m3.Manifold.sphere(radius, segments).translate(tuple(center))


def _feature_solid(feature: str, w: float, h: float):
    """(solid to add, solid to subtract) behind the back plane; None where unused."""
    b, d = BACK_PLANE, _BACK_Y
    mid = _BASE_H + 0.5 * (h - _BASE_H)
    panel = _box((-w / 2, b - 0.01, _BASE_H - 0.01), (w / 2, b + _PANEL, h))
    if feature == "flat_back":
        return panel, None
    if feature == "hole":
        return panel - _box((-0.3 * w, b - 0.02, mid - 0.3 * h), (0.3 * w, b + _PANEL + 0.01, mid + 0.3 * h)), None
    if feature == "handle":
        outer = _box((-0.07, b - 0.01, mid - 0.3 * h), (0.07, d, mid + 0.3 * h))
        inner = _box((-0.08, b - 0.02, mid - 0.22 * h), (0.08, d - 0.08, mid + 0.22 * h))
        return outer - inner, None
    if feature == "slats":
        xs = (-0.35 * w, 0.0, 0.35 * w)
        out = _box((xs[0] - 0.04, d - 0.08, h - 0.12), (xs[-1] + 0.04, d, h - 0.04))
        for x in xs:
            out = out + _box((x - 0.04, b - 0.01, _BASE_H - 0.01), (x + 0.04, d, h - 0.04))
        return out, None
    if feature == "shelf":
        return _box((-w / 2, b - 0.01, mid - 0.05), (w / 2, d, mid + 0.05)), None
    if feature == "knobs":
        out = None
        for x in (-0.22 * w, 0.22 * w):
            for z in (mid - 0.22 * h, mid + 0.22 * h):
                s = _cylinder_y((x, z), 0.09, b - 0.01, d - 0.09) + _sphere((x, d - 0.09, z), 0.09)
                out = s if out is None else out + s
        return out, None
    raise ValueError(f"unknown synthetic feature {feature!r}; choose from {', '.join(FEATURES)}")


def _texture(rng: np.random.Generator) -> np.ndarray:
    """uint8 [T, T, 3]: stripes and a checker in two seed colours (the front pattern)."""
    t = _TEXTURE_SIZE
    c0, c1 = rng.uniform(40, 230, size=(2, 3))
    yy, xx = np.mgrid[0:t, 0:t]
    period = int(rng.integers(8, 24))
    pattern = ((xx // period + yy // period) % 2 == 0) ^ (((xx + yy) // max(period // 2, 2)) % 3 == 0)
    img = np.where(pattern[..., None], c0, c1)
    return img.clip(0, 255).astype(np.uint8)


def _box_uv(vertices: np.ndarray, faces: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unshared vertices per face with box-projected uv: (vertices [3F, 3], faces [F, 3], uv [3F, 2])."""
    tri = vertices[faces]  # [F, 3, 3]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    axis = np.abs(n).argmax(1)
    drop = {0: (1, 2), 1: (0, 2), 2: (0, 1)}
    uv = np.empty(tri.shape[:2] + (2,), dtype=np.float32)
    for a, (i, j) in drop.items():
        sel = axis == a
        uv[sel, :, 0] = tri[sel][:, :, i] + 0.5
        uv[sel, :, 1] = tri[sel][:, :, j]
    verts = tri.reshape(-1, 3).astype(np.float32)
    new_faces = np.arange(verts.shape[0], dtype=np.int32).reshape(-1, 3)
    return verts, new_faces, uv.reshape(-1, 2)


def make_asset(seed: int, feature: str) -> SyntheticAsset:
    """The object of ``seed`` with ``feature`` on its back (deterministic)."""
    if feature not in FEATURES:
        raise ValueError(f"unknown synthetic feature {feature!r}; choose from {', '.join(FEATURES)}")
    rng = np.random.default_rng(int(seed))
    w = float(rng.uniform(0.55, 0.8))
    h = float(rng.uniform(0.8, 1.0))
    texture = _texture(rng)
    metallic = float(rng.uniform(0.0, 0.3))
    roughness = float(rng.uniform(0.4, 0.9))
    solid = _box((-w / 2, _FRONT_Y, _BASE_H - 0.01), (w / 2, BACK_PLANE, h))
    solid = solid + _box((-w / 2, _FRONT_Y, 0.0), (w / 2, _BACK_Y, _BASE_H))
    add, sub = _feature_solid(feature, w, h)
    if add is not None:
        solid = solid + add
    if sub is not None:
        solid = solid - sub
    m = solid.to_mesh()
    verts = np.asarray(m.vert_properties, dtype=np.float64)[:, :3]
    faces = np.asarray(m.tri_verts, dtype=np.int64)
    verts, faces, uv = _box_uv(verts, faces)
    return SyntheticAsset(verts, faces, uv, texture, metallic, roughness, feature, list(ANNOTATIONS[feature]), int(seed))


def to_gltf_axes(v: np.ndarray) -> np.ndarray:
    """Model space (Z up, front -Y) -> glTF (Y up, front +Z): (x, y, z) -> (x, z, -y)."""
    return np.stack([v[:, 0], v[:, 2], -v[:, 1]], axis=1)


def from_gltf_axes(v: np.ndarray) -> np.ndarray:
    """glTF (Y up) -> model space (Z up): (x, y, z) -> (x, -z, y), as Blender imports glTF."""
    return np.stack([v[:, 0], -v[:, 2], v[:, 1]], axis=1)


def glb_bytes(asset: SyntheticAsset) -> bytes:
    """The asset as a binary glTF with a PBR material (base-colour texture, metallic, roughness)."""
    import trimesh
    from PIL import Image

    material = trimesh.visual.material.PBRMaterial(
        baseColorTexture=Image.fromarray(asset.texture), metallicFactor=asset.metallic,
        roughnessFactor=asset.roughness, name=f"synthetic_{asset.feature}")
    visual = trimesh.visual.TextureVisuals(uv=asset.uv, material=material)
    mesh = trimesh.Trimesh(to_gltf_axes(asset.vertices), asset.faces, visual=visual, process=False)
    buf = io.BytesIO()
    mesh.export(buf, file_type="glb")
    return buf.getvalue()


def write_glb(asset: SyntheticAsset, path: str) -> str:
    from ..fileio import atomic_write_bytes

    return atomic_write_bytes(path, glb_bytes(asset))


def asset_name(seed: int, feature: str) -> str:
    return f"synth_{int(seed):04d}_{feature}"


def write_dataset_folder(folder: str, seeds: Sequence[int], features: Sequence[str] = FEATURES) -> List[str]:
    """Write ``<folder>/synth_<seed>_<feature>.glb`` for every seed and feature, plus
    ``annotations.jsonl`` (one row per file: ``{"file", "feature", "annotations"}``, the format
    ``know3d data annotate --import`` reads). Returns the GLB paths."""
    import json

    from ..fileio import atomic_write_bytes

    os.makedirs(folder, exist_ok=True)
    paths, rows = [], []
    for seed in seeds:
        for feature in features:
            asset = make_asset(seed, feature)
            name = asset_name(seed, feature) + ".glb"
            paths.append(write_glb(asset, os.path.join(folder, name)))
            rows.append({"file": name, "feature": feature, "annotations": asset.annotations})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_bytes(os.path.join(folder, "annotations.jsonl"), text.encode("utf-8"))
    return paths


def solid_occupancy(vertices: np.ndarray, faces: np.ndarray, resolution: int = 64) -> np.ndarray:
    """Inside-voxel test of a closed mesh in [-0.5, 0.5]^3 by ray parity along +Z through voxel centres:
    bool [R, R, R] (index x, y, z). Exact for watertight meshes (as ``make_asset`` builds them)."""
    r = int(resolution)
    centres = (np.arange(r) + 0.5) / r - 0.5
    tri = np.asarray(vertices, np.float64)[np.asarray(faces)]  # [F, 3, 3]
    occ = np.zeros((r, r, r), dtype=bool)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    det = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    keep = np.abs(det) > 1e-15
    a, b, c, det = a[keep], b[keep], c[keep], det[keep]
    for i, x in enumerate(centres):
        # [F, R] barycentric coordinates of the column (x, y_j) in each triangle's xy projection
        px, py = x, centres[None, :]
        w1 = ((px - a[:, 0:1]) * (c[:, 1:2] - a[:, 1:2]) - (c[:, 0:1] - a[:, 0:1]) * (py - a[:, 1:2])) / det[:, None]
        w2 = ((b[:, 0:1] - a[:, 0:1]) * (py - a[:, 1:2]) - (px - a[:, 0:1]) * (b[:, 1:2] - a[:, 1:2])) / det[:, None]
        w0 = 1.0 - w1 - w2
        hit = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
        f_idx, j_idx = np.nonzero(hit)
        if not len(f_idx):
            continue
        z = w0[f_idx, j_idx] * a[f_idx, 2] + w1[f_idx, j_idx] * b[f_idx, 2] + w2[f_idx, j_idx] * c[f_idx, 2]
        for j in np.unique(j_idx):
            zs = np.unique(np.round(z[j_idx == j], 9))  # a ray through a shared edge hits it once
            crossings = (zs[:, None] < centres[None, :]).sum(0)
            occ[i, j] = crossings % 2 == 1
    return occ
