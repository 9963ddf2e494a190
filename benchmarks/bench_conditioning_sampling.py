"""Benchmark: image conditioning (preprocess, DINOv3 ViT-L/16 features) and sampler overhead.

Rows:
- ``preprocess``: reference preprocessing of a 2048x1536 RGBA image (CPU, PIL), ms.
- ``dinov3 S dtype``: feature extraction at S = 512 / 1024 (random ViT-L/16 weights, the official
  config), batch 1, fp32 (the reference's precision) and bf16; peak extra memory; for bf16 also
  the deviation from fp32 (max abs error and min per-token cosine similarity of the features).
- ``sampler ...``: one full 12-step official run with a near-free model (``v = 0.1 x``), i.e. the
  sampler's own cost (time grid, CFG mix, x0 rescale, Euler update) per run: dense sparse-structure
  latent ``[1, 8, 16, 16, 16]`` and sparse shape latents ``N x 32`` (N = 8k, 30k), separate and
  batched CFG.

CUDA: CUDA-event timing, median of --repeats after --warmup. CPU (``--tiny``): tiny DINOv3
(hidden 64, 2 layers) at S = 64 / 128, small latents, perf_counter.

    python benchmarks/bench_conditioning_sampling.py --out cond.json          # GPU, full size
    python benchmarks/bench_conditioning_sampling.py --tiny --out cond.json   # CPU check
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import default_device, device_name, median_ms, peak_extra, write_json  # noqa: E402

from know3d_core.conditioning.dinov3 import DINOV3_VITL16_CONFIG, DinoV3FeatureExtractor, prepare_pixels  # noqa: E402
from know3d_core.conditioning.preprocess import preprocess_image  # noqa: E402
from know3d_core.sampling import (  # noqa: E402
    OFFICIAL_SAMPLER_PARAMS,
    FlowEulerGuidanceIntervalSampler,
    dense_cfg_batch,
    sparse_cfg_batch,
)
from know3d_core.sparse import SparseTensor  # noqa: E402


time_ms = functools.partial(median_ms, sync_each=True)  # median ms, a synchronize before every timed call


def peak_mib(device, fn):
    return peak_extra(fn, device, unit=2 ** 20)


def random_dinov3(tiny: bool):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = {k: v for k, v in DINOV3_VITL16_CONFIG.items() if k not in ("model_type", "architectures")}
    if tiny:
        cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1)
    config = DINOv3ViTConfig(**cfg)
    config._attn_implementation = "sdpa"
    return DINOv3ViTModel(config).eval()


def bench_preprocess(rows, args):
    rng = np.random.default_rng(0)
    w, h = (2048, 1536) if not args.tiny else (512, 384)
    arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    arr[:, :, 3] = 0
    arr[h // 5: 4 * h // 5, w // 4: 3 * w // 4, 3] = 255
    img = Image.fromarray(arr, "RGBA")
    ms = time_ms(lambda: preprocess_image(img), torch.device("cpu"), 1, args.repeats)
    rows.append({"name": f"preprocess {w}x{h} RGBA", "ms": ms})


def bench_dinov3(rows, args, device):
    sizes = (64, 128) if args.tiny else (512, 1024)
    model = random_dinov3(args.tiny).to(device)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (600, 600, 3), dtype=np.uint8))
    ref = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ext = DinoV3FeatureExtractor(model.to(dtype), image_size=sizes[0])
        for s in sizes:
            pixels = prepare_pixels(img, s)
            run = lambda: ext.extract_features(pixels)  # noqa: E731
            ms = time_ms(run, device, args.warmup, args.repeats)
            mem = peak_mib(device, run)
            feats = run()
            row = {"name": f"dinov3 {s} {dtype_name}", "ms": ms, "peak_mib": mem, "tokens": feats.shape[1]}
            if dtype_name == "fp32":
                ref[s] = feats
            else:
                row["max_abs_err_vs_fp32"] = (feats - ref[s]).abs().max().item()
                row["min_cos_vs_fp32"] = F.cosine_similarity(feats, ref[s], dim=-1).min().item()
            row["prepare_ms"] = time_ms(lambda: prepare_pixels(img, s), torch.device("cpu"), 1, args.repeats)
            rows.append(row)
    model.to(torch.float32)


def bench_sampler(rows, args, device):
    def dense_model(x, t, cond):
        return 0.1 * x

    def sparse_model(x, t, cond):
        return x.replace(0.1 * x.feats)

    gen = torch.Generator().manual_seed(0)
    ss = FlowEulerGuidanceIntervalSampler(OFFICIAL_SAMPLER_PARAMS["sparse_structure"])
    shape = FlowEulerGuidanceIntervalSampler(OFFICIAL_SAMPLER_PARAMS["shape_slat"])
    res = 8 if args.tiny else 16
    noise = torch.randn(1, 8, res, res, res, generator=gen).to(device)
    cond = torch.zeros(1, 4, 8, device=device)
    for label, kw in (("separate", {}), ("batched", {"batched_model_fn": dense_cfg_batch(dense_model)})):
        ms = time_ms(lambda: ss.sample(dense_model, noise, cond, cond, **kw), device, args.warmup, args.repeats)
        rows.append({"name": f"sampler dense [1,8,{res}^3] {label}", "ms": ms})
    for n in ((500, 2000) if args.tiny else (8000, 30000)):
        coords = torch.cat([torch.zeros(n, 1, dtype=torch.int32), torch.randint(0, 64, (n, 3), generator=gen, dtype=torch.int32)], 1)
        x = SparseTensor(torch.randn(n, 32, generator=gen), coords, (64, 64, 64)).to(device)
        c = torch.zeros(1, 32, device=device)
        for label, kw in (("separate", {}), ("batched", {"batched_model_fn": sparse_cfg_batch(sparse_model)})):
            ms = time_ms(lambda: shape.sample(sparse_model, x, c, c, **kw), device, args.warmup, args.repeats)
            rows.append({"name": f"sampler sparse N={n} {label}", "ms": ms})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (a check that the script runs)")
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    device = default_device(None, args.tiny)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    bench_preprocess(rows, args)
    bench_dinov3(rows, args, device)
    bench_sampler(rows, args, device)

    print(f"device: {device_name(device)}  tiny={args.tiny}")
    print(f"{'name':42s} {'ms':>9s} {'peak MiB':>9s}  extra")
    for r in rows:
        extra = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items() if k not in ("name", "ms", "peak_mib")}
        mem = "" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        print(f"{r['name']:42s} {r['ms']:9.2f} {mem:>9s}  {extra if extra else ''}")
    meta = {"device": str(device), "tiny": args.tiny, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    write_json(args.out, {"meta": meta, "rows": rows}, indent=2)


if __name__ == "__main__":
    main()
