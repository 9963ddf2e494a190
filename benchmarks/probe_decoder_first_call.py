"""Probe (CUDA): where the shape decoder's first call in a fresh process spends its time (issue 21).

One fresh process: the official decoder (fp16, random weights) on the GPU, then one piece at a time,
each timed to a synchronize: the first cuBLAS matmul, every precompile job of
``FlexiDualGridVaeDecoder._kernel_jobs`` one after another (with an empty ``TRITON_CACHE_DIR``:
each kernel variant's compile; with the cache on disk: its load), the first 1024 forward after
them (what is left: map builds, allocator growth, PyTorch's lazily loaded kernels) and a second one.
Run it twice with the same new cache directory: the first run shows the compiles, the second the loads.

    D=$(mktemp -d); for r in cold warm; do TRITON_CACHE_DIR=$D python benchmarks/probe_decoder_first_call.py \\
        --out first_$r.json; done
    python benchmarks/probe_decoder_first_call.py --tiny --out x.json   # CPU script check (no jobs)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

T0 = time.perf_counter()
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import SHAPE_DECODER_FULL, default_device, device_name, write_json  # noqa: E402


def describe(job) -> str:
    """A precompile job as ``lambda: shapes/config of its bound arguments``."""
    parts = []
    for d in job.__defaults__ or ():
        if isinstance(d, torch.Tensor):
            parts.append("x".join(map(str, d.shape)))
        elif isinstance(d, torch.nn.Module):
            parts.append(type(d).__name__)
        elif (isinstance(d, tuple) and hasattr(d, "_fields")) or hasattr(d, "__dataclass_fields__"):
            parts.append(repr(d))  # a kernel configuration
    return f"{job.__code__.co_filename.rsplit('/', 1)[-1]}:{job.__code__.co_firstlineno} " + " ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny decoder on the CPU (script check)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = default_device(None, args.tiny)
    log = {"import_torch_ms": round(1000 * (time.perf_counter() - T0), 1)}
    clock = [time.perf_counter()]

    def stamp(name: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        ms = round(1000 * (now - clock[0]), 1)
        log[name] = ms
        clock[0] = now
        return ms

    from bench_shape_decoder import init_random, sphere_shell_tokens
    from know3d_core.sparse import SparseTensor
    from know3d_core.trellis2 import shape_decoder as shape_mod
    stamp("import_ours_ms")
    torch.zeros(1, device=device)
    stamp("cuda_init_ms")
    cfg = dict(shape_mod.TINY_ARGS) if args.tiny else dict(SHAPE_DECODER_FULL)
    model = init_random(shape_mod.FlexiDualGridVaeDecoder(**cfg).to(device))
    model.convert_to(torch.float16 if device.type == "cuda" else torch.float32)
    stamp("model_ms")
    a = torch.randn(256, 256, device=device, dtype=model.dtype)
    a @ a
    stamp("first_matmul_ms")
    jobs = []
    with torch.no_grad():
        for job in model._kernel_jobs(device):
            start = time.perf_counter()
            job()
            if device.type == "cuda":
                torch.cuda.synchronize()
            jobs.append({"job": describe(job), "ms": round(1000 * (time.perf_counter() - start), 1)})
            print(jobs[-1], flush=True)
    stamp("jobs_total_ms")
    model._warmup.mark_done(model._warmup_key(device))  # the jobs above were the precompile
    grid, target = (8, 60) if args.tiny else (64, 20000)
    coords = sphere_shell_tokens(grid, target, device)
    feats = torch.randn(coords.shape[0], 32, device=device)
    model.set_resolution(grid * 16)
    stamp("inputs_ms")
    for name in ("first_forward_ms", "second_forward_ms"):
        model(SparseTensor(feats, coords, (grid,) * 3, batch_size=1))
        stamp(name)
    log["cache"] = os.environ.get("TRITON_CACHE_DIR")
    print({k: v for k, v in log.items()}, flush=True)
    print(f"({device_name(device)}) jobs {log['jobs_total_ms']} ms one after another ({len(jobs)}), slowest "
          f"{max([j['ms'] for j in jobs], default=0)} ms; first forward after them {log['first_forward_ms']} ms, "
          f"second {log['second_forward_ms']} ms; first matmul {log['first_matmul_ms']} ms", flush=True)
    write_json(args.out, {"device": device_name(device), "torch": torch.__version__, "tiny": args.tiny,
                          "log": log, "jobs": jobs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
