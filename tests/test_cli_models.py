"""``know3d models`` / know3d_core.model_check: every needed file, where it goes, where it comes from.

Expected names are written out here from the public repositories (research/trellis2.md §1.1, §5 and
research/qwen_image.md), not read from model_check's own tables.
"""
import atexit
import json
import os
import shutil
import tempfile

import pytest
import torch
from safetensors.torch import save_file

from know3d_core import cli
from know3d_core.model_check import check_models, read_safetensors_header

OFFICIAL = {  # file stem -> public repository
    "ss_flow_img_dit_1_3B_64_bf16": "microsoft/TRELLIS.2-4B",
    "slat_flow_img2shape_dit_1_3B_512_bf16": "microsoft/TRELLIS.2-4B",
    "slat_flow_img2shape_dit_1_3B_1024_bf16": "microsoft/TRELLIS.2-4B",
    "shape_dec_next_dc_f16c32_fp16": "microsoft/TRELLIS.2-4B",
    "ss_dec_conv3d_16l8_fp16": "microsoft/TRELLIS-image-large",
}
REFERENCES = {
    "sparse_structure_flow_model": "ckpts/ss_flow_img_dit_1_3B_64_bf16",
    "sparse_structure_decoder": "microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16",
    "shape_slat_flow_model_512": "ckpts/slat_flow_img2shape_dit_1_3B_512_bf16",
    "shape_slat_flow_model_1024": "ckpts/slat_flow_img2shape_dit_1_3B_1024_bf16",
    "shape_slat_decoder": "ckpts/shape_dec_next_dc_f16c32_fp16",
}
QWEN_FILES = ["transformer/config.json", "vae/config.json", "text_encoder/config.json",
              "scheduler/scheduler_config.json", "processor/preprocessor_config.json", "processor/tokenizer.json",
              "transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
              "text_encoder/model.safetensors"]


def _st(path, keys=("w",), metadata=None, dtype=torch.float32):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: torch.zeros(2, dtype=dtype) for k in keys}, path, metadata=metadata)
    return path


