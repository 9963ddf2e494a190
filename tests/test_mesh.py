"""Mesh type, clean-up, export and normal renders."""
import json
import math
import os

import numpy as np
import pytest
import torch
import trimesh

from know3d_core.mesh import (
    FORMATS,
    Mesh,
    clean_mesh,
    face_components,
    merge_duplicate_vertices,
    orient_faces,
    remove_floaters,
    remove_unreferenced_vertices,
    render_normals,
    save_mesh,
    y_up_to_z_up,
    z_up_to_y_up,
)


def icosphere(subdivisions=3, radius=0.3, center=(0.0, 0.0, 0.0)):
    tm = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return Mesh(torch.tensor(tm.vertices + np.asarray(center), dtype=torch.float32), torch.tensor(tm.faces))


def concat(*meshes):
    verts, faces, offset = [], [], 0
    for m in meshes:
        verts.append(m.vertices)
        faces.append(m.faces + offset)
        offset += m.num_vertices
    return Mesh(torch.cat(verts), torch.cat(faces))


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


# ----------------------------------------------------------------------------- type
def test_mesh_validates_shapes_and_casts():
    m = Mesh(torch.zeros(3, 3, dtype=torch.float64), torch.tensor([[0, 1, 2]], dtype=torch.int32))
    assert m.vertices.dtype == torch.float32 and m.faces.dtype == torch.int64
    with pytest.raises(ValueError, match="vertices"):
        Mesh(torch.zeros(3, 2), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        Mesh(torch.zeros(3, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="out of range"):
        Mesh(torch.zeros(3, 3), torch.tensor([[0, 1, 3]])).validate()


def test_volume_and_area_of_a_sphere():
    m = icosphere(4, radius=0.3)
    assert m.signed_volume() == pytest.approx(4 / 3 * math.pi * 0.3 ** 3, rel=0.01)
    assert m.area() == pytest.approx(4 * math.pi * 0.3 ** 2, rel=0.01)


# ----------------------------------------------------------------------------- clean-up
def test_merge_duplicate_vertices_rebuilds_a_triangle_soup():
    m = icosphere(2)
    soup = Mesh(m.vertices[m.faces].reshape(-1, 3), torch.arange(m.num_faces * 3).view(-1, 3))
    assert not soup.to_trimesh().is_watertight
    merged = merge_duplicate_vertices(soup)
    assert merged.num_vertices == m.num_vertices and merged.num_faces == m.num_faces
    assert merged.to_trimesh().is_watertight
    # Same triangles as the original (positions compared as sets of rows).
    a = {tuple(sorted(map(tuple, t))) for t in merged.vertices[merged.faces].tolist()}
    b = {tuple(sorted(map(tuple, t))) for t in m.vertices[m.faces].tolist()}
    assert a == b


def test_merge_with_tolerance_and_degenerate_faces_dropped():
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1e-7, 0, 0]])
    f = torch.tensor([[0, 1, 2], [0, 3, 1]])
    out = merge_duplicate_vertices(Mesh(v, f), tolerance=1e-5)
    assert out.num_vertices == 3 and out.num_faces == 1
    assert torch.equal(out.vertices[out.faces[0]], v[:3])


def test_remove_unreferenced_keeps_order():
    v = torch.arange(15, dtype=torch.float32).view(5, 3)
    out = remove_unreferenced_vertices(Mesh(v, torch.tensor([[4, 1, 3]])))
    assert out.vertices.tolist() == v[[1, 3, 4]].tolist() and out.faces.tolist() == [[2, 0, 1]]


def test_remove_floaters():
    big = icosphere(3, 0.3)
    small = icosphere(1, 0.02, center=(0.4, 0.0, 0.0))
    m = concat(small, big)
    labels = face_components(m)
    assert len(torch.unique(labels)) == 2
    out = remove_floaters(m, min_fraction=0.1)
    assert out.num_faces == big.num_faces and out.num_vertices == big.num_vertices
    assert out.vertices.abs().max() <= 0.3 + 1e-6
    assert remove_floaters(m, min_fraction=0.0).num_faces == m.num_faces


