"""Benchmark: one training step of ``know3d train know3d`` (issue 19 "Speed and memory").

Full size (CUDA), random weights, the engine's own pieces: the flow with fp32 master weights under
bf16 autocast and the fused kernels, the Know3D branch (knowledge of 3 MMDiT layers x 3072, 4096
tokens: a 1024^2 back view) trained in full and a rank-64 LoRA on the seven block linears, the rest
frozen; ``FlowLoss`` forward + backward, gradient clipping, AdamW and the EMA update. Per case and
with gradient checkpointing off / on:
- ``infer_ms``: our inference forward of the same shape (bf16 model, no branch, no autograd);
- ``step_ms``: the training step; ``ratio`` = step_ms / infer_ms; ``tokens_per_s``;
- ``with_grad``: trainables with a non-zero gradient after the timed steps / all trainables;
- ``peak_gib``: peak memory beyond the frozen weights (optimiser state, EMA, activations).
Cases: ``ss B=2`` (2 x 4096 tokens), ``shape N=8k`` and ``shape N=16k`` (512 model), cond 1029 tokens.

    python benchmarks/bench_train.py --out train_step.json     # GPU, full size
    python benchmarks/bench_train.py --tiny                    # CPU script check
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import bench_device, device_name, random_coords, sample_times, write_json  # noqa: E402
from bench_trellis2_flows import FULL, TINY, build  # noqa: E402

from know3d_core.knowledge import init_lora, install_branch  # noqa: E402
from know3d_core.sparse import SparseTensor  # noqa: E402
from know3d_core.train.engine import EMA, checkpoint_blocks  # noqa: E402
from know3d_core.train.flows import FlowLoss  # noqa: E402

# (name, kind, batch, tokens (full, tiny), grid (full, tiny))
CASES = [("ss B=2", "ss", 2, None, 16), ("shape N=8k", "shape512", 1, (8192, 256), (32, 16)),
         ("shape N=16k", "shape512", 1, (16384, 512), (32, 16))]
KNOWLEDGE = {"full": (4096, 3 * 3072), "tiny": (16, 96)}


def inputs(case, tiny, device, widths):
    name, kind, batch, tokens, grid = case
    gen = torch.Generator(device=device).manual_seed(1)
    cond = torch.randn(batch, 17 if tiny else 1029, widths["cond_channels"], device=device, generator=gen)
    t = torch.full((batch,), 0.7, device=device)
    if kind == "ss":
        x = torch.randn(batch, 8, 16, 16, 16, device=device, generator=gen)
        n_tokens = batch * 16 ** 3
    else:
        n, res = tokens[1 if tiny else 0], grid[1 if tiny else 0]
        x = SparseTensor(torch.randn(batch * n, 32, device=device, generator=gen),
                         random_coords(n, res, batch, device), (res,) * 3, batch_size=batch)
        n_tokens = batch * n
    n_k, d_k = KNOWLEDGE["tiny" if tiny else "full"]
    knowledge = torch.randn(batch, n_k, d_k, device=device, generator=gen)
    return x, t, cond, knowledge, n_tokens


def run_case(case, tiny, device, warmup, repeats, rank):
    widths = TINY if tiny else FULL
    model = build(case[1], widths, "float32" if tiny else "bfloat16", device)
    x, t, cond, knowledge, n_tokens = inputs(case, tiny, device, widths)
    with torch.no_grad():
        infer_ms = statistics.median(sample_times(lambda: model(x, t * 1000, cond), device, warmup, repeats)[0])
    model.convert_to(torch.float32)  # the trainer's fp32 master weights
    install_branch(model, knowledge.shape[-1], kind="mmdit_hidden", mmdit_layers=[20, 30, 40], sigma=0.25)
    init_lora(model, rank, generator=torch.Generator().manual_seed(0))
    model.requires_grad_(False)
    params = {n: p for n, p in model.named_parameters() if "knowledge_" in n or ".lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
    model.train()
    loss_fn = FlowLoss(model)
    target = x.replace(torch.randn_like(x.feats)) if isinstance(x, SparseTensor) else torch.randn_like(x)
    gc.collect()  # checkpoint_blocks' closures make reference cycles: free the previous case's model now
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    frozen = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    opt = torch.optim.AdamW(list(params.values()), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    ema = EMA(params, 0.9999)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = loss_fn(x, t, cond, target, knowledge)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        ema.update(params)
        opt.zero_grad(set_to_none=False)

    rows = []
    for ckpt in (False, True):
        if ckpt:
            checkpoint_blocks(model.blocks)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, _, _ = sample_times(step, device, warmup, repeats)
        peak = (torch.cuda.max_memory_allocated() - frozen) / 2 ** 30 if device.type == "cuda" else None
        with autocast:  # after the timed steps B and to_out are non-zero: every trainable gets a gradient
            loss_fn(x, t, cond, target, knowledge).backward()
        with_grad = sum(p.grad is not None and bool(torch.count_nonzero(p.grad)) for p in params.values())
        opt.zero_grad(set_to_none=False)
        ms = statistics.median(times)
        rows.append({"case": case[0], "grad_checkpointing": ckpt, "infer_ms": round(infer_ms, 2),
                     "step_ms": round(ms, 2), "ratio": round(ms / infer_ms, 3),
                     "tokens_per_s": round(n_tokens / ms * 1000), "with_grad": with_grad, "trainables": len(params),
                     "trainable_params_m": round(sum(p.numel() for p in params.values()) / 1e6, 1),
                     "frozen_gib": round(frozen / 2 ** 30, 2), "peak_gib": None if peak is None else round(peak, 2)})
        r = rows[-1]
        print(f"{r['case']:<12} ckpt={ckpt!s:<5} infer {r['infer_ms']:8.2f} ms  step {r['step_ms']:9.2f} ms "
              f"(x{r['ratio']:.2f})  {r['tokens_per_s']} tok/s  grads {with_grad}/{len(params)}  "
              f"peak+{r['peak_gib']} GiB over {r['frozen_gib']} GiB frozen", flush=True)
    del model, opt, ema, params, loss_fn
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny widths on the CPU (script check)")
    p.add_argument("--device", default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--cases", default=None, help="comma-separated subset of case names")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = bench_device(args)
    if device is None:
        return 2
    if args.tiny:
        args.warmup, args.repeats, args.rank = 1, 2, 4
    cases = CASES if args.cases is None else [c for c in CASES if c[0] in args.cases.split(",")]
    rows = [r for case in cases for r in run_case(case, args.tiny, device, args.warmup, args.repeats, args.rank)]
    write_json(args.out, {"device": device_name(device), "torch": torch.__version__, "tiny": args.tiny,
                          "rank": args.rank, "warmup": args.warmup, "repeats": args.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
