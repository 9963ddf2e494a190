"""Issue 16: ``know3d generate`` checks everything it can before loading a model. Each row of the
issue's table (and more bad input) gives exit code 2 and one line naming the argument and the fix,
leaves no output folder or temporary file behind, and reads no model weight (``_no_weight_reads``);
the pipeline factory is never called. The generation step is the TEST DOUBLE of ``_cli_double.py``."""
import json
import os

import pytest
from PIL import Image

import _cli_double
import _no_weight_reads
from know3d_core import cli
from test_cli_models import _complete


@pytest.fixture
def models(tmp_path):
    return _complete(tmp_path / "m")


def _rgba(path, size=(40, 40)):
    im = Image.new("RGBA", size, (0, 0, 0, 0))
    im.paste(Image.new("RGBA", (size[0] // 2, size[1] // 2), (200, 50, 50, 255)), (size[0] // 4, size[1] // 4))
    im.save(path)
    return str(path)


def _generate(monkeypatch, capsys, models, image, *extra, out=None, prompt="three slats", guard=True):
    m, q = models
    make = _cli_double.factory()
    argv = ["generate", "--models", m, "--qwen", q, "--image", str(image), "--prompt", prompt,
            "--out", str(out), "--normals-size", "32", *extra]
    if guard:
        _no_weight_reads.install(monkeypatch)
    code = cli.main(argv, pipeline_factory=make)
    _no_weight_reads.uninstall(monkeypatch)
    captured = capsys.readouterr()
    return code, captured, make


def _refused(monkeypatch, capsys, models, image, reason, *extra, out, tmp_path):
    code, captured, make = _generate(monkeypatch, capsys, models, image, *extra, out=out)
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1 and reason in lines[0], lines
    assert not hasattr(make, "opts") and not make.pipe.calls  # no model was loaded, nothing generated
    leftovers = [n for _, dirs, files in os.walk(tmp_path) for n in dirs + files if n.startswith(".tmp-")]
    assert leftovers == []
    return lines[0]


# ------------------------------------------------------------------------------------- the table
def test_negative_target_faces(tmp_path, models, monkeypatch, capsys):
    out = tmp_path / "o"
    _refused(monkeypatch, capsys, models, _rgba(tmp_path / "f.png"), "--target-faces -5: give 0", "--target-faces",
             "-5", out=out, tmp_path=tmp_path)
    assert not out.exists()


def test_out_is_a_file_or_cannot_be_written(tmp_path, models, monkeypatch, capsys):
    image = _rgba(tmp_path / "f.png")
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    _refused(monkeypatch, capsys, models, image, "is a file: give a folder", out=a_file, tmp_path=tmp_path)
    _refused(monkeypatch, capsys, models, image, "is a file, so the folder cannot be created",
             out=a_file / "sub", tmp_path=tmp_path)
    locked = tmp_path / "locked"
    os.makedirs(locked)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    m, q = models
    code = cli.main(["generate", "--models", m, "--qwen", q, "--image", image, "--prompt", "x",
                     "--out", str(locked / "o")], pipeline_factory=_cli_double.factory())
    assert code == 2 and f"no permission to write in {locked}" in capsys.readouterr().err
    assert os.listdir(locked) == []


@pytest.mark.parametrize("kind, reason, extra", [
    ("transparent", "the foreground mask is empty", []),
    ("16-bit", "unsupported image mode 'I;16'", []),
    ("1x1", "the foreground is too small", ["--full-frame"]),
])
def test_unusable_images_fail_before_loading_without_an_output_folder(tmp_path, models, monkeypatch, capsys,
                                                                       kind, reason, extra):
    path = tmp_path / f"{kind}.png"
    if kind == "transparent":
        Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(path)
    elif kind == "16-bit":
        Image.new("I;16", (32, 32), 1000).save(path)
    else:
        Image.new("RGBA", (1, 1), (255, 0, 0, 255)).save(path)
    out = tmp_path / "o"
    line = _refused(monkeypatch, capsys, models, path, reason, *extra, out=out, tmp_path=tmp_path)
    assert line.startswith(f"know3d generate: error: --image {path}")
    assert not out.exists()


def test_100kB_prompt_is_refused_before_loading(tmp_path, models, monkeypatch, capsys):
    out = tmp_path / "o"
    code, captured, make = _generate(monkeypatch, capsys, models, _rgba(tmp_path / "f.png"), out=out,
                                     prompt="a" * 100_000)
    assert code == 2 and captured.err.count("\n") == 1
    assert "--prompt: the back-view prompt is" in captured.err and "reads at most 1024" in captured.err
    assert "shorten the description to at most" in captured.err
    assert not make.pipe.calls and not out.exists()


def test_palette_png_with_a_trns_chunk_but_no_transparent_entry(tmp_path, models, monkeypatch, capsys):
    path = tmp_path / "palette.png"
    im = Image.new("P", (32, 32), 1)
    im.putpalette([0, 0, 0, 200, 50, 50] + [0] * 762)
    im.save(path, transparency=bytes([255, 255]))  # tRNS present, every entry opaque
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    line = _refused(monkeypatch, capsys, models, path, "--full-frame", out=tmp_path / "o", tmp_path=tmp_path)
    assert "assume_foreground" not in line
    code, captured, make = _generate(monkeypatch, capsys, models, path, "--full-frame", out=tmp_path / "o2")
    assert code == 0, captured.err
    assert make.pipe.calls[0]["mask"].getextrema() == (255, 255)


def test_a_folder_as_image(tmp_path, models, monkeypatch, capsys):
    folder = tmp_path / "fronts"
    os.makedirs(folder)
    _refused(monkeypatch, capsys, models, folder, "is a folder: give an image file (for a folder of images use "
             "'know3d batch --images FOLDER')", out=tmp_path / "o", tmp_path=tmp_path)


def test_reused_out_with_another_format_keeps_no_stale_file(tmp_path, models, monkeypatch, capsys):
    image, out = _rgba(tmp_path / "f.png"), tmp_path / "o"
    code, _, _ = _generate(monkeypatch, capsys, models, image, "--back-image", out=out)
    assert code == 0 and sorted(os.listdir(out)) == ["back.png", "mesh.glb", "normals.png", "record.json"]
    code, _, _ = _generate(monkeypatch, capsys, models, image, "--format", "obj", out=out)
    assert code == 0 and sorted(os.listdir(out)) == ["mesh.obj", "normals.png", "record.json"]
    with open(out / "record.json", encoding="utf-8") as f:
        assert json.load(f)["outputs"]["mesh"] == "mesh.obj"
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] == []
    (out / "notes.txt").write_text("mine")  # not a know3d result: refused, nothing touched
    _refused(monkeypatch, capsys, models, image, "holds files that are not a know3d result (notes.txt)",
             out=out, tmp_path=tmp_path)
    assert sorted(os.listdir(out)) == ["mesh.obj", "normals.png", "notes.txt", "record.json"]


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_no_description(tmp_path, models, monkeypatch, capsys, prompt):
    code, captured, make = _generate(monkeypatch, capsys, models, _rgba(tmp_path / "f.png"), out=tmp_path / "o",
                                     prompt=prompt)
    assert code == 0 and make.pipe.calls[0]["description"] == prompt
    assert "back view: no description (the unconditional back view" in captured.err


def test_variant_auto_uses_public_weights_without_a_know3d_checkpoint(tmp_path, models, monkeypatch, capsys):
    m, q = models
    image = _rgba(tmp_path / "f.png")
    code, captured, make = _generate(monkeypatch, capsys, models, image, out=tmp_path / "a")
    assert code == 0 and make.pipe.calls[0]["variant"] == "hidden"
    assert "--variant auto: hidden, the Know3D checkpoint" in captured.err
    os.remove(os.path.join(m, "know3d", "know3d_hidden.safetensors"))
    code, captured, make = _generate(monkeypatch, capsys, models, image, out=tmp_path / "b")
    assert code == 0 and make.pipe.calls[0]["variant"] == "multiview"
    assert "--variant auto: multiview" in captured.err and "no Know3D checkpoint found" in captured.err
    with open(tmp_path / "b" / "record.json", encoding="utf-8") as f:
        rec = json.load(f)
    assert rec["inputs"]["variant"] == "multiview" and rec["variant_reason"].startswith("--variant auto: multiview")


# ------------------------------------------------------------------------------------- beyond the table
@pytest.mark.parametrize("extra, reason", [
    (["--seed", str(2 ** 64)], "--seed 18446744073709551616: must fit in 64 bits"),
    (["--sigma", "0"], "--sigma 0.0: a noise level in (0, 1]"),
    (["--sigma", "1.5"], "--sigma 1.5: a noise level in (0, 1]"),
    (["--back-size", "8192x8192"], "--back-size 8192x8192: at most 4096"),
    (["--steps", "100000"], "--steps 100000: at most 1000"),
    (["--back-steps", "5000"], "--back-steps 5000: at most 1000"),
    (["--normals-size", "100000"], "--normals-size 100000: at most 4096"),
    (["--target-faces", "2"], "--target-faces 2: give 0 (keep every face) or at least 4"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
])
def test_more_option_ranges(tmp_path, models, monkeypatch, capsys, extra, reason):
    _refused(monkeypatch, capsys, models, _rgba(tmp_path / "f.png"), reason, *extra, out=tmp_path / "o",
             tmp_path=tmp_path)
    assert not (tmp_path / "o").exists()


def test_more_bad_images_and_masks(tmp_path, models, monkeypatch, capsys):
    image = _rgba(tmp_path / "f.png")
    truncated = tmp_path / "truncated.png"
    with open(image, "rb") as f:
        truncated.write_bytes(f.read()[:60])
    _refused(monkeypatch, capsys, models, truncated, "cannot be read as an image", out=tmp_path / "o",
             tmp_path=tmp_path)
    mask = tmp_path / "mask.png"
    Image.new("L", (10, 10), 255).save(mask)
    _refused(monkeypatch, capsys, models, image, "--mask", "--mask", str(mask), out=tmp_path / "o", tmp_path=tmp_path)
    _refused(monkeypatch, capsys, models, image, "--mask " + str(tmp_path) + " is a folder", "--mask", str(tmp_path),
             out=tmp_path / "o", tmp_path=tmp_path)
    thin = tmp_path / "thin.png"
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    im.paste(Image.new("RGBA", (1, 40), (255, 255, 255, 255)), (30, 10))
    im.save(thin)  # a one-pixel-wide line: the square crop is fine, so this one is accepted
    code, _, _ = _generate(monkeypatch, capsys, models, thin, out=tmp_path / "thin_out")
    assert code == 0


def test_batch_refuses_an_overlong_description_before_loading(tmp_path, models, monkeypatch, capsys):
    m, q = models
    fronts = tmp_path / "fronts"
    os.makedirs(fronts)
    _rgba(fronts / "a.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text("fine\n" + "b" * 5000 + "\n", encoding="utf-8")
    make = _cli_double.factory()
    _no_weight_reads.install(monkeypatch)
    code = cli.main(["batch", "--models", m, "--qwen", q, "--images", str(fronts), "--prompts", str(prompts),
                     "--out", str(tmp_path / "o")], pipeline_factory=make)
    _no_weight_reads.uninstall(monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "--prompts (description 2): the back-view prompt is" in err and not make.pipe.calls


def test_model_paths_of_the_wrong_kind(tmp_path, models, monkeypatch, capsys):
    m, q = models
    image = _rgba(tmp_path / "f.png")
    _refused(monkeypatch, capsys, models, image, f"--know3d {tmp_path} is a folder: give the .safetensors file",
             "--know3d", str(tmp_path), out=tmp_path / "o", tmp_path=tmp_path)
    _refused(monkeypatch, capsys, models, image, f"--lora {tmp_path} is a folder", "--lora", str(tmp_path),
             out=tmp_path / "o", tmp_path=tmp_path)
    code = cli.main(["models", "--models", image])
    assert code == 2 and f"--models {image} is a file" in capsys.readouterr().err
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(2)}, str(plain))
    _refused(monkeypatch, capsys, models, image, f"--know3d {plain}: not a Know3D checkpoint", "--know3d",
             str(plain), out=tmp_path / "o", tmp_path=tmp_path)


def test_variant_auto_follows_the_given_know3d_file(tmp_path, models, monkeypatch, capsys):
    m, _ = models
    given = tmp_path / "mine.safetensors"
    os.replace(os.path.join(m, "know3d", "know3d_hidden.safetensors"), given)
    code, captured, make = _generate(monkeypatch, capsys, models, _rgba(tmp_path / "f.png"), "--know3d", str(given),
                                     out=tmp_path / "o")
    assert code == 0 and make.pipe.calls[0]["variant"] == "hidden"
    assert f"the variant --know3d {given} is trained for (mmdit_hidden)" in captured.err


def test_batch_that_fails_before_its_first_item_leaves_no_folder(tmp_path, models, monkeypatch, capsys):
    m, q = models
    fronts = tmp_path / "fronts"
    os.makedirs(fronts)
    _rgba(fronts / "a.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text("fine\n", encoding="utf-8")

    def cannot_load(opts, check):
        raise FileNotFoundError("weights vanished")

    code = cli.main(["batch", "--models", m, "--qwen", q, "--images", str(fronts), "--prompts", str(prompts),
                     "--out", str(tmp_path / "o")], pipeline_factory=cannot_load)
    assert code == 2 and "cannot load the models: weights vanished" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
