"""Triangle mesh -> flexible dual grid (O-Voxel geometry), vectorised PyTorch on CPU or GPU.

Computes what the reference's compiled ``o_voxel.convert.mesh_to_flexible_dual_grid`` computes
(TRELLIS.2 5565d24, ``o-voxel/src/convert/flexible_dual_grid.cpp``, one triangle at a time in C++)
with whole-mesh tensor passes. Frame and flag conventions are those of :mod:`.ovoxel`: the AABB
``[-0.5, 0.5]^3`` split into ``R^3`` voxels; ``intersected[c, a]`` is set when a triangle crosses
the grid edge along axis ``a`` on voxel ``c``'s max corner in the two other axes.

The passes, as in the reference:

1. **Edge crossings** (float64, the reference's scan-line arithmetic operation for operation, so
   the voxel set and the flags are bit-identical): for each axis ``a`` and triangle, every grid
   edge along ``a`` strictly inside the AABB that the triangle crosses gives a crossing point;
   the four voxels around the edge become active, each gets the triangle's plane quadric and the
   point (for the mean), and the voxel whose max corner holds the edge gets flag ``a``.
2. **Face quadrics**: every active voxel whose box the triangle overlaps (the reference's
   plane / three-projection box test, in float32 like the reference) gets the plane quadric again.
3. **Boundary quadrics**: every active voxel a boundary edge (used by one face) passes through
   (the reference's grid walk) gets ``boundary_weight`` times the quadric of the line.
4. **Solve**: minimise ``p^T Q p + regularization_weight * cnt * |p - mean|^2`` per voxel; when the
   minimiser leaves the voxel, the best of the constrained minimisers on its faces, edges and
   corners (the reference's enumeration and tie order).

Sums and solves run in float64 (the reference accumulates in float32; the difference is the
reference's own rounding, see tests/test_mesh_to_dual_grid.py). ``face_weight`` only switches the
face pass on or off: the reference adds the face quadrics unweighted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = [
    "DualGrid",
    "REFERENCE_WEIGHTS",
    "mesh_to_flexible_dual_grid",
    "occupancy_from_coords",
    "voxel_quadrics",
]

# The weights TRELLIS.2's data toolkit passes (data_toolkit/dual_grid.py).
REFERENCE_WEIGHTS = {"face_weight": 1.0, "boundary_weight": 0.2, "regularization_weight": 1e-2}

_F32 = torch.float32
_F64 = torch.float64
# Upper triangle of a symmetric 4x4 quadric, row-major: (0,0) (0,1) (0,2) (0,3) (1,1) ... (3,3).
_TRIU = [(i, j) for i in range(4) for j in range(i, 4)]
_DEFAULT_CHUNK = 1 << 23  # candidate rows per tensor pass (bounds the working memory)


@dataclass
class DualGrid:
    """A flexible dual grid.

    Attributes:
        coords: ``[N, 3]`` int32 voxel coords in ``[0, R)``, sorted by (x, y, z).
        dual_vertices: ``[N, 3]`` float32 dual vertex in voxel units relative to the voxel's min
            corner (``0..1`` inside the voxel; the mesh vertex is ``(coords + v) / R - 0.5``).
        intersected: ``[N, 3]`` bool edge flags.
        resolution: ``R``.
    """

    coords: torch.Tensor
    dual_vertices: torch.Tensor
    intersected: torch.Tensor
    resolution: int

    @property
    def num_voxels(self) -> int:
        return self.coords.shape[0]


# --------------------------------------------------------------------------- float32 helpers
def _dot3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a . b`` over the last dim (3) summed as Eigen's fixed-size redux does: ``a0b0 + (a1b1 + a2b2)``."""
    return a[..., 0] * b[..., 0] + (a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2])


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([
        a[..., 1] * b[..., 2] - a[..., 2] * b[..., 1],
        a[..., 2] * b[..., 0] - a[..., 0] * b[..., 2],
        a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0],
    ], dim=-1)


