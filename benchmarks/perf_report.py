"""Every row of the performance targets (issue 10) in one device run: one JSON and one table.

Runs the individual benchmark scripts as subprocesses (each in a fresh process, so first-call
costs are real), ours and the in-run baseline side by side:
- sparse conv: the dense matmul of equal FLOPs (the ceiling) and our pure-torch ``gather`` path;
- flows: our unoptimised PyTorch block path (``--no-fused``);
- decoder, geometry, injection: as the scripts report them (injection: plain vs Know3D, per stage
  as the sampler runs it, and per forward in wall and kernel time).

    python benchmarks/perf_report.py --out perf.json          # GPU (H100), full size (~10 min)
    python benchmarks/perf_report.py --tiny --out perf.json   # CPU script check
    python benchmarks/perf_report.py --parts flows,conv --out a.json           # a subset ...
    python benchmarks/perf_report.py --parts geometry --merge a.json --out perf.json  # ... then the rest
    PYTHONPATH=$FLEXGEMM python benchmarks/perf_report.py --parts reference --trellis2 $TRELLIS2 --out r.json
        # the TRELLIS.2 reference (FlexGEMM built in its checkout) beside ours, one process (bench_vs_reference.py)

The table is printed last; ``--out`` gets the raw rows of every script plus the summary.
First calls: each in a fresh process; the first of two runs sharing a new Triton cache directory
compiles the kernels (once per machine and Triton version), the second loads them from disk (every
later process). The 512 pass: the same object again (steady; the anchors are sums of steady
per-forward times) and a new object in a warmed process (new token counts: cuDNN plan builds), with the
host waiting for the GPU after every sampler step as the in-run baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# (figure, target) as in the issue; the anchors are performance.md's H100 measurements.
TARGETS = [
    ("sparse-structure flow forward, B=2, cond 1029", "<= 55 ms", "ref 92 / ComfyUI 77 ms"),
    ("shape flow forward, N=20k, cond 4101", "<= 280 ms", "ref 373 / ComfyUI 410 ms"),
    ("shape flow forward, N=40k, cond 4101", "<= 780 ms", "ref 967 / ComfyUI 1213 ms"),
    ("shape decoder network, 20k tokens -> 1024", "<= 250 ms, <= 3 GiB", "ref 270 ms 5.4 GiB / ComfyUI 631 ms 8.1 GiB"),
    ("one sparse conv, N=200k, 256->256", "<= 2.0 ms, <= 0.5 GiB", "ref 1.33 ms / ComfyUI 5.26 ms"),
    ("512 geometry pass, shape N=8k", "<= 2.3 s", "ref 3.8-4.0 / ComfyUI 3.3-3.5 s"),
    ("1024 cascade geometry", "<= 8 s", "ref ~10 s published"),
    ("peak VRAM, 1024 cascade, offload", "<= 16 GB", "-"),
    ("first call in a fresh process (SS flow B=1 / shape decoder 20k)", "< 2 s", "ref 60 s / ComfyUI < 1 s"),
    ("knowledge injection on vs off", "<= FLOP floor + 0.05", "floors 1.31 / 1.26 / 1.15 / 1.11"),
]


def run_script(name: str, args: list[str], out_json: str, env: dict | None = None, timeout: int = 300) -> dict | None:
    cmd = [sys.executable, os.path.join(HERE, name), *args, "--out", out_json]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(out_json):
        print(f"  ! {name} failed (exit {proc.returncode})", flush=True)
        return None
    with open(out_json) as f:
        return json.load(f)


def _rows(data: dict | None) -> list[dict]:
    return [] if data is None else data.get("rows", [])


def _find(rows: list[dict], **match) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


PARTS = ("flows", "conv", "decoder", "geometry", "first", "injection", "maps", "train", "reference")

# Issue 21 / issue 19 item 8 rows (in-run baselines: the PyTorch map build, the PyTorch block path).
MAP_LIMIT_MS = 0.6  # FlexGEMM's build, +0.4-0.6 ms on an H200 (issue 21)
DECODER_REFERENCE_MS = {"decoder 512": 94.0, "decoder 1024": 202.0}  # the reference's faster seed (issue 21, H200)
TRAIN_RATIO_LIMIT = 3.3
DECODER_BASELINES = (("mlp_off", "ConvNeXt tail as PyTorch ops"), ("c2s_earlier", "earlier C2S path"),
                     ("torch_maps", "PyTorch map build"), ("wide_rule", "BN 256 conv tiles"),
                     ("child_maps_on", "children's maps derived"), ("child_maps_off", "children's maps hashed"))


def collect(tiny: bool, tmp: str, parts=PARTS, trellis2: str | None = None) -> dict:
    t = ["--tiny"] if tiny else []
    raw = {}
    dec_args = t if tiny else ["--cases", "shape_1024", "--dtypes", "float16"]
    if "flows" in parts:
        raw["flows"] = run_script("bench_trellis2_flows.py", t, os.path.join(tmp, "flows.json"))
        raw["flows_unfused"] = run_script("bench_trellis2_flows.py", t + ["--no-fused"], os.path.join(tmp, "flows_nf.json"))
    if "conv" in parts:
        conv_args = t if tiny else ["--voxels", "200000", "--channels", "256", "--algos", "gather", "csr", "implicit"]
        raw["conv"] = run_script("bench_sparse_conv.py", conv_args, os.path.join(tmp, "conv.json"))
    if "decoder" in parts:
        raw["decoder"] = run_script("bench_shape_decoder.py", dec_args, os.path.join(tmp, "decoder.json"))
        raw["decoder_unfused"] = run_script("bench_shape_decoder.py", dec_args + ["--no-fused"],
                                            os.path.join(tmp, "decoder_nf.json"))
    if "geometry" in parts:
        raw["geometry"] = run_script("bench_geometry.py", t + ["--repeat-object", "--host-sync", "both"],
                                     os.path.join(tmp, "geometry.json"), timeout=600)
    if "first" in parts:
        # First calls, each in a fresh process sharing one new kernel cache: the first run compiles
        # the Triton kernels (once per machine and Triton version), the second finds them on disk
        # (every later process, e.g. each ComfyUI start).
        for name, script, args in (("flow", "bench_trellis2_flows.py", t + ["--cases", "ss B=1", "--warmup", "1", "--repeats", "3"]),
                                   ("decoder", "bench_shape_decoder.py", dec_args + ["--warmup", "0", "--repeats", "1"])):
            env = {"TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-cold-")}
            for run in ("cold", "warm"):
                raw[f"first_{name}_{run}"] = run_script(script, args, os.path.join(tmp, f"first_{name}_{run}.json"), env=env)
        # The same in the pipeline's order (structure flow, then the decoder), warm-ups started at load
        # vs session 6's path (probe_first_calls.py), each mode with a new cache: compiles, then loads.
        for mode in ("before", "load", "early"):
            env = {"TRITON_CACHE_DIR": tempfile.mkdtemp(prefix=f"triton-{mode}-")}
            for run in ("cold", "warm"):
                raw[f"first_pipeline_{mode}_{run}"] = run_script(
                    "probe_first_calls.py", t + ["--mode", mode] + (["--ss-steps", "1"] if tiny else []),
                    os.path.join(tmp, f"first_pipeline_{mode}_{run}.json"), env=env)
    if "injection" in parts:
        raw["injection"] = run_script("bench_injection.py", t, os.path.join(tmp, "injection.json"), timeout=600)
    if "maps" in parts:
        raw["maps"] = run_script("bench_neighbour_map.py", t, os.path.join(tmp, "maps.json"))
    if "train" in parts:
        raw["train"] = run_script("bench_flow_training.py", t, os.path.join(tmp, "train.json"))
    if "reference" in parts:
        if trellis2:  # the TRELLIS.2 reference with a built FlexGEMM beside ours, one process
            raw["reference"] = run_script("bench_vs_reference.py", t + ["--trellis2", trellis2],
                                          os.path.join(tmp, "reference.json"), timeout=600)
        else:
            print("  reference: skipped (give --trellis2 and put a built FlexGEMM on PYTHONPATH)", flush=True)
    return raw


def summarise_first_calls(raw: dict) -> list[dict]:
    """Issue 21's first-call rows in the pipeline's order (probe_first_calls.py): the pipeline's path
    (``early``: Triton's start before the weights, warm-ups at load; ``load`` where no ``early`` run
    exists) vs session 6's path, each run in a fresh process, with an empty kernel cache and with it on disk."""
    out = []
    for run, limit in (("warm", 1.0), ("cold", 2.0)):
        logs = {m: ((raw.get(f"first_pipeline_{m}_{run}") or {}).get("log")) for m in ("early", "load", "before")}
        mode = "early" if logs["early"] else "load"
        now, before = logs[mode], logs["before"]
        if not now:
            continue
        fmt = lambda log: (f"{log['ss_first_ms'] / 1000:.2f} s / {log['decoder_first_ms'] / 1000:.2f} s"  # noqa: E731
                           if log else "-")
        out.append({"figure": f"first call, pipeline order, {'cache on disk' if run == 'warm' else 'empty cache'}: "
                              "structure flow (B=2) / decoder (20k)",
                    "target": f"< {limit:g} s each", "anchors": "ComfyUI 0.5 / 0.2 s (empty cache, issue 21)",
                    "ours": fmt(now) + (" Triton start + warm-ups at load" if mode == "early" else " warm-ups at load"),
                    "baseline": fmt(before) + " session 6's path" + (
                        f"; {fmt(logs['load'])} warm-ups at load only" if mode == "early" and logs["load"] else ""),
                    "ok": max(now["ss_first_ms"], now["decoder_first_ms"]) < 1000 * limit})
    return out


