"""Benchmark (issue 21): ours beside the TRELLIS.2 reference with FlexGEMM, one process, same weights
and inputs: the neighbour structure of a new coordinate set, and the shape decoder network.

Rows:
- ``map N=200k`` / ``map N=1M`` (voxels of a one-voxel spherical shell, as every decoder level):
  ``ours_map_ms`` our hash-table map alone, ``ours_cache_ms`` map + tile layout (what our conv needs
  before its first launch on new coords); ``ref_map_ms`` FlexGEMM's hash-table build alone,
  ``ref_cache_ms`` its whole neighbour cache for the masked implicit GEMM (build + its sort/gray-code
  post-process); ``*_conv_cold_minus_warm_ms`` one 64->64 fp16 conv on new coords minus the same conv
  with its map cached (issue 21's measure). ``same_map``: identical ``[N, 27]`` maps (missing = -1).
- ``decoder 512`` / ``decoder 1024``: the official shape decoder network (full size, fp16, random
  weights loaded into both with ``strict=True``) on ~8k / ~20k sphere-shell tokens: ours ``forward``
  against the reference's ``SparseUnetVaeDecoder.forward`` (the network; no mesh step). ms (median),
  peak extra GiB, the reference's first call (FlexGEMM autotunes there), ``same_coords`` and the head's
  largest difference relative to its largest value.

Needs a checkout of microsoft/TRELLIS.2 (``--trellis2``) and FlexGEMM importable with its CUDA
extension built (``python setup.py build_ext --inplace`` in its checkout on the GPU machine; put the
checkout on ``PYTHONPATH``). ``cumesh`` and ``o_voxel`` are stubbed: the decoder network never calls them.

    python benchmarks/bench_vs_reference.py --trellis2 /path/TRELLIS.2 --out ref.json       # GPU
    python benchmarks/bench_vs_reference.py --trellis2 /path/TRELLIS.2 --tiny --out x.json  # CPU check

``--tiny`` (CPU script check): tiny decoder, FlexGEMM's conv replaced by its dense equivalent
(``make_encoder_goldens.import_reference``); decoder rows only, which must give the same coords.
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

from _common import (SHAPE_DECODER_FULL, bench_device, device_name, kernel_times, sample_times, wall_ms,  # noqa: E402
                     write_json)
from bench_neighbour_map import DECODER_CASES, MAP_CASES, shell_coords  # noqa: E402
from bench_shape_decoder import init_random, sphere_shell_tokens  # noqa: E402

from know3d_core.sparse import SparseTensor, conv, neighbour_triton, triton_launch  # noqa: E402
from know3d_core.trellis2 import shape_decoder as shape_mod  # noqa: E402

CONV_CHANNELS = 64


def import_reference(src: str, dense: bool):
    """``(reference FlexiDualGridVaeDecoder class, trellis2.modules.sparse)`` from the checkout ``src``.
    ``dense``: FlexGEMM's conv by its dense equivalent (CPU); else the real ``flex_gemm`` package."""
    if dense:
        from make_encoder_goldens import import_reference as import_with_dense_conv
        import_with_dense_conv(src)
    else:
        import flex_gemm.kernels.cuda  # noqa: F401 - fail here, before any slow work, when it is not built
        from make_encoder_goldens import install_reference_package
        install_reference_package(src)
    from trellis2.models.sc_vaes.fdg_vae import FlexiDualGridVaeDecoder
    import trellis2.modules.sparse as sp
    return FlexiDualGridVaeDecoder, sp


def _flex_cache(coords: torch.Tensor, grid: int, channels: int):
    """FlexGEMM's whole neighbour cache for a 3x3x3 submanifold conv (inference: no backward parts)."""
    from flex_gemm.ops.spconv.submanifold_conv3d import SubMConv3dFunction
    return SubMConv3dFunction._compute_neighbor_cache(coords, torch.Size([1, channels, grid, grid, grid]),
                                                      (3, 3, 3), (1, 1, 1), False)


def _flex_map(coords: torch.Tensor, grid: int) -> torch.Tensor:
    """FlexGEMM's hash-table build alone: ``[N, 27]`` uint32, 0xFFFFFFFF where no neighbour."""
    from flex_gemm import kernels
    from flex_gemm.ops import spconv, utils
    keys, vals = utils.init_hashmap(torch.Size([1, CONV_CHANNELS, grid, grid, grid]),
                                    int(spconv.HASHMAP_RATIO * coords.shape[0]), coords.device)
    return kernels.cuda.hashmap_build_submanifold_conv_neighbour_map(keys, vals, coords, grid, grid, grid,
                                                                     3, 3, 3, 1, 1, 1)


