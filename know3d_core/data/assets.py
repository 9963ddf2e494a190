"""Assets in: a 3D file -> a normalised, textured mesh in model space, or a recorded reason to skip it.

``load_asset(path)`` reads GLB / glTF / OBJ / PLY through trimesh, moves it into model space (Z up,
front -Y; glTF is Y up by specification, OBJ and PLY follow ``up``), centres the bounding box and
scales the longest side to ``layout.NORMALIZE_EXTENT`` (as TRELLIS.2's data toolkit does before
voxelising). It raises :class:`AssetError` with one of ``layout.REASONS`` when the asset is unusable:
empty, no faces, non-finite vertices, zero extent, over the face limit, a texture that is missing or
does not decode. The renderer takes the primitives with their PBR materials; ``merged()`` gives the
plain geometry stored in ``mesh.safetensors``.
"""
from __future__ import annotations

import base64
import io
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import layout

__all__ = ["AssetError", "Primitive", "Asset", "load_asset", "list_assets", "DEFAULT_MAX_FACES", "check_textures"]

DEFAULT_MAX_FACES = 2_000_000


class AssetError(Exception):
    """An unusable asset: ``reason`` is one of ``layout.REASONS``; the message says what is wrong."""

    def __init__(self, reason: str, message: str):
        assert reason in layout.REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclass
class Primitive:
    """One mesh with one material, in normalised model space.

    vertices float32 [V, 3]; faces int32 [F, 3]; uv float32 [V, 2] or None; colors float32 [V, 4]
    (linear 0..1 RGBA vertex colours) or None; base_color_texture uint8 [H, W, 4] (sRGB) or None;
    metallic_roughness_texture uint8 [H, W, 3] (glTF: G roughness, B metallic) or None.
    """

    vertices: np.ndarray
    faces: np.ndarray
    uv: Optional[np.ndarray] = None
    colors: Optional[np.ndarray] = None
    base_color_factor: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    base_color_texture: Optional[np.ndarray] = None
    metallic: float = 0.0
    roughness: float = 0.8
    metallic_roughness_texture: Optional[np.ndarray] = None


@dataclass
class Asset:
    source: str
    primitives: List[Primitive]
    center: Tuple[float, float, float]  # of the bounding box in model space, before scaling
    scale: float                        # normalised = (v - center) * scale
    info: Dict = field(default_factory=dict)

    @property
    def n_faces(self) -> int:
        return int(sum(p.faces.shape[0] for p in self.primitives))

    def merged(self) -> Tuple[np.ndarray, np.ndarray]:
        """All primitives as one mesh: vertices float32 [V, 3], faces int32 [F, 3]."""
        verts, faces, base = [], [], 0
        for p in self.primitives:
            verts.append(p.vertices)
            faces.append(p.faces.astype(np.int64) + base)
            base += p.vertices.shape[0]
        return (np.concatenate(verts).astype(np.float32),
                np.concatenate(faces).astype(np.int32))


