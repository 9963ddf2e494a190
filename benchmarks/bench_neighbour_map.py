"""Benchmark (issue 21): neighbour-map build of a 3x3x3 submanifold structure, and the shape decoder
with the Triton map build against the PyTorch one, in one process.

Rows:
- ``map N=200k`` / ``map N=1M``: voxels of a spherical shell (a surface, as every decoder level);
  ``triton_ms``: hash-table map + tile layout (:mod:`know3d_core.sparse.neighbour_triton`, what a
  conv on a new coordinate set pays), ``triton_map_ms``: the map alone, ``torch_ms``: the PyTorch
  build of both (the in-run baseline), ``equal``: identical outputs. Each repeat builds from
  scratch. Anchor: FlexGEMM's build, +0.4-0.6 ms on an H200 (issue 21's measurement; FlexGEMM's CUDA
  extension is not built here).
- ``decoder 512`` / ``decoder 1024``: the official shape decoder (fp16, random weights) on ~8k /
  ~20k sphere-shell tokens: forward ms with each map build (same model, same input). Anchor: the
  TRELLIS.2 reference's 94-107 / 202-239 ms on an H200 (issue 21).
- ``children``: one subdivision's child coords and source rows as at the 1024 decoder's last level
  (1.25 M parents), one Triton launch against the PyTorch ops (``torch_ms``), identical outputs.
- ``child map``: the children's map at that subdivision derived from the parents' map
  (:mod:`know3d_core.sparse.child_maps`) against the hashed build on their coords, identical maps.
- ``--profile``: kernel time of one 1024 decoder forward by category (where the time goes).

    python benchmarks/bench_neighbour_map.py --out maps.json [--profile]   # GPU
    python benchmarks/bench_neighbour_map.py --tiny --out maps.json         # CPU script check
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import SHAPE_DECODER_FULL, bench_device, device_name, kernel_times, sample_times, write_json  # noqa: E402
from bench_shape_decoder import init_random, sphere_shell_tokens  # noqa: E402

from know3d_core.sparse import SparseTensor, child_maps, conv, conv_triton, neighbour_triton  # noqa: E402
from know3d_core.trellis2 import shape_decoder as shape_mod  # noqa: E402
from know3d_core.trellis2.modules import fused_mlp, fused_norm  # noqa: E402
from know3d_core.trellis2.shape_decoder import FlexiDualGridVaeDecoder  # noqa: E402

REFERENCE = {"map": "FlexGEMM +0.4-0.6 ms (H200, issue 21)", "decoder 512": "reference 94-107 ms (H200, issue 21)",
             "decoder 1024": "reference 202-239 ms (H200, issue 21)",
             "children": "PyTorch ops: index_select 2.96 ms at 1.25 M -> 4.9 M in the 1024 profile (H100, session 6)",
             "child map": "torch_ms here: the hashed build on the children's coords (in run)"}
MAP_CASES = [("map N=200k", 200_000), ("map N=1M", 1_000_000)]
CHILDREN_PARENTS = 1_250_000  # the 1024 decoder's last subdivision: ~1.25 M parents -> ~4.9 M children
DECODER_CASES = [("decoder 512", 32, 8000), ("decoder 1024", 64, 20000)]
CATEGORIES = [  # first match wins, lower-cased kernel names
    ("sparse conv (Triton)", ("_subm_conv",)),
    ("ConvNeXt tail: LN+MLP+residual (Triton)", ("_convnext_mlp",)),
    ("neighbour map (Triton)", ("_hash_", "_tile_layout", "_child_tile", "_child_map", "_pattern_bits")),
    ("subdivision children (Triton)", ("_children_kernel",)),
    ("head: LayerNorm + linear (Triton)", ("_layer_norm_linear",)),
    ("layer norm (+SiLU)", ("_layer_norm_act", "layer_norm")),
    ("sort/search/scan", ("sort", "search", "radix", "scan")),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "matmul", "nvjet", "cublas")),
    ("gather/index", ("gather", "index", "scatter")),
    ("elementwise/copy", ("elementwise", "vectorized", "copy", "cast", "unrolled", "reduce", "cat", "memcpy", "memset",
                          "fill")),
]


def shell_coords(n: int, device) -> tuple:
    """``([~n, 4] int32 coords of a one-voxel shell, grid)``."""
    grid = int(2 * (n / (4 * 3.1416)) ** 0.5 / 0.84) + 8
    return sphere_shell_tokens(grid, n, device), grid


def build_both(coords: torch.Tensor, grid: int, bm: int = 128):
    """A fresh map + tile layout (nothing cached) with the current map backend."""
    nbr, bits = conv._build_neighbour_map(coords, (grid,) * 3, 3, 1)
    return conv.NeighbourMap(nbr, 3, 1, bits).tile_layout(bm), nbr


def bench_map(name: str, n: int, device, warmup: int, repeats: int) -> dict:
    coords, grid = shell_coords(n, device)

    def med(fn):
        return round(statistics.median(sample_times(fn, device, warmup, repeats)[0]), 3)

    with neighbour_triton.use_triton_maps(False):
        torch_ms = med(lambda: build_both(coords, grid))
        ref_layout, ref_nbr = build_both(coords, grid)
    triton_ms = med(lambda: build_both(coords, grid))
    map_ms = med(lambda: conv._build_neighbour_map(coords, (grid,) * 3, 3, 1))
    layout, nbr = build_both(coords, grid)
    equal = torch.equal(nbr, ref_nbr) and all(
        torch.equal(getattr(layout, a), getattr(ref_layout, a)) for a in ("rows", "nbr", "offsets", "counts"))
    fill = float((nbr < nbr.shape[0]).float().mean())
    return {"case": name, "voxels": int(coords.shape[0]), "grid": grid, "fill": round(fill, 3),
            "triton_ms": triton_ms, "triton_map_ms": map_ms, "torch_ms": torch_ms, "equal": equal,
            "anchor": REFERENCE["map"]}


def bench_children(n: int, device, warmup: int, repeats: int) -> dict:
    """Children of one subdivision as the 1024 decoder's last one (~n parents of a shell, each child
    present with probability 0.49: ~3.9 n children): coords + source rows in one Triton launch vs the
    PyTorch ops (index_select, bit table, arithmetic), identical outputs."""
    from know3d_core.sparse import spatial

    coords, grid = shell_coords(n, device)
    gen = torch.Generator(device=device).manual_seed(2)
    mask = torch.rand(coords.shape[0], 8, device=device, generator=gen) < 0.49
    x = SparseTensor(torch.zeros(coords.shape[0], 8, device=device), coords, (grid,) * 3)

    def med(fn):
        return round(statistics.median(sample_times(fn, device, warmup, repeats)[0]), 3)

    with neighbour_triton.use_triton_children(False):
        torch_ms = med(lambda: spatial._subdivide(x, mask))
        ref = spatial._subdivide(x, mask)
    ms = med(lambda: spatial._subdivide(x, mask))
    got = spatial._subdivide(x, mask)
    return {"case": "children", "voxels": int(coords.shape[0]), "children": int(got[1].shape[0]),
            "triton_ms": ms, "torch_ms": torch_ms,
            "equal": torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2]), "anchor": REFERENCE["children"]}


def bench_child_map(n: int, device, warmup: int, repeats: int) -> dict:
    """The children's 3x3x3 map (and pattern bits) at the 1024 decoder's last subdivision (children of
    ~n shell parents, each present with probability 0.49): derived from the parents' map
    (:mod:`know3d_core.sparse.child_maps`; the Triton kernel on CUDA, switched on for this row) against
    the hashed build on the children's coords (``hashed_ms``, what conv2 pays without it); identical maps."""
    from know3d_core.sparse import spatial

    coords, grid = shell_coords(n, device)
    gen = torch.Generator(device=device).manual_seed(2)
    mask = torch.rand(coords.shape[0], 8, device=device, generator=gen) < 0.49
    parent = SparseTensor(torch.zeros(coords.shape[0], 1, device=device), coords, (grid,) * 3)
    parent_nbr = conv.neighbour_map(parent).nbr
    _, fine, src, _ = spatial._subdivide(parent, mask)
    src = src.int()  # as the decoders pass it

    def med(fn):
        return round(statistics.median(sample_times(fn, device, warmup, repeats)[0]), 3)

    hashed_ms = med(lambda: conv._build_neighbour_map(fine, (2 * grid,) * 3, 3, 1, batch_size=1))
    want = conv._build_neighbour_map(fine, (2 * grid,) * 3, 3, 1, batch_size=1)
    with neighbour_triton.use_triton_child_maps(True):
        ms = med(lambda: child_maps.child_neighbour_map(parent_nbr, src))
        got = child_maps.child_neighbour_map(parent_nbr, src)
    equal = torch.equal(got[0], want[0]) and (got[1] is None or torch.equal(got[1], want[1]))
    return {"case": "child map", "voxels": int(fine.shape[0]), "parents": int(coords.shape[0]),
            "triton_ms": ms, "torch_ms": hashed_ms, "equal": equal, "anchor": REFERENCE["child map"]}