# Map-build variants of ours timed beside the default (neighbour_triton's module settings; A/B runs):
# the full lookup (26 probes a voxel); the symmetric half lookup (13 probes + mirror writes) with int32
# keys packed with the row into int64 slots at 4 (its default) / 8 table slots a voxel, with separate int64
# keys and int32 rows, with 64 (voxel, offset) lanes a program in 2 warps, its insert with 256 voxels a
# program in 4 warps (its default: 32 in 1), and with the map's fill as its own kernel before the insert.
MAP_VARIANTS = {"full": {"half": False}, "half": {"half": True},
                "half_s8": {"half": True, "HALF_SLOTS_PER_VOXEL": 8},
                "half_unpacked": {"half": True, "PACKED_TABLE": False},
                "half_b64_w2": {"half": True, "HALF_BLOCK": 64, "HALF_WARPS": 2},
                "half_i256_w4": {"half": True, "HALF_INSERT_BLOCK": 256, "HALF_INSERT_WARPS": 4},
                "half_fill_before": {"half": True, "HALF_FILL_IN_INSERT": False},
                "half_bits_in_lookup": {"half": True, "HALF_BITS_IN_LOOKUP": True},
                "jit_launches": {"half": True, "direct": False}}  # Triton's JIT dispatch at every launch


