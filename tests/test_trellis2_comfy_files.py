"""ComfyUI's native TRELLIS.2 files (Comfy-Org/TRELLIS.2): diffusion file + shape VAE file.

The Comfy-format files are written at test time from a tiny official-layout folder, re-keyed the
way ComfyUI stores them (read from ComfyUI 0.33.0: flows under structure_model. / img2shape_512. /
img2shape., decoders under struct_dec. / shape_dec., official key suffixes, sparse conv weights
kept [Co, 3, 3, 3, Ci]); the networks loaded from them must equal the official-layout ones. With
COMFYUI_DIR + COMFYUI_PYTHON set, ComfyUI's own classes load the same files
(tests/data/comfyui/trellis2_comfy_files_checks.py) and their outputs are compared with ours and
with the reference TRELLIS.2 golden outputs.
"""
import copy
import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from _comfy_server import COMFYUI_DIR, COMFYUI_PYTHON, skip_reason

from know3d_core.sampling.flow_euler import OFFICIAL_SAMPLER_PARAMS, FlowEulerGuidanceIntervalSampler
from know3d_core.sparse import SparseTensor
from know3d_core.trellis2.comfy_files import (
    DEFAULT_PIPELINE_CONFIG,
    default_pipeline_config,
    infer_shape_decoder_args,
    infer_sparse_structure_decoder_args,
    load_comfy_flows,
    load_comfy_model_set,
    load_comfy_vae_file,
)
from know3d_core.trellis2.loading import GEOMETRY_MODELS, CheckpointError, load_pipeline_models, read_pipeline_config
from know3d_core.trellis2.shape_decoder import FlexiDualGridVaeDecoder
from know3d_core.trellis2.sparse_structure_decoder import SparseStructureDecoder
from know3d_core.trellis2.tiny import random_state_dict, write_tiny_trellis2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "golden_decoders")
FLOW_PREFIX = {"sparse_structure_flow_model": "structure_model.", "shape_slat_flow_model_512": "img2shape_512.",
               "shape_slat_flow_model_1024": "img2shape."}
VAE_PREFIX = {"sparse_structure_decoder": "struct_dec.", "shape_slat_decoder": "shape_dec."}
COND_CHANNELS = 32  # write_tiny_trellis2's default cond width


# ----------------------------------------------------------------------------- fixtures
def official_state_dicts(folder):
    """``{pipeline key: (state dict as stored, checkpoint args)}`` of an official-layout folder."""
    cfg = read_pipeline_config(folder)
    out = {}
    for key in GEOMETRY_MODELS:
        stem = os.path.join(folder, "ckpts", cfg.models[key].rsplit("/", 1)[-1])
        with open(stem + ".json") as f:
            args = json.load(f)["args"]
        out[key] = (load_file(stem + ".safetensors"), args)
    return out


def comfy_diffusion_sd(sds, keys=tuple(FLOW_PREFIX), outer=""):
    return {outer + FLOW_PREFIX[k] + n: v for k in keys for n, v in sds[k][0].items()}


def comfy_vae_sd(sds, keys=tuple(VAE_PREFIX), dtype=None, outer=""):
    return {outer + VAE_PREFIX[k] + n: v if dtype is None else v.to(dtype) for k in keys for n, v in sds[k][0].items()}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    folder = write_tiny_trellis2(str(tmp_path_factory.mktemp("comfy_files") / "TRELLIS.2-4B"), seed=5)
    return folder, official_state_dicts(folder)


@pytest.fixture(scope="module")
def comfy_pair(official, tmp_path_factory):
    """Comfy-format diffusion + shape VAE files of the tiny folder (dtypes as in the official files)."""
    _, sds = official
    d = tmp_path_factory.mktemp("comfy_pair")
    diffusion, vae = str(d / "trellis_2_bf16.safetensors"), str(d / "trellis_2_shape_vae_bf16.safetensors")
    save_file(comfy_diffusion_sd(sds), diffusion)
    save_file(comfy_vae_sd(sds), vae)
    return diffusion, vae