@contextlib.contextmanager
def _earlier_c2s(model):
    set_children_only(model, False)
    try:
        yield
    finally:
        set_children_only(model, True)


# baseline name -> (model -> context manager running the decoder on that baseline path)
_BASELINE_PATHS = {
    "mlp_off": lambda model: fused_mlp.use_fused_mlp(False),
    "torch_maps": lambda model: neighbour_triton.use_triton_maps(False),
    "c2s_earlier": _earlier_c2s,
    "wide_rule": lambda model: conv_triton.use_config_rule("wide"),  # BN 256 from 256 output channels on
    "uniform_rule": lambda model: conv_triton.use_config_rule("uniform"),  # child/skip convs with plain configs
    "torch_children": lambda model: neighbour_triton.use_triton_children(False),
    "torch_head": lambda model: fused_norm.use_fused_head(False),
    "half_lookup": lambda model: neighbour_triton.use_half_lookup(True),  # symmetric half map lookup on
    "full_lookup": lambda model: neighbour_triton.use_half_lookup(False),  # ... off
    "child_maps_on": lambda model: neighbour_triton.use_triton_child_maps(True),  # children's maps derived on CUDA
    "child_maps_off": lambda model: child_maps.use_child_maps(False),  # ... hashed, on any device
}
BASELINES = tuple(_BASELINE_PATHS)


