"""Shape (FlexiDualGrid) encoder and sparse-structure encoder.

Parity: golden outputs of the reference TRELLIS.2 encoders on tiny random weights
(tests/data/golden_encoders/README.md says how they were made). Structure: the official configs
built on the meta device have the official key names and fp16/fp32 split. End to end: analytic
mesh -> dual grid -> encoder -> our decoder, with the coords checked at every level.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from know3d_core.mesh.primitives import icosphere, uv_torus
from know3d_core.sparse import SparseTensor
from know3d_core.trellis2 import shape_decoder, shape_encoder, sparse_structure_encoder
from know3d_core.trellis2.loading import get_model_class, load_model
from know3d_core.trellis2.mesh_to_dual_grid import mesh_to_flexible_dual_grid, occupancy_from_coords
from know3d_core.trellis2.shape_decoder import FlexiDualGridVaeDecoder
from know3d_core.trellis2.shape_encoder import FlexiDualGridVaeEncoder, SparseResBlockS2C3d, encoder_input
from know3d_core.trellis2.sparse_structure_decoder import SparseStructureDecoder
from know3d_core.trellis2.sparse_structure_encoder import SparseStructureEncoder
from know3d_core.trellis2.tiny import random_state_dict, write_checkpoint

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_encoders")

# Official configs: TRELLIS.2 configs/scvae/shape_vae_next_dc_f16c32_fp16.json (encoder) and
# TRELLIS-image-large ckpts/ss_enc_conv3d_16l8_fp16.json.
SHAPE_FULL_ARGS = dict(model_channels=[64, 128, 256, 512, 1024], latent_channels=32, num_blocks=[0, 4, 8, 16, 4],
                       block_type=["SparseConvNeXtBlock3d"] * 5, down_block_type=["SparseResBlockS2C3d"] * 4,
                       block_args=[{"use_checkpoint": True}] * 2 + [{"use_checkpoint": False}] * 3, use_fp16=True)
SS_FULL_ARGS = dict(in_channels=1, latent_channels=8, num_res_blocks=2, channels=[32, 128, 512],
                    num_res_blocks_middle=2, norm_type="layer", use_fp16=True)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def golden(name):
    return load_file(os.path.join(GOLDEN, name))


def config():
    with open(os.path.join(GOLDEN, "config.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- keys
def _expected_shape_keys(args):
    """Key -> shape, from the layer list of the reference SparseUnetVaeEncoder."""
    ch, nb = args["model_channels"], args["num_blocks"]
    keys = {"input_layer.weight": (ch[0], 6), "input_layer.bias": (ch[0],),
            "to_latent.weight": (2 * args["latent_channels"], ch[-1]), "to_latent.bias": (2 * args["latent_channels"],)}
    for level, c in enumerate(ch):
        for j in range(nb[level]):
            p = f"blocks.{level}.{j}"
            keys.update({f"{p}.conv.weight": (c, 3, 3, 3, c), f"{p}.conv.bias": (c,), f"{p}.norm.weight": (c,),
                         f"{p}.norm.bias": (c,), f"{p}.mlp.0.weight": (4 * c, c), f"{p}.mlp.0.bias": (4 * c,),
                         f"{p}.mlp.2.weight": (c, 4 * c), f"{p}.mlp.2.bias": (c,)})
        if level < len(ch) - 1:
            p, co = f"blocks.{level}.{nb[level]}", ch[level + 1]
            keys.update({f"{p}.norm1.weight": (c,), f"{p}.norm1.bias": (c,),
                         f"{p}.conv1.weight": (co // 8, 3, 3, 3, c), f"{p}.conv1.bias": (co // 8,),
                         f"{p}.conv2.weight": (co, 3, 3, 3, co), f"{p}.conv2.bias": (co,)})
    return keys


def _expected_ss_keys(args):
    """Key -> shape, from the layer list of the reference SparseStructureEncoder."""
    ch = args["channels"]
    keys = {"input_layer.weight": (ch[0], args["in_channels"], 3, 3, 3), "input_layer.bias": (ch[0],)}

    def res(prefix, c):
        for n in ("norm1", "norm2"):
            keys[f"{prefix}.{n}.weight"] = keys[f"{prefix}.{n}.bias"] = (c,)
        for n in ("conv1", "conv2"):
            keys[f"{prefix}.{n}.weight"], keys[f"{prefix}.{n}.bias"] = (c, c, 3, 3, 3), (c,)

    i = 0
    for level, c in enumerate(ch):
        for _ in range(args["num_res_blocks"]):
            res(f"blocks.{i}", c)
            i += 1
        if level < len(ch) - 1:
            keys[f"blocks.{i}.conv.weight"], keys[f"blocks.{i}.conv.bias"] = (ch[level + 1], c, 2, 2, 2), (ch[level + 1],)
            i += 1
    for j in range(args["num_res_blocks_middle"]):
        res(f"middle_block.{j}", ch[-1])
    keys["out_layer.0.weight"] = keys["out_layer.0.bias"] = (ch[-1],)
    keys["out_layer.2.weight"], keys["out_layer.2.bias"] = (2 * args["latent_channels"], ch[-1], 3, 3, 3), (2 * args["latent_channels"],)
    return keys


@pytest.mark.parametrize("args", [SHAPE_FULL_ARGS, shape_encoder.TINY_ARGS], ids=["full", "tiny"])
def test_shape_encoder_keys_shapes_and_dtypes(args):
    with torch.device("meta"):
        model = FlexiDualGridVaeEncoder(**args)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == _expected_shape_keys(args)
    for k, v in sd.items():
        half = k.startswith("blocks.") and ".norm" not in k
        assert v.dtype == (torch.float16 if half else torch.float32), k


@pytest.mark.parametrize("args", [SS_FULL_ARGS, sparse_structure_encoder.TINY_ARGS], ids=["full", "tiny"])
def test_ss_encoder_keys_shapes_and_dtypes(args):
    with torch.device("meta"):
        model = SparseStructureEncoder(**args)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == _expected_ss_keys(args)
    for k, v in sd.items():
        half = k.startswith(("blocks.", "middle_block.")) and ".norm" not in k
        assert v.dtype == (torch.float16 if half else torch.float32), k


def test_encoders_are_found_by_the_loader_registry(tmp_path):
    assert get_model_class("FlexiDualGridVaeEncoder") is FlexiDualGridVaeEncoder
    assert get_model_class("SparseStructureEncoder") is SparseStructureEncoder
    stem = str(tmp_path / "ss_enc_conv3d_16l8_fp16")
    model = SparseStructureEncoder(**sparse_structure_encoder.TINY_ARGS)
    write_checkpoint(stem, "SparseStructureEncoder", sparse_structure_encoder.TINY_ARGS, random_state_dict(model, 3))
    loaded = load_model(stem)
    assert isinstance(loaded, SparseStructureEncoder) and loaded.use_fp16


def test_s2c_block_rejects_bad_widths():
    with pytest.raises(ValueError, match="out_channels % 8"):
        SparseResBlockS2C3d(16, 12)


# ----------------------------------------------------------------------------- parity
def test_shape_encoder_matches_reference_golden():
    io, weights = golden("shape_encoder_io.safetensors"), golden("shape_encoder_weights.safetensors")
    res = config()["shape_input_resolution"]
    for mode, tol in (("fp32", 1e-5), ("fp16_mode", 1e-2)):
        model = FlexiDualGridVaeEncoder(**dict(config()["FlexiDualGridVaeEncoder"], use_fp16=mode == "fp16_mode"))
        model.load_state_dict(weights, strict=True)
        x = SparseTensor(encoder_input(io["dual"], io["intersected"].bool()), io["coords"], (res,) * 3)
        z = model(x)
        assert torch.equal(z.coords, io["out_coords"])
        assert z.feats.dtype == torch.float32
        assert rel_err(z.feats, io[f"out_feats_{mode}"]) <= tol, mode
    # fp16 mode is a different function: the fp32 golden is not within the fp16 tolerance's tenth
    assert rel_err(z.feats, io["out_feats_fp32"]) > 1e-4


def test_ss_encoder_matches_reference_golden():
    io, weights = golden("ss_encoder_io.safetensors"), golden("ss_encoder_weights.safetensors")
    for mode in ("fp32", "fp16_mode"):
        model = SparseStructureEncoder(**dict(config()["SparseStructureEncoder"], use_fp16=mode == "fp16_mode"))
        model.load_state_dict(weights, strict=True)
        out = model(io["occupancy"])
        assert out.shape == (2, 8, 4, 4, 4) and out.dtype == torch.float32
        assert rel_err(out, io[f"mean_{mode}"]) <= 1e-5, mode


def test_shape_encoder_batch_items_encode_independently():
    io, weights = golden("shape_encoder_io.safetensors"), golden("shape_encoder_weights.safetensors")
    res = config()["shape_input_resolution"]
    model = FlexiDualGridVaeEncoder(**dict(config()["FlexiDualGridVaeEncoder"], use_fp16=False))
    model.load_state_dict(weights, strict=True)
    feats = encoder_input(io["dual"], io["intersected"].bool())
    both = model(SparseTensor(feats, io["coords"], (res,) * 3))
    second = io["coords"][:, 0] == 1
    coords = io["coords"][second].clone()
    coords[:, 0] = 0
    alone = model(SparseTensor(feats[second], coords, (res,) * 3))
    rows = both.coords[:, 0] == 1
    assert torch.equal(alone.coords[:, 1:], both.coords[rows, 1:])
    assert rel_err(alone.feats, both.feats[rows]) <= 1e-6


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", ["sphere", "torus"])
def test_analytic_mesh_through_encoder_and_decoder(name):
    """Dual grid at 64 -> encoder (levels 64, 32, 16, 8, 4: coords = parents of the previous
    level) -> tokens at 4^3 = occupancy_from_coords -> our decoder back to a 64 grid whose voxels
    are children of the tokens at every level, and a mesh."""
    mesh = icosphere(3, 0.38) if name == "sphere" else uv_torus(0.3, 0.12, 32, 16)
    grid = mesh_to_flexible_dual_grid(mesh.vertices, mesh.faces, 64)
    enc = FlexiDualGridVaeEncoder(**shape_encoder.TINY_ARGS)
    enc.load_state_dict(random_state_dict(enc, 11), strict=True)
    seen = []
    hooks = [blk.register_forward_hook(lambda m, i, o: seen.append(o.coords))
             for level in enc.blocks for blk in level if isinstance(blk, SparseResBlockS2C3d)]
    z = enc.encode(grid.coords, grid.dual_vertices, grid.intersected, 64)
    for h in hooks:
        h.remove()
    fine = torch.cat([torch.zeros_like(grid.coords[:, :1]), grid.coords], 1).long()
    for level, coords in enumerate(seen, start=1):
        parents = torch.unique(torch.cat([fine[:, :1], fine[:, 1:] // 2**level], 1), dim=0)
        assert torch.equal(coords.long(), parents), level
    assert z.feats.shape == (seen[-1].shape[0], 32) and z.spatial_shape == (4, 4, 4)
    assert torch.isfinite(z.feats).all()
    occ = occupancy_from_coords(grid.coords, 64, 4)
    assert torch.equal(torch.argwhere(occ), z.coords[:, 1:].long())

    dec = FlexiDualGridVaeDecoder(**dict(shape_decoder.TINY_ARGS, resolution=64))
    dec.load_state_dict(random_state_dict(dec, 12), strict=True)
    head, subs = dec(z, return_subs=True)
    assert torch.equal(subs[0].coords, z.coords)
    levels = [sub.coords.long() for sub in subs] + [head.coords.long()]
    for coarse, finer in zip(levels, levels[1:]):  # every voxel is a child of the level above
        parents = torch.cat([finer[:, :1], finer[:, 1:] // 2], 1)
        assert torch.isin(_key(parents), _key(coarse)).all()
    assert head.feats.shape[1] == 7 and head.spatial_shape == (64, 64, 64)
    meshes = dec.to_meshes(head)
    assert len(meshes) == 1 and meshes[0].vertices.shape[0] == head.coords.shape[0]


def _key(c):
    """int64 key of (b, x, y, z) rows (coords < 1024)."""
    return ((c[:, 0] * 1024 + c[:, 1]) * 1024 + c[:, 2]) * 1024 + c[:, 3]


def test_occupancy_encodes_to_the_ss_latent_grid_and_decodes_back_to_64():
    mesh = icosphere(3, 0.38)
    grid = mesh_to_flexible_dual_grid(mesh.vertices, mesh.faces, 128)
    occ = occupancy_from_coords(grid.coords, 128, 64)
    enc = SparseStructureEncoder(**dict(sparse_structure_encoder.TINY_ARGS, use_fp16=False))  # fp16 convs are slow on CPUs
    enc.load_state_dict(random_state_dict(enc, 13), strict=True)
    z = enc(occ[None, None].float())
    assert z.shape == (1, 8, 16, 16, 16) and torch.isfinite(z).all()
    dec = SparseStructureDecoder(**{**dict(out_channels=1, latent_channels=8, num_res_blocks=1,
                                           channels=[16, 8, 8], num_res_blocks_middle=1)})
    assert dec(z).shape == (1, 1, 64, 64, 64)
