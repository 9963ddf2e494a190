"""PBR texture baking without compiled extensions: sparse voxel field -> UV-mapped GLB.

TRELLIS.2's texture decoder gives PBR attributes on the active voxels of the mesh grid
(:class:`PBRVoxels`: base colour, metallic, roughness, alpha, ``plan.PBR_LAYOUT``). The reference
bakes them with compiled CUDA code (cumesh, nvdiffrast, FlexGEMM's grid sample, OpenCV inpaint);
this module does the same steps in torch (CPU or GPU) plus the ``xatlas`` package for the UV unwrap:

1. :func:`uv_unwrap`: charts and packing by xatlas (``pip install xatlas``, MIT; the ``texture`` extra);
2. :func:`rasterize_uv`: every texel centre -> (face, barycentrics) in UV space (the z-buffer
   rasteriser of :mod:`.render`, charts do not overlap);
3. texel -> 3D point on the face, optionally snapped to a finer surface (:func:`snap_to_surface`:
   the closest point on the faces of the original mesh near it, so decimation error does not move
   the colours);
4. :func:`sample_voxels`: trilinear interpolation over the occupied corners (weights renormalised over
   the occupied ones; the reference's ``grid_sample_3d``: voxel ``c`` holds the value at its centre
   ``(c + 0.5) / R - 0.5``); texels with no occupied corner stay empty;
5. :func:`dilate`: empty texels take the mean of their filled neighbours, repeatedly (seams);
6. :func:`textured_glb_bytes`: glTF PBR material through trimesh (base colour RGBA with alpha in A,
   metallic-roughness in B/G, as the reference's ``to_glb``).

:func:`bake_pbr` chains them; :func:`vertex_color_glb_bytes` is the fast alternative (colours sampled
at the vertices, no UVs). Model space is Z-up; the GLB is written Y-up (``export.z_up_to_y_up``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..plan import PBR_LAYOUT
from .export import _one_line, z_up_to_y_up
from .render import rasterize
from .types import Mesh

__all__ = ["PBRVoxels", "TexturedMesh", "sample_voxels", "mesh_pieces", "uv_unwrap", "uv_stretch", "rasterize_uv",
           "snap_to_surface", "dilate", "bake_pbr", "bake_reduced", "vertex_rgba", "textured_glb_bytes",
           "vertex_color_glb_bytes", "vertex_rgba_glb_bytes", "render_textured"]

_CORNERS = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])


@dataclass
class PBRVoxels:
    """PBR attributes on the active voxels of an ``R^3`` grid over the model-space box ``[-0.5, 0.5]^3``.

    Attributes:
        coords: ``[N, 3]`` int voxel coords in ``[0, R)`` (voxel ``c`` spans ``[c/R - 0.5, (c+1)/R - 0.5]``).
        attrs: ``[N, C]`` float, nominally in [0, 1]; channels by ``layout``.
        resolution: ``R``.
        layout: channel name -> ``(start, stop)`` (default ``plan.PBR_LAYOUT``).
    """

    coords: torch.Tensor
    attrs: torch.Tensor
    resolution: int
    layout: Dict[str, Tuple[int, int]] = field(default_factory=lambda: dict(PBR_LAYOUT))

    def channel(self, values: torch.Tensor, name: str) -> torch.Tensor:
        """Columns of ``values [P, C]`` holding attribute ``name`` (``[P, k]``)."""
        a, b = self.layout[name]
        return values[:, a:b]

    def to(self, device) -> "PBRVoxels":
        return PBRVoxels(self.coords.to(device), self.attrs.to(device), self.resolution, dict(self.layout))


@dataclass
class TexturedMesh:
    """A UV-mapped mesh with its PBR maps (model space, Z-up).

    vertices ``[V, 3]`` float32, faces ``[F, 3]`` int64, uvs ``[V, 2]`` (glTF convention: v = 0 on the
    first image row), base_color ``[T, T, 4]`` uint8 (RGB + alpha), metallic_roughness ``[T, T, 3]``
    uint8 (glTF: G roughness, B metallic), metadata (JSON-able; timings per step under ``timings``).
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    uvs: torch.Tensor
    base_color: np.ndarray
    metallic_roughness: np.ndarray
    metadata: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- voxel sampling
