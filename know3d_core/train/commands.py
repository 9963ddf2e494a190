"""``know3d train TASK --data DATASET --out RUN``: the training command family (torch-free at import).

Tasks: ``know3d`` (Know3D branch + backbone LoRA on one TRELLIS.2 flow stage), ``trellis2`` (plain
fine-tuning of one flow stage), ``backview`` (LoRA on Qwen-Image-Edit-2511's MMDiT). Launch on
several GPUs or nodes with torchrun: ``torchrun --nproc_per_node 8 -m know3d_core.cli train ...``.
Exit codes: 0 done (or stopped by --stop-after with a checkpoint), 1 training failed (e.g. a
NaN/inf loss: the last good checkpoint stays), 2 bad input found before training (or out of memory).
"""
from __future__ import annotations

import argparse
import json
import sys

from ..argtypes import size as _pair
from ..errors import EXIT_FAILED, EXIT_OK, UsageError
from .config import KNOWLEDGE_SOURCES

__all__ = ["register", "cmd_train", "cmd_export_pairs", "config_from_options"]

_EPILOG = """\
examples:
  know3d train know3d --stage ss --data ds --models TRELLIS.2-4B --qwen Qwen-Image-Edit-2511 --out runs/ss
  know3d train know3d --stage shape512 --init runs/ss/export/know3d.safetensors --data ds --models M --qwen Q --out runs/s512
  know3d train trellis2 --stage shape512 --data ds --models M --out runs/ft
  know3d train backview --data ds --qwen Q --out runs/bv
  torchrun --nproc_per_node 8 -m know3d_core.cli train know3d --stage ss ... (same flags on every node)
Outputs: RUN/export/ (know3d.safetensors | TRELLIS.2/ | backview_lora.safetensors), RUN/metrics.csv,
RUN/tensorboard/, RUN/loss.png, RUN/checkpoints/ (resume with --resume)."""


def _ints(text: str):
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one index")
    return values


