"""Benchmark: submanifold 3x3x3 conv (each algorithm) vs a dense matmul of the same FLOP count.

Voxel sets are sphere shells (a surface two voxels thick, like TRELLIS.2's shape latents: about
2/3 of the 27 neighbours exist). For every (N, C) the script times, in one run and on one device:
- the neighbour-map build;
- each conv algorithm (``gather``, ``offset``, ``bag`` and what ``auto`` picks), Ci = Co = C;
- ``dense``: ``[N, 27*C] @ [27*C, C]``, i.e. the FLOPs of all 27 taps (2*N*27*C*C). When that
  operand would not fit the memory budget, a row chunk is timed and scaled to N rows (marked).
Rate = all-27-tap FLOPs / time, for every row, so ``ratio = dense_ms / conv_ms`` is the conv's
fraction of the dense GEMM rate (target on H100: >= 0.40 at C >= 256).

CUDA: CUDA-event timing, median of --repeats after --warmup runs, peak extra memory from
``torch.cuda.max_memory_allocated``. CPU (``--tiny``): perf_counter, small shells.

    python benchmarks/bench_sparse_conv.py --dtype bf16 --out conv.json     # GPU, full size
    python benchmarks/bench_sparse_conv.py --tiny --out conv_tiny.json      # CPU check
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import default_device, device_name, peak_extra, sample_times, wall_ms, write_json  # noqa: E402

from know3d_core.sparse import SparseTensor, neighbour_map, submanifold_conv3d  # noqa: E402
from know3d_core.sparse import conv_triton  # noqa: E402
from know3d_core.trellis2.modules.dit import parse_dtype  # noqa: E402
from know3d_core.sparse.conv import ALGORITHMS, DEFAULT_CHUNK_BYTES, build_neighbour_map, choose_algorithm  # noqa: E402

DTYPES = ("bf16", "fp16", "fp32")  # --dtype choices, read by know3d_core.plan.dtype_name


def sphere_shell(target_voxels: int, device) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Voxels with ``| |p - c| - r | < 1`` for r chosen to give about target_voxels.

    Returns ``(coords [N, 4] int32 sorted by (x, y, z), spatial_shape)``; built slice by slice
    (no dense grid), so 1M-voxel shells need little memory.
    """
    r = math.sqrt(target_voxels / (8.0 * math.pi))
    R = 1 << math.ceil(math.log2(2 * r + 4))
    c = (R - 1) / 2.0
    g = torch.arange(R, device=device, dtype=torch.float32)
    yy, zz = torch.meshgrid(g, g, indexing="ij")
    d2_yz = (yy - c) ** 2 + (zz - c) ** 2
    rows = []
    for x in range(R):
        d = torch.sqrt(d2_yz + (x - c) ** 2)
        yz = ((d - r).abs() < 1.0).nonzero()
        if yz.numel():
            rows.append(torch.cat([torch.zeros_like(yz[:, :1]), torch.full_like(yz[:, :1], x), yz], 1))
    return torch.cat(rows).to(torch.int32), (R, R, R)


def timer(device):
    """Return ``time_fn(fn, warmup, repeats) -> list of ms``."""
    def time_fn(fn, warmup, repeats):
        return sample_times(fn, device, warmup, repeats)[0]
    return time_fn


def peak_extra_gib(fn, device) -> float | None:
    """Peak memory above the current allocation while running fn once (CUDA only)."""
    return peak_extra(fn, device, run_on_cpu=True)


