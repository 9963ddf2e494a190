"""Uni3D point encoder and its OpenCLIP EVA image tower (know3d_core/eval/uni3d.py, eva.py).

Parity: golden embeddings of the reference classes (Uni3D's PointcloudEncoder around timm EVA
models in three block layouts; open_clip's CustomTextCLIP.encode_image around TimmModel of
eva02_enormous_patch14_clip_224) on tiny random weights stored in the official layouts
(benchmarks/make_uni3d_goldens.py says how they were made). Loading: strict, with errors naming
the file. Inputs: the point and pixel preparation the reference evaluation applies.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from know3d_core.eval.uni3d import (GREY, UNUSED, ClipImageTower, Uni3D, group_points, image_pixels,
                                    prepare_points)
from know3d_core.eval.weights import WeightsError, read_state

from _similarity_helpers import eval_folders

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_uni3d")


def config():
    with open(os.path.join(GOLDEN, "config.json")) as f:
        return json.load(f)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def load_variant(variant, **kw):
    c = config()
    args = dict(heads=c["timm_tiny"]["num_heads"], groups=c["point_encoder"]["num_group"],
                group_size=c["point_encoder"]["group_size"])
    return Uni3D.from_file(os.path.join(GOLDEN, f"uni3d_{variant}.pt"), **{**args, **kw})


@pytest.mark.parametrize("variant", ["eva02_base", "eva02_tiny", "eva_giant"])
def test_point_encoder_matches_reference(variant):
    """The three EVA block layouts of the released checkpoints (EVA02-B/L: split qkv, SwiGLU with its
    norm; EVA02-Ti/S: fused qkv, packed GLU; EVA-g: fused qkv, GELU) against the reference embeddings."""
    io = load_file(os.path.join(GOLDEN, "uni3d_io.safetensors"))
    model = load_variant(variant)
    with torch.no_grad():
        out = model(io["xyz"], io["rgb"])
    assert out.shape == io[f"embed_{variant}"].shape == (2, config()["point_encoder"]["embed_dim"])
    assert rel_err(out, io[f"embed_{variant}"]) < 1e-5


def test_point_encoder_config_read_from_the_checkpoint():
    cfg = load_variant("eva02_base").point_encoder.cfg
    assert (cfg.blocks.dim, cfg.depth, cfg.encoder_dim, cfg.embed_dim) == (32, 2, 24, 16)
    assert (cfg.blocks.qkv, cfg.blocks.mlp, cfg.blocks.mlp_norm, cfg.fc_norm, cfg.final_norm) == \
        ("split", "swiglu", True, True, False)
    giant = load_variant("eva_giant").point_encoder.cfg.blocks
    assert (giant.qkv, giant.mlp, giant.mlp_norm) == ("fused", "gelu", False)


def test_image_tower_matches_reference():
    io = load_file(os.path.join(GOLDEN, "clip_io.safetensors"))
    tower = ClipImageTower.from_file(os.path.join(GOLDEN, "open_clip_eva_tiny.bin"), heads=config()["clip_tiny"]["num_heads"])
    with torch.no_grad():
        out = tower(io["pixels"])
    assert out.shape == (2, config()["clip_embed"]) and tower.image_size == config()["clip_tiny"]["img_size"]
    assert rel_err(out, io["embed"]) < 1e-5


def test_strict_loading_names_the_file_and_the_key(tmp_path):
    state = read_state(os.path.join(GOLDEN, "uni3d_eva02_base.pt"), "Uni3D checkpoint")
    assert UNUSED <= set(state)  # the official layout carries these; they are accepted, unused
    extra = dict(state, **{"point_encoder.visual.blocks.0.attn.extra": torch.zeros(1)})
    with pytest.raises(WeightsError, match=r"x\.pt is not a Uni3D checkpoint.*unexpected point_encoder\.visual\.blocks\.0\.attn\.extra"):
        Uni3D.from_state(extra, "x.pt", heads=2)
    missing = {k: v for k, v in state.items() if k != "point_encoder.encoder.second_conv.1.running_var"}
    with pytest.raises(WeightsError, match="missing point_encoder.encoder.second_conv.1.running_var"):
        Uni3D.from_state(missing, "x.pt", heads=2)
    with pytest.raises(WeightsError, match="missing point_encoder.cls_token"):  # e.g. the CLIP file by mistake
        Uni3D.from_state(read_state(os.path.join(GOLDEN, "open_clip_eva_tiny.bin"), "x"), "clip.bin")
    with pytest.raises(WeightsError, match="clip.bin is not an OpenCLIP EVA02-E-14-plus checkpoint"):
        ClipImageTower.from_state({k: v for k, v in read_state(os.path.join(GOLDEN, "open_clip_eva_tiny.bin"), "x").items()
                                   if k != "visual.trunk.norm.bias"}, "clip.bin", heads=2)
    with pytest.raises(WeightsError, match="does not exist"):
        Uni3D.from_file(str(tmp_path / "none.pt"))


def test_pickled_objects_are_refused_with_the_fix(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"module": {"w": torch.zeros(1)}, "args": object.__new__(_Opaque)}, path)
    with pytest.raises(WeightsError, match="tensors-only checkpoint.*re-save its tensors as safetensors"):
        read_state(str(path), "Uni3D checkpoint")


class _Opaque:
    pass


def test_grouping_takes_farthest_centres_and_nearest_points():
    xyz = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0.75, 0, 0], [-0.5, 0, 0], [-0.25, 0, 0], [0.125, 0, 0]]])
    rgb = torch.arange(18.0).view(1, 6, 3)
    centres, patches = group_points(xyz, rgb, groups=2, size=2)
    assert torch.equal(centres[0], torch.tensor([[0.0, 0, 0], [1, 0, 0]]))  # from point 0, then the farthest
    assert {tuple(r.tolist()) for r in patches[0, 1, :, :3]} == {(0.0, 0.0, 0.0), (-0.25, 0.0, 0.0)}
    assert {tuple(r.tolist()) for r in patches[0, 0, :, 3:]} == {(0.0, 1.0, 2.0), (15.0, 16.0, 17.0)}


def test_points_are_y_up_unit_and_grey():
    from know3d_core.mesh.primitives import icosphere

    m = icosphere(2, 0.3, (0.1, -0.2, 0.05))
    v = torch.as_tensor(m.vertices).float()
    v[:, 2] *= 2.0  # tall along model-space Z (up)
    xyz, rgb = prepare_points(v, torch.as_tensor(m.faces).long(), count=2000, seed=0)
    assert xyz.shape == rgb.shape == (1, 2000, 3) and torch.all(rgb == GREY)
    assert xyz[0].mean(0).abs().max() < 1e-5 and xyz[0].norm(dim=1).max() == pytest.approx(1.0, abs=1e-5)
    extent = xyz[0].amax(0) - xyz[0].amin(0)
    assert extent[1] > 1.5 * extent[0] and extent[1] > 1.5 * extent[2]  # Z up became Y up
    again, _ = prepare_points(v, torch.as_tensor(m.faces).long(), count=2000, seed=0)
    assert torch.equal(xyz, again)


def test_image_pixels_short_side_centre_crop_white_background():
    from PIL import Image

    im = Image.new("RGBA", (60, 30), (0, 0, 0, 0))  # transparent -> white
    im.paste((255, 0, 0, 255), (0, 0, 10, 30))      # a red stripe on the left: cropped away
    x = image_pixels(im, size=28)
    assert x.shape == (1, 3, 28, 28)
    white = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(x[0, :, 14, 14], white, atol=1e-5) and torch.allclose(x[0, :, 14, 0], white, atol=1e-5)


# ------------------------------------------------------------------------ know3d eval --uni3d
@pytest.fixture
def tiny_heads(monkeypatch):
    """The golden checkpoints' width (32, 2 heads) in the width -> heads tables the CLI reads."""
    from know3d_core.eval import uni3d

    monkeypatch.setitem(uni3d.HEADS_BY_WIDTH, 32, 2)
    monkeypatch.setitem(uni3d.CLIP_HEADS_BY_WIDTH, 32, 2)


