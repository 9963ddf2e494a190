"""know3d data prepare / show: bad assets recorded, files per the layout, resume, kill, shards."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from know3d_core.data import layout, prepare as prep
from know3d_core.data.synthetic import ANNOTATIONS
from tests._data_helpers import BROKEN, FEATURES, MAX_FACES, SEEDS, tree, write_asset_folder

pytest.importorskip("moderngl")
SIZE = 32


# The steps this file owns; voxelize / encode have their own tests (their cost stays out of these).
STEPS = ("mesh", "render", "annotate")


def _options(inp, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("steps", STEPS)
    return prep.PrepareOptions(input=inp, out=out, render_size=SIZE, max_faces=MAX_FACES, **kw)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("assets"))
    write_asset_folder(folder)
    return folder


@pytest.fixture(scope="module")
def full(assets, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full"))
    counts = prep.prepare(_options(assets, out), log=lambda m: None)
    return out, counts


def _json(path):
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _by_source(root):
    return {os.path.basename(r["source"]): r for r in prep.read_manifest(root)}


def test_bad_assets_recorded_with_reason(full):
    out, counts = full
    rows = _by_source(out)
    n_good = len(SEEDS) * len(FEATURES)
    assert counts["ok"] == n_good and counts["failed"] == len(BROKEN)
    for name, reason in BROKEN.items():
        assert rows[name]["status"] == "failed" and rows[name]["reason"] == reason, (name, rows[name])
        assert rows[name]["error"]
    assert sorted(r["sha256"] for r in rows.values()) == sorted(r["sha256"] for r in prep.read_records(out))


def test_files_follow_the_layout(full):
    from PIL import Image
    from safetensors.numpy import load_file

    out, _ = full
    for name, row in _by_source(out).items():
        if row["status"] != "ok":
            continue
        folder = layout.asset_dir(out, row["sha256"])
        assert row["sha256"] == layout.sha256_file(os.path.join(os.path.dirname(row["source"]), name))
        assert row["split"] == layout.split_of(row["sha256"])
        mesh = load_file(os.path.join(folder, layout.MESH_FILE))
        v, f = mesh[layout.KEY_VERTICES], mesh[layout.KEY_FACES]
        assert v.dtype == np.float32 and f.dtype == np.int32 and f.shape[0] == row["faces"]
        # bounding box centred, longest side NORMALIZE_EXTENT (TRELLIS.2's normalisation)
        lo, hi = v.min(0), v.max(0)
        np.testing.assert_allclose((lo + hi) / 2, 0, atol=1e-6)
        assert abs((hi - lo).max() - layout.NORMALIZE_EXTENT) < 1e-6
        cams = _json(os.path.join(folder, layout.CAMERAS_FILE))["views"]
        assert len(cams) == sum(vs.n_azimuths for vs in layout.VIEW_SETS) == 28
        for cam in cams:
            with Image.open(os.path.join(folder, cam["file"])) as im:
                assert im.mode == "RGBA" and im.size == (SIZE, SIZE)
                a = np.asarray(im)[..., 3]
                assert a[0, 0] == 0 and a.max() == 255  # transparent background, opaque object
        pairs = _json(os.path.join(folder, layout.PAIRS_FILE))
        assert [p["set"] for p in pairs].count("backview") == 6 and len(pairs) == row["n_pairs"] == 14
        feature = name.split("_", 2)[2].rsplit(".", 1)[0]
        assert row["feature"] == feature
        assert all(p["annotations"] == ANNOTATIONS[feature] for p in pairs)
        by_file = {c["file"]: c for c in cams}
        for p in pairs:  # a pair is two opposite azimuths of one set
            a, b = by_file[p["front"]], by_file[p["back"]]
            assert a["set"] == b["set"] == p["set"]
            if p["set"] != "3d_perturbed":
                assert abs((b["azimuth"] - a["azimuth"]) % 360 - 180) < 1e-9
        assert set(row["steps"]) >= {"mesh", "render", "annotate"}


def test_resume_skips_done_and_removes_stale_temporaries(full, assets, tmp_path):
    out = str(tmp_path / "ds")
    shutil.copytree(full[0], out)
    before = tree(out)
    rows = _by_source(out)
    victim = rows["synth_0001_handle.glb"]["sha256"]
    # a run killed mid-asset: no final folder, a half-written temporary one (and a stale file)
    shutil.rmtree(layout.asset_dir(out, victim))
    stale = os.path.join(layout.assets_root(out), f"{layout.TMP_PREFIX}{victim}-99999")
    os.makedirs(os.path.join(stale, layout.VIEWS_DIR))
    open(os.path.join(stale, layout.MESH_FILE), "wb").close()
    counts = prep.prepare(_options(assets, out), log=lambda m: None)
    assert not os.path.exists(stale)
    assert tree(out) == before
    assert counts["ok"] == len(SEEDS) * len(FEATURES)
    # nothing left to do: the records are not rewritten
    stamp = os.path.getmtime(os.path.join(layout.asset_dir(out, victim), layout.ASSET_RECORD))
    time.sleep(0.01)
    prep.prepare(_options(assets, out), log=lambda m: None)
    assert os.path.getmtime(os.path.join(layout.asset_dir(out, victim), layout.ASSET_RECORD)) == stamp


def test_shards_union_equals_full_run(full, assets, tmp_path):
    out = str(tmp_path / "sharded")
    for k in (1, 2, 3):
        prep.prepare(_options(assets, out, shard=(k, 3)), log=lambda m: None)
    assert tree(out) == tree(full[0])


def test_only_render_redo_keeps_annotations(full, assets, tmp_path):
    out = str(tmp_path / "redo")
    shutil.copytree(full[0], out)
    sha = _by_source(out)["synth_0000_slats.glb"]["sha256"]
    pairs_path = os.path.join(layout.asset_dir(out, sha), layout.PAIRS_FILE)
    view = os.path.join(layout.asset_dir(out, sha), layout.view_file(0))
    os.remove(view)
    prep.prepare(_options(assets, out, steps=("render",), force=("render",)), log=lambda m: None)
    assert os.path.isfile(view)
    assert tree(out) == tree(full[0])
    assert _json(pairs_path)[0]["annotations"] == ANNOTATIONS["slats"]


def test_select_steps_and_unknown_step():
    from know3d_core.errors import UsageError

    assert prep.select_steps(only=["render", "mesh"]) == ("mesh", "render")
    assert prep.select_steps(skip=["encode"]) == ("mesh", "render", "annotate", "voxelize")
    with pytest.raises(UsageError, match="--only 'rendr'"):
        prep.select_steps(only=["rendr"])


def test_show_counts_and_contact_sheet(full, tmp_path):
    from PIL import Image

    from know3d_core.data import show

    out, _ = full
    counts = show.dataset_counts(prep.read_records(out))
    assert counts["ok"] == len(SEEDS) * len(FEATURES) and counts["pairs"] == 14 * counts["ok"]
    assert counts["failed"] == {r: list(BROKEN.values()).count(r) for r in set(BROKEN.values())}
    text = show.format_counts(counts)
    assert "failed (too_many_faces): 1" in text
    path = show.write_contact_sheet(out, str(tmp_path / "sheet.png"), prep.read_records(out), tile=48, max_assets=2)
    with Image.open(path) as im:
        assert im.size[1] == 2 * (48 + 14)


def test_voxels_to_mesh_counts_boundary_faces():
    from know3d_core.data.show import voxels_to_mesh

    occ = np.zeros((4, 4, 4), bool)
    occ[1:3, 1:3, 1:3] = True  # a 2x2x2 block: 6 sides x 4 quads x 2 triangles
    v, f = voxels_to_mesh(occ)
    assert f.shape == (48, 3)
    np.testing.assert_allclose(v.min(0), -0.25) and np.testing.assert_allclose(v.max(0), 0.25)


@pytest.mark.slow
def test_cli_killed_and_resumed_ends_with_the_full_set(full, assets, tmp_path):
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "know3d_core.cli", "data", "prepare", "--input", assets, "--out", out,
           "--size", str(SIZE), "--max-faces", str(MAX_FACES), "--no-progress", "--skip", "voxelize,encode"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = layout.assets_root(out)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill once the first asset is published, mid-run
        if os.path.isdir(root) and any(not n.startswith(layout.TMP_PREFIX) for n in os.listdir(root)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [n for n in os.listdir(root) if not n.startswith(layout.TMP_PREFIX)]
    assert 0 < len(done) < len(SEEDS) * len(FEATURES) + len(BROKEN)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "failed (empty): 1" in res.stdout
    assert tree(out) == tree(full[0])


def test_data_commands_torch_free_and_exit_codes(full, tmp_path, capsys):
    code = ("import sys, know3d_core.data.commands, know3d_core.data.layout; "
            "assert 'torch' not in sys.modules and 'moderngl' not in sys.modules and 'trimesh' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    from know3d_core.cli import main

    sheet = str(tmp_path / "s.png")
    assert main(["data", "show", "--dataset", full[0], "--out", sheet, "--max-assets", "1"]) == 0
    assert os.path.isfile(sheet) and "failed (bad_texture): 1" in capsys.readouterr().out
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--features", "wings"]) == 2
    assert main(["data", "show", "--dataset", str(tmp_path / "nothing")]) == 2
    assert main(["data", "prepare", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--only", "rendr"]) == 2
    assert main(["data", "annotate", "--dataset", full[0]]) == 2  # neither --annotations nor --annotator


def test_no_renderer_is_a_usage_error_before_any_asset(assets, tmp_path):
    import importlib.util

    from know3d_core.errors import UsageError

    if importlib.util.find_spec("bpy") is not None:
        pytest.skip("bpy is installed here")
    out = str(tmp_path / "o")
    with pytest.raises(UsageError, match="--renderer blender: .*pip install 'comfyui-know3d\\[blender\\]'"):
        prep.prepare(_options(assets, out, renderer="blender"), log=lambda m: None)
    assert not os.listdir(layout.assets_root(out))


def test_counts_read_latent_tokens_from_files(full, tmp_path):
    from safetensors.numpy import save_file

    from know3d_core.data import show

    out = str(tmp_path / "t")
    shutil.copytree(full[0], out)
    rec = next(r for r in prep.read_records(out) if r["status"] == "ok")
    path = os.path.join(layout.asset_dir(out, rec["sha256"]), layout.shape_latent_file(256))
    save_file({layout.KEY_COORDS: np.zeros((37, 3), np.int32), layout.KEY_FEATS: np.zeros((37, 32), np.float32)}, path)
    counts = show.dataset_counts(prep.read_records(out), out)
    assert counts["tokens"] == {"256": 37} and "tokens: 37 at 256" in show.format_counts(counts)


def test_steps_that_do_not_apply_are_left_undone_and_reported(tmp_path):
    from know3d_core.data import synthetic

    inp = tmp_path / "in"
    synthetic.write_glb(synthetic.make_asset(0, "hole"), str(inp / "a.glb"))  # no annotations.jsonl
    out = str(tmp_path / "o")
    counts = prep.prepare(_options(str(inp), out, steps=("mesh", "annotate")), log=lambda m: None)
    assert counts["undone"] == {"annotate: no pairs.json yet: run the render step first": 1}
    counts = prep.prepare(_options(str(inp), out), log=lambda m: None)
    (rec,) = prep.read_records(out)
    assert rec["status"] == "ok" and rec["steps"] == ["mesh", "render"]
    assert counts["undone"] == {"annotate: no annotations: pass --annotations FILE or --annotator QWEN_DIR": 1}


def test_contact_sheet_views_turn_the_camera_to_the_front():
    from know3d_core.data import render, show

    for az, el in show._SHEET_VIEWS + ((0.0, 0.0), (90.0, -10.0)):
        d = render.camera_position(az, el, 1.0)[None]
        np.testing.assert_allclose(show._turned(d, az, el), [[0.0, -1.0, 0.0]], atol=1e-6)
