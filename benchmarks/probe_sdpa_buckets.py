"""Probe (CUDA): can padded token counts reuse one cuDNN attention plan, and at what cost?

torch's cuDNN attention builds an execution plan per (batch, q length, kv length, bias layout); the
plan cache is thread-local and keyed by shape, so every new sparse token count costs a build
(~60-80 ms measured). This probe pads the token count to a bucket and hides the padded keys:

* ``mask``: boolean key mask ``[B or 1, 1, 1, Lb]`` (broadcast over queries);
* ``bias``: the same as an additive float bias (0 / -inf) in the q/k dtype;
* ``bias_full``: float bias materialised ``[1, 1, Lb, Lb]`` (memory heavy; small L only).

For each it reports whether SDPA accepted it with only the cuDNN backend allowed, the first-call
time for a fresh shape, the first-call time for a second token count that pads to the same bucket
(plan reused?), the steady time, and the max error on real rows against unpadded attention.

    python benchmarks/probe_sdpa_buckets.py --out probe.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import wall_ms as _wall_ms, write_json  # noqa: E402

CUDA = torch.device("cuda")


def wall_ms(fn) -> float:
    return _wall_ms(fn, CUDA)


def steady_ms(fn, n=10) -> float:
    """Mean ms of ``n`` back-to-back calls between two CUDA events (one warm-up call first)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def qkv(B, Lq, Lk, H=12, D=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, Lq, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(B, H, Lk, D, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(B, H, Lk, D, device="cuda", generator=g, dtype=torch.bfloat16)
    return q, k, v


def pad_to(x, L, dim=2):
    if x.shape[dim] == L:
        return x
    shape = list(x.shape)
    shape[dim] = L - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def make_mask(kind, B, L, Lb, dtype):
    keep = torch.arange(Lb, device="cuda") < L
    if kind == "mask":
        return keep.view(1, 1, 1, Lb)
    bias = torch.zeros(Lb, device="cuda", dtype=dtype).masked_fill(~keep, float("-inf")).view(1, 1, 1, Lb)
    if kind == "bias":
        return bias
    if kind == "bias_full":
        return bias.expand(1, 1, Lb, Lb).contiguous()
    if kind == "bias_expand":
        return bias.expand(1, 1, Lb, Lb)
    raise ValueError(kind)


def probe(kind, B, L1, L2, bucket, cross_len=None):
    """Pad L1 and L2 (same bucket) and run cuDNN-only SDPA; cross_len: keys of fixed length (no mask)."""
    Lb = bucket * math.ceil(L1 / bucket)
    assert Lb == bucket * math.ceil(L2 / bucket)
    row = {"kind": kind, "B": B, "L1": L1, "L2": L2, "Lb": Lb, "cross": cross_len}
    try:
        for tag, L, seed in (("first", L1, 1), ("second", L2, 2)):
            Lk = cross_len or L
            q, k, v = qkv(B, L, Lk, seed=seed)
            qp = pad_to(q, Lb)
            kp, vp = (k, v) if cross_len else (pad_to(k, Lb), pad_to(v, Lb))
            m = None if (cross_len or kind == "none") else make_mask(kind, B, L, Lb, q.dtype)

            def run():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=m)

            row[f"{tag}_ms"] = round(wall_ms(run), 2)
            if tag == "first":
                out = run()[:, :, :L].float()
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    ref = F.scaled_dot_product_attention(q, k, v).float()
                with sdpa_kernel([SDPBackend.MATH]):
                    ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
                row["err_vs_unpadded"] = float((out - ref).abs().max())
                row["err_vs_fp64"] = float((out - ref64).abs().max())
                row["err_unpadded_vs_fp64"] = float((ref - ref64).abs().max())
                row["steady_ms"] = round(steady_ms(run), 3)

                def run_unpadded():
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        return F.scaled_dot_product_attention(q, k, v)
                row["unpadded_steady_ms"] = round(steady_ms(run_unpadded), 3)
    except Exception as exc:  # noqa: BLE001 - a probe: report what failed
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    print(json.dumps(row), flush=True)
    return row


def probe_ragged(B, L1, L2, bucket):
    """cuDNN padding-mask path (packed [T, H, D] + cumulative lengths), max lengths rounded up to a
    bucket: is the plan reused across token counts, and what does a call cost?"""
    Lb = bucket * math.ceil(L1 / bucket)
    row = {"kind": "ragged_cudnn", "B": B, "L1": L1, "L2": L2, "Lb": Lb}
    try:
        for tag, L, seed in (("first", L1, 1), ("second", L2, 2), ("third", L1 + 1, 3)):
            q, k, v = qkv(B, L, L, seed=seed)
            qp, kp, vp = (t.transpose(1, 2).reshape(B * L, 12, 128) for t in (q, k, v))
            cum = torch.arange(0, B + 1, device="cuda", dtype=torch.int32) * L

            def run():
                return torch.ops.aten._cudnn_attention_forward(qp, kp, vp, None, cum, cum, Lb, Lb, False, 0.0, False, False)[0]

            row[f"{tag}_ms"] = round(wall_ms(run), 2)
            if tag == "first":
                out = run().view(B, L, 12, 128).transpose(1, 2).float()
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    ref = F.scaled_dot_product_attention(q, k, v).float()
                row["err_vs_dense"] = float((out - ref).abs().max())
                row["steady_ms"] = round(steady_ms(run), 3)
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    row["dense_steady_ms"] = round(steady_ms(lambda: F.scaled_dot_product_attention(q, k, v)), 3)
                t0 = time.perf_counter()
                for _ in range(20):
                    run()
                row["host_ms_per_call"] = round(1000 * (time.perf_counter() - t0) / 20, 3)
                torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
    print(json.dumps(row), flush=True)
    return row


def main():
    if not torch.cuda.is_available():
        print("this probe measures CUDA libraries (cuDNN plans, Triton compiles): it needs a GPU", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--ragged-only", action="store_true")
    args = p.parse_args()
    print(torch.__version__, torch.backends.cudnn.version(), torch.cuda.get_device_name(), flush=True)
    # load cuDNN + a first plan so the first rows measure plan builds only
    q, k, v = qkv(1, 1000, 1000)
    print("first cuDNN SDPA in process:", round(wall_ms(lambda: F.scaled_dot_product_attention(q, k, v)), 1), "ms")
    rows = []
    for B, L1, L2, b in ((2, 8030, 8138, 512), (1, 8017, 8121, 512), (1, 20000, 20300, 1024), (2, 20000, 20300, 1024), (1, 40000, 40500, 1024)):
        rows.append(probe_ragged(B, L1, L2, b))
    for B in ((2, 1) if not args.ragged_only else ()):
        rows.append(probe("none", B, 8191 - 7 * B, 8191 - 7 * B, 8191 - 7 * B))  # unpadded new shape: plan cost
        for kind in ("mask", "bias", "bias_expand"):
            rows.append(probe(kind, B, 8000 + 13 * B + len(kind), 8100 + 17 * B + len(kind), 512))
        rows.append(probe("bias_full", B, 4000 + B, 4050 + B, 512))
        rows.append(probe("none", B, 8300 + B, 8400 + B, 512, cross_len=1029))  # query padding only
    if not args.ragged_only:
        for kind in ("mask", "bias"):
            rows.append(probe(kind, 1, 20000, 20300, 1024))
            rows.append(probe(kind, 1, 40000, 40500, 1024))
        rows.append(probe("none", 1, 20011, 20011, 20011))
        rows.append(probe("none", 1, 40011, 40011, 40011))
    write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
