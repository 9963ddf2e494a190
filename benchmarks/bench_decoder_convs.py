"""Benchmark (issue 21): every distinct sparse conv of one shape-decoder forward, timed alone with
several Triton block configurations, on the decoder's own inputs (coords, neighbour maps, features).

One forward of the official decoder (fp16, random weights, sphere-shell tokens) records the first
call of each conv form and size: ``plain`` (ConvNeXt conv, or C2S conv1/conv2 on the earlier path),
``child`` (C2S conv1 for the existing children only), ``skip`` (C2S conv2 with the skip in its
epilogue). Each is then launched alone per configuration (CUDA events, median), beside the C2S
conv1 over all 8 children (``full`` form: what ``child`` replaces) and the child conv with its
tiles slot-major instead of interleaved (``child_slotmajor``, the rule's configuration only). Rows give ms, the count of
launches per forward and TFLOP/s over the multiplies actually done (active offsets per tile x rows).

    python benchmarks/bench_decoder_convs.py --out convs.json            # GPU
    python benchmarks/bench_decoder_convs.py --tiny --out convs.json     # CPU script check (no timing)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import SHAPE_DECODER_FULL, bench_device, device_name, sample_times, sync, write_json  # noqa: E402
from bench_shape_decoder import init_random, sphere_shell_tokens  # noqa: E402

from know3d_core.sparse import SparseTensor, conv as conv_mod, conv_triton, neighbour_map  # noqa: E402
from know3d_core.sparse.conv_triton import KernelConfig  # noqa: E402
from know3d_core.trellis2 import shape_decoder as shape_mod  # noqa: E402
from know3d_core.trellis2.shape_decoder import FlexiDualGridVaeDecoder  # noqa: E402

# (BM, BN, BK, warps, stages); the rule's choices are among them
CONFIGS = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
           (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 256, 32, 8, 4), (64, 64, 64, 4, 4)]


def record_convs(model, x) -> list:
    """One forward; the first call of each (form, N, Ci, Co) with what its launch needs, and counts."""
    seen: dict = {}

    def note(kind, xs, weight, bias, extra=None):
        key = (kind, xs.num_voxels, weight.shape[4], weight.shape[0])
        if key in seen:
            seen[key]["calls"] += 1
            return
        seen[key] = {"kind": kind, "x": xs, "nm": neighbour_map(xs), "w": weight.detach().to(xs.feats.dtype),
                     "b": None if bias is None else bias.detach().to(xs.feats.dtype), "extra": extra, "calls": 1}

    orig = (conv_mod.submanifold_conv3d, shape_mod.submanifold_conv3d_children, shape_mod.submanifold_conv3d_skip)

    def plain(xs, weight, bias=None, *a, **k):
        note("plain", xs, weight, bias)
        return orig[0](xs, weight, bias, *a, **k)

    def child(xs, weight, bias, src, num_slots=8):
        note("child", xs, weight, bias, src)
        return orig[1](xs, weight, bias, src, num_slots)

    def skip(xs, weight, bias, table, index):
        note("skip", xs, weight, bias, (table, index))
        return orig[2](xs, weight, bias, table, index)

    conv_mod.submanifold_conv3d, shape_mod.submanifold_conv3d_children, shape_mod.submanifold_conv3d_skip = \
        plain, child, skip
    try:
        with torch.no_grad():
            model(x)
    finally:
        conv_mod.submanifold_conv3d, shape_mod.submanifold_conv3d_children, shape_mod.submanifold_conv3d_skip = orig
    return list(seen.values())


def launcher(rec, cfg: KernelConfig, form: str):
    """A no-argument call of the kernel for ``rec`` with ``cfg`` (``form``: the record's kind, or
    ``full`` for a child record's conv over all 8 children), and its multiply count."""
    xs, nm, w, b = rec["x"], rec["nm"], rec["w"], rec["b"]
    ci = w.shape[4]
    if form in ("child", "child_slotmajor"):
        src = rec["extra"]
        lay = conv_triton.child_tile_layout(nm.nbr, nm._derived.get("bits"), src, cfg.BM,
                                            interleave=form == "child")
        co = w.shape[0] // 8
        flops = 2.0 * float(lay.counts.sum()) * cfg.BM * ci * co
        return (lambda: conv_triton.conv_children_implicit_gemm(xs.feats, nm.nbr, lay, w, b, src.shape[0], 8, cfg)), flops
    lay = nm.tile_layout(cfg.BM)
    flops = 2.0 * float(lay.counts.sum()) * cfg.BM * ci * w.shape[0]
    skip = rec["extra"] if form == "skip" else None
    return (lambda: conv_triton.conv_implicit_gemm(xs.feats, lay, w, b, cfg, skip)), flops


def valid(cfg: KernelConfig, ci: int, co: int) -> bool:
    return cfg.BN <= max(64, triton_pow2(co)) and cfg.BK <= max(16, triton_pow2(ci))


def triton_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def sweep(records, device, warmup: int, repeats: int, configs) -> list:
    cases = []
    for rec in records:
        ci, co_all = rec["w"].shape[4], rec["w"].shape[0]
        forms = [rec["kind"]] + (["full", "child_slotmajor"] if rec["kind"] == "child" else [])
        for form in forms:
            co = co_all // 8 if form.startswith("child") else co_all
            kind = "plain" if form == "full" else "child" if form.startswith("child") else form
            rule = conv_triton.kernel_config(ci, co, rec["w"].dtype, kind)
            cases.append((rec, form, rule, True))
            if form == "child_slotmajor":
                continue  # the tile order A/B: the rule's config only
            for c in configs:
                cfg = KernelConfig(*c)
                if valid(cfg, ci, co) and cfg != rule:
                    cases.append((rec, form, cfg, False))
    # compile every variant side by side first (tiny launches would not do: the real ones are cheap)
    calls = [launcher(rec, cfg, form) for rec, form, cfg, _ in cases]
    threads = 1 if os.environ.get("TRITON_INTERPRET") == "1" else 8  # the interpreter patches tl globally
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda c: c[0](), calls))
    sync(device)
    rows = []
    for (rec, form, cfg, is_rule), (fn, flops) in zip(cases, calls):
        ms = statistics.median(sample_times(fn, device, warmup, repeats)[0])
        rows.append({"form": form, "voxels": rec["x"].num_voxels, "ci": rec["w"].shape[4],
                     "co": rec["w"].shape[0] // (8 if form.startswith("child") else 1), "calls": rec["calls"],
                     "config": list(cfg.__dict__.values()), "rule": is_rule, "ms": round(ms, 4),
                     "tflops": round(flops / ms / 1e9, 1)})
        print(rows[-1], flush=True)
    return rows


