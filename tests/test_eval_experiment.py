"""The small-scale Know3D experiment: its codec, its prompt-swap score, and the CPU smoke run."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from know3d_core.data import layout as L
from know3d_core.eval.experiment import (CodecDecoder, decode_latent, encode_occupancy, occupancy_64,
                                         prompt_effect, prompt_swap_accuracy)
from know3d_core.trellis2.sparse_structure_decoder import decode_occupancy


def test_codec_is_exact_and_decodes_like_the_ss_decoder():
    """encode -> decode is the identity on any 16^3 occupancy; through CodecDecoder and the pipeline's
    decode_occupancy(logits, 64) the coords are exactly those of the nearest-upsampled 64^3 grid."""
    occ = torch.rand(16, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.6
    z = encode_occupancy(occ)
    assert z.shape == (8, 8, 8, 8) and set(z.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(decode_latent(z.unsqueeze(0))[0], occ)
    assert float(z[4 * 1 + 2 * 0 + 1, 2, 3, 4]) == (1.0 if occ[2 * 2 + 1, 2 * 3 + 0, 2 * 4 + 1] else -1.0)
    coords = decode_occupancy(CodecDecoder()(z.unsqueeze(0)), 64)
    grid = torch.zeros(64, 64, 64, dtype=torch.bool)
    grid[coords[:, 1].long(), coords[:, 2].long(), coords[:, 3].long()] = True
    assert torch.equal(grid, occupancy_64(occ))


def _item(folder, name, occ, record=None):
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    save_file({L.KEY_OCCUPANCY: occ}, os.path.join(folder, name, L.OCCUPANCY_FILE))
    if record:
        with open(os.path.join(folder, name, "record.json"), "w") as f:
            json.dump(record, f)


def test_prompt_swap_accuracy_perfect_and_prompt_blind(tmp_path):
    """Three features whose ground truths differ only in the back half. A model that reproduces each
    prompted back scores 1; a prompt-blind model (the same output for every prompt, here the first
    feature's shape) is right exactly once per front: 1/K."""
    feats = ("a", "b", "c")
    gts = {}
    for k, f in enumerate(feats):
        occ = torch.zeros(64, 64, 64, dtype=torch.bool)
        occ[10:50, 10:30, 10:50] = True        # shared front half (y < 32)
        occ[10 + 10 * k:20 + 10 * k, 32:50, 10:50] = True  # the feature, behind
        gts[f] = occ
        _item(str(tmp_path / "gt"), f"0007_{f}", occ)
    for f in feats:
        _item(str(tmp_path / "good"), f"0007_{f}", gts[f], {"seed": 7, "feature": f})
        _item(str(tmp_path / "blind"), f"0007_{f}", gts["a"], {"seed": 7, "feature": f})
    acc, rows = prompt_swap_accuracy(str(tmp_path / "good"), str(tmp_path / "gt"), feats)
    assert acc == 1.0 and all(r["ious"][r["prompted"]] == 1.0 for r in rows)
    acc, rows = prompt_swap_accuracy(str(tmp_path / "blind"), str(tmp_path / "gt"), feats)
    assert acc == pytest.approx(1 / 3) and {r["classified"] for r in rows} == {"a"}
    # prompt effect: 0 for the blind model; for the perfect one, that of the ground truths. Back halves
    # (y >= 32) are 18 x 40 slabs at x offsets 10 apart, each 10 wide: disjoint, so every pair has
    # back-half IoU 0 and the effect is 1.
    assert prompt_effect(str(tmp_path / "blind"), feats) == 0.0
    assert prompt_effect(str(tmp_path / "good"), feats) == prompt_effect(str(tmp_path / "gt"), feats) == 1.0


def test_prompt_swap_ignores_the_shared_body(tmp_path):
    """Two backs on one body: a is the body and 4 voxels, b the body and a 10 x 10 slab. A generation
    with 40% of b's slab is b's. Over the whole back half the body dominates and the IoU ranks by the
    voxel count that differs, which picks the small feature a (44 voxels off against 60); within the
    feature region (where a and b disagree) b wins, 0.4 against 0."""
    from know3d_core.eval.geometry import back_half_grid, voxel_iou

    body = torch.zeros(64, 64, 64, dtype=torch.bool)
    body[10:50, 10:50, 10:50] = True
    a, b, pred = body.clone(), body.clone(), body.clone()
    a[40, 52:56, 40] = True
    b[20:30, 52, 20:30] = True
    pred[20:24, 52, 20:30] = True
    for f, occ in (("a", a), ("b", b)):
        _item(str(tmp_path / "gt"), f"0003_{f}", occ)
    _item(str(tmp_path / "pred"), "0003_b", pred, {"seed": 3, "feature": "b"})
    back = back_half_grid(64)
    assert voxel_iou(pred, a, back) > voxel_iou(pred, b, back)  # the whole back half: a (wrong)
    acc, rows = prompt_swap_accuracy(str(tmp_path / "pred"), str(tmp_path / "gt"), ("a", "b"))
    assert acc == 1.0 and rows[0]["ious"] == {"a": 0.0, "b": pytest.approx(0.4)}


@pytest.mark.slow
def test_experiment_smoke_runs_end_to_end(tmp_path, capsys):
    """Every stage on tiny random models (data -> base -> know3d -> generate -> eval), the table written.
    ``none`` has no knowledge: for a front, every prompt gives the same structure (same seed), so exactly
    one of the K prompts is classified right: accuracy 1/K exactly."""
    from know3d_core.cli import main

    out = str(tmp_path / "exp")
    assert main(["experiment", "--out", out, "--smoke", "--rows", "hidden,none"]) == 0
    with open(os.path.join(out, "experiment.json"), encoding="utf-8") as f:
        result = json.load(f)
    rows = {r["row"]: r for r in result["table"]}
    assert set(rows) == {"hidden", "none"}
    assert result["partial"] is False and result["not_run"] == {}
    assert rows["none"]["prompt_swap_accuracy"] == pytest.approx(result["chance"])
    # the Know3D row trained on the front pairs only (smoke: within 30 degrees of azimuth 0)
    from safetensors import safe_open

    with safe_open(os.path.join(out, "runs", "hidden", "export", "know3d.safetensors"), framework="pt") as f:
        trained = json.loads(f.metadata()["training"])[-1]
    front = 0
    for a in os.listdir(os.path.join(out, "data_train_front", "assets")):
        with open(os.path.join(out, "data_train_front", "assets", a, L.PAIRS_FILE), encoding="utf-8") as f:
            front += len(json.load(f))
    assert trained["pairs"] == front == 2 * 2 * 2  # 2 fronts x 2 features x (azimuth 0 and its perturbed neighbour)
    for r in rows.values():
        assert 0.0 <= r["back_iou_64"] <= 1.0 and r["n"] == len(result["config"]["features"])
    # the capture's schedule sigma is recorded: the nearest back-view step to the requested one
    assert rows["none"]["sigma_actual"] is None
    with open(os.path.join(out, "pred", "hidden", sorted(os.listdir(os.path.join(out, "pred", "hidden")))[0],
                           "record.json"), encoding="utf-8") as f:
        record = json.load(f)
    assert rows["hidden"]["sigma_actual"] == record["sigma_actual"] and 0.0 < record["sigma_actual"] < 1.0
    assert isinstance(record["capture_step"], int)
    for name in ("experiment.md", "prompts.png", "eval/eval.json", "eval/eval.csv", "eval/eval.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert "prompt-swap accuracy" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_parallel_script_trains_the_base_once_and_merges_every_row(tmp_path):
    """benchmarks/experiment_know3d_parallel.sh at the smoke sizes: the base and the untrained rows in one
    process, each trained row in its own process on a copy (the base reused, not retrained), then one table
    over all of them; the archives the device call brings back are written."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res, work = tmp_path / "res", tmp_path / "w"
    env = dict(os.environ, RESULTS=str(res), WORK=str(work), PY=sys.executable, NO_WHEELS="1", DEVICE="cpu",
               INPUTS=str(tmp_path / "no_inputs"), STOP_AT="900", END_AT="1200", EXTRA="--smoke", ROWS="hidden,latent",
               PYTHONPATH=root)
    done = subprocess.run(["bash", os.path.join(root, "benchmarks", "experiment_know3d_parallel.sh")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(work / "experiment.json", encoding="utf-8") as f:
        result = json.load(f)
    assert [r["row"] for r in result["table"]] == ["none", "multiview", "hidden", "latent"]
    assert result["partial"] is False and result["not_run"] == {}
    for row in ("hidden", "latent"):
        with open(f"{work}.{row}.log", encoding="utf-8") as f:
            log = f.read()
        base_s = float(re.search(r"train_base: ([0-9.]+) s", log).group(1))
        assert base_s < 1.0, f"{row}: the base was trained again ({base_s} s)"
        assert os.path.isfile(work / "runs" / row / "export" / "know3d.safetensors")
    for name in ("log", "results.tgz", "base.tgz", "exports.tgz"):
        assert os.path.getsize(res / name) > 0


def test_rows_name_sweep_sigmas_where_they_run():
    """``--rows`` may place sweep rows (``hidden_sigma<s>``) anywhere: they run in that order; the rest of
    ``sigmas`` follows (none twice, and not the ``hidden`` row's own sigma)."""
    from know3d_core.eval.experiment import ExperimentConfig, _variants, check_row

    cfg = ExperimentConfig(out="x", rows=("hidden", "none", "hidden_sigma0.85", "image"), sigmas=(0.85, 0.5, 0.25))
    assert [v[0] for v in _variants(cfg)] == ["hidden", "none", "hidden_sigma0.85", "image", "hidden_sigma0.5"]
    assert _variants(cfg)[2] == ("hidden_sigma0.85", "hidden", "trajectory", 0.85)
    assert check_row("hidden_sigma0.1") and check_row("latent")
    assert not check_row("hidden_sigma2") and not check_row("hidden_sigmax") and not check_row("lat")


def test_front_pairs_dataset_keeps_the_3d_pairs_seen_from_the_front(tmp_path):
    """Pairs whose front view is within the azimuth limit of 0 (either side) stay; side and back fronts
    and the back-view set go; every other file is the source's (linked)."""
    from know3d_core.eval.experiment import front_pairs_dataset

    src = tmp_path / "src"
    asset = src / "assets" / "abc"
    asset.mkdir(parents=True)
    (src / L.MANIFEST_NAME).write_text("{}\n")
    views = [("backview", 0.0), ("3d", 0.0), ("3d", 45.0), ("3d", 180.0), ("3d_perturbed", 352.0), ("3d_perturbed", 135.0)]
    (asset / L.CAMERAS_FILE).write_text(json.dumps({"views": [{"file": f"views/{i:03d}.png", "set": s, "azimuth": a}
                                                               for i, (s, a) in enumerate(views)]}))
    pairs = [{"front": f"views/{i:03d}.png", "back": "views/000.png", "set": s} for i, (s, _) in enumerate(views)]
    (asset / L.PAIRS_FILE).write_text(json.dumps(pairs))
    (asset / L.SS_LATENT_FILE).write_bytes(b"latent")
    dst = front_pairs_dataset(str(src), str(tmp_path / "dst"), 30)
    kept = json.loads((tmp_path / "dst" / "assets" / "abc" / L.PAIRS_FILE).read_text())
    assert [p["front"] for p in kept] == ["views/001.png", "views/004.png"]
    assert (tmp_path / "dst" / "assets" / "abc" / L.SS_LATENT_FILE).read_bytes() == b"latent"
    assert json.loads((tmp_path / "src" / "assets" / "abc" / L.PAIRS_FILE).read_text()) == pairs  # source untouched
    assert dst == str(tmp_path / "dst")


def test_two_sweep_sigmas_on_one_capture_step_are_flagged_in_the_table():
    """With few back-view steps two requested sigmas can snap to one step: the later row names the earlier,
    and the table shows the sigma actually captured (session 6: 0.5 fell on 0.25's step at 4 steps)."""
    from know3d_core.eval.experiment import format_table, same_capture_as

    meta = {"hidden": {"sigma": 0.25, "sigma_actual": 0.3125},
            "hidden_sigma0.5": {"sigma": 0.5, "sigma_actual": 0.3125},
            "hidden_sigma0.85": {"sigma": 0.85, "sigma_actual": 0.8125},
            "none": {"sigma": None, "sigma_actual": None}}
    assert same_capture_as(meta, "hidden_sigma0.5") == "hidden"
    assert same_capture_as(meta, "hidden_sigma0.85") is None and same_capture_as(meta, "none") is None
    stats = {"back_iou_64": 0.5, "iou_64": 0.5, "chamfer": 0.1, "chamfer_back": 0.1, "prompt_swap_accuracy": 0.25,
             "prompt_effect": 0.0}
    table = [{"row": "hidden", "train_source": "trajectory", "sigma": 0.25, "sigma_actual": 0.25, **stats},
             {"row": "hidden_sigma0.5", "train_source": "trajectory", "sigma": 0.5, "sigma_actual": 0.25,
              "same_capture_as": "hidden", **stats}]
    text = format_table({"table": table, "not_run": {}, "chance": 0.25, "gt_prompt_effect": 0.6})
    assert "| hidden | trajectory, 0.25 |" in text  # captured where asked: nothing added
    assert "trajectory, 0.5 (captured at 0.250, as hidden)" in text
