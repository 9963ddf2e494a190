"""``know3d eval`` end to end on small folders, and LPIPS from user files (random weights, official layouts)."""
import csv
import json
import os

import pytest
import torch
import trimesh
from safetensors.torch import save_file

from know3d_core.cli import main
from know3d_core.data import layout as L
from know3d_core.eval import geometry as G
from know3d_core.eval.lpips import LPIPS, NETS
from know3d_core.mesh import Mesh, save_mesh

SMALL = ["--samples", "4000", "--points", "512", "--image-size", "32", "--mesh-resolution", "32", "--quiet"]


def _sphere(radius, centre):
    s = trimesh.creation.icosphere(subdivisions=3, radius=radius)
    return torch.tensor(s.vertices, dtype=torch.float32) + torch.tensor(centre), torch.tensor(s.faces)


def _read_json(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _write_gt(root):
    """Ground truth in the dataset's file format (mesh.safetensors, Z up) as plain item folders."""
    for name, centre in (("a", (0.0, 0.0, 0.0)), ("b", (0.0, 0.05, 0.0))):
        v, f = _sphere(0.3, centre)
        os.makedirs(os.path.join(root, name))
        save_file({L.KEY_VERTICES: v, L.KEY_FACES: f.int()}, os.path.join(root, name, L.MESH_FILE))
        occ = G.surface_voxels(v, f, 64)
        save_file({L.KEY_OCCUPANCY: occ}, os.path.join(root, name, L.OCCUPANCY_FILE))


def test_eval_command_writes_the_report(tmp_path):
    """Variant "same": the ground-truth meshes exported as GLB (Y up) and read back (Z up): a wrong up
    axis would move them, so CD 0 and IoU 1 prove the round trip. Variant "stage1": occupancies only,
    the second one naming its ground truth in record.json."""
    gt, same, stage1, out = (str(tmp_path / n) for n in ("gt", "same", "stage1", "out"))
    _write_gt(gt)
    for name, centre in (("a", (0.0, 0.0, 0.0)), ("b", (0.0, 0.05, 0.0))):
        v, f = _sphere(0.3, centre)
        os.makedirs(os.path.join(same, name))
        save_mesh(Mesh(v, f), os.path.join(same, name, "mesh.glb"))
    for name, target in (("a", None), ("x", "b")):
        os.makedirs(os.path.join(stage1, name))
        v, f = _sphere(0.3, (0.0, 0.0, 0.0))
        save_file({L.KEY_OCCUPANCY: G.surface_voxels(v, f, 64)}, os.path.join(stage1, name, L.OCCUPANCY_FILE))
        if target:
            with open(os.path.join(stage1, name, "record.json"), "w") as fh:
                json.dump({"gt": target}, fh)
    assert main(["eval", "--pred", f"same={same}", "--pred", f"stage1={stage1}", "--gt", gt, "--out", out] + SMALL) == 0
    for name in ("eval.json", "eval.csv", "eval.png", "worst.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    report = _read_json(os.path.join(out, "eval.json"))
    agg = report["aggregate"]
    assert agg["same"]["chamfer"]["mean"] == 0.0 and agg["same"]["iou_mesh"]["mean"] == 1.0
    assert agg["same"]["psnr_back"]["n"] == 0 and agg["same"]["psnr_back"]["n_missing"] == 2  # infinite
    with open(os.path.join(out, "eval.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["variant"], r["item"], r["gt"]) for r in rows] == [
        ("same", "a", "a"), ("same", "b", "b"), ("stage1", "a", "a"), ("stage1", "x", "b")]
    by = {(r["variant"], r["item"]): r for r in rows}
    assert float(by["stage1", "a"]["iou_64"]) == 1.0 and float(by["stage1", "x"]["iou_64"]) < 1.0
    assert by["stage1", "a"]["iou_mesh"] == ""  # no mesh: not available


def test_eval_command_bad_input_exit_2(tmp_path, capsys):
    gt = str(tmp_path / "gt")
    _write_gt(gt)
    assert main(["eval", "--pred", str(tmp_path / "nope"), "--gt", gt, "--out", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    orphan = tmp_path / "pred" / "zzz"
    orphan.mkdir(parents=True)
    save_file({L.KEY_OCCUPANCY: torch.zeros(64, 64, 64, dtype=torch.bool)}, str(orphan / L.OCCUPANCY_FILE))
    assert main(["eval", "--pred", str(tmp_path / "pred"), "--gt", gt, "--out", str(tmp_path / "o")]) == 2
    assert "'zzz'" in capsys.readouterr().err
    assert main(["eval", "--pred", str(tmp_path / "pred"), "--gt", gt, "--out", str(tmp_path / "o"),
                 "--lpips-heads", "x.pth"]) == 2


def _official_lpips_files(folder, net):
    """Random tensors in the official layouts: torchvision's full state dict (features + classifier) and
    the lpips package's heads; heads are non-negative, as trained LPIPS heads are."""
    spec, _, channels = NETS[net]
    backbone = {}
    for i, s in enumerate(spec):
        if s[0] == "conv":
            _, c_in, c_out, k, _, _ = s
            backbone[f"features.{i}.weight"] = torch.randn(c_out, c_in, k, k) * (2.0 / (c_in * k * k)) ** 0.5
            backbone[f"features.{i}.bias"] = torch.zeros(c_out)
    backbone["classifier.1.weight"] = torch.randn(8, 4)  # ignored by design
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(channels)}
    torch.save(backbone, os.path.join(folder, f"{net}-backbone.pth"))
    torch.save(heads, os.path.join(folder, f"{net}.pth"))
    return os.path.join(folder, f"{net}-backbone.pth"), os.path.join(folder, f"{net}.pth")


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_loads_official_layout_and_measures(tmp_path, net):
    """LPIPS(x, x) = 0 (identical features); LPIPS(x, y) > 0 with positive heads; symmetric."""
    backbone, heads = _official_lpips_files(str(tmp_path), net)
    model = LPIPS.from_files(backbone, heads, net)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)  # vgg's 4 pools: 32 -> 2 px at the last tap
    assert torch.equal(model(x, x), torch.zeros(2))
    d = model(x, y)
    assert d.shape == (2,) and bool((d > 0).all())
    assert torch.allclose(d, model(y, x))


def test_lpips_rejects_other_layouts(tmp_path):
    backbone, heads = _official_lpips_files(str(tmp_path), "alex")
    with pytest.raises(ValueError, match=r"alex.pth are not a torchvision alexnet checkpoint: missing features\.0\.bias"):
        LPIPS.from_files(heads, heads, "alex")  # the heads file is not a backbone
    h = torch.load(heads, weights_only=True)
    h["lin0.model.1.weight"] = torch.rand(1, 3, 1, 1)
    torch.save(h, str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="bad.pth.*wrong shapes"):
        LPIPS.from_files(backbone, str(tmp_path / "bad.pth"), "alex")


def test_eval_command_with_lpips(tmp_path):
    gt, out = str(tmp_path / "gt"), str(tmp_path / "out")
    _write_gt(gt)
    backbone, heads = _official_lpips_files(str(tmp_path), "alex")
    assert main(["eval", "--pred", gt, "--gt", gt, "--out", out, "--lpips-backbone", backbone,
                 "--lpips-heads", heads] + SMALL) == 0
    report = _read_json(os.path.join(out, "eval.json"))
    assert report["aggregate"]["gt"]["lpips_back"]["mean"] == 0.0


def test_eval_reads_a_dataset_as_ground_truth(tmp_path):
    """--gt as written by know3d data prepare: manifest rows, only status ok assets are items (id = sha256)."""
    root = str(tmp_path / "ds")
    rows = [{"sha256": "a" * 64, "status": L.STATUS_OK}, {"sha256": "b" * 64, "status": L.STATUS_FAILED}]
    for row in rows:
        folder = L.asset_dir(root, row["sha256"])
        os.makedirs(folder)
        v, f = _sphere(0.3, (0.0, 0.0, 0.0))
        save_file({L.KEY_VERTICES: v, L.KEY_FACES: f.int()}, os.path.join(folder, L.MESH_FILE))
    with open(L.manifest_path(root), "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    pred = tmp_path / "pred" / ("a" * 64)
    pred.mkdir(parents=True)
    v, f = _sphere(0.3, (0.0, 0.0, 0.0))
    save_file({L.KEY_VERTICES: v, L.KEY_FACES: f.int()}, str(pred / L.MESH_FILE))
    out = str(tmp_path / "out")
    assert main(["eval", "--pred", str(tmp_path / "pred"), "--gt", root, "--out", out, "--worst", "0"] + SMALL) == 0
    report = _read_json(os.path.join(out, "eval.json"))
    assert [r["gt"] for r in report["items"]] == ["a" * 64]
    assert report["items"][0]["chamfer"] == 0.0 and report["items"][0]["iou_64"] == 1.0


def test_eval_commands_module_is_torch_free():
    """The CLI imports every command family at start: ours must not pull torch (house rule)."""
    import subprocess
    import sys

    code = "import sys, know3d_core.eval.commands as c; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__))).returncode == 0