def bench_decoder(case, model, device, warmup: int, repeats: int, baselines=BASELINES) -> dict:
    """Forward ms and peak extra GiB of ``model`` on the case, then with each baseline in one process:
    ``mlp_off`` the ConvNeXt tail as PyTorch ops (the path before the fused MLP kernel),
    ``torch_maps`` the PyTorch map build, ``c2s_earlier`` conv1 for all 8 children and the skip added
    after conv2, ``wide_rule`` the BN 256 conv tiles, ``uniform_rule`` the child and skip convs with the
    plain convs' warps and stages (before session 9), ``torch_children`` the subdivision children by
    PyTorch ops, ``torch_head`` the head as LayerNorm then ``addmm``, ``half_lookup`` / ``full_lookup`` the
    hashed maps' lookup, ``child_maps_on`` / ``_off`` the children's maps derived from their parents' on
    CUDA or hashed. ``*_same_coords`` / ``*_rel_err``: whether the
    baseline reached the same voxels and its head's largest difference relative to its largest value
    (a subdivision logit next to zero can flip with other rounding, and the later levels differ)."""
    name, grid, target = case
    coords = sphere_shell_tokens(grid, target, device)
    gen = torch.Generator(device=device).manual_seed(1)
    feats = torch.randn(coords.shape[0], 32, device=device, generator=gen)
    model.set_resolution(grid * 16)

    def fwd():
        return model(SparseTensor(feats, coords, (grid,) * 3, batch_size=1))

    def med(fn):
        times, peak, _ = sample_times(fn, device, warmup, repeats, track_peak=True, empty_cache=True)
        return round(statistics.median(times), 2), None if peak is None else round(peak, 2)

    ms, peak = med(fwd)
    out = fwd()
    row = {"case": name, "tokens": int(coords.shape[0]), "voxels": int(out.coords.shape[0]), "ms": ms,
           "peak_gib": peak, "anchor": REFERENCE[name]}
    for base in baselines:
        with _baseline(model, base):
            row[f"{base}_ms"], row[f"{base}_peak_gib"] = med(fwd)
            ref = fwd()
        row[f"{base}_same_coords"] = same = torch.equal(ref.coords, out.coords)
        row[f"{base}_rel_err"] = float((ref.feats - out.feats).abs().max() / ref.feats.abs().max()) if same else None
        del ref
    return row