def _keys(coords: torch.Tensor, r: int) -> torch.Tensor:
    c = coords.long()
    return (c[..., 0] * r + c[..., 1]) * r + c[..., 2]


def sample_voxels(voxels: PBRVoxels, points: torch.Tensor, chunk: int = 1 << 20) -> Tuple[torch.Tensor, torch.Tensor]:
    """Trilinear interpolation of the voxel attributes at model-space ``points [P, 3]``.

    The 8 voxels around a point (centres ``(c + 0.5)/R - 0.5``) weigh ``prod(1 - |d|)`` each; only the
    occupied ones count and their weights are renormalised (the reference's ``grid_sample_3d``).
    Returns ``(values [P, C] float32, found [P] bool)``; a point without an occupied corner gets
    zeros and ``found = False``.
    """
    r = int(voxels.resolution)
    device = points.device
    keys = _keys(voxels.coords.to(device), r)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    attrs = voxels.attrs.to(device, torch.float32)[order]
    corners = _CORNERS.to(device)
    out = torch.zeros(points.shape[0], attrs.shape[1], device=device)
    found = torch.zeros(points.shape[0], dtype=torch.bool, device=device)
    for start in range(0, points.shape[0], chunk):
        g = (points[start:start + chunk].float() + 0.5) * r - 0.5  # grid units, voxel centres on integers
        base = torch.floor(g)
        frac = g - base
        cell = base.long().unsqueeze(1) + corners  # [p, 8, 3]
        w = torch.where(corners.bool(), frac.unsqueeze(1), 1 - frac.unsqueeze(1)).prod(-1)  # [p, 8]
        inside = ((cell >= 0) & (cell < r)).all(-1)
        k = _keys(cell.clamp(0, r - 1), r)
        pos = torch.searchsorted(sorted_keys, k).clamp(max=max(sorted_keys.numel() - 1, 0))
        hit = inside & (sorted_keys[pos] == k) if sorted_keys.numel() else torch.zeros_like(inside)
        w = w * hit
        total = w.sum(1)
        vals = (w.unsqueeze(-1) * attrs[pos]).sum(1) / total.clamp_min(1e-12).unsqueeze(-1)
        out[start:start + chunk] = vals
        found[start:start + chunk] = total > 0
    return out, found


# ----------------------------------------------------------------------------- UV unwrap
PIECE_FACES = 1024
"""Faces per piece of :func:`uv_unwrap` (xatlas charts each piece on its own, so charts stay small).
Bumpy spheres at 2048^2, one CPU core: 200k faces in pieces of 256 take 1.5 CPU s (47% of the texels
on the surface), 1024 2.6 s (55%), 2048 3.6 s (59%), L2 stretch <= 1.0003 for all; the whole mesh as
one (xatlas' own charting, superlinear in the chart size) 105 s (55%, stretch 1.035); at 82k faces
1024-face pieces 1.4 s (58%) against 15 s (54%, stretch 1.017). benchmarks/results/texture/."""


