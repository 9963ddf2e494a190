"""Benchmark: TRELLIS.2's texture stage (issue 23) at full size with random weights.

Rows:
- ``tex_flow``: the texture flow (``SLatFlowModel`` in 64 / out 32, official widths, bf16) on N
  sphere-shell tokens (default 20k, as a 1024 cascade asset) with the shape latent as
  ``concat_cond``: one forward, then the stage's whole sampler run with pipeline.json's
  ``tex_slat_sampler`` (12 steps, guidance 1: one forward a step, no CFG pair), peak VRAM.
  The reference class is not run here (its sparse kernels are compiled extensions); its shape flow,
  the same architecture at 20k tokens, is research/performance.md's anchor.
- ``tex_decoder``: the texture decoder (official config, fp16 body) guided by the subdivisions of the
  full-size shape decoder on ~20k tokens of a 64^3 grid (-> 1024^3); random weights give random
  subdivisions of realistic size (see bench_shape_decoder.py).
- ``bake``: a bumpy sphere of ``icosphere(8)`` (1.3M faces, ~1 face per voxel of the 1024 mesh grid)
  with a PBR voxel shell at 1024: the decimation to --faces (CPU, timed apart), then
  ``mesh.texture.bake_pbr`` at ``--texture-size`` (default 2048) on the device, per step (unwrap on
  the CPU by xatlas piece by piece, raster, snap to the undecimated surface, sampling, dilation),
  the GLB write (PNG encoding) apart; texel coverage and UV stretch of the atlas.
- ``unwrap`` (CPU, not in the default rows): ``uv_unwrap`` of the same decimated mesh for each
  ``--piece-faces`` (0: the whole mesh as one xatlas mesh): seconds (wall and CPU), charts' texel
  coverage, stretch, seam vertices.
- ``stage``: the whole texture stage of a 1024 asset from the rows above: flow sampler + decoder +
  bake (+ decimation + GLB write).

Peak VRAM: extra memory over what was allocated before each row. ``--tiny``: tiny configs on the CPU
(script check), texture 256. Results are written after every row; ``--budget`` seconds skips the
rows that would start after it.

    python benchmarks/bench_texture.py --out texture.json          # GPU, full size
    python benchmarks/bench_texture.py --tiny --out texture.json   # CPU check
    python benchmarks/bench_texture.py --rows unwrap --device cpu --faces 82000 --piece-faces 256,0
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

from _common import SHAPE_DECODER_FULL, default_device, device_name, sample_times, sync, write_json  # noqa: E402
from bench_shape_decoder import init_random, sphere_shell_tokens  # noqa: E402

from know3d_core.generate.texture import DEFAULT_TEXTURE_FACES  # noqa: E402
from know3d_core.mesh.texture import PIECE_FACES  # noqa: E402
from know3d_core.sampling.flow_euler import (OFFICIAL_SAMPLER_PARAMS, FlowEulerGuidanceIntervalSampler,  # noqa: E402
                                             count_model_calls, sparse_cfg_batch)
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


def peak_since(device, base):
    """Peak allocated GiB above ``base`` bytes since the last reset (None on the CPU)."""
    if device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated() - base) / 2 ** 30, 3)


def reset_peak(device) -> int:
    """Synchronise, reset the peak counter and return the bytes allocated now (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def seconds(fn, device):
    """``(wall seconds of fn(), its result)`` between two synchronises."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def bench_flow(args, device) -> dict:
    cfg = {**tiny_flow_args("shape512"), "in_channels": 64} if args.tiny else dict(
        FULL_SIZE_FLOW_CONFIGS["tex_slat_flow_model_1024"][1])
    cfg["dtype"] = "float32" if args.tiny else "bfloat16"
    with device:  # built on the device: no 1.3B-parameter CPU init
        model = init_random(SLatFlowModel(**cfg))
    grid = 16 if args.tiny else 64
    coords = sphere_shell_tokens(grid, 500 if args.tiny else args.tokens, device)
    n = coords.shape[0]
    gen = torch.Generator(device=device).manual_seed(0)
    x = SparseTensor(torch.randn(n, 32, device=device, generator=gen), coords, (grid,) * 3, batch_size=1)
    shape = torch.randn(n, 32, device=device, generator=gen)
    cond = torch.randn(1, 4101 if not args.tiny else 16, cfg["cond_channels"], device=device, generator=gen)
    t = torch.tensor([500.0], device=device)
    params = OFFICIAL_SAMPLER_PARAMS["tex_slat"]
    with torch.no_grad():
        one_ms, one_peak, _ = measure(lambda: model(x, t, cond, concat_cond=shape), device, args.warmup, args.repeats)

        def fn(xt, tt, cc):
            return model(xt, tt, cc, concat_cond=shape)

        sampler = FlowEulerGuidanceIntervalSampler(params)
        base = reset_peak(device)
        stage_s, _ = seconds(lambda: sampler.sample(fn, x, cond, torch.zeros_like(cond),
                                                    batched_model_fn=sparse_cfg_batch(fn)), device)
        stage_peak = peak_since(device, base)
    return {"case": "tex_flow", "tokens": n, "dtype": cfg["dtype"], "forward_ms": one_ms, "forward_peak_gib": one_peak,
            "sampler_steps": params.steps, "sampler_forwards": count_model_calls(params),
            "sampler_s": round(stage_s, 3), "sampler_peak_gib": stage_peak,
            "weights_gib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30, 3)}


def bench_decoder(args, device) -> dict:
    shape_cfg = dict(shape_mod.TINY_ARGS) if args.tiny else dict(SHAPE_DECODER_FULL)
    tex_cfg = dict(tex_mod.TINY_ARGS) if args.tiny else dict(TEX_DECODER_FULL)
    if args.tiny:
        shape_cfg["use_fp16"] = tex_cfg["use_fp16"] = False
    with device:
        shape = init_random(FlexiDualGridVaeDecoder(**shape_cfg))
        tex = init_random(SparseUnetVaeDecoder(**tex_cfg), seed=1)
    grid = 8 if args.tiny else 64
    coords = sphere_shell_tokens(grid, 100 if args.tiny else args.tokens, device)
    gen = torch.Generator(device=device).manual_seed(2)
    x = SparseTensor(torch.randn(coords.shape[0], 32, device=device, generator=gen), coords, (grid,) * 3,
                     batch_size=1)
    with torch.no_grad():
        head, subs = shape(x, return_subs=True)
        del head
        ms, peak, out = measure(lambda: tex.decode(x.replace(x.feats.flip(1)), subs), device, args.warmup,
                                args.repeats)
    return {"case": "tex_decoder", "tokens": int(coords.shape[0]), "voxels_out": int(out.coords.shape[0]),
            "dtype": "float32" if args.tiny else "float16", "forward_ms": ms, "forward_peak_gib": peak}


BUMPY_RADIUS = 0.42


def bump(d: torch.Tensor) -> torch.Tensor:
    """Relative radial bump (+-5%) of the bumpy sphere in unit directions ``d [P, 3]`` -> ``[P]``."""
    return 0.03 * torch.sin(9 * d[:, 0]) * torch.cos(7 * d[:, 1]) + 0.02 * torch.sin(13 * d[:, 2] + 3 * d[:, 0])


def bumpy_sphere(subdivisions: int):
    """An icosphere with smooth radial bumps: charts are not trivial, as on a generated mesh."""
    from know3d_core.mesh.primitives import icosphere
    from know3d_core.mesh.types import Mesh

    m = icosphere(subdivisions, BUMPY_RADIUS)
    d = torch.nn.functional.normalize(m.vertices, dim=1)
    return Mesh(m.vertices * (1 + bump(d)).unsqueeze(1), m.faces, {})


def shell_voxels(res: int, device):
    """PBR voxels (a linear colour field) on every voxel whose centre is within 2 voxels (radially) of
    the bumpy sphere, built slab by slab (``res^3`` does not fit as one tensor at 1024); about as many
    as the texture decoder gives a 1024 asset (~10M)."""
    from know3d_core.mesh.texture import PBRVoxels

    coords = []
    r = torch.arange(res, device=device)
    for x0 in range(0, res, 32):
        xs = torch.arange(x0, min(res, x0 + 32), device=device)
        c = torch.stack(torch.meshgrid(xs, r, r, indexing="ij"), -1).reshape(-1, 3)
        p = (c.float() + 0.5) / res - 0.5
        norm = p.norm(dim=1)
        near = (norm - BUMPY_RADIUS).abs() < 0.06  # the bumps stay within 5%
        c, p, norm = c[near], p[near], norm[near]
        surface = BUMPY_RADIUS * (1 + bump(p / norm.clamp_min(1e-9).unsqueeze(1)))
        coords.append(c[(norm - surface).abs() <= 2.0 / res])
    coords = torch.cat(coords)
    p = (coords.float() + 0.5) / res - 0.5
    attrs = torch.cat([0.5 + p, 0.5 + p[:, :1], 0.5 - p[:, 1:2], torch.ones_like(p[:, :1])], 1)
    return PBRVoxels(coords.int(), attrs, res)


_DECIMATED = {}


def decimated(args):
    """``(fine mesh, mesh decimated to --faces, decimation seconds)`` (CPU; made once per process)."""
    from know3d_core.mesh import postprocess_mesh

    if not _DECIMATED:
        fine = bumpy_sphere(4 if args.tiny else 8)
        t0 = time.perf_counter()
        mesh = postprocess_mesh(fine, 0.0, 2000 if args.tiny else args.faces)
        _DECIMATED["result"] = (fine, mesh, time.perf_counter() - t0)
    return _DECIMATED["result"]


def atlas_quality(vertices, faces, uvs, size, input_vertices) -> dict:
    from know3d_core.mesh.texture import rasterize_uv, uv_stretch

    face_id, _ = rasterize_uv(uvs, faces, size)
    q = uv_stretch(vertices, faces, uvs)
    return {"texel_coverage": round(float((face_id >= 0).float().mean()), 4), "stretch_l2": round(q["l2"], 5),
            "stretch_within_1_25": round(q["within_1_25"], 5), "zero_uv_area_faces": q["zero_area_faces"],
            "seam_vertex_ratio": round(vertices.shape[0] / input_vertices, 3)}


def bench_bake(args, device) -> dict:
    from know3d_core.mesh.texture import bake_pbr, textured_glb_bytes

    res = 128 if args.tiny else 1024
    size = 256 if args.tiny else args.texture_size
    fine, mesh, decimate_s = decimated(args)
    voxels = shell_voxels(res, device)
    piece = int(args.piece_faces.split(",")[0])
    surface = fine.to(device)

    def bake():
        return bake_pbr(mesh, voxels, texture_size=size, surface=surface, device=device, piece_faces=piece)

    first_s, _ = seconds(bake, device)  # the process' first bake: kernels' first launches included
    base = reset_peak(device)
    total, baked = seconds(bake, device)
    peak = peak_since(device, base)
    glb_s, data = seconds(lambda: textured_glb_bytes(baked), torch.device("cpu"))
    quality = atlas_quality(baked.vertices.to(device), baked.faces.to(device), baked.uvs.to(device), size,
                            mesh.vertices.shape[0])
    return {"case": "bake", "mesh_grid": res, "voxels": int(voxels.coords.shape[0]), "fine_faces": int(fine.num_faces),
            "faces": int(mesh.num_faces), "texture_size": size, "piece_faces": piece, "total_s": round(total, 3),
            "first_bake_s": round(first_s, 3),
            "steps_s": {k: round(v, 3) for k, v in baked.metadata["timings"].items()},
            "decimate_s": round(decimate_s, 3), "write_glb_s": round(glb_s, 3),
            "glb_mib": round(len(data) / 2 ** 20, 2),
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), **quality, "peak_gib": peak}


def bench_unwrap(args, device) -> dict:
    from know3d_core.mesh.texture import uv_unwrap

    size = 256 if args.tiny else args.texture_size
    _, mesh, _ = decimated(args)
    runs = []
    uv_unwrap(mesh, size, device=device)  # warm-up (first calls)
    for piece in [int(p) for p in args.piece_faces.split(",")]:
        c0 = time.process_time()
        wall, (v, f, uv, _) = seconds(lambda: uv_unwrap(mesh, size, piece_faces=piece, device=device), device)
        cpu = time.process_time() - c0
        runs.append({"piece_faces": piece, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                     **atlas_quality(v.to(device), f.to(device), uv.to(device), size, mesh.vertices.shape[0])})
        print(runs[-1], flush=True)
    return {"case": "unwrap", "faces": int(mesh.num_faces), "texture_size": size, "cpu_count": os.cpu_count(),
            "runs": runs}


def stage_row(rows) -> dict:
    """The whole texture stage of one asset from the rows measured (None where a row is missing)."""
    by = {r["case"]: r for r in rows}
    flow, dec, bake = by.get("tex_flow"), by.get("tex_decoder"), by.get("bake")
    parts = {"flow_sampler_s": flow and flow["sampler_s"],
             "decoder_s": dec and round(dec["forward_ms"] / 1000, 3),
             "bake_s": bake and bake["total_s"],
             "decimate_s": bake and bake["decimate_s"], "write_glb_s": bake and bake["write_glb_s"]}
    known = [v for v in parts.values() if v is not None]
    peaks = [r.get(k) for r in rows for k in ("sampler_peak_gib", "forward_peak_gib", "peak_gib")
             if r.get(k) is not None]
    return {"case": "stage", **parts, "total_s": round(sum(known), 3) if len(known) == len(parts) else None,
            "max_row_peak_gib": max(peaks) if peaks else None,
            "flow_weights_gib": flow and flow["weights_gib"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device")
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--texture-size", type=int, default=2048)
    p.add_argument("--faces", type=int, default=DEFAULT_TEXTURE_FACES)
    p.add_argument("--piece-faces", default=str(PIECE_FACES), help="comma list (unwrap row); bake uses the first")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", default="bake,tex_flow,tex_decoder")
    p.add_argument("--budget", type=float, default=0, help="seconds: rows that would start later are skipped")
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = default_device(args.device, args.tiny)
    if args.tiny:
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
    elif device.type != "cuda" and args.rows != "unwrap":
        print("full size needs CUDA; use --tiny on the CPU (or --rows unwrap)", file=sys.stderr)
        return 1
    benches = {"tex_flow": bench_flow, "tex_decoder": bench_decoder, "bake": bench_bake, "unwrap": bench_unwrap}
    start = time.perf_counter()
    rows = []
    for name in args.rows.split(","):
        if args.budget and time.perf_counter() - start > args.budget:
            print(f"skipped {name}: past --budget {args.budget} s", flush=True)
            continue
        t0 = time.perf_counter()
        row = benches[name](args, device)
        row["row_wall_s"] = round(time.perf_counter() - t0, 1)
        print(row, flush=True)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_json(args.out, {"device": device_name(device), "torch": torch.__version__, "rows": rows})
    if any(r["case"] != "unwrap" for r in rows):
        rows.append(stage_row(rows))
        write_json(args.out, {"device": device_name(device), "torch": torch.__version__, "rows": rows})
        print_table(rows)
    return 0


def print_table(rows) -> None:
    by = {r["case"]: r for r in rows}
    print("\n| figure | value |\n|---|---|")
    for run in by.get("unwrap", {}).get("runs", []):
        print(f"| unwrap, pieces of {run['piece_faces']} faces | {run['wall_s']} s (cpu {run['cpu_s']} s), coverage "
              f"{run['texel_coverage']}, L2 {run['stretch_l2']} |")
    if "tex_flow" in by:
        r = by["tex_flow"]
        print(f"| texture flow fwd, {r['tokens']} tokens | {r['forward_ms']} ms, +{r['forward_peak_gib']} GiB |")
        print(f"| texture flow sampler ({r['sampler_forwards']} fwd) | {r['sampler_s']} s, "
              f"+{r['sampler_peak_gib']} GiB |")
    if "tex_decoder" in by:
        r = by["tex_decoder"]
        print(f"| texture decoder -> {r['voxels_out']} voxels | {r['forward_ms']} ms, +{r['forward_peak_gib']} GiB |")
    if "bake" in by:
        r = by["bake"]
        print(f"| bake {r['faces']} faces at {r['texture_size']}^2 | {r['total_s']} s {r['steps_s']}, "
              f"+{r['peak_gib']} GiB "
              f"(first bake {r['first_bake_s']} s) |")
        print(f"| decimate {r['fine_faces']} -> {r['faces']} / write GLB | {r['decimate_s']} s / "
              f"{r['write_glb_s']} s |")
        print(f"| atlas | coverage {r['texel_coverage']}, L2 stretch {r['stretch_l2']} |")
    r = by.get("stage")
    if r:
        print(f"| whole texture stage | {r['total_s']} s |")


if __name__ == "__main__":
    sys.exit(main())
