"""Benchmark: TRELLIS.2 flow forwards with vs without the Know3D injection branch.

Full size (default, CUDA, bf16): the official flow architecture (1536 wide, 30 blocks, 12 heads) with
random weights and a Know3D branch for 4096 knowledge tokens x 4 MMDiT layers x 3072 = 12288
channels. The knowledge keys/values are computed once (``prepare_knowledge``) and reused, as in a
real generation (every step, both CFG passes). Per case:
- ``plain_ms``: ``model(x, t, cond)`` (branch installed but no knowledge: the plain TRELLIS.2 path);
- ``know3d_ms``: ``model(x, t, cond, knowledge=ctx)`` with the prepared context;
- ``uncached_ms``: the same but projecting the knowledge and every block's K/V in each forward;
- ``ratio`` = know3d / plain beside ``floor`` = (plain + branch FLOPs) / plain FLOPs (matmuls and
  attention only, research/performance.md); ``ok`` = ratio <= floor + 0.05 (the issue's target);
- ``zero_exact``: with the freshly installed (zero-output) branch, the output equals the plain one
  bit for bit.
- ``gpu_ratio`` / ``gpu_ok``: the same from summed kernel times (torch.profiler), without host launch
  gaps: the B=1 structure forward is host-bound on a slow CPU, and there the wall ratio measures the
  CPU rather than the kernels.
Also ``prepare_ms`` (projection + 30 blocks' K/V, once per generation) and ``kv_cache_gib``.
Timing: CUDA events, median of --repeats after --warmup.

``stages``: the issue's figure, per stage: the B=1 and B=2 forwards of a stage weighted by how many
of each its official sampler runs (structure: 2 single + 10 CFG-pair steps; shape: 3 + 9), wall
times, floor weighted by FLOPs.

``--tiny`` runs tiny widths on the CPU (fp32) so the script is checked without a GPU.

    python benchmarks/bench_injection.py --out injection.json           # GPU, full size
    python benchmarks/bench_injection.py --tiny --out injection_tiny.json
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    device_name,
    flow_run_setup,
    gamma_or_norm_weight,
    gpu_ms,
    median_ms,
    random_coords,
    random_model,
    write_json,
)

from know3d_core.knowledge import install_branch, mmdit_hidden_knowledge, prepare_knowledge  # noqa: E402
from know3d_core.sampling.flow_euler import OFFICIAL_SAMPLER_PARAMS, time_schedule, uses_cfg  # noqa: E402
from know3d_core.sparse import SparseTensor  # noqa: E402
from know3d_core.trellis2.slat_flow import SLatFlowModel  # noqa: E402
from know3d_core.trellis2.sparse_structure_flow import SparseStructureFlowModel  # noqa: E402
from know3d_core.trellis2.tiny import tiny_flow_args  # noqa: E402

FULL = dict(model_channels=1536, cond_channels=1024, num_blocks=30, num_heads=12)
TINY = dict(model_channels=64, cond_channels=32, num_blocks=2, num_heads=4)
# knowledge: (tokens, layers, width per layer)
KNOW_FULL = (4096, 4, 3072)
KNOW_TINY = (64, 4, 12)
LAYERS = [20, 30, 40, 50]
SIGMA = 0.25

# (name, model kind, batch, tokens (full, tiny), grid (full, tiny), cond tokens (full, tiny))
CASES = [
    ("ss B=1", "ss", 1, (4096, 512), (16, 8), (1029, 17)),
    ("ss B=2", "ss", 2, (4096, 512), (16, 8), (1029, 17)),
    ("shape N=8k", "shape512", 1, (8192, 512), (32, 16), (1029, 17)),
    ("shape N=8k B=2", "shape512", 2, (8192, 512), (32, 16), (1029, 17)),
    ("shape N=20k", "shape1024", 1, (20000, 1000), (64, 16), (4101, 65)),
    ("shape N=40k", "shape1024", 1, (40000, 2000), (64, 16), (4101, 65)),
]


def flops(tokens: int, batch: int, cond: int, know: int, w: dict, mlp_ratio: float = 5.3334) -> tuple[float, float]:
    """(plain forward, branch) FLOPs of the blocks: 2*m*n*k per matmul, 4*Lq*Lk*C per attention.

    The branch adds a query projection, one attention over ``know`` keys and the output projection
    per block; its K/V projections are done once per generation and not counted.
    """
    C, Cc, L = w["model_channels"], w["cond_channels"], tokens
    hidden = int(C * mlp_ratio)
    self_attn = 2 * L * C * 3 * C + 4 * L * L * C + 2 * L * C * C
    cross = 2 * L * C * C + 2 * cond * Cc * 2 * C + 4 * L * cond * C + 2 * L * C * C
    mlp = 2 * 2 * L * C * hidden
    branch = 2 * L * C * C + 4 * L * know * C + 2 * L * C * C
    n = w["num_blocks"] * batch
    return n * (self_attn + cross + mlp), n * branch


def build(kind: str, widths: dict, dtype: str, device: torch.device, resolution=None) -> torch.nn.Module:
    """Random-weight flow (allocated on device, initialised in place)."""
    cls = SparseStructureFlowModel if kind == "ss" else SLatFlowModel
    return random_model(cls, {**tiny_flow_args(kind, resolution=resolution), **widths, "dtype": dtype}, device, 0,
                        device, ones=gamma_or_norm_weight)


time_ms = functools.partial(median_ms, sync_each=True)  # median ms, a synchronize before every timed call


def know3d_model(kind: str, tiny: bool, dtype: str, device, knowledge, resolution) -> torch.nn.Module:
    """Flow with a fresh (zero-output) Know3D branch for ``knowledge``."""
    model = build(kind, TINY if tiny else FULL, dtype, device, resolution)
    with torch.device(device):
        install_branch(model, knowledge.dim, kind="mmdit_hidden", mmdit_layers=LAYERS, sigma=SIGMA)
    return model.eval()


def randomize_out(model) -> None:
    """Give every zero-initialised output layer random values (a trained branch)."""
    gen = torch.Generator(device=model.device).manual_seed(2)
    with torch.no_grad():
        for block in model.blocks:
            w = block.knowledge_attn.to_out.weight
            w.normal_(0.0, 0.02, generator=gen)


def run_case(case, tiny: bool, dtype: str, device, warmup: int, repeats: int, state: dict) -> dict:
    name, kind, batch, tokens, grid, cond_len = case
    idx = 1 if tiny else 0
    widths = TINY if tiny else FULL
    n_know, n_layers, width = KNOW_TINY if tiny else KNOW_FULL
    gen = torch.Generator(device=device).manual_seed(1)
    if "knowledge" not in state:
        hidden = torch.randn(1, n_know, n_layers * width, device=device, generator=gen).to(torch.bfloat16)
        state["knowledge"] = mmdit_hidden_knowledge(hidden, LAYERS, SIGMA, (16 * 64, 16 * 64), "random")
    knowledge = state["knowledge"]
    fresh = state.get("kind") != kind
    if fresh:
        state.pop("model", None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        state["model"] = know3d_model(kind, tiny, dtype, device, knowledge, grid[idx] if kind == "ss" else None)
        state["kind"] = kind
    model = state["model"]

    lc, n = cond_len[idx], tokens[idx]
    cond = torch.randn(batch, lc, widths["cond_channels"], device=device, generator=gen)
    t = torch.full((batch,), 700.0, device=device)
    if kind == "ss":
        r = grid[idx]
        x = torch.randn(batch, 8, r, r, r, device=device, generator=gen)
    else:
        res = grid[idx]
        x = SparseTensor(torch.randn(batch * n, 32, device=device, generator=gen),
                         random_coords(n, res, batch, device), (res,) * 3, batch_size=batch)

    def data(out):
        return out.feats if isinstance(out, SparseTensor) else out

    with torch.no_grad():
        zero_exact = None
        if fresh:  # the branch is still zero: Know3D == plain, bit for bit
            ctx0 = prepare_knowledge(model, knowledge)
            zero_exact = bool(torch.equal(data(model(x, t, cond)), data(model(x, t, cond, knowledge=ctx0))))
            del ctx0
            randomize_out(model)
        def prepare():
            model.knowledge_proj.clear_cache()  # otherwise the projector hands back its last context
            return prepare_knowledge(model, knowledge)

        prepare_ms = time_ms(prepare, device, 1, 3)
        ctx = prepare()
        kv_gib = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                     for k, v in (ctx.kv(b.knowledge_attn) for b in model.blocks)) / 2 ** 30
        plain_ms = time_ms(lambda: model(x, t, cond), device, warmup, repeats)
        know_ms = time_ms(lambda: model(x, t, cond, knowledge=ctx), device, warmup, repeats)

        def uncached():
            model.knowledge_proj.clear_cache()
            return model(x, t, cond, knowledge=knowledge)

        uncached_ms = time_ms(uncached, device, max(1, warmup // 2), max(3, repeats // 2))
        gpu_plain = gpu_ms(lambda: model(x, t, cond), device)
        gpu_know = gpu_ms(lambda: model(x, t, cond, knowledge=ctx), device)
        finite = bool(torch.isfinite(data(model(x, t, cond, knowledge=ctx))).all())
        del ctx
        model.knowledge_proj.clear_cache()
    f_plain, f_branch = flops(n, batch, lc, n_know, widths)
    floor = (f_plain + f_branch) / f_plain
    ratio = know_ms / plain_ms
    return {
        "case": name, "batch": batch, "tokens": n, "cond_tokens": lc, "knowledge_tokens": n_know,
        "knowledge_dim": n_layers * width, "plain_ms": round(plain_ms, 3), "know3d_ms": round(know_ms, 3),
        "uncached_ms": round(uncached_ms, 3), "ratio": round(ratio, 4), "floor": round(floor, 4),
        "ok": ratio <= floor + 0.05, "prepare_ms": round(prepare_ms, 3), "kv_cache_gib": round(kv_gib, 4),
        "gpu_plain_ms": _round(gpu_plain), "gpu_know3d_ms": _round(gpu_know),
        "gpu_ratio": None if gpu_plain is None else round(gpu_know / gpu_plain, 4),
        "gpu_ok": None if gpu_plain is None else gpu_know / gpu_plain <= floor + 0.05,
        "plain_tflop": round(f_plain / 1e12, 3), "branch_tflop": round(f_branch / 1e12, 3),
        "plain_flop": float(f_plain), "branch_flop": float(f_branch),
        "zero_exact": zero_exact, "finite": finite,
    }


def _round(v, n: int = 3):
    return None if v is None else round(v, n)


# Stages as the sampler runs them: (name, sampler of OFFICIAL_SAMPLER_PARAMS, B=1 case, B=2 case)
STAGES = [
    ("stage 1: sparse structure", "sparse_structure", "ss B=1", "ss B=2"),
    ("stage 2: shape 512, N=8k", "shape_slat", "shape N=8k", "shape N=8k B=2"),
]


def stage_counts(sampler: str) -> tuple[int, int]:
    """(single-pass steps, CFG-pair steps) of an official sampler run (pairs run as one B=2 forward)."""
    params = OFFICIAL_SAMPLER_PARAMS[sampler]
    cfg = [uses_cfg(t, params) for t in time_schedule(params.steps, params.rescale_t)[:-1]]
    return cfg.count(False), cfg.count(True)


def stage_rows(rows: list[dict]) -> list[dict]:
    """Whole-stage ratios: each stage's B=1 and B=2 forwards weighted by how often its sampler runs
    them (wall times; floors weighted by FLOPs). Stages whose cases were not run are left out."""
    by_case = {r["case"]: r for r in rows}
    out = []
    for name, sampler, single, pair in STAGES:
        if single not in by_case or pair not in by_case:
            continue
        n1, n2 = stage_counts(sampler)
        r1, r2 = by_case[single], by_case[pair]
        plain = n1 * r1["plain_ms"] + n2 * r2["plain_ms"]
        know = n1 * r1["know3d_ms"] + n2 * r2["know3d_ms"]
        f_plain = n1 * r1["plain_flop"] + n2 * r2["plain_flop"]
        f_branch = n1 * r1["branch_flop"] + n2 * r2["branch_flop"]
        floor = (f_plain + f_branch) / f_plain
        out.append({"stage": name, "sampler": sampler, "single_steps": n1, "pair_steps": n2,
                    "plain_ms": round(plain, 2), "know3d_ms": round(know, 2), "ratio": round(know / plain, 4),
                    "floor": round(floor, 4), "ok": know / plain <= floor + 0.05})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny widths on the CPU (script check)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="block dtype (default: bfloat16; float32 with --tiny)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--cases", default=None, help="comma-separated subset of case names")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)

    device = flow_run_setup(args)
    if device is None:
        return 2
    cases = CASES if args.cases is None else [c for c in CASES if c[0] in args.cases.split(",")]
    print(f"{'case':<16}{'plain ms':>10}{'know3d ms':>11}{'ratio':>8}{'floor':>8}  ok  "
          f"{'gpu ratio':>9}{'uncached':>9}{'prepare':>9}  zero==plain")
    rows, state = [], {}
    for case in cases:
        r = run_case(case, args.tiny, args.dtype, device, args.warmup, args.repeats, state)
        rows.append(r)
        print(f"{r['case']:<16}{r['plain_ms']:>10.2f}{r['know3d_ms']:>11.2f}{r['ratio']:>8.3f}{r['floor']:>8.3f}"
              f"  {'y' if r['ok'] else 'N'}  {'-' if r['gpu_ratio'] is None else format(r['gpu_ratio'], '.3f'):>9}"
              f"{r['uncached_ms']:>9.2f}{r['prepare_ms']:>9.2f}  "
              f"{'-' if r['zero_exact'] is None else r['zero_exact']}{'' if r['finite'] else '  NON-FINITE'}",
              flush=True)
    stages = stage_rows(rows)
    for r in stages:
        print(f"{r['stage']:<28} {r['single_steps']} x B=1 + {r['pair_steps']} x B=2: {r['plain_ms']:9.1f} -> "
              f"{r['know3d_ms']:9.1f} ms  ratio {r['ratio']:.3f}  floor {r['floor']:.3f}  {'y' if r['ok'] else 'N'}")
    result = {
        "device": device_name(device),
        "torch": torch.__version__, "dtype": args.dtype, "tiny": args.tiny, "warmup": args.warmup,
        "repeats": args.repeats, "rows": rows, "stages": stages,
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