def mesh_pieces(vertices: torch.Tensor, faces: torch.Tensor, max_faces: int = PIECE_FACES) -> torch.Tensor:
    """Balanced k-d split of the faces by centroid: each round halves every piece across its longest
    extent (at the median), until every piece has at most ``max_faces`` faces. Runs where the tensors
    are (one integer sort per round). ``vertices [V, 3]``, ``faces [F, 3]`` -> piece id per face ``[F]`` int64."""
    n = faces.shape[0]
    cent = vertices.float()[faces].mean(1)
    piece = torch.zeros(n, dtype=torch.long, device=faces.device)
    rounds = max(0, math.ceil(math.log2(max(n, 1) / max(int(max_faces), 1))))
    for level in range(rounds):
        count = 1 << level
        index = piece.unsqueeze(1).expand(-1, 3)
        lo = torch.full((count, 3), float("inf"), device=cent.device).scatter_reduce(0, index, cent, "amin")
        hi = torch.full((count, 3), float("-inf"), device=cent.device).scatter_reduce(0, index, cent, "amax")
        extent, axis = (hi - lo).max(1)
        along = (cent.gather(1, axis[piece].unsqueeze(1)).squeeze(1)
                 - lo.gather(1, axis.unsqueeze(1)).squeeze(1)[piece]) / extent.clamp_min(1e-12)[piece]
        key = (piece << 31) | (along.clamp(0, 1) * (2 ** 30)).long()  # piece, then along its longest axis
        order = torch.argsort(key)  # int64 keys: radix sort on the CPU, ~8x faster than float keys
        sizes = torch.bincount(piece, minlength=count)
        start = torch.cumsum(sizes, 0) - sizes
        rank = torch.empty_like(piece)
        rank[order] = torch.arange(n, device=faces.device) - start[piece[order]]
        piece = piece * 2 + (rank >= sizes[piece] // 2).long()
    return piece


def _piece_meshes(vertices: np.ndarray, faces: np.ndarray, piece: np.ndarray):
    """Yield ``(vertex ids [v_i], local vertices [v_i, 3], local faces [f_i, 3] uint32)`` per
    non-empty piece (vectorised: one sort of the (piece, vertex) pairs of all corners)."""
    nv = vertices.shape[0]
    corner_piece = np.repeat(piece, 3)
    pairs, inverse = np.unique(corner_piece * nv + faces.reshape(-1), return_inverse=True)
    pair_piece = pairs // nv
    first = np.searchsorted(pair_piece, pair_piece)  # first pair of each pair's piece
    local = (np.arange(pairs.size) - first)[inverse].reshape(-1, 3).astype(np.uint32)
    face_order = np.argsort(piece, kind="stable")
    ids, face_counts = np.unique(piece, return_counts=True)
    vert_counts = np.bincount(np.searchsorted(ids, pair_piece), minlength=ids.size)
    face_chunks = np.split(face_order, np.cumsum(face_counts)[:-1])
    vert_chunks = np.split(pairs % nv, np.cumsum(vert_counts)[:-1])
    for fids, vids in zip(face_chunks, vert_chunks):
        yield vids, vertices[vids], local[fids]


def uv_unwrap(mesh: Mesh, texture_size: int = 1024, padding: int = 2, piece_faces: int = PIECE_FACES,
              device: Any = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """xatlas charts + packing -> ``(vertices [V', 3], faces [F, 3], uvs [V', 2] in [0, 1], vmap [V'])``
    (``vmap``: the input vertex of each output vertex; seams split vertices; faces in piece order).

    The mesh is cut into pieces of at most ``piece_faces`` faces (:func:`mesh_pieces`), each given to
    xatlas as a mesh of its own: xatlas charts the pieces independently (on its worker threads) and
    packs all charts into one atlas, so no chart crosses a cut. ``piece_faces <= 0``: the whole mesh
    as one piece (xatlas' own charting; slow beyond ~20k faces). ``device``: where the pieces are
    found (default: the mesh's)."""
    try:
        import xatlas
    except ImportError:
        raise ImportError("texture baking needs the xatlas package: pip install xatlas "
                          "(or the know3d 'texture' extra)") from None
    v = mesh.vertices.detach().cpu().float().numpy()
    f = mesh.faces.detach().cpu().numpy().astype(np.int64)
    if piece_faces > 0:
        dev = mesh.vertices.device if device is None else torch.device(device)
        piece = mesh_pieces(mesh.vertices.detach().to(dev), mesh.faces.to(dev), piece_faces).cpu().numpy()
    else:
        piece = np.zeros(f.shape[0], dtype=np.int64)
    atlas = xatlas.Atlas()
    vertex_ids = []
    for vids, pv, pf in _piece_meshes(v, f, piece):
        atlas.add_mesh(np.ascontiguousarray(pv), pf)
        vertex_ids.append(vids)
    charts = xatlas.ChartOptions()
    charts.max_iterations = 0  # no chart-growing refinement: same stretch on small pieces, ~30% faster
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)
    pack.padding = int(padding)
    pack.bilinear = True
    atlas.generate(charts, pack)
    vmaps, out_faces, out_uvs, offset = [], [], [], 0
    for i, vids in enumerate(vertex_ids):
        vmap, pf, puv = atlas[i]
        vmaps.append(vids[vmap.astype(np.int64)])
        out_faces.append(pf.astype(np.int64) + offset)
        out_uvs.append(puv)
        offset += vmap.shape[0]
    vmap_t = torch.from_numpy(np.concatenate(vmaps))
    return (mesh.vertices.detach().cpu().float()[vmap_t], torch.from_numpy(np.concatenate(out_faces)),
            torch.from_numpy(np.concatenate(out_uvs).astype(np.float32)), vmap_t)


def uv_stretch(vertices: torch.Tensor, faces: torch.Tensor, uvs: torch.Tensor) -> Dict[str, float]:
    """Quality of a UV map: the singular values s1 >= s2 of each face's 3D -> UV map, with the UVs
    scaled so that UV area = surface area. Returns ``l2`` (Sander's L2 stretch, area-weighted RMS of
    sqrt((s1^2 + s2^2) / 2); 1 for an isometric map), ``within_1_25`` (surface fraction whose worst
    stretch max(s1, 1/s2) is below 1.25) and ``zero_area_faces`` (faces collapsed in UV)."""
    p = vertices.double()[faces]
    t = uvs.double()[faces]
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    normal = torch.linalg.cross(e1, e2)
    area3 = 0.5 * normal.norm(dim=1)
    d1, d2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    area2 = 0.5 * (d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]).abs()
    scale = (area2.sum() / area3.sum()).sqrt()
    x = F.normalize(e1, dim=1)
    y = torch.linalg.cross(F.normalize(normal, dim=1), x)
    q = torch.stack([torch.stack([(e1 * x).sum(1), (e1 * y).sum(1)], 1),
                     torch.stack([(e2 * x).sum(1), (e2 * y).sum(1)], 1)], 2)  # [F, 2, 2] columns e1, e2
    ok = (area3 > 0) & (area2 > 0)
    jac = (torch.stack([d1, d2], 2)[ok] / scale) @ torch.linalg.inv(q[ok])
    s = torch.linalg.svdvals(jac)
    w = area3[ok] / area3.sum()
    l2 = (w * (s ** 2).sum(1) / 2).sum().sqrt()
    worst = torch.maximum(s[:, 0], 1 / s[:, 1].clamp_min(1e-12))
    return {"l2": float(l2), "within_1_25": float(w[worst < 1.25].sum()),
            "zero_area_faces": int((~ok).sum())}


