"""Analytic triangle meshes (closed, outward wound) with known volume and area: tests and benchmarks
of the mesh -> voxel conversions. All return a :class:`Mesh` in model space."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .types import Mesh

__all__ = ["icosphere", "uv_torus", "box", "icosphere_faces"]


def icosphere_faces(subdivisions: int) -> int:
    """Face count of :func:`icosphere`: ``20 * 4^subdivisions``."""
    return 20 * 4**subdivisions


def icosphere(subdivisions: int, radius: float = 0.4, center: Sequence[float] = (0.0, 0.0, 0.0)) -> Mesh:
    """Subdivided icosahedron projected on a sphere: ``20 * 4^s`` faces, ``10 * 4^s + 2`` vertices.

    Each subdivision splits every triangle in four at its edge midpoints (shared midpoints are
    made once), then every vertex is pushed to the sphere.
    """
    t = (1 + 5**0.5) / 2
    v = torch.tensor([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t],
                      [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], dtype=torch.float64)
    f = torch.tensor([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
                      [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
                      [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    v = torch.nn.functional.normalize(v, dim=1)
    for _ in range(subdivisions):
        edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        key = torch.sort(edges, dim=1).values
        uniq, inv = torch.unique(key[:, 0] * v.shape[0] + key[:, 1], return_inverse=True)
        mid = torch.nn.functional.normalize(
            (v[uniq // v.shape[0]] + v[uniq % v.shape[0]]) / 2, dim=1)
        m = (inv + v.shape[0]).view(3, -1).t()  # midpoints of edges (01, 12, 20) per face
        v = torch.cat([v, mid])
        a, b, c = f[:, 0], f[:, 1], f[:, 2]
        ab, bc, ca = m[:, 0], m[:, 1], m[:, 2]
        f = torch.cat([torch.stack([a, ab, ca], 1), torch.stack([b, bc, ab], 1),
                       torch.stack([c, ca, bc], 1), torch.stack([ab, bc, ca], 1)])
    verts = v * radius + torch.tensor(center, dtype=torch.float64)
    return Mesh(verts.float(), f)


def uv_torus(major: float = 0.3, minor: float = 0.12, n_major: int = 64, n_minor: int = 32,
             center: Sequence[float] = (0.0, 0.0, 0.0)) -> Mesh:
    """Torus around the z axis on a ``n_major x n_minor`` grid: ``2 * n_major * n_minor`` faces."""
    i = torch.arange(n_major, dtype=torch.float64) * (2 * math.pi / n_major)
    j = torch.arange(n_minor, dtype=torch.float64) * (2 * math.pi / n_minor)
    u, w = torch.meshgrid(i, j, indexing="ij")
    ring = major + minor * torch.cos(w)
    verts = torch.stack([ring * torch.cos(u), ring * torch.sin(u), minor * torch.sin(w)], -1).reshape(-1, 3)
    a = torch.arange(n_major).view(-1, 1) * n_minor + torch.arange(n_minor).view(1, -1)
    b = ((torch.arange(n_major).view(-1, 1) + 1) % n_major) * n_minor + torch.arange(n_minor).view(1, -1)
    c = ((torch.arange(n_major).view(-1, 1) + 1) % n_major) * n_minor + (torch.arange(n_minor).view(1, -1) + 1) % n_minor
    d = torch.arange(n_major).view(-1, 1) * n_minor + (torch.arange(n_minor).view(1, -1) + 1) % n_minor
    faces = torch.cat([torch.stack([a, b, c], -1).reshape(-1, 3), torch.stack([a, c, d], -1).reshape(-1, 3)])
    return Mesh((verts + torch.tensor(center, dtype=torch.float64)).float(), faces)


def box(size: Sequence[float] = (0.5, 0.4, 0.3), center: Sequence[float] = (0.0, 0.0, 0.0), splits: int = 1) -> Mesh:
    """Axis-aligned box, each face split into ``splits x splits`` quads (2 triangles each)."""
    s = splits
    g = torch.linspace(-0.5, 0.5, s + 1, dtype=torch.float64)
    verts, faces = [], []
    base = 0
    for axis in range(3):
        u_ax, w_ax = (axis + 1) % 3, (axis + 2) % 3
        for sign in (-1.0, 1.0):
            uu, ww = torch.meshgrid(g, g, indexing="ij")
            p = torch.zeros(s + 1, s + 1, 3, dtype=torch.float64)
            p[..., axis] = sign * 0.5
            p[..., u_ax], p[..., w_ax] = uu, ww
            verts.append(p.reshape(-1, 3))
            idx = torch.arange((s + 1) ** 2).view(s + 1, s + 1) + base
            a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
            quad = torch.stack([a, b, c, d], -1).reshape(-1, 4)
            if sign < 0:  # (u, w, axis) is right-handed: (a, b, c) faces +axis; flip for -axis
                quad = quad.flip(1)
            faces.append(torch.cat([quad[:, [0, 1, 2]], quad[:, [0, 2, 3]]]))
            base += (s + 1) ** 2
    v = torch.cat(verts) * torch.tensor(size, dtype=torch.float64) + torch.tensor(center, dtype=torch.float64)
    return Mesh(v.float(), torch.cat(faces))