def list_assets(folder: str) -> List[str]:
    """Asset files under ``folder`` (recursive, sorted, extensions ``layout.ASSET_EXTENSIONS``)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.lower().endswith(layout.ASSET_EXTENSIONS) and not name.startswith("."):
                out.append(os.path.join(root, name))
    return sorted(out)


# ------------------------------------------------------------------------------ textures
def _glb_chunks(data: bytes) -> Tuple[dict, bytes]:
    if len(data) < 20 or data[:4] != b"glTF":
        raise AssetError("unreadable", "not a binary glTF (no 'glTF' magic)")
    json_len, json_type = struct.unpack_from("<II", data, 12)
    gltf = json.loads(data[20:20 + json_len].decode("utf-8"))
    off = 20 + json_len
    bin_chunk = b""
    if off + 8 <= len(data):
        bin_len, _ = struct.unpack_from("<II", data, off)
        bin_chunk = data[off + 8: off + 8 + bin_len]
    return gltf, bin_chunk


def _uri_bytes(uri: str, folder: str, what: str) -> bytes:
    if uri.startswith("data:"):
        return base64.b64decode(uri.split(",", 1)[1])
    from urllib.parse import unquote

    path = os.path.join(folder, unquote(uri))
    if not os.path.isfile(path):
        raise AssetError("missing_texture", f"{what} {uri!r} not found next to the asset")
    with open(path, "rb") as f:
        return f.read()


def _gltf_images(path: str) -> List[Tuple[str, bytes]]:
    """(name, encoded bytes) of every image a glTF / GLB references (raises AssetError if missing)."""
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        data = f.read()
    if path.lower().endswith(".glb"):
        gltf, bin_chunk = _glb_chunks(data)
    else:
        try:
            gltf = json.loads(data.decode("utf-8"))
        except ValueError as e:
            raise AssetError("unreadable", f"not a glTF JSON file ({e})") from None
        bin_chunk = b""
    buffers: Dict[int, bytes] = {}

    def buffer(i: int) -> bytes:
        if i not in buffers:
            b = gltf.get("buffers", [])[i]
            buffers[i] = _uri_bytes(b["uri"], folder, "buffer") if "uri" in b else bin_chunk
        return buffers[i]

    out = []
    for k, img in enumerate(gltf.get("images", [])):
        name = img.get("uri", f"image {k}")
        if "uri" in img:
            out.append((name, _uri_bytes(img["uri"], folder, "texture")))
        elif "bufferView" in img:
            view = gltf["bufferViews"][img["bufferView"]]
            start = view.get("byteOffset", 0)
            out.append((name, buffer(view["buffer"])[start:start + view["byteLength"]]))
    return out


def _obj_images(path: str) -> List[Tuple[str, bytes]]:
    """Texture files an OBJ's material libraries name (raises AssetError if one is missing)."""
    folder = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        libs = [line.split(None, 1)[1].strip() for line in f if line.startswith("mtllib ") and len(line.split()) > 1]
    for lib in libs:
        lib_path = os.path.join(folder, lib)
        if not os.path.isfile(lib_path):
            raise AssetError("missing_texture", f"material library {lib!r} not found next to the asset")
        with open(lib_path, "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0].lower().startswith("map_") and len(parts) > 1:
                    out.append((parts[-1], _uri_bytes(parts[-1], os.path.dirname(lib_path), "texture")))
    return out


def check_textures(path: str) -> int:
    """Decode every texture ``path`` references; returns how many. Raises AssetError
    (``missing_texture`` / ``bad_texture``)."""
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    images = _gltf_images(path) if ext in (".glb", ".gltf") else _obj_images(path) if ext == ".obj" else []
    for name, data in images:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except Exception as e:  # PIL raises many types for corrupt data
            raise AssetError("bad_texture", f"texture {name!r} does not decode ({type(e).__name__})") from None
    return len(images)


# -------------------------------------------------------------------------------- loading
def _to_model_space(v: np.ndarray, up: str) -> np.ndarray:
    if up == "z":
        return v
    return np.stack([v[:, 0], -v[:, 2], v[:, 1]], axis=1)  # Y up -> Z up, as Blender imports glTF


def _rgba(image) -> Optional[np.ndarray]:
    if image is None:
        return None
    return np.asarray(image.convert("RGBA"), dtype=np.uint8)


def _primitive(geom, transform: np.ndarray, up: str) -> Optional[Primitive]:
    import trimesh

    if not isinstance(geom, trimesh.Trimesh) or len(geom.faces) == 0:
        return None
    v = np.asarray(geom.vertices, dtype=np.float64)
    v = v @ transform[:3, :3].T + transform[:3, 3]
    prim = Primitive(_to_model_space(v, up), np.asarray(geom.faces, dtype=np.int32))
    visual = geom.visual
    if isinstance(visual, trimesh.visual.TextureVisuals):
        mat = visual.material
        if mat is not None and not isinstance(mat, trimesh.visual.material.PBRMaterial):
            mat = mat.to_pbr()
        if visual.uv is not None and len(visual.uv) == len(v):
            prim.uv = np.asarray(visual.uv, dtype=np.float32)
        if mat is not None:
            if mat.baseColorFactor is not None:
                prim.base_color_factor = tuple(float(c) / 255.0 for c in np.asarray(mat.baseColorFactor).ravel()[:4])
            if prim.uv is not None:
                prim.base_color_texture = _rgba(mat.baseColorTexture)
                mr = mat.metallicRoughnessTexture
                prim.metallic_roughness_texture = None if mr is None else np.asarray(mr.convert("RGB"), dtype=np.uint8)
            prim.metallic = 1.0 if mat.metallicFactor is None else float(mat.metallicFactor)
            prim.roughness = 1.0 if mat.roughnessFactor is None else float(mat.roughnessFactor)
    elif isinstance(visual, trimesh.visual.ColorVisuals) and visual.kind == "vertex":
        prim.colors = (np.asarray(visual.vertex_colors, dtype=np.float32) / 255.0) ** np.float32(2.2)
        prim.colors[:, 3] = np.asarray(visual.vertex_colors)[:, 3] / 255.0
    elif isinstance(visual, trimesh.visual.ColorVisuals) and visual.kind == "face":
        fc = np.asarray(visual.face_colors, dtype=np.float32)[0] / 255.0
        prim.base_color_factor = tuple(float(c) for c in np.append(fc[:3] ** 2.2, fc[3]))
    return prim


def load_asset(path: str, max_faces: int = DEFAULT_MAX_FACES, up: str = "y") -> Asset:
    """Read, check and normalise one asset (see the module docstring). Raises AssetError."""
    import trimesh

    if up not in ("y", "z"):
        raise ValueError(f"up must be 'y' or 'z', got {up!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in layout.ASSET_EXTENSIONS:
        raise AssetError("unreadable", f"unsupported extension {ext!r} (use {', '.join(layout.ASSET_EXTENSIONS)})")
    if os.path.getsize(path) == 0:
        raise AssetError("empty", "the file is empty (0 bytes)")
    try:
        n_textures = check_textures(path)
    except AssetError:
        raise
    except Exception as e:  # a malformed container (bad JSON chunk, truncated buffer, ...)
        raise AssetError("unreadable", f"malformed {ext} file: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    try:
        scene = trimesh.load(path, force="scene", process=False)
    except Exception as e:
        raise AssetError("unreadable", f"trimesh could not read it: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    file_up = "y" if ext in (".glb", ".gltf") else up
    prims, had_geometry = [], False
    for node in scene.graph.nodes_geometry:
        transform, name = scene.graph[node]
        geom = scene.geometry[name]
        had_geometry = True
        p = _primitive(geom, np.asarray(transform, dtype=np.float64), file_up)
        if p is not None:
            prims.append(p)
    if not prims:
        if had_geometry:
            raise AssetError("no_faces", "the file has geometry but no triangles (points or lines only)")
        raise AssetError("empty", "the file holds no geometry")
    n_faces = sum(p.faces.shape[0] for p in prims)
    if n_faces > max_faces:
        raise AssetError("too_many_faces", f"{n_faces} faces > --max-faces {max_faces}")
    allv = np.concatenate([p.vertices for p in prims])
    if not np.isfinite(allv).all():
        raise AssetError("nan_vertices", f"{int((~np.isfinite(allv)).any(1).sum())} vertices are NaN or infinite")
    lo, hi = allv.min(0), allv.max(0)
    extent = float((hi - lo).max())
    if not extent > 1e-12:
        raise AssetError("zero_extent", "all vertices coincide (longest side 0)")
    center = (lo + hi) / 2.0
    scale = layout.NORMALIZE_EXTENT / extent
    for p in prims:
        p.vertices = ((p.vertices - center) * scale).astype(np.float32)
    info = {"faces": int(n_faces), "vertices": int(allv.shape[0]), "primitives": len(prims),
            "textures": int(n_textures), "extent_before": (hi - lo).tolist()}
    return Asset(os.path.abspath(path), prims, tuple(float(c) for c in center), float(scale), info)


def asset_glb_bytes(asset: Asset) -> bytes:
    """The normalised asset as a binary glTF (model space turned back to glTF's Y up), one mesh per
    primitive with its metallic-roughness material, for renderers that import files (Blender)."""
    import trimesh
    from PIL import Image

    scene = trimesh.Scene()
    for k, p in enumerate(asset.primitives):
        v = p.vertices.astype(np.float64)
        v_gltf = np.stack([v[:, 0], v[:, 2], -v[:, 1]], axis=1)
        factor = np.clip(np.round(np.asarray(p.base_color_factor) * 255), 0, 255).astype(np.uint8)
        mat = trimesh.visual.material.PBRMaterial(
            baseColorFactor=factor, metallicFactor=float(p.metallic), roughnessFactor=float(p.roughness),
            baseColorTexture=None if p.base_color_texture is None else Image.fromarray(p.base_color_texture, "RGBA"),
            metallicRoughnessTexture=(None if p.metallic_roughness_texture is None
                                      else Image.fromarray(p.metallic_roughness_texture, "RGB")))
        uv = p.uv if p.uv is not None else np.zeros((len(v), 2), np.float32)
        mesh = trimesh.Trimesh(v_gltf, p.faces, visual=trimesh.visual.TextureVisuals(uv=uv, material=mat), process=False)
        scene.add_geometry(mesh, geom_name=f"primitive_{k}")
    return scene.export(file_type="glb")
