"""``know3d data synth | prepare | annotate | show``: build a Know3D training set (torch-free at import)."""
from __future__ import annotations

import argparse
import os

from ..argtypes import positive_int as _positive
from ..errors import EXIT_OK, UsageError

__all__ = ["register"]

_PREPARE = """\
Turn a folder of GLB / glTF / OBJ / PLY assets into a training set (layout: know3d_core/data/layout.py):
per asset (keyed by SHA-256) a normalised mesh, RGBA renders with cameras, front/back pairs
(back-view set: 12 azimuths -> 6 pairs; 3D sets: 45 degree spacing -> 4 pairs + 4 perturbed pairs),
back-view annotations, O-Voxel dual grids, 64^3 occupancy and TRELLIS.2 latents, plus manifest.jsonl.

Steps: mesh, render, annotate, voxelize, encode. Bad assets (empty, no faces, NaN vertices, zero
extent, too many faces, missing or broken textures) are recorded with the reason and skipped.
Resumable: finished assets and steps are skipped, temporaries of a killed run are removed. --shard K/N
deals the sorted files round-robin like 'know3d batch', so shards share OUT with no coordination."""


def _shard(text: str):
    from ..batch import BatchError, parse_shard

    try:
        return parse_shard(text)
    except BatchError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _steps(text: str):
    from . import layout

    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in layout.STEPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: steps are {', '.join(layout.STEPS)} (comma-separated)")
    return names


def _pair_sets(text: str):
    from . import layout

    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if not names or any(n not in layout.PAIR_SETS for n in names):
        raise argparse.ArgumentTypeError(f"{text!r}: pair sets are {', '.join(layout.PAIR_SETS)} (comma-separated)")
    return names


def _resolutions(text: str):
    from . import layout

    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers, e.g. 256,512") from None
    if not values or any(v not in layout.DUAL_GRID_RESOLUTIONS for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(map(str, layout.DUAL_GRID_RESOLUTIONS))}")
    return values


