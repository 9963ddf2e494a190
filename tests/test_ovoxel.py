"""O-Voxel (flexible dual grid): extraction rules, our analytic encoder, sphere/torus round trips,
and parity of the extraction with the reference on the golden decoder head."""
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from know3d_core.mesh import Mesh, clean_mesh
from know3d_core.trellis2.ovoxel import (
    EDGE_NEIGHBOR_OFFSETS,
    flexible_dual_grid_to_mesh,
    quads_from_flags,
    sdf_to_flexible_dual_grid,
    sphere_sdf,
    torus_sdf,
    triangulate_quads,
)
from know3d_core.trellis2.shape_decoder import decode_head

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_decoders")


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_offsets_are_the_four_voxels_around_the_max_corner_edge(axis):
    offs = torch.tensor(EDGE_NEIGHBOR_OFFSETS[axis])
    assert (offs[:, axis] == 0).all()  # all four share the edge's extent along the axis
    others = [a for a in range(3) if a != axis]
    assert {tuple(o[others].tolist()) for o in offs} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for k in range(4):  # consecutive corners are edge-adjacent: the quad is a cycle
        assert int((offs[k] - offs[(k + 1) % 4]).abs().sum()) == 1


def test_single_quad_vertices_and_faces():
    c0 = torch.tensor([3, 5, 7])
    coords = torch.stack([c0 + torch.tensor(o) for o in EDGE_NEIGHBOR_OFFSETS[0]])
    coords = torch.cat([coords, torch.tensor([[9, 9, 9]])]).int()  # an unreferenced voxel
    perm = torch.tensor([4, 2, 0, 3, 1])
    coords = coords[perm]
    dual = torch.rand(5, 3)
    inter = torch.zeros(5, 3, dtype=torch.bool)
    inter[2, 0] = True  # row 2 is c0
    verts, faces = flexible_dual_grid_to_mesh(coords, dual, inter, None, 16)
    torch.testing.assert_close(verts, (coords.float() + dual) / 16 - 0.5)
    quad = quads_from_flags(coords, inter, 16)
    inv = torch.argsort(perm)
    assert quad.tolist() == [inv[:4].tolist()]
    assert faces.shape == (2, 3)
    assert set(faces.reshape(-1).tolist()) == set(inv[:4].tolist())


def test_quad_with_a_missing_voxel_is_dropped():
    c0 = torch.tensor([1, 1, 1])
    coords = torch.stack([c0 + torch.tensor(o) for o in EDGE_NEIGHBOR_OFFSETS[2][:3]]).int()
    inter = torch.zeros(3, 3, dtype=torch.bool)
    inter[0] = True
    _, faces = flexible_dual_grid_to_mesh(coords, torch.rand(3, 3), inter, None, 4)
    assert faces.shape == (0, 3)


def test_split_weights_choose_the_diagonal():
    quads = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    w = torch.tensor([2.0, 1.0, 2.0, 1.0])
    verts = torch.rand(4, 3)
    tris = triangulate_quads(quads[:1], verts, w)
    assert tris.tolist() == [[0, 1, 2], [0, 2, 3]]  # w0*w2 > w1*w3: diagonal 0-2
    tris = triangulate_quads(quads[:1], verts, torch.tensor([1.0, 2.0, 1.0, 2.0]))
    assert tris.tolist() == [[0, 1, 3], [3, 1, 2]]


def test_without_weights_the_flatter_split_wins():
    # Unit square with one corner lifted: normals of (0,1,2)/(0,2,3) meet at cos = 1/(1+h^2),
    # of (0,1,3)/(1,2,3) at 1/sqrt(1+2h^2) (larger), so the diagonal avoiding the lifted corner wins.
    quad = torch.tensor([[0, 1, 2, 3]])
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0.5], [0, 1, 0]])  # corner 2 lifted
    assert triangulate_quads(quad, verts, None).tolist() == [[0, 1, 3], [3, 1, 2]]
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0.5], [1, 1, 0], [0, 1, 0]])  # corner 1 lifted
    assert triangulate_quads(quad, verts, None).tolist() == [[0, 1, 2], [0, 2, 3]]


