"""Save Mesh and Render Normals nodes on real meshes and real files (no ComfyUI needed)."""
import json
import os
import struct

import numpy as np
import pytest
import torch
import trimesh

from _nodes_helpers import icosphere, submodule

host = submodule("nodes._host")
mesh_nodes = submodule("nodes.mesh")
outputs = submodule("know3d_core.outputs")


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    d = tmp_path / "output"
    d.mkdir()
    monkeypatch.setattr(host, "output_directory", lambda: str(d))
    return d


def core_mesh(items, metadata=None):
    return host.make_mesh([v for v, _ in items], [f for _, f in items], metadata)


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def load(path, fmt):
    m = trimesh.load(path, file_type=fmt, force="mesh", process=False)
    return np.asarray(m.vertices), np.asarray(m.faces)


@pytest.mark.parametrize("fmt", ["glb", "obj", "ply", "stl"])
def test_save_mesh_writes_loadable_file_with_counter_and_metadata(out_dir, fmt):
    v, f = icosphere()
    mesh = core_mesh([(v, f)], {"seed": 1234, "description": "three vertical slats"})
    v_before = mesh.vertices.clone()
    node = mesh_nodes.Know3DSaveMesh
    with_prompt = node.PREPARE_CLASS_CLONE({"hidden_inputs": {"PROMPT": {"1": {"class_type": "X"}}}})
    res1 = with_prompt.execute(mesh, "know3d/chair", fmt, remove_floaters=False)
    res2 = node.execute(mesh, "know3d/chair", fmt, remove_floaters=False)
    assert torch.equal(mesh.vertices, v_before)  # input not mutated
    assert res1.result == (f"know3d/chair_00001_.{fmt}",)
    assert res2.result == (f"know3d/chair_00002_.{fmt}",)
    assert res1.ui["3d"] == [{"filename": f"chair_00001_.{fmt}", "subfolder": "know3d", "type": "output"}]
    assert all_files(out_dir) == [f"know3d/chair_00001_.{fmt}", f"know3d/chair_00002_.{fmt}"]

    path = out_dir / "know3d" / f"chair_00001_.{fmt}"
    verts, faces = load(str(path), fmt)
    assert faces.shape == tuple(f.shape)
    # Core MESH is Y-up; GLB/OBJ/PLY are written Y-up, STL Z-up: (x, y, z)_Y-up -> (x, -z, y).
    expected = v.double().numpy()
    if fmt == "stl":
        expected = np.stack([expected[:, 0], -expected[:, 2], expected[:, 1]], 1)
        # STL stores unindexed triangles: compare the triangle corner positions.
        np.testing.assert_allclose(np.sort(verts[faces].reshape(-1, 3), 0),
                                   np.sort(expected[f.numpy()].reshape(-1, 3), 0), atol=1e-6)
    else:
        np.testing.assert_allclose(verts, expected, atol=1e-6)
    raw = path.read_bytes()
    if fmt == "glb":
        scene = trimesh.load(str(path), file_type="glb")
        assert scene.metadata["know3d"]["seed"] == 1234
        assert json.loads(scene.metadata["prompt"]) == {"1": {"class_type": "X"}}
    elif fmt == "stl":
        assert raw[:80].startswith(b"know3d ") and b"1234" in raw[:80]
    else:
        assert b"three vertical slats" in raw and b"class_type" in raw


def test_save_mesh_removes_floaters_and_reduces_faces(out_dir):
    v, f = icosphere(subdivisions=3)
    tv, tf = icosphere(subdivisions=0, radius=0.01, center=(0.45, 0.45, 0.45))
    verts = torch.cat([v, tv])
    faces = torch.cat([f, tf + v.shape[0]])
    mesh = core_mesh([(verts, faces)])
    node = mesh_nodes.Know3DSaveMesh
    kept = node.execute(mesh, "a", "ply", remove_floaters=True, floater_fraction=0.05).result[0]
    _, faces_kept = load(str(out_dir / kept), "ply")
    assert faces_kept.shape[0] == f.shape[0]
    both = node.execute(mesh, "b", "ply", remove_floaters=False).result[0]
    assert load(str(out_dir / both), "ply")[1].shape[0] == faces.shape[0]
    small = node.execute(mesh, "c", "ply", remove_floaters=True, floater_fraction=0.05, target_faces=200).result[0]
    assert 0 < load(str(out_dir / small), "ply")[1].shape[0] <= 200


