"""``know3d eval``: metrics of generated shapes against ground truth (torch-free at import)."""
from __future__ import annotations

import argparse
import os

from ..errors import EXIT_OK, UsageError

__all__ = ["register", "parse_variants", "check_eval_deps"]

_DESCRIPTION = """\
Compare predictions with ground truth, per item and aggregated per variant. Writes to OUT:
eval.json (settings, per-item values, mean/median/std per metric), eval.csv (one row per item),
eval.png (distributions per variant) and worst.png (the worst items: back normals, pred | gt).

Metrics: IoU of the 64^3 surface occupancy and of the mesh's surface voxels at --mesh-resolution;
Chamfer distance (L1) and F-score at --tau on --points farthest-point samples of --samples surface
points after HY3D-Bench's unit-sphere normalisation; the same restricted to the back half (y > 0 in
model space: behind the centre as the front camera, at -Y, sees it); back-view normal-map PSNR and
SSIM, and LPIPS when --lpips-backbone and --lpips-heads are given. Full definitions: know3d_core/eval/."""


def parse_variants(values):
    """``["NAME=DIR" | "DIR", ...]`` -> ``{name: dir}`` (a bare DIR is named after its folder)."""
    out = {}
    for text in values:
        name, sep, path = text.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(text)) or "pred", text
        if not name or not path:
            raise UsageError(f"--pred {text!r}: give DIR or NAME=DIR")
        if name in out:
            raise UsageError(f"--pred: variant name {name!r} given twice; use NAME=DIR to name them apart")
        out[name] = path
    return out


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="metrics of generated shapes against ground truth (IoU, CD, F-score, "
                                          "back half, normal maps)", description=_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", action="append", required=True, metavar="[NAME=]DIR",
                   help="predictions: item folders (mesh.* and/or occupancy_64.safetensors, record.json "
                        "'gt' naming the ground truth), mesh files, or a dataset; repeat for several variants")
    p.add_argument("--gt", required=True, metavar="DIR", help="ground truth: a dataset (know3d data prepare), "
                   "item folders or mesh files")
    p.add_argument("--out", required=True, metavar="DIR", help="report folder (created)")
    p.add_argument("--samples", type=_positive, default=300_000, help="surface samples per shape (default: %(default)s)")
    p.add_argument("--points", type=_positive, default=8192, help="farthest-point samples (default: %(default)s)")
    p.add_argument("--tau", type=float, default=0.05, help="F-score threshold in unit-sphere units (default: %(default)s)")
    p.add_argument("--mesh-resolution", type=_positive, default=128,
                   help="grid of the mesh surface-voxel IoU (default: %(default)s)")
    p.add_argument("--normalize", choices=("gt", "each"), default="gt",
                   help="unit-sphere transform: the ground truth's for both shapes (same frame; default) or "
                        "each shape's own (outputs in arbitrary frames)")
    p.add_argument("--image-size", type=_positive, default=256, help="normal-map side in pixels (default: %(default)s)")
    p.add_argument("--up", choices=("y", "z"), help="up axis of glb/obj/ply files (default: y, the pack's export)")
    p.add_argument("--lpips-backbone", metavar="FILE",
                   help="torchvision ImageNet checkpoint: alexnet-owt-7be5be79.pth (--lpips-net alex) or "
                        "vgg16-397923af.pth (vgg); with --lpips-heads enables LPIPS")
    p.add_argument("--lpips-heads", metavar="FILE", help="the lpips package's weights/v0.1/alex.pth or vgg.pth")
    p.add_argument("--lpips-net", choices=("alex", "vgg"), default="alex", help="(default: %(default)s)")
    p.add_argument("--worst", type=int, default=12, help="items on the worst-items sheet (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="surface sampling seed (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_eval_command)


def _check_files(opts) -> None:
    if bool(opts.lpips_backbone) != bool(opts.lpips_heads):
        raise UsageError("LPIPS needs both --lpips-backbone and --lpips-heads (or neither)")
    for flag, path in (("--lpips-backbone", opts.lpips_backbone), ("--lpips-heads", opts.lpips_heads)):
        if path and not os.path.isfile(path):
            raise UsageError(f"{flag} {path} does not exist")
    if not opts.tau > 0:
        raise UsageError(f"--tau {opts.tau}: must be > 0")


def check_eval_deps() -> None:
    """UsageError naming the extra when a package ``know3d eval`` needs is missing (fpsample is optional)."""
    import importlib.util

    missing = [m for m in ("torchmetrics", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"know3d eval needs {', '.join(missing)}: pip install 'comfyui-know3d[eval]'")


def run_eval_command(opts) -> int:
    variants = parse_variants(opts.pred)
    _check_files(opts)
    check_eval_deps()
    from .evaluate import EvalSettings
    from .report import format_table
    from .run import run_eval

    lpips = None
    if opts.lpips_backbone:
        from .lpips import LPIPS

        try:
            lpips = LPIPS.from_files(opts.lpips_backbone, opts.lpips_heads, opts.lpips_net).to(opts.device)
        except ValueError as e:
            raise UsageError(str(e)) from None
    settings = EvalSettings(samples=opts.samples, points=opts.points, tau=opts.tau,
                            mesh_resolution=opts.mesh_resolution, normalize=opts.normalize,
                            image_size=opts.image_size, seed=opts.seed, device=opts.device,
                            lpips_net=opts.lpips_net if lpips is not None else None)
    report = run_eval(variants, opts.gt, opts.out, settings, lpips=lpips, worst=opts.worst, up=opts.up,
                      progress=not opts.quiet)
    print(format_table(report["aggregate"]))
    print(f"wrote {os.path.join(opts.out, 'eval.json')}, eval.csv, eval.png"
          + (", worst.png" if report.get("worst_metric") else ""))
    return EXIT_OK