def _json_file(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return path


def _official(root):
    """Placeholder official TRELLIS.2 folder (names and headers are all the check reads)."""
    _json_file(os.path.join(root, "pipeline.json"), {"name": "Trellis2ImageTo3DPipeline",
                                                    "args": {"models": REFERENCES}})
    for stem in OFFICIAL:
        _json_file(os.path.join(root, "ckpts", stem + ".json"), {"name": "X", "args": {}})
        _st(os.path.join(root, "ckpts", stem + ".safetensors"))
    return str(root)


def _dinov3(folder):
    _json_file(os.path.join(folder, "config.json"), {})
    _st(os.path.join(folder, "model.safetensors"), ["layer.0.attention.o_proj.bias",
                                                    "embeddings.patch_embeddings.weight"])
    return str(folder)


def _qwen(root):
    for name in QWEN_FILES:
        path = os.path.join(root, name)
        if name.endswith(".safetensors"):
            _st(path)
        else:
            _json_file(path, {})
    return str(root)


def _know3d(path, kind="mmdit_hidden", sigma=0.25, layers=(20, 30)):
    meta = {"format": "know3d", "format_version": "1", "content": "delta", "knowledge_kind": kind,
            "knowledge_dim": "6144", "sigma": json.dumps(sigma), "mmdit_layers": json.dumps(list(layers))}
    return _st(path, ["sparse_structure_flow_model.knowledge_proj.linear.weight"], meta)


_DEMO_CACHE = []


def _demo_models():
    """The demo's tiny real models, written once per test session (copied by :func:`_complete`)."""
    if not _DEMO_CACHE:
        from know3d_core.demo_models import write_demo_models

        root = tempfile.mkdtemp(prefix="know3d-test-models-")
        atexit.register(shutil.rmtree, root, True)
        _DEMO_CACHE.append(write_demo_models(root))
    return _DEMO_CACHE[0]


def _complete(tmp_path):
    """Complete, consistent model folders (tiny real networks: the shape check builds them):
    TRELLIS.2 official layout with the Know3D file in ``know3d/``, DINOv3 beside it, Qwen."""
    demo = _demo_models()
    models = shutil.copytree(demo.trellis2, str(tmp_path / "TRELLIS.2-4B"))
    shutil.copytree(demo.dinov3, str(tmp_path / "dinov3-vitl16-pretrain-lvd1689m"))  # sibling folder
    os.makedirs(os.path.join(models, "know3d"))
    shutil.copy(demo.know3d, os.path.join(models, "know3d", "know3d_hidden.safetensors"))
    return models, shutil.copytree(demo.qwen, str(tmp_path / "qwen"))


def _problem_names(check):
    return {f.name for f in check.problems}


def test_empty_folder_lists_every_expected_file(tmp_path, capsys):
    models = str(tmp_path / "models")
    os.makedirs(models)
    code = cli.main(["models", "--models", models, "--qwen", str(tmp_path / "qwen"), "--variant", "hidden"])
    out = capsys.readouterr().out
    assert code == 2
    for stem, repo in OFFICIAL.items():
        for ext in (".json", ".safetensors"):
            line = next(ln for ln in out.splitlines() if ln.strip().endswith(": " + stem + ext))
            block = out[out.index(line):].splitlines()[:3]
            assert block[1].strip() == f"goes in: {os.path.join(models, 'ckpts')}"
            assert repo in block[2] and f"ckpts/{stem}{ext}" in block[2]
    assert "pipeline.json" in out and "huggingface.co/microsoft/TRELLIS.2-4B  file pipeline.json" in out
    assert "facebook/dinov3-vitl16-pretrain-lvd1689m" in out and "dino_v3_vit_l.safetensors" in out
    for name in ["transformer", "vae", "text_encoder", "scheduler", "processor"]:
        assert os.path.join(str(tmp_path / "qwen"), name) in out
    assert "scheduler/scheduler_config.json" in out and "Qwen/Qwen-Image-Edit-2511" in out
    assert "text_encoder/model.safetensors.index.json" in out  # sharded on the hub
    assert "Know3D checkpoint (mmdit_hidden)" in out and "xishuxishu/Know3D" in out
    assert "trellis_2_bf16.safetensors" in out  # the ComfyUI alternative is named


@pytest.mark.parametrize("resolution, present, absent", [
    ("512", "slat_flow_img2shape_dit_1_3B_512_bf16", "slat_flow_img2shape_dit_1_3B_1024_bf16"),
    ("1024", "slat_flow_img2shape_dit_1_3B_1024_bf16", "slat_flow_img2shape_dit_1_3B_512_bf16"),
])
def test_resolution_decides_the_shape_flows(tmp_path, resolution, present, absent):
    names = _problem_names(check_models(str(tmp_path), None, "none", resolution))
    assert present + ".safetensors" in names and absent + ".safetensors" not in names


def test_variants_decide_qwen_and_know3d(tmp_path):
    none = check_models(str(tmp_path), None, "none")
    assert not any("Qwen" in f.role or "Know3D" in f.role or "LoRA" in f.role for f in none.files)
    mv = check_models(str(tmp_path), None, "multiview")
    assert any("Qwen" in f.role for f in mv.files) and not any("Know3D" in f.role for f in mv.files)
    for variant, kind in [("hidden", "mmdit_hidden"), ("latent", "vae_latent"), ("image", "dino_image")]:
        c = check_models(str(tmp_path), None, variant)
        assert any(f.role == f"Know3D checkpoint ({kind})" and not f.ok for f in c.files)


def test_complete_folders_pass(tmp_path, capsys):
    models, qwen = _complete(tmp_path)
    check = check_models(models, qwen, "hidden")
    assert check.ok, check.format()
    assert check.layout == "official"
    assert check.path("dinov3") == str(tmp_path / "dinov3-vitl16-pretrain-lvd1689m")
    assert check.path("know3d").endswith("know3d_hidden.safetensors")
    assert cli.main(["models", "--models", models, "--qwen", qwen]) == 0
    assert "all " in capsys.readouterr().out
    lora = [f for f in check.files if f.key == "lora"][0]
    assert lora.optional and not lora.ok  # optional: reported, not an error


def test_ss_decoder_in_sibling_repo_folder(tmp_path):
    models, _ = _complete(tmp_path)
    for ext in (".json", ".safetensors"):  # microsoft/TRELLIS-image-large next to TRELLIS.2-4B
        dst = tmp_path / "TRELLIS-image-large" / "ckpts" / ("ss_dec_conv3d_16l8_fp16" + ext)
        os.makedirs(dst.parent, exist_ok=True)
        os.replace(os.path.join(models, "ckpts", "ss_dec_conv3d_16l8_fp16" + ext), dst)
    check = check_models(models, None, "none")
    assert check.ok, check.format()
    assert check.path("sparse_structure_decoder") == str(tmp_path / "TRELLIS-image-large" / "ckpts" /
                                                         "ss_dec_conv3d_16l8_fp16.safetensors")


def test_truncated_and_invalid_files(tmp_path):
    models, qwen = _complete(tmp_path)
    path = os.path.join(models, "ckpts", "shape_dec_next_dc_f16c32_fp16.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-3])  # an interrupted download
    assert "truncated" in read_safetensors_header(path).problem
    with open(os.path.join(models, "ckpts", "ss_flow_img_dit_1_3B_64_bf16.json"), "w") as f:
        f.write("{not json")
    check = check_models(models, qwen, "hidden")
    bad = {f.name: f.problem for f in check.problems}
    assert "truncated" in bad["shape_dec_next_dc_f16c32_fp16.safetensors"]
    assert "not valid JSON" in bad["ss_flow_img_dit_1_3B_64_bf16.json"]
    with open(path, "wb") as f:
        f.write(b"hello")
    assert "not a safetensors file" in read_safetensors_header(path).problem


def test_sharded_qwen_weights_name_missing_shards(tmp_path):
    models, qwen = _complete(tmp_path)
    d = os.path.join(qwen, "text_encoder")
    os.remove(os.path.join(d, "model.safetensors"))
    _json_file(os.path.join(d, "model.safetensors.index.json"),
               {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    _st(os.path.join(d, "model-00001-of-00002.safetensors"))
    check = check_models(models, qwen, "hidden")
    assert _problem_names(check) == {"model-00002-of-00002.safetensors"}
    assert check.problems[0].folder == d
    assert "Qwen/Qwen-Image-Edit-2511  file text_encoder/model-00002-of-00002.safetensors" in check.problems[0].source


def _comfy(root, flow_dtype=torch.bfloat16, vae_prefixes=("struct_dec.", "shape_dec.")):
    flows = [f"model.{p}blocks.0.self_attn.to_qkv.weight" for p in ("structure_model.", "img2shape_512.", "img2shape.")]
    _st(os.path.join(root, "diffusion_models", "trellis_2_bf16.safetensors"), flows, dtype=flow_dtype)
    _st(os.path.join(root, "vae", "trellis_2_shape_vae_bf16.safetensors"),
        [p + "blocks.0.weight" for p in vae_prefixes])
    _st(os.path.join(root, "clip_vision", "dino_v3_vit_l.safetensors"),
        ["layer.23.attention.o_proj.bias", "embeddings.patch_embeddings.weight"])
    return str(root)


def test_comfy_single_files(tmp_path):
    root = _comfy(tmp_path / "comfy_models")
    check = check_models(root, None, "none", shapes=False)  # placeholder tensors: names only
    assert check.layout == "comfy" and check.ok, check.format()
    assert check.path("comfy_flows").endswith("trellis_2_bf16.safetensors")
    assert check.path("dinov3").endswith(os.path.join("clip_vision", "dino_v3_vit_l.safetensors"))


def test_comfy_quantised_and_incomplete_files_are_named(tmp_path):
    root = _comfy(tmp_path / "int8", flow_dtype=torch.int8, vae_prefixes=("shape_dec.",))
    bad = {f.key: f.problem for f in check_models(root, None, "none").problems}
    assert "quantised" in bad["comfy_flows"] and "I8" in bad["comfy_flows"]
    assert "struct_dec" in bad["comfy_vae"]


def test_comfy_is_512_metadata(tmp_path):
    root = tmp_path / "c512"
    _comfy(root)
    _st(os.path.join(root, "diffusion_models", "trellis_2_bf16.safetensors"),
        ["structure_model.x", "img2shape.x"], metadata={"is_512": "true"}, dtype=torch.bfloat16)
    assert check_models(str(root), None, "none", "512", shapes=False).ok
    bad = check_models(str(root), None, "none", "1024", shapes=False).problems
    assert [f.key for f in bad] == ["comfy_flows"] and "shape_slat_flow_model_1024" in bad[0].problem


@pytest.mark.parametrize("variant, kind, expect", [
    ("hidden", "mmdit_hidden", None),
    ("latent", "mmdit_hidden", "trained for mmdit_hidden knowledge, but --variant latent injects vae_latent"),
    ("image", "vae_latent", "use --variant latent with this file"),
])
def test_know3d_kind_must_match_the_variant(tmp_path, variant, kind, expect):
    models, qwen = _complete(tmp_path)
    path = _know3d(str(tmp_path / "mine.safetensors"), kind)
    check = check_models(models, qwen, variant, know3d=path, shapes=False)  # placeholder know3d file
    k3 = [f for f in check.files if f.key == "know3d"][0]
    assert k3.path == path
    if expect is None:
        assert check.ok
    else:
        assert expect in k3.problem and not check.ok


def test_know3d_found_by_kind_and_ambiguity(tmp_path):
    models, qwen = _complete(tmp_path)
    _know3d(os.path.join(models, "know3d_latent.safetensors"), "vae_latent")
    assert check_models(models, qwen, "latent", shapes=False).path("know3d").endswith("know3d_latent.safetensors")
    assert check_models(models, qwen, "hidden", shapes=False).path("know3d").endswith("know3d_hidden.safetensors")
    _know3d(os.path.join(models, "know3d", "other.safetensors"), "mmdit_hidden")
    bad = check_models(models, qwen, "hidden", shapes=False).problems
    assert len(bad) == 1 and "choose one with --know3d" in bad[0].problem


def test_know3d_other_problems(tmp_path):
    models, qwen = _complete(tmp_path)
    plain = _st(str(tmp_path / "plain.safetensors"))
    assert "not a Know3D checkpoint" in check_models(models, qwen, "hidden", know3d=plain).problems[0].problem
    bad = check_models(models, qwen, "hidden", sigma=0.85).problems  # the demo file: sigma 0.25, layers [1, 2]
    assert "sigma 0.25" in bad[0].problem and "--sigma 0.85" in bad[0].problem
    bad = check_models(models, qwen, "hidden", layers=[20, 30]).problems
    assert "[1, 2]" in bad[0].problem and "--layers [20, 30]" in bad[0].problem
    missing = check_models(models, qwen, "hidden", know3d=str(tmp_path / "nope.safetensors")).problems
    assert missing[0].name == "nope.safetensors" and missing[0].path is None


def test_explicit_lora_and_dinov3_are_checked(tmp_path):
    models, qwen = _complete(tmp_path)
    not_lora = _st(str(tmp_path / "x.safetensors"))
    bad = check_models(models, qwen, "hidden", lora=not_lora, dinov3=not_lora).problems
    assert {f.key for f in bad} == {"lora", "dinov3"}
    lora = _st(str(tmp_path / "l.safetensors"), ["diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight"])
    check = check_models(models, qwen, "hidden", lora=lora, dinov3=str(tmp_path / "dinov3-vitl16-pretrain-lvd1689m"),
                         shapes=False)  # a placeholder LoRA (one factor): its kind is found by its keys
    assert check.ok and check.path("lora") == lora
