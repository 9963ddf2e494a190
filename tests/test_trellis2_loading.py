"""Loading TRELLIS.2 checkpoints: official folder layout, strict errors, dtype choice, ComfyUI files."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from know3d_core.sparse import SparseTensor
from know3d_core.trellis2.loading import (
    GEOMETRY_MODELS,
    CheckpointError,
    load_comfy_flow_file,
    load_model,
    load_pipeline_model,
    load_pipeline_models,
    read_pipeline_config,
    resolve_checkpoint,
    split_state_dict_by_prefix,
)
from know3d_core.trellis2.slat_flow import SLatFlowModel
from know3d_core.trellis2.sparse_structure_flow import SparseStructureFlowModel
from know3d_core.trellis2.tiny import random_state_dict, tiny_flow_args, write_checkpoint, write_tiny_trellis2

SS_REF = "microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_trellis2(str(tmp_path_factory.mktemp("trellis2") / "TRELLIS.2-4B"), seed=7,
                               with_decoders=False)


def _ss_stem(folder):
    return os.path.join(folder, "ckpts", "ss_flow_img_dit_1_3B_64_bf16")


def _rewrite(stem, tmp_path, edit):
    """Copy checkpoint ``stem`` to tmp_path with its state dict edited by ``edit(sd)``."""
    out = str(tmp_path / os.path.basename(stem))
    with open(stem + ".json") as f:
        doc = json.load(f)
    sd = load_file(stem + ".safetensors")
    edit(sd)
    write_checkpoint(out, doc["name"], doc["args"], sd)
    return out


# ----------------------------------------------------------------------------- official layout
def test_tiny_folder_is_in_the_official_layout(tiny_folder):
    cfg = read_pipeline_config(tiny_folder)
    assert cfg.models["sparse_structure_flow_model"] == "ckpts/ss_flow_img_dit_1_3B_64_bf16"
    assert cfg.default_pipeline_type == "1024_cascade"
    assert cfg.sampler_params("sparse_structure_sampler") == {
        "sigma_min": 1e-5, "steps": 12, "guidance_strength": 7.5, "guidance_rescale": 0.7,
        "guidance_interval": [0.6, 1.0], "rescale_t": 5.0}
    assert cfg.sampler_params("shape_slat_sampler")["rescale_t"] == 3.0
    mean, std = cfg.normalization("shape_slat_normalization")
    assert mean.shape == std.shape == (32,) and bool((std > 0).all())
    for key, ref in cfg.models.items():
        stem = os.path.join(tiny_folder, ref)
        with open(stem + ".json") as f:
            doc = json.load(f)
        assert set(doc) == {"name", "args"}
        # flows are stored all-bf16, like the official files
        assert {v.dtype for v in load_file(stem + ".safetensors").values()} == {torch.bfloat16}


def test_tiny_folder_is_deterministic(tmp_path, tiny_folder):
    again = write_tiny_trellis2(str(tmp_path / "again"), seed=7, with_decoders=False)
    other = write_tiny_trellis2(str(tmp_path / "other"), seed=8, with_decoders=False)
    name = "ckpts/slat_flow_img2shape_dit_1_3B_512_bf16.safetensors"
    a, b, c = (load_file(os.path.join(f, name)) for f in (tiny_folder, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_layer.weight"], c["input_layer.weight"])


@pytest.mark.parametrize("dtype, body", [(None, torch.bfloat16), ("float32", torch.float32),
                                         ("fp16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_load_model_dtype_choice(tiny_folder, dtype, body):
    model = load_pipeline_model(tiny_folder, "sparse_structure_flow_model", dtype=dtype)
    assert isinstance(model, SparseStructureFlowModel) and not model.training
    sd = model.state_dict()
    file_sd = load_file(_ss_stem(tiny_folder) + ".safetensors")
    assert set(sd) == set(file_sd)
    assert sd["blocks.1.mlp.mlp.2.weight"].dtype == body and model.dtype == body
    for key in ("blocks.0.modulation", "blocks.0.norm2.weight", "input_layer.weight", "out_layer.bias",
                "t_embedder.mlp.0.weight", "adaLN_modulation.1.weight", "blocks.0.self_attn.q_rms_norm.gamma"):
        assert sd[key].dtype == torch.float32
        assert torch.equal(sd[key], file_sd[key].float())  # bf16 -> fp32 is exact
    if body != torch.float16:
        assert torch.equal(sd["blocks.1.mlp.mlp.2.weight"].float(), file_sd["blocks.1.mlp.mlp.2.weight"].float())


def test_loaded_models_run(tiny_folder):
    ss = load_pipeline_model(tiny_folder, "sparse_structure_flow_model")
    with torch.no_grad():
        v = ss(torch.randn(1, 8, 16, 16, 16), torch.tensor([1000.0]), torch.randn(1, 5, 32))
    assert v.shape == (1, 8, 16, 16, 16) and torch.isfinite(v).all()
    shape = load_pipeline_model(tiny_folder, "shape_slat_flow_model_1024", dtype="float32")
    assert isinstance(shape, SLatFlowModel) and shape.resolution == 64
    coords = torch.tensor([[0, 1, 2, 3], [0, 63, 0, 5], [0, 7, 7, 7]], dtype=torch.int32)
    with torch.no_grad():
        out = shape(SparseTensor(torch.randn(3, 32), coords, (64, 64, 64)), torch.tensor([500.0]),
                    torch.randn(1, 4, 32))
    assert out.feats.shape == (3, 32) and torch.isfinite(out.feats).all()


# ----------------------------------------------------------------------------- strict errors
def test_missing_key_names_file_and_key(tiny_folder, tmp_path):
    stem = _rewrite(_ss_stem(tiny_folder), tmp_path, lambda sd: sd.pop("blocks.1.cross_attn.to_kv.bias"))
    with pytest.raises(CheckpointError) as e:
        load_model(stem)
    msg = str(e.value)
    assert stem + ".safetensors" in msg and "missing keys (1): blocks.1.cross_attn.to_kv.bias" in msg


def test_unexpected_key_names_file_and_key(tiny_folder, tmp_path):
    def add(sd):
        # two keys no class of ours or of the reference has (rope_phases is a known reference
        # buffer since issue 16.7: checked and dropped: tests/test_validate_reference_buffers.py)
        sd["pos_table"] = torch.zeros(3)
        sd["blocks.0.extra.weight"] = torch.zeros(2)
    stem = _rewrite(_ss_stem(tiny_folder), tmp_path, add)
    with pytest.raises(CheckpointError) as e:
        load_model(stem + ".safetensors")
    msg = str(e.value)
    assert stem + ".safetensors" in msg and "unexpected keys (2)" in msg
    assert "pos_table" in msg and "blocks.0.extra.weight" in msg


def test_wrong_shape_names_file_key_and_shapes(tiny_folder, tmp_path):
    def shrink(sd):
        sd["blocks.0.self_attn.q_rms_norm.gamma"] = sd["blocks.0.self_attn.q_rms_norm.gamma"][:, :8]
    stem = _rewrite(_ss_stem(tiny_folder), tmp_path, shrink)
    with pytest.raises(CheckpointError) as e:
        load_model(stem)
    msg = str(e.value)
    assert stem + ".safetensors" in msg
    assert "blocks.0.self_attn.q_rms_norm.gamma (file (4, 8), model (4, 16))" in msg


def test_unknown_arg_and_class_name_the_config(tiny_folder, tmp_path):
    stem = str(tmp_path / "bad")
    model = SparseStructureFlowModel(**tiny_flow_args("ss", resolution=4))
    write_checkpoint(stem, "SparseStructureFlowModel", {**tiny_flow_args("ss", resolution=4), "warp_factor": 9},
                     model.state_dict())
    with pytest.raises(CheckpointError, match=r"bad\.json.*warp_factor"):
        load_model(stem)
    write_checkpoint(stem, "TurboEncabulator", tiny_flow_args("ss", resolution=4), model.state_dict())
    with pytest.raises(CheckpointError, match="TurboEncabulator"):
        load_model(stem)


# ----------------------------------------------------------------------------- TRELLIS v1 decoder reference
def _fake_pair(stem):
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        f.write("{}")
    with open(stem + ".safetensors", "wb") as f:
        f.write(b"")


def test_ss_decoder_reference_resolves_locally(tmp_path):
    folder = tmp_path / "TRELLIS.2-4B"
    folder.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        resolve_checkpoint(str(folder), SS_REF, "sparse_structure_decoder")
    msg = str(e.value)
    assert "sparse_structure_decoder" in msg and "microsoft/TRELLIS-image-large" in msg
    assert "ss_dec_conv3d_16l8_fp16.json" in msg and str(folder / "ckpts") in msg
    assert str(tmp_path / "TRELLIS-image-large" / "ckpts" / "ss_dec_conv3d_16l8_fp16") in msg

    sibling = str(tmp_path / "TRELLIS-image-large" / "ckpts" / "ss_dec_conv3d_16l8_fp16")
    _fake_pair(sibling)
    assert resolve_checkpoint(str(folder), SS_REF) == sibling
    inside = str(folder / "ckpts" / "ss_dec_conv3d_16l8_fp16")
    _fake_pair(inside)
    assert resolve_checkpoint(str(folder), SS_REF) == inside  # the folder's own copy wins


def test_missing_official_checkpoint_says_which(tiny_folder):
    with pytest.raises(KeyError, match="tex_slat_flow_model_512"):
        load_pipeline_model(tiny_folder, "tex_slat_flow_model_512")
    with pytest.raises(FileNotFoundError, match="pipeline.json"):
        read_pipeline_config(os.path.dirname(tiny_folder))


# ----------------------------------------------------------------------------- ComfyUI single file
def test_comfy_single_file_splits_by_prefix_and_matches_official_load(tiny_folder, tmp_path):
    prefixes = {"structure_model.": "sparse_structure_flow_model", "img2shape_512.": "shape_slat_flow_model_512",
                "img2shape.": "shape_slat_flow_model_1024"}
    cfg = read_pipeline_config(tiny_folder)
    merged = {}
    for prefix, key in prefixes.items():
        sd = load_file(os.path.join(tiny_folder, cfg.models[key]) + ".safetensors")
        merged.update({prefix + k: v for k, v in sd.items()})
    path = str(tmp_path / "trellis2_comfy.safetensors")
    save_file(merged, path)
    models = load_comfy_flow_file(path, dtype="float32")
    assert set(models) == set(prefixes.values())
    assert models["shape_slat_flow_model_1024"].resolution == 1024 // 16  # 16-voxel latent cells
    assert models["shape_slat_flow_model_512"].resolution == 512 // 16
    for key, model in models.items():
        official = load_pipeline_model(tiny_folder, key, dtype="float32")
        assert type(model) is type(official)
        assert model.config == {**official.config, "mlp_ratio": model.config["mlp_ratio"]}
        a, b = model.state_dict(), official.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
    x = torch.randn(1, 8, 16, 16, 16)
    t, cond = torch.tensor([700.0]), torch.randn(1, 3, 32)
    with torch.no_grad():
        assert torch.equal(models["sparse_structure_flow_model"](x, t, cond),
                           load_pipeline_model(tiny_folder, "sparse_structure_flow_model", dtype="float32")(x, t, cond))


def test_comfy_split_rejects_foreign_keys():
    sd = {"model.diffusion_model.img2shape.input_layer.weight": torch.zeros(1),
          "model.diffusion_model.img2shape_512.input_layer.weight": torch.zeros(2)}
    parts = split_state_dict_by_prefix(sd, ["img2shape.", "img2shape_512."])
    assert parts["img2shape."]["input_layer.weight"].shape == (1,)
    assert parts["img2shape_512."]["input_layer.weight"].shape == (2,)
    with pytest.raises(CheckpointError, match=r"x\.safetensors.*first_stage_model\.w"):
        split_state_dict_by_prefix({"first_stage_model.w": torch.zeros(1)}, ["img2shape."], "x.safetensors")


def test_comfy_loader_infers_non_default_widths(tmp_path):
    args = tiny_flow_args("shape512", model_channels=48, num_blocks=3, num_heads=2, cond_channels=24)
    model = SLatFlowModel(**args)
    sd = random_state_dict(model, 11)
    path = str(tmp_path / "one.safetensors")
    save_file({"img2shape_512." + k: v.to(torch.bfloat16) for k, v in sd.items()}, path)
    loaded = load_comfy_flow_file(path)["shape_slat_flow_model_512"]
    widths = ("model_channels", "num_blocks", "num_heads", "cond_channels")
    assert tuple(getattr(loaded, k) for k in widths) == tuple(args[k] for k in widths) == (48, 3, 2, 24)
    assert loaded.dtype == torch.bfloat16


def test_full_tiny_folder_with_decoders_loads_the_geometry_path(tmp_path):
    folder = write_tiny_trellis2(str(tmp_path / "TRELLIS.2-4B"), seed=3)
    cfg = read_pipeline_config(folder)
    assert cfg.models["sparse_structure_decoder"] == SS_REF  # the official TRELLIS v1 reference
    models = load_pipeline_models(folder)
    assert set(models) == set(GEOMETRY_MODELS)
    assert [type(models[k]).__name__ for k in GEOMETRY_MODELS] == [
        "SparseStructureFlowModel", "SparseStructureDecoder", "SLatFlowModel", "SLatFlowModel",
        "FlexiDualGridVaeDecoder"]
    dec = load_file(os.path.join(folder, "ckpts", "shape_dec_next_dc_f16c32_fp16.safetensors"))
    assert {v.dtype for v in dec.values()} == {torch.float16}
    ss_dec = load_file(os.path.join(folder, "ckpts", "ss_dec_conv3d_16l8_fp16.safetensors"))
    assert ss_dec["input_layer.weight"].dtype == torch.float32
    assert {v.dtype for v in ss_dec.values()} == {torch.float16, torch.float32}


def test_comfy_is_512_metadata_marks_img2shape_as_the_512_model(tmp_path):
    model = SLatFlowModel(**tiny_flow_args("shape512"))
    sd = {"img2shape." + k: v.to(torch.bfloat16) for k, v in random_state_dict(model, 2).items()}
    path = str(tmp_path / "t512.safetensors")
    save_file(sd, path, metadata={"is_512": "true"})
    assert set(load_comfy_flow_file(path)) == {"shape_slat_flow_model_512"}
    save_file(sd, path)
    assert set(load_comfy_flow_file(path)) == {"shape_slat_flow_model_1024"}