def summarise_kernels(raw: dict) -> list[dict]:
    """Rows of issue 21 (map build, decoder vs the reference) and issue 19 item 8 (training step)."""
    out = summarise_first_calls(raw)
    maps = _rows(raw.get("maps"))
    for r in (m for m in maps if str(m["case"]).startswith("map")):
        out.append({"figure": f"neighbour-map build 3x3x3, {r['case'][4:]} ({r['voxels']} voxels)",
                    "target": f"<= FlexGEMM (~{MAP_LIMIT_MS} ms)", "anchors": r["anchor"],
                    "ours": f"{r['triton_ms']:.3f} ms (map alone {r['triton_map_ms']:.3f})",
                    "baseline": f"{r['torch_ms']:.2f} ms PyTorch build; identical: {r['equal']}",
                    "ok": r["triton_ms"] <= MAP_LIMIT_MS and r["equal"]})
    for r in (m for m in maps if m["case"] == "child map"):
        out.append({"figure": f"children's 3x3x3 map, 1024 decoder's last subdivision ({r['voxels']} children)",
                    "target": "<= hashed build", "anchors": r["anchor"],
                    "ours": f"{r['triton_ms']:.3f} ms derived from the parents' map",
                    "baseline": f"{r['torch_ms']:.3f} ms hashed on the children's coords; identical: {r['equal']}",
                    "ok": r["triton_ms"] <= r["torch_ms"] and r["equal"]})
    for r in (m for m in maps if m["case"] in DECODER_REFERENCE_MS):
        ref = DECODER_REFERENCE_MS[r["case"]]
        ran = [(k, label) for k, label in DECODER_BASELINES if r.get(f"{k}_ms") is not None]
        base = "; ".join(f"{r[k + '_ms']:.1f} ms, +{r[k + '_peak_gib'] or 0:.2f} GiB {label}" for k, label in ran)
        peak_ok = all((r["peak_gib"] or 0) <= (r[k + "_peak_gib"] or 0) + 0.01
                      for k, _ in ran if k in ("mlp_off", "c2s_earlier"))
        out.append({"figure": f"shape {r['case']} network ({r['tokens']} tokens) vs reference",
                    "target": "<= 0.85x reference, peak <= earlier", "anchors": r["anchor"],
                    "ours": f"{r['ms']:.1f} ms ({r['ms'] / ref:.2f}x), +{r['peak_gib'] or 0:.2f} GiB",
                    "baseline": base, "ok": r["ms"] <= 0.85 * ref and peak_ok})
    out += summarise_reference(raw)
    out += summarise_new_objects(raw)
    for r in _rows(raw.get("train")):
        out.append({"figure": f"flow fwd+bwd / inference fwd, {r['case']}", "target": f"<= {TRAIN_RATIO_LIMIT}x",
                    "anchors": "issue 19 item 8",
                    "ours": f"{r['train_ms']:.0f} / {r['infer_ms']:.0f} ms = {r['ratio']:.2f}x, grads {r['with_grad']}/{r['params']}",
                    "baseline": f"{r['train_torch_ms']:.0f} ms ({r['torch_ratio']:.2f}x) PyTorch block path",
                    "ok": r["ratio"] <= TRAIN_RATIO_LIMIT and r["with_grad"] == r["params"]})
    return out


