"""Sparse-structure decoder and shape (FlexiDualGrid) decoder.

Parity: golden outputs of the reference TRELLIS.2 code on tiny random weights
(tests/data/golden_decoders/README.md says how they were made). Structure: the full-size configs
built on the meta device must have the official key names, shapes, parameter counts (derived from
the official file sizes) and the official fp16/fp32 split.
"""
import gc
import json
import os
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from know3d_core.sparse import NeighbourMap, SparseTensor
from know3d_core.trellis2 import shape_decoder as shape_mod
from know3d_core.trellis2.ovoxel import sdf_to_flexible_dual_grid, sphere_sdf
from know3d_core.trellis2.shape_decoder import FlexiDualGridVaeDecoder, SparseResBlockC2S3d, decode_head
from know3d_core.trellis2.sparse_structure_decoder import (
    TINY_ARGS as SS_TINY_ARGS,
    SparseStructureDecoder,
    decode_occupancy,
    pixel_shuffle_3d,
)

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_decoders")

# Official configs (research §3.2 / §3.4).
SS_FULL_ARGS = dict(out_channels=1, latent_channels=8, num_res_blocks=2, channels=[512, 128, 32],
                    num_res_blocks_middle=2, norm_type="layer", use_fp16=True)
SHAPE_FULL_ARGS = dict(resolution=256, model_channels=[1024, 512, 256, 128, 64], latent_channels=32,
                       num_blocks=[4, 16, 8, 4, 0], block_type=["SparseConvNeXtBlock3d"] * 5,
                       up_block_type=["SparseResBlockC2S3d"] * 4,
                       block_args=[{"use_checkpoint": True}] * 2 + [{"use_checkpoint": False}] * 3, use_fp16=True)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def golden(name):
    return load_file(os.path.join(GOLDEN, name))


def golden_config():
    with open(os.path.join(GOLDEN, "config.json")) as f:
        return json.load(f)


def golden_shape_decoder():
    model = FlexiDualGridVaeDecoder(**golden_config()["FlexiDualGridVaeDecoder"])
    model.load_state_dict(golden("shape_decoder_weights.safetensors"), strict=True)
    io = golden("shape_decoder_io.safetensors")
    return model, io


def slat_from(io, rows=slice(None)):
    coords = io["coords"][rows].clone()
    coords[:, 0] -= coords[0, 0].item()
    return SparseTensor(io["feats"][rows], coords, (8, 8, 8))


