"""Light mesh clean-up in pure torch (CPU or GPU): merge duplicates, drop degenerate faces and
unreferenced vertices, remove small floating components, make face orientation consistent.

Connected components use a vectorised union-find (hook larger root onto smaller, pointer
jumping), so million-face meshes need no Python loop over faces.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .decimate import decimate
from .types import Mesh

__all__ = [
    "merge_duplicate_vertices",
    "remove_degenerate_faces",
    "remove_unreferenced_vertices",
    "face_components",
    "remove_floaters",
    "orient_faces",
    "clean_mesh",
    "postprocess_mesh",
]


def _compress(parent: torch.Tensor, parity: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pointer jumping until every node points at its root; parity is accumulated (xor)."""
    while True:
        grand = parent[parent]
        if bool((grand == parent).all()):
            return parent, parity
        parity = parity ^ parity[parent]
        parent = grand


def _union_find(
    num_nodes: int, src: torch.Tensor, dst: torch.Tensor, relation: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Connected components of an undirected graph, optionally with xor constraints.

    Args:
        src, dst: ``[E]`` int64 edge endpoints.
        relation: ``[E]`` bool; when given, solves ``flip[src] ^ flip[dst] == relation`` along a
            spanning forest (edges closing an inconsistent cycle are ignored).
    Returns:
        root ``[num_nodes]`` (smallest node index of the component) and parity ``[num_nodes]`` bool
        (``flip`` of each node relative to its root).
    """
    device = src.device
    parent = torch.arange(num_nodes, device=device)
    parity = torch.zeros(num_nodes, dtype=torch.bool, device=device)
    if relation is None:
        relation = torch.zeros_like(src, dtype=torch.bool)
    while src.numel():
        parent, parity = _compress(parent, parity)
        rs, rd = parent[src], parent[dst]
        live = rs != rd
        src, dst, relation, rs, rd = src[live], dst[live], relation[live], rs[live], rd[live]
        if not src.numel():
            break
        link = relation ^ parity[src] ^ parity[dst]
        hi, lo = torch.maximum(rs, rd), torch.minimum(rs, rd)
        unique_hi, inverse = torch.unique(hi, return_inverse=True)
        first = torch.full((unique_hi.numel(),), hi.numel(), dtype=torch.long, device=device)
        first.scatter_reduce_(0, inverse, torch.arange(hi.numel(), device=device), reduce="amin")
        parent[unique_hi] = lo[first]
        parity[unique_hi] = link[first]
    return _compress(parent, parity)


def merge_duplicate_vertices(mesh: Mesh, tolerance: float = 0.0) -> Mesh:
    """Merge vertices with identical positions (or within the same ``tolerance`` grid cell).

    Faces are re-indexed; faces that become degenerate are dropped.
    """
    if mesh.num_vertices == 0:
        return mesh
    key = mesh.vertices if tolerance <= 0 else torch.round(mesh.vertices.double() / tolerance)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    n = int(inverse.max()) + 1
    # Representative position: the first vertex of each group.
    first = torch.full((n,), mesh.num_vertices, dtype=torch.long, device=mesh.device)
    first.scatter_reduce_(0, inverse, torch.arange(mesh.num_vertices, device=mesh.device), reduce="amin")
    merged = Mesh(mesh.vertices[first], inverse[mesh.faces], dict(mesh.metadata))
    return remove_degenerate_faces(merged)


def remove_degenerate_faces(mesh: Mesh) -> Mesh:
    """Drop faces that repeat a vertex index."""
    f = mesh.faces
    keep = (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])
    return Mesh(mesh.vertices, f[keep], dict(mesh.metadata))


def remove_unreferenced_vertices(mesh: Mesh) -> Mesh:
    """Drop vertices no face uses; faces are re-indexed (vertex order preserved)."""
    used = torch.zeros(mesh.num_vertices, dtype=torch.bool, device=mesh.device)
    used[mesh.faces.reshape(-1)] = True
    new_index = torch.cumsum(used.long(), 0) - 1
    return Mesh(mesh.vertices[used], new_index[mesh.faces], dict(mesh.metadata))


def face_components(mesh: Mesh) -> torch.Tensor:
    """Component label ``[F]`` of every face (faces sharing a vertex are connected)."""
    if mesh.num_faces == 0:
        return torch.zeros(0, dtype=torch.long, device=mesh.device)
    f = mesh.faces
    src = torch.cat([f[:, 0], f[:, 1]])
    dst = torch.cat([f[:, 1], f[:, 2]])
    root, _ = _union_find(mesh.num_vertices, src, dst)
    return root[f[:, 0]]


def remove_floaters(mesh: Mesh, min_fraction: float = 0.01) -> Mesh:
    """Remove connected components with fewer than ``min_fraction`` of all faces.

    The largest component is always kept. Unreferenced vertices are removed.
    """
    if mesh.num_faces == 0:
        return mesh
    label = face_components(mesh)
    _, inverse, counts = torch.unique(label, return_inverse=True, return_counts=True)
    keep_component = counts >= min_fraction * mesh.num_faces
    keep_component[counts.argmax()] = True
    kept = Mesh(mesh.vertices, mesh.faces[keep_component[inverse]], dict(mesh.metadata))
    return remove_unreferenced_vertices(kept)


def _manifold_face_pairs(faces: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Face pairs sharing an edge used by exactly two faces, and whether their windings clash.

    Returns ``(f, g, clash)``: ``clash`` is True when both faces traverse the shared edge in the
    same direction (one of them must be flipped).
    """
    num_faces = faces.shape[0]
    a = faces.reshape(-1)
    b = faces[:, [1, 2, 0]].reshape(-1)
    owner = torch.arange(num_faces, device=faces.device).repeat_interleave(3)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    forward = a < b
    n_vert = int(faces.max()) + 1
    key = lo * n_vert + hi
    key, order = torch.sort(key, stable=True)
    _, counts = torch.unique_consecutive(key, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    pair_start = starts[counts == 2]
    first, second = order[pair_start], order[pair_start + 1]
    f, g = owner[first], owner[second]
    clash = forward[first] == forward[second]
    distinct = f != g
    return f[distinct], g[distinct], clash[distinct]


def orient_faces(mesh: Mesh) -> Mesh:
    """Make winding consistent across manifold edges, then orient each component outward.

    Within a component faces are flipped to agree with the component's smallest face index;
    the component is then flipped as a whole if its signed volume is negative (closed surfaces
    end up with outward normals). Needed for flexible-dual-grid meshes, whose quad winding is
    fixed per axis rather than per surface side.
    """
    if mesh.num_faces == 0:
        return mesh
    f, g, clash = _manifold_face_pairs(mesh.faces)
    root, flip = _union_find(mesh.num_faces, f, g, clash)
    faces = torch.where(flip.unsqueeze(1), mesh.faces[:, [0, 2, 1]], mesh.faces)
    v = mesh.vertices.double()[faces]
    vol = (v[:, 0] * torch.cross(v[:, 1], v[:, 2], dim=-1)).sum(-1)
    component_volume = torch.zeros(mesh.num_faces, dtype=torch.float64, device=mesh.device)
    component_volume.index_add_(0, root, vol)
    inward = component_volume[root] < 0
    faces = torch.where(inward.unsqueeze(1), faces[:, [0, 2, 1]], faces)
    return Mesh(mesh.vertices, faces, dict(mesh.metadata))


def clean_mesh(
    mesh: Mesh,
    merge_tolerance: float = 0.0,
    min_component_fraction: float = 0.0,
    orient: bool = True,
) -> Mesh:
    """Standard clean-up: merge duplicates, drop degenerate faces and unreferenced vertices,
    optionally remove components below ``min_component_fraction`` of the faces, orient faces."""
    mesh = merge_duplicate_vertices(mesh, merge_tolerance)
    mesh = remove_unreferenced_vertices(mesh)
    if min_component_fraction > 0:
        mesh = remove_floaters(mesh, min_component_fraction)
    if orient:
        mesh = orient_faces(mesh)
    return mesh


def postprocess_mesh(mesh: Mesh, floaters: float = 0.01, target_faces: int = 0) -> Mesh:
    """What a saved mesh gets (``know3d generate`` and the Save Mesh node): pieces with fewer than
    ``floaters`` of the faces removed (0: only unreferenced vertices dropped), then, when
    ``target_faces`` > 0 and the mesh has more, decimated to at most that many faces."""
    mesh = remove_floaters(mesh, floaters) if floaters > 0 else remove_unreferenced_vertices(mesh)
    if target_faces and mesh.num_faces > target_faces:
        mesh = decimate(mesh, target_faces)
    return mesh