NEW_OBJECT_LIMITS_S = {"512": 2.0, "1024_cascade": 3.5}  # issue 21: a new object in a warmed process


def _pipeline_row(rows: list[dict], **match) -> dict | None:
    """The first row matching ``match`` that ran the pipeline as it is (not the per-step sync baseline)."""
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())
                 and not r.get("host_sync_each_step")), None)


def summarise_new_objects(raw: dict) -> list[dict]:
    """Issue 21's geometry rows: a new object (new token counts, so new cuDNN attention plans) in a warmed
    process, against the same object again and, when bench_geometry ran it (``--host-sync both``), the
    host waiting for the GPU after every sampler step (the pipeline before session 13)."""
    out = []
    geo = _rows(raw.get("geometry"))
    for ptype, limit in NEW_OBJECT_LIMITS_S.items():
        row = _pipeline_row(geo, pipeline_type=ptype, offload=False)
        if row is None:
            continue
        synced = _find(geo, pipeline_type=ptype, offload=False, host_sync_each_step=True)
        again = row.get("same_object_again")
        base = [f"{again['total_s']:.2f} s the same object again" if again else None,
                f"{synced['total_s']:.2f} s with a device sync after every step" if synced else None]
        out.append({"figure": f"{ptype} geometry pass, new object in a warmed process",
                    "target": f"<= {limit:g} s", "anchors": "issue 21 (2.34 / 4.05 s then)",
                    "ours": f"{row['total_s']:.2f} s (zero negative {row.get('zero_negative_shortcut')}, flash first "
                            f"step {row.get('flash_first_step')}, plans ahead {row.get('plan_attention_ahead')})",
                    "baseline": "; ".join(b for b in base if b) or "-", "ok": row["total_s"] <= limit})
    return out