def _probability(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a probability in [0, 1]")
    return v


def register(sub) -> None:
    p = sub.add_parser("train", help="train Know3D, fine-tune TRELLIS.2 or the back-view LoRA on a prepared dataset",
                       description=__doc__.split("\n\n")[0], epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=("know3d", "trellis2", "backview", "knowledge"),
                   help="what to train; 'knowledge' only fills --knowledge-cache for every pair (know3d's "
                        "knowledge flags; under torchrun each process takes its share) and exits")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset made by 'know3d data prepare'")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder (checkpoints, logs, export/)")
    g = p.add_argument_group("models")
    g.add_argument("--models", metavar="DIR", help="TRELLIS.2 folder (know3d, trellis2)")
    g.add_argument("--qwen", metavar="DIR", help="Qwen-Image-Edit-2511 diffusers folder (know3d knowledge, backview)")
    g.add_argument("--dinov3", metavar="DIR", help="DINOv3 folder (default: in or beside --models)")
    g.add_argument("--stage", default="ss", choices=("ss", "shape512", "shape1024"),
                   help="flow stage (know3d, trellis2); train ss first (default: ss)")
    g.add_argument("--init", metavar="FILE", help="know3d: continue from an earlier stage's know3d.safetensors")
    g.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (default 64, the paper's)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    g.add_argument("--full", action="store_true", help="trellis2: train every weight instead of a LoRA")
    k = p.add_argument_group("knowledge (know3d)")
    k.add_argument("--knowledge-source", default="trajectory", choices=KNOWLEDGE_SOURCES,
                   help="trajectory: MMDiT hidden states captured while the back view is sampled as inference "
                        "does (default); gt_latent: hidden states of one forward on the ground-truth back latent "
                        "noised to sigma (cheaper); latent: the denoised back-view latent (vae_latent knowledge); "
                        "image: DINOv3 features of the decoded back view (dino_image knowledge)")
    k.add_argument("--knowledge-cache", metavar="DIR", help="per-pair knowledge files (default RUN/cache/knowledge; "
                   "shareable between runs and processes; 75 MB a pair at full size in bf16); 'off': "
                   "computed for every micro-batch, nothing written")
    k.add_argument("--knowledge-seeds", type=int, default=1, metavar="N",
                   help="back-view noise seeds per pair (default 1): each time a pair is used, one of its N "
                        "knowledge samples (N times the knowledge cost and cache); with few pairs and many "
                        "epochs one sample per pair lets the branch learn that sample's noise instead of the "
                        "description (generation draws a new seed every time)")
    k.add_argument("--sigma", type=float, help="capture noise level (default 0.25, or --init's)")
    k.add_argument("--layers", type=_ints, help="MMDiT blocks to capture, e.g. 20,30,40 (default: 1/3, 1/2, 2/3 depth)")
    k.add_argument("--back-steps", type=int, default=40, help="back-view sampling steps (trajectory; default 40)")
    k.add_argument("--back-size", type=_pair, help="back-view HxW (default 1024x1024)")
    k.add_argument("--true-cfg-scale", type=float, default=4.0, help="back-view true CFG (default 4.0)")
    k.add_argument("--vae-image-area", type=int, metavar="PIXELS",
                   help="area of the VAE copy of the front image (default 1024*1024, as generation)")
    k.add_argument("--backview-lora", action="append", default=[], metavar="FILE",
                   help="back-view LoRA merged into Qwen for the knowledge (repeatable)")
    k.add_argument("--p-uncond-knowledge", type=_probability, default=0.1,
                   help="knowledge dropout per micro-batch (default 0.1)")
    b = p.add_argument_group("back view (backview)")
    b.add_argument("--p-description", type=_probability, default=0.5,
                   help="probability that one annotation is appended to the camera prompt (default 0.5)")
    b.add_argument("--image-size", type=_pair, help="back-view training size HxW (default 1024x1024)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1000, help="optimiser steps in all (default 1000)")
    o.add_argument("--stop-after", type=int, help="stop this invocation after N steps (checkpoint; resume later)")
    o.add_argument("--batch-size", type=int, default=2, help="micro-batch per process (default 2)")
    o.add_argument("--max-tokens", type=int, default=8192,
                   help="voxel-token budget per micro-batch of the shape stages (default 8192, the reference's)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step and process (default 1)")
    o.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    o.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    o.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    o.add_argument("--ema-rate", type=float, default=0.9999, help="EMA rate (default 0.9999)")
    o.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (default 1.0; 0: off)")
    o.add_argument("--p-uncond", type=_probability, default=0.1, help="image-condition dropout (default 0.1)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--export-weights", choices=("model", "ema"), default="model",
                   help="which weights the export holds (default: model; ema for long runs)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK when available)")
    r.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    r.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations (less memory)")
    r.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (torchrun, several processes)")
    r.add_argument("--no-fused-kernels", action="store_true",
                   help="CUDA: train with the PyTorch ops instead of the fused Triton kernels (A/B checks)")
    r.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    r.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    r.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (default 2)")
    r.add_argument("--log-every", type=int, default=10, help="steps between metrics.csv flushes (default 10)")
    r.add_argument("--val-every", type=int, default=0, metavar="N",
                   help="every N steps (and at the end) a validation sheet RUN/validation/step_*.png: normal "
                        "renders of meshes from held-out pairs, with and without knowledge (know3d, trellis2)")
    r.add_argument("--val-pairs", type=int, default=4, help="held-out pairs on the sheet (default 4)")
    r.add_argument("--val-steps", type=int, default=12, help="sampler steps of the sheet's meshes (default 12)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_train)

    e = sub.add_parser("export-pairs", help="write the back-view pairs for DiffSynth-Studio or musubi-tuner",
                       description="Write the dataset's back-view pairs (preprocessed front = control image, back = "
                                   "target) with a metadata file in the trainer's format: diffsynth -> metadata.json "
                                   "({prompt, image, edit_image}), musubi -> metadata.jsonl ({image_path, "
                                   "control_path, caption}). One row per pair with the camera prompt alone and one "
                                   "per annotation.")
    e.add_argument("--data", required=True, metavar="DIR", help="dataset made by 'know3d data prepare'")
    e.add_argument("--format", required=True, choices=("diffsynth", "musubi"))
    e.add_argument("--out", required=True, metavar="DIR")
    e.set_defaults(run=cmd_export_pairs)


def config_from_options(opts):
    from .config import TrainConfig

    return TrainConfig(
        task=opts.task, data=opts.data, out=opts.out, models=opts.models, qwen=opts.qwen, dinov3=opts.dinov3,
        stage=opts.stage, steps=opts.steps, stop_after=opts.stop_after, batch_size=opts.batch_size,
        max_tokens=opts.max_tokens, grad_accum=opts.grad_accum, lr=opts.lr, weight_decay=opts.weight_decay,
        warmup_steps=opts.warmup_steps, ema_rate=opts.ema_rate, grad_clip=opts.grad_clip, p_uncond=opts.p_uncond,
        p_uncond_knowledge=opts.p_uncond_knowledge, seed=opts.seed, device=opts.device, precision=opts.precision,
        grad_checkpointing=opts.grad_checkpointing, fsdp=opts.fsdp, fused_kernels=not opts.no_fused_kernels,
        num_workers=opts.num_workers, checkpoint_every=opts.checkpoint_every,
        keep_checkpoints=opts.keep_checkpoints, log_every=opts.log_every, val_every=opts.val_every,
        val_pairs=opts.val_pairs, val_steps=opts.val_steps, resume=opts.resume,
        progress=not opts.no_progress, export_weights=opts.export_weights, lora_rank=opts.lora_rank,
        lora_alpha=opts.lora_alpha, full=opts.full, init=opts.init, knowledge_source=opts.knowledge_source,
        knowledge_cache=opts.knowledge_cache, knowledge_seeds=opts.knowledge_seeds, sigma=opts.sigma,
        layers=opts.layers, back_steps=opts.back_steps,
        back_size=opts.back_size, true_cfg_scale=opts.true_cfg_scale, vae_image_area=opts.vae_image_area,
        backview_loras=tuple(opts.backview_lora),
        p_description=opts.p_description, image_size=opts.image_size)


def make_task(cfg):
    if cfg.task == "backview":
        from .backview import BackViewTask

        return BackViewTask()
    from .flows import FlowTask

    return FlowTask(branch=cfg.task == "know3d")


def cmd_train(opts) -> int:
    from .engine import TrainingDiverged, train

    cfg = config_from_options(opts)
    if cfg.knowledge_seeds < 1:
        raise UsageError(f"--knowledge-seeds must be >= 1, got {cfg.knowledge_seeds}")
    if cfg.task == "knowledge":
        from .flows import fill_knowledge_cache

        print(json.dumps(fill_knowledge_cache(cfg)))
        return EXIT_OK
    if cfg.lora_rank < 1:
        raise UsageError(f"--lora-rank must be >= 1, got {cfg.lora_rank}")
    try:
        summary = train(make_task(cfg), cfg)
    except TrainingDiverged as exc:
        print(f"know3d train: stopped: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps({k: summary[k] for k in ("step", "loss", "exported", "checkpoint")}))
    return EXIT_OK


def cmd_export_pairs(opts) -> int:
    from .backview import export_pairs

    print(export_pairs(opts.data, opts.out, opts.format))
    return EXIT_OK