# ----------------------------------------------------------------------------- SS decoder
def test_pixel_shuffle_3d_follows_index_formula():
    x = torch.randn(2, 3 * 8, 2, 3, 4)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (2, 3, 4, 6, 8)
    b, c, h, w, d = torch.meshgrid(*[torch.arange(n) for n in y.shape], indexing="ij")
    src = x[b, c * 8 + (h % 2) * 4 + (w % 2) * 2 + (d % 2), h // 2, w // 2, d // 2]
    assert torch.equal(y, src)


def _expected_ss_keys(args):
    """Key -> shape, written from the layer list of the official decoder."""
    ch, lat = args["channels"], args["latent_channels"]
    keys = {"input_layer.weight": (ch[0], lat, 3, 3, 3), "input_layer.bias": (ch[0],)}

    def res(prefix, c):
        for n in ("norm1", "norm2"):
            keys[f"{prefix}.{n}.weight"] = keys[f"{prefix}.{n}.bias"] = (c,)
        for n in ("conv1", "conv2"):
            keys[f"{prefix}.{n}.weight"], keys[f"{prefix}.{n}.bias"] = (c, c, 3, 3, 3), (c,)

    for i in range(args["num_res_blocks_middle"]):
        res(f"middle_block.{i}", ch[0])
    i = 0
    for level, c in enumerate(ch):
        for _ in range(args["num_res_blocks"]):
            res(f"blocks.{i}", c)
            i += 1
        if level < len(ch) - 1:
            keys[f"blocks.{i}.conv.weight"], keys[f"blocks.{i}.conv.bias"] = (ch[level + 1] * 8, c, 3, 3, 3), (ch[level + 1] * 8,)
            i += 1
    keys["out_layer.0.weight"] = keys["out_layer.0.bias"] = (ch[-1],)
    keys["out_layer.2.weight"], keys["out_layer.2.bias"] = (args["out_channels"], ch[-1], 3, 3, 3), (args["out_channels"],)
    return keys


@pytest.mark.parametrize("args", [SS_FULL_ARGS, SS_TINY_ARGS], ids=["full", "tiny"])
def test_ss_decoder_keys_shapes_and_dtypes(args):
    with torch.device("meta"):
        model = SparseStructureDecoder(**args)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == _expected_ss_keys(args)
    for k, v in sd.items():
        half = k.startswith(("blocks.", "middle_block.")) and ".norm" not in k
        assert v.dtype == (torch.float16 if half else torch.float32), k
    if args is SS_FULL_ARGS:
        # 147 591 972-byte file = header + 73 671 201 params (F16 body, F32 input/out layers).
        assert sum(v.numel() for v in sd.values()) == 73_671_201


def test_ss_decoder_matches_reference_golden():
    model = SparseStructureDecoder(**golden_config()["SparseStructureDecoder"])
    model.load_state_dict(golden("ss_decoder_weights.safetensors"), strict=True)
    io = golden("ss_decoder_io.safetensors")
    out = model(io["latent"])
    assert out.shape == io["logits"].shape and out.dtype == torch.float32
    assert rel_err(out, io["logits"]) <= 1e-5
    # Official mixed precision: fp16 body, fp32 input/out layers and norms.
    model.convert_to(torch.float16)
    out16 = model(io["latent"])
    assert out16.dtype == torch.float32
    assert rel_err(out16, io["logits_fp16_mode"]) <= 1e-4 < rel_err(out16, io["logits"])


def test_decode_occupancy_64_and_32():
    logits = torch.randn(2, 1, 8, 8, 8) - 1.0
    coords = decode_occupancy(logits, 8)
    assert coords.dtype == torch.int32 and coords.shape[1] == 4
    expected = [(b, x, y, z) for b in range(2) for x in range(8) for y in range(8) for z in range(8)
                if logits[b, 0, x, y, z] > 0]
    assert coords.tolist() == [list(e) for e in expected]
    coarse = decode_occupancy(logits, 4)
    any_fine = (logits[:, 0] > 0).view(2, 4, 2, 4, 2, 4, 2).any(6).any(4).any(2)
    assert coarse.tolist() == torch.argwhere(any_fine).tolist()
    with pytest.raises(ValueError, match="divide"):
        decode_occupancy(logits, 3)


# ----------------------------------------------------------------------------- shape decoder
def _expected_shape_keys(args):
    ch, nb = args["model_channels"], args["num_blocks"]
    keys = {"from_latent.weight": (ch[0], args["latent_channels"]), "from_latent.bias": (ch[0],),
            "output_layer.weight": (7, ch[-1]), "output_layer.bias": (7,)}
    for level, c in enumerate(ch):
        for j in range(nb[level]):
            p = f"blocks.{level}.{j}"
            keys.update({f"{p}.conv.weight": (c, 3, 3, 3, c), f"{p}.conv.bias": (c,), f"{p}.norm.weight": (c,),
                         f"{p}.norm.bias": (c,), f"{p}.mlp.0.weight": (4 * c, c), f"{p}.mlp.0.bias": (4 * c,),
                         f"{p}.mlp.2.weight": (c, 4 * c), f"{p}.mlp.2.bias": (c,)})
        if level < len(ch) - 1:
            p, co = f"blocks.{level}.{nb[level]}", ch[level + 1]
            keys.update({f"{p}.norm1.weight": (c,), f"{p}.norm1.bias": (c,),
                         f"{p}.conv1.weight": (8 * co, 3, 3, 3, c), f"{p}.conv1.bias": (8 * co,),
                         f"{p}.conv2.weight": (co, 3, 3, 3, co), f"{p}.conv2.bias": (co,),
                         f"{p}.to_subdiv.weight": (8, c), f"{p}.to_subdiv.bias": (8,)})
    return keys


@pytest.mark.parametrize("args", [SHAPE_FULL_ARGS, shape_mod.TINY_ARGS], ids=["full", "tiny"])
def test_shape_decoder_keys_shapes_and_dtypes(args):
    with torch.device("meta"):
        model = FlexiDualGridVaeDecoder(**args)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == _expected_shape_keys(args)
    for k, v in sd.items():
        half = k.startswith("blocks.") and ".norm" not in k
        assert v.dtype == (torch.float16 if half else torch.float32), k
    if args is SHAPE_FULL_ARGS:
        assert sum(v.numel() for v in sd.values()) == 474_231_463  # official file: 948 490 494 B of F16


def test_shape_decoder_rejects_unknown_config():
    bad = dict(shape_mod.TINY_ARGS, block_args=[{"mlp_ratio": 2.0, "window": 3}] * 5)
    with pytest.raises(ValueError, match="window"):
        FlexiDualGridVaeDecoder(**bad)
    with pytest.raises(ValueError, match="block type"):
        FlexiDualGridVaeDecoder(**dict(shape_mod.TINY_ARGS, up_block_type=["SparseResBlockUpsample3d"] * 4))


def test_shape_decoder_matches_reference_golden():
    model, io = golden_shape_decoder()
    head, subs = model(slat_from(io), return_subs=True)
    assert head.feats.dtype == torch.float32
    assert torch.equal(head.coords, io["out_coords"])
    assert rel_err(head.feats, io["out_feats"]) <= 1e-5
    assert len(subs) == 4
    for i, sub in enumerate(subs):
        ref = io[f"subdiv_logits_{i}"]
        assert torch.equal(sub.coords, io[f"subdiv_coords_{i}"])
        assert rel_err(sub.feats, ref) <= 1e-5
        assert torch.equal(sub.feats > 0, ref > 0)
    assert torch.equal(head.feats[:, 3:6] > 0, io["out_feats"][:, 3:6] > 0)
    meshes = model.to_meshes(head)
    assert len(meshes) == 2
    for b, mesh in enumerate(meshes):
        assert torch.equal(mesh.faces, io[f"mesh_faces_{b}"])
        torch.testing.assert_close(mesh.vertices, io[f"mesh_vertices_{b}"], rtol=0, atol=1e-6)


def test_upsample_returns_the_coords_of_each_level():
    model, io = golden_shape_decoder()
    x = slat_from(io)
    _, subs = model(x, return_subs=True)
    assert torch.equal(model.upsample(x, 4), io["out_coords"])
    for k in range(4):
        assert torch.equal(model.upsample(x, k), subs[k].coords)
    with pytest.raises(ValueError, match="upsample_times"):
        model.upsample(x, 5)


def test_batch_items_decode_independently():
    model, io = golden_shape_decoder()
    head = model(slat_from(io))
    n0 = int((io["coords"][:, 0] == 0).sum())
    alone = model(slat_from(io, slice(n0, None)))
    rows = head.layout[1]
    assert torch.equal(alone.coords[:, 1:], head.coords[rows, 1:])
    assert rel_err(alone.feats, head.feats[rows]) <= 1e-6


def test_shape_decoder_fp16_mode_close_to_fp32():
    model, io = golden_shape_decoder()
    ref = model(slat_from(io))
    model.convert_to(torch.float16)
    assert model.blocks[0][0].conv.weight.dtype == torch.float16
    assert model.blocks[0][0].norm.weight.dtype == torch.float32
    head = model(slat_from(io))
    same = torch.equal(head.coords, ref.coords)
    # fp16 may flip a near-zero subdivision logit; compare rows only when the voxel sets agree.
    if same:
        assert rel_err(head.feats, ref.feats) <= 2e-2
    else:
        assert abs(head.coords.shape[0] - ref.coords.shape[0]) <= 0.02 * ref.coords.shape[0]


def test_intermediates_are_freed_during_forward():
    model, io = golden_shape_decoder()
    alive = []

    def keep_weak(module, inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        maps = [weakref.ref(v) for v in out.cache.values() if isinstance(v, NeighbourMap)]
        alive.append((weakref.ref(out.feats), maps))

    hooks = [b.register_forward_hook(keep_weak) for level in model.blocks for b in level]
    x = slat_from(io)
    cache_before = dict(x.cache)
    head, subs = model(x, return_subs=True)
    assert x.cache == cache_before  # nothing attached to the caller's tensor
    for h in hooks:
        h.remove()
    gc.collect()
    assert len(alive) == sum(len(level) for level in model.blocks)
    # Every block output and every neighbour map is gone; the head and subs hold none.
    assert sum(len(maps) for _, maps in alive) >= len(alive) - 1
    assert all(feats() is None and all(m() is None for m in maps) for feats, maps in alive)
    assert not any(k for k in head.cache if k != "batch_size")
    assert all(not sub.cache for sub in subs)


def test_c2s_skip_repeats_each_channel_consecutively():
    torch.manual_seed(0)
    block = SparseResBlockC2S3d(16, 8)
    for p in block.parameters():
        torch.nn.init.zeros_(p)  # conv path = 0, subdiv logits = 0 -> supply our own mask
    block.pred_subdiv = False
    coords = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4]], dtype=torch.int32)
    x = SparseTensor(torch.randn(2, 16), coords, (8, 8, 8))
    logits = torch.full((2, 8), -1.0)
    logits[0, 5] = logits[1, 0] = 1.0
    out, _ = block(x, logits)
    assert out.coords.tolist() == [[0, 3, 4, 7], [0, 2, 4, 8]]  # 2*p + bits(k), x = bit 0
    # child k of parent p gets channel block k (2 channels), each repeated 4 times
    assert torch.equal(out.feats[0], x.feats[0, 10:12].repeat_interleave(4))
    assert torch.equal(out.feats[1], x.feats[1, 0:2].repeat_interleave(4))