def summarise_reference(raw: dict) -> list[dict]:
    """Issue 21's rows against the TRELLIS.2 reference measured in the same run (bench_vs_reference.py):
    a new coordinate set's neighbour structure (ours <= FlexGEMM's) and the decoder network (<= 0.85x)."""
    out = []
    data = raw.get("reference") or {}
    for r in _rows(data):
        if "ref_cache_ms" in r:
            out.append({"figure": f"neighbour structure of new coords, {r['case'][4:]} ({r['voxels']} voxels), in-run",
                        "target": "<= FlexGEMM", "anchors": "FlexGEMM in the same process",
                        "ours": f"{r['ours_cache_ms']:.3f} ms map+layout (map {r['ours_map_ms']:.3f}); "
                                f"conv cold-warm {r['ours_conv_cold_minus_warm_ms']:.3f}",
                        "baseline": f"FlexGEMM {r['ref_cache_ms']:.3f} ms cache (map {r['ref_map_ms']:.3f}); "
                                    f"conv cold-warm {r['ref_conv_cold_minus_warm_ms']:.3f}; same map {r['same_map']}",
                        "ok": r["ours_cache_ms"] <= r["ref_cache_ms"] and r["same_map"]})
        elif "ref_ms" in r:
            out.append({"figure": f"shape {r['case']} network ({r['tokens']} tokens) vs reference, in-run",
                        "target": "<= 0.85x reference", "anchors": "TRELLIS.2 + FlexGEMM in the same process",
                        "ours": f"{r['ours_ms']:.1f} ms ({r['ratio']:.2f}x), +{r['ours_peak_gib'] or 0:.2f} GiB",
                        "baseline": f"reference {r['ref_ms']:.1f} ms, +{r['ref_peak_gib'] or 0:.2f} GiB; "
                                    f"same coords {r['same_coords']}",
                        "ok": r["ratio"] <= 0.85 and r["same_coords"]})
    return out