def test_orient_faces_repairs_random_flips():
    m = concat(icosphere(3, 0.2, (-0.25, 0, 0)), icosphere(2, 0.15, (0.25, 0, 0)))
    g = torch.Generator().manual_seed(0)
    flip = torch.rand(m.num_faces, generator=g) < 0.5
    flip[0] = True  # the component's first face is flipped too
    scrambled = Mesh(m.vertices, torch.where(flip[:, None], m.faces[:, [0, 2, 1]], m.faces))
    assert not scrambled.to_trimesh().is_winding_consistent
    fixed = orient_faces(scrambled)
    assert torch.equal(fixed.faces, m.faces)  # outward, as the icospheres were
    inside_out = Mesh(m.vertices, m.faces[:, [0, 2, 1]])
    assert torch.equal(orient_faces(inside_out).faces, m.faces)


def test_clean_mesh_pipeline():
    m = icosphere(2)
    extra = torch.cat([m.vertices, torch.tensor([[9.0, 9, 9]])])
    soup = Mesh(extra, m.faces[:, [0, 2, 1]])
    out = clean_mesh(soup)
    assert out.num_vertices == m.num_vertices
    assert out.signed_volume() > 0 and out.to_trimesh().is_watertight


# ----------------------------------------------------------------------------- export
def test_axis_conversion_is_a_rotation_and_invertible():
    v = np.random.default_rng(0).normal(size=(10, 3))
    up = z_up_to_y_up(v)
    assert np.allclose(up[:, 1], v[:, 2]) and np.allclose(up[:, 2], -v[:, 1])
    assert np.allclose(y_up_to_z_up(up), v)
    r = z_up_to_y_up(np.eye(3))
    assert np.isclose(np.linalg.det(r), 1.0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_round_trip_with_metadata(tmp_path, fmt):
    m = orient_faces(icosphere(2))
    meta = {"seed": 7, "prompt": "a chair"}
    path = save_mesh(m, str(tmp_path / f"out.{fmt}"), metadata=meta)
    assert os.listdir(tmp_path) == [f"out.{fmt}"]  # no temp file left behind
    loaded = trimesh.load(path, force="mesh", process=False)
    y_up = fmt != "stl"
    expected = z_up_to_y_up(m.vertices.double().numpy()) if y_up else m.vertices.double().numpy()
    if fmt == "stl":  # STL stores triangles, not shared vertices
        got = np.asarray(loaded.triangles).reshape(-1, 3)
        assert np.allclose(got, expected[m.faces.numpy()].reshape(-1, 3), atol=1e-6)
    else:
        assert np.allclose(loaded.vertices, expected, atol=1e-6)
        assert np.array_equal(loaded.faces, m.faces.numpy())
    assert loaded.volume > 0  # the axis change keeps the outward winding
    raw = read_bytes(path)
    if fmt == "glb":
        scene = trimesh.load(path, process=False)
        assert scene.metadata["seed"] == 7 and scene.metadata["prompt"] == "a chair"
        assert scene.metadata["up_axis"] == "Y"
    else:
        assert b'"prompt":"a chair"' in raw and b'"seed":7' in raw


def test_export_replaces_atomically_and_rejects_unknown_format(tmp_path):
    m = icosphere(1)
    path = str(tmp_path / "mesh.obj")
    save_mesh(m, path)
    first = read_bytes(path)
    save_mesh(icosphere(2), path)
    assert read_bytes(path) != first
    with pytest.raises(ValueError, match="unknown format"):
        save_mesh(m, str(tmp_path / "mesh.fbx"))
    assert sorted(os.listdir(tmp_path)) == ["mesh.obj"]


def test_export_writes_json_safe_metadata(tmp_path):
    path = save_mesh(icosphere(1), str(tmp_path / "m.ply"), metadata={"path": tmp_path})
    header = read_bytes(path).split(b"end_header")[0].decode()
    line = [ln for ln in header.splitlines() if ln.startswith("comment know3d ")][0]
    assert json.loads(line[len("comment know3d "):])["path"] == str(tmp_path)


# ----------------------------------------------------------------------------- renders
def test_render_sphere_front_centre_faces_the_camera():
    m = icosphere(4, radius=0.3)
    imgs, mask = render_normals(m, size=64, extent=0.5, background=(0.25, 0.0, 0.0), return_mask=True)
    assert imgs.shape == (4, 64, 64, 3) and imgs.dtype == torch.float32
    assert imgs.min() >= 0 and imgs.max() <= 1
    centre = imgs[0, 31:33, 31:33].reshape(-1, 3)
    assert torch.allclose(centre, torch.tensor([0.5, 0.5, 1.0]).expand_as(centre), atol=0.03)
    # Background: known colour outside the disc; coverage ~ pi r^2 of the view.
    assert torch.equal(imgs[:, 0, 0], torch.tensor([0.25, 0.0, 0.0]).expand(4, 3))
    assert mask[0].float().mean().item() == pytest.approx(math.pi * 0.3**2, rel=0.05)
    # Right side of the front image is +x: normals there point right (red > 0.5).
    # Pixel 48 is at x = 48.5/64 - 0.5 = 0.258 (normal x = 0.86, red = 0.93); pixel 15 mirrors it.
    assert imgs[0, 32, 48, 0] > 0.85 and imgs[0, 32, 15, 0] < 0.15
    # Top of the image is +z: normals there point up (green > 0.5).
    assert imgs[0, 15, 32, 1] > 0.85 and imgs[0, 48, 32, 1] < 0.15


def test_back_view_mirrors_front_for_a_y_symmetric_shape():
    # Asymmetric in x and z, mirror-symmetric in y: back = front flipped left-right, x normal negated.
    m = concat(icosphere(3, 0.2, (0.15, 0.0, 0.1)), icosphere(3, 0.1, (-0.25, 0.0, -0.2)))
    imgs, mask = render_normals(m, views=("front", "back"), size=48, return_mask=True)
    front, back = imgs[0], imgs[1]
    assert not torch.equal(mask[0], mask[0].flip(1))  # really asymmetric
    assert torch.equal(mask[1], mask[0].flip(1))
    mirrored = front.flip(1).clone()
    mirrored[..., 0] = torch.where(mask[1], 1 - mirrored[..., 0], mirrored[..., 0])
    assert torch.allclose(back, mirrored, atol=1e-5)


def test_side_views_see_the_side_and_ignore_winding():
    m = icosphere(3, 0.3)
    left, right = render_normals(m, views=("left", "right"), size=32)
    flipped = render_normals(Mesh(m.vertices, m.faces[:, [0, 2, 1]]), views=("left", "right"), size=32)
    assert torch.allclose(torch.stack([left, right]), flipped)
    with pytest.raises(ValueError, match="unknown view"):
        render_normals(m, views=("top",))


def test_z_buffer_keeps_the_nearest_surface():
    # Two squares facing the front camera; the nearer one is tilted so its colour differs.
    near = torch.tensor([[-0.3, -0.2, -0.3], [0.3, -0.1, -0.3], [0.3, -0.1, 0.3], [-0.3, -0.2, 0.3]])
    far = torch.tensor([[-0.4, 0.3, -0.4], [0.4, 0.3, -0.4], [0.4, 0.3, 0.4], [-0.4, 0.3, 0.4]])
    quad = torch.tensor([[0, 1, 2], [0, 2, 3]])
    for order in (0, 1):
        parts = [(near, quad), (far, quad + 4)] if order == 0 else [(far, quad), (near, quad + 4)]
        m = Mesh(torch.cat([parts[0][0], parts[1][0]]), torch.cat([parts[0][1], parts[1][1]]))
        img = render_normals(m, views=("front",), size=20)[0]
        # near square: plane y = x/6 - 0.15, camera-facing normal (1/6, -1, 0)/|.| -> red 0.58
        assert img[10, 10, 0] == pytest.approx(0.5 + 0.5 / math.sqrt(37), abs=1e-4)
        # pixel 3 sits at x = -z = 3.5/20 * 1.1 - 0.55 = -0.3575: inside the far square only
        assert torch.allclose(img[3, 3], torch.tensor([0.5, 0.5, 1.0]))
