"""Issue 16 row 1 / deliverable 2: ``know3d models`` builds every network from its config on the meta
device and compares keys, shapes and dtypes with the safetensors headers, so a config that does not
fit its weights, or another network's weights under a checkpoint's name, is reported before any
loading, with the file, the first mismatching keys and the fix. Every test asserts that no weight
was read (``_no_weight_reads``: reads stop at each file's header; tensor readers refuse)."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import _no_weight_reads
from know3d_core import cli
from know3d_core.demo_models import QWEN_TRANSFORMER, write_demo_know3d
from know3d_core.model_check import check_models
from know3d_core.trellis2.tiny import write_tiny_trellis2
from test_cli_models import _complete

CKPTS = ("ss_flow_img_dit_1_3B_64_bf16", "slat_flow_img2shape_dit_1_3B_512_bf16",
         "slat_flow_img2shape_dit_1_3B_1024_bf16", "shape_dec_next_dc_f16c32_fp16", "ss_dec_conv3d_16l8_fp16")


@pytest.fixture
def folders(tmp_path):
    models, qwen = _complete(tmp_path)
    return models, qwen, tmp_path


def _models_cli(monkeypatch, capsys, models, qwen, *extra):
    opened = _no_weight_reads.install(monkeypatch)
    code = cli.main(["models", "--models", models, "--qwen", qwen, "--variant", "hidden", *extra])
    _no_weight_reads.uninstall(monkeypatch)
    out = capsys.readouterr().out
    assert opened, "the check read no header at all"
    return code, out


def _edit_json(path, **args):
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    target = doc["args"] if "args" in doc else doc
    target.update(args)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)


def _ckpt(models, stem, ext):
    return os.path.join(models, "ckpts", stem + ext)


def test_complete_real_folders_pass_without_reading_weights(folders, monkeypatch, capsys):
    models, qwen, _ = folders
    code, out = _models_cli(monkeypatch, capsys, models, qwen)
    assert code == 0, out
    # pipeline.json + 5 networks x (.json, .safetensors) for 1024_cascade, DINOv3, Know3D, the Qwen
    # folder + 5 configs + 3 weight files + the tokenizer: 1 + 10 + 1 + 1 + 10 = 23
    assert "all 23 model files found" in out


def test_config_that_does_not_fit_its_weights(folders, monkeypatch, capsys):
    models, qwen, _ = folders
    _edit_json(_ckpt(models, CKPTS[1], ".json"), model_channels=64)  # the file holds a 32-wide flow
    code, out = _models_cli(monkeypatch, capsys, models, qwen)
    assert code == 2
    assert f"PROBLEM  shape flow 512 (safetensors): {_ckpt(models, CKPTS[1], '.safetensors')}" in out
    assert "does not fit SLatFlowModel" in out and "wrong shapes" in out
    assert "input_layer.weight (file (32, 32), model (64, 32))" in out and "Fix:" in out


def test_weights_of_another_network_under_a_checkpoint_name(folders, monkeypatch, capsys):
    models, qwen, _ = folders
    shutil.copy(_ckpt(models, CKPTS[0], ".safetensors"), _ckpt(models, CKPTS[3], ".safetensors"))
    code, out = _models_cli(monkeypatch, capsys, models, qwen)
    assert code == 2
    line = out[out.index("PROBLEM  shape decoder (safetensors)"):].splitlines()[1]
    assert "does not fit FlexiDualGridVaeDecoder" in line
    assert "missing keys" in line and "from_latent.weight" in line and "unexpected keys" in line


def test_quantised_weights_are_named(folders, monkeypatch, capsys):
    models, qwen, _ = folders
    path = _ckpt(models, CKPTS[0], ".safetensors")
    sd = load_file(path)
    sd["input_layer.weight"] = sd["input_layer.weight"].to(torch.int8)
    save_file(sd, path)
    code, out = _models_cli(monkeypatch, capsys, models, qwen)
    assert code == 2 and "input_layer.weight (I8)" in out and "bf16/fp16/fp32" in out


def test_reference_saved_rope_phases_pass_the_shape_check(folders, monkeypatch, capsys):
    models, qwen, _ = folders
    path = _ckpt(models, CKPTS[0], ".safetensors")
    with open(_ckpt(models, CKPTS[0], ".json"), encoding="utf-8") as f:
        args = json.load(f)["args"]
    sd = load_file(path)
    head = args["model_channels"] // args["num_heads"]
    sd["rope_phases"] = torch.ones(args["resolution"] ** 3, head // 2, dtype=torch.complex64)
    save_file(sd, path)
    assert _models_cli(monkeypatch, capsys, models, qwen)[0] == 0  # values are checked at load
    sd["rope_phases"] = torch.ones(7, head // 2, dtype=torch.complex64)
    save_file(sd, path)
    code, out = _models_cli(monkeypatch, capsys, models, qwen)
    assert code == 2 and "buffer rope_phases has shape (7," in out


def test_know3d_checkpoint_of_other_flows(folders, monkeypatch, capsys):
    models, qwen, tmp_path = folders
    wide = write_tiny_trellis2(str(tmp_path / "wide"), seed=1, model_channels=64, num_heads=2, num_blocks=2,
                               cond_channels=32, with_decoders=False)
    other = write_demo_know3d(str(tmp_path / "know3d_wide.safetensors"), wide)
    code, out = _models_cli(monkeypatch, capsys, models, qwen, "--know3d", other)
    assert code == 2
    assert "PROBLEM  Know3D checkpoint (mmdit_hidden)" in out and "the branch does not fit this model" in out


def test_backview_lora_for_another_model(folders, monkeypatch, capsys):
    models, qwen, tmp_path = folders
    inner = QWEN_TRANSFORMER["num_attention_heads"] * QWEN_TRANSFORMER["attention_head_dim"]
    lora = str(tmp_path / "lora.safetensors")
    name = "diffusion_model.transformer_blocks.0.attn.to_q"
    save_file({f"{name}.lora_A.weight": torch.zeros(2, 2 * inner), f"{name}.lora_B.weight": torch.zeros(inner, 2)},
              lora)
    code, out = _models_cli(monkeypatch, capsys, models, qwen, "--lora", lora)
    assert code == 2 and f"does not fit transformer_blocks.0.attn.to_q.weight ({inner}, {inner})" in out
    save_file({"diffusion_model.single_blocks.0.linear1.lora_A.weight": torch.zeros(2, 4),
               "diffusion_model.single_blocks.0.linear1.lora_B.weight": torch.zeros(4, 2)}, lora)
    code, out = _models_cli(monkeypatch, capsys, models, qwen, "--lora", lora)
    assert code == 2 and "match no module of QwenImageTransformer2DModel" in out


def test_dinov3_and_qwen_configs_that_do_not_fit(folders, monkeypatch, capsys):
    models, qwen, tmp_path = folders
    _edit_json(os.path.join(tmp_path, "dinov3-vitl16-pretrain-lvd1689m", "config.json"), intermediate_size=96)
    _edit_json(os.path.join(qwen, "transformer", "config.json"), num_layers=QWEN_TRANSFORMER["num_layers"] + 1)
    _edit_json(os.path.join(qwen, "vae", "config.json"), z_dim=8)
    code, out = _models_cli(monkeypatch, capsys, models, qwen)
    assert code == 2
    problems = {ln.split(":")[0].strip() for ln in out.splitlines() if ln.startswith("  PROBLEM")}
    assert problems == {"PROBLEM  DINOv3 image encoder", "PROBLEM  Qwen MMDiT weights", "PROBLEM  Qwen VAE weights"}
    assert "does not match the DINOv3 config" in out and "up_proj" in out
    assert "missing (e.g. transformer_blocks.3." in out


def test_text_encoder_of_another_width(folders, monkeypatch, capsys):
    models, qwen, _ = folders
    _edit_json(os.path.join(qwen, "transformer", "config.json"), joint_attention_dim=24)
    check = check_models(models, qwen, "hidden")
    bad = {f.key: f.problem for f in check.problems}
    assert "qwen_text_encoder" in bad and "MMDiT reads 24-wide text" in bad["qwen_text_encoder"]
    assert "txt_in.weight (file (32, 16), config (32, 24))" in bad["qwen_transformer"]
    _edit_json(os.path.join(qwen, "transformer", "config.json"), joint_attention_dim=16)
    path = os.path.join(qwen, "text_encoder", "config.json")
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    doc["text_config"]["vocab_size"] = 7
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    bad = {f.key: f.problem for f in check_models(models, qwen, "hidden").problems}
    assert list(bad) == ["qwen_text_encoder"] and "config.json says (7, 16)" in bad["qwen_text_encoder"]


def test_comfy_single_files_are_shape_checked(folders, monkeypatch, capsys):
    models, _, tmp_path = folders
    root = tmp_path / "comfy"
    for sub in ("diffusion_models", "vae", "clip_vision"):
        os.makedirs(root / sub)
    prefixes = {CKPTS[0]: "structure_model.", CKPTS[1]: "img2shape_512.", CKPTS[2]: "img2shape."}
    flows = {p + k: v for stem, p in prefixes.items()
             for k, v in load_file(_ckpt(models, stem, ".safetensors")).items()}
    vae = {p + k: v for stem, p in ((CKPTS[4], "struct_dec."), (CKPTS[3], "shape_dec."))
           for k, v in load_file(_ckpt(models, stem, ".safetensors")).items()}
    save_file(flows, str(root / "diffusion_models" / "trellis_2_bf16.safetensors"))
    save_file(vae, str(root / "vae" / "trellis_2_shape_vae_bf16.safetensors"))
    shutil.copy(os.path.join(tmp_path, "dinov3-vitl16-pretrain-lvd1689m", "model.safetensors"),
                root / "clip_vision" / "dino_v3_vit_l.safetensors")
    opened = _no_weight_reads.install(monkeypatch)
    check = check_models(str(root), None, "none", "1024_cascade")
    _no_weight_reads.uninstall(monkeypatch)
    assert check.layout == "comfy" and check.ok, check.format()
    assert len(opened) >= 3
    del flows["img2shape.blocks.1.mlp.mlp.0.weight"]
    save_file(flows, str(root / "diffusion_models" / "trellis_2_bf16.safetensors"))
    bad = {f.key: f.problem for f in check_models(str(root), None, "none").problems}
    assert list(bad) == ["comfy_flows"] and "missing keys (1): blocks.1.mlp.mlp.0.weight" in bad["comfy_flows"]


def test_the_guard_catches_weight_reads(folders, monkeypatch):
    """The no-read assertion can fail: a loader call, or reading a file past its header, is caught."""
    models, _, _ = folders
    path = _ckpt(models, CKPTS[0], ".safetensors")
    _no_weight_reads.install(monkeypatch)
    try:
        from know3d_core.trellis2.loading import load_model

        with pytest.raises(_no_weight_reads.WeightRead):
            load_model(_ckpt(models, CKPTS[0], ""))
        with pytest.raises(_no_weight_reads.WeightRead, match="past its header"):
            with open(path, "rb") as f:
                f.read()
    finally:
        _no_weight_reads.uninstall(monkeypatch)


def test_the_guard_leaves_no_stand_in_behind(monkeypatch):
    """A module first imported while the guard is on binds its stand-ins; uninstall repairs it."""
    import sys
    import types

    import safetensors

    _no_weight_reads.install(monkeypatch)
    late = types.ModuleType("late_import_under_the_guard")
    late.safe_open = safetensors.safe_open  # what `from safetensors import safe_open` binds now
    sys.modules[late.__name__] = late
    try:
        assert late.safe_open is not _no_weight_reads._REAL_SAFE_OPEN
        _no_weight_reads.uninstall(monkeypatch)
        assert late.safe_open is _no_weight_reads._REAL_SAFE_OPEN is safetensors.safe_open
    finally:
        del sys.modules[late.__name__]
