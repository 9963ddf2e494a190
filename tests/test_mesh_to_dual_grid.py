"""Mesh -> flexible dual grid (know3d_core.trellis2.mesh_to_dual_grid).

(a) analytic meshes round-trip through our extraction; (b) agreement with our SDF encoder up to the
voxels the triangulation moves across; (c) parity with the reference's compiled converter on
goldens (tests/data/golden_dual_grid/README.md says how they were made).
"""
import os

import pytest
import torch
from safetensors.torch import load_file

from know3d_core.mesh import Mesh, clean_mesh
from know3d_core.mesh.primitives import box, icosphere, uv_torus
from know3d_core.trellis2.mesh_to_dual_grid import (
    mesh_to_flexible_dual_grid,
    occupancy_from_coords,
    voxel_quadrics,
)
from know3d_core.trellis2.ovoxel import (
    EDGE_NEIGHBOR_OFFSETS,
    flexible_dual_grid_to_mesh,
    sdf_to_flexible_dual_grid,
    sphere_sdf,
    torus_sdf,
)

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_dual_grid", "reference_dual_grids.safetensors")
GOLDEN_CASES = ["sphere", "torus", "box", "plate", "open_cap"]
R = 64


def box_sdf(size, center):
    half = torch.tensor(size, dtype=torch.float64) / 2
    c = torch.tensor(center, dtype=torch.float64)

    def sdf(p):
        q = (p - c).abs() - half
        return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)

    return sdf


SHAPES = {
    "sphere": (lambda: icosphere(4, 0.35, (0.013, -0.021, 0.007)), sphere_sdf((0.013, -0.021, 0.007), 0.35)),
    "torus": (lambda: uv_torus(0.3, 0.12, 96, 48, (0.004, 0.009, -0.011)), torus_sdf((0.004, 0.009, -0.011), 0.3, 0.12)),
    "box": (lambda: box((0.5, 0.4, 0.3), (0.011, 0.003, -0.02)), box_sdf((0.5, 0.4, 0.3), (0.011, 0.003, -0.02))),
    "thin_plate": (lambda: box((0.6, 0.5, 0.05), (0.0, 0.01, 0.007)), box_sdf((0.6, 0.5, 0.05), (0.0, 0.01, 0.007))),
}


@pytest.fixture(scope="module")
def grids():
    """name -> (input mesh, our dual grid at R)."""
    out = {}
    for name, (make, _) in SHAPES.items():
        mesh = make()
        out[name] = (mesh, mesh_to_flexible_dual_grid(mesh.vertices, mesh.faces, R))
    return out


# ----------------------------------------------------------------------------- (a) round trip
@pytest.mark.parametrize("name", list(SHAPES))
def test_round_trip_keeps_volume_area_and_stays_within_a_voxel(grids, name):
    mesh, grid = grids[name]
    sdf = SHAPES[name][1]
    assert grid.dual_vertices.min() >= 0 and grid.dual_vertices.max() <= 1  # minimiser inside its voxel
    verts, faces = flexible_dual_grid_to_mesh(grid.coords, grid.dual_vertices, grid.intersected, None, R)
    out = clean_mesh(Mesh(verts, faces))
    assert abs(out.signed_volume() / mesh.signed_volume() - 1) <= 0.01
    assert abs(out.area() / mesh.area() - 1) <= 0.01
    # Hausdorff, both ways, in voxels: output vertices to the analytic surface (which the input
    # mesh approximates to < 0.04 voxel); input vertices and face centres to the nearest output
    # vertex (an upper bound of their distance to the output surface).
    assert sdf(out.vertices.double()).abs().max() * R <= 1.0
    samples = torch.cat([mesh.vertices, mesh.vertices[mesh.faces].mean(1)]).double()
    assert torch.cdist(samples, out.vertices.double()).min(1).values.max() * R <= 1.0


# ----------------------------------------------------------------------------- (b) vs SDF encoder
def _deviation(mesh: Mesh, sdf) -> float:
    """Largest |sdf| over a barycentric grid on every face: how far the triangulation moves the
    surface from the analytic one."""
    w = torch.tensor([(i / 8, j / 8, 1 - i / 8 - j / 8) for i in range(9) for j in range(9 - i)], dtype=torch.float64)
    samples = torch.einsum("kc,fcd->fkd", w, mesh.vertices.double()[mesh.faces]).reshape(-1, 3)
    return sdf(samples).abs().max().item()


def _voxels_near_ambiguous_edges(sdf, delta: float) -> set:
    """The four voxels around every grid edge with an endpoint within ``delta`` of the surface."""
    g = torch.arange(R + 1)
    corners = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1)
    near = sdf(corners.double() / R - 0.5).abs() <= delta
    out = set()
    for a in range(3):
        for idx in torch.argwhere(near.narrow(a, 0, R) | near.narrow(a, 1, R)).tolist():
            voxel = [idx[b] - 1 if b != a else idx[b] for b in range(3)]
            out.update(tuple(v + o for v, o in zip(voxel, off)) for off in EDGE_NEIGHBOR_OFFSETS[a])
    return out


@pytest.mark.parametrize("name", list(SHAPES))
def test_same_voxels_as_the_sdf_encoder_up_to_the_triangulation(grids, name):
    """A grid edge can change state only if the triangulated and the analytic surface disagree on
    it, i.e. one of its endpoints lies within the triangulation's deviation of the surface. Measured:
    1.97% (sphere) and 2.02% (torus) of the voxels differ; none for the box and the plate (flat
    faces: the triangulation is exact)."""
    mesh, grid = grids[name]
    sdf = SHAPES[name][1]
    coords, _, flags = sdf_to_flexible_dual_grid(sdf, R)
    ours, theirs = set(map(tuple, grid.coords.tolist())), set(map(tuple, coords.tolist()))
    differ = ours ^ theirs
    delta = _deviation(mesh, sdf)
    if delta < 1e-6:
        assert not differ
        assert torch.equal(grid.coords, coords) and torch.equal(grid.intersected, flags)
        return
    assert differ <= _voxels_near_ambiguous_edges(sdf, delta)
    assert len(differ) / len(ours | theirs) < 0.03


