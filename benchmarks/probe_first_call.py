"""Probe (CUDA): where the first sparse-structure flow forward of a fresh process spends its time.

``--mode steps``: one piece at a time after the weights are on the GPU (cuBLAS matmul, first cuDNN
attention, each Triton kernel's compile, the first forward, the second forward).
``--mode direct``: the first forward straight after the weights (what bench_trellis2_flows reports).
``--mode thread``: both Triton kernels compile in a thread while the weights are built.
Each mode must run in a fresh process with an empty ``TRITON_CACHE_DIR`` to see cold costs.

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/probe_first_call.py --mode steps
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

T0 = time.perf_counter()
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def stamp(log: dict, name: str, t_prev: list) -> None:
    torch.cuda.synchronize()
    now = time.perf_counter()
    log[name] = round(1000 * (now - t_prev[0]), 1)
    t_prev[0] = now


def compile_flow_kernels(fused, tokens: int) -> None:
    """Run both flow Triton kernels once (bf16, 1536 wide, 12 heads of 128) on ``tokens`` rows."""
    h = torch.randn(1, tokens, 1536, device="cuda", dtype=torch.bfloat16)
    mul = torch.randn(1, 1536, device="cuda", dtype=torch.bfloat16)
    fused.residual_layer_norm_modulate(h, h, mul, mul, mul, 1e-6)
    compile_qk_kernel(fused, tokens)


def compile_qk_kernel(fused, tokens: int) -> None:
    qh = torch.randn(1, tokens, 12, 128, device="cuda", dtype=torch.bfloat16)
    g = torch.ones(12, 128, device="cuda")
    rope = torch.polar(torch.ones(tokens, 64, device="cuda"), torch.zeros(tokens, 64, device="cuda"))
    fused.qk_norm_rope_pair(qh, qh, g, g, rope, 1e-6)


def main() -> int:
    if not torch.cuda.is_available():
        print("this probe measures CUDA libraries (cuDNN plans, Triton compiles): it needs a GPU", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["steps", "direct", "thread"], default="steps")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    log = {"mode": args.mode, "import_torch_ms": round(1000 * (time.perf_counter() - T0), 1)}
    t = [time.perf_counter()]
    torch.zeros(1, device="cuda")
    stamp(log, "cuda_init_ms", t)
    from _common import write_json  # noqa: E402
    from bench_trellis2_flows import FULL, build  # noqa: E402
    import know3d_core.trellis2.modules.fused as fused  # noqa: E402
    stamp(log, "import_ours_ms", t)
    if args.mode == "thread":  # compile the Triton kernels in a thread while the weights are built
        import threading
        done = {}

        def compile_kernels():
            t0 = time.perf_counter()
            compile_flow_kernels(fused, 64)
            torch.cuda.synchronize()
            done["compile_in_thread_ms"] = round(1000 * (time.perf_counter() - t0), 1)

        th = threading.Thread(target=compile_kernels)
        th.start()
    model = build("ss", FULL, "bfloat16", torch.device("cuda"))
    stamp(log, "weights_ms", t)
    if args.mode == "thread":
        th.join()
        stamp(log, "join_ms", t)
        log.update(done)
    x = torch.randn(1, 8, 16, 16, 16, device="cuda")
    cond = torch.randn(1, 1029, 1024, device="cuda")
    tt = torch.full((1,), 700.0, device="cuda")
    if args.mode == "steps":
        a = torch.randn(4096, 1536, device="cuda", dtype=torch.bfloat16)
        a @ a.T[:, :1536]
        stamp(log, "first_cublas_matmul_ms", t)
        q = torch.randn(1, 12, 4096, 128, device="cuda", dtype=torch.bfloat16)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        stamp(log, "first_sdpa_4096_ms", t)
        kv = torch.randn(1, 12, 1029, 128, device="cuda", dtype=torch.bfloat16)
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv)
        stamp(log, "second_sdpa_shape_ms", t)
        from triton.runtime import driver
        driver.active.utils.get_device_properties(0)
        stamp(log, "triton_driver_init_ms", t)
        h = torch.randn(1, 4096, 1536, device="cuda", dtype=torch.bfloat16)
        mul = torch.randn(1, 1536, device="cuda", dtype=torch.bfloat16)
        fused.residual_layer_norm_modulate(h, h, mul, mul, mul, 1e-6)
        stamp(log, "triton_residual_ln_compile_ms", t)
        compile_qk_kernel(fused, 4096)
        stamp(log, "triton_qk_norm_rope_compile_ms", t)
    with torch.no_grad():
        model(x, tt, cond)
        stamp(log, "first_forward_ms", t)
        model(x, tt, cond)
        stamp(log, "second_forward_ms", t)
    log["total_ms"] = round(1000 * (time.perf_counter() - T0), 1)
    print(json.dumps(log), flush=True)
    write_json(args.out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