def test_save_mesh_ragged_batch_writes_one_file_per_item(out_dir):
    a, b = icosphere(1), icosphere(2)
    mesh = core_mesh([a, b])
    assert mesh.vertex_counts is not None
    res = mesh_nodes.Know3DSaveMesh.execute(mesh, "batch", "obj", remove_floaters=False)
    names = [r["filename"] for r in res.ui["3d"]]
    assert names == ["batch_00001_.obj", "batch_00002_.obj"]
    assert load(str(out_dir / names[0]), "obj")[1].shape[0] == a[1].shape[0]
    assert load(str(out_dir / names[1]), "obj")[1].shape[0] == b[1].shape[0]


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/../../escape", "..", "sub/", "", "C:evil"])
def test_save_mesh_refuses_unsafe_names_and_writes_nothing(out_dir, name):
    mesh = core_mesh([icosphere(1)])
    before = all_files(out_dir.parent)
    with pytest.raises(outputs.UnsafeSaveName):
        mesh_nodes.Know3DSaveMesh.execute(mesh, name, "glb")
    assert all_files(out_dir.parent) == before


def test_save_mesh_bad_mesh_leaves_no_file(out_dir):
    v, f = icosphere(1)
    good = (v, f)
    bad = (v.clone().index_fill_(0, torch.tensor([0]), float("nan")), f)
    with pytest.raises(ValueError, match="NaN"):
        mesh_nodes.Know3DSaveMesh.execute(core_mesh([good, bad]), "x", "glb")
    assert all_files(out_dir) == []


def test_save_mesh_symlink_out_of_output_is_refused(out_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, out_dir / "link")
    with pytest.raises(outputs.UnsafeSaveName):
        mesh_nodes.Know3DSaveMesh.execute(core_mesh([icosphere(1)]), "link/x", "glb")
    assert all_files(outside) == []


def rot180_about_up(v):
    """Y-up: rotate 180 degrees about +Y: (x, y, z) -> (-x, y, -z)."""
    return torch.stack([-v[:, 0], v[:, 1], -v[:, 2]], 1)


def test_render_normals_views_shapes_and_symmetry():
    v, f = icosphere(2, radius=0.25)
    bump_v, bump_f = icosphere(1, radius=0.12, center=(0.1, 0.05, -0.25))  # on the back (-Z in Y-up)
    verts, faces = torch.cat([v, bump_v]), torch.cat([f, bump_f + v.shape[0]])
    node = mesh_nodes.Know3DRenderNormals
    mesh = core_mesh([(verts, faces)])
    (img,) = node.execute(mesh, 64, 0.55)
    assert img.shape == (4, 64, 64, 3) and img.dtype == torch.float32
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    front, back = img[0], img[1]
    assert not torch.allclose(front, back)  # the bump only shows from behind
    # Turning the object around swaps the front and back renders exactly.
    (turned,) = node.execute(core_mesh([(rot180_about_up(verts), faces)]), 64, 0.55)
    assert torch.equal(turned[0], back) and torch.equal(turned[1], front)
    # Sphere centre faces the camera: normal ~(0, 0, 1) -> colour ~(0.5, 0.5, 1). The sphere has a
    # radius of 0.25 * 64 / 1.1 = 14.5 px; at the patch corner (8.5 px off centre) n_z >= 0.81.
    centre = front[26:38, 26:38].mean((0, 1))
    assert torch.allclose(centre[:2], torch.tensor([0.5, 0.5]), atol=0.01), centre
    assert float(centre[2]) >= 0.5 + 0.5 * 0.81, centre


def test_render_normals_batch_stacks_four_views_per_mesh():
    mesh = core_mesh([icosphere(1), icosphere(2)])
    (img,) = mesh_nodes.Know3DRenderNormals.execute(mesh, 32, 0.55, "white")
    assert img.shape == (8, 32, 32, 3)
    assert torch.equal(img[0, 0, 0], torch.ones(3))  # corner is background