def summarise(rows) -> dict:
    """Per form and size: the rule's ms, the best config and its ms; totals weighted by calls."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["form"], r["voxels"], r["ci"], r["co"]), []).append(r)
    out, rule_total, best_total = [], 0.0, 0.0
    for (form, n, ci, co), rs in groups.items():
        rule = next((r for r in rs if r["rule"]), None)
        best = min(rs, key=lambda r: r["ms"])
        out.append({"form": form, "voxels": n, "ci": ci, "co": co, "calls": rs[0]["calls"],
                    "rule_ms": rule and rule["ms"], "rule_tflops": rule and rule["tflops"],
                    "best_config": best["config"], "best_ms": best["ms"], "best_tflops": best["tflops"]})
        if form not in ("full", "child_slotmajor") and rule:
            rule_total += rule["ms"] * rs[0]["calls"]
            best_total += best["ms"] * rs[0]["calls"]
    return {"per_shape": out, "rule_total_ms": round(rule_total, 2), "best_total_ms": round(best_total, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny decoder on the CPU: records only (script check)")
    p.add_argument("--device", default=None)
    p.add_argument("--grid", type=int, default=64, help="token grid (64: the 1024 decoder, 32: 512)")
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-voxels", type=int, default=None, help="sweep only the convs up to this many voxels")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = bench_device(args)
    if device is None:
        return 2
    cfg = dict(shape_mod.TINY_ARGS) if args.tiny else dict(SHAPE_DECODER_FULL)
    grid, tokens = (8, 60) if args.tiny else (args.grid, args.tokens)
    model = init_random(FlexiDualGridVaeDecoder(**cfg).to(device))
    model.convert_to(torch.float16 if device.type == "cuda" else torch.float32)
    coords = sphere_shell_tokens(grid, tokens, device)
    feats = torch.randn(coords.shape[0], cfg["latent_channels"], device=device)
    records = record_convs(model, SparseTensor(feats, coords, (grid,) * 3, batch_size=1))
    for r in records:
        print(f"recorded {r['kind']:<6} x{r['calls']:<3} voxels {r['x'].num_voxels:>8} weight {tuple(r['w'].shape)}",
              flush=True)
    rows, summary = [], None
    if args.max_voxels is not None:
        records = [r for r in records if r["x"].num_voxels <= args.max_voxels]
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter: a script check
        rows = sweep(records, device, args.warmup, args.repeats, CONFIGS)
        summary = summarise(rows)
        print(f"\n{'form':<16}{'voxels':>9}{'ci':>6}{'co':>6}{'calls':>6}{'rule ms':>10}{'TF/s':>7}"
              f"{'best ms':>10}{'TF/s':>7}  best config  ({device_name(device)})")
        for s in summary["per_shape"]:
            print(f"{s['form']:<16}{s['voxels']:>9}{s['ci']:>6}{s['co']:>6}{s['calls']:>6}{s['rule_ms'] or 0:>10.3f}"
                  f"{s['rule_tflops'] or 0:>7.0f}{s['best_ms']:>10.3f}{s['best_tflops']:>7.0f}  {s['best_config']}")
        print(f"conv time per forward (calls x ms): rule {summary['rule_total_ms']} ms, "
              f"best per shape {summary['best_total_ms']} ms")
    write_json(args.out, {"device": device_name(device), "torch": torch.__version__, "tiny": args.tiny,
                          "grid": grid, "records": [{"kind": r["kind"], "voxels": r["x"].num_voxels,
                                                     "weight": list(r["w"].shape), "calls": r["calls"]}
                                                    for r in records],
                          "rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
