"""Benchmark: TRELLIS.2's texture stage (issue 23) at full size with random weights.

Rows:
- ``tex_flow``: the texture flow (``SLatFlowModel`` in 64 / out 32, official widths, bf16) on N
  sphere-shell tokens (default 20k, as a 1024 cascade asset) with the shape latent as
  ``concat_cond``: one forward, and one CFG pair (2N rows, what a step inside the guidance interval runs).
- ``tex_decoder``: the texture decoder (official config, fp16 body) guided by the subdivisions of the
  full-size shape decoder on ~20k tokens of a 64^3 grid (-> 1024^3); random weights give random
  subdivisions of realistic size (see bench_shape_decoder.py).
- ``bake``: a sphere at the 1024 mesh grid with a PBR voxel shell, ``mesh.texture.bake_pbr`` at
  ``--texture-size`` (default 2048) on the device, per step (unwrap on the CPU by xatlas, raster,
  snap to the undecimated surface, sampling, dilation) and in all, after decimation to --faces.

Peak VRAM: extra memory over what was allocated before each row. ``--tiny``: tiny configs on the CPU
(script check), texture 256.

    python benchmarks/bench_texture.py --out texture.json          # GPU, full size
    python benchmarks/bench_texture.py --tiny --out texture.json   # CPU check
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import SHAPE_DECODER_FULL, default_device, device_name, sample_times, write_json  # noqa: E402
from bench_shape_decoder import init_random, sphere_shell_tokens  # noqa: E402

from know3d_core.sparse import SparseTensor  # noqa: E402
from know3d_core.trellis2 import shape_decoder as shape_mod  # noqa: E402
from know3d_core.trellis2 import tex_decoder as tex_mod  # noqa: E402
from know3d_core.trellis2.loading import FULL_SIZE_FLOW_CONFIGS  # noqa: E402
from know3d_core.trellis2.shape_decoder import FlexiDualGridVaeDecoder  # noqa: E402
from know3d_core.trellis2.slat_flow import SLatFlowModel  # noqa: E402
from know3d_core.trellis2.tex_decoder import SparseUnetVaeDecoder  # noqa: E402
from know3d_core.trellis2.tiny import tiny_flow_args  # noqa: E402

TEX_DECODER_FULL = dict(out_channels=6, model_channels=[1024, 512, 256, 128, 64], latent_channels=32,
                        num_blocks=[4, 16, 8, 4, 0], block_type=["SparseConvNeXtBlock3d"] * 5,
                        up_block_type=["SparseResBlockC2S3d"] * 4, block_args=[{}] * 5, use_fp16=True,
                        pred_subdiv=False)


def measure(fn, device, warmup, repeats):
    times, peak, out = sample_times(fn, device, warmup, repeats, track_peak=True, empty_cache=True, keep_last=True)
    return round(statistics.median(times), 3), None if peak is None else round(peak, 3), out


def bench_flow(args, device) -> dict:
    cfg = {**tiny_flow_args("shape512"), "in_channels": 64} if args.tiny else dict(
        FULL_SIZE_FLOW_CONFIGS["tex_slat_flow_model_1024"][1])
    cfg["dtype"] = "float32" if args.tiny else "bfloat16"
    model = init_random(SLatFlowModel(**cfg).to(device))
    grid = 16 if args.tiny else 64
    coords = sphere_shell_tokens(grid, 500 if args.tiny else args.tokens, device)
    n = coords.shape[0]
    gen = torch.Generator(device=device).manual_seed(0)
    x = SparseTensor(torch.randn(n, 32, device=device, generator=gen), coords, (grid,) * 3, batch_size=1)
    shape = torch.randn(n, 32, device=device, generator=gen)
    cond = torch.randn(1, 4101 if not args.tiny else 16, cfg["cond_channels"], device=device, generator=gen)
    t = torch.tensor([500.0], device=device)
    with torch.no_grad():
        one_ms, one_peak, _ = measure(lambda: model(x, t, cond, concat_cond=shape), device, args.warmup, args.repeats)
        c2 = coords.clone()
        c2[:, 0] = 1
        pair = SparseTensor(torch.cat([x.feats, x.feats]), torch.cat([coords, c2]), (grid,) * 3, batch_size=2)
        pair_ms, pair_peak, _ = measure(lambda: model(pair, t.repeat(2), cond.repeat(2, 1, 1),
                                                      concat_cond=shape.repeat(2, 1)), device, args.warmup,
                                        args.repeats)
    return {"case": "tex_flow", "tokens": n, "dtype": cfg["dtype"], "forward_ms": one_ms, "forward_peak_gib": one_peak,
            "cfg_pair_ms": pair_ms, "cfg_pair_peak_gib": pair_peak}


def bench_decoder(args, device) -> dict:
    shape_cfg = dict(shape_mod.TINY_ARGS) if args.tiny else dict(SHAPE_DECODER_FULL)
    tex_cfg = dict(tex_mod.TINY_ARGS) if args.tiny else dict(TEX_DECODER_FULL)
    if args.tiny:
        shape_cfg["use_fp16"] = tex_cfg["use_fp16"] = False
    shape = init_random(FlexiDualGridVaeDecoder(**shape_cfg).to(device))
    tex = init_random(SparseUnetVaeDecoder(**tex_cfg).to(device), seed=1)
    grid = 8 if args.tiny else 64
    coords = sphere_shell_tokens(grid, 100 if args.tiny else args.tokens, device)
    gen = torch.Generator(device=device).manual_seed(2)
    x = SparseTensor(torch.randn(coords.shape[0], 32, device=device, generator=gen), coords, (grid,) * 3,
                     batch_size=1)
    head, subs = shape(x, return_subs=True)
    del head
    ms, peak, out = measure(lambda: tex.decode(x.replace(x.feats.flip(1)), subs), device, args.warmup, args.repeats)
    return {"case": "tex_decoder", "tokens": int(coords.shape[0]), "voxels_out": int(out.coords.shape[0]),
            "dtype": "float32" if args.tiny else "float16", "forward_ms": ms, "forward_peak_gib": peak}


def bench_bake(args, device) -> dict:
    from know3d_core.mesh import postprocess_mesh
    from know3d_core.mesh.primitives import icosphere
    from know3d_core.mesh.texture import PBRVoxels, bake_pbr

    res = 128 if args.tiny else 1024
    size = 256 if args.tiny else args.texture_size
    fine = icosphere(4 if args.tiny else 8, 0.42)  # 8: 1.3M faces, ~1 face per mesh-grid voxel at 1024
    mesh = postprocess_mesh(fine, 0.0, 2000 if args.tiny else args.faces)
    # voxels within 2 voxels of the sphere, built slab by slab (1024^3 does not fit as one tensor)
    coords = []
    for x0 in range(0, res, 32):
        xs = torch.arange(x0, min(res, x0 + 32), device=device)
        r = torch.arange(res, device=device)
        c = torch.stack(torch.meshgrid(xs, r, r, indexing="ij"), -1).reshape(-1, 3)
        p = (c.float() + 0.5) / res - 0.5
        coords.append(c[((p.norm(dim=1) - 0.42).abs() <= 2.0 / res)])
    coords = torch.cat(coords)
    p = (coords.float() + 0.5) / res - 0.5
    attrs = torch.cat([0.5 + p, 0.5 + p[:, :1], 0.5 - p[:, 1:2], torch.ones_like(p[:, :1])], 1)
    voxels = PBRVoxels(coords.int(), attrs, res)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    baked = bake_pbr(mesh, voxels, texture_size=size, surface=fine.to(device), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if device.type == "cuda" else None
    return {"case": "bake", "mesh_grid": res, "voxels": int(coords.shape[0]), "fine_faces": int(fine.num_faces),
            "faces": int(mesh.num_faces), "texture_size": size, "total_s": round(total, 3),
            "steps_s": {k: round(v, 3) for k, v in baked.metadata["timings"].items()},
            "texel_coverage": round(baked.metadata["texel_coverage"], 4),
            "peak_gib": None if peak is None else round(peak, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device")
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--texture-size", type=int, default=2048)
    p.add_argument("--faces", type=int, default=200000)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", default="tex_flow,tex_decoder,bake")
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = default_device(args.device, args.tiny)
    if args.tiny:
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
    elif device.type != "cuda":
        print("full size needs CUDA; use --tiny on the CPU", file=sys.stderr)
        return 1
    benches = {"tex_flow": bench_flow, "tex_decoder": bench_decoder, "bake": bench_bake}
    rows = []
    for name in args.rows.split(","):
        row = benches[name](args, device)
        print(row, flush=True)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_json(args.out, {"device": device_name(device), "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
