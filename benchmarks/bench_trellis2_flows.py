"""Benchmark: TRELLIS.2 flow DiT forwards (sparse-structure flow and shape SLat flow).

Full size (default, CUDA): the official architecture (1536 wide, 30 blocks, 12 heads, mlp 8192,
bf16 block linears, fp32 norms/embedders/head) with random weights; one forward per timing.
Rows (research/performance.md has the reference and ComfyUI timings of the same cases):
- ``ss B=1`` / ``ss B=2``: sparse-structure flow on ``[B, 8, 16, 16, 16]`` (4096 tokens), cond 1029;
- ``shape N=8k``: shape flow, 8192 voxel tokens on a 32^3 grid, cond 1029 (the 512 stage);
- ``shape N=8k B=2``: the same as a CFG pair on shared coords (one batched forward);
- ``shape N=20k`` / ``shape N=40k``: 64^3 grid, cond 4101 (the 1024 stage);
- ``... zero neg``: the B=2 cases as the pipeline runs a guided pair since session 13 (the second sample's
  cond all zeros, ``zero_cond_from=1``: its cross-attention one row); their baselines are the B=2 rows.
Timing: CUDA events, median of --repeats after --warmup; ``peak_gib`` = peak allocated memory during
the forward minus what was allocated before it (weights, inputs).

``--tiny`` runs tiny widths on the CPU (perf_counter) so the script is checked without a GPU.

    python benchmarks/bench_trellis2_flows.py --out flows.json                    # GPU, full size
    python benchmarks/bench_trellis2_flows.py --sdpa cudnn --out flows_cudnn.json # force a kernel
    python benchmarks/bench_trellis2_flows.py --tiny --out flows_tiny.json        # CPU check
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    device_name,
    flow_run_setup,
    gamma_or_norm2_weight,
    random_coords,
    random_model,
    sample_times,
    wall_ms,
    write_json,
)

from know3d_core.sparse import SparseTensor  # noqa: E402
from know3d_core.trellis2.slat_flow import SLatFlowModel  # noqa: E402
from know3d_core.trellis2.sparse_structure_flow import SparseStructureFlowModel  # noqa: E402
from know3d_core.trellis2.tiny import tiny_flow_args  # noqa: E402

FULL = dict(model_channels=1536, cond_channels=1024, num_blocks=30, num_heads=12)
TINY = dict(model_channels=64, cond_channels=32, num_blocks=2, num_heads=4)

# (name, model kind, batch, tokens, grid, cond tokens); tiny sizes in brackets.
CASES = [
    ("ss B=1", "ss", 1, None, 16, (1029, 17)),
    ("ss B=2", "ss", 2, None, 16, (1029, 17)),
    ("shape N=8k", "shape512", 1, (8192, 512), (32, 16), (1029, 17)),
    ("shape N=8k B=2", "shape512", 2, (8192, 512), (32, 16), (1029, 17)),
    ("ss B=2 zero neg", "ss", 2, None, 16, (1029, 17)),
    ("shape N=8k B=2 zero neg", "shape512", 2, (8192, 512), (32, 16), (1029, 17)),
    ("shape N=20k", "shape1024", 1, (20000, 1000), (64, 16), (4101, 65)),
    ("shape N=40k", "shape1024", 1, (40000, 2000), (64, 16), (4101, 65)),
]

SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


def build(kind: str, widths: dict, dtype: str, device: torch.device) -> torch.nn.Module:
    """Random-weight flow (built on 'meta', allocated on device, initialised in place)."""
    cls = SparseStructureFlowModel if kind == "ss" else SLatFlowModel
    return random_model(cls, {**tiny_flow_args(kind), **widths, "dtype": dtype}, device, 0, device,
                        ones=gamma_or_norm2_weight)


def time_ms(fn, device, warmup: int, repeats: int):
    """(median ms, peak extra GiB) of ``fn()``."""
    times, peak, _ = sample_times(fn, device, warmup, repeats, track_peak=True)
    return statistics.median(times), peak


def run_case(case, tiny: bool, dtype: str, device, warmup: int, repeats: int, models: dict) -> dict:
    name, kind, batch, tokens, grid, cond_len = case
    idx = 1 if tiny else 0
    widths = TINY if tiny else FULL
    if kind not in models:
        models.clear()  # one full-size model on the GPU at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
        models[kind] = build(kind, widths, dtype, device)
    model = models[kind]
    gen = torch.Generator(device=device).manual_seed(1)
    lc = cond_len[idx]
    cond = torch.randn(batch, lc, widths["cond_channels"], device=device, generator=gen)
    extra = {}
    if name.endswith("zero neg"):  # a guided pair: the negative half's condition is zeros
        cond[batch // 2:] = 0
        extra = {"zero_cond_from": batch // 2}
    t = torch.full((batch,), 700.0, device=device)
    if kind == "ss":
        x = torch.randn(batch, 8, 16, 16, 16, device=device, generator=gen)
        n_tokens = 4096
    else:
        n, res = tokens[idx], grid[idx]
        coords = random_coords(n, res, batch, device)
        x = SparseTensor(torch.randn(batch * n, 32, device=device, generator=gen), coords, (res,) * 3,
                         batch_size=batch)
        n_tokens = n

    def fwd():
        with torch.no_grad():
            return model(x, t, cond, **extra)

    first_ms = wall_ms(fwd, device)  # first call of this shape (includes run-time kernel compiles in a fresh process)
    ms, peak = time_ms(fwd, device, warmup, repeats)
    host_ms = None
    if device.type == "cuda":  # time for the host to enqueue one forward (== ms when launch-bound)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fwd()
        host_ms = 1000 * (time.perf_counter() - t0)
        torch.cuda.synchronize()
    out = fwd()
    feats = out.feats if isinstance(out, SparseTensor) else out
    return {"case": name, "batch": batch, "tokens": n_tokens, "cond_tokens": lc, "ms": round(ms, 3),
            "first_ms": round(first_ms, 1), "host_ms": None if host_ms is None else round(host_ms, 2), "peak_gib": None if peak is None else round(peak, 3), "finite": bool(torch.isfinite(feats).all())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny widths on the CPU (script check)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="block dtype (default: bfloat16; float32 with --tiny, CPU bf16 is slow)")
    p.add_argument("--sdpa", default="default", choices=["default", *SDPA_BACKENDS],
                   help="force one torch SDPA kernel (default: torch's own choice)")
    p.add_argument("--no-fused", action="store_true", help="run the blocks' PyTorch path (Triton kernels off)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--cases", default=None, help="comma-separated subset of case names")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)

    device = flow_run_setup(args)
    if device is None:
        return 2
    cases = CASES if args.cases is None else [c for c in CASES if c[0] in args.cases.split(",")]
    ctx = contextlib.nullcontext()
    if args.sdpa != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        ctx = sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[args.sdpa]))
    rows, models = [], {}
    if args.no_fused:
        from know3d_core.trellis2.modules.fused import use_fused_kernels
        ctx = contextlib.ExitStack()
        ctx.enter_context(use_fused_kernels(False))
        if args.sdpa != "default":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            ctx.enter_context(sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[args.sdpa])))
    with ctx:
        for case in cases:
            rows.append(run_case(case, args.tiny, args.dtype, device, args.warmup, args.repeats, models))
            r = rows[-1]
            print(f"{r['case']:<16} B={r['batch']} tokens={r['tokens']:>6} cond={r['cond_tokens']:>5} "
                  f"{r['ms']:>10.2f} ms  peak+{r['peak_gib'] if r['peak_gib'] is not None else '-'} GiB"
                  f"  first {r['first_ms']:.0f} ms  host {r['host_ms']} ms"
                  f"{'' if r['finite'] else '  NON-FINITE'}", flush=True)
    result = {
        "device": device_name(device),
        "torch": torch.__version__, "dtype": args.dtype, "sdpa": args.sdpa, "tiny": args.tiny,
        "fused": not args.no_fused,
        "warmup": args.warmup, "repeats": args.repeats, "rows": rows,
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
