"""Benchmark of the MMDiT side (know3d_core.mmdit) against diffusers' QwenImageEditPlusPipeline.

Full size (CUDA): Qwen-Image-Edit-2511 MMDiT (60 blocks, width 3072, zero_cond_t) and the Qwen-Image
VAE with RANDOM weights built directly on the GPU in bf16; 1024x1024 target + one 1024x1024
reference image (4096 + 4096 image tokens); prompt embeddings given (no text encoder); true CFG 4.0.
Measures, in one process:
  1. seconds per sampling step (cond + uncond forward + Euler update): ours vs diffusers' pipeline
     loop (median step-to-step time from a per-step callback; runs interleaved), and whether the
     final latents are identical;
  2. capture overhead: one cond forward with capture hooks vs without, and a whole run with
     capture at one sigma vs without;
  3. early exit: a full run of --steps vs stopping at sigma 0.85 / 0.5 / 0.25 (no VAE decode).
``--tiny`` runs the same on CPU with a tiny config. Prints a table; writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from know3d_core.mmdit import CaptureSpec, EditPlusInputs, EditPlusSampler, capture_block_outputs  # noqa: E402
from know3d_core.mmdit.backview import decode_latents, encode_reference_latents, vae_images  # noqa: E402
from know3d_core.mmdit.capture import HiddenStateCollector  # noqa: E402
from know3d_core.mmdit.packing import pack_latents  # noqa: E402
from know3d_core.mmdit.schedule import QWEN_IMAGE_SCHEDULER_CONFIG, flow_match_sigmas, nearest_step  # noqa: E402


@contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_models(tiny: bool, device: torch.device, dtype: torch.dtype):
    """Random-weight transformer + VAE, allocated and initialised directly on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    torch.manual_seed(0)
    if tiny:
        tcfg = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=6, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4), zero_cond_t=True)
        vcfg = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                    temperal_downsample=[False, True, True])
    else:
        tcfg, vcfg = dict(zero_cond_t=True), {}
    with torch.device(device), default_dtype(dtype):
        transformer = QwenImageTransformer2DModel(**tcfg).eval().requires_grad_(False)
        vae = AutoencoderKLQwenImage(**vcfg).eval().requires_grad_(False)
    return transformer, vae


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    def __init__(self, device):
        self.device, self.stamps = device, []

    def __call__(self, *args):
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return {} if len(args) == 4 else None   # diffusers' callback_on_step_end wants a dict

    def step_times(self):
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def run_theirs(pipe, ref_pil, embeds, steps, size, noise, device):
    pe, pm, ne, nm = embeds
    timer = StepTimer(device)
    out = pipe(image=[ref_pil], prompt_embeds=pe, prompt_embeds_mask=pm, negative_prompt_embeds=ne,
               negative_prompt_embeds_mask=nm, true_cfg_scale=4.0, num_inference_steps=steps, height=size,
               width=size, latents=noise, output_type="latent", callback_on_step_end=timer).images
    return out, timer.step_times()


