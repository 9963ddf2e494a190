"""Benchmark: TRELLIS.2 decoders at full size with random weights, and O-Voxel -> mesh.

Rows (per decoder dtype):
- ``ss_decoder``: ``SparseStructureDecoder`` (official config) on a ``[1, 8, 16, 16, 16]`` latent
  -> 64^3 logits, plus ``decode_occupancy``.
- ``shape_512`` / ``shape_1024``: ``FlexiDualGridVaeDecoder`` (official config, 474 M params) on a
  sphere-shell token set: ~8k tokens on 32^3 (-> 512^3) and ~20k tokens on 64^3 (-> 1024^3).
  ``forward_ms`` / ``forward_peak_gib`` (peak extra memory over the loaded model), voxel counts
  per level, ``upsample_ms`` (the cascade's ``upsample(x, 4)``: coords only),
  ``extract_ms`` (head -> flexible dual grid -> triangles, ``to_meshes``) and ``clean_ms``
  (``clean_mesh``: merge, unreferenced vertices, orientation).

- ``mesh_sphere_512`` / ``mesh_sphere_1024``: a sphere (radius 0.4) encoded with our analytic
  O-Voxel encoder at that grid, then ``extract_ms`` (``flexible_dual_grid_to_mesh``) and
  ``clean_ms`` (``clean_mesh``) on a real closed surface (``watertight`` reported).

Random weights give random subdivisions (about half of the children, i.e. x4 voxels per level,
as for a surface); the head's flags are random too, so the mesh is not a surface, but its sizes
(voxels, quads) are those of a real decode.

CUDA: CUDA-event timing, median of --repeats after --warmup. ``--tiny``: tiny configs on the CPU
(script check), fp32. ``--no-fused``: the decoder's LayerNorm(+SiLU) as PyTorch ops instead of the
fused Triton kernel (A/B; rows get ``"fused": false``).

    python benchmarks/bench_shape_decoder.py --out shape_dec.json          # GPU, full size
    python benchmarks/bench_shape_decoder.py --tiny --out shape_dec.json   # CPU check
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    SHAPE_DECODER_FULL,
    SS_DECODER_FULL,
    bench_device,
    device_name,
    sample_times,
    sync,
    wall_ms,
    write_json,
)

from know3d_core.mesh import clean_mesh  # noqa: E402
from know3d_core.sparse import SparseTensor  # noqa: E402
from know3d_core.trellis2 import shape_decoder as shape_mod  # noqa: E402
from know3d_core.trellis2.modules.dit import parse_dtype  # noqa: E402
from know3d_core.trellis2.modules.fused import use_fused_kernels  # noqa: E402
from know3d_core.trellis2 import sparse_structure_decoder as ss_mod  # noqa: E402
from know3d_core.trellis2.ovoxel import flexible_dual_grid_to_mesh, sdf_to_flexible_dual_grid, sphere_sdf  # noqa: E402
from know3d_core.trellis2.shape_decoder import FlexiDualGridVaeDecoder  # noqa: E402
from know3d_core.trellis2.sparse_structure_decoder import SparseStructureDecoder, decode_occupancy  # noqa: E402

SS_FULL = SS_DECODER_FULL
SHAPE_FULL = SHAPE_DECODER_FULL
# name, (token grid, target tokens) full, same for --tiny
SHAPE_CASES = [
    ("shape_512", (32, 8000), (8, 60)),
    ("shape_1024", (64, 20000), (12, 150)),
]


def measure(fn, device, warmup: int, repeats: int):
    """(median ms, peak extra GiB over the memory in use before, last result)."""
    times, peak, out = sample_times(fn, device, warmup, repeats, track_peak=True, empty_cache=True, keep_last=True)
    return statistics.median(times), peak, out


def sphere_shell_tokens(grid: int, target: int, device) -> torch.Tensor:
    """``[N, 4]`` int32 voxels of a spherical shell (radius 0.42 * grid) with N close to ``target``."""
    g = torch.arange(grid, device=device, dtype=torch.float32) + 0.5 - grid / 2
    r = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).norm(dim=-1)
    radius = 0.42 * grid
    thickness = target / (4 * torch.pi * radius**2)
    cells = torch.argwhere((r - radius).abs() < thickness / 2)
    return torch.cat([torch.zeros_like(cells[:, :1]), cells], 1).int()


def init_random(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm weights near 1), so no path is an identity."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                if "norm" in name and name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
            else:
                fan_in = p.numel() // p.shape[0]
                p.normal_(0.0, fan_in**-0.5, generator=gen)
    return model.eval()


def bench_ss(args, device, dtype) -> dict:
    cfg = dict(ss_mod.TINY_ARGS) if args.tiny else dict(SS_FULL)
    model = init_random(SparseStructureDecoder(**cfg).to(device))
    model.convert_to(dtype)
    z = torch.randn(1, cfg["latent_channels"], 16, 16, 16, device=device)

    def fwd():
        return decode_occupancy(model(z), 32)

    ms, peak, coords = measure(fwd, device, args.warmup, args.repeats)
    return {"case": "ss_decoder", "dtype": str(dtype).split(".")[-1], "forward_ms": round(ms, 3),
            "forward_peak_gib": None if peak is None else round(peak, 3), "occupied_32": int(coords.shape[0])}


def bench_shape(case, args, device, dtype, model) -> dict:
    name, full, tiny = case
    grid, target = tiny if args.tiny else full
    coords = sphere_shell_tokens(grid, target, device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = SparseTensor(torch.randn(coords.shape[0], 32, device=device, generator=gen), coords, (grid,) * 3,
                     batch_size=1)
    model.set_resolution(grid * 16)

    def fwd():
        return model(SparseTensor(x.feats, x.coords, x.spatial_shape, batch_size=1), return_subs=True)

    first_ms = wall_ms(fwd, device)  # first call in this process (kernel compiles / cache loads included)
    ms, peak, (head, subs) = measure(fwd, device, args.warmup, args.repeats)
    levels = [int(s.coords.shape[0]) for s in subs] + [int(head.coords.shape[0])]
    finite = bool(torch.isfinite(head.feats).all())
    up_ms, up_peak, up = measure(lambda: model.upsample(SparseTensor(x.feats, x.coords, x.spatial_shape, batch_size=1), 4),
                                 device, args.warmup, args.repeats)
    ex_ms, ex_peak, meshes = measure(lambda: model.to_meshes(head), device, args.warmup, args.repeats)
    raw = meshes[0]
    cl_ms, cl_peak, cleaned = measure(lambda: clean_mesh(raw), device, min(args.warmup, 1), min(args.repeats, 3))
    return {
        "case": name, "dtype": str(dtype).split(".")[-1], "fused": not args.no_fused,
        "tokens": int(coords.shape[0]), "token_grid": grid,
        "mesh_grid": grid * 16, "voxels_per_level": levels, "finite": finite,
        "forward_ms": round(ms, 3), "forward_peak_gib": None if peak is None else round(peak, 3),
        "first_forward_ms": round(first_ms, 1), "upsample_ms": round(up_ms, 3), "upsample_peak_gib": None if up_peak is None else round(up_peak, 3),
        "upsample_voxels": int(up.shape[0]),
        "extract_ms": round(ex_ms, 3), "extract_peak_gib": None if ex_peak is None else round(ex_peak, 3),
        "raw_faces": int(raw.num_faces), "clean_ms": round(cl_ms, 3),
        "clean_peak_gib": None if cl_peak is None else round(cl_peak, 3), "clean_faces": int(cleaned.num_faces),
    }


def bench_mesh_sphere(name: str, grid: int, args, device) -> dict:
    t0 = time.perf_counter()
    coords, dual, inter = sdf_to_flexible_dual_grid(sphere_sdf(radius=0.4), grid, device=device)
    sync(device)
    encode_ms = 1000 * (time.perf_counter() - t0)
    ex_ms, ex_peak, (verts, faces) = measure(lambda: flexible_dual_grid_to_mesh(coords, dual, inter, None, grid),
                                             device, args.warmup, args.repeats)
    from know3d_core.mesh import Mesh

    raw = Mesh(verts, faces)
    cl_ms, cl_peak, cleaned = measure(lambda: clean_mesh(raw), device, min(args.warmup, 1), min(args.repeats, 3))
    f = cleaned.faces
    keys = torch.cat([f[:, 0] * cleaned.num_vertices + f[:, 1], f[:, 1] * cleaned.num_vertices + f[:, 2],
                      f[:, 2] * cleaned.num_vertices + f[:, 0]])
    rev = torch.cat([f[:, 1] * cleaned.num_vertices + f[:, 0], f[:, 2] * cleaned.num_vertices + f[:, 1],
                     f[:, 0] * cleaned.num_vertices + f[:, 2]])
    watertight = bool(torch.unique(keys).numel() == keys.numel() and torch.isin(rev, keys).all())
    return {"case": name, "dtype": "-", "mesh_grid": grid, "voxels": int(coords.shape[0]), "encode_ms": round(encode_ms, 1),
            "extract_ms": round(ex_ms, 3), "extract_peak_gib": None if ex_peak is None else round(ex_peak, 3),
            "raw_faces": int(faces.shape[0]), "clean_ms": round(cl_ms, 3),
            "clean_peak_gib": None if cl_peak is None else round(cl_peak, 3), "clean_faces": int(cleaned.num_faces),
            "watertight": watertight, "forward_ms": 0.0, "forward_peak_gib": None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (script check)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--dtypes", default=None, help="comma list of float16,bfloat16,float32 "
                   "(default: float16,bfloat16 on CUDA; float32 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="default 1 (0 with --tiny)")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --tiny)")
    p.add_argument("--cases", default=None,
                   help="comma subset of ss_decoder,shape_512,shape_1024,mesh_sphere_512,mesh_sphere_1024")
    p.add_argument("--no-fused", action="store_true", help="decoder norms as PyTorch ops (no Triton LayerNorm)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    with use_fused_kernels(not args.no_fused):
        return _run(args)


def _run(args) -> int:

    device = bench_device(args)
    if device is None:
        return 2
    args.warmup = (0 if args.tiny else 1) if args.warmup is None else args.warmup
    args.repeats = (1 if args.tiny else 3) if args.repeats is None else args.repeats
    dtypes = (args.dtypes or ("float32" if args.tiny else "float16,bfloat16")).split(",")
    wanted = None if args.cases is None else set(args.cases.split(","))
    rows = []

    def report(r):
        rows.append(r)
        print(json.dumps(r), flush=True)

    for dname in dtypes:
        dtype = parse_dtype(dname)
        if wanted is None or "ss_decoder" in wanted:
            report(bench_ss(args, device, dtype))
        cases = [c for c in SHAPE_CASES if wanted is None or c[0] in wanted]
        if not cases:
            continue
        cfg = dict(shape_mod.TINY_ARGS) if args.tiny else dict(SHAPE_FULL)
        model = init_random(FlexiDualGridVaeDecoder(**cfg).to(device))
        model.convert_to(dtype)
        for case in cases:
            report(bench_shape(case, args, device, dtype, model))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for name, grid in zip(("mesh_sphere_512", "mesh_sphere_1024"), (64, 128) if args.tiny else (512, 1024)):
        if wanted is None or name in wanted:
            report(bench_mesh_sphere(name, grid, args, device))

    print(f"\n{'case':<17}{'dtype':<10}{'tokens':>7}{'final voxels':>14}{'fwd ms':>10}{'peak GiB':>10}"
          f"{'up ms':>9}{'extract ms':>12}{'clean ms':>10}")
    for r in rows:
        fv = r["voxels_per_level"][-1] if "voxels_per_level" in r else r.get("voxels", "-")
        peak = "-" if r["forward_peak_gib"] is None else r["forward_peak_gib"]
        print(f"{r['case']:<17}{r['dtype']:<10}{r.get('tokens', '-'):>7}{fv:>14}{r['forward_ms']:>10.1f}"
              f"{peak:>10}{r.get('upsample_ms', '-'):>9}{r.get('extract_ms', '-'):>12}{r.get('clean_ms', '-'):>10}")
    result = {"device": device_name(device),
              "torch": torch.__version__, "tiny": args.tiny, "warmup": args.warmup, "repeats": args.repeats,
              "rows": rows}
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