def test_decode_head_ranges():
    feats = torch.randn(100, 7) * 3
    v, inter, w = decode_head(feats, voxel_margin=0.5)
    assert v.min() >= -0.5 and v.max() <= 1.5
    torch.testing.assert_close(v, 2 * torch.sigmoid(feats[:, :3]) - 0.5)
    assert torch.equal(inter, feats[:, 3:6] > 0)
    assert (w > 0).all() and torch.allclose(w, F.softplus(feats[:, 6]))


def test_shape_decoder_is_found_by_the_loader_registry():
    from know3d_core.trellis2.loading import get_model_class

    assert get_model_class("FlexiDualGridVaeDecoder") is FlexiDualGridVaeDecoder
    assert get_model_class("SparseStructureDecoder") is SparseStructureDecoder


def test_decoded_sphere_shell_tokens_give_a_mesh_per_item():
    """Smoke test at a real-looking token set: tiny weights, sphere-shell tokens on 8^3."""
    torch.manual_seed(0)
    model = FlexiDualGridVaeDecoder(**dict(shape_mod.TINY_ARGS, use_fp16=False))
    coords, _, _ = sdf_to_flexible_dual_grid(sphere_sdf(radius=0.3), 8)
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1)
    x = SparseTensor(torch.randn(len(coords), 32), coords, (8, 8, 8))
    head = model(x)
    assert head.coords[:, 1:].max() < 8 * 2 ** 4  # 8^3 tokens through four 2x subdivisions
    meshes = model.decode(x)
    assert len(meshes) == 1 and meshes[0].faces.shape[1] == 3
    assert meshes[0].metadata["resolution"] == shape_mod.TINY_ARGS["resolution"] == 8 * 2 ** 4


def test_coarsen_coords_equals_decoding_at_the_coarser_grid():
    """Pooling coords by 2 is the coords form of decode_occupancy's max-pool from 64^3 to 32^3."""
    from know3d_core.trellis2.sparse_structure_decoder import coarsen_coords, decode_occupancy

    logits = torch.randn(2, 1, 64, 64, 64, generator=torch.Generator().manual_seed(4)) - 2.5
    fine = decode_occupancy(logits, 64)
    assert torch.equal(coarsen_coords(fine, 2), decode_occupancy(logits, 32))
    assert coarsen_coords(fine, 1) is fine