# ----------------------------------------------------------------------------- (c) reference parity
@pytest.fixture(scope="module")
def golden():
    return load_file(GOLDEN)


def _solve_error_bound(q: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """Forward-error bound of a backward-stable float32 solve of ``A p = b`` (``A = Q[:3,:3]``,
    ``b = -Q[:3,3]``): ``u ||A^-1|| (||A|| ||p|| + ||b||)`` with ``u = 2^-24``, in grid units."""
    a, b = q[:, :3, :3], -q[:, :3, 3]
    return 2.0**-24 * torch.linalg.matrix_norm(torch.linalg.inv(a), 2) * (
        torch.linalg.matrix_norm(a, 2) * point.norm(dim=1) + b.norm(dim=1))


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_matches_the_reference_converter(golden, name):
    """Same voxels and flags bit for bit. Dual vertices: the reference accumulates and solves its
    quadrics in float32 (Eigen QR), so it is off the exact minimiser by its rounding: permuting the
    faces alone moves its vertices by up to 2.4e-3 voxel on the sphere, 0.22 on the torus
    (``dual_permuted``). We solve in float64, so each vertex must be within 4x the float32 solve's
    error bound of the reference's -- or, where the minimiser sits on the voxel's boundary, the two
    candidates' quadric values must be closer than the reference's float32 evaluation can tell
    (its choice among them is then rounding)."""
    g = {k.split(".", 1)[1]: v for k, v in golden.items() if k.startswith(name + ".")}
    res = int(g["resolution"])
    ours = mesh_to_flexible_dual_grid(g["vertices"], g["faces"], res)
    assert torch.equal(ours.coords, g["coords"])
    assert torch.equal(ours.intersected, g["intersected"].bool())

    coords, q = ours.coords.double(), voxel_quadrics(g["vertices"], g["faces"], res)[2]
    point = (coords + ours.dual_vertices.double()) / res
    err = (g["dual"].double() - ours.dual_vertices.double()).abs().max(dim=1).values
    within_solve = err <= 4 * _solve_error_bound(q, point) * res

    def quadric(dual):
        h = torch.cat([(coords + dual.double()) / res, torch.ones_like(coords[:, :1])], 1)
        return torch.einsum("ni,nij,nj->n", h, q, h)

    h = torch.cat([point, torch.ones_like(point[:, :1])], 1)
    f32_noise = 2.0**-24 * torch.einsum("ni,nij,nj->n", h.abs(), q.abs(), h.abs())
    tie = (quadric(g["dual"]) - quadric(ours.dual_vertices)).abs() <= f32_noise
    assert (within_solve | tie).all()
    assert (~within_solve).float().mean() <= 2e-3  # decision flips are rare (measured: <= 9 of 8306)


def test_reference_itself_spreads_by_its_rounding(golden):
    """The spread that motivates the tolerance above: same mesh, faces reordered."""
    spread = {n: (golden[n + ".dual"] - golden[n + ".dual_permuted"]).abs().max().item() for n in GOLDEN_CASES}
    assert spread["sphere"] > 1e-3 and spread["torus"] > 1e-1  # far above 1e-4 of a voxel


# ----------------------------------------------------------------------------- details
def test_empty_and_tiny_meshes():
    empty = mesh_to_flexible_dual_grid(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long), 16)
    assert empty.num_voxels == 0 and empty.dual_vertices.shape == (0, 3)
    # one triangle crossing a single z edge: the 4 voxels around it, flag on the min-min one
    v = torch.tensor([[-0.2, -0.2, 0.01], [0.2, -0.2, 0.01], [-0.2, 0.2, 0.01]]) * 0.2
    grid = mesh_to_flexible_dual_grid(v, torch.tensor([[0, 1, 2]]), 4)
    assert grid.coords.tolist() == [[1, 1, 2], [1, 2, 2], [2, 1, 2], [2, 2, 2]]
    assert grid.intersected.tolist() == [[False, False, True]] + [[False] * 3] * 3


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="vertices must be"):
        mesh_to_flexible_dual_grid(torch.zeros(3, 2), torch.zeros(1, 3, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="NaN"):
        mesh_to_flexible_dual_grid(torch.full((3, 3), float("nan")), torch.tensor([[0, 1, 2]]), 8)


def test_face_chunks_do_not_change_the_result():
    mesh = icosphere(3, 0.3)
    a = mesh_to_flexible_dual_grid(mesh.vertices, mesh.faces, 32)
    b = mesh_to_flexible_dual_grid(mesh.vertices, mesh.faces, 32, chunk=97)
    assert torch.equal(a.coords, b.coords) and torch.equal(a.dual_vertices, b.dual_vertices)


def test_occupancy_is_the_coarse_parent_set():
    coords = torch.tensor([[0, 0, 0], [15, 15, 15], [16, 0, 31], [1023, 512, 17]])
    occ = occupancy_from_coords(coords, 1024, 64)
    assert occ.shape == (64, 64, 64) and occ.dtype == torch.bool
    assert torch.argwhere(occ).tolist() == [[0, 0, 0], [1, 0, 1], [63, 32, 1]]
    with pytest.raises(ValueError, match="multiple"):
        occupancy_from_coords(coords, 100, 64)
