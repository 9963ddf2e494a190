"""Probe (CUDA): where the Know3D branch's extra time goes, per injection case.

``--mode kernels``: per case (bench_injection's names), the GPU kernel time of one plain and one
Know3D forward (torch.profiler sums, so host launch gaps are left out), their ratio beside the FLOP
floor, the extra time per kernel category and the branch's top kernels.
``--mode sdpa``: the branch attention's shapes per SDPA backend (ms).
``--mode host``: host (CPU) time of the branch at B=1 of the structure flow: its sub-steps one by
one on a 64-token input (GPU time negligible), and the top CPU ops (self time) of one Know3D forward
minus one plain forward.
``--mode stall``: the structure flow at B=1 under ``torch.cuda.set_sync_debug_mode("warn")`` (any
host sync inside the forward is printed), then wall ms of Know3D forwards with the prepared context,
with the knowledge re-projected each forward, with the branch's own LayerNorm (no fused pass), and
of 20 forwards back to back without a synchronize, beside the plain ones.
``--mode graph``: the dense structure flow forward eager vs replayed from a CUDA graph, plain and
Know3D, at B=1 and B=2 (ms, and whether the replay equals the eager output bit for bit).

    python benchmarks/probe_injection.py --mode kernels --out probe_injection_kernels.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def case_inputs(case, device):
    """(model kind, x, t, cond) of a bench_injection case at full size."""
    from _common import random_coords
    from bench_injection import FULL
    from know3d_core.sparse import SparseTensor
    name, kind, batch, tokens, grid, cond_len = case
    gen = torch.Generator(device=device).manual_seed(1)
    cond = torch.randn(batch, cond_len[0], FULL["cond_channels"], device=device, generator=gen)
    t = torch.full((batch,), 700.0, device=device)
    if kind == "ss":
        r = grid[0]
        x = torch.randn(batch, 8, r, r, r, device=device, generator=gen)
    else:
        n, res = tokens[0], grid[0]
        x = SparseTensor(torch.randn(batch * n, 32, device=device, generator=gen),
                         random_coords(n, res, batch, device), (res,) * 3, batch_size=batch)
    return kind, x, t, cond


class Models:
    """One Know3D flow per kind (random trained-looking branch) and its prepared knowledge."""

    def __init__(self, device):
        from bench_injection import KNOW_FULL, LAYERS, SIGMA
        from know3d_core.knowledge import mmdit_hidden_knowledge
        self.device = device
        n_know, n_layers, width = KNOW_FULL
        gen = torch.Generator(device=device).manual_seed(1)
        hidden = torch.randn(1, n_know, n_layers * width, device=device, generator=gen).to(torch.bfloat16)
        self.knowledge = mmdit_hidden_knowledge(hidden, LAYERS, SIGMA, (16 * 64, 16 * 64), "random")
        self.kind, self.model, self.ctx = None, None, None

    def get(self, kind):
        from bench_injection import know3d_model, randomize_out
        from know3d_core.knowledge import prepare_knowledge
        if kind != self.kind:
            self.model = self.ctx = None
            torch.cuda.empty_cache()
            self.model = know3d_model(kind, False, "bfloat16", self.device, self.knowledge,
                                      16 if kind == "ss" else None)
            randomize_out(self.model)
            with torch.no_grad():
                self.ctx = prepare_knowledge(self.model, self.knowledge)
                for b in self.model.blocks:
                    self.ctx.kv(b.knowledge_attn)
            self.kind = kind
        return self.model, self.ctx


def mode_kernels(cases, models) -> list:
    from _common import kernel_times, median_ms
    from bench_injection import FULL, KNOW_FULL, flops
    from profile_flows import categorise
    rows = []
    for case in cases:
        kind, x, t, cond = case_inputs(case, models.device)
        model, ctx = models.get(kind)
        with torch.no_grad():
            plain = kernel_times(lambda: model(x, t, cond))
            know = kernel_times(lambda: model(x, t, cond, knowledge=ctx))
            plain_ms = median_ms(lambda: model(x, t, cond), models.device, 2, 7, sync_each=True)
            know_ms = median_ms(lambda: model(x, t, cond, knowledge=ctx), models.device, 2, 7, sync_each=True)
        p_ms = sum(v["us"] for v in plain.values()) / 1e3
        k_ms = sum(v["us"] for v in know.values()) / 1e3
        cats = {}
        for name, v in know.items():
            extra = v["us"] - plain.get(name, {"us": 0.0})["us"]
            cats[categorise(name)] = cats.get(categorise(name), 0.0) + extra
        new = sorted(((k, v["us"] - plain.get(k, {"us": 0.0})["us"], v["calls"] - plain.get(k, {"calls": 0})["calls"])
                      for k, v in know.items()), key=lambda r: -r[1])[:10]
        f_plain, f_branch = flops(case[3][0], case[2], case[5][0], KNOW_FULL[0], FULL)
        row = {"case": case[0], "gpu_plain_ms": round(p_ms, 3), "gpu_know3d_ms": round(k_ms, 3),
               "gpu_ratio": round(k_ms / p_ms, 4), "floor": round(1 + f_branch / f_plain, 4),
               "event_plain_ms": round(plain_ms, 3), "event_know3d_ms": round(know_ms, 3),
               "event_ratio": round(know_ms / plain_ms, 4),
               "branch_tflops": round(f_branch / (k_ms - p_ms) / 1e9, 1) if k_ms > p_ms else None,
               "plain_tflops": round(f_plain / p_ms / 1e9, 1),
               "extra_ms_by_category": {c: round(u / 1e3, 3) for c, u in sorted(cats.items(), key=lambda kv: -kv[1])},
               "extra_top": [{"kernel": k[:100], "ms": round(us / 1e3, 3), "calls": c} for k, us, c in new]}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "extra_top"}, flush=True)
        for r in row["extra_top"][:6]:
            print("   ", r, flush=True)
    return rows


def mode_sdpa(device) -> list:
    from _common import sdpa_backend_ms
    shapes = [("ss B=1", 1, 4096), ("ss B=2 (one query)", 1, 8192), ("shape 8k B=1", 1, 8192),
              ("shape 8k B=2 (one query)", 1, 16384), ("shape 20k", 1, 20000)]
    rows = []
    for name, B, lq in shapes:
        # the branch's layouts: q [1, Lq, H, D] and k/v [1, 4096, H, D] transposed to BHLD views
        q = torch.randn(B, lq, 12, 128, device=device, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(1, 4096, 12, 128, device=device, dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(1, 4096, 12, 128, device=device, dtype=torch.bfloat16).transpose(1, 2)
        row = {"shape": name, "tflop": round(4 * B * lq * 4096 * 1536 / 1e12, 4), **sdpa_backend_ms(q, k, v, 3, 15)}
        rows.append(row)
        print(row, flush=True)
    return rows


def host_us(fn, n: int = 300) -> float:
    """Mean host us per call of ``fn`` (no synchronize inside the loop)."""
    import time
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return round(us, 1)


def mode_host(models) -> dict:
    from bench_injection import CASES
    from know3d_core.trellis2.modules.attention import attend
    model, ctx = models.get("ss")
    blk = model.blocks[0]
    attn = blk.knowledge_attn
    h = torch.randn(1, 64, 1536, device=models.device, dtype=torch.bfloat16)
    k, v = ctx.kv(attn)
    q = attn._query(h)
    steps = {
        "whole knowledge_attn(h, ctx)": lambda: attn(h, ctx),
        "ctx.kv": lambda: ctx.kv(attn),
        "_layer_norm": lambda: attn._layer_norm(h),
        "to_q": lambda: attn.to_q(h),
        "q rms norm": lambda: attn._rms_norm(q, attn.q_rms_norm),
        "_query": lambda: attn._query(h),
        "attend": lambda: attend(q, k, v),
        "to_out": lambda: attn.to_out(h),
        "h + delta": lambda: h + h,
    }
    out = {}
    with torch.no_grad():
        for name, fn in steps.items():
            out[name] = host_us(fn)
        print("host us per call:", out, flush=True)
        kind, x, t, cond = case_inputs(CASES[0], models.device)
        from torch.profiler import ProfilerActivity, profile

        def cpu_ops(fn):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
                torch.cuda.synchronize()
            return {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}
        plain = cpu_ops(lambda: model(x, t, cond))
        know = cpu_ops(lambda: model(x, t, cond, knowledge=ctx))
        diff = sorted(((k, us - plain.get(k, (0, 0))[0], c - plain.get(k, (0, 0))[1]) for k, (us, c) in know.items()),
                      key=lambda r: -r[1])[:25]
        rows = [{"op": k, "extra_self_cpu_us": round(us, 1), "extra_calls": c} for k, us, c in diff]
        for r in rows:
            print("   ", r, flush=True)
        total = {"plain_cpu_ms": round(sum(v[0] for v in plain.values()) / 1e3, 2),
                 "know3d_cpu_ms": round(sum(v[0] for v in know.values()) / 1e3, 2)}
        print(total, flush=True)
    return {"steps_us": out, "forward_extra_ops": rows, **total}


def mode_stall(models) -> dict:
    import time
    import warnings
    from _common import median_ms
    from bench_injection import CASES
    from know3d_core.trellis2.modules.blocks import ModulatedTransformerCrossBlock
    kind, x, t, cond = case_inputs(CASES[0], models.device)
    model, ctx = models.get(kind)
    out = {}
    with torch.no_grad():
        model(x, t, cond, knowledge=ctx)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            model(x, t, cond, knowledge=ctx)
            torch.cuda.set_sync_debug_mode("default")
        out["syncs"] = sorted({str(w.message)[:200] for w in caught})
        print("host syncs in one Know3D forward:", out["syncs"] or "none", flush=True)

        def uncached():
            model.knowledge_proj.clear_cache()
            return model(x, t, cond, knowledge=models.knowledge)

        def back_to_back(fn, n=20):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            return round((time.perf_counter() - t0) / n * 1000, 3)

        cases = {"plain": lambda: model(x, t, cond), "know3d": lambda: model(x, t, cond, knowledge=ctx),
                 "uncached": uncached}
        for name, fn in cases.items():
            out[name + "_ms"] = round(median_ms(fn, models.device, 3, 10, sync_each=True), 3)
            out[name + "_back_to_back_ms"] = back_to_back(fn)
        original = ModulatedTransformerCrossBlock._branch_prenorm
        ModulatedTransformerCrossBlock._branch_prenorm = lambda self, eps: None
        try:
            out["know3d_own_norm_ms"] = round(median_ms(cases["know3d"], models.device, 3, 10, sync_each=True), 3)
        finally:
            ModulatedTransformerCrossBlock._branch_prenorm = original
        for name, fn in (("plain", cases["plain"]), ("know3d", cases["know3d"])):
            from torch.profiler import ProfilerActivity, profile
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                fn()
                torch.cuda.synchronize()
            kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                             key=lambda e: e.time_range.start)
            if kernels:
                span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1e3
                busy = sum(e.time_range.end - e.time_range.start for e in kernels) / 1e3
                gaps = sorted(((kernels[i + 1].time_range.start - kernels[i].time_range.end) / 1e3, kernels[i].name[:60])
                              for i in range(len(kernels) - 1))[-5:]
                out[name + "_gpu_span_ms"], out[name + "_gpu_busy_ms"] = round(span, 3), round(busy, 3)
                out[name + "_largest_gaps"] = [(round(g, 3), n) for g, n in gaps]
    print({k: v for k, v in out.items() if k != "syncs"}, flush=True)
    return out


def mode_graph(models) -> list:
    from _common import median_ms
    from bench_injection import CASES
    rows = []
    for case in [c for c in CASES if c[1] == "ss"]:
        kind, x, t, cond = case_inputs(case, models.device)
        model, ctx = models.get(kind)
        for label, kw in (("plain", {}), ("know3d", {"knowledge": ctx})):
            with torch.no_grad():
                eager = model(x, t, cond, **kw)
                eager_ms = median_ms(lambda: model(x, t, cond, **kw), models.device, 2, 9, sync_each=True)
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    model(x, t, cond, **kw)
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                try:
                    import time
                    t0 = time.perf_counter()
                    with torch.cuda.graph(g):
                        static_out = model(x, t, cond, **kw)
                    capture_ms = 1000 * (time.perf_counter() - t0)
                except Exception as err:  # noqa: BLE001 (a probe: report what failed)
                    rows.append({"case": case[0], "path": label, "error": f"{type(err).__name__}: {err}"[:300]})
                    print(rows[-1], flush=True)
                    continue
                g.replay()
                torch.cuda.synchronize()
                same = bool(torch.equal(static_out, eager))
                replay_ms = median_ms(g.replay, models.device, 2, 9, sync_each=True)
            rows.append({"case": case[0], "path": label, "eager_ms": round(eager_ms, 3),
                         "replay_ms": round(replay_ms, 3), "capture_ms": round(capture_ms, 1), "replay_equal": same})
            print(rows[-1], flush=True)
            del g, static_out
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("this probe times CUDA kernels: it needs a GPU", file=sys.stderr)
        return 2
    from _common import write_json
    from bench_injection import CASES
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="kernels,sdpa,graph", help="comma-separated: kernels, sdpa, host, stall, graph")
    p.add_argument("--cases", default="ss B=1,ss B=2,shape N=8k,shape N=8k B=2")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    cases = [c for c in CASES if c[0] in args.cases.split(",")]
    models = Models(device)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for mode in args.mode.split(","):
        print(f"== {mode}", flush=True)
        if mode == "kernels":
            result["kernels"] = mode_kernels(cases, models)
        elif mode == "sdpa":
            result["sdpa"] = mode_sdpa(device)
        elif mode == "host":
            result["host"] = mode_host(models)
        elif mode == "stall":
            result["stall"] = mode_stall(models)
        elif mode == "graph":
            result["graph"] = mode_graph(models)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
