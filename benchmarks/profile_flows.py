"""Profile: where one flow DiT forward spends its GPU time (torch.profiler, CUDA kernels).

For each case (names as in bench_trellis2_flows.py) runs a few forwards under torch.profiler and
prints the top kernels by total CUDA time plus a split into categories: GEMM, attention,
norm/RoPE/modulation/elementwise, other. ``--no-fused`` runs the PyTorch path of the blocks
(the Triton kernels switched off) for a before/after view in one process. ``--sdpa-check`` also
times torch SDPA's kernels (default choice, cuDNN, FlashAttention-2, memory-efficient) at the
attention shapes of the flows.

    python benchmarks/profile_flows.py --cases "ss B=2,shape N=20k" --out prof.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmarks.bench_trellis2_flows import CASES, FULL, build  # noqa: E402
from _common import kernel_times, median_ms, random_coords, sdpa_backend_ms, write_json  # noqa: E402
from know3d_core.sparse import SparseTensor  # noqa: E402
from know3d_core.trellis2.modules.fused import use_fused_kernels  # noqa: E402

CATEGORIES = [  # first match wins, on the lower-cased kernel name
    ("sparse conv (Triton)", ("_subm_conv",)),
    ("sort/search (neighbour maps)", ("sort", "search", "radix", "scan")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "matmul", "nvjet", "cublas")),
    ("norm/rope/mod (fused)", ("_residual_ln", "_qk_norm_rope")),
    ("layer/rms norm", ("layer_norm", "rms", "norm")),
    ("elementwise/copy", ("elementwise", "vectorized", "copy", "cast", "unrolled", "reduce", "cat", "index")),
]


def categorise(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_case(case, models, fused: bool, steps: int = 3) -> dict:
    name, kind, batch, tokens, grid, cond_len = case
    device = torch.device("cuda")
    if kind not in models:
        models.clear()
        torch.cuda.empty_cache()
        models[kind] = build(kind, FULL, "bfloat16", device)
    model = models[kind]
    gen = torch.Generator(device=device).manual_seed(1)
    cond = torch.randn(batch, cond_len[0], FULL["cond_channels"], device=device, generator=gen)
    t = torch.full((batch,), 700.0, device=device)
    if kind == "ss":
        x = torch.randn(batch, 8, 16, 16, 16, device=device, generator=gen)
    else:
        n, res = tokens[0], grid[0]
        x = SparseTensor(torch.randn(batch * n, 32, device=device, generator=gen), random_coords(n, res, batch, device),
                         (res,) * 3, batch_size=batch)

    def fwd():
        with torch.no_grad(), use_fused_kernels(fused):
            return model(x, t, cond)

    ms = median_ms(fwd, device, 2, 5, sync_after_warmup=True)
    return {"case": name, "fused": fused, "ms_event_median": ms,
            **summarise(kernel_times(fwd, steps, warmup=0), top=20)}


def summarise(kernels: dict, top: int = 15) -> dict:
    """Total, per-category and top-``top`` kernel times of :func:`_common.kernel_times` output."""
    cats: dict = {}
    for k, v in kernels.items():
        cats[categorise(k)] = cats.get(categorise(k), 0.0) + v["us"]
    best = sorted(kernels.items(), key=lambda kv: -kv[1]["us"])[:top]
    return {"kernel_ms": sum(v["us"] for v in kernels.values()) / 1e3,
            "categories_ms": {c: round(u / 1e3, 2) for c, u in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": k[:110], "ms": round(v["us"] / 1e3, 3), "calls": v["calls"]} for k, v in best]}


def host_check() -> dict:
    """Host cost of one launch (us): a fused Triton kernel, small torch ops, SDPA; and the top
    CPU ops (self time) of one sparse-structure forward at B=1."""
    from know3d_core.trellis2.modules import fused
    x = torch.randn(2, 16, 1536, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1536, device="cuda")
    q = torch.randn(1, 12, 64, 128, device="cuda", dtype=torch.bfloat16)
    lin = torch.nn.Linear(1536, 1536, device="cuda", dtype=torch.bfloat16)
    import time
    cases = {
        "triton residual_ln": lambda: fused.layer_norm_modulate(x, w, w, 1e-6, 0.0),
        "triton qk pair": lambda: fused.qk_norm_rope_pair(q.transpose(1, 2), q.transpose(1, 2), w.view(12, 128),
                                                           w.view(12, 128), None, 1e-6),
        "torch add": lambda: x + x,
        "torch addcmul": lambda: torch.addcmul(x, x, x[:, :1]),
        "nn.Linear": lambda: lin(x),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q),
    }
    out = {}
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(500):
            fn()
        out[name] = round((time.perf_counter() - t0) / 500 * 1e6, 1)
        torch.cuda.synchronize()
    print("host us per call:", out, flush=True)
    return out


def decoder_profile() -> dict:
    """Kernel categories of one shape-decoder forward (20k tokens on 64^3 -> 1024, fp16)."""
    from benchmarks.bench_shape_decoder import SHAPE_FULL, init_random, sphere_shell_tokens
    from know3d_core.trellis2.shape_decoder import FlexiDualGridVaeDecoder
    model = init_random(FlexiDualGridVaeDecoder(**SHAPE_FULL).cuda())
    model.convert_to(torch.float16)
    coords = sphere_shell_tokens(64, 20000, "cuda")
    feats = torch.randn(coords.shape[0], 32, device="cuda")
    model.set_resolution(1024)

    def fwd():
        return model(SparseTensor(feats, coords, (64,) * 3, batch_size=1))

    r = summarise(kernel_times(fwd, steps=1, warmup=1))
    print(f"\n== shape decoder 1024 fp16: kernels {r['kernel_ms']:.1f} ms")
    for c, ms in r["categories_ms"].items():
        print(f"   {c:<28} {ms:8.2f} ms")
    for k in r["top"][:12]:
        print(f"   {k['ms']:8.3f} ms {k['calls']:6.0f}x  {k['kernel']}")
    return r


def sdpa_check() -> list[dict]:
    """Median ms of SDPA per backend at the flows' attention shapes (bf16, D=128, 12 heads)."""
    shapes = [("ss self B=2", 2, 4096, 4096), ("ss cross B=2", 2, 4096, 1029), ("shape self 8k B=2", 2, 8192, 8192),
              ("shape self 20k", 1, 20000, 20000), ("shape cross 20k", 1, 20000, 4101), ("shape self 40k", 1, 40000, 40000)]
    rows = []
    for name, B, lq, lk in shapes:
        q = torch.randn(B, 12, lq, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, 12, lk, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        row = {"shape": name, **sdpa_backend_ms(q, k, v, 3, 10, digits=3)}
        # which kernel does the default pick? (profiler name)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
            torch.cuda.synchronize()
        row["default_kernel"] = max(prof.key_averages(), key=lambda e: getattr(e, "device_time_total", 0)).key[:90]
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="ss B=2,shape N=20k")
    p.add_argument("--no-fused", action="store_true", help="also profile with the Triton kernels switched off")
    p.add_argument("--sdpa-check", action="store_true")
    p.add_argument("--host-check", action="store_true", help="host cost per launch of small ops")
    p.add_argument("--decoder", action="store_true", help="also profile the shape decoder (1024, fp16)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    names = args.cases.split(",")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "profiles": []}
    models: dict = {}
    for case in [c for c in CASES if c[0] in names]:
        for fused in ([False, True] if args.no_fused else [True]):
            r = profile_case(case, models, fused)
            result["profiles"].append(r)
            print(f"\n== {r['case']} fused={fused}: {r['ms_event_median']:.1f} ms per forward (event), "
                  f"kernels {r['kernel_ms']:.1f} ms")
            for c, ms in r["categories_ms"].items():
                print(f"   {c:<24} {ms:8.2f} ms")
            for k in r["top"][:12]:
                print(f"   {k['ms']:8.3f} ms {k['calls']:6.0f}x  {k['kernel']}")
    models.clear()
    torch.cuda.empty_cache()
    if args.sdpa_check:
        result["sdpa"] = sdpa_check()
    if args.host_check:
        result["host_us"] = host_check()
    if args.decoder:
        result["decoder"] = decoder_profile()
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