def _baseline(model, name: str):
    """The decoder switched to one baseline path inside the block (see :func:`bench_decoder`)."""
    if name not in _BASELINE_PATHS:
        raise ValueError(f"unknown baseline {name!r} (known: {BASELINES})")
    return _BASELINE_PATHS[name](model)


def set_children_only(model, on: bool) -> None:
    """Switch every C2S block of ``model`` between the children-only convs (default) and the earlier path."""
    for m in model.modules():
        if isinstance(m, shape_mod.SparseResBlockC2S3d):
            m.children_only = on


# (BLOCK, WARPS, SLOTS, EAGER): the session-5 default, the default since (16, 4, 8), and with the values
# loaded beside the keys (neighbour_triton.EAGER_VALUES); the default's table at 1/4 and 1/16 load (table
# size alone: 1M voxels give 100 MB of slots at 1/8, beyond the H100's 50 MB L2; 50 MB at 1/4)
LOOKUP_SWEEP = [(4, 4, 4, False), (16, 4, 8, False), (16, 4, 8, True), (32, 4, 8, True), (8, 4, 8, True),
                (16, 8, 8, True), (16, 4, 4, False), (16, 4, 16, False)]


def sweep_maps(device, warmup: int, repeats: int) -> list:
    """Map-build time (map alone) per lookup configuration, at each size."""
    out = []
    saved = (neighbour_triton.BLOCK_LOOKUP, neighbour_triton.LOOKUP_WARPS, neighbour_triton.SLOTS_PER_VOXEL,
             neighbour_triton.LARGE_SLOTS_PER_VOXEL, neighbour_triton.EAGER_VALUES)
    cases = [(n, *shell_coords(n, device)) for _, n in MAP_CASES]
    try:
        for block, warps, slots, eager in LOOKUP_SWEEP:
            neighbour_triton.BLOCK_LOOKUP, neighbour_triton.LOOKUP_WARPS = block, warps
            neighbour_triton.SLOTS_PER_VOXEL = neighbour_triton.LARGE_SLOTS_PER_VOXEL = slots
            neighbour_triton.EAGER_VALUES = eager
            for n, coords, grid in cases:
                ms = statistics.median(sample_times(lambda: conv._build_neighbour_map(coords, (grid,) * 3, 3, 1),
                                                    device, warmup, repeats)[0])
                out.append({"block": block, "warps": warps, "slots": slots, "eager": eager, "voxels": n,
                            "map_ms": round(ms, 3)})
                print(out[-1], flush=True)
    finally:
        (neighbour_triton.BLOCK_LOOKUP, neighbour_triton.LOOKUP_WARPS, neighbour_triton.SLOTS_PER_VOXEL,
         neighbour_triton.LARGE_SLOTS_PER_VOXEL, neighbour_triton.EAGER_VALUES) = saved
    return out


# ConvNeXt widths and row counts of the official decoder's levels at 1024 (20k tokens)
MLP_SWEEP_ROWS = {128: 1_244_000, 256: 350_000, 512: 87_500, 1024: 20_336}


