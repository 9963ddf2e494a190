"""Normal-map renders of a mesh from four sides, with a small pure-torch z-buffer rasteriser.

Cameras are orthographic, looking at the origin of Z-up model space, image up = +Z:

==========  ===============  ==================  ============
view        camera at        image right          looks along
==========  ===============  ==================  ============
front       -Y               +X                  +Y
back        +Y               -X                  -Y
left        -X               -Y                  +X
right       +X               +Y                  -X
==========  ===============  ==================  ============

("left" is the camera on the left of the front camera.) Pixels show camera-space face normals
(x right, y up, z toward the camera) as ``0.5 * n + 0.5``. Faces are shaded two-sided (normals
flipped toward the camera), so the render does not depend on winding.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

from .types import Mesh

__all__ = ["VIEWS", "camera_basis", "rasterize", "render_normals"]

# view -> (right, up, toward-camera), world coordinates.
VIEWS = {
    "front": ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, -1.0, 0.0)),
    "back": ((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)),
    "left": ((0.0, -1.0, 0.0), (0.0, 0.0, 1.0), (-1.0, 0.0, 0.0)),
    "right": ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)),
}


def camera_basis(view: str, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[3, 3]`` rows = (right, up, toward-camera) of ``view``."""
    if view not in VIEWS:
        raise ValueError(f"render_normals: unknown view {view!r}; choose from {', '.join(VIEWS)}")
    return torch.tensor(VIEWS[view], device=device, dtype=dtype)


def _edge(ax, ay, bx, by, px, py):
    return (bx - ax) * (py - ay) - (by - ay) * (px - ax)


def rasterize(
    screen: torch.Tensor, faces: torch.Tensor, height: int, width: int, max_pairs: int = 1 << 23
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Z-buffer rasterisation of triangles.

    Args:
        screen: ``[V, 3]`` vertex (column u, row v, depth) in pixel units; pixel (i, j) has centre
            (u=j, v=i); larger depth = closer.
        faces: ``[F, 3]`` int64.
    Returns:
        face index ``[H, W]`` int64 (-1 = background) and depth ``[H, W]`` (-inf = background).
    """
    device = screen.device
    depth_buf = torch.full((height * width,), float("-inf"), device=device, dtype=screen.dtype)
    face_buf = torch.full((height * width,), -1, dtype=torch.long, device=device)
    if faces.shape[0] == 0:
        return face_buf.view(height, width), depth_buf.view(height, width)
    tri = screen[faces]  # [F, 3, 3]
    u0 = torch.ceil(tri[..., 0].amin(1)).clamp(0, width - 1).long()
    u1 = torch.floor(tri[..., 0].amax(1)).clamp(-1, width - 1).long()
    v0 = torch.ceil(tri[..., 1].amin(1)).clamp(0, height - 1).long()
    v1 = torch.floor(tri[..., 1].amax(1)).clamp(-1, height - 1).long()
    nu = (u1 - u0 + 1).clamp(min=0)
    nv = (v1 - v0 + 1).clamp(min=0)
    pairs = nu * nv
    cum = torch.cumsum(pairs, 0)
    start = 0
    total_faces = faces.shape[0]
    while start < total_faces:
        # Largest face range whose pair count fits in max_pairs (at least one face).
        base = int(cum[start - 1]) if start else 0
        end = int(torch.searchsorted(cum, torch.tensor(base + max_pairs, device=device), right=True))
        end = max(end, start + 1)
        _rasterize_chunk(tri, u0, v0, nu, pairs, start, end, width, depth_buf, face_buf)
        start = end
    return face_buf.view(height, width), depth_buf.view(height, width)


def _rasterize_chunk(tri, u0, v0, nu, pairs, start, end, width, depth_buf, face_buf):
    device = tri.device
    counts = pairs[start:end]
    n = int(counts.sum())
    if n == 0:
        return
    face = torch.arange(start, end, device=device).repeat_interleave(counts)
    offset = torch.arange(n, device=device) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    px = u0[face] + offset % nu[face]
    py = v0[face] + offset // nu[face]
    t = tri[face]
    fx, fy = px.to(t.dtype), py.to(t.dtype)
    ax, ay, bx, by, cx, cy = t[:, 0, 0], t[:, 0, 1], t[:, 1, 0], t[:, 1, 1], t[:, 2, 0], t[:, 2, 1]
    area = _edge(ax, ay, bx, by, cx, cy)
    w0 = _edge(bx, by, cx, cy, fx, fy)
    w1 = _edge(cx, cy, ax, ay, fx, fy)
    w2 = _edge(ax, ay, bx, by, fx, fy)
    sign = torch.sign(area)
    inside = (area != 0) & (w0 * sign >= 0) & (w1 * sign >= 0) & (w2 * sign >= 0)
    face, px, py, t = face[inside], px[inside], py[inside], t[inside]
    w = torch.stack([w0[inside], w1[inside], w2[inside]], dim=1) / area[inside].unsqueeze(1)
    depth = (w * t[:, :, 2]).sum(1)
    pixel = py * width + px
    best = torch.full_like(depth_buf, float("-inf")).scatter_reduce_(0, pixel, depth, reduce="amax")
    winner = depth == best[pixel]
    chunk_face = torch.full_like(face_buf, -1).scatter_reduce_(0, pixel[winner], face[winner], reduce="amax")
    closer = best > depth_buf
    depth_buf[closer] = best[closer]
    face_buf[closer] = chunk_face[closer]


def render_normals(
    mesh: Mesh,
    views: Sequence[str] = ("front", "back", "left", "right"),
    size: Union[int, Tuple[int, int]] = 512,
    extent: float = 0.55,
    background: Sequence[float] = (0.0, 0.0, 0.0),
    return_mask: bool = False,
):
    """Normal maps of ``mesh`` from ``views``.

    Args:
        size: ``H`` (square) or ``(H, W)``.
        extent: half-width of the orthographic view in model units (0.5 frames the AABB exactly).
        background: RGB in [0, 1] of empty pixels (black cannot be a normal colour: blue >= 0.5).
    Returns:
        images ``[len(views), H, W, 3]`` float32 in [0, 1] on the mesh's device; with
        ``return_mask`` also the coverage mask ``[len(views), H, W]`` bool.
    """
    height, width = (size, size) if isinstance(size, int) else size
    device = mesh.device
    vertices = mesh.vertices.float()
    normals = mesh.face_normals()
    bg = torch.tensor(background, dtype=torch.float32, device=device)
    images, masks = [], []
    scale = torch.tensor([width / (2 * extent), height / (2 * extent)], device=device)
    for view in views:
        basis = camera_basis(view, device)
        cam = vertices @ basis.T  # [V, 3] (right, up, toward)
        screen = torch.stack(
            [
                (cam[:, 0] + extent) * scale[0] - 0.5,
                (extent - cam[:, 1]) * scale[1] - 0.5,
                cam[:, 2],
            ],
            dim=1,
        )
        face_id, _ = rasterize(screen, mesh.faces, height, width)
        n_cam = normals @ basis.T
        n_cam = torch.where(n_cam[:, 2:3] < 0, -n_cam, n_cam)
        mask = face_id >= 0
        color = (n_cam[face_id.clamp(min=0)] * 0.5 + 0.5).clamp(0, 1)
        images.append(torch.where(mask.unsqueeze(-1), color, bg))
        masks.append(mask)
    images = torch.stack(images)
    return (images, torch.stack(masks)) if return_mask else images