@pytest.fixture(scope="module")
def loaded_pair(official, comfy_pair):
    folder, _ = official
    models, config = load_comfy_model_set(*comfy_pair, device="cpu", dtype=None)
    return models, config, load_pipeline_models(folder)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sb:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def slat(n_side=4, channels=32, seed=0, batch=1):
    """A random shape latent on the first ``n_side``^3 voxels of an 8^3 grid (rows grouped by batch)."""
    g = torch.Generator().manual_seed(seed)
    xyz = torch.stack(torch.meshgrid(*[torch.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.cat([torch.full((len(xyz), 1), b), xyz], 1) for b in range(batch)]).int()
    return SparseTensor(torch.randn(len(coords), channels, generator=g), coords, (8, 8, 8))


def run_model(key, model):
    """One forward of ``model`` on fixed inputs (outputs compared across loaders)."""
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([700.0])
    cond = torch.randn(1, 5, COND_CHANNELS, generator=g)
    with torch.no_grad():
        if key == "sparse_structure_flow_model":
            return [model(torch.randn(1, 8, 16, 16, 16, generator=g), t, cond)]
        if key.startswith("shape_slat_flow"):
            return [model(slat(seed=4), t, cond).feats]
        if key == "sparse_structure_decoder":
            return [model(torch.randn(1, 8, 6, 6, 6, generator=g))]
        head, subs = model(slat(seed=6), return_subs=True)
        mesh = model.to_meshes(head, resolution=128)[0]
        return [head.coords, head.feats, *[s.feats for s in subs], mesh.vertices, mesh.faces]


def assert_same_outputs(key, a, b):
    outs_a, outs_b = run_model(key, a), run_model(key, b)
    assert len(outs_a) == len(outs_b)
    for x, y in zip(outs_a, outs_b):
        assert x.shape == y.shape and torch.equal(x, y), key


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------- equality with the official layout
@pytest.mark.parametrize("key", GEOMETRY_MODELS)
def test_comfy_files_give_the_official_networks(loaded_pair, key):
    models, _, official_models = loaded_pair
    assert set(models) == set(GEOMETRY_MODELS)
    a, b = models[key], official_models[key]
    assert type(a) is type(b)
    assert_same_weights(a, b)
    assert getattr(a, "dtype", None) == getattr(b, "dtype", None)
    assert_same_outputs(key, a, b)


def test_config_names_sources_and_official_defaults(loaded_pair, comfy_pair):
    _, config, _ = loaded_pair
    diffusion, vae = comfy_pair
    assert config.models == {
        "sparse_structure_flow_model": diffusion + "#structure_model.",
        "sparse_structure_decoder": vae + "#struct_dec.",
        "shape_slat_flow_model_512": diffusion + "#img2shape_512.",
        "shape_slat_flow_model_1024": diffusion + "#img2shape.",
        "shape_slat_decoder": vae + "#shape_dec.",
    }
    assert config.default_pipeline_type == "1024_cascade"
    assert config.samplers == DEFAULT_PIPELINE_CONFIG.samplers
    assert config.normalizations == DEFAULT_PIPELINE_CONFIG.normalizations
    assert config.folder == os.path.dirname(diffusion)
    assert DEFAULT_PIPELINE_CONFIG.models["shape_slat_decoder"] == "ckpts/shape_dec_next_dc_f16c32_fp16"


def test_default_config_is_the_official_sampler_and_normalisation():
    cfg = default_pipeline_config()
    for stage, name in (("sparse_structure", "sparse_structure_sampler"), ("shape_slat", "shape_slat_sampler")):
        params = FlowEulerGuidanceIntervalSampler.from_pipeline_json(cfg.samplers[name]).params
        assert params == OFFICIAL_SAMPLER_PARAMS[stage]
    mean, std = cfg.normalization("shape_slat_normalization")
    assert mean.shape == std.shape == (32,) and bool((std > 1).all())
    assert cfg.image_cond_model["args"]["model_name"] == "facebook/dinov3-vitl16-pretrain-lvd1689m"
    cfg.normalizations["shape_slat_normalization"]["mean"][0] = 123.0  # a copy: the default is untouched
    assert DEFAULT_PIPELINE_CONFIG.normalizations["shape_slat_normalization"]["mean"][0] != 123.0
    assert default_pipeline_config().args["shape_slat_sampler"] == cfg.samplers["shape_slat_sampler"]


def test_pipeline_json_can_replace_the_defaults(official, comfy_pair):
    folder, _ = official
    models, config = load_comfy_model_set(*comfy_pair, keys=["sparse_structure_decoder"], pipeline_config=folder)
    assert set(models) == {"sparse_structure_decoder"}
    assert config.normalizations == read_pipeline_config(folder).normalizations
    _, from_file = load_comfy_model_set(*comfy_pair, keys=["sparse_structure_decoder"],
                                        pipeline_config=os.path.join(folder, "pipeline.json"))
    assert from_file.normalizations == config.normalizations


def test_geometry_pipeline_runs_on_the_comfy_set_like_on_the_official_folder(loaded_pair):
    from know3d_core.geometry_pipeline import Trellis2GeometryPipeline

    models, config, official_models = (copy.deepcopy(x) for x in loaded_pair)
    for key in ("sparse_structure_decoder", "shape_slat_decoder"):  # fp32 on the CPU, as from_pretrained
        models[key].convert_to(torch.float32)
        official_models[key].convert_to(torch.float32)
    comfy_pipe = Trellis2GeometryPipeline(models, config)
    official_pipe = Trellis2GeometryPipeline(official_models, default_pipeline_config())
    assert comfy_pipe.sampler_params("shape_slat") == OFFICIAL_SAMPLER_PARAMS["shape_slat"]
    cond = {"cond": torch.randn(1, 5, COND_CHANNELS, generator=torch.Generator().manual_seed(8))}
    a = comfy_pipe.sample_sparse_structure(cond, seed=1, params={"steps": 2})
    b = official_pipe.sample_sparse_structure(cond, seed=1, params={"steps": 2})
    assert 0 < len(a) < 32 ** 3 and torch.equal(a, b)


def test_dtype_choices(comfy_pair):
    models, _ = load_comfy_model_set(*comfy_pair, dtype="float32", decoder_dtype=torch.float32,
                                     keys=["shape_slat_flow_model_512", "shape_slat_decoder"])
    assert set(models) == {"shape_slat_flow_model_512", "shape_slat_decoder"}
    assert models["shape_slat_flow_model_512"].dtype == torch.float32
    assert models["shape_slat_decoder"].dtype == torch.float32
    assert models["shape_slat_decoder"].blocks[0][0].conv.weight.dtype == torch.float32


def test_bf16_vae_file_equals_official_weights_rounded_through_bf16(official, tmp_path):
    """Comfy-Org publishes the shape VAE in bf16: the loaded decoders hold the official values
    rounded through bf16, in the official precision."""
    folder, sds = official
    vae = str(tmp_path / "vae_bf16.safetensors")
    save_file(comfy_vae_sd(sds, dtype=torch.bfloat16), vae)
    loaded = load_comfy_vae_file(vae)
    for key in VAE_PREFIX:
        expected = load_pipeline_models(folder, keys=[key])[key]
        rounded = {k: v.to(torch.bfloat16).to(v.dtype) for k, v in expected.state_dict().items()}
        expected.load_state_dict(rounded)
        assert_same_weights(loaded[key], expected)
        assert_same_outputs(key, loaded[key], expected)


def test_outer_prefixes_and_a_bundled_texture_decoder_are_accepted(official, comfy_pair, tmp_path):
    _, sds = official
    diffusion = str(tmp_path / "prefixed.safetensors")
    save_file(comfy_diffusion_sd(sds, keys=["sparse_structure_flow_model"], outer="model.diffusion_model."), diffusion)
    flows = load_comfy_flows(diffusion)
    assert set(flows) == {"sparse_structure_flow_model"}
    vae = str(tmp_path / "vae_prefixed.safetensors")
    both = comfy_vae_sd(sds)
    both.update({"txt_dec." + k: v.clone() for k, v in sds["shape_slat_decoder"][0].items()})  # texture part
    save_file({"vae." + k: v for k, v in both.items()}, vae)
    reference = load_comfy_vae_file(comfy_pair[1])
    for key, model in load_comfy_vae_file(vae).items():
        assert_same_weights(model, reference[key])


def test_reference_golden_decoders_through_a_comfy_vae_file(tmp_path):
    """The reference TRELLIS.2 decoders' golden weights, packed as a Comfy VAE file, load with
    widths inferred from the shapes and reproduce the reference outputs."""
    with open(os.path.join(GOLDEN, "config.json")) as f:
        golden_cfg = json.load(f)
    vae = str(tmp_path / "golden_vae.safetensors")
    save_file(golden_comfy_vae(), vae)
    models = load_comfy_vae_file(vae, decoder_dtype=torch.float32)
    ss, shape = models["sparse_structure_decoder"], models["shape_slat_decoder"]
    assert infer_sparse_structure_decoder_args(ss.state_dict()) == {
        **golden_cfg["SparseStructureDecoder"], "use_fp16": True}
    expected_shape = {**golden_cfg["FlexiDualGridVaeDecoder"], "use_fp16": True, "resolution": 256}
    assert infer_shape_decoder_args(shape.state_dict()) == expected_shape
    io = load_file(os.path.join(GOLDEN, "ss_decoder_io.safetensors"))
    assert rel_err(ss(io["latent"]), io["logits"]) <= 1e-5
    io = load_file(os.path.join(GOLDEN, "shape_decoder_io.safetensors"))
    head, subs = shape(golden_slat(io), return_subs=True)
    assert torch.equal(head.coords, io["out_coords"])
    assert rel_err(head.feats, io["out_feats"]) <= 1e-5
    for i, sub in enumerate(subs):
        assert rel_err(sub.feats, io[f"subdiv_logits_{i}"]) <= 1e-5


def golden_comfy_vae():
    ss = load_file(os.path.join(GOLDEN, "ss_decoder_weights.safetensors"))
    shape = load_file(os.path.join(GOLDEN, "shape_decoder_weights.safetensors"))
    return {**{"struct_dec." + k: v for k, v in ss.items()}, **{"shape_dec." + k: v for k, v in shape.items()}}


def golden_slat(io):
    return SparseTensor(io["feats"], io["coords"], (8, 8, 8))


def test_decoder_widths_and_depths_are_read_from_the_shapes(tmp_path):
    ss_args = dict(out_channels=1, latent_channels=8, num_res_blocks=2, channels=[16, 8],
                   num_res_blocks_middle=3, norm_type="layer", use_fp16=True)
    shape_args = dict(resolution=256, model_channels=[16, 16, 8], latent_channels=32, num_blocks=[2, 0, 1],
                      block_type=["SparseConvNeXtBlock3d"] * 3, up_block_type=["SparseResBlockC2S3d"] * 2,
                      block_args=[{}, {}, {}], use_fp16=True)
    ss, shape = SparseStructureDecoder(**ss_args), FlexiDualGridVaeDecoder(**shape_args)
    sd = {**{"struct_dec." + k: v for k, v in random_state_dict(ss, 1).items()},
          **{"shape_dec." + k: v for k, v in random_state_dict(shape, 2).items()}}
    path = str(tmp_path / "odd.safetensors")
    save_file(sd, path)
    models = load_comfy_vae_file(path)
    assert infer_sparse_structure_decoder_args(models["sparse_structure_decoder"].state_dict()) == ss_args
    assert infer_shape_decoder_args(models["shape_slat_decoder"].state_dict()) == shape_args
    for key, model in models.items():
        prefix = VAE_PREFIX[key]
        expected = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    head = models["shape_slat_decoder"](slat(n_side=2))
    assert head.feats.shape[1] == 7
    sd["shape_dec.blocks.0.0.mlp.0.weight"] = sd["shape_dec.blocks.0.0.mlp.0.weight"][:32].clone()
    sd["shape_dec.blocks.0.0.mlp.0.bias"] = sd["shape_dec.blocks.0.0.mlp.0.bias"][:32].clone()
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"odd\.safetensors \[shape_dec\.\*\].*MLPs of 4 x channels"):
        load_comfy_vae_file(path)


