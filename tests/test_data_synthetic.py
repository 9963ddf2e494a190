"""Synthetic assets: deterministic, one front per seed, a clearly different back per feature."""
import itertools

import numpy as np
import pytest

from know3d_core.data import layout, synthetic
from know3d_core.data.assets import load_asset

pytest.importorskip("manifold3d")


def _normalised(asset):
    v = asset.vertices.astype(np.float64)
    lo, hi = v.min(0), v.max(0)
    return (v - (lo + hi) / 2) * layout.NORMALIZE_EXTENT / (hi - lo).max()


def test_deterministic_and_distinct_seeds():
    a, b = synthetic.make_asset(3, "knobs"), synthetic.make_asset(3, "knobs")
    assert np.array_equal(a.vertices, b.vertices) and np.array_equal(a.faces, b.faces)
    assert np.array_equal(a.texture, b.texture) and a.annotations == synthetic.ANNOTATIONS["knobs"]
    c = synthetic.make_asset(4, "knobs")
    assert not np.array_equal(a.texture, c.texture)
    with pytest.raises(ValueError, match="unknown synthetic feature"):
        synthetic.make_asset(0, "wings")


@pytest.mark.parametrize("seed", [0, 5])
def test_same_front_different_backs_at_64(seed):
    """After normalisation the front half (y < 0) of every feature's 64^3 occupancy is identical,
    and the back halves differ: pairwise IoU <= 0.7 (the experiment tells features apart by it)."""
    occ = {f: synthetic.solid_occupancy(_normalised(synthetic.make_asset(seed, f)), synthetic.make_asset(seed, f).faces)
           for f in synthetic.FEATURES}
    front = occ["flat_back"][:, :32]
    assert front.sum() > 0
    for f, o in occ.items():
        assert np.array_equal(o[:, :32], front), f
        assert o[:, 32:].sum() > 0, f
    for f, g in itertools.combinations(synthetic.FEATURES, 2):
        a, b = occ[f][:, 32:], occ[g][:, 32:]
        iou = (a & b).sum() / (a | b).sum()
        assert iou <= 0.7, (f, g, iou)


def test_solid_occupancy_of_a_box_is_exact():
    import trimesh

    box = trimesh.creation.box(extents=(0.5, 0.25, 0.75))  # centred: x in +-0.25, y +-0.125, z +-0.375
    occ = synthetic.solid_occupancy(np.asarray(box.vertices), np.asarray(box.faces), 16)
    # voxel centres (i + 0.5) / 16 - 0.5 inside the box: 8 x 4 x 12
    assert occ.sum() == 8 * 4 * 12 and occ[4:12, 6:10, 2:14].all()


def test_glb_round_trip_keeps_geometry_axes_and_material(tmp_path):
    asset = synthetic.make_asset(2, "shelf")
    path = synthetic.write_glb(asset, str(tmp_path / "a.glb"))
    loaded = load_asset(path)
    (prim,) = loaded.primitives
    lo, hi = asset.vertices.min(0), asset.vertices.max(0)
    expected = (asset.vertices - (lo + hi) / 2) * layout.NORMALIZE_EXTENT / (hi - lo).max()
    np.testing.assert_allclose(prim.vertices, expected, atol=1e-6)  # Y-up glTF back to Z-up model space
    assert prim.base_color_texture.shape == synthetic.make_asset(2, "shelf").texture.shape[:2] + (4,)
    np.testing.assert_array_equal(prim.base_color_texture[..., :3], asset.texture)
    assert abs(prim.metallic - asset.metallic) < 1e-6 and abs(prim.roughness - asset.roughness) < 1e-6


def test_write_dataset_folder(tmp_path):
    import json

    paths = synthetic.write_dataset_folder(str(tmp_path), [0], ["hole", "slats"])
    assert [p.rsplit("/", 1)[1] for p in paths] == ["synth_0000_hole.glb", "synth_0000_slats.glb"]
    rows = [json.loads(line) for line in (tmp_path / "annotations.jsonl").read_text().splitlines()]
    assert rows == [{"file": "synth_0000_hole.glb", "feature": "hole", "annotations": synthetic.ANNOTATIONS["hole"]},
                    {"file": "synth_0000_slats.glb", "feature": "slats", "annotations": synthetic.ANNOTATIONS["slats"]}]