def summarise(raw: dict) -> list[dict]:
    """One row per target: ours, the in-run baseline, and whether the target holds (None: not measured)."""
    out = []
    flows, unfused = _rows(raw.get("flows")), _rows(raw.get("flows_unfused"))
    for (figure, target, anchor), case, limit in zip(TARGETS[:3], ("ss B=2", "shape N=20k", "shape N=40k"), (55, 280, 780)):
        ours, base = _find(flows, case=case), _find(unfused, case=case)
        out.append({"figure": figure, "target": target, "anchors": anchor,
                    "ours": ours and f"{ours['ms']:.1f} ms", "baseline": base and f"{base['ms']:.1f} ms (unfused)",
                    "ok": None if ours is None else ours["ms"] <= limit})
    dec = next((r for r in _rows(raw.get("decoder")) if str(r.get("case", "")).startswith("shape_")), None)
    dec_nf = next((r for r in _rows(raw.get("decoder_unfused")) if str(r.get("case", "")).startswith("shape_")), None)
    out.append({"figure": TARGETS[3][0], "target": TARGETS[3][1], "anchors": TARGETS[3][2],
                "ours": dec and f"{dec['forward_ms']:.0f} ms, +{dec['forward_peak_gib'] or 0:.2f} GiB",
                "baseline": dec_nf and f"{dec_nf['forward_ms']:.0f} ms, +{dec_nf['forward_peak_gib'] or 0:.2f} GiB (unfused)",
                "ok": None if dec is None else dec["forward_ms"] <= 250 and (dec["forward_peak_gib"] or 0) <= 3})
    conv = _rows(raw.get("conv"))
    big = max((r["N"] for r in conv), default=None)
    cmax = max((r["C"] for r in conv if r["N"] == big), default=None)
    pick = lambda algo: _find(conv, N=big, C=cmax, algo=algo)  # noqa: E731
    impl = pick("implicit") or next((r for r in conv if r["N"] == big and r["C"] == cmax and "auto" in r["algo"]), None)
    dense, gather = pick("dense"), pick("gather")
    out.append({"figure": TARGETS[4][0], "target": TARGETS[4][1], "anchors": TARGETS[4][2],
                "ours": impl and f"{impl['ms']:.2f} ms, +{(impl['peak_extra_gib'] or 0):.2f} GiB (N={big}, C={cmax})",
                "baseline": dense and f"dense {dense['ms']:.2f} ms; gather {gather['ms']:.2f} ms" if gather else None,
                "ok": None if impl is None else impl["ms"] <= 2.0 and (impl["peak_extra_gib"] or 0) <= 0.5})
    geo = _rows(raw.get("geometry"))
    g512 = _pipeline_row(geo, pipeline_type="512", offload=False)
    gcas = _pipeline_row(geo, pipeline_type="1024_cascade", offload=False)
    gcas_off = _pipeline_row(geo, pipeline_type="1024_cascade", offload=True)
    again = g512 and g512.get("same_object_again")
    out.append({"figure": TARGETS[5][0], "target": TARGETS[5][1], "anchors": TARGETS[5][2],
                "ours": g512 and (f"{again['total_s']:.2f} s steady" if again else "-") + f" / {g512['total_s']:.2f} s new object",
                "baseline": "steady = the same object again (the anchors are sums of steady per-forward times); "
                            "new object = new token counts, cuDNN plan builds included",
                "ok": None if not again else again["total_s"] <= 2.3})
    out.append({"figure": TARGETS[6][0], "target": TARGETS[6][1], "anchors": TARGETS[6][2],
                "ours": gcas and f"{gcas['total_s']:.2f} s (tokens {gcas.get('num_tokens')})", "baseline": "-",
                "ok": None if gcas is None else gcas["total_s"] <= 8})
    peak = gcas_off and max((v or 0 for v in gcas_off["peak_vram_gib"].values()), default=0)
    out.append({"figure": TARGETS[7][0], "target": TARGETS[7][1], "anchors": TARGETS[7][2],
                "ours": peak and f"{peak:.2f} GiB", "baseline": gcas and f"{max((v or 0 for v in gcas['peak_vram_gib'].values()), default=0):.2f} GiB without offload",
                "ok": None if peak is None else peak * 1.073741824 <= 16})
    first = {run: (_find(_rows(raw.get(f"first_flow_{run}")), case="ss B=1"),
                   next((r for r in _rows(raw.get(f"first_decoder_{run}")) if "first_forward_ms" in r), None))
             for run in ("cold", "warm")}

    def first_s(run):
        flow, dec = first[run]
        return (flow and flow["first_ms"] / 1000, dec and dec["first_forward_ms"] / 1000)

    warm, cold = first_s("warm"), first_s("cold")
    fmt = lambda pair: " / ".join("-" if v is None else f"{v:.2f} s" for v in pair)  # noqa: E731
    out.append({"figure": TARGETS[8][0], "target": TARGETS[8][1], "anchors": TARGETS[8][2],
                "ours": f"{fmt(warm)} (kernel cache on disk)",
                "baseline": f"{fmt(cold)} first run after install (Triton compiles)",
                "ok": None if None in warm else max(warm) < 2.0})
    inj = _rows(raw.get("injection"))
    stages = (raw.get("injection") or {}).get("stages") or []
    gpu_ok = [r.get("gpu_ok") for r in inj if r.get("gpu_ok") is not None]
    ours = "; ".join(f"{r['stage']} {r['ratio']:.3f} (floor {r['floor']:.3f})" for r in stages)
    per_forward = "; ".join(
        f"{r['case']} {r['ratio']:.3f}" + (f" / GPU {r['gpu_ratio']:.3f}" if r.get("gpu_ratio") else "")
        + f" (floor {r['floor']:.3f})" for r in inj)
    # The figure is per stage (wall time of the sampler's forwards); each forward's kernel
    # time must also stay within its floor (its wall ratio is host-bound at B=1 on slow CPUs).
    out.append({"figure": TARGETS[9][0], "target": TARGETS[9][1], "anchors": TARGETS[9][2],
                "ours": (ours + " | per forward: " + per_forward) if ours else (per_forward or None),
                "baseline": "plain forward in the same run",
                "ok": None if not stages else all(r["ok"] for r in stages) and all(gpu_ok)})
    return out + summarise_kernels(raw)


