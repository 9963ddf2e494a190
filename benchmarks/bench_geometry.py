"""Benchmark: the TRELLIS.2 geometry pipeline stage by stage (know3d_core.geometry_pipeline).

Full size (default, CUDA): the official architectures with random weights built directly on the GPU
(flows bf16 blocks, decoders fp16 bodies, DINOv3 ViT-L fp32), official sampler settings (12 steps,
CFG in the guidance interval, batched pairs). Random weights make occupancy and subdivision
meaningless, so the workload is fixed instead:

* the structure stage runs for real (flow + decoder), but its coords are replaced by a sphere shell
  of ``--n512`` tokens on 32^3 (``512``) or ``--n-cascade`` tokens (``1024_cascade``'s first stage);
* the shape decoder's subdivision heads are set (weights zero, biases +-4) to keep the 4 children
  of each voxel with z-bit 0: every level multiplies voxels by 4, like a surface, and the cascade's
  upsample + quantisation yields 4 HR tokens per LR token (the paper's ~2.4k -> ~9.6k); the z edge
  flags are on, so the mesh has faces.

Rows: pipeline type x offload (models on the GPU only while used). Columns: seconds per stage
(``cond`` = DINOv3 at 512 and 1024, ``sparse_structure``, ``shape_slat_512``, ``upsample``,
``shape_slat_1024``, ``decode``) and peak allocated GiB per stage (CUDA). Each row is a new object
in a warmed process: a full warm-up generation with 10 % fewer structure tokens precedes it, so the
fixed-shape work (structure stage, kernel compiles) is warm while every shape-stage token count is
new, as for the next object a ComfyUI server generates: each new token count costs torch's cuDNN
attention one execution-plan build per attention shape (~50-110 ms each on an H100; measured per
step with ``--step-times``). ``--repeat-object`` adds the same object again (every shape seen): the
steady state, which is how the reference and ComfyUI anchors were summed.

Row variants, each on token counts no earlier row used: ``--plan-ahead``, ``--flash-first-step``,
``--zero-negative`` (the pipeline's switches) and ``--host-sync`` (a device sync after every sampler step: the baseline for steps
that queue ahead); ``both`` gives a row without, then one with.

    python benchmarks/bench_geometry.py --out geometry.json            # GPU, full size
    python benchmarks/bench_geometry.py --tiny --out geometry_tiny.json   # CPU check, tiny widths
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    SHAPE_DECODER_FULL,
    SS_DECODER_FULL,
    device_name,
    flat_fan_in,
    gamma_or_norm_weight,
    random_model,
    sync,
    write_json,
)

from know3d_core.sampling.flow_euler import OFFICIAL_SAMPLER_PARAMS  # noqa: E402
from know3d_core.trellis2.loading import FULL_SIZE_FLOW_CONFIGS, PipelineConfig, get_model_class  # noqa: E402
from know3d_core.geometry_pipeline import StageTimer, Trellis2GeometryPipeline, quantize_coords  # noqa: E402
from know3d_core.trellis2.tiny import tiny_flow_args  # noqa: E402
from know3d_core.sparse.attention import _new_shapes  # noqa: E402  (its count of FlashAttention-2 first calls)

SHAPE_DECODER_512 = {**SHAPE_DECODER_FULL, "resolution": 512}
TINY_WIDTHS = dict(model_channels=32, num_blocks=2, num_heads=2, cond_channels=32)
DINO_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_register_tokens=4, patch_size=16, image_size=64, rope_theta=100.0, layer_norm_eps=1e-5)


# ----------------------------------------------------------------------------------- models
def _build(name: str, args: dict, device: torch.device, seed: int) -> torch.nn.Module:
    """Random weights: matrices N(0, 1/fan_in), norm weights / gammas 1, biases 0."""
    return random_model(get_model_class(name), args, device, seed, ones=gamma_or_norm_weight, fan_in=flat_fan_in)


def _surface_like_decoder(decoder) -> None:
    """Subdivision: keep the 4 children with z-bit 0 (child k = x + 2y + 4z); z edge flags on."""
    from know3d_core.trellis2.shape_decoder import SparseResBlockC2S3d

    keep = torch.tensor([4.0 if k < 4 else -4.0 for k in range(8)])
    with torch.no_grad():
        for module in decoder.modules():
            if isinstance(module, SparseResBlockC2S3d):
                module.to_subdiv.weight.zero_()
                module.to_subdiv.bias.copy_(keep)
        decoder.output_layer.weight[3:6].zero_()
        decoder.output_layer.bias[3:6].copy_(torch.tensor([-4.0, -4.0, 4.0]))


def build_pipeline(tiny: bool, device: torch.device, offload: bool) -> Trellis2GeometryPipeline:
    """Random-weight geometry pipeline (all models built on ``device``; moved to the CPU for offload)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from know3d_core.conditioning import DinoV3FeatureExtractor
    from know3d_core.conditioning.dinov3 import DINOV3_VITL16_CONFIG
    from know3d_core.trellis2.shape_decoder import TINY_ARGS as SHAPE_TINY
    from know3d_core.trellis2.sparse_structure_decoder import TINY_ARGS as SS_TINY

    models = {}
    for i, key in enumerate(("sparse_structure_flow_model", "shape_slat_flow_model_512", "shape_slat_flow_model_1024")):
        name, args = FULL_SIZE_FLOW_CONFIGS[key]
        if tiny:
            kind = {"sparse_structure_flow_model": "ss"}.get(key, "shape512" if "512" in key else "shape1024")
            args = {**tiny_flow_args(kind, **TINY_WIDTHS), "dtype": "float32"}
            if kind == "ss":
                args["resolution"] = 8
        models[key] = _build(name, args, device, i)
    models["sparse_structure_decoder"] = _build("SparseStructureDecoder", SS_TINY if tiny else SS_DECODER_FULL, device, 10)
    models["shape_slat_decoder"] = _build("FlexiDualGridVaeDecoder", SHAPE_TINY if tiny else SHAPE_DECODER_512,
                                          device, 11)
    _surface_like_decoder(models["shape_slat_decoder"])
    if device.type == "cpu":
        for key in ("sparse_structure_decoder", "shape_slat_decoder"):
            models[key].convert_to(torch.float32)
    config = DINOv3ViTConfig.from_dict(DINO_TINY if tiny else {**DINOV3_VITL16_CONFIG})
    config._attn_implementation = "sdpa"
    with torch.device(device):
        dino = DINOv3ViTModel(config).eval()
    samplers = {f"{k}_sampler": {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": p.sigma_min},
                                 "params": {"steps": p.steps, "guidance_strength": p.guidance_strength,
                                            "guidance_rescale": p.guidance_rescale,
                                            "guidance_interval": list(p.guidance_interval), "rescale_t": p.rescale_t}}
                for k, p in OFFICIAL_SAMPLER_PARAMS.items()}
    config = PipelineConfig(folder="<random weights>", models={k: k for k in models}, samplers=samplers,
                            normalizations={"shape_slat_normalization": {"mean": [0.0] * 32, "std": [1.0] * 32}})
    return Trellis2GeometryPipeline(models, config, DinoV3FeatureExtractor(dino), device=device, offload=offload)


