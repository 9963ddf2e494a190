"""The ``know3d`` command around the pipeline: arguments, exit codes, outputs, batch resume and shards.

The generation step is the TEST DOUBLE in ``_cli_double.py`` (a cube mesh); the real pipeline on
demo models is exercised in ``test_cli_demo.py``.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import trimesh
from PIL import Image

from know3d_core import cli
from know3d_core.generate import validate as generate_validate
from know3d_core.batch import plan_items

import _cli_double
from test_cli_models import _complete, _know3d

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture
def models(tmp_path):
    """Placeholder model folders that pass the file check (the double never reads them)."""
    return _complete(tmp_path / "m")


def _rgba(path, color=(200, 50, 50)):
    im = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    im.paste(Image.new("RGBA", (20, 24), color + (255,)), (10, 8))
    im.save(path)
    return str(path)


def _inputs(tmp_path, n_images=2, prompts=("a hollow backrest", "a solid back")):
    d = tmp_path / "fronts"
    os.makedirs(d, exist_ok=True)
    for i in range(n_images):
        _rgba(d / f"obj{i}.png", (50 * i, 100, 200))
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return str(d), str(p)


FAST = ["--normals-size", "32"]


def _run(argv, delay=0.0):
    make = _cli_double.factory(delay)
    if argv and argv[0] in ("generate", "batch") and "--normals-size" not in argv and "--help" not in argv:
        argv = list(argv) + FAST
    return cli.main(argv, pipeline_factory=make), make


def _stderr_lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def _entries(folder):
    """Every path under ``folder`` (relative), to look for temporary leftovers."""
    out = []
    for dirpath, dirs, files in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        out += [os.path.normpath(os.path.join(rel, n)) for n in dirs + files]
    return out


# ------------------------------------------------------------------------------------- generate
def test_generate_writes_every_output(tmp_path, models, capsys):
    m, q = models
    out = tmp_path / "out"
    image = _rgba(tmp_path / "front.png")
    code, make = _run(["generate", "--models", m, "--qwen", q, "--image", image, "--prompt", "three slats",
                       "--out", str(out), "--seed", "4", "--back-image", "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["back.png", "mesh.glb", "normals.png", "record.json"]
    call = make.pipe.calls[0]
    assert (call["description"], call["variant"], call["seed"], call["pipeline_type"]) == (
        "three slats", "hidden", 4, "1024_cascade")
    mesh = trimesh.load(str(out / "mesh.glb"), force="mesh")
    assert len(mesh.faces) == 12 and len(mesh.vertices) == 8
    with Image.open(out / "normals.png") as im:
        assert im.size == (4 * 32, 32)
    with open(out / "record.json", encoding="utf-8") as f:
        rec = json.load(f)
    assert rec["inputs"]["prompt"] == "three slats" and rec["inputs"]["seed"] == 4
    assert rec["inputs"]["variant"] == "hidden" and rec["inputs"]["device"] == "cpu"
    assert len(rec["inputs"]["image_sha256"]) == 64
    assert rec["mesh"] == {"vertices": 8, "faces": 12, "format": "glb", "raw_vertices": 8, "raw_faces": 12}
    assert all(os.stat(out / n).st_mode & 0o044 == 0o044 for n in os.listdir(out))  # readable by others
    assert rec["stage_seconds"] == {"sparse_structure": 0.01, "shape_slat_512": 0.02}
    assert rec["peak_vram_gb"] == 3.0
    assert rec["versions"]["torch"] and rec["versions"]["know3d"]
    assert rec["models"]["know3d"].endswith("know3d_hidden.safetensors")
    assert rec["outputs"] == {"mesh": "mesh.glb", "back_image": "back.png", "normals": "normals.png",
                              "normals_views": ["front", "back", "left", "right"]}


def test_generate_removes_leftovers_of_killed_runs_only(tmp_path, models):
    m, q = models
    out = tmp_path / "out"
    dead = next(p for p in range(4_000_000, 4_100_000) if not generate_validate._pid_alive(p))
    os.makedirs(tmp_path / f".tmp-out-{dead}")  # the temporary sibling of a SIGKILLed generate
    os.makedirs(tmp_path / f".tmp-out-{os.getppid()}")  # a live process (our parent) is left alone
    code, _ = _run(["generate", "--models", m, "--qwen", q, "--image", _rgba(tmp_path / "f.png"), "--prompt", "x",
                    "--out", str(out), "--quiet"])
    assert code == 0
    assert sorted(os.listdir(out)) == ["mesh.glb", "normals.png", "record.json"]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".tmp-")) == [f".tmp-out-{os.getppid()}"]


@pytest.mark.parametrize("fmt", ["obj", "ply", "stl"])
def test_generate_other_formats_without_back_view(tmp_path, models, fmt):
    m, q = models
    out = tmp_path / "out"
    code, _ = _run(["generate", "--models", m, "--qwen", q, "--image", _rgba(tmp_path / "f.png"), "--prompt", "x",
                    "--out", str(out), "--format", fmt, "--quiet"])
    assert code == 0
    assert sorted(os.listdir(out)) == sorted([f"mesh.{fmt}", "normals.png", "record.json"])
    assert len(trimesh.load(str(out / f"mesh.{fmt}"), force="mesh").faces) == 12


def test_full_frame_and_mask(tmp_path, models, capsys):
    m, q = models
    opaque = tmp_path / "opaque.png"
    Image.new("RGB", (30, 20), (10, 200, 10)).save(opaque)
    base = ["generate", "--models", m, "--qwen", q, "--image", str(opaque), "--prompt", "x", "--quiet"]
    code, _ = _run(base + ["--out", str(tmp_path / "a")])
    assert code == 2 and "has no transparency" in _stderr_lines(capsys)[0]
    code, make = _run(base + ["--out", str(tmp_path / "b"), "--full-frame"])
    assert code == 0 and make.pipe.calls[0]["mask"].getextrema() == (255, 255)
    mask = tmp_path / "mask.png"
    Image.new("L", (30, 20), 0).save(mask)  # an all-black mask: no foreground, refused before loading
    code, make = _run(base + ["--out", str(tmp_path / "c"), "--mask", str(mask)])
    assert code == 2 and "the foreground mask is empty" in _stderr_lines(capsys)[0] and not make.pipe.calls
    with Image.new("L", (30, 20), 0) as im:
        im.paste(255, (5, 5, 20, 15))
        im.save(mask)
    code, make = _run(base + ["--out", str(tmp_path / "c"), "--mask", str(mask)])
    assert code == 0 and make.pipe.calls[0]["mask"].getextrema() == (0, 255)


# ------------------------------------------------------------------------------------- bad arguments
def _bad_argument_cases(tmp_path, m, q):
    image = _rgba(tmp_path / "front.png")
    broken = tmp_path / "broken.png"
    broken.write_text("this is not a png")
    wrong = _know3d(str(tmp_path / "hidden_ckpt.safetensors"), "mmdit_hidden")
    base = ["--models", m, "--qwen", q, "--prompt", "x", "--out", str(tmp_path / "o")]
    return {
        "missing image": (["generate", "--image", str(tmp_path / "nope.png")] + base, "does not exist"),
        "unreadable image": (["generate", "--image", str(broken)] + base, "cannot be read as an image"),
        "unknown variant": (["generate", "--image", image, "--variant", "fancy"] + base, "invalid choice: 'fancy'"),
        "wrong-kind checkpoint": (["generate", "--image", image, "--variant", "latent", "--know3d", wrong] + base,
                                  "trained for mmdit_hidden knowledge, but --variant latent injects vae_latent"),
        "missing models": (["generate", "--image", image, "--models", str(tmp_path / "empty"), "--prompt", "x",
                            "--out", str(tmp_path / "o"), "--variant", "none"], "model files missing"),
        "no qwen": (["generate", "--image", image, "--models", m, "--prompt", "x", "--out", str(tmp_path / "o")],
                    "needs --qwen DIR"),
        "bad shard": (["batch", "--images", str(tmp_path), "--prompts", str(broken), "--out", str(tmp_path / "o"),
                       "--models", m, "--shard", "3/2"], "--shard '3/2'"),
        "bad steps": (["generate", "--image", image, "--steps", "0"] + base, "must be at least 1"),
        "bad layers": (["generate", "--image", image, "--layers", "a,b"] + base, "comma-separated list"),
    }


@pytest.mark.parametrize("case", ["missing image", "unreadable image", "unknown variant", "wrong-kind checkpoint",
                                  "missing models", "no qwen", "bad shard", "bad steps", "bad layers"])
def test_bad_arguments_exit_2_with_a_one_line_reason(tmp_path, models, capsys, case):
    os.makedirs(tmp_path / "empty", exist_ok=True)
    argv, reason = _bad_argument_cases(tmp_path, *models)[case]
    code, make = _run(argv)
    lines = _stderr_lines(capsys)
    assert code == 2
    assert reason in lines[0], lines
    assert "Traceback" not in "\n".join(lines)
    assert not make.pipe.calls  # nothing was generated
    assert not os.path.exists(tmp_path / "o") or not os.listdir(tmp_path / "o")


def test_generate_runs_on_comfy_single_files(tmp_path, capsys):
    """A --models folder holding only ComfyUI's files (diffusion file, shape VAE, clip_vision DINOv3)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from know3d_core.demo_models import write_demo_models, write_demo_trellis2
    from know3d_core.trellis2.loading import read_pipeline_config, resolve_checkpoint

    paths = write_demo_models(str(tmp_path / "demo"), seed=0)
    write_demo_trellis2(paths.trellis2, seed=0, ss_resolution=16)  # the official 16^3 structure latent
    config = read_pipeline_config(paths.trellis2)
    sd = lambda key: load_file(resolve_checkpoint(paths.trellis2, config.models[key]) + ".safetensors")  # noqa: E731
    root = tmp_path / "comfy_models"
    for sub in ("diffusion_models", "vae", "clip_vision"):
        (root / sub).mkdir(parents=True)
    flows = {"structure_model.": "sparse_structure_flow_model", "img2shape_512.": "shape_slat_flow_model_512",
             "img2shape.": "shape_slat_flow_model_1024"}
    save_file({"model.diffusion_model." + p + k: v for p, key in flows.items() for k, v in sd(key).items()},
              str(root / "diffusion_models" / "trellis_2_bf16.safetensors"))
    save_file({p + k: v for p, key in {"struct_dec.": "sparse_structure_decoder",
                                        "shape_dec.": "shape_slat_decoder"}.items() for k, v in sd(key).items()},
              str(root / "vae" / "trellis_2_shape_vae_bf16.safetensors"))
    shutil.copy(os.path.join(paths.dinov3, "model.safetensors"), root / "clip_vision" / "dino_v3_vit_l.safetensors")
    out = tmp_path / "o"
    code = cli.main(["generate", "--models", str(root), "--variant", "none", "--resolution", "512",
                     "--image", _rgba(tmp_path / "f.png"), "--prompt", "x", "--out", str(out), "--device", "cpu",
                     "--steps", "2", "--floaters", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["mesh.glb", "normals.png", "record.json"]


def test_pipeline_failure_exits_1_with_one_line(tmp_path, models, capsys):
    m, q = models
    code, _ = _run(["generate", "--models", m, "--qwen", q, "--image", _rgba(tmp_path / "f.png"),
                    "--prompt", "please FAIL", "--out", str(tmp_path / "o"), "--quiet"])
    lines = _stderr_lines(capsys)
    assert code == 1 and len(lines) == 1
    assert "failed: RuntimeError: the double was asked to fail for this prompt" in lines[0]
    assert not os.path.exists(tmp_path / "o")  # no partial or empty output folder ...
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]  # ... and no temporary sibling


def test_help_and_version(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for word in ("generate", "batch", "models", "demo", "Exit codes"):
        assert word in text
    assert cli.main(["batch", "--help"]) == 0
    assert "--shard K/N" in capsys.readouterr().out
    assert cli.main([]) == 2


# ------------------------------------------------------------------------------------- batch
def _batch_argv(tmp_path, m, out, *extra):
    images, prompts = _inputs(tmp_path)
    return ["batch", "--models", m, "--variant", "none", "--images", images, "--prompts", prompts,
            "--out", str(out), "--quiet", *FAST, *extra]


def _finished(out):
    return sorted(n for n in os.listdir(out) if os.path.isdir(os.path.join(out, n)) and not n.startswith("."))


def test_batch_every_image_times_every_prompt(tmp_path, models, capsys):
    out = tmp_path / "out"
    code, make = _run(_batch_argv(tmp_path, models[0], out))
    assert code == 0
    images, prompts = _inputs(tmp_path)
    plan = plan_items(sorted(os.path.join(images, n) for n in os.listdir(images)), ["a hollow backrest", "a solid back"])
    assert _finished(out) == sorted(it.id for it in plan)
    assert len(make.pipe.calls) == 4
    for it in plan:
        assert sorted(os.listdir(out / it.id)) == ["mesh.glb", "normals.png", "record.json"]
        with open(out / it.id / "record.json", encoding="utf-8") as f:
            assert json.load(f)["batch"]["id"] == it.id
    with open(out / "summary.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["done"] * 4 and {r["faces"] for r in rows} == {"12"}
    with Image.open(out / "contact_sheet.png") as im:
        assert im.height == 4 * (128 + 14)
    assert "4 items: 4 done" in capsys.readouterr().out
    code, make = _run(_batch_argv(tmp_path, models[0], out))  # everything finished: nothing runs
    assert code == 0 and not make.pipe.calls
    assert "4 skipped" in capsys.readouterr().out


def test_batch_failing_item_is_reported_and_the_batch_goes_on(tmp_path, models, capsys):
    out = tmp_path / "out"
    images, prompts = _inputs(tmp_path, prompts=("fine", "FAIL here"))
    code, _ = _run(["batch", "--models", models[0], "--variant", "none", "--images", images, "--prompts", prompts,
                    "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    assert len(_finished(out)) == 2
    assert captured.err.count("FAILED ") == 2 and "the double was asked to fail" in captured.err
    with open(out / "summary.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["status"] for r in rows) == ["done", "done", "failed", "failed"]
    assert all("asked to fail" in r["error"] for r in rows if r["status"] == "failed")
    assert [e for e in _entries(out) if ".tmp-" in e] == []


def test_shards_cover_the_batch_exactly_once(tmp_path, models):
    out = tmp_path / "out"
    code1, make1 = _run(_batch_argv(tmp_path, models[0], out, "--shard", "1/2"))
    first = set(_finished(out))
    code2, make2 = _run(_batch_argv(tmp_path, models[0], out, "--shard", "2/2"))
    second = set(_finished(out)) - first
    assert code1 == code2 == 0
    assert len(first) == len(second) == 2 and len(first | second) == 4
    assert len(make1.pipe.calls) == len(make2.pipe.calls) == 2  # no item generated twice
    with open(out / "summary.csv", encoding="utf-8") as f:
        statuses = sorted(r["status"] for r in csv.DictReader(f))
    assert statuses == ["done", "done", "skipped", "skipped"] or statuses == ["done", "done", "finished", "finished"]


def test_batch_refuses_other_settings_in_the_same_out(tmp_path, models, capsys):
    out = tmp_path / "out"
    assert _run(_batch_argv(tmp_path, models[0], out, "--shard", "1/2"))[0] == 0
    code, make = _run(_batch_argv(tmp_path, models[0], out, "--shard", "2/2", "--seed", "7"))
    assert code == 2 and "seed 0 -> 7" in _stderr_lines(capsys)[0] and not make.pipe.calls


def _spawn(argv, delay):
    env = dict(os.environ, KNOW3D_TEST_DELAY=str(delay), PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, os.path.join(HERE, "_cli_double.py"), *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until(proc, ready, what, timeout=60):
    """Poll ``ready()`` until it holds while the batch runs; fail (killing it) if it ends first or never does."""
    start = time.time()
    while time.time() - start < timeout:
        if ready():
            return
        if proc.poll() is not None:
            raise AssertionError(f"batch ended early: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no {what} in time")


def _wait_for_first_item(proc, out):
    _wait_until(proc, lambda: os.path.isdir(out) and _finished(out), "item finished")


def _wait_for_temporary(proc, out):
    """Until an item's temporary folder exists under ``out`` (the batch is inside an item)."""
    _wait_until(proc, lambda: any(".tmp-" in e for e in _entries(out)), "item started")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_batch_interrupted_part_way_cleans_up_and_resumes(tmp_path, models, sig):
    """Ctrl-C / SIGTERM (a scheduler's pre-emption): exit 130, no temporary folder left, and a rerun
    completes the batch (SIGKILL on the real pipeline: test_cli_demo.py)."""
    out = tmp_path / "out"
    argv = _batch_argv(tmp_path, models[0], out)
    proc = _spawn(argv, delay=0.8)
    _wait_for_first_item(proc, str(out))
    _wait_for_temporary(proc, out)  # inside the second item (a fixed sleep was flaky on a loaded CPU)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    done_before = _finished(out)
    assert 1 <= len(done_before) < 4
    assert proc.returncode == 130 and "interrupted" in err
    assert [e for e in _entries(out) if ".tmp-" in e] == []  # cleaned up at once
    rerun = _spawn(argv, delay=0)
    stdout, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err
    assert len(_finished(out)) == 4 and set(done_before) <= set(_finished(out))
    assert [e for e in _entries(out) if ".tmp-" in e] == []
    for item in _finished(out):
        assert sorted(os.listdir(out / item)) == ["mesh.glb", "normals.png", "record.json"]
    assert f"{len(done_before)} skipped" in stdout