@contextlib.contextmanager
def map_variant(settings: dict):
    """``neighbour_triton``'s settings changed inside the block only (``half``: :func:`use_half_lookup`;
    ``direct``: ``triton_launch.use_direct_launches``; other keys: module constants)."""
    settings = dict(settings)
    half = settings.pop("half", None)
    direct = settings.pop("direct", None)
    saved = {k: getattr(neighbour_triton, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(neighbour_triton, k, v)
        with neighbour_triton.use_half_lookup(half) if half is not None else contextlib.nullcontext(), \
                triton_launch.use_direct_launches(direct) if direct is not None else contextlib.nullcontext():
            yield
    finally:
        for k, v in saved.items():
            setattr(neighbour_triton, k, v)


def _ours_map_figures(coords, shape, conv_args, ref_map, med) -> dict:
    """Ours with the current settings: map alone, map + tile layout, conv cold minus warm, same map."""
    feats, w, b = conv_args
    warm_x = SparseTensor(feats, coords, shape, batch_size=1)
    conv.submanifold_conv3d(warm_x, w, b)
    cold = med(lambda: conv.submanifold_conv3d(SparseTensor(feats, coords, shape, batch_size=1), w, b))
    warm = med(lambda: conv.submanifold_conv3d(warm_x, w, b))
    nbr = conv._build_neighbour_map(coords, shape, 3, 1, batch_size=1)[0]
    nbr = torch.where(nbr < coords.shape[0], nbr.long(), -1)
    build = lambda: conv._build_neighbour_map(coords, shape, 3, 1, batch_size=1)  # noqa: E731
    return {"map_ms": med(build), "map_kernels_us": _kernel_us(build),
            "cache_ms": med(lambda: _ours_cache(coords, shape)), "conv_warm_ms": warm,
            "conv_cold_minus_warm_ms": round(cold - warm, 3), "same_map": torch.equal(nbr, ref_map),
            "neighbours": int((nbr >= 0).sum())}


def _kernel_us(fn) -> dict:
    """``{kernel: device us per call}`` of ``fn`` (torch.profiler; where a build's time goes)."""
    return {k: round(v["us"], 1) for k, v in sorted(kernel_times(fn).items(), key=lambda kv: -kv[1]["us"])}


def bench_map(name: str, n: int, device, warmup: int, repeats: int, variants=tuple(MAP_VARIANTS)) -> dict:
    """One map row (see the module docstring); ``variants``: ours with each of these :data:`MAP_VARIANTS`."""
    from flex_gemm.ops.spconv import sparse_submanifold_conv3d
    coords, grid = shell_coords(n, device)
    coords = coords.contiguous()
    shape = (grid,) * 3

    def med(fn):
        return round(statistics.median(sample_times(fn, device, warmup, repeats)[0]), 3)

    gen = torch.Generator(device=device).manual_seed(3)
    feats = torch.randn(coords.shape[0], CONV_CHANNELS, device=device, dtype=torch.float16, generator=gen)
    w = torch.randn(CONV_CHANNELS, 3, 3, 3, CONV_CHANNELS, device=device, dtype=torch.float16, generator=gen) * 0.03
    b = torch.zeros(CONV_CHANNELS, device=device, dtype=torch.float16)
    size = torch.Size([1, CONV_CHANNELS, grid, grid, grid])
    ref_map = _flex_map(coords, grid).view(torch.int32).long()
    _, cache = sparse_submanifold_conv3d(feats, coords, size, w, b, None)
    ref_cold = med(lambda: sparse_submanifold_conv3d(feats, coords, size, w, b, None))
    ref_warm = med(lambda: sparse_submanifold_conv3d(feats, coords, size, w, b, cache))
    row = {"case": name, "voxels": int(coords.shape[0]), "grid": grid,
           "ref_map_ms": med(lambda: _flex_map(coords, grid)),
           "ref_map_kernels_us": _kernel_us(lambda: _flex_map(coords, grid)),
           "ref_cache_ms": med(lambda: _flex_cache(coords, grid, CONV_CHANNELS)),
           "ref_conv_warm_ms": ref_warm, "ref_conv_cold_minus_warm_ms": round(ref_cold - ref_warm, 3),
           "neighbours_ref": int((ref_map >= 0).sum())}
    ours = _ours_map_figures(coords, shape, (feats, w, b), ref_map, med)
    row.update({f"ours_{k}" if k != "same_map" else k: v for k, v in ours.items()})
    row["variants"] = {}
    for vname in variants:
        with map_variant(MAP_VARIANTS[vname]):
            row["variants"][vname] = _ours_map_figures(coords, shape, (feats, w, b), ref_map, med)
    out_ours = conv.submanifold_conv3d(SparseTensor(feats, coords, shape, batch_size=1), w, b).feats.float()
    out_ref = sparse_submanifold_conv3d(feats, coords, size, w, b, cache)[0].float()
    row["conv_rel_err"] = float((out_ours - out_ref).abs().max() / out_ref.abs().max())
    return row


def _ours_cache(coords: torch.Tensor, shape: tuple):
    nbr, bits = conv._build_neighbour_map(coords, shape, 3, 1, batch_size=1)
    return conv.NeighbourMap(nbr, 3, 1, bits).tile_layout(128)


def build_pair(Ref, cfg: dict, device, half: bool):
    """``(ours, reference)`` decoders with the same random weights (ours' loaded into the reference)."""
    ours = init_random(shape_mod.FlexiDualGridVaeDecoder(**cfg).to(device))
    ours.convert_to(torch.float16 if half else torch.float32)
    ref = Ref(**{**cfg, "use_fp16": half}).to(device).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def bench_decoder(case, ours, ref, sp, device, warmup: int, repeats: int) -> dict:
    """One decoder row (see the module docstring)."""
    from trellis2.models.sc_vaes.sparse_unet_vae import SparseUnetVaeDecoder
    name, grid, target = case
    coords = sphere_shell_tokens(grid, target, device)
    gen = torch.Generator(device=device).manual_seed(1)
    feats = torch.randn(coords.shape[0], 32, device=device, generator=gen)
    ours.set_resolution(grid * 16)
    ref.set_resolution(grid * 16)

    def run_ours():
        return ours(SparseTensor(feats, coords, (grid,) * 3, batch_size=1))

    def run_ref():
        return SparseUnetVaeDecoder.forward(ref, sp.SparseTensor(feats, coords))

    row = {"case": name, "tokens": int(coords.shape[0])}
    with torch.no_grad():
        row["ref_first_ms"] = round(wall_ms(run_ref, device), 1)
        row["ours_first_ms"] = round(wall_ms(run_ours, device), 1)
        for who, fn in (("ours", run_ours), ("ref", run_ref)):
            times, peak, _ = sample_times(fn, device, warmup, repeats, track_peak=True, empty_cache=True)
            row[f"{who}_ms"] = round(statistics.median(times), 2)
            row[f"{who}_peak_gib"] = None if peak is None else round(peak, 2)
        with map_variant(MAP_VARIANTS["half"]):
            run_ours()
            times, peak, _ = sample_times(run_ours, device, warmup, repeats, track_peak=True, empty_cache=True)
            row["ours_half_ms"] = round(statistics.median(times), 2)
        a, b = run_ours(), run_ref()
    a_coords, b_coords = a.coords.long(), b.coords.long()
    order_a, order_b = _row_order(a_coords), _row_order(b_coords)
    row["voxels"], row["ref_voxels"] = int(a_coords.shape[0]), int(b_coords.shape[0])
    row["same_coords"] = same = torch.equal(a_coords[order_a], b_coords[order_b])
    row["coords_iou"] = _iou(a_coords, b_coords)
    if same:
        fa, fb = a.feats.float()[order_a], b.feats.float()[order_b]
        row["rel_err"] = float((fa - fb).abs().max() / fb.abs().max())
    row["ratio"] = round(row["ours_ms"] / row["ref_ms"], 3)
    return row


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two ``[N, 4]`` voxel sets (fp16 rounding can flip a subdivision
    logit next to zero: the implementations then reach slightly different voxels)."""
    scale = int(max(a[:, 1:].max(), b[:, 1:].max())) + 1
    key = lambda c: ((c[:, 0] * scale + c[:, 1]) * scale + c[:, 2]) * scale + c[:, 3]  # noqa: E731
    ka, kb = key(a), key(b)
    inter = int(torch.isin(ka, kb).sum())
    return round(inter / (ka.numel() + kb.numel() - inter), 6)


def _row_order(coords: torch.Tensor) -> torch.Tensor:
    """Rows sorted by (b, x, y, z): the two implementations may list voxels in different orders."""
    key = coords[:, 0]
    for d in range(1, 4):
        key = key * (int(coords[:, d].max()) + 1) + coords[:, d]
    return torch.argsort(key)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trellis2", required=True, help="a checkout of microsoft/TRELLIS.2 (its trellis2/ package)")
    p.add_argument("--tiny", action="store_true", help="CPU script check (dense conv stand-in; decoder rows only)")
    p.add_argument("--device", default=None)
    p.add_argument("--parts", default="map,decoder", help="comma list of map,decoder")
    p.add_argument("--variants", default=",".join(MAP_VARIANTS), help="comma list of MAP_VARIANTS timed in map rows")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(MAP_VARIANTS))
    if unknown:
        p.error(f"unknown --variants {unknown} (known: {', '.join(MAP_VARIANTS)})")
    if not os.path.isdir(os.path.join(args.trellis2, "trellis2")):
        p.error(f"--trellis2 {args.trellis2}: no trellis2/ package there (give a checkout of microsoft/TRELLIS.2)")
    device = bench_device(args)
    if device is None:
        return 2
    Ref, sp = import_reference(args.trellis2, dense=args.tiny)
    parts = args.parts.split(",")
    rows = []
    if "map" in parts and not args.tiny:
        for name, n in MAP_CASES:
            rows.append(bench_map(name, n, device, args.warmup + 1, args.repeats + 3, variants))
            print(rows[-1], flush=True)
    if "decoder" in parts:
        cfg = dict(shape_mod.TINY_ARGS) if args.tiny else dict(SHAPE_DECODER_FULL)
        cfg.pop("use_fp16", None)
        ours, ref = build_pair(Ref, cfg, device, half=device.type == "cuda")
        for case in DECODER_CASES:
            case = (case[0], 8, 60) if args.tiny else case
            rows.append(bench_decoder(case, ours, ref, sp, device, 0 if args.tiny else args.warmup,
                                      1 if args.tiny else args.repeats))
            print(rows[-1], flush=True)
    print(f"\n({device_name(device)}) ours beside the TRELLIS.2 reference (FlexGEMM), ms")
    for r in rows:
        if "ref_map_ms" in r:
            print(f"{r['case']:<13} map {r['ours_map_ms']} vs {r['ref_map_ms']}; cache {r['ours_cache_ms']} vs "
                  f"{r['ref_cache_ms']}; conv cold-warm {r['ours_conv_cold_minus_warm_ms']} vs "
                  f"{r['ref_conv_cold_minus_warm_ms']} (warm conv {r['ours_conv_warm_ms']} vs "
                  f"{r['ref_conv_warm_ms']}); "
                  f"same map {r['same_map']}")
            print(f"   FlexGEMM map kernels (us): {r['ref_map_kernels_us']}")
            for vname, v in r["variants"].items():
                print(f"   ours {vname:<13} map {v['map_ms']} cache {v['cache_ms']} conv cold-warm "
                      f"{v['conv_cold_minus_warm_ms']} same map {v['same_map']}; kernels (us) {v['map_kernels_us']}")
        else:
            print(f"{r['case']:<13} ours {r['ours_ms']} [{r['ours_peak_gib']} GiB] vs ref {r['ref_ms']} "
                  f"[{r['ref_peak_gib']} GiB]: x{r['ratio']}; ref first call {r['ref_first_ms']}; "
                  f"same coords {r['same_coords']} (IoU {r['coords_iou']}), rel err {r.get('rel_err')}; ours with "
                  f"the half map lookup {r['ours_half_ms']}")
    write_json(args.out, {"device": device_name(device), "torch": torch.__version__, "tiny": args.tiny,
                          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
