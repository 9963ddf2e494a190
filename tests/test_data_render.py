"""Camera plan and the OpenGL renderer: conventions checked on analytic scenes."""
import math

import numpy as np
import pytest

from know3d_core.data import layout, render
from know3d_core.data.assets import Asset, Primitive, load_asset

pytest.importorskip("moderngl")


def _sphere(center, radius, color=(1.0, 1.0, 1.0, 1.0), metallic=0.0, roughness=0.6, subdivisions=3):
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    prim = Primitive(np.asarray(s.vertices + np.asarray(center), np.float32), np.asarray(s.faces, np.int32),
                     base_color_factor=color, metallic=metallic, roughness=roughness)
    return Asset("sphere", [prim], (0.0, 0.0, 0.0), 1.0)


@pytest.fixture(scope="module")
def renderer():
    r = render.GLRenderer(64)
    yield r
    r.release()


def test_plan_views_sets_pairs_and_ranges():
    views = render.plan_views(3)
    assert views == render.plan_views(3) and views != render.plan_views(4)
    assert [v["set"] for v in views].count("backview") == 12 and len(views) == 28
    assert [v["file"] for v in views] == [layout.view_file(i) for i in range(28)]
    base = views[0]
    lo, hi = layout.FOV_RANGE_DEG
    assert lo <= base["fov"] <= hi and layout.ELEVATION_RANGE_DEG[0] <= base["elevation"] <= layout.ELEVATION_RANGE_DEG[1]
    # the radius keeps the unit cube's bounding sphere exactly inside the field of view
    assert math.isclose(math.sin(math.radians(base["fov"]) / 2) * base["radius"], math.sqrt(3) / 2)
    for v in views:
        c2w = np.asarray(v["c2w"])
        np.testing.assert_allclose(c2w[:3, 3], render.camera_position(v["azimuth"], v["elevation"], v["radius"]), atol=1e-9)
        if v["set"] == "3d_perturbed":
            ring_az = 45.0 * v["ring"]
            assert abs((v["azimuth"] - ring_az + 180) % 360 - 180) <= layout.PERTURB_AZIMUTH_DEG
            assert abs(v["elevation"] - base["elevation"]) <= layout.PERTURB_ELEVATION_DEG
            s = v["fov"] / base["fov"]
            assert layout.PERTURB_FOV_SCALE[0] <= s <= layout.PERTURB_FOV_SCALE[1]
        else:
            assert v["fov"] == base["fov"] and v["elevation"] == base["elevation"]
    pairs = render.plan_pairs(views)
    assert [p["set"] for p in pairs] == ["backview"] * 6 + ["3d"] * 4 + ["3d_perturbed"] * 4
    assert pairs[0]["front"] == layout.view_file(0) and pairs[0]["back"] == layout.view_file(6)


def test_azimuth_zero_is_the_front_with_x_right_and_z_up():
    c2w = render.look_at_c2w(render.camera_position(0.0, 0.0, 3.0))
    np.testing.assert_allclose(c2w[:3, 3], [0, -3, 0], atol=1e-12)
    K = render.intrinsics(40.0)
    uv = render.project(np.array([[0.0, 0, 0], [0.2, 0, 0], [0, 0, 0.2]]), c2w, K)
    np.testing.assert_allclose(uv[0], [0.5, 0.5], atol=1e-12)
    assert uv[1, 0] > 0.5 and abs(uv[1, 1] - 0.5) < 1e-12   # +X is image right
    assert uv[2, 1] < 0.5 and abs(uv[2, 0] - 0.5) < 1e-12   # +Z is image up (rows grow downwards)
    np.testing.assert_allclose(render.camera_position(90.0, 0.0, 1.0), [1, 0, 0], atol=1e-12)


def test_render_matches_the_stored_camera(renderer):
    """A small sphere off centre lands where cameras.json's c2w + intrinsics project its centre."""
    center = np.array([0.21, -0.13, 0.17])
    asset = _sphere(center, 0.04)
    renderer.load(asset)
    views = render.plan_views(11)
    for v in views[::3]:
        img = renderer.render(np.asarray(v["c2w"]), v["fov"])
        alpha = img[..., 3].astype(np.float64) / 255.0
        assert alpha.sum() > 2
        rows, cols = np.mgrid[0:64, 0:64]
        centroid = np.array([(alpha * (cols + 0.5)).sum(), (alpha * (rows + 0.5)).sum()]) / alpha.sum()
        expected = render.project(center[None], np.asarray(v["c2w"]), np.asarray(v["intrinsics"]))[0] * 64
        # a sphere's projected centroid sits within its apparent radius' perspective shift of the centre
        assert np.abs(centroid - expected).max() < 0.75, (v["azimuth"], centroid, expected)


