"""Benchmark: forward + backward of the TRELLIS.2 flows through the fused kernels (issue 19 item 8).

Full size (CUDA), random weights, every parameter ``requires_grad``; loss ``mean(out^2)``. Per case:
- ``infer_ms``: our inference forward (no autograd, fused kernels): the issue's yardstick;
- ``train_ms``: forward + backward with the fused kernels and their Triton backward passes;
- ``train_torch_ms``: the same on the PyTorch block path (fused kernels off): the in-run baseline;
- ``ratio`` = train_ms / infer_ms (target <= 3.3), ``with_grad`` = parameters that got a gradient,
  ``peak_gib`` = peak memory of one training step beyond what was allocated before it;
- ``frozen_weights_ms``: the fused step with every weight matrix frozen (vectors still trained), so
  every activation needs its gradient but no weight gradient is formed: the cost floor of LoRA /
  Know3D-branch training (adapters excluded).
Cases: ``ss B=2`` (4096 tokens each), ``shape N=8k`` and ``shape N=16k`` (512 model, 32^3 grid),
cond 1029 tokens.

    python benchmarks/bench_flow_training.py --out train.json      # GPU, full size
    python benchmarks/bench_flow_training.py --tiny --out t.json   # CPU script check
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import device_name, flow_run_setup, random_coords, sample_times, write_json  # noqa: E402
from bench_trellis2_flows import FULL, TINY, build  # noqa: E402

from know3d_core.sparse import SparseTensor  # noqa: E402
from know3d_core.trellis2.modules.fused import use_fused_kernels  # noqa: E402

# (name, kind, batch, tokens (full, tiny), grid (full, tiny), cond tokens (full, tiny))
CASES = [
    ("ss B=2", "ss", 2, None, 16, (1029, 17)),
    ("shape N=8k", "shape512", 1, (8192, 256), (32, 16), (1029, 17)),
    ("shape N=16k", "shape512", 1, (16384, 512), (32, 16), (1029, 17)),
]


def make_inputs(case, tiny: bool, device, widths: dict):
    name, kind, batch, tokens, grid, cond_len = case
    idx = 1 if tiny else 0
    gen = torch.Generator(device=device).manual_seed(1)
    cond = torch.randn(batch, cond_len[idx], widths["cond_channels"], device=device, generator=gen)
    t = torch.full((batch,), 700.0, device=device)
    if kind == "ss":
        return torch.randn(batch, 8, 16, 16, 16, device=device, generator=gen), t, cond
    n, res = tokens[idx], grid[idx]
    x = SparseTensor(torch.randn(batch * n, 32, device=device, generator=gen), random_coords(n, res, batch, device),
                     (res,) * 3, batch_size=batch)
    return x, t, cond


def profile_step(step) -> dict:
    """Kernel time of one fused training step by category (and the top kernels)."""
    from _common import kernel_times
    from profile_flows import summarise
    r = summarise(kernel_times(step, steps=1, warmup=1), top=12)
    print(f"   step kernels {r['kernel_ms']:.1f} ms: {r['categories_ms']}", flush=True)
    for k in r["top"]:
        print(f"   {k['ms']:8.3f} ms {k['calls']:6.0f}x  {k['kernel']}", flush=True)
    return r


def run_case(case, tiny: bool, dtype: str, device, warmup: int, repeats: int, profile: bool = False) -> dict:
    widths = TINY if tiny else FULL
    model = build(case[1], widths, dtype, device)
    x, t, cond = make_inputs(case, tiny, device, widths)
    params = list(model.parameters())
    n_params = len(params)

    def infer():
        with torch.no_grad():
            return model(x, t, cond)

    def step():
        for p in params:
            p.grad = None
        out = model(x, t, cond)
        feats = out.feats if isinstance(out, SparseTensor) else out
        (feats.float() ** 2).mean().backward()

    infer_ms = statistics.median(sample_times(infer, device, warmup, repeats)[0])
    for p in params:
        p.requires_grad_(True)
    times, peak, _ = sample_times(step, device, warmup, repeats, track_peak=True)
    train_ms = statistics.median(times)
    with_grad = sum(p.grad is not None for p in params)
    prof = profile_step(step) if profile and device.type == "cuda" else None
    with use_fused_kernels(False):
        torch_ms = statistics.median(sample_times(step, device, warmup, repeats)[0])
    for p in params:  # proxy of LoRA / branch training: every activation needs its gradient, no weight matrix does
        p.requires_grad_(p.dim() < 2)
    frozen_ms = statistics.median(sample_times(step, device, warmup, repeats)[0])
    del model, params, x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"case": case[0], "infer_ms": round(infer_ms, 2), "train_ms": round(train_ms, 2),
            "train_torch_ms": round(torch_ms, 2), "ratio": round(train_ms / infer_ms, 3),
            "torch_ratio": round(torch_ms / infer_ms, 3), "with_grad": with_grad, "params": n_params,
            "peak_gib": None if peak is None else round(peak, 2), "frozen_weights_ms": round(frozen_ms, 2),
            "frozen_ratio": round(frozen_ms / infer_ms, 3), "profile": prof}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny widths on the CPU (script check)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cases", default=None, help="comma-separated subset of case names")
    p.add_argument("--profile", default="", help="comma list of cases whose fused step is profiled (CUDA)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = flow_run_setup(args)
    if device is None:
        return 2
    cases = CASES if args.cases is None else [c for c in CASES if c[0] in args.cases.split(",")]
    rows = []
    for case in cases:
        r = run_case(case, args.tiny, args.dtype, device, args.warmup, args.repeats,
                     case[0] in args.profile.split(","))
        rows.append(r)
        print(f"{r['case']:<12} infer {r['infer_ms']:>9.2f} ms  fwd+bwd {r['train_ms']:>9.2f} ms "
              f"(x{r['ratio']:.2f})  torch path {r['train_torch_ms']:>9.2f} ms (x{r['torch_ratio']:.2f})  "
              f"grads {r['with_grad']}/{r['params']}  peak+{r['peak_gib']} GiB  "
              f"weights frozen {r['frozen_weights_ms']:.2f} ms (x{r['frozen_ratio']:.2f})", flush=True)
    write_json(args.out, {"device": device_name(device), "torch": torch.__version__, "dtype": args.dtype,
                          "tiny": args.tiny, "warmup": args.warmup, "repeats": args.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