def _cfg_key(cfg) -> str:
    """``tail 128x64x8x2`` (fused tail: BM, BH, warps, stages) or ``fc2 128x256x64x8x3`` (BM, BN, BK, ...)."""
    return ("fc2 " if isinstance(cfg, fused_mlp.Fc2Config) else "tail ") + "x".join(map(str, cfg))


def _parse_key(key: str):
    kind, numbers = key.split()
    return (fused_mlp.Fc2Config if kind == "fc2" else fused_mlp.MlpConfig)(*map(int, numbers.split("x")))


def sweep_mlp(device, warmup: int, repeats: int, tiny: bool = False) -> list:
    """``--mlp-sweep``: the ConvNeXt tail (LayerNorm, MLP, residual; in place) per width: the PyTorch ops
    (``torch_ms``) against each configuration of the defaults (``fused_mlp.MLP_CONFIGS`` / ``FC2_CONFIGS``,
    listed in ``defaults``) and ``fused_mlp.SWEEP_CONFIGS``: ``tail ...`` the whole tail in one kernel,
    ``fc2 ...`` cuBLAS fc1 then the SiLU-GEMM. A configuration the compiler refuses gets its error."""
    out = []
    for C, rows in MLP_SWEEP_ROWS.items():
        rows = 100 if tiny else rows
        block = shape_mod.SparseConvNeXtBlock3d(C).to(device).requires_grad_(False)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        norm, fc1, fc2 = block.norm, block.mlp[0].to(dtype), block.mlp[2].to(dtype)
        h, x = (torch.randn(rows, C, device=device, dtype=dtype) for _ in range(2))

        def med(fn):
            return round(statistics.median(sample_times(fn, device, warmup, repeats)[0]), 3)

        with fused_mlp.use_fused_mlp(False):
            row = {"C": C, "rows": rows, "torch_ms": med(lambda: fused_mlp.convnext_mlp_(h, norm, fc1, fc2, x))}
        defaults = [t[C] for t in (fused_mlp.MLP_CONFIGS, fused_mlp.FC2_CONFIGS) if C in t]
        row["defaults"] = [_cfg_key(c) for c in defaults]
        configs = [] if device.type != "cuda" else defaults + [c for c in fused_mlp.SWEEP_CONFIGS.get(C, ())
                                                              if c not in defaults]
        for cfg in configs:
            if isinstance(cfg, fused_mlp.Fc2Config):
                fn = lambda cfg=cfg: fused_mlp.convnext_mlp_chunks_(h, norm, fc1, fc2, x, fc2_cfg=cfg)  # noqa: E731
            else:
                fn = lambda cfg=cfg: fused_mlp.convnext_mlp_triton(  # noqa: E731
                    h, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias, x, h, cfg)
            try:
                row[_cfg_key(cfg)] = med(fn)
            except Exception as exc:  # noqa: BLE001 - a configuration the compiler refuses is a result too
                row[_cfg_key(cfg)] = f"{type(exc).__name__}: {str(exc)[:80]}"
            if fused_mlp._failed:  # the fc2 form fell back to the PyTorch ops: a failure, and not for the rest
                exc = fused_mlp._failed.pop()
                fused_mlp._failed.clear()
                row[_cfg_key(cfg)] = f"{type(exc).__name__}: {str(exc)[:80]}"
        out.append(row)
        print(row, flush=True)
    return out