def print_table(summary: list[dict], device: str) -> None:
    print(f"\nperformance targets on {device}")
    print(f"{'figure':58s} {'target':22s} {'ours':48s} ok   baseline")
    for r in summary:
        ok = {True: "yes", False: "NO", None: "-"}[r["ok"]]
        print(f"{r['figure'][:58]:58s} {r['target']:22s} {str(r['ours'])[:48]:48s} {ok:4s} {r['baseline']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU script check at tiny sizes")
    p.add_argument("--out", required=True, help="write the raw rows and the summary here (JSON)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma list of what to run (default all: {','.join(PARTS)})")
    p.add_argument("--merge", nargs="*", default=[],
                   help="earlier --out files whose raw rows join this run's (this run wins on overlap)")
    p.add_argument("--trellis2", default=None,
                   help="part 'reference': a checkout of microsoft/TRELLIS.2 (FlexGEMM built and on PYTHONPATH)")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {unknown}; known: {', '.join(PARTS)}")
    raw = {}
    for path in args.merge:
        with open(path) as f:
            raw.update(json.load(f)["raw"])
    with tempfile.TemporaryDirectory() as tmp:
        raw.update(collect(args.tiny, tmp, parts, args.trellis2))
    summary = summarise(raw)
    device = next((d.get("device") for d in raw.values() if isinstance(d, dict) and d.get("device")), "cpu")
    with open(args.out, "w") as f:
        json.dump({"device": device, "tiny": args.tiny, "summary": summary, "raw": raw}, f, indent=1, default=str)
    print_table(summary, str(device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
