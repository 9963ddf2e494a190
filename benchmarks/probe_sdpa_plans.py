"""Probe (CUDA): what a new sparse token count costs each SDPA backend at the shape flow's shapes.

A new object gives the shape flow a new token count N; torch's cuDNN attention then builds a plan
for every new (batch, q length, kv length) before its first call (~60-80 ms each), which the
plan-free backends (FlashAttention-2, memory-efficient) never pay, at a slower steady call. For
self-attention (N x N) and image cross-attention (N x 1029) at B = 2 (guided steps) and B = 1, each
backend's first call on a fresh N and its steady call, so that the per-pass trade (plan builds
against steady-call cost times the calls a pass makes) can be read off.

    python benchmarks/probe_sdpa_plans.py --out plans.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, wall_ms, write_json  # noqa: E402
from probe_sdpa_buckets import qkv, steady_ms  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
COND_TOKENS = 1029  # DINOv3 tokens of the image condition


def probe(backend: str, B: int, N: int, cross: bool) -> dict:
    """First call on a token count not seen before (``N``) and the steady call, ms."""
    q, k, v = qkv(B, N, COND_TOKENS if cross else N)
    with sdpa_kernel([BACKENDS[backend]]):
        def run():
            return F.scaled_dot_product_attention(q, k, v)
        first = wall_ms(run, torch.device("cuda"))
        return {"backend": backend, "B": B, "N": N, "cross": cross, "first_ms": round(first, 2),
                "steady_ms": round(steady_ms(run), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="8192,2400,9600", help="comma list of token counts (each made fresh)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs CUDA")
    rows = []
    for i, n in enumerate(int(t) for t in args.tokens.split(",")):
        for backend in BACKENDS:
            for B in (2, 1):
                for cross in (False, True):
                    rows.append(probe(backend, B, n + 7 * i + list(BACKENDS).index(backend), cross))
                    print(rows[-1], flush=True)
    write_json(args.out, {"device": device_name(torch.device("cuda")), "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
