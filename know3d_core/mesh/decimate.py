"""Reduce a mesh to at most a target face count by quadric edge collapse (QEM).

``trimesh.Trimesh.simplify_quadric_decimation`` over the ``fast-simplification`` package (MIT; the
same QEM family as core ComfyUI's DecimateMesh). Edge collapse keeps sharp features and flat
regions exactly (a finely split box goes back to its 12 triangles), where the vertex clustering
it replaced averaged them away; it is also about 10x faster on O-Voxel-sized meshes (1.3M faces
-> 100k: 11 s vs 111 s on the CPU, measured when it replaced the clustering).
"""
from __future__ import annotations

import torch

from .types import Mesh

__all__ = ["decimate"]


def decimate(mesh: Mesh, target_faces: int) -> Mesh:
    """A mesh with at most ``target_faces`` faces (the input itself if it already has that few),
    on the input's device. Metadata is kept."""
    import numpy as np
    import trimesh

    target_faces = int(target_faces)
    if target_faces <= 0:
        raise ValueError(f"target_faces must be positive, got {target_faces}")
    if mesh.num_faces <= target_faces:
        return mesh
    tm = trimesh.Trimesh(mesh.vertices.detach().cpu().double().numpy(), mesh.faces.detach().cpu().numpy(),
                         process=False)
    ask = target_faces
    while True:
        out = tm.simplify_quadric_decimation(face_count=ask)
        excess = len(out.faces) - target_faces
        if excess <= 0 or ask <= 1:
            break
        ask = max(1, ask - excess)  # QEM may stop a few faces above the count it was given
    device = mesh.vertices.device
    vertices = torch.from_numpy(np.asarray(out.vertices, dtype=np.float32)).to(device)
    faces = torch.from_numpy(np.asarray(out.faces, dtype=np.int64)).to(device)
    return Mesh(vertices, faces, dict(mesh.metadata))
