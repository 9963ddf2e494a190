"""Texture networks of TRELLIS.2: the texture flow (shape SLat flow with the shape latent
concatenated to its input) and the texture decoder (guided by the shape decoder's subdivisions).

Parity: golden outputs of the reference classes on tiny random weights
(tests/data/golden_texture/README.md says how they were made). Structure: the full-size configs on
the meta device have the official key names and parameter counts (from the official file sizes).
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from know3d_core.plan import OFFICIAL_MODELS, PBR_LAYOUT, TEX_DECODER, TEX_FLOWS, texture_models
from know3d_core.sparse import SparseTensor
from know3d_core.trellis2.loading import CheckpointError, FULL_SIZE_FLOW_CONFIGS, load_pipeline_models
from know3d_core.trellis2.shape_decoder import FlexiDualGridVaeDecoder
from know3d_core.trellis2.slat_flow import SLatFlowModel
from know3d_core.trellis2.tex_decoder import TINY_ARGS, SparseUnetVaeDecoder

HERE = os.path.dirname(__file__)
GOLDEN = os.path.join(HERE, "data", "golden_texture")
SHAPE_GOLDEN = os.path.join(HERE, "data", "golden_decoders")

# configs/scvae/tex_vae_next_dc_f16c32_fp16.json (decoder part)
TEX_FULL_ARGS = dict(out_channels=6, model_channels=[1024, 512, 256, 128, 64], latent_channels=32,
                     num_blocks=[4, 16, 8, 4, 0], block_type=["SparseConvNeXtBlock3d"] * 5,
                     up_block_type=["SparseResBlockC2S3d"] * 4,
                     block_args=[{"use_checkpoint": False}] * 3 + [{"use_checkpoint": True}] * 2, use_fp16=True,
                     pred_subdiv=False)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def config():
    with open(os.path.join(GOLDEN, "config.json")) as f:
        return json.load(f)


def guide_subs():
    io = load_file(os.path.join(SHAPE_GOLDEN, "shape_decoder_io.safetensors"))
    return [SparseTensor(io[f"subdiv_logits_{i}"], io[f"subdiv_coords_{i}"], (8 << i,) * 3) for i in range(4)]


def tex_decoder(use_fp16=False):
    model = SparseUnetVaeDecoder(**{**config()["SparseUnetVaeDecoder"], "use_fp16": use_fp16})
    model.load_state_dict(load_file(os.path.join(GOLDEN, "tex_decoder_weights.safetensors")), strict=True)
    return model


def test_tex_decoder_matches_reference_golden():
    io = load_file(os.path.join(GOLDEN, "tex_decoder_io.safetensors"))
    out = tex_decoder()(SparseTensor(io["feats"], io["coords"], (8, 8, 8)), guide_subs())
    assert out.feats.dtype == torch.float32 and out.feats.shape[1] == 6
    assert torch.equal(out.coords, io["out_coords"])
    assert rel_err(out.feats, io["out_feats_fp32"]) <= 1e-5


def test_tex_decoder_fp16_body_within_the_references_own_fp16_gap():
    io = load_file(os.path.join(GOLDEN, "tex_decoder_io.safetensors"))
    ref32, ref16 = io["out_feats_fp32"], io["out_feats_fp16_mode"]
    model = tex_decoder(use_fp16=True)
    assert model.blocks[0][0].conv.weight.dtype == torch.float16
    out = model(SparseTensor(io["feats"], io["coords"], (8, 8, 8)), guide_subs())
    assert torch.equal(out.coords, io["out_coords"])
    # fp16 rounds at other points than the reference's fp16 mode: bound by twice its own gap to fp32
    assert rel_err(out.feats, ref32) <= 2 * rel_err(ref16, ref32)


def test_tex_decoder_follows_the_shape_decoders_voxels():
    """Decoded PBR voxels sit exactly on the shape decoder's output voxels (same rows)."""
    with open(os.path.join(SHAPE_GOLDEN, "config.json")) as f:
        shape_cfg = json.load(f)["FlexiDualGridVaeDecoder"]
    shape = FlexiDualGridVaeDecoder(**shape_cfg)
    shape.load_state_dict(load_file(os.path.join(SHAPE_GOLDEN, "shape_decoder_weights.safetensors")))
    io = load_file(os.path.join(SHAPE_GOLDEN, "shape_decoder_io.safetensors"))
    x = SparseTensor(io["feats"], io["coords"], (8, 8, 8))
    head, subs = shape(x, return_subs=True)
    tex = tex_decoder().decode(x.replace(torch.randn_like(x.feats)), subs)
    assert torch.equal(tex.coords, head.coords)


