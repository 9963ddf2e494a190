"""Write tests/data/golden_encoders/: outputs of the reference TRELLIS.2 encoders on tiny random
weights, for the parity tests in CI (tests/test_trellis2_encoders.py).

    python benchmarks/make_encoder_goldens.py --trellis2-src /path/to/TRELLIS.2 [--out DIR]

Runs the reference classes ``trellis2.models.sc_vaes.fdg_vae.FlexiDualGridVaeEncoder`` and
``trellis2.models.sparse_structure_vae.SparseStructureEncoder`` (5565d24) unmodified on the CPU.
What they import but this path does not run or cannot load here is replaced, and nothing else:

* ``flex_gemm.ops.spconv.sparse_submanifold_conv3d`` -> its dense equivalent: scatter the features
  into a zero grid, ``F.conv3d(grid, weight.permute(0, 4, 1, 2, 3), bias, padding=1)``, read the
  active voxels (a submanifold 3x3x3 conv is that by definition; see
  tests/data/golden_decoders/README.md for the same substitution and its check against FlexGEMM);
* ``cumesh``, ``flex_gemm.ops.grid_sample``, ``o_voxel.convert``: empty stubs (mesh code only);
* the ``trellis2`` package is entered without its ``__init__`` (pipelines, renderers).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import types

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "golden_encoders")
SEED = 7


def _dense_submanifold_conv3d(feats, coords, shape, weight, bias, neighbor_cache, dilation):
    assert tuple(dilation) == (1, 1, 1)
    b, x, y, z = shape[0], *shape[2:]
    co, kx, ky, kz, ci = weight.shape
    grid = torch.zeros(b, ci, x, y, z, dtype=feats.dtype)
    c = coords.long()
    grid[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = feats
    out = F.conv3d(grid, weight.permute(0, 4, 1, 2, 3), bias, padding=(kx // 2, ky // 2, kz // 2))
    return out[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]], None


def install_reference_package(src: str) -> None:
    """Make ``import trellis2`` load the checkout ``src`` (without running its package ``__init__``), with
    ``cumesh`` and ``o_voxel`` as empty stubs (mesh code only) and FlexGEMM as its sparse-conv backend."""
    convert = types.ModuleType("o_voxel.convert")
    convert.flexible_dual_grid_to_mesh = None
    ov = types.ModuleType("o_voxel")
    ov.convert = convert
    pkg = types.ModuleType("trellis2")
    pkg.__path__ = [os.path.join(src, "trellis2")]
    sys.modules.update({"cumesh": types.ModuleType("cumesh"), "o_voxel": ov, "o_voxel.convert": convert,
                        "trellis2": pkg})
    os.environ["SPARSE_CONV_BACKEND"] = "flex_gemm"  # the reference reads its backend from the environment


def import_reference(src: str):
    """(FlexiDualGridVaeEncoder, SparseStructureEncoder, trellis2.modules.sparse) of the checkout."""
    spconv = types.ModuleType("flex_gemm.ops.spconv")
    spconv.set_algorithm = spconv.set_hashmap_ratio = lambda *a: None
    spconv.sparse_submanifold_conv3d = _dense_submanifold_conv3d
    ops = types.ModuleType("flex_gemm.ops")
    ops.spconv, ops.grid_sample = spconv, types.ModuleType("flex_gemm.ops.grid_sample")
    ops.grid_sample.grid_sample_3d = None
    fg = types.ModuleType("flex_gemm")
    fg.ops = ops
    sys.modules.update({"flex_gemm": fg, "flex_gemm.ops": ops, "flex_gemm.ops.spconv": spconv,
                        "flex_gemm.ops.grid_sample": ops.grid_sample})
    install_reference_package(src)
    from trellis2.models.sc_vaes.fdg_vae import FlexiDualGridVaeEncoder
    from trellis2.models.sparse_structure_vae import SparseStructureEncoder
    import trellis2.modules.sparse as sp

    return FlexiDualGridVaeEncoder, SparseStructureEncoder, sp


def random_weights(model: torch.nn.Module, seed: int):
    """Every parameter from a seeded normal (so the reference's zero-initialised layers are used
    too): matrices / kernels N(0, 1/fan_in), norm weights 1 + 0.2 N, biases 0.2 N; rounded to
    fp16-representable values (stored F16, run in fp32 with exactly those values)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        leaf = key.rsplit(".", 1)[-1]
        if value.dim() >= 2:
            v = torch.randn(value.shape, generator=gen) / math.sqrt(value.numel() // value.shape[0])
        elif leaf == "bias":
            v = 0.2 * torch.randn(value.shape, generator=gen)
        else:
            v = 1 + 0.2 * torch.randn(value.shape, generator=gen)
        out[key] = v.half()
    return out


def shape_inputs(resolution: int = 32):
    """Two dual grids (sphere, torus) from our converter, quantised as the data toolkit stores
    them (uint8 of 255 * dual), as a batch: coords ``[N, 4]`` int32, feats pieces."""
    from know3d_core.mesh.primitives import icosphere, uv_torus
    from know3d_core.trellis2.mesh_to_dual_grid import mesh_to_flexible_dual_grid

    coords, dual, inter = [], [], []
    for b, mesh in enumerate([icosphere(3, 0.38, (0.02, -0.01, 0.0)), uv_torus(0.28, 0.1, 32, 16)]):
        g = mesh_to_flexible_dual_grid(mesh.vertices, mesh.faces, resolution)
        coords.append(torch.cat([torch.full_like(g.coords[:, :1], b), g.coords], 1))
        dual.append((g.dual_vertices.clamp(0, 1) * 255).to(torch.uint8).float() / 255)
        inter.append(g.intersected)
    return torch.cat(coords).int(), torch.cat(dual), torch.cat(inter)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trellis2-src", required=True, help="TRELLIS.2 checkout (5565d24)")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ShapeEnc, SSEnc, sp = import_reference(args.trellis2_src)
    from know3d_core.trellis2.shape_encoder import TINY_ARGS as SHAPE_ARGS
    from know3d_core.trellis2.sparse_structure_encoder import TINY_ARGS as SS_ARGS

    os.makedirs(args.out, exist_ok=True)
    # shape encoder
    res = 32
    coords, dual, inter = shape_inputs(res)
    io = {"coords": coords, "dual": dual, "intersected": inter.to(torch.uint8)}
    weights = None
    for mode in ("fp32", "fp16_mode"):
        model = ShapeEnc(**{**SHAPE_ARGS, "use_fp16": mode == "fp16_mode"}).eval()
        if weights is None:
            weights = random_weights(model, SEED)
        model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
        if mode == "fp16_mode":
            model.convert_to_fp16()
        vertices = sp.SparseTensor(dual, coords)
        z = model(vertices, sp.SparseTensor(inter, coords))
        io[f"out_feats_{mode}"] = z.feats.float().contiguous()
        io["out_coords"] = z.coords.int().contiguous()
    save_file(weights, os.path.join(args.out, "shape_encoder_weights.safetensors"))
    save_file(io, os.path.join(args.out, "shape_encoder_io.safetensors"))

    # sparse-structure encoder: occupancy of the same shapes at 16^3
    occ = torch.zeros(2, 1, 16, 16, 16)
    c = coords.long()
    occ[c[:, 0], 0, c[:, 1] // 2, c[:, 2] // 2, c[:, 3] // 2] = 1
    io = {"occupancy": occ}
    weights = None
    for mode in ("fp32", "fp16_mode"):
        model = SSEnc(**{**SS_ARGS, "use_fp16": False}).eval()
        if weights is None:
            weights = random_weights(model, SEED + 1)
        model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
        if mode == "fp16_mode":
            model.convert_to_fp16()
        io[f"mean_{mode}"] = model(occ, sample_posterior=False).float().contiguous()
    save_file(weights, os.path.join(args.out, "ss_encoder_weights.safetensors"))
    save_file(io, os.path.join(args.out, "ss_encoder_io.safetensors"))
    with open(os.path.join(args.out, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"FlexiDualGridVaeEncoder": SHAPE_ARGS, "SparseStructureEncoder": SS_ARGS,
                   "shape_input_resolution": res, "weight_seed": SEED}, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
