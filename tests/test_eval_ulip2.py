"""ULIP-2 PointBERT point encoder and its OpenCLIP ViT image tower (know3d_core/eval/ulip2.py, clip_vit.py).

Parity: golden embeddings of the reference ``ULIP2_WITH_OPENCLIP`` (``encode_pc`` around
``PointTransformer_Colored``, ``encode_image`` around open_clip's ``CLIP``) on tiny random weights,
saved as ULIP's DDP training saves the whole model (benchmarks/make_ulip2_goldens.py says how).
"""
import csv
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from know3d_core.eval.ulip2 import ClipViTTower, Ulip2
from know3d_core.eval.weights import WeightsError, read_state

from _similarity_helpers import eval_folders

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_ulip2")
CKPT = os.path.join(GOLDEN, "ulip2_pointbert_tiny.pt")


def config():
    with open(os.path.join(GOLDEN, "config.json")) as f:
        return json.load(f)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _model():
    c = config()["pointbert"]
    return Ulip2.from_file(CKPT, heads=c["num_heads"], groups=c["num_group"], group_size=c["group_size"])


def test_point_encoder_matches_reference():
    io = load_file(os.path.join(GOLDEN, "ulip2_io.safetensors"))
    with torch.no_grad():
        out = _model()(io["xyz"], io["rgb"])
    assert out.shape == io["pc_embed"].shape == (2, 1280)
    assert rel_err(out, io["pc_embed"]) < 1e-5


def test_image_tower_matches_reference_from_either_layout():
    """The ViT under ``open_clip_model.visual.*`` (a whole ULIP-2 model's state, the golden file) and
    under ``visual.*`` (an OpenCLIP file) load alike and match ``encode_image``."""
    io = load_file(os.path.join(GOLDEN, "ulip2_io.safetensors"))
    heads = config()["vision"]["width"] // config()["vision"]["head_width"]
    whole = ClipViTTower.from_file(CKPT, heads=heads)
    state = read_state(CKPT, "x")  # DDP's "module." prefix removed
    flat = {k[len("open_clip_model."):]: v for k, v in state.items() if k.startswith("open_clip_model.")}
    assert any(k.startswith("transformer.") for k in flat)  # the text tower rides along, unused
    openclip = ClipViTTower.from_state(flat, "open_clip_pytorch_model.bin", heads=heads)
    with torch.no_grad():
        for tower in (whole, openclip):
            assert rel_err(tower(io["pixels"]), io["image_embed"]) < 1e-5
    assert whole.image_size == config()["vision"]["image_size"]


def test_strict_loading_names_the_file_and_the_key():
    state = read_state(CKPT, "ULIP-2 checkpoint")
    bad = dict(state, **{"point_encoder.blocks.blocks.0.attn.qkv.bias": torch.zeros(96)})
    with pytest.raises(WeightsError, match=r"u\.pt is not a ULIP-2 PointBERT checkpoint.*unexpected point_encoder\.blocks\.blocks\.0\.attn\.qkv\.bias"):
        Ulip2.from_state(bad, "u.pt", heads=2)
    no_proj = {k: v for k, v in state.items() if not k.endswith("pc_projection")}
    with pytest.raises(WeightsError, match="missing pc_projection"):
        Ulip2.from_state(no_proj, "u.pt", heads=2)
    with pytest.raises(WeightsError, match=r"u\.pt is not an OpenCLIP ViT checkpoint.*: missing or unknown visual\.conv1\.weight"):
        ClipViTTower.from_state({k: v for k, v in state.items() if "visual" not in k}, "u.pt", heads=2)


@pytest.fixture
def tiny_heads(monkeypatch):
    """The golden checkpoint's widths (32: 2 heads) in the width -> heads tables the CLI reads."""
    from know3d_core.eval import clip_vit, ulip2

    monkeypatch.setitem(ulip2.HEADS_BY_WIDTH, 32, 2)
    monkeypatch.setitem(clip_vit.HEADS_BY_WIDTH, 32, 2)


def test_eval_command_ulip2_columns(tmp_path, tiny_heads, capsys):
    """``--ulip2`` alone (the image tower from the same file): per-item ulip2 / ulip2_gt columns; a
    prediction equal to its ground truth scores ulip2 == ulip2_gt."""
    from know3d_core.cli import main

    eval_folders(tmp_path)
    out = tmp_path / "out"
    fast = ["--samples", "2000", "--points", "256", "--image-size", "32", "--mesh-resolution", "32", "--quiet",
            "--worst", "0", "--similarity-points", "400"]
    assert main(["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(out),
                 "--ulip2", CKPT] + fast) == 0
    with open(out / "eval.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["item"] for r in rows] == ["a", "b"]
    for r in rows:
        assert -1 <= float(r["ulip2"]) <= 1 and float(r["ulip2"]) == float(r["ulip2_gt"])
    assert float(rows[0]["ulip2"]) != float(rows[1]["ulip2"])
    assert "ulip2" in capsys.readouterr().out  # the printed table has the column
    with open(out / "eval.json") as fh:
        described = json.load(fh)["item_metrics"][0]
    assert described["model"]["kind"] == "ULIP-2 PointBERT" and described["clip"] == CKPT
    assert main(["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(tmp_path / "o2"),
                 "--ulip2-clip", CKPT] + fast) == 2
    assert "give --ulip2" in capsys.readouterr().err
