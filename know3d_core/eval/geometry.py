"""Geometric metrics: volume IoU of voxel sets, Chamfer distance and F-score on surface samples,
and the same restricted to the back half of the object.

Conventions (stated once, used by every metric here):

* **Frame.** Model space of the pipeline and the dataset: Z up, the object's front faces -Y, i.e.
  the front camera of ``know3d_core.mesh.render`` sits at -Y and looks along +Y
  (``render.VIEWS["front"]``), and the data renderer's azimuth 0 is the same camera
  (``know3d_core.data.layout``).
* **Back half.** The half-space behind the object centre as seen from the front camera:
  ``dot(p - c, -toward_front) > 0`` with ``toward_front = (0, -1, 0)``, i.e. ``p_y > c_y``, where ``c``
  is the centre of the ground truth's bounding box. Dataset meshes are normalised with their box
  centre at the origin, so in model space the back half is ``y > 0``; in a ``[64]^3`` occupancy grid
  indexed ``[x, y, z]`` it is the voxels ``y >= 32`` (voxel centre ``(j + 0.5) / 64 - 0.5 > 0``).
* **Unit-sphere normalisation (HY3D-Bench).** One similarity transform per item, computed from the
  ground truth: ``p -> (p - c) / r`` with ``c`` the centre of its bounding box and ``r`` the largest
  distance of a vertex from ``c`` (the surface's farthest point is a vertex). The prediction gets the
  same transform, so a prediction that is shifted or scaled is penalised (our predictions and ground
  truths share model space). ``normalize="each"`` normalises each shape by its own box instead, as
  benchmarks of methods with arbitrary output frames do.
* **Surface samples.** ``SURFACE_SAMPLES`` = 300,000 area-uniform points, then farthest-point
  sampling down to ``FPS_POINTS`` = 8,192 (``fpsample``'s bucket/KD-line FPS on the CPU when the
  package is installed, else an exact FPS in torch, which is what runs on CUDA).
* **Chamfer distance** (L1, Euclidean, not squared): ``mean_a min_b |a-b| + mean_b min_a |a-b|``.
* **F-score** at ``tau`` = ``FSCORE_TAU`` = 0.05 (unit-sphere units, 2.5% of the diameter):
  precision = share of predicted points within tau of the ground truth's points, recall = the
  converse, ``F = 2PR / (P + R)`` (0 when both are 0).
* **Voxel IoU.** ``|A & B| / |A | B|`` of *surface* voxel sets (TRELLIS's sparse structure is the set
  of voxels the surface passes through, not a solid), in model space ``[-0.5, 0.5]^3``. The final
  mesh is voxelised by :func:`surface_voxels` at ``MESH_IOU_RESOLUTION`` = 128.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = [
    "SURFACE_SAMPLES", "FPS_POINTS", "FSCORE_TAU", "MESH_IOU_RESOLUTION", "OCCUPANCY_RESOLUTION",
    "FRONT_TOWARD_CAMERA", "sample_surface", "farthest_point_sampling", "unit_sphere_transform",
    "back_half_mask", "back_half_grid", "nearest_distances", "chamfer_fscore", "ChamferResult",
    "surface_voxels", "voxel_centres", "voxel_iou", "coords_to_grid", "occupancy_mesh",
]

SURFACE_SAMPLES = 300_000
FPS_POINTS = 8192
FSCORE_TAU = 0.05
MESH_IOU_RESOLUTION = 128
OCCUPANCY_RESOLUTION = 64


def _front_toward_camera() -> Tuple[float, float, float]:
    from ..mesh.render import VIEWS

    return tuple(VIEWS["front"][2])


# Unit vector from the object toward the front camera, (0, -1, 0): the back half lies along its opposite.
FRONT_TOWARD_CAMERA = _front_toward_camera()


# ------------------------------------------------------------------------------------ sampling
def sample_surface(vertices: torch.Tensor, faces: torch.Tensor, count: int = SURFACE_SAMPLES,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``count`` points uniformly distributed by area on the triangles (``[count, 3]``).

    Args:
        vertices: ``[V, 3]`` float; faces: ``[F, 3]`` int. Runs on their device.
        generator: a CPU ``torch.Generator`` (draws happen on the CPU, then move), for
            device-independent samples.
    """
    v = vertices.double()[faces.long()]  # [F, 3, 3]
    area = torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1).norm(dim=-1)
    if faces.shape[0] == 0 or float(area.sum()) <= 0:
        raise ValueError("sample_surface: the mesh has no area (no faces, or all degenerate)")
    face = torch.multinomial(area.cpu(), count, replacement=True, generator=generator).to(v.device)
    uv = torch.rand(count, 2, generator=generator, dtype=torch.float64).to(v.device)
    flip = uv.sum(1) > 1  # reflect into the lower triangle: uniform on the triangle
    uv[flip] = 1 - uv[flip]
    t = v[face]
    points = t[:, 0] + uv[:, :1] * (t[:, 1] - t[:, 0]) + uv[:, 1:] * (t[:, 2] - t[:, 0])
    return points.to(vertices.dtype if vertices.is_floating_point() else torch.float32)


