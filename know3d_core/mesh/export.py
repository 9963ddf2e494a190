"""Mesh export: GLB / OBJ / PLY / STL through trimesh, written atomically.

Model space is Z-up; GLB, OBJ and PLY are written Y-up by default with the official rotation
``(x, y, z) -> (x, z, -y)`` (a proper rotation: winding is kept). STL defaults to Z-up, the
convention of slicers. Metadata goes where the format has room for it: glTF scene ``extras``
(GLB), ``#`` comment lines (OBJ), ``comment`` header lines (PLY), the 80-byte header (STL,
truncated).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import numpy as np

from .types import Mesh
from ..fileio import atomic_write_bytes

__all__ = ["FORMATS", "save_mesh", "mesh_bytes", "z_up_to_y_up", "y_up_to_z_up"]

FORMATS = ("glb", "obj", "ply", "stl")
_DEFAULT_Y_UP = {"glb": True, "obj": True, "ply": True, "stl": False}


def z_up_to_y_up(vertices: np.ndarray) -> np.ndarray:
    """``[V, 3]``: ``(x, y, z) -> (x, z, -y)``."""
    return np.stack([vertices[:, 0], vertices[:, 2], -vertices[:, 1]], axis=1)


def y_up_to_z_up(vertices: np.ndarray) -> np.ndarray:
    """Inverse of ``z_up_to_y_up``: ``(x, y, z) -> (x, -z, y)``."""
    return np.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], axis=1)


def _one_line(metadata: Dict[str, Any]) -> str:
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def _glb_bytes(tm, metadata: Dict[str, Any]) -> bytes:
    import trimesh

    scene = trimesh.Scene(tm)
    if metadata:
        scene.metadata.update(json.loads(_one_line(metadata)))
    return scene.export(file_type="glb")


def _obj_bytes(tm, metadata: Dict[str, Any]) -> bytes:
    from trimesh.exchange.obj import export_obj

    header = "know3d " + _one_line(metadata) if metadata else "know3d"
    return export_obj(tm, include_normals=False, include_color=False, include_texture=False, header=header).encode()


def _ply_bytes(tm, metadata: Dict[str, Any]) -> bytes:
    from trimesh.exchange.ply import export_ply

    data = export_ply(tm, encoding="binary")
    if not metadata:
        return data
    # Insert a comment line right after the "format ..." line of the ASCII header.
    first_nl = data.index(b"\n")
    second_nl = data.index(b"\n", first_nl + 1)
    comment = ("comment know3d " + _one_line(metadata) + "\n").encode()
    return data[: second_nl + 1] + comment + data[second_nl + 1 :]


def _stl_bytes(tm, metadata: Dict[str, Any]) -> bytes:
    from trimesh.exchange.stl import export_stl

    data = bytearray(export_stl(tm))
    # Binary STL header: 80 bytes of free text; must not start with "solid".
    text = ("know3d " + _one_line(metadata)).encode()[:80] if metadata else b"know3d"
    data[:80] = text.ljust(80, b"\0")
    return bytes(data)


_WRITERS = {"glb": _glb_bytes, "obj": _obj_bytes, "ply": _ply_bytes, "stl": _stl_bytes}


def mesh_bytes(
    mesh: Mesh, file_format: str, metadata: Optional[Dict[str, Any]] = None, y_up: Optional[bool] = None
) -> bytes:
    """Serialise ``mesh`` to ``file_format`` ('glb' | 'obj' | 'ply' | 'stl')."""
    import trimesh

    fmt = file_format.lower().lstrip(".")
    if fmt not in _WRITERS:
        raise ValueError(f"save_mesh: unknown format {file_format!r}; choose one of {', '.join(FORMATS)}")
    y_up = _DEFAULT_Y_UP[fmt] if y_up is None else y_up
    vertices = mesh.vertices.detach().cpu().double().numpy()
    if y_up:
        vertices = z_up_to_y_up(vertices)
    tm = trimesh.Trimesh(vertices, mesh.faces.detach().cpu().numpy(), process=False)
    meta = {**mesh.metadata, **(metadata or {})}
    meta.setdefault("up_axis", "Y" if y_up else "Z")
    return _WRITERS[fmt](tm, meta)


def save_mesh(
    mesh: Mesh,
    path: str,
    file_format: Optional[str] = None,
    metadata: Optional[Dict[str, Any]] = None,
    y_up: Optional[bool] = None,
) -> str:
    """Write ``mesh`` to ``path`` atomically (temp file in the same folder, then ``os.replace``).

    Args:
        file_format: 'glb' | 'obj' | 'ply' | 'stl'; default from the path's extension.
        metadata: merged over ``mesh.metadata``; must be JSON-serialisable (others are str()-ed).
        y_up: rotate Z-up model space to Y-up; default True except for STL.
    Returns:
        the path written.
    """
    fmt = file_format or os.path.splitext(path)[1]
    data = mesh_bytes(mesh, fmt, metadata, y_up)
    atomic_write_bytes(path, data)
    return path
