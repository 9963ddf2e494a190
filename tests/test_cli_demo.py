"""The ``know3d`` command on the real pipeline with the demo's tiny random models (as CI runs it).

* ``know3d demo`` end to end in a fresh process (back view, capture, injection, both stages, mesh,
  renders), keeping its models for the next test;
* ``know3d batch`` (2 images x 2 prompts) SIGKILLed right after its first item, then rerun: exactly
  four complete outputs and no temporary file.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import trimesh
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

pytestmark = pytest.mark.slow


def _know3d(*argv):
    """``know3d ARGV`` in a fresh process (``python -m know3d_core.cli``, as installed by pip)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "know3d_core.cli", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, models = root / "out", root / "models"
    proc = _know3d("demo", "--out", str(out), "--keep-models", str(models), "--normals-size", "64")
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr, out, models


def test_demo_runs_every_stage_and_says_the_weights_are_random(demo):
    code, stdout, stderr, out, models = demo
    assert code == 0, stderr[-3000:]
    assert "RANDOM" in stdout and "meaningless" in stdout
    assert sorted(os.listdir(out)) == ["mesh.glb", "normals.png", "record.json"]  # hidden: no back image
    with open(out / "record.json", encoding="utf-8") as f:
        rec = json.load(f)
    stages = set(rec["stage_seconds"])
    assert {"back_view", "sparse_structure", "shape_slat"} <= stages, stages
    assert rec["knowledge"]["kind"] == "mmdit_hidden"  # captured and injected
    assert rec["inputs"]["variant"] == "hidden" and rec["inputs"]["resolution"] == "512"
    mesh = trimesh.load(str(out / "mesh.glb"), force="mesh")
    assert len(mesh.faces) == rec["mesh"]["faces"] > 0
    with Image.open(out / "normals.png") as im:
        assert im.size == (4 * 64, 64)
        assert im.getextrema() != ((25, 25), (25, 25), (25, 25))  # something was rendered
    for stage in ("back_view", "sparse_structure", "shape_slat_512"):
        assert stage in stderr  # a progress bar per sampling stage


def _finished(out):
    return sorted(n for n in os.listdir(out) if not n.startswith(".") and os.path.isdir(os.path.join(out, n)))


def _temporary(out):
    found = []
    for dirpath, dirs, files in os.walk(out):
        found += [n for n in dirs + files if n.startswith(".tmp-")]
    return found


def test_batch_killed_after_the_first_item_resumes_to_exactly_four_outputs(demo, tmp_path):
    code, _, stderr, _, models = demo
    assert code == 0, stderr[-3000:]
    fronts = tmp_path / "fronts"
    os.makedirs(fronts)
    shutil.copy(models / "front.png", fronts / "chair.png")
    with Image.open(models / "front.png") as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(fronts / "mirrored.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("three vertical slats\na solid panel\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["batch", "--models", str(models / "TRELLIS.2-4B"), "--variant", "none", "--resolution", "512",
            "--steps", "1", "--dtype", "float32", "--images", str(fronts), "--prompts", str(prompts),
            "--out", str(out), "--normals-size", "32"]

    proc = _know3d(*argv)
    start = time.time()
    while not (os.path.isdir(out) and _finished(out) and _temporary(out)):  # item 2 is being written
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < 240, "no item finished in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    before = _finished(out)
    assert 1 <= len(before) < 4 and _temporary(out)  # a half-written item was left behind ...

    rerun = _know3d(*argv)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    after = _finished(out)
    assert len(after) == 4 and set(before) <= set(after)
    assert _temporary(out) == []  # ... and removed by the resumed run
    for item in after:
        assert sorted(os.listdir(out / item)) == ["mesh.glb", "normals.png", "record.json"]
        with open(out / item / "record.json", encoding="utf-8") as f:
            assert json.load(f)["mesh"]["faces"] > 0
    assert f"{len(before)} skipped" in stdout and f"{4 - len(before)} done" in stdout
    assert os.path.isfile(out / "summary.csv") and os.path.isfile(out / "contact_sheet.png")
