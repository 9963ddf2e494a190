"""O-Voxel geometry (flexible dual grid) <-> triangle mesh, in pure PyTorch.

Frame: the model-space AABB ``[-0.5, 0.5]^3`` split into ``R^3`` voxels; voxel ``c = (x, y, z)``
spans ``[c/R - 0.5, (c+1)/R - 0.5]``. Per active voxel the flexible dual grid stores

* a dual vertex ``v`` in voxel units (the mesh vertex is ``(c + v)/R - 0.5``; the decoder's
  range is ``(-margin, 1 + margin)``),
* three "intersected" flags: ``intersected[c, a]`` is True when the surface crosses the grid edge
  parallel to axis ``a`` that lies on ``c``'s **max corner** in the two other axes. The four voxels
  sharing that edge (``c + OFFSETS[a]``) give one quad.
* (from the decoder) a split weight per voxel choosing each quad's diagonal.

``flexible_dual_grid_to_mesh`` is the decoder side (the official ``train=False`` extraction, with
the CUDA hash map replaced by sorted keys + ``searchsorted``). ``sdf_to_flexible_dual_grid`` is our
own encoder for analytic surfaces (tests, benchmarks), following the official encoder's semantics:
active voxels are the four voxels around every crossed edge, the flag goes to the voxel whose max
corner holds the edge, and the dual vertex minimises a QEF of the edge crossings' tangent planes,
regularised toward their mean.

Quad winding is fixed per axis (the flags carry no inside/outside sign), so the raw mesh is not
consistently oriented: ``know3d_core.mesh.orient_faces`` fixes that.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

__all__ = [
    "EDGE_NEIGHBOR_OFFSETS",
    "flexible_dual_grid_to_mesh",
    "quads_from_flags",
    "triangulate_quads",
    "sdf_to_flexible_dual_grid",
    "sphere_sdf",
    "torus_sdf",
    "union_sdf",
]

# [axis, corner, xyz]: the 4 voxels around the max-corner edge of voxel c, in quad order.
EDGE_NEIGHBOR_OFFSETS = (
    ((0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0)),  # edge along x
    ((0, 0, 0), (1, 0, 0), (1, 0, 1), (0, 0, 1)),  # edge along y
    ((0, 0, 0), (0, 1, 0), (1, 1, 0), (1, 0, 0)),  # edge along z
)
_SPLIT_02 = (0, 1, 2, 0, 2, 3)  # diagonal 0-2
_SPLIT_13 = (0, 1, 3, 3, 1, 2)  # diagonal 1-3

SDF = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- voxel hashing
def _voxel_keys(coords: torch.Tensor, stride: int) -> torch.Tensor:
    """int64 keys of ``coords [..., 3]`` (each component in ``[0, stride)``)."""
    c = coords.long()
    return (c[..., 0] * stride + c[..., 1]) * stride + c[..., 2]


class _VoxelIndex:
    """Sorted-key lookup table of voxel coords ``[N, 3]`` -> row index."""

    def __init__(self, coords: torch.Tensor, stride: int):
        self.stride = stride
        self.sorted_keys, self.order = torch.sort(_voxel_keys(coords, stride))

    def lookup(self, coords: torch.Tensor) -> torch.Tensor:
        """Row index of each ``coords [..., 3]``, -1 where absent (or out of range)."""
        n = self.sorted_keys.numel()
        inside = ((coords >= 0) & (coords < self.stride)).all(-1)
        keys = _voxel_keys(coords.clamp(0, self.stride - 1), self.stride)
        if n == 0:
            return torch.full(keys.shape, -1, dtype=torch.long, device=keys.device)
        pos = torch.searchsorted(self.sorted_keys, keys).clamp_(max=n - 1)
        found = (self.sorted_keys[pos] == keys) & inside
        return torch.where(found, self.order[pos], torch.full_like(pos, -1))


# --------------------------------------------------------------------------- decoder side
def quads_from_flags(coords: torch.Tensor, intersected: torch.Tensor, resolution: int) -> torch.Tensor:
    """Quads of a flexible dual grid.

    Args:
        coords: ``[N, 3]`` int voxel coords in ``[0, resolution)``.
        intersected: ``[N, 3]`` bool edge flags.
    Returns:
        ``[Q, 4]`` int64 voxel row indices, one quad per set flag whose 4 voxels all exist, in
        row-major order of ``intersected`` (voxel-major, then axis).
    """
    if coords.shape[0] == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=coords.device)
    offsets = torch.tensor(EDGE_NEIGHBOR_OFFSETS, dtype=torch.long, device=coords.device)
    voxel, axis = intersected.nonzero(as_tuple=True)
    corners = coords.long()[voxel].unsqueeze(1) + offsets[axis]  # [M, 4, 3]
    index = _VoxelIndex(coords, resolution + 1)
    quad = index.lookup(corners)
    return quad[(quad >= 0).all(dim=1)]


def triangulate_quads(
    quads: torch.Tensor, vertices: torch.Tensor, split_weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Split quads ``[Q, 4]`` into triangles ``[2Q, 3]`` (int64).

    With ``split_weight [N]``: diagonal 0-2 (``[0,1,2, 0,2,3]``) where ``w0*w2 > w1*w3``, else
    diagonal 1-3 (``[0,1,3, 3,1,2]``) -- the official rule. Without weights: the diagonal whose two
    triangles have the more aligned unit normals (the official C++ encoder's rule).
    """
    split_02 = quads[:, list(_SPLIT_02)]
    split_13 = quads[:, list(_SPLIT_13)]
    if split_weight is not None:
        w = split_weight.reshape(-1)[quads]
        use_02 = w[:, 0] * w[:, 2] > w[:, 1] * w[:, 3]
    else:
        p = vertices.double()[quads]  # [Q, 4, 3]

        def unit_normal(a, b, c):
            return torch.nn.functional.normalize(torch.cross(p[:, b] - p[:, a], p[:, c] - p[:, a], dim=-1), dim=-1)

        align_02 = (unit_normal(0, 1, 2) * unit_normal(0, 2, 3)).sum(-1)
        align_13 = (unit_normal(0, 1, 3) * unit_normal(1, 2, 3)).sum(-1)
        use_02 = align_02 >= align_13
    return torch.where(use_02.unsqueeze(1), split_02, split_13).reshape(-1, 3)