def farthest_point_sampling(points: torch.Tensor, count: int = FPS_POINTS, start: int = 0,
                            backend: str = "auto") -> torch.Tensor:
    """Indices ``[min(count, N)]`` (int64, on ``points.device``) of a farthest-point subset of ``points [N, 3]``.

    Backends: ``"fpsample"`` (the package's bucket/KD-line FPS, CPU), ``"torch"`` (exact greedy FPS from
    ``start``; what runs on CUDA), ``"auto"`` (fpsample for CPU tensors when installed, else torch).
    Both return a greedy farthest-point ordering, so every input point lies within the selected set's
    covering radius, which is at most the smallest distance between two selected points.
    """
    n = points.shape[0]
    if count >= n:
        return torch.arange(n, device=points.device)
    if backend == "auto":
        backend = "fpsample" if points.device.type == "cpu" and _has_fpsample() else "torch"
    if backend == "fpsample":
        import fpsample

        pts = points.detach().float().cpu().numpy()
        idx = fpsample.bucket_fps_kdline_sampling(pts, count, h=_kdline_height(n), start_idx=start)
        return torch.from_numpy(idx.astype("int64")).to(points.device)
    if backend != "torch":
        raise ValueError(f"farthest_point_sampling: unknown backend {backend!r} (auto, fpsample, torch)")
    return _torch_fps(points, count, start)


def _has_fpsample() -> bool:
    import importlib.util

    return importlib.util.find_spec("fpsample") is not None


def _kdline_height(n: int) -> int:
    # fpsample's guidance: tree height 3-9, larger for larger clouds (7 at ~100k-1M points).
    return max(3, min(9, int(math.log2(max(n, 2)) / 2.6)))


@torch.no_grad()
def _torch_fps(points: torch.Tensor, count: int, start: int) -> torch.Tensor:
    x = points.float()
    idx = torch.empty(count, dtype=torch.long, device=x.device)
    dist = torch.full((x.shape[0],), float("inf"), device=x.device)
    cur = torch.tensor(start, device=x.device)
    for i in range(count):  # no host sync inside the loop
        idx[i] = cur
        dist = torch.minimum(dist, (x - x[cur]).square().sum(1))
        cur = torch.argmax(dist)
    return idx


