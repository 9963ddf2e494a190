"""The dataset on disk: file names, manifest fields, view sets, pair rules and splits (torch-free).

This module is the single source of truth for the layout ``know3d data prepare`` writes and the
trainer / evaluation read. Import the names from here; never spell a file name or a key twice.

::

    DATASET/
      manifest.jsonl                   one JSON row per asset (MANIFEST_FIELDS), rebuilt from the records
      assets/<sha256>/                 one folder per asset (SHA-256 of the source file's bytes)
        asset.json                     the asset record: status, error, steps done, normalisation, ...
        mesh.safetensors               vertices float32 [V, 3] in [-0.5, 0.5]^3 (Z up, front faces -Y),
                                       faces int32 [F, 3]
        views/000.png ...              RGBA renders, transparent background
        cameras.json                   per view: file, set, azimuth, elevation, fov, radius, c2w, intrinsics
        pairs.json                     [{front, back, set, annotations: [str, ...]}, ...]; front / back
                                       are view files ("views/006.png"; view_index() -> 6)
        dual_grid_<res>.safetensors    coords int32 [N, 3], dual_vertices float32 [N, 3] (0..1 inside the
                                       voxel), intersected bool [N, 3]
        occupancy_64.safetensors       occupancy bool [64, 64, 64]
        ss_latent.safetensors          latent float32 [8, 16, 16, 16], normalised
        shape_latent_<res>.safetensors coords int32 [N, 3], feats float32 [N, 32], normalised

Model space is Z up; an asset's front faces -Y (glTF's +Z front after its Y-up -> Z-up turn, as
Blender imports it), the same convention as ``know3d_core.mesh.render``. Azimuth 0 puts the camera
at -Y (looking at the front); azimuth 90 puts it at +X. Cameras follow OpenGL / Blender: ``c2w`` maps
camera coordinates (x right, y up, looking along -z) to world; ``intrinsics`` is the 3x3 matrix in
normalised image units (principal point 0.5, 0.5; multiply the first two rows by the width/height).

Every folder and file is published atomically (a temporary sibling named ``TMP_PREFIX...`` then
``os.replace``); temporaries left by a killed run are removed on the next run.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

__all__ = [
    "MANIFEST_NAME", "ASSETS_DIR", "TMP_PREFIX", "ASSET_RECORD", "MESH_FILE", "VIEWS_DIR", "CAMERAS_FILE",
    "PAIRS_FILE", "OCCUPANCY_FILE", "SS_LATENT_FILE", "dual_grid_file", "shape_latent_file", "view_file", "view_index",
    "KEY_VERTICES", "KEY_FACES", "KEY_COORDS", "KEY_DUAL_VERTICES", "KEY_INTERSECTED", "KEY_OCCUPANCY",
    "KEY_LATENT", "KEY_FEATS", "DUAL_GRID_RESOLUTIONS", "OCCUPANCY_RESOLUTION", "SS_LATENT_SHAPE",
    "SHAPE_LATENT_CHANNELS", "NORMALIZE_EXTENT", "ASSET_EXTENSIONS", "STATUS_OK", "STATUS_FAILED",
    "REASONS", "STEPS", "MANIFEST_FIELDS", "SET_BACKVIEW", "SET_3D", "SET_3D_PERTURBED", "PAIR_SETS",
    "ViewSet", "VIEW_SETS", "pair_indices", "FOV_RANGE_DEG", "ELEVATION_RANGE_DEG", "PERTURB_FOV_SCALE",
    "PERTURB_AZIMUTH_DEG", "PERTURB_ELEVATION_DEG", "camera_radius", "RENDER_SIZES", "SPLITS", "VAL_FRACTION",
    "split_of", "sha256_file", "asset_dir", "manifest_path", "assets_root", "steps_of",
]

# ------------------------------------------------------------------------------------ files
MANIFEST_NAME = "manifest.jsonl"
ASSETS_DIR = "assets"
TMP_PREFIX = ".tmp-"  # the same prefix as know3d_core.batch, whose stale-temporary clean-up prepare reuses
ASSET_RECORD = "asset.json"
MESH_FILE = "mesh.safetensors"
VIEWS_DIR = "views"
CAMERAS_FILE = "cameras.json"
PAIRS_FILE = "pairs.json"
OCCUPANCY_FILE = "occupancy_64.safetensors"
SS_LATENT_FILE = "ss_latent.safetensors"


def dual_grid_file(resolution: int) -> str:
    return f"dual_grid_{int(resolution)}.safetensors"


def shape_latent_file(resolution: int) -> str:
    return f"shape_latent_{int(resolution)}.safetensors"


def view_file(index: int) -> str:
    """Path of view ``index`` relative to the asset folder."""
    return f"{VIEWS_DIR}/{int(index):03d}.png"


def view_index(ref) -> int:
    """Index of a view from a pairs.json ``front`` / ``back`` entry: prepare writes the view's file
    (``"views/006.png"``, as :func:`view_file`); a plain index (``6`` or ``"6"``) is accepted too."""
    if isinstance(ref, bool):
        raise ValueError(f"not a view reference: {ref!r}")
    if isinstance(ref, int):
        return ref
    name = os.path.basename(str(ref))
    stem = name[:-4] if name.lower().endswith(".png") else name
    if not stem.isdigit():
        raise ValueError(f"not a view reference: {ref!r} (expected e.g. {view_file(6)!r} or 6)")
    return int(stem)


# ------------------------------------------------------------------------ safetensors keys
KEY_VERTICES = "vertices"          # mesh.safetensors: float32 [V, 3]
KEY_FACES = "faces"                # mesh.safetensors: int32 [F, 3]
KEY_COORDS = "coords"              # dual_grid_* and shape_latent_*: int32 [N, 3]
KEY_DUAL_VERTICES = "dual_vertices"  # dual_grid_*: float32 [N, 3], 0..1 inside the voxel
KEY_INTERSECTED = "intersected"    # dual_grid_*: bool [N, 3]
KEY_OCCUPANCY = "occupancy"        # occupancy_64: bool [64, 64, 64]
KEY_LATENT = "latent"              # ss_latent: float32 [8, 16, 16, 16]
KEY_FEATS = "feats"                # shape_latent_*: float32 [N, 32]

DUAL_GRID_RESOLUTIONS = (256, 512, 1024)
OCCUPANCY_RESOLUTION = 64
SS_LATENT_SHAPE = (8, 16, 16, 16)
SHAPE_LATENT_CHANNELS = 32

# Longest side of the normalised mesh: TRELLIS.2's dual_grid.py scales by 0.99999 / max extent after
# centring the bounding box, so every vertex lies strictly inside [-0.5, 0.5]^3.
NORMALIZE_EXTENT = 0.99999
ASSET_EXTENSIONS = (".glb", ".gltf", ".obj", ".ply")

# ------------------------------------------------------------------------------- records
STATUS_OK = "ok"
STATUS_FAILED = "failed"
# Why an asset was skipped (asset.json "reason"; "error" holds the one-line detail).
REASONS = (
    "unreadable",       # the loader raised (bad file, unknown format)
    "empty",            # zero-byte file or no geometry in the scene
    "no_faces",         # geometry without triangles (a point cloud, lines)
    "nan_vertices",     # non-finite vertex coordinates
    "zero_extent",      # all vertices on a point / line / plane of zero longest side
    "too_many_faces",   # over --max-faces
    "bad_texture",      # a texture that does not decode
    "missing_texture",  # a texture the file references but that is not there
    "step_failed",      # a later step (render, voxelize, encode, ...) raised
)
# Steps of ``know3d data prepare``, in order. "mesh" loads and normalises the asset; the others are
# looked up in know3d_core.data.prepare's step registry (voxelize / encode live with their libraries).
STEPS = ("mesh", "render", "annotate", "voxelize", "encode")
# One manifest row per asset.
MANIFEST_FIELDS = (
    "sha256", "source", "status", "reason", "error", "steps", "faces", "voxels", "n_pairs", "split",
    "feature",
)

# ------------------------------------------------------------------------- views and pairs
SET_BACKVIEW = "backview"          # back-view (Qwen LoRA) training: 12 azimuths -> 6 pairs
SET_3D = "3d"                      # 3D training: 45 degree spacing -> 4 pairs
SET_3D_PERTURBED = "3d_perturbed"  # 3D training: 4 more pairs, FoV scaled and angles jittered
PAIR_SETS = (SET_BACKVIEW, SET_3D, SET_3D_PERTURBED)


@dataclass(frozen=True)
class ViewSet:
    """``n_azimuths`` views uniformly over 360 degrees from ``azimuth_offset_deg``; view k and
    k + n/2 (opposite azimuths) form a front/back pair, k < n/2."""

    name: str
    n_azimuths: int
    perturbed: bool = False


VIEW_SETS: Tuple[ViewSet, ...] = (
    ViewSet(SET_BACKVIEW, 12),
    ViewSet(SET_3D, 8),
    ViewSet(SET_3D_PERTURBED, 8, perturbed=True),
)


def pair_indices(n_azimuths: int) -> List[Tuple[int, int]]:
    """Front/back pairs of a uniform azimuth ring: ``[(k, k + n/2) for k < n/2]`` (indices in the ring)."""
    if n_azimuths < 2 or n_azimuths % 2:
        raise ValueError(f"a front/back ring needs an even number of azimuths >= 2, got {n_azimuths}")
    half = n_azimuths // 2
    return [(k, k + half) for k in range(half)]


# Per asset, drawn once: FoV uniform in 1/radius^2 over this range (as TRELLIS.2's render_cond.py),
# elevation uniform over this range.
FOV_RANGE_DEG = (10.0, 70.0)
ELEVATION_RANGE_DEG = (-10.0, 30.0)
# Perturbed 3D set, per view: FoV times a factor in this range, azimuth and elevation offsets within +-.
PERTURB_FOV_SCALE = (0.8, 1.2)
PERTURB_AZIMUTH_DEG = 10.0
PERTURB_ELEVATION_DEG = 5.0
RENDER_SIZES = (512, 1024)


def camera_radius(fov_deg: float) -> float:
    """Distance at which the unit cube's bounding sphere (radius sqrt(3)/2) just fills ``fov_deg``."""
    return math.sqrt(3.0) / 2.0 / math.sin(math.radians(fov_deg) / 2.0)


# -------------------------------------------------------------------------------- splits
SPLITS = ("train", "val")
VAL_FRACTION = 0.05


def split_of(sha256: str, val_fraction: float = VAL_FRACTION) -> str:
    """Deterministic split from the asset's hash: ``val`` for a ``val_fraction`` share of hashes."""
    bucket = int(sha256[:8], 16) / float(1 << 32)
    return "val" if bucket < val_fraction else "train"


# --------------------------------------------------------------------------------- paths
def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def manifest_path(root: str) -> str:
    return os.path.join(root, MANIFEST_NAME)


def assets_root(root: str) -> str:
    return os.path.join(root, ASSETS_DIR)


def asset_dir(root: str, sha256: str) -> str:
    return os.path.join(root, ASSETS_DIR, sha256)


def steps_of(record: Dict) -> List[str]:
    """The steps an asset record lists as done, in STEPS order."""
    done = set(record.get("steps") or ())
    return [s for s in STEPS if s in done] + sorted(done - set(STEPS))