def test_tex_decoder_refuses_wrong_guides():
    io = load_file(os.path.join(GOLDEN, "tex_decoder_io.safetensors"))
    x = SparseTensor(io["feats"], io["coords"], (8, 8, 8))
    with pytest.raises(ValueError, match="guide subdivisions"):
        tex_decoder()(x, guide_subs()[:3])
    other = SparseTensor(io["feats"][:8], io["coords"][:8], (8, 8, 8))
    with pytest.raises(ValueError, match="shape latent's coords"):
        tex_decoder()(other, guide_subs())
    with pytest.raises(ValueError, match="pred_subdiv=False"):
        SparseUnetVaeDecoder(**{**TINY_ARGS, "pred_subdiv": True})
    with pytest.raises(TypeError, match="shape decoder"):
        tex_decoder().upsample(x)


def test_tex_flow_matches_reference_golden():
    io = load_file(os.path.join(GOLDEN, "tex_flow_io.safetensors"))
    weights = load_file(os.path.join(GOLDEN, "tex_flow_weights.safetensors"))
    gap = rel_err(io["out_bf16"], io["out_fp32"])
    for dtype, ref, tol in (("float32", io["out_fp32"], 1e-5), ("bfloat16", io["out_fp32"], 2 * gap)):
        model = SLatFlowModel(**{**config()["SLatFlowModel"], "dtype": dtype})
        model.load_state_dict(weights, strict=True)
        x = SparseTensor(io["x"], io["coords"], (8, 8, 8))
        out = model(x, io["t"], io["cond"], concat_cond=io["shape"])
        assert out.feats.shape == (48, 32)
        assert rel_err(out.feats, ref) <= tol, dtype
        # a SparseTensor on x's coords is the same condition
        again = model(x, io["t"], io["cond"], concat_cond=x.replace(io["shape"]))
        assert torch.equal(again.feats, out.feats)
    with pytest.raises(ValueError, match="concat_cond"):
        model(x, io["t"], io["cond"], concat_cond=io["shape"][:5])
    with pytest.raises(ValueError, match=r"\[N, 64\]"):
        model(x, io["t"], io["cond"])  # the texture flow needs the shape latent


def test_full_size_texture_networks_have_the_official_structure():
    """Parameter counts of the official files (research/trellis2.md §files: the texture decoder holds
    474 216 006 values, the shape decoder's 474 231 463 less its 4 ``to_subdiv`` layers and one of
    its 7 outputs; the texture flow is the 1024 shape flow with 32 more inputs)."""
    with torch.device("meta"):
        dec = SparseUnetVaeDecoder(**TEX_FULL_ARGS)
        name, args = FULL_SIZE_FLOW_CONFIGS[TEX_FLOWS["1024"]]
        flow = SLatFlowModel(**args)
        shape_flow = SLatFlowModel(**FULL_SIZE_FLOW_CONFIGS["shape_slat_flow_model_1024"][1])
    keys = dec.state_dict()
    assert "blocks.0.4.to_subdiv.weight" not in keys and "blocks.0.4.conv1.weight" in keys
    assert keys["output_layer.weight"].shape == (6, 64)
    assert keys["blocks.0.0.conv.weight"].shape == (1024, 3, 3, 3, 1024)
    assert sum(v.numel() for v in keys.values()) == 474_216_006
    extra = sum(p.numel() for p in flow.parameters()) - sum(p.numel() for p in shape_flow.parameters())
    assert extra == 32 * 1536  # input_layer: 64 instead of 32 inputs
    assert set(texture_models("512")) == {TEX_FLOWS["512"], TEX_DECODER}
    assert set(texture_models("1536_cascade")) == {TEX_FLOWS["1024"], TEX_DECODER}
    assert PBR_LAYOUT == {"base_color": (0, 3), "metallic": (3, 4), "roughness": (4, 5), "alpha": (5, 6)}