def test_is_512_file_gives_the_512_flow_and_the_512_pipeline_type(official, comfy_pair, tmp_path):
    folder, sds = official
    path = str(tmp_path / "trellis_2_512.safetensors")
    sd = comfy_diffusion_sd(sds, keys=["sparse_structure_flow_model"])
    sd.update({"img2shape." + k: v for k, v in sds["shape_slat_flow_model_512"][0].items()})
    save_file(sd, path, metadata={"is_512": "true"})
    models, config = load_comfy_model_set(path, comfy_pair[1])
    assert set(models) == set(GEOMETRY_MODELS) - {"shape_slat_flow_model_1024"}
    assert config.default_pipeline_type == "512"
    assert config.models["shape_slat_flow_model_512"] == path + "#img2shape."
    assert models["shape_slat_flow_model_512"].resolution == 512 // 16  # 16-voxel latent cells
    assert_same_weights(models["shape_slat_flow_model_512"],
                        load_pipeline_models(folder, keys=["shape_slat_flow_model_512"])["shape_slat_flow_model_512"])
    with pytest.raises(CheckpointError, match=r"trellis_2_512\.safetensors lacks the shape flow 1024 \(img2shape\.\* keys\)"):
        load_comfy_model_set(path, comfy_pair[1], keys=["shape_slat_flow_model_1024"])


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kept, missing", [("shape_slat_decoder", "struct_dec."),
                                           ("sparse_structure_decoder", "shape_dec.")])