# ----------------------------------------------------------------------------- UV rasterisation
def _barycentrics(screen_xy: torch.Tensor, faces: torch.Tensor, face_id: torch.Tensor) -> torch.Tensor:
    """Barycentrics ``[H, W, 3]`` (clamped to the triangle) of every pixel centre in its face ``face_id
    [H, W]`` (-1: any), ``screen_xy [V, 2]`` in pixel units (pixel (i, j) has centre (j, i))."""
    h, w = face_id.shape
    ii, jj = torch.meshgrid(torch.arange(h, device=face_id.device), torch.arange(w, device=face_id.device),
                            indexing="ij")
    p = torch.stack([jj, ii], -1).to(screen_xy.dtype)
    a, b, c = screen_xy[faces[face_id.clamp(min=0)]].unbind(-2)
    v0, v1, v2 = b - a, c - a, p - a
    den = v0[..., 0] * v1[..., 1] - v1[..., 0] * v0[..., 1]
    den = torch.where(den.abs() < 1e-20, torch.full_like(den, 1e-20), den)
    w1 = (v2[..., 0] * v1[..., 1] - v1[..., 0] * v2[..., 1]) / den
    w2 = (v0[..., 0] * v2[..., 1] - v2[..., 0] * v0[..., 1]) / den
    bary = torch.stack([1 - w1 - w2, w1, w2], -1).clamp(0, 1)
    return bary / bary.sum(-1, keepdim=True).clamp_min(1e-12)