def _add_step_options(p) -> None:
    p.add_argument("--shard", type=_shard, default=(1, 1), metavar="K/N", help="run the K-th of N slices (default 1/1)")
    p.add_argument("--max-faces", type=_positive, default=2_000_000, help="skip assets with more faces (default: %(default)s)")
    p.add_argument("--up", choices=("y", "z"), default="y", help="up axis of OBJ / PLY files (glTF is always Y up)")
    p.add_argument("--size", type=_positive, default=512, help="render size in pixels (512 or 1024; default: %(default)s)")
    p.add_argument("--renderer", choices=("opengl", "blender"), default="opengl",
                   help="opengl: moderngl on headless EGL (GPU driver or Mesa); blender: Cycles on the CPU "
                        "through bpy (pip install 'comfyui-know3d[blender]', Python 3.11)")
    p.add_argument("--annotations", metavar="FILE", help="import annotations from JSONL / CSV (default: "
                   "INPUT/annotations.jsonl when present); see 'know3d data annotate --help'")
    p.add_argument("--annotator", metavar="DIR", help="Qwen2.5-VL-7B-Instruct or Qwen-Image-Edit-2511 folder: "
                   "annotate back views with it (needs the language head)")
    p.add_argument("--annotate-sets", type=_pair_sets, default=None, metavar="SET[,SET]",
                   help="pair sets the annotator looks at (backview, 3d, 3d_perturbed; default: all)")
    p.add_argument("--resolutions", type=_resolutions, default=(256,), metavar="R[,R]",
                   help="dual-grid resolutions of the voxelize / encode steps (256, 512, 1024; default 256)")
    p.add_argument("--trellis2", metavar="DIR", help="encode step: folder with TRELLIS.2's encoders "
                   "(ckpts/shape_enc_next_dc_f16c32_fp16.* from TRELLIS.2-4B, ss_enc_conv3d_16l8_fp16.* from "
                   "TRELLIS-image-large)")
    p.add_argument("--device", default="cpu", help="torch device of the annotate / voxelize / encode steps")
    p.add_argument("--retry-failed", action="store_true", help="try failed assets again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub) -> None:
    """Add ``data`` (synth, prepare, annotate, show) to the ``know3d`` sub-parsers."""
    data = sub.add_parser("data", help="build a training set: synth | prepare | annotate | show",
                          description="Know3D training data from your own 3D assets (see README: Train your own Know3D).")
    dsub = data.add_subparsers(dest="data_command", metavar="STEP", parser_class=type(data))
    data.set_defaults(run=lambda opts: (data.print_help(), 2)[1])

    s = dsub.add_parser("synth", help="write procedural GLB assets (one front, named backs) with annotations",
                        description="Write SEEDS x FEATURES procedural objects as GLB plus annotations.jsonl, for tests "
                                    "and small experiments. Objects of one seed share their front; the feature "
                                    "changes the back.")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--seeds", type=_positive, default=4, help="number of seeds (fronts; default: %(default)s)")
    s.add_argument("--first-seed", type=int, default=0)
    s.add_argument("--features", default=None, help="comma-separated subset of the features (default: all)")
    s.set_defaults(run=_run_synth)

    p = dsub.add_parser("prepare", help="a folder of 3D assets -> the training set (resumable, shardable)",
                        description=_PREPARE, formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="example: know3d data prepare --input assets/ --out dataset/ --shard 2/8 --device cuda:0")
    p.add_argument("--input", required=True, metavar="DIR", help="folder of .glb / .gltf / .obj / .ply (recursive)")
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder (created; shared by shards)")
    p.add_argument("--only", type=_steps, metavar="STEP[,STEP]", help="run (and redo where done) only these steps")
    p.add_argument("--skip", type=_steps, metavar="STEP[,STEP]", help="leave these steps out")
    _add_step_options(p)
    p.set_defaults(run=_run_prepare)

    a = dsub.add_parser("annotate", help="(re)write back-view annotations of a prepared dataset",
                        description="Annotate every rendered pair of DATASET: import from --annotations (JSONL rows "
                                    "{\"file\" or \"sha256\", \"annotations\": [..], optional \"feature\", optional "
                                    "\"back\": \"views/006.png\"}; CSV with the same columns, annotations as a JSON "
                                    "list or ';'-separated) or ask Qwen2.5-VL (--annotator). Malformed answers are "
                                    "retried once, then recorded in pairs.json (annotation_error).")
    a.add_argument("--dataset", required=True, metavar="DIR")
    _add_step_options(a)
    a.set_defaults(run=_run_annotate)

    w = dsub.add_parser("show", help="counts and a contact sheet of a dataset",
                        description="Print counts (ok, failed by reason, pairs, voxels, tokens) and write a contact "
                                    "sheet: per asset a front/back pair, the voxelisation as normal renders and the "
                                    "annotations.")
    w.add_argument("--dataset", required=True, metavar="DIR")
    w.add_argument("--out", metavar="PNG", help="contact sheet path (default: DATASET/contact_sheet.png)")
    w.add_argument("--max-assets", type=_positive, default=24)
    w.set_defaults(run=_run_show)


def _options(opts, input_dir: str, out: str, steps, force):
    from .prepare import PrepareOptions

    return PrepareOptions(input=input_dir, out=out, steps=tuple(steps), force=tuple(force), shard=opts.shard,
                          max_faces=opts.max_faces, up=opts.up, render_size=opts.size,
                          renderer=opts.renderer, annotations=opts.annotations,
                          annotator=opts.annotator, resolutions=opts.resolutions, trellis2=opts.trellis2, device=opts.device,
                          retry_failed=opts.retry_failed, progress=not opts.no_progress,
                          **({"annotate_sets": opts.annotate_sets} if opts.annotate_sets else {}))


def _print_counts(out: str) -> None:
    from .prepare import read_records
    from .show import dataset_counts, format_counts

    print(format_counts(dataset_counts(read_records(out), out)))


def _run_synth(opts) -> int:
    from .synthetic import FEATURES, write_dataset_folder

    features = FEATURES if opts.features is None else tuple(f.strip() for f in opts.features.split(",") if f.strip())
    bad = [f for f in features if f not in FEATURES]
    if bad or not features:
        raise UsageError(f"--features {opts.features!r}: choose from {', '.join(FEATURES)}")
    paths = write_dataset_folder(opts.out, range(opts.first_seed, opts.first_seed + opts.seeds), features)
    print(f"wrote {len(paths)} assets and annotations.jsonl to {opts.out}")
    return EXIT_OK


def _run_prepare(opts) -> int:
    from .prepare import prepare, select_steps

    steps = select_steps(opts.only, opts.skip)
    if opts.annotator:
        from .annotate import resolve_annotator_dirs

        resolve_annotator_dirs(opts.annotator)  # fail before slow work
    counts = prepare(_options(opts, opts.input, opts.out, steps, opts.only or ()))
    print(f"this run: {counts['ok']} ok, {counts['failed']} failed, {counts['seconds']} s")
    for why, n in counts["undone"].items():
        print(f"left undone on {n} asset(s): {why}")
    _print_counts(opts.out)
    return EXIT_OK


def _run_annotate(opts) -> int:
    from .prepare import prepare_dataset

    if not (opts.annotations or opts.annotator):
        raise UsageError("know3d data annotate: give --annotations FILE or --annotator DIR")
    if opts.annotator:
        from .annotate import resolve_annotator_dirs

        resolve_annotator_dirs(opts.annotator)
    counts = prepare_dataset(_options(opts, None, opts.dataset, ("annotate",), ("annotate",)))
    print(f"annotated: {counts['ok']} assets, {counts['failed']} failed")
    _print_counts(opts.dataset)
    return EXIT_OK


def _run_show(opts) -> int:
    from .prepare import read_records
    from .show import dataset_counts, format_counts, write_contact_sheet

    from . import layout

    if not os.path.isdir(layout.assets_root(opts.dataset)):
        raise UsageError(f"--dataset {opts.dataset}: no {layout.ASSETS_DIR}/ folder (run know3d data prepare first)")
    records = read_records(opts.dataset)
    print(format_counts(dataset_counts(records, opts.dataset)))
    out = opts.out or os.path.join(opts.dataset, "contact_sheet.png")
    written = write_contact_sheet(opts.dataset, out, records, max_assets=opts.max_assets)
    print(f"contact sheet: {written}" if written else "contact sheet: no asset is ok yet")
    return EXIT_OK