def adopt_fastest(mlp_sweep: list, margin: float = 0.97) -> dict:
    """``--mlp-adopt``: set ``fused_mlp.MLP_CONFIGS`` / ``FC2_CONFIGS`` (in place, for the rest of this
    process) to each width's fastest swept configuration where it beats the PyTorch ops by more than
    ``1 - margin``; widths where none does keep the PyTorch ops. Returns the adopted table."""
    tail, fc2 = {}, {}
    for r in mlp_sweep:
        timed = [(v, k) for k, v in r.items() if k.startswith(("tail ", "fc2 ")) and isinstance(v, float)]
        if timed and min(timed)[0] < margin * r["torch_ms"]:
            cfg = _parse_key(min(timed)[1])
            (fc2 if isinstance(cfg, fused_mlp.Fc2Config) else tail)[r["C"]] = cfg
    for table, new in ((fused_mlp.MLP_CONFIGS, tail), (fused_mlp.FC2_CONFIGS, fc2)):
        table.clear()
        table.update(new)
    fused_mlp.set_fused_mlp(True)  # the adopted forms are "ours" from here on
    adopted = {c: _cfg_key(cfg) for c, cfg in sorted({**tail, **fc2}.items())}
    print("MLP configs adopted:", adopted, flush=True)
    return adopted