def test_tiny_texture_folder_loads_strictly(tmp_path):
    folder = write_texture_folder(tmp_path)
    models = load_pipeline_models(folder, keys=list(TEX_FLOWS.values()) + [TEX_DECODER])
    assert models[TEX_FLOWS["512"]].in_channels == 64 and models[TEX_DECODER].use_fp16
    # a shape decoder file under the texture decoder's name is refused, naming the file and keys
    ref = OFFICIAL_MODELS[TEX_DECODER][0].rsplit("/", 1)[-1]
    shape = OFFICIAL_MODELS["shape_slat_decoder"][0].rsplit("/", 1)[-1]
    ckpts = os.path.join(folder, "ckpts")
    os.replace(os.path.join(ckpts, shape + ".safetensors"), os.path.join(ckpts, ref + ".safetensors"))
    fits = rf"{ref}.safetensors does not fit SparseUnetVaeDecoder(.|\n)*unexpected keys"
    with pytest.raises(CheckpointError, match=fits):
        load_pipeline_models(folder, keys=[TEX_DECODER])


def write_texture_folder(tmp_path):
    from know3d_core.trellis2.tiny import write_tiny_trellis2
    from know3d_core.trellis2.tiny_texture import write_tiny_texture

    folder = str(tmp_path / "trellis2")
    write_tiny_trellis2(folder)
    return write_tiny_texture(folder)


def test_comfy_single_files_give_the_same_texture_networks(tmp_path):
    """ComfyUI's repack: the texture flow as ``shape2txt.*`` in the diffusion file, the texture decoder
    as ``txt_dec.*`` in its own VAE file; loaded strictly they equal the official-layout networks."""
    from safetensors.torch import save_file

    from know3d_core.plan import COMFY_TEXTURE_FILES, GEOMETRY_MODELS, SS_DECODER, SHAPE_DECODER
    from know3d_core.trellis2.comfy_files import load_comfy_model_set, load_comfy_texture_vae
    from know3d_core.trellis2.loading import read_pipeline_config, resolve_checkpoint

    folder = write_texture_folder(tmp_path)
    config = read_pipeline_config(folder)

    def sd(key):
        return load_file(resolve_checkpoint(folder, config.models[key]) + ".safetensors")

    prefixes = {"structure_model.": "sparse_structure_flow_model", "img2shape_512.": "shape_slat_flow_model_512",
                "img2shape.": "shape_slat_flow_model_1024", "shape2txt.": TEX_FLOWS["1024"]}
    diffusion = str(tmp_path / "trellis_2_bf16.safetensors")
    save_file({"model.diffusion_model." + p + k: v for p, key in prefixes.items() for k, v in sd(key).items()},
              diffusion)
    vae = str(tmp_path / "trellis_2_shape_vae_bf16.safetensors")
    save_file({p + k: v for p, key in {"struct_dec.": SS_DECODER, "shape_dec.": SHAPE_DECODER}.items()
               for k, v in sd(key).items()}, vae)
    texture_vae = str(tmp_path / COMFY_TEXTURE_FILES["texture_vae"][0])
    save_file({"txt_dec." + k: v for k, v in sd(TEX_DECODER).items()}, texture_vae)

    models, cfg = load_comfy_model_set(diffusion, vae, keys=list(GEOMETRY_MODELS), texture_vae_file=texture_vae)
    official = load_pipeline_models(folder, keys=[TEX_FLOWS["1024"], TEX_DECODER])
    for key in (TEX_FLOWS["1024"], TEX_DECODER):
        ours, ref = models[key].state_dict(), official[key].state_dict()
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), key
        assert cfg.models[key].startswith(diffusion if "flow" in key else texture_vae)
    assert "tex_slat_sampler" in cfg.samplers and "tex_slat_normalization" in cfg.normalizations
    # a shape VAE given as the texture VAE, and a texture VAE given as the shape VAE, name the fix
    with pytest.raises(CheckpointError, match="not ComfyUI's TRELLIS.2 texture VAE"):
        load_comfy_texture_vae(vae)
    with pytest.raises(CheckpointError, match="texture VAE"):
        load_comfy_model_set(diffusion, texture_vae, keys=list(GEOMETRY_MODELS))