def test_vae_missing_a_part_names_the_file_and_the_part(official, comfy_pair, tmp_path, kept, missing):
    _, sds = official
    vae = str(tmp_path / "partial_vae.safetensors")
    save_file(comfy_vae_sd(sds, keys=[kept]), vae)
    role = "sparse-structure decoder" if missing == "struct_dec." else "shape decoder"
    with pytest.raises(CheckpointError, match=rf"partial_vae\.safetensors lacks {missing}\* \(the {role}"):
        load_comfy_model_set(comfy_pair[0], vae)
    assert set(load_comfy_vae_file(vae, keys=[kept])) == {kept}  # the part it has still loads


def test_texture_only_vae_is_a_clear_error(official, comfy_pair, tmp_path):
    _, sds = official
    vae = str(tmp_path / "trellis_2_texture_vae.safetensors")
    save_file({"txt_dec." + k: v for k, v in sds["shape_slat_decoder"][0].items()}, vae)
    with pytest.raises(CheckpointError, match=r"trellis_2_texture_vae\.safetensors is ComfyUI's TRELLIS\.2 texture "
                                              r"VAE.*needs the shape VAE \(struct_dec\.\* \+ shape_dec\.\*\)"):
        load_comfy_model_set(comfy_pair[0], vae)


def test_swapped_files_say_which_is_which(comfy_pair):
    diffusion, vae = comfy_pair
    with pytest.raises(CheckpointError, match=r"trellis_2_bf16\.safetensors is ComfyUI's TRELLIS\.2 diffusion file"):
        load_comfy_model_set(vae, diffusion)
    with pytest.raises(CheckpointError, match=r"shape_vae_bf16\.safetensors is ComfyUI's TRELLIS\.2 shape VAE, not the"):
        load_comfy_flows(vae)


