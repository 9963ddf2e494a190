"""Probe (CUDA): do the shape decoder's Triton kernels compile faster from several threads at once?

Runs the decoder's kernel variants once each (LayerNorm per channel width and output dtype, the
two sparse-conv tile configs) on tiny inputs, in a fresh process with an empty TRITON_CACHE_DIR,
either one after another (``--threads 1``) or from a thread pool, and prints the wall time.

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/probe_parallel_compile.py --threads 8
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def jobs():
    """One callable per decoder kernel variant (tiny CUDA inputs)."""
    from know3d_core.sparse.conv_triton import conv_implicit_gemm, tile_layout
    from know3d_core.trellis2.modules.fused_norm import layer_norm_act_triton
    dev = torch.device("cuda")
    out = []
    for c in (1024, 512, 256, 128, 64):
        x = torch.randn(64, c, device=dev, dtype=torch.float16)
        w = torch.ones(c, device=dev)
        out.append(lambda x=x, w=w: layer_norm_act_triton(x, w, w, 1e-6, False, None, torch.empty_like(x)))
    x = torch.randn(64, 64, device=dev, dtype=torch.float16)
    out.append(lambda x=x: layer_norm_act_triton(x, None, None, 1e-5, False, None,
                                                 torch.empty(64, 64, device=dev, dtype=torch.float32)))
    for ci, co in ((256, 256), (64, 64)):
        n = 300
        nbr = torch.randint(0, n + 1, (n, 27), device=dev)
        feats = torch.randn(n, ci, device=dev, dtype=torch.float16)
        weight = torch.randn(co, 3, 3, 3, ci, device=dev, dtype=torch.float16)
        bias = torch.zeros(co, device=dev, dtype=torch.float16)
        out.append(lambda f=feats, w=weight, b=bias, nb=nbr: conv_implicit_gemm(f, tile_layout(nb, 128), w, b))
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("this probe compiles CUDA kernels: it needs a GPU", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.zeros(1, device="cuda")
    import triton  # noqa: F401
    work = jobs()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if args.threads <= 1:
        for fn in work:
            fn()
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(args.threads) as pool:
            for f in [pool.submit(fn) for fn in work]:
                f.result()
    torch.cuda.synchronize()
    print(f"threads {args.threads}: {len(work)} variants in {time.perf_counter() - t0:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
