"""Sweep: Triton implicit-GEMM sparse conv block sizes and row sorting (how the rule in
``know3d_core/sparse/conv_triton.kernel_config`` was chosen).

For each (N, Ci, Co) on a sphere shell: every configuration in ``CONFIGS`` with rows sorted by
neighbour pattern and in their original order; prints ms, the first call (compile + layout) and the
error against the ``gather`` algorithm, plus the rule's own pick. CUDA only (``--tiny`` checks the
script with small sizes on CUDA too; Triton has no CPU backend).

    python benchmarks/sweep_conv_triton.py --out sweep.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_sparse_conv import sphere_shell, timer  # noqa: E402
from know3d_core.sparse import SparseTensor, neighbour_map, submanifold_conv3d  # noqa: E402
from know3d_core.sparse import conv_triton as ct  # noqa: E402

# (BM, BN, BK, warps, stages)
CONFIGS = [
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
    (128, 256, 64, 8, 3), (128, 128, 32, 4, 4), (64, 64, 64, 4, 4),
]
CASES = [  # (target voxels, Ci, Co)
    (200_000, 64, 64), (200_000, 128, 128), (200_000, 256, 256), (200_000, 512, 512), (200_000, 1024, 1024),
    (1_000_000, 64, 64), (1_000_000, 128, 128), (1_000_000, 256, 256), (20_000, 1024, 4096), (300_000, 256, 1024),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--cases", default=None, help="indices into CASES, comma-separated")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    dtype = torch.bfloat16
    time_fn = timer(device)
    cases = CASES if args.cases is None else [CASES[int(i)] for i in args.cases.split(",")]
    if args.tiny:
        cases = [(3000, 32, 48)]
    rows = []
    for target, ci, co in cases:
        coords, shape = sphere_shell(target, device)
        N = coords.shape[0]
        feats = torch.randn(N, ci, device=device, dtype=dtype)
        weight = torch.randn(co, 3, 3, 3, ci, device=device, dtype=dtype) / math.sqrt(27 * ci)
        bias = torch.randn(co, device=device, dtype=dtype)
        x = SparseTensor(feats, coords, shape, batch_size=1)
        nm = neighbour_map(x)
        ref = submanifold_conv3d(x, weight, bias, 1, "gather").feats.float()
        dense_flops = 2.0 * N * 27 * ci * co
        rule = ct.kernel_config(ci, co, dtype)
        for bm, bn, bk, warps, stages in CONFIGS:
            cfg = ct.KernelConfig(bm, bn, bk, warps, stages)
            for sort in (True, False):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                lay = nm.tile_layout(bm, sort)
                out = ct.conv_implicit_gemm(feats, lay, weight, bias, cfg)
                torch.cuda.synchronize()
                first = (time.perf_counter() - t0) * 1e3
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                ms = statistics.median(time_fn(lambda: ct.conv_implicit_gemm(feats, lay, weight, bias, cfg), 2, args.repeats))
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                r = {"N": N, "Ci": ci, "Co": co, "BM": bm, "BN": bn, "BK": bk, "warps": warps, "stages": stages,
                     "sorted": sort, "ms": ms, "tflops_all27": dense_flops / ms / 1e9, "first_ms": first,
                     "err": err, "peak_gib": peak, "offsets_per_tile": lay.mean_active_offsets,
                     "rule": cfg == rule}
                rows.append(r)
                print(f"N={N:>8} {ci:>5}->{co:<5} BM={bm:<3} BN={bn:<3} BK={bk:<3} w{warps} s{stages} "
                      f"sort={int(sort)} {ms:8.3f} ms {r['tflops_all27']:7.1f} TF/s(27) first {first:7.1f} ms "
                      f"err {err:.1e} off/tile {r['offsets_per_tile']:.1f}{'  <- rule' if r['rule'] else ''}", flush=True)
        del x, nm, feats, ref
        torch.cuda.empty_cache()
    print("best per case:")
    for key in sorted({(r["N"], r["Ci"], r["Co"]) for r in rows}):
        rs = [r for r in rows if (r["N"], r["Ci"], r["Co"]) == key]
        best = min(rs, key=lambda r: r["ms"])
        rule = [r for r in rs if r["rule"] and r["sorted"]]
        print(f"  N={key[0]} {key[1]}->{key[2]}: best {best['ms']:.3f} ms (BM{best['BM']} BN{best['BN']} BK{best['BK']} "
              f"w{best['warps']} s{best['stages']} sort={int(best['sorted'])})"
              + (f", rule {rule[0]['ms']:.3f} ms" if rule else ", rule config not in sweep"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