def _triangle_planes(tri: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unit normals ``[F, 3]`` and plane quadrics ``[F, 10]`` (upper triangle of ``p p^T``,
    ``p = (n, -n.v0)``), float32 as the reference computes them."""
    v0, v1, v2 = tri[:, 0], tri[:, 1], tri[:, 2]
    n = _cross(v1 - v0, v2 - v1)
    sq = _dot3(n, n).unsqueeze(-1)
    n = torch.where(sq > 0, n / torch.sqrt(sq), n)  # Eigen's normalized() keeps a zero vector
    plane = torch.cat([n, -_dot3(n, v0).unsqueeze(-1)], dim=-1)
    q = torch.stack([plane[:, i] * plane[:, j] for i, j in _TRIU], dim=-1)
    return n, q


def _expand(counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For ``counts [M]``: (owner row ``[sum]``, rank within the owner ``[sum]``), both int64."""
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    return owner, torch.arange(owner.numel(), device=counts.device) - first[owner]


def _div(x: torch.Tensor, s) -> torch.Tensor:
    """``x / s`` as a true division (PyTorch's CUDA kernels multiply by the reciprocal of a
    Python scalar divisor, which can differ from the reference in the last bit)."""
    if isinstance(s, torch.Tensor):
        return torch.div(x, s)
    return torch.div(x, torch.tensor(s, dtype=x.dtype, device=x.device))


def _keys(coords: torch.Tensor, r: int) -> torch.Tensor:
    c = coords.long()
    return (c[..., 0] * r + c[..., 1]) * r + c[..., 2]


# --------------------------------------------------------------------------- 1. edge crossings
def _lerp(a, b, t, va, vb):
    """The reference's ``lerp``: ``va`` where ``a == b``, else ``(1-alpha) va + alpha vb``."""
    same = a == b
    alpha = (t - a) / torch.where(same, torch.ones_like(b), b - a)
    out = (1 - alpha) * va + alpha * vb
    return torch.where(same, va, out)


def _axis_crossings(tri: torch.Tensor, ax2: int, r: int, vs: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crossings of grid edges along axis ``ax2`` (the reference's ``scan_line_fill(ax2)``).

    Args:
        tri: ``[F, 3, 3]`` float32 triangle corners in grid space ``[0, 1]^3``.
    Returns:
        triangle index ``[H]`` int64, voxel ``[H, 3]`` int64 holding the edge on its max corner,
        crossing point ``[H, 3]`` float64 (grid space).
    """
    dev = tri.device
    ax0, ax1 = (ax2 + 1) % 3, (ax2 + 2) % 3
    vs_d = torch.tensor(vs, dtype=_F32).double().item()
    t = tri[:, :, [ax0, ax1, ax2]].double()  # canonical (x, y, z)
    order = torch.sort(t[:, :, 1], dim=1, stable=True).indices
    t = torch.gather(t, 1, order.unsqueeze(-1).expand(-1, -1, 3))
    cell = torch.trunc(_div(t[:, :, 1], vs_d)).long().clamp_(0, r - 1)  # start, mid, end
    tri_ids, y_ids, ta, tb, tc = [], [], [], [], []
    for (lo, hi), (a, b, c) in (((0, 1), (0, 1, 2)), ((1, 2), (2, 1, 0))):
        owner, rank = _expand((cell[:, hi] - cell[:, lo]).clamp_(min=0))
        tri_ids.append(owner)
        y_ids.append(cell[owner, lo] + rank)
        ta.append(t[owner, a])
        tb.append(t[owner, b])
        tc.append(t[owner, c])
    tri_id, y_idx = torch.cat(tri_ids), torch.cat(y_ids)
    ta, tb, tc = torch.cat(ta), torch.cat(tb), torch.cat(tc)
    y = ((y_idx + 1).float() * vs).double()  # int * float in float, as the reference
    t3 = _lerp(ta[:, 1:2], tb[:, 1:2], y.unsqueeze(-1), ta[:, 0::2], tb[:, 0::2])  # (x, z)
    t4 = _lerp(ta[:, 1:2], tc[:, 1:2], y.unsqueeze(-1), ta[:, 0::2], tc[:, 0::2])
    swap = (t3[:, 0] > t4[:, 0]).unsqueeze(-1)
    t3, t4 = torch.where(swap, t4, t3), torch.where(swap, t3, t4)
    line_start = torch.trunc(_div(t3[:, 0], vs_d)).long().clamp_(0, r - 1)
    line_end = torch.trunc(_div(t4[:, 0], vs_d)).long().clamp_(0, r - 1)
    row, rank = _expand((line_end - line_start).clamp_(min=0))
    x_idx = line_start[row] + rank
    x = ((x_idx + 1).float() * vs).double()
    z = _lerp(t3[row, 0], t4[row, 0], x, t3[row, 1], t4[row, 1])
    z_idx = torch.trunc(_div(z, vs_d)).long()
    keep = (z_idx >= 0) & (z_idx < r)
    row, x_idx, x, z, z_idx = row[keep], x_idx[keep], x[keep], z[keep], z_idx[keep]
    voxel = torch.empty(row.numel(), 3, dtype=torch.long, device=dev)
    voxel[:, ax0], voxel[:, ax1], voxel[:, ax2] = x_idx, y_idx[row], z_idx
    point = torch.empty(row.numel(), 3, dtype=_F64, device=dev)
    point[:, ax0], point[:, ax1], point[:, ax2] = x, y[row], z
    return tri_id[row], voxel, point


# --------------------------------------------------------------------------- 2. face overlaps
_PROJECTIONS = ((0, 1, 2), (1, 2, 0), (2, 0, 1))  # (u, w, sign axis): xy by n.z, yz by n.x, zx by n.y


def _face_setup(tri: torch.Tensor, n: torch.Tensor, vs: float) -> torch.Tensor:
    """Per-triangle constants of the reference's triangle / box overlap test, float32 ``[F, 32]``:
    n (3), d1, d2, then for each projection (xy, yz, zx) and edge k: edge normal (u, w) and offset."""
    v = [tri[:, 0], tri[:, 1], tri[:, 2]]
    e = [v[1] - v[0], v[2] - v[1], v[0] - v[2]]
    size = torch.full((3,), vs, dtype=_F32, device=tri.device)
    c = torch.where(n > 0, size, torch.zeros_like(size))
    cols = [n[:, 0], n[:, 1], n[:, 2], _dot3(n, c - v[0]), _dot3(n, (size - c) - v[0])]
    for u, w, s in _PROJECTIONS:
        m = torch.where(n[:, s] < 0, -1.0, 1.0).to(_F32)
        for k in range(3):
            nu, nw = -m * e[k][:, w], m * e[k][:, u]  # the reference's (-m e_w, m e_u)
            cols += [nu, nw, -(nu * v[k][:, u] + nw * v[k][:, w]) + (nu.clamp(min=0) * size[u] + nw.clamp(min=0) * size[w])]
    return torch.stack(cols, dim=1)  # [F, 32]


def _face_overlaps(tri: torch.Tensor, setup: torch.Tensor, r: int, vs: float, chunk: int):
    """Yield (triangle index ``[M]``, voxel ``[M, 3]``) of every voxel box a triangle overlaps,
    in chunks of at most ``chunk`` candidate boxes."""
    lo_f = _div(torch.minimum(torch.minimum(tri[:, 0], tri[:, 1]), tri[:, 2]), vs)
    hi_f = _div(torch.maximum(torch.maximum(tri[:, 0], tri[:, 1]), tri[:, 2]), vs)
    lo = torch.trunc(lo_f).long().clamp_(min=0)
    hi = torch.trunc(hi_f + 1).long().clamp_(max=r)
    ext = (hi - lo).clamp_(min=0)
    volume = ext.prod(dim=1)
    ends = torch.cumsum(volume, 0)
    f_total = tri.shape[0]
    start = 0
    while start < f_total:
        base = int(ends[start - 1]) if start else 0
        stop = int(torch.searchsorted(ends, torch.tensor(base + chunk, device=ends.device), right=True))
        stop = max(stop, start + 1)
        owner, rank = _expand(volume[start:stop])
        owner += start
        ex = ext[owner]
        xyz = lo[owner] + torch.stack([rank % ex[:, 0], rank // ex[:, 0] % ex[:, 1], rank // (ex[:, 0] * ex[:, 1])], 1)
        keep = _box_test(xyz, owner, setup, vs)
        yield owner[keep], xyz[keep]
        start = stop


def _box_test(xyz: torch.Tensor, owner: torch.Tensor, table: torch.Tensor, vs: float) -> torch.Tensor:
    """The reference's overlap test of triangle ``owner`` with the box at ``vs * xyz`` (float32)."""
    p = xyz.float() * vs
    cols = table.t().contiguous()  # [32, F]: per-column gathers (contiguous results)
    nd = _dot3(torch.stack([cols[0][owner], cols[1][owner], cols[2][owner]], -1), p)
    keep = ~((nd + cols[3][owner]) * (nd + cols[4][owner]) > 0)
    col = 5
    for u, w, _ in _PROJECTIONS:
        for _k in range(3):
            keep &= ~(cols[col][owner] * p[:, u] + cols[col + 1][owner] * p[:, w] + cols[col + 2][owner] < 0)
            col += 3
    return keep


# --------------------------------------------------------------------------- 3. boundary lines
def _boundary_edges(faces: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """Edges used by exactly one face, ``[E, 2]`` (smaller vertex index first, sorted)."""
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).long()
    e = torch.sort(e, dim=1).values
    keys, counts = torch.unique(e[:, 0] * num_vertices + e[:, 1], return_counts=True)
    keys = keys[counts == 1]
    return torch.stack([keys // num_vertices, keys % num_vertices], 1)


def _boundary_walk(p0: torch.Tensor, p1: torch.Tensor, vs: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Voxels a 3-D grid walk from ``p0`` to ``p1`` (``[E, 3]`` float32) visits, as the reference's.

    Returns (segment index ``[W]``, voxel ``[W, 3]`` int64, unit direction ``[E, 3]`` float64).
    Segments shorter than 1e-6 visit nothing.
    """
    dev = p0.device
    d = (p1 - p0).double()
    length = d.norm(dim=1)
    live = length >= 1e-6
    d = d / torch.where(live, length, torch.ones_like(length)).unsqueeze(-1)
    start = torch.floor(_div(p0, vs)).long()
    step = torch.where(d > 0, 1, -1)
    border = ((start + (step > 0).long()).float() * vs)
    flat = d == 0
    t_first = torch.where(flat, torch.inf, _div((border - p0).double(), torch.where(flat, 1.0, d)))
    t_delta = torch.where(flat, torch.inf, _div(torch.full_like(d, vs), d.abs()))
    # Events: the k-th crossing of axis a happens at t_first + k * t_delta while <= length (one
    # spare k per axis absorbs the rounding of the count; the filter below is exact).
    n_ev = torch.where(t_first <= length.unsqueeze(-1),
                       torch.floor((length.unsqueeze(-1) - t_first) / t_delta).clamp(min=0) + 2, 0)
    n_ev = torch.where(live.unsqueeze(-1), n_ev, 0).long()
    seg_axis, k = _expand(n_ev.reshape(-1))
    seg, axis = seg_axis // 3, seg_axis % 3
    t = t_first[seg, axis] + k * t_delta[seg, axis]
    keep = t <= length[seg]
    seg, axis, t = seg[keep], axis[keep], t[keep]
    # Order within a segment: by t; ties step the larger axis first (the reference's comparisons).
    order = torch.argsort(2 - axis, stable=True)
    order = order[torch.argsort(t[order], stable=True)]
    order = order[torch.argsort(seg[order], stable=True)]
    seg, axis = seg[order], axis[order]
    moves = torch.zeros(seg.numel(), 3, dtype=torch.long, device=dev)
    moves[torch.arange(seg.numel(), device=dev), axis] = step[seg, axis]
    counts = torch.bincount(seg, minlength=p0.shape[0])
    total = torch.cumsum(moves, 0)
    before = torch.cumsum(counts, 0) - counts  # events of earlier segments
    offset = torch.zeros(p0.shape[0], 3, dtype=torch.long, device=dev)
    has_before = before > 0
    offset[has_before] = total[before[has_before] - 1]
    walked = start[seg] + total - offset[seg]
    live_idx = torch.nonzero(live).squeeze(1)
    seg_all = torch.cat([live_idx, seg])
    vox_all = torch.cat([start[live_idx], walked])
    return seg_all, vox_all, d


def _line_quadrics(p0: torch.Tensor, d: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight *`` quadric of the line through ``p0`` along unit ``d``: ``[E, 10]`` float32
    (``A = I - d d^T``, ``b = -A p0``, ``c = p0^T A p0``)."""
    eye = torch.eye(3, dtype=_F32, device=p0.device)
    a = eye - (d.unsqueeze(-1) * d.unsqueeze(-2)).float()
    ap = (a @ p0.unsqueeze(-1)).squeeze(-1)
    b = -ap
    c = (p0 * ap).sum(-1)
    full = torch.zeros(p0.shape[0], 4, 4, dtype=_F32, device=p0.device)
    full[:, :3, :3] = a
    full[:, :3, 3] = b
    full[:, 3, :3] = b
    full[:, 3, 3] = c
    return torch.stack([full[:, i, j] for i, j in _TRIU], dim=-1) * weight


# --------------------------------------------------------------------------- 4. solve
def _unpack(q: torch.Tensor) -> torch.Tensor:
    """``[N, 10]`` upper triangles -> ``[N, 4, 4]`` symmetric."""
    full = q.new_empty(q.shape[0], 4, 4)
    for k, (i, j) in enumerate(_TRIU):
        full[:, i, j] = q[:, k]
        full[:, j, i] = q[:, k]
    return full


def _solve_dual_vertices(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Minimise ``[p, 1] Q [p, 1]^T`` per voxel in its box ``[lo, hi]`` (the reference's rule).

    q ``[N, 4, 4]`` float64 (regularised, so ``Q[:3, :3]`` is positive definite); lo, hi ``[N, 3]``.
    Returns ``[N, 3]`` float64.
    """
    if q.shape[0] == 0:
        return q.new_zeros(0, 3)
    p = _solve3(q[:, :3, :3], -q[:, :3, 3])
    outside = ~(((p >= lo) & (p <= hi)).all(dim=1))
    if outside.any():
        idx = torch.nonzero(outside).squeeze(1)
        p[idx] = _constrained_minimum(q[idx], lo[idx], hi[idx])
    return p


def _solve3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [N, 3, 3] x = b [N, 3]`` by cofactors (elementwise: no per-matrix LAPACK call; ``a`` is
    symmetric positive definite here, its conditioning bounded by the regularisation)."""
    c0 = torch.cross(a[:, 1], a[:, 2], dim=-1)
    c1 = torch.cross(a[:, 2], a[:, 0], dim=-1)
    c2 = torch.cross(a[:, 0], a[:, 1], dim=-1)
    det = (a[:, 0] * c0).sum(-1, keepdim=True)
    return (c0 * b[:, 0:1] + c1 * b[:, 1:2] + c2 * b[:, 2:3]) / det


def _solve2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [N, 2, 2] x = b [N, 2]`` by Cramer's rule."""
    det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
    x0 = (b[:, 0] * a[:, 1, 1] - a[:, 0, 1] * b[:, 1]) / det
    x1 = (a[:, 0, 0] * b[:, 1] - b[:, 0] * a[:, 1, 0]) / det
    return torch.stack([x0, x1], dim=-1)


def _constrained_minimum(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Best of the minimisers on the box's 6 faces, 12 edges and 8 corners, in the reference's
    order (first strict minimum wins); candidates off the box are skipped (corners never are)."""
    m = q.shape[0]
    cands, valid = [], []
    bounds = torch.stack([lo, hi], dim=1)  # [M, 2, 3]
    for fixed in range(3):  # one coordinate on a face
        u, w = (fixed + 1) % 3, (fixed + 2) % 3
        a2 = q[:, [u, w]][:, :, [u, w]]
        bmat = q[:, [u, w]][:, :, [fixed, 3]]
        for side in range(2):
            val = bounds[:, side, fixed]
            rhs = -(bmat[:, :, 0] * val.unsqueeze(-1) + bmat[:, :, 1])
            x = _solve2(a2, rhs)
            pt = torch.empty(m, 3, dtype=q.dtype, device=q.device)
            pt[:, fixed], pt[:, u], pt[:, w] = val, x[:, 0], x[:, 1]
            cands.append(pt)
            valid.append((x[:, 0] >= lo[:, u]) & (x[:, 0] <= hi[:, u]) & (x[:, 1] >= lo[:, w]) & (x[:, 1] <= hi[:, w]))
    for free in range(3):  # two coordinates fixed: on an edge
        u, w = (free + 1) % 3, (free + 2) % 3
        for su, sw in ((0, 0), (0, 1), (1, 0), (1, 1)):
            cu, cw = bounds[:, su, u], bounds[:, sw, w]
            x = -(q[:, free, u] * cu + q[:, free, w] * cw + q[:, free, 3]) / q[:, free, free]
            pt = torch.empty(m, 3, dtype=q.dtype, device=q.device)
            pt[:, free], pt[:, u], pt[:, w] = x, cu, cw
            cands.append(pt)
            valid.append((x >= lo[:, free]) & (x <= hi[:, free]))
    for cx in range(2):  # corners, "x_constraint ? min : max" as in the reference
        for cy in range(2):
            for cz in range(2):
                pt = torch.stack([bounds[:, 1 - cx, 0], bounds[:, 1 - cy, 1], bounds[:, 1 - cz, 2]], dim=1)
                cands.append(pt)
                valid.append(torch.ones(m, dtype=torch.bool, device=q.device))
    pts = torch.stack(cands, dim=1)  # [M, 26, 3]
    hom = torch.cat([pts, torch.ones_like(pts[..., :1])], dim=-1)
    err = torch.einsum("mki,mij,mkj->mk", hom, q, hom)
    err = torch.where(torch.stack(valid, dim=1), err, torch.inf)
    best = torch.argmin(err, dim=1)
    return pts[torch.arange(m, device=q.device), best]


# --------------------------------------------------------------------------- entry point
def _check_inputs(vertices: torch.Tensor, faces: torch.Tensor, resolution: int) -> None:
    if vertices.dim() != 2 or vertices.shape[1] != 3:
        raise ValueError(f"mesh_to_flexible_dual_grid: vertices must be [V, 3], got {tuple(vertices.shape)}")
    if faces.dim() != 2 or faces.shape[1] != 3 or faces.is_floating_point():
        raise ValueError(f"mesh_to_flexible_dual_grid: faces must be integer [F, 3], got {faces.dtype} {tuple(faces.shape)}")
    if resolution < 2:
        raise ValueError(f"mesh_to_flexible_dual_grid: resolution must be >= 2, got {resolution}")
    if vertices.numel() and not torch.isfinite(vertices).all():
        raise ValueError("mesh_to_flexible_dual_grid: vertices contain NaN or inf")


@torch.no_grad()
def mesh_to_flexible_dual_grid(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    resolution: int,
    face_weight: float = REFERENCE_WEIGHTS["face_weight"],
    boundary_weight: float = REFERENCE_WEIGHTS["boundary_weight"],
    regularization_weight: float = REFERENCE_WEIGHTS["regularization_weight"],
    device: Optional[torch.device] = None,
    chunk: int = _DEFAULT_CHUNK,
) -> DualGrid:
    """Mesh in the AABB ``[-0.5, 0.5]^3`` -> flexible dual grid at ``resolution``.

    Args:
        vertices: ``[V, 3]`` float (computed in float32, as the reference).
        faces: ``[F, 3]`` int vertex indices.
        resolution: grid size ``R`` (256 / 512 / 1024 in TRELLIS.2).
        face_weight: > 0 adds the face quadrics (unweighted, as the reference); 0 skips them.
        boundary_weight: weight of the boundary-edge quadrics (0 skips them).
        regularization_weight: pull toward the mean crossing point, times the crossing count.
        device: where to compute (default: the vertices' device).
        chunk: candidate voxel boxes per pass of the face test (memory bound).
    Returns:
        :class:`DualGrid` on ``device``. Voxels that no grid edge inside the AABB crosses are not
        active (as in the reference), so a surface lying on the AABB faces is dropped there.
    """
    coords, intersected, q = voxel_quadrics(vertices, faces, resolution, face_weight, boundary_weight,
                                            regularization_weight, device, chunk)
    vs = _voxel_size(resolution)
    lo = (coords.float() * vs).double()
    hi = ((coords + 1).float() * vs).double()
    point = _solve_dual_vertices(q, lo, hi)
    dual = (point * resolution - coords.double()).float()
    return DualGrid(coords.int(), dual, intersected, int(resolution))


def _voxel_size(resolution: int) -> float:
    """The reference's float32 voxel size ``1 / R`` (as a Python float)."""
    return float(torch.tensor(1.0, dtype=_F32) / int(resolution))


@torch.no_grad()
def voxel_quadrics(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    resolution: int,
    face_weight: float = REFERENCE_WEIGHTS["face_weight"],
    boundary_weight: float = REFERENCE_WEIGHTS["boundary_weight"],
    regularization_weight: float = REFERENCE_WEIGHTS["regularization_weight"],
    device: Optional[torch.device] = None,
    chunk: int = _DEFAULT_CHUNK,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Passes 1-3 and the regularisation of :func:`mesh_to_flexible_dual_grid`.

    Returns:
        coords ``[N, 3]`` int64 (sorted), intersected ``[N, 3]`` bool, and the regularised
        quadric of each voxel ``[N, 4, 4]`` float64 in grid space ``[0, 1]^3`` (the dual vertex
        minimises ``[p, 1] Q [p, 1]^T`` over the voxel's box).
    """
    _check_inputs(vertices, faces, resolution)
    dev = torch.device(device) if device is not None else vertices.device
    r = int(resolution)
    vs = _voxel_size(r)
    v = vertices.to(dev, _F32) + 0.5  # vertices - aabb_min, float32
    faces = faces.to(dev).long()
    tri = v[faces]  # [F, 3, 3]
    normals, tri_q = _triangle_planes(tri)
    tri_q = tri_q.double()

    # 1. crossings -> active voxels, flags, counts, means, crossing quadrics
    hits = [_axis_crossings(tri, a, r, vs) for a in range(3)]
    offsets = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]], device=dev)  # (d_ax0, d_ax1)
    corner_keys = []
    for a, (_, voxel, _) in enumerate(hits):
        ax0, ax1 = (a + 1) % 3, (a + 2) % 3
        around = voxel.unsqueeze(1).repeat(1, 4, 1)
        around[:, :, ax0] += offsets[:, 0]
        around[:, :, ax1] += offsets[:, 1]
        corner_keys.append(_keys(around, r).reshape(-1))  # [4H]
    keys, inverse = torch.unique(torch.cat(corner_keys), return_inverse=True)
    del corner_keys
    n = keys.numel()
    coords = torch.stack([keys // (r * r), keys // r % r, keys % r], dim=1)
    # one scatter per corner of [quadric (10) | crossing point (3) | 1] rows, all axes at once
    acc = torch.zeros(n, 14, dtype=_F64, device=dev)
    rows = inverse.view(-1, 4)
    tri_id = torch.cat([h[0] for h in hits])
    contrib = torch.cat([tri_q[tri_id], torch.cat([h[2] for h in hits]),
                         torch.ones(tri_id.numel(), 1, dtype=_F64, device=dev)], dim=1)
    for k in range(4):
        acc.index_add_(0, rows[:, k], contrib)
    del contrib
    intersected = torch.zeros(n, 3, dtype=torch.bool, device=dev)
    axis = torch.cat([torch.full_like(h[0], a) for a, h in enumerate(hits)])
    intersected[rows[:, 0], axis] = True
    del hits, inverse, rows
    q_acc, point_sum, count = acc[:, :10].contiguous(), acc[:, 10:13], acc[:, 13]

    # 2. face quadrics on the active voxels each triangle overlaps
    if face_weight > 0 and n:
        setup = _face_setup(tri, normals, vs)
        for owner, xyz in _face_overlaps(tri, setup, r, vs, chunk):
            row = _lookup(keys, _keys(xyz, r))
            found = row >= 0
            q_acc.index_add_(0, row[found], tri_q[owner[found]])

    # 3. boundary-edge quadrics along the grid walk of each open edge
    if boundary_weight > 0 and n:
        edges = _boundary_edges(faces, v.shape[0])
        if edges.numel():
            p0, p1 = v[edges[:, 0]], v[edges[:, 1]]
            seg, voxel, d = _boundary_walk(p0, p1, vs)
            inside = ((voxel >= 0) & (voxel < r)).all(dim=1)
            seg, voxel = seg[inside], voxel[inside]
            row = _lookup(keys, _keys(voxel, r))
            found = row >= 0
            line_q = _line_quadrics(p0, d, boundary_weight).double()
            q_acc.index_add_(0, row[found], line_q[seg[found]])

    # regularisation toward the mean crossing, weighted by the crossing count
    q = _unpack(q_acc)
    del q_acc
    mean = point_sum / count.clamp(min=1).unsqueeze(-1)
    wgt = (regularization_weight * count).view(-1, 1, 1)
    q[:, :3, :3] += wgt * torch.eye(3, dtype=_F64, device=dev)
    q[:, :3, 3] -= wgt[:, :, 0] * mean
    q[:, 3, :3] -= wgt[:, :, 0] * mean
    q[:, 3, 3] += wgt[:, 0, 0] * (mean * mean).sum(-1)
    return coords, intersected, q


def _lookup(sorted_keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Row of each ``query`` key in ``sorted_keys`` (unique, ascending), -1 where absent."""
    if sorted_keys.numel() == 0:
        return torch.full_like(query, -1)
    pos = torch.searchsorted(sorted_keys, query).clamp_(max=sorted_keys.numel() - 1)
    return torch.where(sorted_keys[pos] == query, pos, torch.full_like(pos, -1))


def occupancy_from_coords(coords: torch.Tensor, resolution: int, grid: int = 64) -> torch.Tensor:
    """Occupancy ``[grid]^3`` bool of voxel coords ``[N, 3]`` on a ``resolution`` grid.

    A coarse cell is occupied when any of its fine voxels is: ``coords // (resolution // grid)``.
    For ``resolution = 16 * grid`` (1024 -> 64) these are exactly the token coords of the shape
    latent (four 2x down-samplings), which is how TRELLIS.2's ``encode_ss_latent.py`` builds the
    sparse-structure input.
    """
    if resolution % grid:
        raise ValueError(f"occupancy_from_coords: resolution {resolution} is not a multiple of grid {grid}")
    occ = torch.zeros(grid, grid, grid, dtype=torch.bool, device=coords.device)
    c = torch.div(coords.long(), resolution // grid, rounding_mode="floor")
    occ[c[:, 0], c[:, 1], c[:, 2]] = True
    return occ
