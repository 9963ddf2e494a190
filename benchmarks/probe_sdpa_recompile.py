"""Probe (CUDA): does torch's opt-in ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1`` remove the per-object
cuDNN attention plan builds of a geometry pass?

torch reads that variable once per process, and only uses it for attention calls whose q, k and v
are each contiguous in ``[B, L, H, D]`` (our self-attention's v and the cross-attention's k/v are
strided views of their projections). ``--contiguous`` makes every flow attention input contiguous
first (a copy per call), so the variable can apply; run this script with and without the variable,
and with and without ``--contiguous``, each in a fresh process. Prints bench_geometry's 512 rows:
the new object and the same object again, per-step times included.

    TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 python benchmarks/probe_sdpa_recompile.py --contiguous --out a.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def patch_contiguous() -> None:
    """Every ``attend`` of the flows (blocks and the Know3D branch) gets contiguous q, k, v."""
    from know3d_core.knowledge import branch
    from know3d_core.trellis2.modules import attention
    original = attention.attend

    def attend(q, k, v, q_layout=None, kv_layout=None):
        return original(q.contiguous(), k.contiguous(), v.contiguous(), q_layout, kv_layout)

    attention.attend = attend
    branch.attend = attend


def main() -> int:
    if not torch.cuda.is_available():
        print("this probe measures cuDNN attention plans: it needs a GPU", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser()
    p.add_argument("--contiguous", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.contiguous:
        patch_contiguous()
    import bench_geometry
    print("TORCH_CUDNN_SDPA_AVOID_RECOMPILE =", os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE"),
          " contiguous =", args.contiguous, flush=True)
    argv = ["--types", "512", "--offload", "off", "--repeat-object", "--step-times"]
    return bench_geometry.main(argv + (["--out", args.out] if args.out else []))


if __name__ == "__main__":
    sys.exit(main())
