"""Probe: which Triton kernel variants a run compiled, in order, with the seconds between them.

Reads a ``TRITON_CACHE_DIR`` filled by one fresh run (e.g. a decoder first call) and prints one line
per compiled variant: finish time relative to the first, the gap to the previous one (roughly its
compile time when compiles run back to back), kernel name, warps and stages.

    TRITON_CACHE_DIR=$D python benchmarks/bench_shape_decoder.py ... && python benchmarks/probe_triton_cache.py $D
"""
from __future__ import annotations

import glob
import json
import os
import sys


def variants(cache_dir: str) -> list[dict]:
    """One dict per compiled kernel (name, num_warps, num_stages, mtime of its metadata)."""
    rows = []
    for path in glob.glob(os.path.join(cache_dir, "*", "*.json")):
        if os.path.basename(path).startswith("__grp__"):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict) or "name" not in meta:
            continue
        rows.append({"name": meta["name"], "num_warps": meta.get("num_warps"), "num_stages": meta.get("num_stages"),
                     "mtime": os.path.getmtime(path), "dir": os.path.basename(os.path.dirname(path))[:12]})
    return sorted(rows, key=lambda r: r["mtime"])


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    rows = variants(args[0])
    if not rows:
        print(f"no compiled kernels under {args[0]}")
        return 1
    t0 = prev = rows[0]["mtime"]
    for r in rows:
        print(f"{r['mtime'] - t0:7.2f} s  +{r['mtime'] - prev:5.2f}  {r['name'][:60]:<60} warps {r['num_warps']} "
              f"stages {r['num_stages']}  {r['dir']}")
        prev = r["mtime"]
    print(f"{len(rows)} variants")
    return 0


if __name__ == "__main__":
    sys.exit(main())