def run_ours(sampler, inputs, noise, steps, device, **kw):
    timer = StepTimer(device)
    sigmas = flow_match_sigmas(steps, inputs.n_target, QWEN_IMAGE_SCHEDULER_CONFIG)
    res = sampler.sample(inputs, noise, sigmas, true_cfg_scale=4.0, callback=lambda i, s, x: timer(), **kw)
    return res, timer.step_times()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU-sized config (checks the script)")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--steps", type=int, default=None, help="schedule length for the early-exit runs "
                    "(default 40; 10 with --tiny)")
    ap.add_argument("--timing-steps", type=int, default=6, help="steps per run when timing a step")
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions of each timed run")
    ap.add_argument("--forward-reps", type=int, default=5, help="forwards timed for the hook overhead")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="default bfloat16 on CUDA, float32 with --tiny")
    ap.add_argument("--size", type=int, default=None, help="target = reference size in pixels")
    ap.add_argument("--text-tokens", type=int, nargs=2, default=None,
                    help="cond / uncond text lengths (default 230 215, like a one-image Edit-Plus prompt)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (10 if args.tiny else 40)
    args.text_tokens = args.text_tokens or ((12, 10) if args.tiny else (230, 215))

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.tiny else torch.bfloat16)
    size = args.size or (64 if args.tiny else 1024)
    if args.tiny:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    from PIL import Image
    import numpy as np
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    t0 = time.perf_counter()
    transformer, vae = build_models(args.tiny, device, dtype)
    sync(device)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in transformer.parameters())
    edit_plus.VAE_IMAGE_SIZE = size * size   # reference encoded at the target size (1024^2 = diffusers' default)

    pipe = QwenImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
                                     vae=vae, text_encoder=None, tokenizer=None, processor=None,
                                     transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    sampler = EditPlusSampler(transformer, "Qwen-Image-Edit-2511 (random weights)")

    g = torch.Generator().manual_seed(0)
    jd = transformer.config.joint_attention_dim
    t_pos, t_neg = args.text_tokens
    embeds = (torch.randn(1, t_pos, jd, generator=g).to(device, dtype), torch.ones(1, t_pos, dtype=torch.long, device=device),
              torch.randn(1, t_neg, jd, generator=g).to(device, dtype), torch.ones(1, t_neg, dtype=torch.long, device=device))
    ref_pil = Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype("uint8"))
    refs, grids = encode_reference_latents(vae, [t.to(device) for t in vae_images([ref_pil], area=size * size)])
    grid = (size // 16, size // 16)
    inputs = EditPlusInputs(prompt_embeds=embeds[0], prompt_mask=embeds[1], negative_embeds=embeds[2],
                            negative_mask=embeds[3], ref_latents=refs, ref_grids=grids, target_grid=grid)
    z = torch.randn(1, 16, 1, grid[0] * 2, grid[1] * 2, generator=g).to(device, dtype)
    noise = pack_latents(z)
    spec = CaptureSpec()
    layers = spec.resolve_layers(len(transformer.transformer_blocks))

    # warm-up (kernels, allocator)
    run_ours(sampler, inputs, noise, 2, device)
    run_theirs(pipe, ref_pil, embeds, 2, size, noise, device)

    # 1. seconds per step, interleaved
    ours_steps, theirs_steps, equal = [], [], None
    for _ in range(args.reps):
        their_lat, ts = run_theirs(pipe, ref_pil, embeds, args.timing_steps, size, noise, device)
        theirs_steps += ts
        res, os_ = run_ours(sampler, inputs, noise, args.timing_steps, device, record_trajectory=False)
        ours_steps += os_
        # random weights may overflow bf16; NaN positions must then agree too
        equal = bool(torch.allclose(res.latents, their_lat, rtol=0, atol=0, equal_nan=True))
        finite = torch.isfinite(res.latents) & torch.isfinite(their_lat)
        max_diff = float((res.latents.float() - their_lat.float())[finite].abs().max()) if finite.any() else None
        nonfinite_frac = float(1 - finite.float().mean())
    s_ours, s_theirs = statistics.median(ours_steps), statistics.median(theirs_steps)

    # 2. capture overhead
    sig = flow_match_sigmas(args.timing_steps, inputs.n_target)
    t_mid = sig[args.timing_steps // 2].to(device) * 1000
    @torch.no_grad()
    def fwd():
        return sampler.velocity(noise, t_mid, inputs.prompt_embeds, None, inputs)
    def fwd_capture():
        col = HiddenStateCollector(layers)
        with capture_block_outputs(transformer, col, inputs.n_target):
            fwd()
        return col
    plain_f, hook_f = [], []
    for _ in range(args.forward_reps):
        plain_f.append(timed(fwd, device)[1])
        hook_f.append(timed(fwd_capture, device)[1])
    f_plain, f_hook = statistics.median(plain_f), statistics.median(hook_f)
    run_plain, run_cap = [], []
    cap_spec = CaptureSpec(layers=layers, sigma=0.5)
    for _ in range(max(args.reps, 3)):
        run_plain.append(timed(lambda: run_ours(sampler, inputs, noise, args.timing_steps, device), device)[1])
        run_cap.append(timed(lambda: run_ours(sampler, inputs, noise, args.timing_steps, device,
                                              capture=cap_spec), device)[1])
    r_plain, r_cap = statistics.median(run_plain), statistics.median(run_cap)

    # 3. early exit
    sched = flow_match_sigmas(args.steps, inputs.n_target)
    (full_res, _), full_s = timed(lambda: run_ours(sampler, inputs, noise, args.steps, device), device)
    with torch.no_grad():
        _, decode_s = timed(lambda: decode_latents(vae, full_res.latents, size, size), device)
    early = []
    for s in (0.85, 0.5, 0.25):
        sp = CaptureSpec(layers=layers, sigma=s)
        (res, _), t = timed(lambda: run_ours(sampler, inputs, noise, args.steps, device, capture=sp,
                                             early_exit=True), device)
        k = nearest_step(sched, s)
        early.append({"sigma": s, "sigma_used": k.sigma, "step_index": k.index, "forwards": res.forwards,
                      "seconds": t, "speedup": full_s / t, "speedup_vs_full_with_decode": (full_s + decode_s) / t,
                      "knowledge_shape": list(res.knowledge.hidden.shape)})

    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "dtype": str(dtype).replace("torch.", ""),
        "tiny": args.tiny, "transformer_params": n_params, "build_seconds": build_s,
        "target": [size, size], "reference": [size, size], "image_tokens": inputs.n_target + refs.shape[1],
        "text_tokens": [t_pos, t_neg], "capture_layers": list(layers),
        "step": {"ours_s": s_ours, "diffusers_s": s_theirs, "ratio": s_ours / s_theirs, "target_ratio": 1.0,
                 "timing_steps": args.timing_steps, "reps": args.reps, "latents_identical": equal,
                 "max_abs_diff_finite": max_diff, "nonfinite_fraction": nonfinite_frac},
        "capture_overhead": {"forward_plain_s": f_plain, "forward_capture_s": f_hook,
                             "forward_overhead": f_hook / f_plain - 1, "run_plain_s": r_plain,
                             "run_capture_s": r_cap, "run_overhead": r_cap / r_plain - 1, "target": 0.01},
        "early_exit": {"steps": args.steps, "full_run_s": full_s, "vae_decode_s": decode_s,
                       "full_forwards": full_res.forwards,
                       "runs": early},
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    print(f"device {out['device']}  dtype {out['dtype']}  params {n_params:,}  build {build_s:.1f}s  "
          f"tokens img {out['image_tokens']} txt {t_pos}/{t_neg}")
    print(f"{'measure':<44}{'value':>14}")
    print(f"{'s/step ours (true CFG)':<44}{s_ours:>14.4f}")
    print(f"{'s/step diffusers pipeline':<44}{s_theirs:>14.4f}")
    print(f"{'ratio ours/diffusers (target <= 1.0)':<44}{s_ours / s_theirs:>14.3f}")
    print(f"{'final latents identical':<44}{str(equal):>14}")
    print(f"{'forward s plain / with capture':<44}{f'{f_plain:.4f}/{f_hook:.4f}':>14}")
    print(f"{'capture overhead per forward (< 1%)':<44}{100 * (f_hook / f_plain - 1):>13.2f}%")
    print(f"{'capture overhead per run (< 1%)':<44}{100 * (r_cap / r_plain - 1):>13.2f}%")
    print(f"{'full run s (' + str(args.steps) + ' steps) + VAE decode s':<44}{f'{full_s:.3f}+{decode_s:.3f}':>14}")
    for e in early:
        label = f"early exit sigma {e['sigma']} (step {e['step_index']}, {e['forwards']} fwd)"
        print(f"{label:<44}{e['seconds']:>10.3f}s x{e['speedup']:.2f} (x{e['speedup_vs_full_with_decode']:.2f} incl. decode)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
