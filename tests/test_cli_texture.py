"""``know3d generate --texture`` on the tiny demo models plus tiny texture networks (real loading,
real sampling, real bake): the GLB carries a PBR material and UVs (or vertex colours), record.json
times every texture step, bad texture options exit 2 before any model loads."""
import json
import os
import shutil

import pytest

from know3d_core import cli

from _pipeline_helpers import geometry_demo

trimesh = pytest.importorskip("trimesh")
pytest.importorskip("xatlas")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The demo folder: its TRELLIS.2 folder holds the tiny texture networks too."""
    demo = geometry_demo(tmp_path_factory)
    return demo.root, demo.image


def _generate(models, out, *extra):
    root, image = models
    return cli.main(["generate", "--models", str(root), "--variant", "none", "--resolution", "512", "--image", image,
                     "--prompt", "x", "--out", str(out), "--device", "cpu", "--steps", "2", "--floaters", "0",
                     "--quiet", "--texture", *extra])


def test_generate_texture_writes_a_pbr_glb_and_times_each_step(models, tmp_path, capsys):
    out = tmp_path / "o"
    assert _generate(models, out, "--texture-size", "64", "--texture-faces", "3000") == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["mesh.glb", "normals.png", "record.json"]
    scene = trimesh.load(str(out / "mesh.glb"), file_type="glb")
    geom = next(iter(scene.geometry.values()))
    material = geom.visual.material
    assert isinstance(material, trimesh.visual.material.PBRMaterial)
    assert material.baseColorTexture.size == (64, 64) and material.metallicRoughnessTexture.size == (64, 64)
    assert geom.visual.uv.shape == (len(geom.vertices), 2)
    with open(out / "record.json", encoding="utf-8") as f:
        rec = json.load(f)
    assert rec["inputs"]["texture"] == {"mode": "pbr", "size": 64, "faces": 3000, "back_view_condition": True}
    assert rec["mesh"]["faces"] <= 3000 and rec["texture"]["faces"] == len(geom.faces)
    steps = {"tex_slat", "texture_uv_unwrap", "texture_rasterize", "texture_snap", "texture_sample",
             "texture_dilate", "texture_write_glb"}
    assert steps <= set(rec["stage_seconds"])
    assert 0 < rec["texture"]["texel_coverage"] <= 1


def test_generate_texture_vertex_mode(models, tmp_path):
    out = tmp_path / "v"
    assert _generate(models, out, "--texture-mode", "vertex") == 0
    geom = next(iter(trimesh.load(str(out / "mesh.glb"), file_type="glb").geometry.values()))
    assert geom.visual.kind == "vertex" and geom.visual.vertex_colors.shape == (len(geom.vertices), 4)


@pytest.mark.parametrize("extra, message", [
    (["--format", "obj"], "--texture writes a GLB"),
    (["--texture-size", "32"], "--texture-size 32: between 64 and 8192"),
])
def test_bad_texture_options_exit_2_before_loading(models, tmp_path, capsys, extra, message):
    assert _generate(models, tmp_path / "bad", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_batch_texture_writes_a_textured_glb_per_item(models, tmp_path):
    root, image = models
    fronts = tmp_path / "fronts"
    fronts.mkdir()
    shutil.copy(image, fronts / "a.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("x\n", encoding="utf-8")
    out = tmp_path / "batch"
    code = cli.main(["batch", "--models", str(root), "--variant", "none", "--resolution", "512", "--images",
                     str(fronts), "--prompts", str(prompts), "--out", str(out), "--device", "cpu", "--steps", "2",
                     "--floaters", "0", "--quiet", "--texture", "--texture-size", "64"])
    assert code == 0
    items = [d for d in os.listdir(out) if os.path.isdir(out / d) and not d.startswith(".")]
    assert len(items) == 1
    geom = next(iter(trimesh.load(str(out / items[0] / "mesh.glb"), file_type="glb").geometry.values()))
    assert isinstance(geom.visual.material, trimesh.visual.material.PBRMaterial)
    with open(out / items[0] / "record.json", encoding="utf-8") as f:
        assert json.load(f)["inputs"]["texture"]["size"] == 64


def test_comfy_texture_vae_is_found_by_its_keys_or_named_with_its_source(tmp_path):
    import torch
    from safetensors.torch import save_file

    from know3d_core.errors import UsageError
    from know3d_core.generate.texture import find_comfy_texture_vae

    (tmp_path / "vae").mkdir()
    save_file({"shape_dec.from_latent.weight": torch.zeros(2, 2)}, str(tmp_path / "vae" / "shape.safetensors"))
    with pytest.raises(UsageError, match="trellis_2_texture_vae_bf16.safetensors from huggingface.co/Comfy-Org"):
        find_comfy_texture_vae(str(tmp_path), "1024_cascade")
    renamed = tmp_path / "vae" / "my_texture_vae.safetensors"
    save_file({"txt_dec.from_latent.weight": torch.zeros(2, 2)}, str(renamed))
    assert find_comfy_texture_vae(str(tmp_path), "1024_cascade") == str(renamed)
    with pytest.raises(UsageError, match="--resolution 512: their diffusion file holds the 1024 texture flow only"):
        find_comfy_texture_vae(str(tmp_path), "512")


def test_missing_texture_files_exit_2_before_any_model_loads(models, tmp_path, capsys, monkeypatch):
    root, image = models
    copy = tmp_path / "models"
    shutil.copytree(root, copy)
    os.remove(copy / "TRELLIS.2-4B" / "ckpts" / "tex_dec_next_dc_f16c32_fp16.safetensors")
    import know3d_core.pipeline as pipeline_mod

    def no_load(*a, **k):
        raise AssertionError("models were loaded")

    monkeypatch.setattr(pipeline_mod.Know3DPipeline, "from_pretrained", no_load)
    code = _generate((copy, image), tmp_path / "o")
    err = capsys.readouterr().err
    assert code == 2 and "--texture: tex_slat_decoder: checkpoint 'ckpts/tex_dec_next_dc_f16c32_fp16'" in err
    assert "Fix: the TRELLIS.2 folder" in err