UNI3D_ARGS = ["--uni3d", os.path.join(GOLDEN, "uni3d_eva02_base.pt"), "--uni3d-clip",
              os.path.join(GOLDEN, "open_clip_eva_tiny.bin"), "--similarity-points", "600"]
FAST = ["--samples", "2000", "--points", "256", "--image-size", "32", "--mesh-resolution", "32", "--quiet", "--worst", "0"]


def test_eval_command_uni3d_columns(tmp_path, tiny_heads):
    """Per item: cosine(Uni3D(shape), CLIP(front view)) with the recorded input image (a) or the
    dataset's azimuth-0 render (b); a prediction equal to its ground truth scores uni3d == uni3d_gt;
    an occupancy-only item has no value; the columns are aggregated and described in eval.json."""
    import csv

    from know3d_core.cli import main
    from know3d_core.eval.uni3d import cosine

    image_a, image_b = eval_folders(tmp_path)
    out = tmp_path / "out"
    assert main(["eval", "--pred", f"pred={tmp_path / 'pred'}", "--pred", f"stage1={tmp_path / 'stage1'}",
                 "--gt", str(tmp_path / "gt"), "--out", str(out)] + FAST + UNI3D_ARGS) == 0
    with open(out / "eval.csv", newline="") as fh:
        rows = {(r["variant"], r["item"]): r for r in csv.DictReader(fh)}
    model = Uni3D.from_file(UNI3D_ARGS[1])
    tower = ClipImageTower.from_file(UNI3D_ARGS[3])
    shapes = {}
    for name in ("a", "b"):
        t = load_file(str(tmp_path / "gt" / name / "mesh.safetensors"))
        with torch.no_grad():
            shapes[name] = model(*prepare_points(t["vertices"], t["faces"].long(), 600, 0))
    with torch.no_grad():
        images = {"a": tower(image_pixels(image_a, 28)), "b": tower(image_pixels(image_b, 28))}
    for name, other in (("a", "b"), ("b", "a")):
        row = rows["pred", name]
        assert float(row["uni3d"]) == float(row["uni3d_gt"])
        assert float(row["uni3d"]) == pytest.approx(float(cosine(shapes[name], images[name])[0]), abs=1e-6)
        assert float(row["uni3d"]) != pytest.approx(float(cosine(shapes[name], images[other])[0]), abs=1e-3)
    assert rows["stage1", "a"]["uni3d"] == "" and rows["stage1", "a"]["uni3d_gt"] != ""
    with open(out / "eval.json") as fh:
        report = json.load(fh)
    assert report["aggregate"]["pred"]["uni3d"]["n"] == 2 and "uni3d" not in report["aggregate"]["stage1"]
    described = report["item_metrics"][0]
    assert described["columns"] == ["uni3d", "uni3d_gt"] and described["model"]["mlp"] == "swiglu"
    assert described["points"] == 600


