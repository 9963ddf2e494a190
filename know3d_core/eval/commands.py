"""``know3d eval``: metrics of generated shapes against ground truth (torch-free at import)."""
from __future__ import annotations

import argparse
import os

from ..argtypes import positive_int as _positive
from ..argtypes import size as _size
from ..errors import EXIT_OK, UsageError

__all__ = ["register", "parse_variants", "check_eval_deps", "similarity_metrics"]

_DESCRIPTION = """\
Compare predictions with ground truth, per item and aggregated per variant. Writes to OUT:
eval.json (settings, per-item values, mean/median/std per metric), eval.csv (one row per item),
eval.png (distributions per variant) and worst.png (the worst items: back normals, pred | gt).

Metrics: IoU of the 64^3 surface occupancy and of the mesh's surface voxels at --mesh-resolution;
Chamfer distance (L1) and F-score at --tau on --points farthest-point samples of --samples surface
points after HY3D-Bench's unit-sphere normalisation; the same restricted to the back half (y > 0 in
model space: behind the centre as the front camera, at -Y, sees it); back-view normal-map PSNR and
SSIM, and LPIPS when --lpips-backbone and --lpips-heads are given; with --uni3d and --uni3d-clip
and/or --ulip2 (and --ulip2-clip), the paper's image-to-shape similarities (cosine of the shape's
and the input front view's embeddings: uni3d / ulip2 for the prediction, uni3d_gt / ulip2_gt for the
ground truth with the same image). Full definitions: know3d_core/eval/."""


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
    p.add_argument("--uni3d", metavar="FILE",
                   help="Uni3D checkpoint (model.pt of BAAI/Uni3D modelzoo/uni3d-{ti,s,b,l,g}, or its tensors as "
                        ".safetensors); with --uni3d-clip adds the columns uni3d and uni3d_gt")
    p.add_argument("--uni3d-clip", metavar="FILE",
                   help="OpenCLIP EVA02-E-14-plus weights (open_clip_pytorch_model.bin of "
                        "timm/eva02_enormous_patch14_plus_clip_224.laion2b_s9b_b144k): Uni3D's image encoder")
    p.add_argument("--ulip2", metavar="FILE",
                   help="ULIP-2 PointBERT checkpoint (the 10k-point colored-pc model, or its tensors as .safetensors); "
                        "adds the columns ulip2 and ulip2_gt")
    p.add_argument("--ulip2-clip", metavar="FILE",
                   help="OpenCLIP ViT-bigG-14 weights (open_clip_pytorch_model.bin of laion2b_s39b_b160k): ULIP-2's "
                        "image encoder (default: the --ulip2 file, when it holds open_clip_model.visual.*)")
    p.add_argument("--similarity-points", type=_positive, default=10_000,
                   help="surface points per shape for --uni3d / --ulip2 (default: %(default)s, the references')")
    p.add_argument("--worst", type=int, default=12, help="items on the worst-items sheet (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="surface sampling seed (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_eval_command)
    _register_experiment(subparsers)


_EXPERIMENT = """\
The small-scale Know3D experiment (know3d_core/eval/experiment.py): procedural objects with one
front and K possible backs -> data prepare -> train trellis2 (base structure flow) -> train know3d
(per knowledge source / capture sigma) -> generate every held-out front with each of the K
descriptions -> know3d eval + prompt-swap accuracy. Random-initialised small networks; nothing is
downloaded. Writes OUT/experiment.json, experiment.md (the table), prompts.png, eval/ and the runs.
--smoke is the CPU check CI runs (every stage, meaningless numbers)."""


def _register_experiment(subparsers) -> None:
    p = subparsers.add_parser("experiment", help="small-scale Know3D experiment: does the text control the back?",
                              description=_EXPERIMENT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--smoke", action="store_true", help="tiny CPU settings (CI)")
    p.add_argument("--prepare-only", action="store_true",
                   help="make the inputs (procedural assets, renders, codec latents, models) in --out and stop: "
                        "renders need OpenGL, so a GPU run can start from inputs made elsewhere (same sizes and seed)")
    p.add_argument("--train-seeds", type=_positive, help="objects (fronts) to train on")
    p.add_argument("--val-seeds", type=_positive, help="held-out fronts to evaluate")
    p.add_argument("--features", help="comma-separated back features (K of them; default flat_back,handle,slats,shelf)")
    p.add_argument("--latent-grid", type=_positive, help="structure latent grid R (8 x R^3; occupancy 2R)")
    p.add_argument("--model-channels", type=_positive)
    p.add_argument("--num-blocks", type=_positive)
    p.add_argument("--num-heads", type=_positive)
    p.add_argument("--backview-steps", type=int, help="back-view LoRA steps (0: none)")
    p.add_argument("--base-steps", type=_positive)
    p.add_argument("--know3d-steps", type=_positive)
    p.add_argument("--batch-size", type=_positive)
    p.add_argument("--lr", type=float)
    p.add_argument("--back-steps", type=_positive)
    p.add_argument("--back-size", type=_size, help="back-view HxW in pixels (default 32x32: 4 MMDiT tokens)")
    p.add_argument("--sample-steps", type=_positive)
    p.add_argument("--render-size", type=_positive)
    p.add_argument("--text-gain", type=float, help="scale of the random MMDiT's text values on top of the demo's "
                   "(default 1; a trained back-view model follows its description, a random one barely does)")
    p.add_argument("--sigmas", help="capture-sigma sweep, e.g. 0.85,0.5,0.25,0.1 (default: none)")
    p.add_argument("--rows", help="rows, comma-separated (default hidden,hidden_gt,latent,image,multiview,none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--progress", action="store_true", help="training / eval progress bars")
    p.add_argument("--time-budget", type=float, default=0.0, metavar="S",
                   help="size the trainings from a measured step time to fit S seconds and skip the rows that "
                        "would end later, judged by the last row of the same kind (reported; default: no limit)")
    p.add_argument("--fixed-steps", action="store_true",
                   help="with --time-budget: keep --base-steps / --know3d-steps as given; the budget only skips rows")
    p.add_argument("--know3d-front-azimuth", type=float, metavar="DEG",
                   help="Know3D rows train on the pairs whose front view is within DEG degrees of azimuth 0 (the "
                        "objects' front, the view every row is evaluated from; default: every pair)")
    p.add_argument("--know3d-batch-size", type=_positive, help="the Know3D rows' batch (default --batch-size)")
    p.add_argument("--knowledge-seeds", type=_positive, help="back-view noise seeds per training pair of the Know3D "
                   "rows (know3d train --knowledge-seeds; default 1)")
    p.set_defaults(run=run_experiment_command)


def run_experiment_command(opts) -> int:
    # no check_eval_deps(): the experiment's metrics need neither torchmetrics (no meshes) nor
    # matplotlib (eval.png is left out without it)
    from .experiment import ROWS, SIGMA_ROW, SMOKE, ExperimentConfig, check_row, format_table, run_experiment

    kw = dict(SMOKE) if opts.smoke else {}
    for name in ("train_seeds", "val_seeds", "latent_grid", "model_channels", "num_blocks", "num_heads",
                 "backview_steps", "base_steps", "know3d_steps", "batch_size", "lr", "back_steps", "sample_steps", "render_size",
                 "num_workers", "back_size", "text_gain", "know3d_front_azimuth", "know3d_batch_size",
                 "knowledge_seeds"):
        if getattr(opts, name) is not None:
            kw[name] = getattr(opts, name)
    if opts.features:
        from ..data.synthetic import FEATURES

        feats = tuple(f.strip() for f in opts.features.split(",") if f.strip())
        bad = [f for f in feats if f not in FEATURES]
        if bad or len(feats) < 2:
            raise UsageError(f"--features {opts.features!r}: give at least 2 of {', '.join(FEATURES)}")
        kw["features"] = feats
    if opts.sigmas:
        try:
            kw["sigmas"] = tuple(float(v) for v in opts.sigmas.split(","))
        except ValueError:
            raise UsageError(f"--sigmas {opts.sigmas!r}: comma-separated numbers in (0, 1)") from None
    if opts.rows:
        rows = tuple(r.strip() for r in opts.rows.split(",") if r.strip())
        if not rows or not all(check_row(r) for r in rows):
            raise UsageError(f"--rows {opts.rows!r}: choose from {', '.join(ROWS)} or {SIGMA_ROW}<s> (a capture "
                             f"sigma in (0, 1), e.g. {SIGMA_ROW}0.5)")
        kw["rows"] = rows
    if kw.get("latent_grid") and 64 % (2 * kw["latent_grid"]):
        raise UsageError(f"--latent-grid {kw['latent_grid']}: 2R must divide 64 (R = 2, 4, 8, 16 or 32)")
    cfg = ExperimentConfig(out=opts.out, device=opts.device, seed=opts.seed, progress=opts.progress,
                           time_budget=opts.time_budget, fit_steps=not opts.fixed_steps, **kw)
    if opts.prepare_only:
        from .experiment import prepare_inputs

        prepare_inputs(cfg, os.path.abspath(opts.out))
        print(f"inputs ready in {opts.out} (inputs.json states their sizes)")
        return EXIT_OK
    result = run_experiment(cfg)
    print(format_table(result))
    print(f"device {result['device']}, {result['seconds']} s; wrote {os.path.join(opts.out, 'experiment.json')}, "
          "experiment.md, prompts.png")
    return EXIT_OK


def _check_files(opts) -> None:
    if bool(opts.lpips_backbone) != bool(opts.lpips_heads):
        raise UsageError("LPIPS needs both --lpips-backbone and --lpips-heads (or neither)")
    for flag, path in (("--lpips-backbone", opts.lpips_backbone), ("--lpips-heads", opts.lpips_heads)):
        if path and not os.path.isfile(path):
            raise UsageError(f"{flag} {path} does not exist")
    if bool(opts.uni3d) != bool(opts.uni3d_clip):
        raise UsageError("the Uni3D similarity needs both --uni3d (point encoder) and --uni3d-clip (its image "
                         "encoder, OpenCLIP EVA02-E-14-plus), or neither")
    if opts.ulip2_clip and not opts.ulip2:
        raise UsageError("--ulip2-clip is ULIP-2's image encoder: give --ulip2 (its point encoder) too")
    for flag in ("uni3d", "uni3d_clip", "ulip2", "ulip2_clip"):
        path = getattr(opts, flag)
        if path and not os.path.isfile(path):
            raise UsageError(f"--{flag.replace('_', '-')} {path} does not exist "
                             "(README: 3. Evaluate, image-to-shape similarity)")
    if not opts.tau > 0:
        raise UsageError(f"--tau {opts.tau}: must be > 0")


def check_eval_deps() -> None:
    """UsageError naming the extra when a package ``know3d eval`` needs is missing (fpsample is optional)."""
    import importlib.util

    missing = [m for m in ("torchmetrics", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"know3d eval needs {', '.join(missing)}: pip install 'comfyui-know3d[eval]'")


def similarity_metrics(opts) -> list:
    """The image-to-shape similarities asked for (``--uni3d``, ``--ulip2``); their weights load
    (strictly) after the items' front views are found, and a wrong file is a UsageError naming it."""
    from .similarity import ImageShapeSimilarity

    def loader(point_cls, tower_cls, point_path, tower_path):
        def load():
            from .weights import WeightsError

            try:
                return point_cls.from_file(point_path), tower_cls.from_file(tower_path)
            except WeightsError as e:
                raise UsageError(str(e)) from None
        return load

    out = []
    if opts.uni3d:
        from .uni3d import ClipImageTower, Uni3D

        out.append(ImageShapeSimilarity("uni3d", loader(Uni3D, ClipImageTower, opts.uni3d, opts.uni3d_clip),
                                        opts.device, opts.similarity_points, opts.seed,
                                        {"checkpoint": os.path.abspath(opts.uni3d), "clip": os.path.abspath(opts.uni3d_clip)}))
    if opts.ulip2:
        from .ulip2 import ClipViTTower, Ulip2

        clip = opts.ulip2_clip or opts.ulip2
        out.append(ImageShapeSimilarity("ulip2", loader(Ulip2, ClipViTTower, opts.ulip2, clip),
                                        opts.device, opts.similarity_points, opts.seed,
                                        {"checkpoint": os.path.abspath(opts.ulip2), "clip": os.path.abspath(clip)}))
    return out


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
    item_metrics = similarity_metrics(opts)
    report = run_eval(variants, opts.gt, opts.out, settings, lpips=lpips, worst=opts.worst, up=opts.up,
                      progress=not opts.quiet, item_metrics=item_metrics)
    print(format_table(report["aggregate"], extra=[n for m in item_metrics for n in m.names]))
    print(f"wrote {os.path.join(opts.out, 'eval.json')}, eval.csv, eval.png"
          + (", worst.png" if report.get("worst_metric") else ""))
    return EXIT_OK