def flexible_dual_grid_to_mesh(
    coords: torch.Tensor,
    dual_vertices: torch.Tensor,
    intersected: torch.Tensor,
    split_weight: Optional[torch.Tensor],
    resolution: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flexible dual grid -> triangle mesh (model space ``[-0.5, 0.5]^3``).

    Args:
        coords: ``[N, 3]`` int voxel coords in ``[0, resolution)``.
        dual_vertices: ``[N, 3]`` float dual-vertex offsets in voxel units.
        intersected: ``[N, 3]`` bool edge flags.
        split_weight: ``[N]`` or ``[N, 1]`` positive quad-split weights, or None.
        resolution: grid size ``R``.
    Returns:
        vertices ``[N, 3]`` float32 = ``(coords + v)/R - 0.5`` (one per voxel, referenced or not) and
        faces ``[F, 3]`` int64 (two triangles per quad).
    """
    if coords.dim() != 2 or coords.shape[1] != 3:
        raise ValueError(f"flexible_dual_grid_to_mesh: coords must be [N, 3], got {tuple(coords.shape)}")
    if dual_vertices.shape != coords.shape or intersected.shape != coords.shape:
        raise ValueError(
            "flexible_dual_grid_to_mesh: coords, dual_vertices and intersected must all be [N, 3], got "
            f"{tuple(coords.shape)}, {tuple(dual_vertices.shape)}, {tuple(intersected.shape)}"
        )
    vertices = (coords.float() + dual_vertices.float()) * (1.0 / resolution) - 0.5
    quads = quads_from_flags(coords, intersected.bool(), resolution)
    faces = triangulate_quads(quads, vertices, split_weight)
    return vertices, faces


# --------------------------------------------------------------------------- analytic SDFs
def sphere_sdf(center=(0.0, 0.0, 0.0), radius: float = 0.35) -> SDF:
    """Signed distance to a sphere (negative inside). ``points [..., 3] -> [...]``."""

    def sdf(p: torch.Tensor) -> torch.Tensor:
        return (p - p.new_tensor(center)).norm(dim=-1) - radius

    return sdf


def torus_sdf(center=(0.0, 0.0, 0.0), major: float = 0.3, minor: float = 0.12) -> SDF:
    """Signed distance to a torus around the z axis through ``center`` (negative inside)."""

    def sdf(p: torch.Tensor) -> torch.Tensor:
        q = p - p.new_tensor(center)
        ring = q[..., :2].norm(dim=-1) - major
        return torch.stack([ring, q[..., 2]], dim=-1).norm(dim=-1) - minor

    return sdf


def union_sdf(*sdfs: SDF) -> SDF:
    """Union of shapes (pointwise minimum; a distance bound, still 1-Lipschitz)."""

    def sdf(p: torch.Tensor) -> torch.Tensor:
        return torch.stack([f(p) for f in sdfs], dim=0).amin(dim=0)

    return sdf


# --------------------------------------------------------------------------- our encoder
def _corner_points(corners: torch.Tensor, resolution: int) -> torch.Tensor:
    """Grid-corner coords ``[..., 3]`` (0..R) -> model-space points (float64)."""
    return corners.double() / resolution - 0.5


def _narrow_band_voxels(sdf: SDF, resolution: int, device, chunk: int) -> torch.Tensor:
    """Voxels ``[M, 3]`` (int64) whose centre lies within ``sqrt(3)/2`` voxel of the surface.

    Coarse-to-fine: a cell is kept while ``|sdf(centre)|`` is below its half-diagonal plus the
    fine voxel's half-diagonal, which never drops a fine voxel if ``sdf`` is 1-Lipschitz.
    """
    base = resolution
    levels = 0
    while base % 2 == 0 and base > 16:
        base //= 2
        levels += 1
    g = torch.arange(base, device=device)
    cells = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1).reshape(-1, 3)
    fine_half_diag = 3**0.5 / 2 / resolution
    res = base
    children = torch.tensor(
        [[(k >> 0) & 1, (k >> 1) & 1, (k >> 2) & 1] for k in range(8)], dtype=torch.long, device=device
    )
    for level in range(levels + 1):
        cell_half_diag = 3**0.5 / 2 / res
        keep = []
        for start in range(0, cells.shape[0], chunk):
            part = cells[start : start + chunk]
            d = sdf((part.double() + 0.5) / res - 0.5).abs()
            keep.append(part[d <= cell_half_diag + fine_half_diag + 1e-9])
        cells = torch.cat(keep)
        if level < levels:
            cells = (cells.unsqueeze(1) * 2 + children).reshape(-1, 3)
            res *= 2
    return cells


def _edge_crossings(sdf: SDF, p0: torch.Tensor, p1: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """Bisection for the zero of ``sdf`` on segments ``p0 -> p1`` (sign change assumed). float64."""
    s0 = sdf(p0) < 0
    lo, hi = p0.clone(), p1.clone()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        same = (sdf(mid) < 0) == s0
        lo = torch.where(same.unsqueeze(-1), mid, lo)
        hi = torch.where(same.unsqueeze(-1), hi, mid)
    return 0.5 * (lo + hi)


def _sdf_normals(sdf: SDF, points: torch.Tensor, eps: float) -> torch.Tensor:
    """Unit gradient of ``sdf`` at ``points [M, 3]`` by central differences (float64)."""
    grads = []
    for a in range(3):
        e = torch.zeros(3, dtype=points.dtype, device=points.device)
        e[a] = eps
        grads.append(sdf(points + e) - sdf(points - e))
    return torch.nn.functional.normalize(torch.stack(grads, dim=-1), dim=-1)


def _solve_3x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``a [N, 3, 3] @ p = b [N, 3]``: ``a^-1`` has columns ``row1 x row2, row2 x row0,
    row0 x row1`` over ``det(a)`` (``a`` is well conditioned here: regularised QEF)."""
    c0 = torch.cross(a[:, 1], a[:, 2], dim=-1)
    c1 = torch.cross(a[:, 2], a[:, 0], dim=-1)
    c2 = torch.cross(a[:, 0], a[:, 1], dim=-1)
    det = (a[:, 0] * c0).sum(-1, keepdim=True)
    return (c0 * b[:, 0:1] + c1 * b[:, 1:2] + c2 * b[:, 2:3]) / det


def sdf_to_flexible_dual_grid(
    sdf: SDF,
    resolution: int,
    regularization: float = 0.1,
    chunk: int = 1 << 20,
    device: Optional[torch.device] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode the zero level set of ``sdf`` (negative inside, 1-Lipschitz) as a flexible dual grid.

    Only grid edges strictly inside the AABB are tested (as in the official encoder), so the
    surface should stay at least one voxel away from the AABB faces.

    Args:
        sdf: ``points [..., 3] float64 -> [...]`` signed distance (or a 1-Lipschitz bound).
        resolution: grid size ``R``.
        regularization: weight (times the number of crossings) pulling the QEF solution toward the
            mean crossing point, as in the official encoder.
    Returns:
        coords ``[N, 3]`` int32 (sorted by x, y, z), dual_vertices ``[N, 3]`` float32 in voxel units
        (clamped to the voxel, ``[0, 1]``), intersected ``[N, 3]`` bool.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    r = resolution
    band = _narrow_band_voxels(sdf, r, device, chunk)
    eye = torch.eye(3, dtype=torch.long, device=device)

    # Edge along axis a on the max corner of voxel c: corners c + 1 - e_a  ->  c + 1.
    flag_voxel, flag_axis, crossing = [], [], []
    for a in range(3):
        others = [b for b in range(3) if b != a]
        cand = band[(band[:, others] + 1 < r).all(dim=-1)]  # edge lines strictly inside the AABB
        p0 = _corner_points(cand + 1 - eye[a], r)
        p1 = _corner_points(cand + 1, r)
        crosses = (sdf(p0) < 0) != (sdf(p1) < 0)
        flag_voxel.append(cand[crosses])
        flag_axis.append(torch.full((int(crosses.sum()),), a, dtype=torch.long, device=device))
        crossing.append(_edge_crossings(sdf, p0[crosses], p1[crosses]))
    flag_voxel = torch.cat(flag_voxel)
    flag_axis = torch.cat(flag_axis)
    crossing = torch.cat(crossing)
    normal = _sdf_normals(sdf, crossing, eps=1e-4 / r)

    # Every crossing feeds the 4 voxels around its edge.
    offsets = torch.tensor(EDGE_NEIGHBOR_OFFSETS, dtype=torch.long, device=device)
    around = flag_voxel.unsqueeze(1) + offsets[flag_axis]  # [M, 4, 3]
    stride = r + 1
    keys = _voxel_keys(around.reshape(-1, 3), stride)
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    coords = torch.stack([unique_keys // stride**2, unique_keys // stride % stride, unique_keys % stride], -1)
    n = coords.shape[0]

    # QEF: sum_i (n_i . (p - x_i))^2 + reg * cnt * |p - mean|^2, in voxel units. Each crossing
    # is added to its 4 voxels one corner at a time (no 4x copies).
    x = (crossing + 0.5) * r
    outer = normal.unsqueeze(-1) * normal.unsqueeze(-2)  # [M, 3, 3]
    outer_x = (outer @ x.unsqueeze(-1)).squeeze(-1)
    inverse = inverse.view(-1, 4)
    ata = torch.zeros(n, 3, 3, dtype=torch.float64, device=device)
    atb = torch.zeros(n, 3, dtype=torch.float64, device=device)
    total = torch.zeros(n, 3, dtype=torch.float64, device=device)
    count = torch.zeros(n, dtype=torch.float64, device=device)
    ones = torch.ones_like(x[:, 0])
    for k in range(4):
        ata.index_add_(0, inverse[:, k], outer)
        atb.index_add_(0, inverse[:, k], outer_x)
        total.index_add_(0, inverse[:, k], x)
        count.index_add_(0, inverse[:, k], ones)
    weight = regularization * count
    ata += weight.view(n, 1, 1) * torch.eye(3, dtype=torch.float64, device=device)
    atb += weight.unsqueeze(-1) * (total / count.unsqueeze(-1))
    point = _solve_3x3(ata, atb)
    dual = (point - coords.double()).clamp(0.0, 1.0)

    intersected = torch.zeros(n, 3, dtype=torch.bool, device=device)
    flag_rows = torch.searchsorted(unique_keys, _voxel_keys(flag_voxel, stride))
    intersected[flag_rows, flag_axis] = True
    return coords.int(), dual.float(), intersected
