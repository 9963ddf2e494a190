"""Mesh -> flexible dual grid: ours (GPU and CPU) against the reference's compiled converter (CPU),
in one process, on the issue's meshes; plus where our time goes (per pass).

    python benchmarks/bench_dual_grid.py --src TRELLIS.2/o-voxel --eigen libeigen3-dev_3.4.0-4_all.deb \
        [--cases ico256,ico512,ico1024,torus1024] [--out results.json] [--no-cpu] [--profile]

Meshes (normalised as the data toolkit does: bounding-box centre, longest side 0.99999): a
327,680-face icosphere (7 subdivisions) at 256 / 512 / 1024 and a 262,144-face torus (512 x 256) at
1024; weights 1.0 / 0.2 / 1e-2. Per case: voxel counts, wall times (reference: one call; ours on
CUDA: median of --repeats after a warm-up, synchronised; ours on the CPU: one call, all torch
threads), and agreement (same voxels and flags; dual-vertex differences in voxels). ``--profile``
times each pass of ours at the largest case (CUDA synchronised around each).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ovoxel_reference as ref  # noqa: E402

from know3d_core.data.layout import NORMALIZE_EXTENT  # noqa: E402
from know3d_core.mesh import Mesh  # noqa: E402
from know3d_core.mesh.primitives import icosphere, uv_torus  # noqa: E402
from know3d_core.trellis2 import mesh_to_dual_grid as m2g  # noqa: E402


def normalise(mesh: Mesh) -> Mesh:
    v = mesh.vertices.double()
    lo, hi = v.min(0).values, v.max(0).values
    v = (v - (lo + hi) / 2) * (NORMALIZE_EXTENT / (hi - lo).max())
    return Mesh(v.float(), mesh.faces)


def meshes(scale: int = 0):
    """The issue's meshes; ``scale`` k > 0 divides the face counts by 4^k (quick checks)."""
    return {"ico": normalise(icosphere(7 - scale)),
            "torus": normalise(uv_torus(0.3, 0.12, 512 >> scale, 256 >> scale))}


CASES = {"ico256": ("ico", 256), "ico512": ("ico", 512), "ico1024": ("ico", 1024), "torus1024": ("torus", 1024)}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


CPU_SECONDS = {}  # last call's process CPU time (all threads), for loaded machines


def timed(fn, device):
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    CPU_SECONDS["last"] = time.process_time() - c
    return out, time.perf_counter() - t


def compare(ref_out, ours, res):
    c, d, i = ref.sort_by_coords(*ref_out, resolution=res)
    same = c.shape == ours.coords.shape and torch.equal(c, ours.coords.cpu())
    row = {"same_voxels": bool(same), "ref_voxels": int(c.shape[0]), "our_voxels": int(ours.coords.shape[0])}
    if same:
        row["same_flags"] = bool(torch.equal(i, ours.intersected.cpu()))
        err = (ref.toolkit_relative(c, d, res) - ours.dual_vertices.cpu()).abs().max(1).values.double()
        q = torch.quantile(err[torch.randperm(err.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]],
                           torch.tensor([0.5, 0.99], dtype=torch.float64))
        row.update(dual_err_p50=float(q[0]), dual_err_p99=float(q[1]), dual_err_max=float(err.max()),
                   frac_over_1e4=float((err > 1e-4).double().mean()), frac_over_1_255=float((err > 1 / 255).double().mean()))
    return row


def profile(mesh, res, device):
    """Seconds per pass of ours (each wrapped function synchronised; 'rest' = total - passes)."""
    names = ["_triangle_planes", "_axis_crossings", "_face_setup", "_face_overlaps", "_lookup", "_boundary_edges",
             "_boundary_walk", "_unpack", "_solve_dual_vertices"]
    times, originals = {}, {n: getattr(m2g, n) for n in names}

    def wrap(name, fn):
        def inner(*a, **k):
            sync(device)
            t = time.perf_counter()
            out = fn(*a, **k)
            if name == "_face_overlaps":
                out = list(out)
            sync(device)
            times[name] = times.get(name, 0.0) + time.perf_counter() - t
            return iter(out) if name == "_face_overlaps" else out
        return inner

    for n in names:
        setattr(m2g, n, wrap(n, originals[n]))
    try:
        _, total = timed(lambda: m2g.mesh_to_flexible_dual_grid(mesh.vertices, mesh.faces, res, device=device), device)
    finally:
        for n, fn in originals.items():
            setattr(m2g, n, fn)
    times = {k: round(v, 4) for k, v in times.items()}
    times["rest (unique, index_add accumulation, regularisation)"] = round(total - sum(times.values()), 4)
    return {"total": round(total, 4), "passes": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True)
    p.add_argument("--eigen", required=True)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-cpu", action="store_true", help="skip our CPU path")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-case", default="ico1024", choices=list(CASES))
    p.add_argument("--smaller", type=int, default=0, help="divide the face counts by 4^N (quick checks)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    ext = ref.build(args.src, args.eigen)
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "cpu_threads": torch.get_num_threads(), "reference_build_s": round(time.perf_counter() - t, 1),
              "cases": {}}
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}), flush=True)
    ms = meshes(args.smaller)
    for name in args.cases.split(","):
        key, res = CASES[name]
        mesh = ms[key]
        row = {"faces": mesh.num_faces, "resolution": res}
        try:
            ref_out, row["reference_cpu_s"] = timed(lambda: ref.reference_dual_grid(ext, mesh.vertices, mesh.faces, res), "cpu")
            row["reference_process_cpu_s"] = CPU_SECONDS["last"]
            gpu = lambda: m2g.mesh_to_flexible_dual_grid(mesh.vertices, mesh.faces, res, device=args.device)  # noqa: E731
            ours, first = timed(gpu, args.device)
            row["ours_first_process_cpu_s"] = CPU_SECONDS["last"]
            runs = [timed(gpu, args.device)[1] for _ in range(args.repeats)] or [first]
            row.update(ours_first_s=first, ours_s=statistics.median(runs), ours_device=args.device)
            row["ours_vs_reference"] = row["ours_s"] / row["reference_cpu_s"]
            row.update(compare(ref_out, ours, res))
            if not args.no_cpu and args.device != "cpu":
                cpu, row["ours_cpu_s"] = timed(lambda: m2g.mesh_to_flexible_dual_grid(mesh.vertices, mesh.faces, res), "cpu")
                row["ours_cpu_vs_reference"] = row["ours_cpu_s"] / row["reference_cpu_s"]
                row["cpu_equals_gpu"] = bool(torch.equal(cpu.coords, ours.coords.cpu())
                                             and torch.equal(cpu.intersected, ours.intersected.cpu()))
                row["cpu_gpu_dual_max_diff"] = float((cpu.dual_vertices - ours.dual_vertices.cpu()).abs().max())
            if args.device.startswith("cuda"):
                row["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
        except Exception as e:  # noqa: BLE001 - report and go on to the next case
            row["error"] = f"{type(e).__name__}: {e}"
        result["cases"][name] = row
        print(name, json.dumps(row), flush=True)
    if args.profile:
        key, res = CASES[args.profile_case]
        for dev in [args.device] + ([] if args.no_cpu or args.device == "cpu" else ["cpu"]):
            try:
                result[f"profile_{dev}"] = profile(ms[key], res, dev)
            except Exception as e:  # noqa: BLE001
                result[f"profile_{dev}"] = {"error": f"{type(e).__name__}: {e}"}
            print("profile", dev, json.dumps(result[f"profile_{dev}"]), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
