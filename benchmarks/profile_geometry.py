"""Where the 512 geometry pass spends its time: wall clock per sampler step vs GPU kernel time.

    python benchmarks/profile_geometry.py            # GPU, full size (random weights)
    python benchmarks/profile_geometry.py --tiny     # CPU script check
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_geometry import build_pipeline, run_row, sphere_shell  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(pipe, stage_fn, device):
    """Wall seconds between successive sampler callbacks (one per step) and the stage total."""
    marks = []

    def cb(*args):
        _sync(device)
        marks.append(time.perf_counter())

    _sync(device)
    t0 = time.perf_counter()
    stage_fn(cb)
    _sync(device)
    t1 = time.perf_counter()
    steps = [b - a for a, b in zip([t0] + marks[:-1], marks)]
    return steps, t1 - t0, (t1 - marks[-1]) if marks else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    from PIL import Image

    image = Image.new("RGB", (512, 512), (120, 90, 60))
    pipe = build_pipeline(args.tiny, device, False)
    n = 200 if args.tiny else 8192
    run_row(pipe, "512", n, 1, image)  # warm-up
    cond = pipe.get_cond(image, 512)
    coords = sphere_shell(32, n)
    ss = lambda cb: pipe.sample_sparse_structure(cond, resolution=32, seed=0, callback=cb)  # noqa: E731
    sh = lambda cb: pipe.sample_shape_slat(coords, cond, None, "512", seed=0, callback=cb)  # noqa: E731
    for name, fn in (("sparse_structure", ss), ("shape_slat_512", sh)):
        steps, total, tail = step_times(pipe, fn, device)
        print(f"{name}: total {total:.3f} s; per step " + " ".join(f"{1000 * s:.0f}" for s in steps)
              + f" ms; after last step {1000 * tail:.0f} ms", flush=True)
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for name, fn in (("sparse_structure", ss), ("shape_slat_512", sh)):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn(None)
                _sync(device)
            ka = prof.key_averages()
            print(f"\n== {name}: top by self CUDA time")
            print(ka.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
            print(f"== {name}: top by CPU total time")
            print(ka.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