# ----------------------------------------------------------------------------------- workload
def sphere_shell(grid: int, n_target: int) -> torch.Tensor:
    """``[N, 4]`` int32 voxels of a centred shell (outer radius 0.47 grid) with N closest to n_target."""
    r = torch.arange(grid, dtype=torch.float64) - (grid - 1) / 2
    dist = torch.sqrt(r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2).flatten()
    inside = dist <= 0.47 * grid
    order = torch.argsort(-torch.where(inside, dist, torch.full_like(dist, -1.0)))  # outermost first
    idx = order[: min(n_target, int(inside.sum()))].sort().values
    xyz = torch.stack([idx // grid ** 2, (idx // grid) % grid, idx % grid], 1)
    return torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1).int()


def run_row(pipe, pipeline_type: str, n_lr: int, steps, image, step_times: bool = False,
            host_sync: bool = False) -> dict:
    """One generation stage by stage (fixed structure coords); returns timings and memory.

    ``step_times``: also the wall time of every sampler step (a device sync after each step, so the
    GPU time of that step; for profiling, it removes the overlap between steps). ``host_sync``: a
    device sync after every step without timing it (the baseline of sampler steps that queue ahead:
    before session 13 every step waited for the GPU)."""
    timer = StageTimer(pipe.device)
    gen = torch.Generator().manual_seed(0)
    params = None if steps is None else {"steps": steps}
    per_step: dict = {}
    clock = [time.perf_counter()]

    def on_step(stage, step, total):
        sync(pipe.device)
        now = time.perf_counter()
        per_step.setdefault(stage, []).append(round(1000 * (now - clock[0]), 1))
        clock[0] = now

    cb = on_step if step_times else (lambda stage, step, total: sync(pipe.device)) if host_sync else None

    def start_clock():
        sync(pipe.device)
        clock[0] = time.perf_counter()
    with timer("cond"):
        cond = pipe.get_cond(image, 512)
        cond_hr = pipe.get_cond(image, 1024) if pipeline_type != "512" else None
    with timer("sparse_structure"):
        start_clock()
        pipe.sample_sparse_structure(cond, resolution=32, generator=gen, params=params, callback=cb)
    coords = sphere_shell(32, n_lr)
    tokens = {"shape_slat_512": int(coords.shape[0])}
    with timer("shape_slat_512"):
        start_clock()
        slat, res = pipe.sample_shape_slat(coords, cond, None, "512", generator=gen, params=params, callback=cb)
    if pipeline_type == "1024_cascade":
        with timer("upsample"):
            fine = pipe.upsample(slat)
            hr_coords = quantize_coords(fine, 64)
        tokens["upsample_voxels"] = int(fine.shape[0])
        tokens["shape_slat_1024"] = int(hr_coords.shape[0])
        del fine, slat
        with timer("shape_slat_1024"):
            start_clock()
            slat, res = pipe.sample_shape_slat(hr_coords, cond_hr, None, "1024", generator=gen, params=params,
                                               callback=cb)
    del cond, cond_hr
    with timer("decode"):
        mesh = pipe.decode_shape(slat, res)
    total = sum(timer.timings.values())
    return {"pipeline_type": pipeline_type, "offload": pipe.offload, "resolution": res,
            "timings_s": {k: round(v, 4) for k, v in timer.timings.items()}, "total_s": round(total, 4),
            "peak_vram_gib": {k: round(v / 2 ** 30, 3) for k, v in timer.peak_vram.items()},
            "num_tokens": tokens, "mesh_faces": mesh.num_faces, "mesh_vertices": mesh.num_vertices,
            **({"step_ms": per_step} if step_times else {})}


# --plan-ahead: the pipeline's plan_attention_ahead per row (None: its default)
PLAN_AHEAD = {"auto": [None], "on": [True], "off": [False], "both": [False, True]}
# --host-sync: a device sync after every sampler step per row (the baseline for steps that queue ahead)
HOST_SYNC = {"off": [False], "on": [True], "both": [True, False]}
# --flash-first-step / --zero-negative: the pipeline's flash_first_step / zero_negative_shortcut per row
FLASH_FIRST = ZERO_NEGATIVE = PLAN_AHEAD


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny widths on the CPU (checks the script)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--n512", type=int, default=None, help="shape tokens of the 512 type (default 8192; tiny 200)")
    ap.add_argument("--n-cascade", type=int, default=None,
                    help="first-stage tokens of 1024_cascade (default 2400; tiny 100)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default pipeline.json's 12; tiny 3)")
    ap.add_argument("--types", default="512,1024_cascade")
    ap.add_argument("--offload", default="both", choices=["both", "on", "off"])
    ap.add_argument("--step-times", action="store_true",
                    help="record every sampler step's time (device sync per step: profiling only)")
    ap.add_argument("--repeat-object", action="store_true",
                    help="also time the same object again (every shape seen): the warm steady state")
    ap.add_argument("--plan-ahead", default="auto", choices=["auto", "on", "off", "both"],
                    help="the pipeline's attention plans built ahead for the unguided steps (auto: its default, "
                         "PLAN_ATTENTION_AHEAD_BY_DEFAULT); both: a row without them first, then one with them, each "
                         "on its own new token count")
    ap.add_argument("--flash-first-step", default="auto", choices=["auto", "on", "off", "both"],
                    help="the pipeline's FlashAttention-2 first step for new attention shapes (auto: its default, "
                         "FLASH_FIRST_STEP_BY_DEFAULT); both: a row without, then one with, each on new token counts")
    ap.add_argument("--zero-negative", default="auto", choices=["auto", "on", "off", "both"],
                    help="the pipeline's one-row cross-attention for the guided pair's all-zero negative half "
                         "(auto: its default, ZERO_NEGATIVE_SHORTCUT_BY_DEFAULT); both: a row without, then one with")
    ap.add_argument("--host-sync", default="off", choices=["off", "on", "both"],
                    help="a device sync after every sampler step (on), none (off, the pipeline as it runs), or a "
                         "row with them first, then one without (both), each on its own new token count")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("CUDA is not available: use --tiny for the CPU check")
    n512 = args.n512 or (200 if args.tiny else 8192)
    n_cascade = args.n_cascade or (100 if args.tiny else 2400)
    steps = args.steps or (3 if args.tiny else None)
    from PIL import Image

    image = Image.new("RGB", (512, 512), (120, 90, 60))
    offloads = {"both": [False, True], "on": [True], "off": [False]}[args.offload]
    rows = []
    for offload in offloads:
        start = time.perf_counter()
        pipe = build_pipeline(args.tiny, device, offload)
        build_s = time.perf_counter() - start
        variants = [(a, h, f, z) for h in HOST_SYNC[args.host_sync] for z in ZERO_NEGATIVE[args.zero_negative]
                    for f in FLASH_FIRST[args.flash_first_step] for a in PLAN_AHEAD[args.plan_ahead]]
        for ptype, (ahead, hsync, flash, zero), extra in [(p, v, i * 8) for p in args.types.split(",")
                                                          for i, v in enumerate(variants)]:
            n = (n512 if ptype == "512" else n_cascade) + extra  # each row's token counts new
            if ahead is not None:
                pipe.plan_attention_ahead = ahead
            if flash is not None:
                pipe.flash_first_step = flash
            if zero is not None:
                pipe.zero_negative_shortcut = zero
            if not extra:
                n_warm = int(n * 0.9)
                run_row(pipe, ptype, n_warm, steps, image)  # warm-up: a previous object, other token counts
            flash_before = _new_shapes.flash_calls
            row = run_row(pipe, ptype, n, steps, image, args.step_times, hsync)
            row.update(warmup_tokens=n_warm, plan_attention_ahead=pipe.plan_attention_ahead,
                       flash_first_step=pipe.flash_first_step, zero_negative_shortcut=pipe.zero_negative_shortcut,
                       host_sync_each_step=hsync,
                       flash_calls=_new_shapes.flash_calls - flash_before)
            if args.repeat_object:
                again = run_row(pipe, ptype, n, steps, image, args.step_times, hsync)
                row["same_object_again"] = {k: again[k] for k in ("timings_s", "total_s", "step_ms") if k in again}
                print(f"{'(same again)':>13} total {again['total_s']:8.3f} s  "
                      + "  ".join(f"{k} {v:.3f}" for k, v in again["timings_s"].items()), flush=True)
            row["build_s"] = round(build_s, 2)
            rows.append(row)
            peak = max(row["peak_vram_gib"].values()) if row["peak_vram_gib"] else float("nan")
            print(f"{ptype:>13} offload={str(offload):5} plan_ahead={str(pipe.plan_attention_ahead):5} "
                  f"flash_first={str(pipe.flash_first_step):5}({row['flash_calls']}) "
                  f"zero_neg={str(pipe.zero_negative_shortcut):5} host_sync={str(hsync):5} "
                  f"total {row['total_s']:8.3f} s  peak {peak:6.2f} GiB  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in row["timings_s"].items())
                  + f"  tokens {row['num_tokens']}  faces {row['mesh_faces']}", flush=True)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"device": device_name(device),
              "tiny": args.tiny, "torch": torch.__version__, "steps": steps or 12, "rows": rows}
    write_json(args.out, result, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