def test_eval_command_uni3d_errors_before_any_metric(tmp_path, tiny_heads, capsys):
    from know3d_core.cli import main

    eval_folders(tmp_path)
    base = ["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")] + FAST
    assert main(base + ["--out", str(tmp_path / "o1"), "--uni3d", UNI3D_ARGS[1]]) == 2
    assert "needs both --uni3d" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "o2"), "--uni3d", str(tmp_path / "no.pt"), "--uni3d-clip", UNI3D_ARGS[3]]) == 2
    assert "--uni3d " + str(tmp_path / "no.pt") + " does not exist" in capsys.readouterr().err
    swapped = ["--uni3d", UNI3D_ARGS[3], "--uni3d-clip", UNI3D_ARGS[1]]
    assert main(base + ["--out", str(tmp_path / "o3")] + swapped) == 2
    err = capsys.readouterr().err
    assert "open_clip_eva_tiny.bin is not a Uni3D checkpoint" in err and "missing point_encoder.cls_token" in err
    os.remove(tmp_path / "pred" / "a" / "record.json")  # a: no recorded image, and gt/a has no renders
    assert main(base + ["--out", str(tmp_path / "o4")] + UNI3D_ARGS) == 2
    assert "1 item(s) have none (first: 'a')" in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))  # stopped before writing anything