def test_encoder_flags_match_dense_sign_changes():
    r = 16
    sdf = torus_sdf(major=0.25, minor=0.1)
    coords, dual, inter = sdf_to_flexible_dual_grid(sdf, r)
    # Brute force over all grid corners: edge along a from corner g to g + e_a crosses the surface.
    g = torch.arange(r + 1)
    corners = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1)
    inside = sdf(corners.double() / r - 0.5) < 0
    expected_flags, expected_active = set(), set()
    for a in range(3):
        lo = inside.narrow(a, 0, r)
        hi = inside.narrow(a, 1, r)
        for idx in torch.argwhere(lo != hi).tolist():
            if any(idx[b] in (0, r) for b in range(3) if b != a):
                continue  # lines on the AABB boundary are not tested (official encoder)
            voxel = [idx[b] - 1 if b != a else idx[b] for b in range(3)]
            expected_flags.add((tuple(voxel), a))
            for o in EDGE_NEIGHBOR_OFFSETS[a]:
                expected_active.add(tuple(v + d for v, d in zip(voxel, o)))
    got_flags = {(tuple(coords[i].tolist()), a) for i, a in torch.argwhere(inter).tolist()}
    assert got_flags == expected_flags
    assert {tuple(c) for c in coords.tolist()} == expected_active
    assert coords.tolist() == sorted(coords.tolist())
    assert dual.min() >= 0 and dual.max() <= 1


@pytest.mark.parametrize(
    "name,sdf,volume",
    [
        ("sphere", sphere_sdf(radius=0.35), 4 / 3 * math.pi * 0.35**3),
        ("torus", torus_sdf(major=0.3, minor=0.12), 2 * math.pi**2 * 0.3 * 0.12**2),
    ],
)
def test_round_trip_keeps_volume_and_is_watertight(name, sdf, volume):
    r = 64
    coords, dual, inter = sdf_to_flexible_dual_grid(sdf, r)
    verts, faces = flexible_dual_grid_to_mesh(coords, dual, inter, None, r)
    mesh = clean_mesh(Mesh(verts, faces))
    assert abs(mesh.signed_volume() - volume) / volume <= 0.01
    # Closed and consistently wound: every directed edge occurs once and so does its reverse.
    f, nv = mesh.faces, mesh.num_vertices
    a = torch.cat([f[:, 0], f[:, 1], f[:, 2]])
    b = torch.cat([f[:, 1], f[:, 2], f[:, 0]])
    keys = a * nv + b
    assert torch.unique(keys).numel() == keys.numel()
    assert torch.isin(b * nv + a, keys).all()
    euler = nv - keys.numel() // 2 + mesh.num_faces
    assert euler == (2 if name == "sphere" else 0)
    # Vertices lie on the surface (within a tenth of a voxel).
    assert sdf(mesh.vertices.double()).abs().max() * r <= 0.1


def test_raw_winding_is_per_axis_so_orientation_needs_cleanup():
    coords, dual, inter = sdf_to_flexible_dual_grid(sphere_sdf(radius=0.3), 32)
    verts, faces = flexible_dual_grid_to_mesh(coords, dual, inter, None, 32)
    raw = Mesh(verts, faces)
    n = raw.face_normals()
    outward = torch.nn.functional.normalize(raw.vertices[raw.faces].mean(1), dim=-1)
    agree = (n * outward).sum(-1) > 0
    assert 0.2 < agree.float().mean() < 0.8  # both orientations occur
    fixed = clean_mesh(raw)
    n = fixed.face_normals()
    outward = torch.nn.functional.normalize(fixed.vertices[fixed.faces].mean(1), dim=-1)
    assert ((n * outward).sum(-1) > 0).all()


def test_extraction_matches_reference_on_golden_head():
    io = load_file(os.path.join(GOLDEN, "shape_decoder_io.safetensors"))
    dual, inter, split = decode_head(io["out_feats"], 0.5)
    coords = io["out_coords"]
    for b in range(2):
        rows = coords[:, 0] == b
        verts, faces = flexible_dual_grid_to_mesh(coords[rows, 1:], dual[rows], inter[rows], split[rows], 128)
        assert torch.equal(faces, io[f"mesh_faces_{b}"])
        torch.testing.assert_close(verts, io[f"mesh_vertices_{b}"], rtol=0, atol=1e-6)
