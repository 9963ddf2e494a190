"""Issue 16 row 'know3d demo': the demo proves the knowledge path (two back descriptions give two
meshes, ``--variant none`` a third), its back-view bar says it stopped at the capture noise level and
ends full, and its record does not point at the deleted temporary models."""
import json
import os

import pytest
from PIL import Image

from know3d_core import cli
from know3d_core.demo_models import DEMO_RUN_SETTINGS
from know3d_core.pipeline import Know3DPipeline

from _pipeline_helpers import full_demo, mesh_equal

pytestmark = pytest.mark.slow
RUN = dict(steps=DEMO_RUN_SETTINGS["steps"], pipeline_type="512", back_view_size=DEMO_RUN_SETTINGS["back_view_size"],
           trellis_steps=DEMO_RUN_SETTINGS["ss_steps"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return full_demo(tmp_path_factory)


@pytest.fixture(scope="module")
def runs(demo):
    pipe = Know3DPipeline.from_pretrained(
        demo.trellis2, qwen=demo.qwen, know3d=demo.know3d, backview_loras=[demo.backview_lora], dinov3=demo.dinov3,
        device="cpu", dtype="float32", vae_image_area=DEMO_RUN_SETTINGS["vae_image_area"])
    image = Image.open(demo.image)
    return {name: pipe.run(image, desc, variant, seed=0, **RUN) for name, desc, variant in (
        ("slats", "a hollow backrest with three vertical slats", "hidden"),
        ("panel", "a solid wooden panel", "hidden"),
        ("none", "a hollow backrest with three vertical slats", "none"))}


def _voxels(res):
    return {tuple(c) for c in res.geometry.coords.tolist()}


def test_two_descriptions_give_two_meshes_and_none_a_third(runs):
    slats, panel, none = runs["slats"], runs["panel"], runs["none"]
    assert slats.knowledge["kind"] == panel.knowledge["kind"] == "mmdit_hidden" and none.knowledge is None
    assert not mesh_equal(slats.mesh, panel.mesh)  # only the knowledge path carries the description
    assert not mesh_equal(slats.mesh, none.mesh) and not mesh_equal(panel.mesh, none.mesh)
    # visibly: the structure stage itself (occupied voxels) changes with the description
    assert _voxels(slats) != _voxels(panel) != _voxels(none) != _voxels(slats)


def test_demo_branch_is_not_the_zero_initialised_one(demo):
    from safetensors import safe_open

    with safe_open(demo.know3d, framework="pt") as f:
        outs = [f.get_tensor(k) for k in f.keys() if "knowledge_attn.to_out.weight" in k]
    assert outs and all(float(t.abs().max()) > 0 for t in outs)  # install_branch starts these at zero


def test_demo_bar_and_record(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["demo", "--out", str(out), "--normals-size", "32"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    steps = DEMO_RUN_SETTINGS["steps"]
    assert "back_view (stops at the capture noise level: step " in captured.err and f"of {steps})" in captured.err
    with open(out / "record.json", encoding="utf-8") as f:
        rec = json.load(f)
    paths = list(rec["models"].values()) + [rec["inputs"]["image"]]
    assert paths and all(p.startswith("<temporary demo models, deleted after the run>") for p in paths), paths
    assert "temporary" in rec["demo"]["models"]
    assert sorted(os.listdir(out)) == ["mesh.glb", "normals.png", "record.json"]
    assert "back view: 'a hollow backrest with three vertical slats'" in captured.err


def test_demo_refuses_a_foreign_out_before_writing_models(tmp_path, capsys):
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    keep = tmp_path / "models"
    code = cli.main(["demo", "--out", str(out), "--keep-models", str(keep)])
    assert code == 2 and "not a know3d result (notes.txt)" in capsys.readouterr().err
    assert not keep.exists() and os.listdir(out) == ["notes.txt"]