def categorise(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


def op_times(fn, top: int = 16) -> list:
    """The torch ops of one call of ``fn`` with the most device time of their own (kernels they launched),
    grouped by input shapes: which PyTorch op (and size) each non-Triton kernel belongs to."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages(group_by_input_shape=True):
        us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if us and ev.key.startswith("aten::"):
            rows.append({"op": ev.key, "shapes": str(ev.input_shapes)[:120], "ms": round(us / 1e3, 3), "calls": ev.count})
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def profile_decoder(model, device) -> dict:
    coords = sphere_shell_tokens(64, 20000, device)
    feats = torch.randn(coords.shape[0], 32, device=device)
    model.set_resolution(1024)
    kernels = kernel_times(lambda: model(SparseTensor(feats, coords, (64,) * 3, batch_size=1)), steps=1, warmup=1)
    cats: dict = {}
    for k, v in kernels.items():
        c = categorise(k)
        cats[c] = cats.get(c, [0.0, 0])
        cats[c][0] += v["us"] / 1e3
        cats[c][1] += v["calls"]
    total = sum(v["us"] for v in kernels.values()) / 1e3
    top = sorted(kernels.items(), key=lambda kv: -kv[1]["us"])[:14]
    ops = op_times(lambda: model(SparseTensor(feats, coords, (64,) * 3, batch_size=1)))
    return {"kernel_ms": round(total, 2), "aten_ops": ops,
            "categories": {c: {"ms": round(ms, 2), "launches": int(n)} for c, (ms, n) in
                           sorted(cats.items(), key=lambda kv: -kv[1][0])},
            "top": [{"kernel": k[:100], "ms": round(v["us"] / 1e3, 3), "calls": v["calls"]} for k, v in top]}


def print_table(rows: list, mlp_sweep: list, device: str) -> None:
    """Last lines of the log: each row with its in-run baselines, then the MLP sweep."""
    print(f"\n({device}) ms; peak extra GiB in brackets")
    for r in rows:
        if "triton_ms" in r:
            base = "hashed build" if r["case"] == "child map" else "torch build"
            print(f"{r['case']:<14} ours {r['triton_ms']:.3f}  {base} {r['torch_ms']:.3f}  equal {r['equal']}"
                  f"  | {r['anchor']}")
            continue
        base = "  ".join(f"{b} {r[b + '_ms']} [{r[b + '_peak_gib']}]" for b in BASELINES if b + "_ms" in r)
        print(f"{r['case']:<14} ours {r['ms']} [{r['peak_gib']}]  {base}  | {r['anchor']}")
    for r in mlp_sweep:
        rest = "  ".join(f"{k}{'*' if k in r['defaults'] else ''} {v}" for k, v in r.items()
                         if k not in ("C", "rows", "torch_ms", "defaults"))
        print(f"MLP C={r['C']:<4} rows {r['rows']:>8}  torch {r['torch_ms']}  {rest}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small sizes on the CPU (script check; PyTorch maps only)")
    p.add_argument("--device", default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--parts", default="map,decoder", help="comma list of map,decoder")
    p.add_argument("--profile", action="store_true", help="also the 1024 decoder's kernel time by category")
    p.add_argument("--sweep", action="store_true", help="also sweep the lookup configuration (block, warps, table size)")
    p.add_argument("--mlp-sweep", action="store_true",
                   help="also time the fused ConvNeXt MLP per (rows, hidden slice, warps, stages) against the PyTorch ops")
    p.add_argument("--mlp-adopt", action="store_true",
                   help="with --mlp-sweep: run the decoder rows with each width's fastest swept MLP configuration")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help=f"comma list of the decoder's in-run baselines (of {','.join(BASELINES)}; '' for none)")
    p.add_argument("--enable", default="", help="comma list of kernels that are off by default to switch on for "
                   "the run ('ours'; the torch_* baselines switch them off again): children, head")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    enable = [k for k in args.enable.split(",") if k]
    if set(enable) - {"children", "head"}:
        p.error(f"unknown --enable {enable} (known: children, head)")
    if "children" in enable:
        neighbour_triton.set_triton_children(True)
    if "head" in enable:
        fused_norm.set_fused_head(True)
    device = bench_device(args)
    if device is None:
        return 2
    if args.tiny:
        args.warmup, args.repeats = 0, 1
    parts = args.parts.split(",")
    rows, prof, sweeps = [], None, {}
    if "map" in parts:
        for name, n in MAP_CASES:
            rows.append(bench_map(name, n // 1000 if args.tiny else n, device, args.warmup, args.repeats))
            print(rows[-1], flush=True)
        for bench in (bench_children, bench_child_map):
            rows.append(bench(CHILDREN_PARENTS // 1000 if args.tiny else CHILDREN_PARENTS, device, args.warmup,
                              args.repeats))
            print(rows[-1], flush=True)
    baselines = [b for b in args.baselines.split(",") if b]
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        p.error(f"unknown baselines {unknown} (known: {','.join(BASELINES)})")
    if args.sweep and device.type == "cuda":
        sweeps["maps"] = sweep_maps(device, args.warmup, args.repeats)
    if args.mlp_sweep:
        with torch.no_grad():
            sweeps["mlp"] = sweep_mlp(device, args.warmup, args.repeats, args.tiny)
        if args.mlp_adopt:
            sweeps["mlp_adopted"] = adopt_fastest(sweeps["mlp"])
    if "decoder" in parts or args.profile:
        cfg = dict(shape_mod.TINY_ARGS) if args.tiny else dict(SHAPE_DECODER_FULL)
        model = init_random(FlexiDualGridVaeDecoder(**cfg).to(device))
        model.convert_to(torch.float16 if device.type == "cuda" else torch.float32)
        if "decoder" in parts:
            for case in DECODER_CASES:
                name, grid, target = case
                case = (name, 8, 60) if args.tiny else case
                rows.append(bench_decoder(case, model, device, min(args.warmup, 2), min(args.repeats, 5), baselines))
                print(rows[-1], flush=True)
        if args.profile and device.type == "cuda":
            prof = profile_decoder(model, device)
            print(f"\n== decoder 1024 fp16 kernel time {prof['kernel_ms']} ms by category")
            for c, v in prof["categories"].items():
                print(f"   {c:<26} {v['ms']:8.2f} ms {v['launches']:6d} launches")
            for k in prof["top"]:
                print(f"   {k['ms']:8.3f} ms {k['calls']:6.0f}x  {k['kernel']}")
            print("   torch ops by own device time:")
            for k in prof["aten_ops"]:
                print(f"   {k['ms']:8.3f} ms {k['calls']:6d}x  {k['op']} {k['shapes']}")
    print_table(rows, sweeps.get("mlp", []), device_name(device))
    write_json(args.out, {"device": device_name(device), "torch": torch.__version__, "tiny": args.tiny,
                          "rows": rows, "profile": prof, "sweeps": sweeps,
                          "mlp_configs": {c: _cfg_key(t[c]) for t in (fused_mlp.MLP_CONFIGS, fused_mlp.FC2_CONFIGS)
                                          for c in t}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
