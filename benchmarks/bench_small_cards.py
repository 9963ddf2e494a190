"""The back view under each memory plan (``--vram``, issue 22), capped like a small card.

For every (plan, cap) a fresh process builds the Qwen networks with RANDOM weights (full size: the
Qwen-Image-Edit-2511 MMDiT, a Qwen2.5-VL-7B-sized text encoder, the Qwen-Image VAE; ``--tiny``: the
test sizes on the CPU), applies the plan (``mmdit.memory.apply_memory_plan``), caps the process with
``torch.cuda.set_per_process_memory_fraction`` (cap 0: none) and runs the back view with a capture:
seconds, peak memory, and the captured hidden states' relative error against the ``resident`` bf16
run of the same weights (the first plan listed must be ``resident``). Weights are a fixed random buffer
tiled over every parameter (std 0.02; identical in every process, nothing written to disk). The
processor is the demo's character tokenizer (the real one cannot be downloaded): prompts are short,
and the text encoder's vocabulary (so its embedding and LM head, 1 GB of the real 16.6 GB) is tiny.

    python benchmarks/bench_small_cards.py --out benchmarks/results/small_cards.json
    python benchmarks/bench_small_cards.py --tiny          # CPU smoke run (caps ignored)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from know3d_core.plan import MEMORY_PLANS  # noqa: E402

# Qwen2.5-VL-7B (Qwen/Qwen2.5-VL-7B-Instruct config.json), with the demo tokenizer's special tokens.
TE_FULL = dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4), vision=dict(depth=32, hidden_size=1280, intermediate_size=3420,
                                                             num_heads=16, out_hidden_size=3584,
                                                             fullatt_block_indexes=[7, 15, 23, 31]))


def fill_random(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Every floating parameter <- a fixed random buffer (std ``std``), tiled: fast and identical in
    every process."""
    g = torch.Generator().manual_seed(seed)
    buf = (torch.randn(1 << 24, generator=g) * std)
    with torch.no_grad():
        for p in module.parameters():
            flat = p.view(-1)
            for start in range(0, flat.numel(), buf.numel()):
                n = min(buf.numel(), flat.numel() - start)
                flat[start:start + n].copy_(buf[:n])


def build(tiny: bool, dtype: torch.dtype):
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from know3d_core import demo_models as dm
    from know3d_core.mmdit.loading import QwenEditComponents
    from know3d_core.mmdit.schedule import QWEN_IMAGE_SCHEDULER_CONFIG

    tok, vocab = dm.char_tokenizer()
    if tiny:
        tcfg, vcfg = dict(dm.QWEN_TRANSFORMER), dict(dm.QWEN_VAE)
        te_cfg = dm.tiny_qwen25vl_config(vocab, tcfg["joint_attention_dim"])
    else:
        tcfg, vcfg = dict(zero_cond_t=True), {}
        te_cfg = dm.tiny_qwen25vl_config(vocab, 3584)
        te_cfg.text_config.update(TE_FULL["text"])
        for k, v in TE_FULL["vision"].items():
            setattr(te_cfg.vision_config, k, v)
    try:  # transformers >= 5
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:  # allocated in dtype with torch's and transformers' initialisers off; tables (RoPE) computed
        with no_init_weights():
            transformer = QwenImageTransformer2DModel(**tcfg)
            text_encoder = Qwen2_5_VLForConditionalGeneration(te_cfg)
    finally:
        torch.set_default_dtype(old)
    parts = []
    for m in (transformer, text_encoder):
        fill_random(m)
        parts.append(m.eval().requires_grad_(False))
    torch.manual_seed(1)
    vae = AutoencoderKLQwenImage(**vcfg).to(dtype).eval().requires_grad_(False)
    cls = dm._image_processor_class()
    from transformers import Qwen2_5_VLProcessor

    class ProcessorWithoutVideo(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    proc = ProcessorWithoutVideo(image_processor=cls(min_pixels=56 * 56, max_pixels=448 * 448), tokenizer=tok,
                                 video_processor=None)
    return QwenEditComponents(transformer=parts[0], vae=vae, text_encoder=parts[1], processor=proc,
                              scheduler_config=dict(QWEN_IMAGE_SCHEDULER_CONFIG), model_name="random")


def run_one(args) -> dict:
    from PIL import Image

    from know3d_core.mmdit import CaptureSpec
    from know3d_core.mmdit.backview import QwenEditBackView
    from know3d_core.mmdit.memory import apply_memory_plan

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    row = {"plan": args.one, "cap_gib": args.cap, "device": torch.cuda.get_device_name() if device.type == "cuda"
           else "cpu"}
    t0 = time.perf_counter()
    bv = QwenEditBackView(build(args.tiny, dtype))
    row["build_seconds"] = round(time.perf_counter() - t0, 1)
    if device.type == "cuda" and args.cap:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap * 2 ** 30 / total), device)
    row["placement"] = apply_memory_plan(bv, MEMORY_PLANS[args.one], device, dtype)
    size = 64 if args.tiny else 1024
    front = Image.new("RGB", (size, size), (180, 120, 60))
    steps = [0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    try:
        res = bv([front], "three slats", steps=args.steps, height=size, width=size,
                 generator=torch.Generator().manual_seed(0), capture=CaptureSpec(sigma=0.5),
                 early_exit=False, decode=False, record_trajectory=False,
                 progress=lambda i, n: steps.__setitem__(0, i))
    except torch.OutOfMemoryError as e:
        row.update(ok=False, error=" ".join(str(e).split())[:300], steps_done=steps[0])
        return row
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    row.update(ok=True, seconds=round(time.perf_counter() - t0, 2), steps=args.steps)
    hidden = res.knowledge.hidden.float().cpu()
    if args.reference and os.path.isfile(args.reference):
        ref = torch.load(args.reference)
        row["hidden_rel_err_vs_resident"] = round(((hidden - ref).norm() / ref.norm()).item(), 5)
    elif args.reference:
        torch.save(hidden, args.reference)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--plans", default="resident,fp8,fp8_blocks,fp8_blocks_all")
    p.add_argument("--caps", default="0,24,16", help="GiB caps per plan (0: none); resident runs uncapped")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--cap", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(run_one(args)), flush=True)
        return 0
    plans = args.plans.split(",")
    if plans[0] != "resident":
        p.error("the first plan must be 'resident' (the reference of the hidden-state error)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "resident_hidden.pt")
        for plan in plans:
            for cap in ([0.0] if plan == "resident" else [float(c) for c in args.caps.split(",")]):
                cmd = [sys.executable, os.path.abspath(__file__), "--one", plan, "--cap", str(cap), "--steps",
                       str(args.steps), "--reference", ref] + (["--tiny"] if args.tiny else [])
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
                row = json.loads(line) if line else {"plan": plan, "cap_gib": cap, "ok": False,
                                                      "error": proc.stderr[-500:]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "torch": torch.__version__}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