# ---------------------------------------------------------------------------- normalisation
def unit_sphere_transform(vertices: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """``(centre [3], radius)``: bounding-box centre of ``vertices [V, 3]`` and the largest distance
    of a vertex from it (the HY3D-Bench unit-sphere normalisation is ``(p - centre) / radius``)."""
    v = vertices.double()
    centre = (v.amin(0) + v.amax(0)) / 2
    radius = float((v - centre).norm(dim=1).max())
    if not radius > 0:
        raise ValueError("unit_sphere_transform: the shape has zero extent")
    return centre.to(vertices.dtype), radius


def back_half_mask(points: torch.Tensor, centre: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[N]`` bool: points strictly behind ``centre`` (default origin) as seen from the front camera."""
    toward = torch.tensor(FRONT_TOWARD_CAMERA, dtype=points.dtype, device=points.device)
    rel = points if centre is None else points - centre.to(points)
    return (rel @ toward) < 0


def voxel_centres(resolution: int, device=None) -> torch.Tensor:
    """``[R, R, R, 3]`` model-space centres of the voxels of a grid over ``[-0.5, 0.5]^3`` indexed [x, y, z]."""
    c = (torch.arange(resolution, device=device, dtype=torch.float64) + 0.5) / resolution - 0.5
    return torch.stack(torch.meshgrid(c, c, c, indexing="ij"), dim=-1).float()


def back_half_grid(resolution: int, device=None) -> torch.Tensor:
    """``[R, R, R]`` bool: voxels whose centre lies in the back half of model space (``y > 0``)."""
    return back_half_mask(voxel_centres(resolution, device).view(-1, 3)).view(resolution, resolution, resolution)


# --------------------------------------------------------------------------------- distances
def nearest_distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``[N_a]``: Euclidean distance from each point of ``a [N_a, 3]`` to its nearest point of ``b [N_b, 3]``.

    The neighbour is found with ``cdist`` (matrix-product form, float32) and its distance recomputed
    directly, so coincident points give exactly 0 (the product form alone has ~1e-4 cancellation error).
    """
    out = []
    bf = b.float()
    for s in range(0, a.shape[0], chunk):
        part = a[s:s + chunk].float()
        nearest = torch.cdist(part, bf).argmin(dim=1)
        out.append((part - bf[nearest]).norm(dim=1))
    return torch.cat(out) if out else a.new_zeros(0)


@dataclass
class ChamferResult:
    chamfer: float      # mean_a d(a, B) + mean_b d(b, A)
    precision: float    # share of predicted points within tau of the ground truth
    recall: float       # share of ground-truth points within tau of the prediction
    fscore: float


def chamfer_fscore(pred: torch.Tensor, gt: torch.Tensor, tau: float = FSCORE_TAU) -> ChamferResult:
    """Chamfer distance and F-score at ``tau`` between point sets ``pred [N, 3]`` and ``gt [M, 3]``.

    An empty set on either side gives ``chamfer = nan`` and F-score 0 (nothing can be matched).
    """
    if pred.shape[0] == 0 or gt.shape[0] == 0:
        return ChamferResult(float("nan"), 0.0, 0.0, 0.0)
    d_pg = nearest_distances(pred, gt)
    d_gp = nearest_distances(gt, pred)
    precision = float((d_pg <= tau).float().mean())
    recall = float((d_gp <= tau).float().mean())
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return ChamferResult(float(d_pg.mean() + d_gp.mean()), precision, recall, f)


# ------------------------------------------------------------------------------------ voxels
def surface_voxels(vertices: torch.Tensor, faces: torch.Tensor, resolution: int = MESH_IOU_RESOLUTION) -> torch.Tensor:
    """``[R, R, R]`` bool: voxels of the ``[-0.5, 0.5]^3`` grid the surface passes through.

    Each triangle is sampled on a barycentric lattice whose spacing is at most half a voxel along
    every edge (deterministic: the same mesh always gives the same set), and the voxels holding a
    lattice point are marked. A triangle that only clips a voxel corner by less than half a voxel
    may miss it; both sides of an IoU are voxelised the same way.
    """
    r = int(resolution)
    grid = torch.zeros(r * r * r, dtype=torch.bool, device=vertices.device)
    if faces.shape[0] == 0:
        return grid.view(r, r, r)
    tri = vertices.double()[faces.long()]  # [F, 3, 3]
    edge = torch.stack([(tri[:, 1] - tri[:, 0]).norm(dim=1), (tri[:, 2] - tri[:, 1]).norm(dim=1),
                        (tri[:, 0] - tri[:, 2]).norm(dim=1)], 1).amax(1)
    steps = torch.ceil(edge * r * 2).clamp(min=1).long()
    for n in torch.unique(steps).tolist():  # one lattice per subdivision count
        t = tri[steps == n]
        i, j = torch.meshgrid(torch.arange(n + 1, device=t.device), torch.arange(n + 1, device=t.device), indexing="ij")
        keep = (i + j) <= n
        w = torch.stack([i[keep], j[keep]], 1).double() / n  # [P, 2]
        pts = t[:, None, 0] + w[None, :, :1] * (t[:, None, 1] - t[:, None, 0]) + w[None, :, 1:] * (t[:, None, 2] - t[:, None, 0])
        idx = torch.floor((pts.reshape(-1, 3) + 0.5) * r).long().clamp(0, r - 1)
        grid[(idx[:, 0] * r + idx[:, 1]) * r + idx[:, 2]] = True
    return grid.view(r, r, r)


def coords_to_grid(coords: torch.Tensor, resolution: int = OCCUPANCY_RESOLUTION) -> torch.Tensor:
    """``[R, R, R]`` bool from voxel coordinates ``[N, 3]`` (x, y, z) or ``[N, 4]`` (b, x, y, z) of one item."""
    c = coords.long()
    if c.shape[-1] == 4:
        c = c[:, 1:]
    grid = torch.zeros((resolution,) * 3, dtype=torch.bool, device=coords.device)
    if c.numel():
        if int(c.min()) < 0 or int(c.max()) >= resolution:
            raise ValueError(f"coords_to_grid: coordinates outside [0, {resolution})")
        grid[c[:, 0], c[:, 1], c[:, 2]] = True
    return grid


def voxel_iou(a: torch.Tensor, b: torch.Tensor, region: Optional[torch.Tensor] = None) -> float:
    """``|a & b| / |a | b|`` of two bool grids (within ``region`` if given); 1.0 when both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"voxel_iou: grids of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if region is not None:
        a, b = a & region, b & region
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def occupancy_mesh(grid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(vertices [4Q, 3], faces [2Q, 3])``: the exposed cube faces of a bool grid ``[R, R, R]`` in
    model space (for pictures of stage-1 outputs; Q = number of exposed voxel faces)."""
    r = grid.shape[0]
    occ = torch.nn.functional.pad(grid.bool(), (1, 1, 1, 1, 1, 1))
    verts, faces = [], []
    base = 0
    for axis in range(3):
        for sign in (-1, 1):
            shifted = torch.roll(occ, shifts=-sign, dims=axis)
            exposed = (occ & ~shifted)[1:-1, 1:-1, 1:-1].nonzero().double()  # [Q, 3] voxel indices
            if exposed.shape[0] == 0:
                continue
            a, b = [d for d in range(3) if d != axis]
            corners = []
            for da, db in ((0, 0), (1, 0), (1, 1), (0, 1)):
                c = exposed.clone()
                c[:, axis] += 1.0 if sign > 0 else 0.0
                c[:, a] += da
                c[:, b] += db
                corners.append(c)
            q = exposed.shape[0]
            verts.append(torch.stack(corners, 1).reshape(-1, 3) / r - 0.5)
            i = base + 4 * torch.arange(q).unsqueeze(1)
            faces.append(torch.cat([i + torch.tensor([0, 1, 2]), i + torch.tensor([0, 2, 3])], 0))
            base += 4 * q
    if not verts:
        return torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long)
    return torch.cat(verts).float(), torch.cat(faces)
