"""Probe (CUDA): the structure flow's and the shape decoder's first calls in a fresh process, in the
pipeline's order, per warm-up mode (issue 21):

- ``before``: session 6's path (the default before session 9): the flow compiles its kernels as its first forward
  reaches them, the decoder precompiles its variants side by side at its first forward;
- ``first``: no warm-up at load; the flow's first forward compiles its blocks' kernels side by side
  first (``dit.set_block_precompile``, off: measured slower in all than ``load``), the decoder as before;
- ``load``: both warm-ups started at load (``start_kernel_precompile``, one background thread, in
  that order), as ``Trellis2GeometryPipeline`` did on CUDA unless offload (the default in session 9);
- ``early``: as ``load``, and Triton's own start (``sparse.triton_start.start_triton_runtime``: its
  compiler hash and driver utilities) queued before the networks are built, as
  ``Trellis2GeometryPipeline.from_pretrained`` / ``from_comfy_files`` do before reading the weights
  (the default since session 10).

One fresh process: build the sparse-structure flow (bf16) and the shape decoder (fp16), full size,
random weights (the stand-in for loading them), start the warm-ups (``load``); then the structure flow's first
call (B=2 CFG pair, cond 1029), ``--ss-steps`` more of its forwards (what a sampler runs before the
decoder; the shape flow, which sits in between in a real run, is left out: the decoder's warm-up
gets less time to overlap here than in a pipeline), the decoder's first forward (20k tokens ->
1024 grid) and a second one. Every figure is wall time between synchronizes.

    D=$(mktemp -d); for r in cold warm; do for m in before first load early; do TRITON_CACHE_DIR=$D/$m \\
        python benchmarks/probe_first_calls.py --mode $m --out first_${m}_$r.json; done; done
    python benchmarks/probe_first_calls.py --tiny --mode load --out x.json   # CPU script check
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

from _common import SHAPE_DECODER_FULL, default_device, device_name, sync, write_json  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["before", "first", "load", "early"], required=True, help="warm-up mode (see above)")
    p.add_argument("--ss-steps", type=int, default=11, help="structure-flow forwards after its first")
    p.add_argument("--tiny", action="store_true", help="tiny networks on the CPU (script check)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = default_device(None, args.tiny)
    log = {"mode": args.mode, "import_torch_ms": round(1000 * (time.perf_counter() - T0), 1)}
    clock = [time.perf_counter()]

    def stamp(name: str) -> float:
        sync(device)
        now = time.perf_counter()
        log[name] = round(1000 * (now - clock[0]), 1)
        clock[0] = now
        return log[name]

    from bench_shape_decoder import init_random, sphere_shell_tokens
    from bench_trellis2_flows import FULL, TINY, build
    from know3d_core.sparse import SparseTensor
    from know3d_core.trellis2 import shape_decoder as shape_mod
    from know3d_core.trellis2.modules.dit import set_block_precompile
    stamp("import_ours_ms")
    torch.zeros(1, device=device)
    stamp("cuda_init_ms")
    if args.mode == "early":
        from know3d_core.sparse.triton_start import start_triton_runtime
        log["runtime_started"] = start_triton_runtime(device)
    flow = build("ss", TINY if args.tiny else FULL, "float32" if args.tiny else "bfloat16", device)
    stamp("build_flow_ms")
    cfg = dict(shape_mod.TINY_ARGS) if args.tiny else dict(SHAPE_DECODER_FULL)
    decoder = init_random(shape_mod.FlexiDualGridVaeDecoder(**cfg).to(device))
    decoder.convert_to(torch.float16 if device.type == "cuda" else torch.float32)
    stamp("build_decoder_ms")
    if args.mode in ("load", "early"):
        log["started"] = [flow.start_kernel_precompile(device), decoder.start_kernel_precompile(device)]
    elif args.mode == "first":  # off by default until measured: the side-by-side compile at the first forward
        set_block_precompile(True)
    stamp("start_ms")
    gen = torch.Generator(device=device).manual_seed(1)
    lc = 17 if args.tiny else 1029
    x = torch.randn(2, 8, 16, 16, 16, device=device, generator=gen)
    t = torch.full((2,), 700.0, device=device)
    cond = torch.randn(2, lc, flow.cond_channels, device=device, generator=gen)
    grid, target = (12, 150) if args.tiny else (64, 20000)
    coords = sphere_shell_tokens(grid, target, device)
    slat = torch.randn(coords.shape[0], cfg["latent_channels"], device=device, generator=gen)
    decoder.set_resolution(grid * 16)
    stamp("inputs_ms")
    with torch.no_grad():
        flow(x, t, cond)
        stamp("ss_first_ms")
        for _ in range(args.ss_steps):
            flow(x, t, cond)
        stamp("ss_steps_ms")
        flow(x, t, cond)
        stamp("ss_steady_ms")
        for name in ("decoder_first_ms", "decoder_second_ms"):
            decoder(SparseTensor(slat, coords, (grid,) * 3, batch_size=1))
            stamp(name)
    log["from_start_to_decoded_ms"] = round(sum(log[k] for k in ("start_ms", "inputs_ms", "ss_first_ms", "ss_steps_ms",
                                                                 "ss_steady_ms", "decoder_first_ms")), 1)
    log["cache"] = os.environ.get("TRITON_CACHE_DIR")
    print(log, flush=True)
    print(f"({device_name(device)}) warm-up mode {args.mode}: structure flow first {log['ss_first_ms']} ms "
          f"(steady {log['ss_steady_ms']}), {args.ss_steps} more {log['ss_steps_ms']} ms; decoder first "
          f"{log['decoder_first_ms']} ms (second {log['decoder_second_ms']})", flush=True)
    write_json(args.out, {"device": device_name(device), "torch": torch.__version__, "tiny": args.tiny, "log": log})
    return 0


if __name__ == "__main__":
    sys.exit(main())