def test_pbr_material_is_shaded(renderer):
    c2w = render.look_at_c2w(render.camera_position(0.0, 0.0, 2.5))
    red = _sphere((0, 0, 0), 0.3, color=(1.0, 0.0, 0.0, 1.0))
    renderer.load(red)
    img = renderer.render(c2w, 40.0).astype(np.float64)
    mask = img[..., 3] == 255
    assert img[mask, 0].mean() > 4 * img[mask, 1].mean()
    lum = img[..., :3].mean(-1)
    # the key light comes from the upper right in camera space: that quadrant is brighter
    assert lum[18:28, 36:46][mask[18:28, 36:46]].mean() > lum[36:46, 18:28][mask[36:46, 18:28]].mean() + 20
    # metallic changes the shading of the same base colour (no diffuse term)
    renderer.load(_sphere((0, 0, 0), 0.3, color=(1.0, 0.0, 0.0, 1.0), metallic=1.0, roughness=0.3))
    metal = renderer.render(c2w, 40.0).astype(np.float64)
    assert np.abs(metal[mask, :3] - img[mask, :3]).mean() > 10
    assert (img[img[..., 3] == 0] == 0).all() and (img[0, 0] == 0).all()  # transparent background


def test_texture_orientation_through_glb(tmp_path, renderer):
    """A front-facing quad whose texture is red on top, blue below renders red on top."""
    import trimesh
    from PIL import Image

    tex = np.zeros((8, 8, 3), np.uint8)
    tex[:4, :, 0] = 255  # image rows top-first: top half red
    tex[4:, :, 2] = 255
    # glTF space (Y up, front +Z): a unit quad facing +Z; trimesh uvs have their origin bottom-left
    v = np.array([[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0]], np.float64)
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64)
    mat = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(tex), metallicFactor=0.0, roughnessFactor=1.0)
    mesh = trimesh.Trimesh(v, [[0, 1, 2], [0, 2, 3]], visual=trimesh.visual.TextureVisuals(uv=uv, material=mat), process=False)
    path = str(tmp_path / "quad.glb")
    mesh.export(path)
    asset = load_asset(path)
    np.testing.assert_allclose(asset.primitives[0].vertices[:, 1], 0, atol=1e-7)  # front plane y = 0
    renderer.load(asset)
    img = renderer.render(render.look_at_c2w(render.camera_position(0.0, 0.0, 2.5)), 40.0).astype(int)
    top, bottom = img[24, 32], img[40, 32]
    assert top[0] > 100 and top[2] < 40 and bottom[2] > 100 and bottom[0] < 40


def test_blender_renderer_matches_opengl_cameras(renderer):
    """Blender (Cycles) and OpenGL agree on the cameras and the shading: same silhouette from the stored
    cameras (mask IoU >= 0.9 at 64 px; antialiasing and Cycles' sampling move edge pixels only) and
    close colours. Runs where bpy is installed (Python 3.11: pip install 'comfyui-know3d[blender]')."""
    pytest.importorskip("bpy")
    asset = _sphere((0.21, -0.13, 0.17), 0.12, color=(0.8, 0.1, 0.1, 1.0), subdivisions=4)
    blender = render.BlenderRenderer(64, samples=8)
    try:
        blender.load(asset)
        renderer.load(asset)
        for v in render.plan_views(5)[::7]:
            x = blender.render(np.asarray(v["c2w"]), v["fov"]).astype(float)
            y = renderer.render(np.asarray(v["c2w"]), v["fov"]).astype(float)
            a, b = x[..., 3] > 127, y[..., 3] > 127
            assert b.sum() > 20
            assert (a & b).sum() / (a | b).sum() >= 0.9, v["azimuth"]
            # same light rig and material: interior pixels within 10 of 255 on average (measured ~3.5;
            # Cycles' multiple-scattering GGX and 8-sample noise make up the rest)
            inner = (x[..., 3] == 255) & (y[..., 3] == 255)
            assert np.abs(x[inner, :3] - y[inner, :3]).mean() < 10, v["azimuth"]
    finally:
        blender.release()


def test_view_index_reads_pairs_entries():
    views = render.plan_views(0)
    for p in render.plan_pairs(views):
        assert views[layout.view_index(p["front"])]["file"] == p["front"]
        assert views[layout.view_index(p["back"])]["file"] == p["back"]
    assert layout.view_index(7) == layout.view_index("7") == 7
    with pytest.raises(ValueError, match="not a view reference"):
        layout.view_index("views/front.png")