def rasterize_uv(uvs: torch.Tensor, faces: torch.Tensor, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Texel centres ``((j + 0.5)/T, (i + 0.5)/T)`` -> covering face ``[T, T]`` (-1: none) and
    barycentrics ``[T, T, 3]`` (clamped to the triangle). Row i is v, column j is u."""
    screen = torch.cat([uvs.float() * size - 0.5, torch.zeros_like(uvs[:, :1]).float()], 1)
    face_id, _ = rasterize(screen, faces, size, size)
    bary = _barycentrics(screen[:, :2], faces, face_id)
    return face_id, bary


# ----------------------------------------------------------------------------- snapping
def _closest_on_triangles(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Closest point to ``p [..., 3]`` on triangles ``(a, b, c)`` (same leading shape), Ericson's
    region tests."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    bp = p - b
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    cp = p - c
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    denom = (va + vb + vc)
    safe = torch.where(denom.abs() < 1e-30, torch.ones_like(denom), denom)
    v = vb / safe
    w = vc / safe
    out = a + ab * v.unsqueeze(-1) + ac * w.unsqueeze(-1)  # interior
    # edges
    def edge(e0, e, t):
        return e0 + e * t.clamp(0, 1).unsqueeze(-1)
    t_ab = d1 / torch.where((d1 - d3).abs() < 1e-30, torch.ones_like(d1), d1 - d3)
    t_ac = d2 / torch.where((d2 - d6).abs() < 1e-30, torch.ones_like(d2), d2 - d6)
    t_bc = (d4 - d3) / torch.where(((d4 - d3) + (d5 - d6)).abs() < 1e-30, torch.ones_like(d4),
                                   (d4 - d3) + (d5 - d6))
    out = torch.where(((vc <= 0) & (d1 >= 0) & (d3 <= 0)).unsqueeze(-1), edge(a, ab, t_ab), out)
    out = torch.where(((vb <= 0) & (d2 >= 0) & (d6 <= 0)).unsqueeze(-1), edge(a, ac, t_ac), out)
    out = torch.where(((va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0)).unsqueeze(-1), edge(b, c - b, t_bc), out)
    # vertices
    out = torch.where(((d1 <= 0) & (d2 <= 0)).unsqueeze(-1), a, out)
    out = torch.where(((d3 >= 0) & (d4 <= d3)).unsqueeze(-1), b, out)
    out = torch.where(((d6 >= 0) & (d5 <= d6)).unsqueeze(-1), c, out)
    return out


def snap_to_surface(points: torch.Tensor, surface: Mesh, cell: float, chunk: Optional[int] = None) -> torch.Tensor:
    """Move ``points [P, 3]`` to the closest point of the ``surface`` faces whose centroid lies in the
    ``3^3`` grid cells (edge ``cell``) around each point; points with no such face stay put.

    Used to put texels of a decimated mesh back on the full-resolution surface (the reference's BVH
    projection), with ``cell`` about the decimation error (a few mesh-grid voxels). ``chunk``: points per
    pass (default 65536 on CUDA, 8192 on the CPU)."""
    device = points.device
    chunk = chunk or (1 << 16 if device.type == "cuda" else 8192)
    tri = surface.vertices.to(device).float()[surface.faces.to(device)]  # [F, 3, 3]
    cent = tri.mean(1)
    lo = torch.minimum(points.amin(0), cent.amin(0)) - cell
    dims = (torch.maximum(points.amax(0), cent.amax(0)) + cell - lo) / cell
    n = dims.ceil().long() + 1
    def key(ijk):
        return (ijk[..., 0] * n[1] + ijk[..., 1]) * n[2] + ijk[..., 2]
    fkey = key(((cent - lo) / cell).floor().long())
    order = torch.argsort(fkey)
    fkey_sorted = fkey[order]
    offsets = torch.tensor([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], device=device)
    out = points.clone()
    for start in range(0, points.shape[0], chunk):
        p = points[start:start + chunk].float()
        cells = key(((p - lo) / cell).floor().long().unsqueeze(1) + offsets)  # [p, 27]
        first = torch.searchsorted(fkey_sorted, cells)
        last = torch.searchsorted(fkey_sorted, cells, right=True)
        counts = (last - first).clamp(max=64)  # dense cells: a bounded candidate set per cell
        total = counts.sum(1)
        if int(total.sum()) == 0:
            continue
        row = torch.repeat_interleave(torch.arange(p.shape[0], device=device).unsqueeze(1).expand(-1, 27).reshape(-1),
                                      counts.reshape(-1))
        base = torch.repeat_interleave(first.reshape(-1), counts.reshape(-1))
        within = torch.arange(base.numel(), device=device) - torch.repeat_interleave(
            torch.cumsum(counts.reshape(-1), 0) - counts.reshape(-1), counts.reshape(-1))
        faces = order[base + within]
        q = _closest_on_triangles(p[row], tri[faces, 0], tri[faces, 1], tri[faces, 2])
        d = ((q - p[row]) ** 2).sum(-1)
        best = torch.full((p.shape[0],), float("inf"), device=device).scatter_reduce(0, row, d, "amin")
        is_best = d <= best[row]
        pick = torch.zeros(p.shape[0], dtype=torch.long, device=device)
        pick[row[is_best]] = torch.nonzero(is_best).squeeze(1)
        has = total > 0
        out[start:start + chunk][has] = q[pick[has]]
    return out


# ----------------------------------------------------------------------------- seams
def dilate(image: torch.Tensor, mask: torch.Tensor, iterations: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """Grow the filled texels: each round, every empty texel with filled 8-neighbours takes their mean.
    ``image [H, W, C]``, ``mask [H, W]`` bool -> (image, mask) after ``iterations`` rounds."""
    img = (image * mask.unsqueeze(-1)).permute(2, 0, 1).unsqueeze(0).float()
    m = mask.float()[None, None]
    for _ in range(int(iterations)):
        if bool(m.min() > 0):
            break
        # 3x3 sums as 9 * mean (avg_pool2d: much faster than a grouped conv on the CPU); the zero
        # padding counts as empty texels
        count = F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=True)
        sums = F.avg_pool2d(img, 3, stride=1, padding=1, count_include_pad=True)
        grow = (m == 0) & (count > 0)
        img = torch.where(grow, sums / count.clamp_min(1e-12), img)
        m = torch.where(grow, torch.ones_like(m), m)
    return img[0].permute(1, 2, 0), m[0, 0] > 0


# ----------------------------------------------------------------------------- bake
def _to_u8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def bake_pbr(
    mesh: Mesh,
    voxels: PBRVoxels,
    texture_size: int = 1024,
    surface: Optional[Mesh] = None,
    snap_cell: Optional[float] = None,
    dilation: int = 16,
    device: Any = None,
    piece_faces: int = PIECE_FACES,
) -> TexturedMesh:
    """UV-unwrap ``mesh`` and bake ``voxels`` into PBR maps.

    Args:
        mesh: the mesh to texture (cleaned / decimated already), model space.
        surface: the finer mesh the texels are snapped to (e.g. before decimation); None: no snapping.
        snap_cell: search cell of the snapping (default 2 voxels of ``voxels.resolution``: texels of the
            reduced mesh within 2 voxels of the surface are snapped, the others stay).
        dilation: seam dilation rounds (texels); the rest of the empty texels get the mean colour.
        device: where rasterisation and sampling run (default: the voxels' device).
        piece_faces: faces per piece of the unwrap (:func:`uv_unwrap`).
    """
    import time

    device = torch.device(device) if device is not None else voxels.attrs.device
    timings: Dict[str, float] = {}

    def now() -> float:  # step times that hold on CUDA too (its kernels run asynchronously)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    t0 = now()
    vertices, faces, uvs, _ = uv_unwrap(mesh, texture_size, piece_faces=piece_faces, device=device)
    timings["uv_unwrap"] = now() - t0
    t0 = now()
    face_id, bary = rasterize_uv(uvs.to(device), faces.to(device), texture_size)
    covered = face_id >= 0
    tri = vertices.to(device)[faces.to(device)[face_id[covered]]]  # [P, 3, 3]
    points = (tri * bary[covered].unsqueeze(-1)).sum(1)
    timings["rasterize"] = now() - t0
    t0 = now()
    if surface is not None:
        cell = snap_cell if snap_cell is not None else 2.0 / voxels.resolution
        points = snap_to_surface(points, surface, cell)
    timings["snap"] = now() - t0
    t0 = now()
    values, found = sample_voxels(voxels.to(device), points)
    channels = values.shape[1]
    image = torch.zeros(texture_size, texture_size, channels, device=device)
    mask = torch.zeros(texture_size, texture_size, dtype=torch.bool, device=device)
    idx = torch.nonzero(covered)
    image[idx[found, 0], idx[found, 1]] = values[found]
    mask[idx[found, 0], idx[found, 1]] = True
    timings["sample"] = now() - t0
    t0 = now()
    image, filled = dilate(image, mask, dilation)
    if bool(filled.any()) and not bool(filled.all()):
        image[~filled] = image[filled].mean(0)
    timings["dilate"] = now() - t0
    flat = image.reshape(-1, channels)
    base = voxels.channel(flat, "base_color").reshape(texture_size, texture_size, 3)
    alpha = voxels.channel(flat, "alpha").reshape(texture_size, texture_size, 1)
    metallic = voxels.channel(flat, "metallic").reshape(texture_size, texture_size, 1)
    rough = voxels.channel(flat, "roughness").reshape(texture_size, texture_size, 1)
    base_color = _to_u8(torch.cat([base, alpha], -1))
    mr = _to_u8(torch.cat([torch.zeros_like(rough), rough, metallic], -1))
    meta = {**mesh.metadata, "texture_size": int(texture_size), "texel_coverage": float(mask.float().mean()),
            "timings": timings}
    return TexturedMesh(vertices.float(), faces, uvs.float().cpu(), base_color, mr, meta)


def bake_reduced(mesh: Mesh, raw: Mesh, voxels: PBRVoxels, texture_size: int = 1024,
                 device: Any = None) -> TexturedMesh:
    """:func:`bake_pbr` of ``mesh``, the cleaned / reduced copy of the decoder's ``raw`` mesh: when it
    lost faces the texels snap to ``raw`` (the decimation error does not move the colours)."""
    surface = raw if mesh.num_faces < raw.num_faces else None
    return bake_pbr(mesh, voxels, texture_size=texture_size, surface=surface, device=device)


# ----------------------------------------------------------------------------- preview render
def render_textured(textured: TexturedMesh, view: str = "front", size: int = 256, extent: float = 0.55,
                    background: Tuple[float, float, float] = (1.0, 1.0, 1.0), shade: bool = True) -> torch.Tensor:
    """Base colour of a baked mesh seen from ``view`` (the orthographic cameras of
    :func:`.render.render_normals`), each pixel the texel its UV falls in (nearest, glTF rows);
    ``shade``: times ``0.55 + 0.45 |n . view|`` so the shape reads. Returns ``[size, size, 3]`` float
    in [0, 1] (CPU)."""
    from .render import camera_basis

    vertices = textured.vertices.float().cpu()
    faces = textured.faces.cpu()
    cam = vertices @ camera_basis(view).T
    scale = size / (2 * extent)
    screen = torch.stack([(cam[:, 0] + extent) * scale - 0.5, (extent - cam[:, 1]) * scale - 0.5, cam[:, 2]], 1)
    face_id, _ = rasterize(screen, faces, size, size)
    bary = _barycentrics(screen[:, :2], faces, face_id)
    uv = (bary.unsqueeze(-1) * textured.uvs.float().cpu()[faces[face_id.clamp(min=0)]]).sum(-2)
    t = textured.base_color.shape[0]
    texel = (uv * t).floor().long().clamp(0, t - 1)
    colour = torch.from_numpy(textured.base_color[..., :3]).float()[texel[..., 1], texel[..., 0]] / 255
    if shade:
        tri = cam[faces]
        normal = F.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), dim=1)
        colour = colour * (0.55 + 0.45 * normal[face_id.clamp(min=0), 2].abs()).unsqueeze(-1)
    bg = torch.tensor(background, dtype=torch.float32)
    return torch.where((face_id >= 0).unsqueeze(-1), colour.clamp(0, 1), bg)


# ----------------------------------------------------------------------------- GLB
def _png(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(arr)


def textured_glb_bytes(textured: TexturedMesh, metadata: Optional[Dict[str, Any]] = None, y_up: bool = True) -> bytes:
    """GLB with a glTF PBR material (base colour RGBA, metallic-roughness) through trimesh."""
    import trimesh

    material = trimesh.visual.material.PBRMaterial(
        baseColorTexture=_png(textured.base_color), baseColorFactor=[255, 255, 255, 255],
        metallicRoughnessTexture=_png(textured.metallic_roughness), metallicFactor=1.0, roughnessFactor=1.0,
        alphaMode="OPAQUE", doubleSided=True)
    v = textured.vertices.detach().cpu().double().numpy()
    if y_up:
        v = z_up_to_y_up(v)
    uv = textured.uvs.detach().cpu().double().numpy().copy()
    uv[:, 1] = 1 - uv[:, 1]  # trimesh flips v when writing glTF; hand it the OpenGL convention
    tm = trimesh.Trimesh(v, textured.faces.detach().cpu().numpy(), process=False,
                         visual=trimesh.visual.TextureVisuals(uv=uv, material=material))
    scene = trimesh.Scene(tm)
    meta = {k: val for k, val in {**textured.metadata, **(metadata or {})}.items()}
    meta.setdefault("up_axis", "Y" if y_up else "Z")
    scene.metadata.update(json.loads(_one_line(meta)))
    return scene.export(file_type="glb")


def vertex_color_glb_bytes(mesh: Mesh, voxels: PBRVoxels, metadata: Optional[Dict[str, Any]] = None,
                           y_up: bool = True) -> bytes:
    """The fast alternative: base colour + alpha sampled at the vertices (COLOR_0), no UVs, no maps."""
    return vertex_rgba_glb_bytes(mesh, vertex_rgba(mesh, voxels), metadata, y_up)


def vertex_rgba(mesh: Mesh, voxels: PBRVoxels) -> torch.Tensor:
    """Base colour + alpha ``[V, 4]`` in [0, 1] sampled at ``mesh``'s vertices (CPU); vertices with no
    occupied voxel corner get the mean of the others (0.5 when none has one)."""
    values, found = sample_voxels(voxels, mesh.vertices.float().to(voxels.attrs.device))
    rgba = torch.cat([voxels.channel(values, "base_color"), voxels.channel(values, "alpha")], 1)
    rgba[~found] = rgba[found].mean(0) if bool(found.any()) else 0.5
    return rgba.clamp(0, 1).cpu()


def vertex_rgba_glb_bytes(mesh: Mesh, rgba: torch.Tensor, metadata: Optional[Dict[str, Any]] = None,
                          y_up: bool = True) -> bytes:
    """GLB of ``mesh`` with vertex colours ``rgba [V, 4]`` in [0, 1] (COLOR_0)."""
    import trimesh

    v = mesh.vertices.detach().cpu().double().numpy()
    if y_up:
        v = z_up_to_y_up(v)
    tm = trimesh.Trimesh(v, mesh.faces.cpu().numpy(), vertex_colors=_to_u8(rgba), process=False)
    scene = trimesh.Scene(tm)
    meta = {**mesh.metadata, **(metadata or {})}
    meta.setdefault("up_axis", "Y" if y_up else "Z")
    scene.metadata.update(json.loads(_one_line(meta)))
    return scene.export(file_type="glb")