def test_sparse_conv_weights_in_pytorch_layout_are_refused(official, tmp_path):
    _, sds = official
    sd = comfy_vae_sd(sds)
    key = "shape_dec.blocks.0.0.conv.weight"
    sd[key] = sd[key].permute(0, 4, 1, 2, 3).contiguous()  # [Co, Ci, 3, 3, 3]
    path = str(tmp_path / "torch_layout.safetensors")
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"torch_layout\.safetensors \[shape_dec\.\*\].*blocks\.0\.0\.conv\.weight.*"
                                              r"\[Co, 3, 3, 3, Ci\]"):
        load_comfy_vae_file(path)


def test_quantised_and_foreign_files_are_refused(official, comfy_pair, tmp_path):
    _, sds = official
    sd = comfy_diffusion_sd(sds, keys=["sparse_structure_flow_model"])
    sd["structure_model.blocks.0.self_attn.to_qkv.weight"] = torch.zeros(2, 2, dtype=torch.int8)
    sd["structure_model.blocks.0.self_attn.to_qkv.comfy_quant"] = torch.zeros(4, dtype=torch.uint8)
    path = str(tmp_path / "convrot_int8.safetensors")
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"convrot_int8\.safetensors holds quantised weights.*bf16"):
        load_comfy_flows(path)
    only_ss = str(tmp_path / "structure_only.safetensors")
    save_file(comfy_diffusion_sd(sds, keys=["sparse_structure_flow_model"]), only_ss)
    with pytest.raises(CheckpointError, match=r"structure_only\.safetensors lacks a shape flow \(img2shape_512"):
        load_comfy_model_set(only_ss, comfy_pair[1])
    other = str(tmp_path / "other.safetensors")
    save_file({"decoder.conv_in.weight": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match=r"other\.safetensors is not ComfyUI's TRELLIS\.2 shape VAE"):
        load_comfy_vae_file(other)
    with pytest.raises(KeyError, match="tex_slat_decoder"):
        load_comfy_model_set(*comfy_pair, keys=["tex_slat_decoder"])


# ----------------------------------------------------------------------------- ComfyUI's own classes
DINO_CONFIG = {"model_type": "dinov3", "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
               "num_hidden_layers": 2, "num_register_tokens": 4, "patch_size": 16, "num_channels": 3,
               "layer_norm_eps": 1e-5, "rope_theta": 100.0, "image_size": 224, "mlp_bias": True,
               "use_gated_mlp": False}


@pytest.fixture(scope="module")
def comfy_results(official, comfy_pair, tmp_path_factory):
    if skip_reason():
        pytest.skip(skip_reason())
    _, sds = official
    work = tmp_path_factory.mktemp("comfy_host")
    with open(os.path.join(GOLDEN, "config.json")) as f:
        golden_cfg = json.load(f)
    golden_vae = str(work / "golden_vae.safetensors")
    save_file(golden_comfy_vae(), golden_vae)
    g = torch.Generator().manual_seed(9)
    s = slat(seed=6)
    golden_io = load_file(os.path.join(GOLDEN, "shape_decoder_io.safetensors"))
    inputs = {"latent": torch.randn(1, 8, 6, 6, 6, generator=g), "slat_feats": s.feats, "slat_coords": s.coords,
              "golden_latent": load_file(os.path.join(GOLDEN, "ss_decoder_io.safetensors"))["latent"],
              "golden_slat_feats": golden_io["feats"], "golden_slat_coords": golden_io["coords"],
              "pixels": torch.randn(2, 3, 48, 32, generator=g)}
    save_file(inputs, str(work / "inputs.safetensors"))
    flow_args = {}
    for key, prefix in FLOW_PREFIX.items():
        args = dict(sds[key][1])
        for name in ("pe_mode", "initialization", "dtype"):
            args.pop(name, None)
        flow_args[prefix] = args
    spec = {"vae_file": comfy_pair[1], "diffusion_file": comfy_pair[0], "inputs": str(work / "inputs.safetensors"),
            "ss_args": sds["sparse_structure_decoder"][1], "shape_args": sds["shape_slat_decoder"][1],
            "golden_vae_file": golden_vae, "golden_ss_args": golden_cfg["SparseStructureDecoder"],
            "golden_shape_args": golden_cfg["FlexiDualGridVaeDecoder"], "flow_args": flow_args,
            "dino_config": DINO_CONFIG, "dino_file": str(work / "dino_v3_tiny.safetensors")}
    with open(work / "spec.json", "w") as f:
        json.dump(spec, f)
    script = os.path.join(ROOT, "tests", "data", "comfyui", "trellis2_comfy_files_checks.py")
    out = str(work / "out")
    proc = subprocess.run([COMFYUI_PYTHON, script, COMFYUI_DIR, str(work / "spec.json"), out], cwd=str(work),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not os.path.exists(out + ".json"):
        pytest.fail(f"trellis2_comfy_files_checks.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    with open(out + ".json") as f:
        checks = json.load(f)
    return checks, load_file(out + ".safetensors"), inputs, spec


def _ok(checks, name):
    assert name in checks, sorted(checks)
    assert checks[name]["ok"], checks[name]["detail"]


def _compare_decoders(outputs, tag, ss, shape, latent, x):
    assert rel_err(ss(latent), outputs[f"{tag}_ss_logits"]) <= 1e-5
    head, subs = shape(x, return_subs=True)
    assert torch.equal(head.coords, outputs[f"{tag}_head_coords"])
    assert rel_err(head.feats, outputs[f"{tag}_head_feats"]) <= 1e-5
    for i, sub in enumerate(subs):
        assert torch.equal(sub.coords, outputs[f"{tag}_sub_coords_{i}"])
        assert rel_err(sub.feats, outputs[f"{tag}_sub_feats_{i}"]) <= 1e-5


@pytest.mark.comfyui
def test_comfyui_decoders_load_our_comfy_vae_file_and_agree(comfy_results, comfy_pair):
    checks, outputs, inputs, _ = comfy_results
    _ok(checks, "tiny_vae_file_loads_strictly_into_comfy_decoders")
    models = load_comfy_vae_file(comfy_pair[1], decoder_dtype=torch.float32)
    x = SparseTensor(inputs["slat_feats"], inputs["slat_coords"], (8, 8, 8))
    _compare_decoders(outputs, "tiny", models["sparse_structure_decoder"], models["shape_slat_decoder"],
                      inputs["latent"], x)


@pytest.mark.comfyui
def test_comfyui_decoders_reproduce_the_reference_on_official_layout_weights(comfy_results):
    """ComfyUI reads [Co, 3, 3, 3, Ci] sparse conv weights with the reference meaning: its decoders,
    loaded with the reference golden weights as stored, give the reference outputs."""
    checks, outputs, _, _ = comfy_results
    _ok(checks, "golden_vae_file_loads_strictly_into_comfy_decoders")
    ss_io = load_file(os.path.join(GOLDEN, "ss_decoder_io.safetensors"))
    io = load_file(os.path.join(GOLDEN, "shape_decoder_io.safetensors"))
    assert rel_err(outputs["golden_ss_logits"], ss_io["logits"]) <= 1e-5
    assert torch.equal(outputs["golden_head_coords"], io["out_coords"])
    assert rel_err(outputs["golden_head_feats"], io["out_feats"]) <= 1e-5


@pytest.mark.comfyui
def test_comfyui_flow_classes_and_detection_accept_our_diffusion_file(comfy_results):
    checks, _, _, _ = comfy_results
    _ok(checks, "diffusion_file_keys_fit_comfy_flow_classes")


@pytest.mark.comfyui
def test_default_normalisation_equals_comfyui_latent_format(comfy_results):
    checks, outputs, _, _ = comfy_results
    _ok(checks, "shape_slat_normalization")
    mean, std = DEFAULT_PIPELINE_CONFIG.normalization("shape_slat_normalization")
    assert torch.equal(mean, outputs["comfy_shape_slat_mean"])
    assert torch.equal(std, outputs["comfy_shape_slat_std"])


@pytest.mark.comfyui
def test_comfyui_clip_vision_dinov3_file_loads_in_our_extractor(comfy_results):
    from know3d_core.conditioning.dinov3 import DinoV3FeatureExtractor

    checks, outputs, inputs, spec = comfy_results
    _ok(checks, "dinov3_clip_vision_file")
    extractor = DinoV3FeatureExtractor.from_pretrained(spec["dino_file"])
    ours = extractor.extract_features(inputs["pixels"])
    assert ours.shape == outputs["dino_features"].shape
    assert rel_err(ours, outputs["dino_features"]) <= 1e-5