def bench_case(coords, shape, C, dtype, device, args, time_fn) -> list[dict]:
    N = coords.shape[0]
    flops = 2.0 * N * 27 * C * C
    feats = torch.randn(N, C, device=device, dtype=dtype)
    weight = torch.randn(C, 3, 3, 3, C, device=device, dtype=dtype) / math.sqrt(27 * C)
    bias = torch.randn(C, device=device, dtype=dtype)
    x = SparseTensor(feats, coords, shape, batch_size=1)
    rows = []

    build_ms = statistics.median(time_fn(lambda: build_neighbour_map(coords, shape), 1, args.repeats))
    nm = neighbour_map(x)
    fill = nm.fill
    # derived layouts are part of the cached map; build them outside the timed region
    nm.offset_pairs()
    base = {"N": N, "C": C, "dtype": str(dtype).replace("torch.", ""), "fill": round(fill, 4), "build_ms": build_ms}

    # dense reference with the all-27-tap FLOP count
    m = N if N * 27 * C * feats.element_size() <= args.dense_bytes else max(1, args.dense_bytes // (27 * C * feats.element_size()))
    a = torch.randn(m, 27 * C, device=device, dtype=dtype)
    bmat = torch.randn(27 * C, C, device=device, dtype=dtype)
    dense_ms = statistics.median(time_fn(lambda: a @ bmat, args.warmup, args.repeats)) * (N / m)
    del a, bmat
    rows.append({**base, "algo": "dense", "ms": dense_ms, "tflops": flops / dense_ms / 1e9, "ratio": 1.0,
                 "peak_extra_gib": None, "dense_extrapolated": m < N, "max_rel_err_vs_gather": None})

    auto = choose_algorithm(device, C, C, None, dtype)
    if auto != "implicit":
        auto = choose_algorithm(device, C, C, fill, dtype)
    reference = None
    for algo in args.algos or list(ALGORITHMS):
        if algo == "implicit" and not conv_triton.supports(feats):
            continue
        fn = lambda: submanifold_conv3d(x, weight, bias, 1, algo, args.chunk_bytes)  # noqa: E731
        try:
            out = fn().feats
            peak = peak_extra_gib(fn, device)
            ms = statistics.median(time_fn(fn, args.warmup, args.repeats))
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:  # OOM, or a dtype a backend lacks
            oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err)
            rows.append({**base, "algo": algo, "ms": None, "tflops": None, "ratio": None, "peak_extra_gib": None,
                         "oom": oom, "error": str(err).splitlines()[0][:200]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if reference is None:
            reference = out.float()
        err = ((out.float() - reference).abs().max() / reference.abs().max()).item()
        rows.append({**base, "algo": algo + (" (auto)" if algo == auto else ""), "ms": ms, "tflops": flops / ms / 1e9,
                     "ratio": dense_ms / ms, "peak_extra_gib": peak, "max_rel_err_vs_gather": err})
        del out
    # first call on fresh coords (after the libraries are warm): neighbour map + derived layouts + conv (what a new level costs)
    fresh = SparseTensor(feats, coords.clone(), shape, batch_size=1)
    first_ms = wall_ms(lambda: submanifold_conv3d(fresh, weight, bias, 1, "auto", args.chunk_bytes), device)
    del fresh
    for r in rows:
        r["first_call_ms"] = first_ms
    return rows


def print_table(rows) -> None:
    head = (f"{'N':>9} {'C':>5} {'dtype':>8} {'algo':>14} {'ms':>9} {'TFLOP/s':>8} {'ratio':>6} {'peakGiB':>8} "
            f"{'fill':>5} {'build ms':>8} {'1st ms':>8} {'err':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ms = "oom" if r.get("oom") else ("error" if r["ms"] is None else f"{r['ms']:.3f}")
        tf = "" if r["tflops"] is None else f"{r['tflops']:.2f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        peak = "" if r["peak_extra_gib"] is None else f"{r['peak_extra_gib']:.2f}"
        err = "" if r.get("max_rel_err_vs_gather") is None else f"{r['max_rel_err_vs_gather']:.1e}"
        algo = r["algo"] + ("*" if r.get("dense_extrapolated") else "")
        print(f"{r['N']:>9} {r['C']:>5} {r['dtype']:>8} {algo:>14} {ms:>9} {tf:>8} {ratio:>6} {peak:>8} "
              f"{r['fill']:>5.2f} {r['build_ms']:>8.2f} {r['first_call_ms']:>8.1f} {err:>8}")
    print("ratio = dense GEMM time / conv time at equal (all-27-tap) FLOPs; * = dense timed on a row chunk, scaled;")
    print("1st ms = first auto conv on fresh coords (neighbour map + layouts + conv); err = max rel. diff vs the first algorithm timed")
    for r in rows:
        if r.get("error"):
            print(f"  N={r['N']} C={r['C']} {r['algo']}: {r['error']}")
    print("fastest per case:")
    for key in sorted({(r["N"], r["C"]) for r in rows}):
        timed = [r for r in rows if (r["N"], r["C"]) == key and r["algo"] != "dense" and r["ms"] is not None]
        if timed:
            best = min(timed, key=lambda r: r["ms"])
            auto = next((r for r in timed if "(auto)" in r["algo"]), None)
            auto_note = "" if auto is None else f", auto {auto['algo'].split()[0]} {auto['ms']:.3f} ms"
            print(f"  N={key[0]} C={key[1]}: {best['algo'].split()[0]} {best['ms']:.3f} ms, ratio {best['ratio']:.2f}{auto_note}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small CPU-sized shells and channels")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--voxels", type=int, nargs="*", default=None, help="target shell sizes (default 200000 1000000)")
    p.add_argument("--channels", type=int, nargs="*", default=None, help="default 64 128 256 512 1024")
    p.add_argument("--algos", nargs="*", default=None, choices=ALGORITHMS, help="default: all (implicit on CUDA)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    p.add_argument("--dense-bytes", type=int, default=4 << 30, help="largest dense operand before chunk timing")
    p.add_argument("--mem-fraction", type=float, default=0.6, help="skip cases whose estimate exceeds this of free memory")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)

    device = default_device(args.device, args.tiny)
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    voxels = args.voxels or ([3000, 12000] if args.tiny else [200_000, 1_000_000])
    channels = args.channels or ([16, 32] if args.tiny else [64, 128, 256, 512, 1024])
    if args.tiny:
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 3)
    time_fn = timer(device)
    print(f"device {device_name(device)}, torch {torch.__version__}, {dtype}")

    rows, skipped = [], []
    for target in voxels:
        coords, shape = sphere_shell(target, device)
        N = coords.shape[0]
        for C in channels:
            # inputs, output, 27-tap temporaries of one chunk/group, neighbour map and pair lists
            est = N * C * torch.finfo(dtype).bits // 8 * 4 + 2 * args.chunk_bytes + N * 27 * 24
            if device.type == "cuda":
                free = torch.cuda.mem_get_info(device)[0]
                if est > args.mem_fraction * free:
                    skipped.append({"N": N, "C": C, "estimate_gib": est / 2**30})
                    print(f"skip N={N} C={C}: needs ~{est / 2**30:.1f} GiB")
                    continue
            rows += bench_case(coords, shape, C, dtype, device, args, time_fn)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print_table(rows)
    if args.out:
        meta = {"device": device_name(device),
                "torch": torch.__version__, "dtype": str(dtype), "chunk_bytes": args.chunk_bytes,
                "warmup": args.warmup, "repeats": args.repeats}
        write_json(args.out, {"meta": meta, "rows": rows, "skipped": skipped})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
