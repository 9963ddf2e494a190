"""The ``know3d`` command: Know3D without ComfyUI (generate, batch, models, demo).

Exit codes (scripts may rely on them): 0 ok; 1 a generation failed (for ``batch``: at least one
item failed); 2 bad arguments, unreadable inputs or missing / unusable model files; 130 interrupted
(Ctrl-C or SIGTERM; no partial file is left behind).

``main(argv, pipeline_factory=None)`` is the entry point (``python -m know3d_core.cli`` works too).
``pipeline_factory(options, check)`` builds the object whose ``run(...)`` generates one mesh; by
default it is :func:`load_pipeline` (``know3d_core.pipeline.Know3DPipeline``).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import __version__
from . import batch as batchlib
from .model_check import RESOLUTIONS, VARIANTS, ModelCheck, check_models, needs_qwen

__all__ = ["main", "build_parser", "load_pipeline", "UsageError", "write_outputs", "open_front_image"]

from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError

# Command families that live beside their library (``know3d_core/<family>/commands.py``). Each module
# is torch-free at import and exposes ``register(subparsers)``, which adds its sub-commands with
# ``set_defaults(run=callable)``; ``callable(opts) -> int`` returns the exit code and raises
# :class:`UsageError` for bad input (exit code 2).
COMMAND_FAMILIES: tuple = ()
DEMO_PROMPT = "a hollow backrest with three vertical slats"
MESH_BASENAME = "mesh"
BACK_NAME = "back.png"
BATCH_SETTINGS = "batch.json"
VIEWS = ("front", "back", "left", "right")

PipelineFactory = Callable[[argparse.Namespace, ModelCheck], Any]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (and exit code 2, as argparse)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------- parser
_DESCRIPTION = """\
Know3D: one front image + a sentence about the object's hidden back -> a 3D mesh.
Qwen-Image-Edit-2511 imagines the back; what it knows is injected into TRELLIS.2.

First steps:
  know3d demo --out demo_out            # tiny random weights, no downloads: checks the install
  know3d models --models M --qwen Q     # which model files are missing, and where to get them
  know3d generate --models M --qwen Q --image chair.png --prompt "a hollow backrest" --out out/chair

Exit codes: 0 ok, 1 a generation failed, 2 bad arguments or missing files, 130 interrupted."""

_MODELS_HELP = """\
TRELLIS.2 folder: the official layout (pipeline.json + ckpts/, as in microsoft/TRELLIS.2-4B;
put ss_dec_conv3d_16l8_fp16.* from microsoft/TRELLIS-image-large in ckpts/ too) or ComfyUI's
single files (trellis_2_bf16, trellis_2_shape_vae_bf16, dino_v3_vit_l from Comfy-Org/TRELLIS.2),
plus DINOv3 and the Know3D checkpoint. 'know3d models' lists what is missing."""


def _add_model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--models", metavar="DIR", required=required, help=_MODELS_HELP)
    g.add_argument("--qwen", metavar="DIR",
                   help="Qwen-Image-Edit-2511 in diffusers format (transformer/, vae/, text_encoder/, "
                        "processor/, scheduler/); needed by every variant but 'none'")
    g.add_argument("--lora", metavar="FILE", help="back-view LoRA for Qwen-Image-Edit (.safetensors; optional)")
    g.add_argument("--know3d", metavar="FILE",
                   help="Know3D checkpoint (default: the one in DIR/know3d/ or DIR/know3d*.safetensors "
                        "trained for the variant)")
    g.add_argument("--dinov3", metavar="PATH",
                   help="DINOv3 ViT-L/16 folder or .safetensors (default: found in --models)")
    g.add_argument("--variant", choices=VARIANTS, default="hidden",
                   help="what the back view contributes: hidden = MMDiT hidden states (the paper's "
                        "best), latent = its VAE latent, image = DINOv3 features of the decoded back "
                        "view, multiview = the back view as a second input image (no Know3D weights), "
                        "none = plain TRELLIS.2 (default: %(default)s)")
    g.add_argument("--resolution", choices=RESOLUTIONS, default="1024_cascade",
                   help="TRELLIS.2 pipeline type (default: %(default)s)")


def _add_generation_options(p: argparse.ArgumentParser, demo: bool = False) -> None:
    fast = "the demo's fast setting)"
    g = p.add_argument_group("generation")
    g.add_argument("--sigma", type=float, metavar="S",
                   help="noise level at which MMDiT hidden states are captured (default: the Know3D "
                        "checkpoint's own; a different value is refused)")
    g.add_argument("--layers", type=_int_list, metavar="L1,L2,..",
                   help="MMDiT blocks to capture (default: the checkpoint's own)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--steps", type=_positive_int, metavar="N", help="TRELLIS.2 sampler steps per stage (default: "
                   + (fast if demo else "pipeline.json's, 12)"))
    g.add_argument("--back-steps", type=_positive_int, default=None if demo else 40, metavar="N",
                   help="Qwen-Image-Edit steps of the back view (default: " + (fast if demo else "%(default)s)"))
    g.add_argument("--back-size", type=_size, metavar="HxW", help="back view size in pixels, multiples of 16 "
                   "(default: " + (fast if demo else "about 1 megapixel at the front image's aspect ratio)"))
    g.add_argument("--back-image", action="store_true",
                   help="also decode and save the back view when the variant does not need it "
                        "(hidden/latent stop sampling early)")
    g.add_argument("--full-frame", action="store_true",
                   help="the image has no transparency: use the whole frame as the object (otherwise "
                        "give images with the background removed, as RGBA)")
    g.add_argument("--format", choices=("glb", "obj", "ply", "stl"), default="glb",
                   help="mesh file format (default: %(default)s)")
    g.add_argument("--floaters", type=_fraction, default=None if demo else 0.01, metavar="F",
                   help="remove pieces with fewer than this fraction of the faces; 0 keeps every piece "
                        "(default: " + ("0 for the demo: its random mesh is many small pieces)" if demo
                                        else "%(default)s)"))
    g.add_argument("--target-faces", type=int, default=0, metavar="N",
                   help="reduce the mesh to at most N faces (vertex clustering); 0 keeps all (default)")
    g.add_argument("--device", default="auto", help="cuda, cuda:1, cpu ... (default: cuda if available)")
    g.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="weights dtype (default: " + ("float32 for the demo" if demo else
                                                      "bfloat16 on CUDA, float32 on CPU") + ")")
    g.add_argument("--offload", action="store_true",
                   help="keep models on the CPU and move each to the GPU only while it runs (small cards)")
    g.add_argument("--normals-size", type=_positive_int, default=256, metavar="PX",
                   help="side of each normal render in normals.png (default: %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="know3d", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"know3d {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    g = sub.add_parser(
        "generate", help="one image + one description -> mesh, back view, normal renders, record",
        description="Generate one mesh. Writes to OUT: mesh.<format>, back.png (when the back view was "
                    "decoded), normals.png (front/back/left/right normal renders) and record.json "
                    "(inputs, seeds, versions, per-stage times, peak VRAM).")
    g.add_argument("--image", required=True, metavar="FILE", help="front image (RGBA with the background removed)")
    g.add_argument("--mask", metavar="FILE", help="foreground mask (white = object) for an opaque image")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="what the hidden back looks like")
    g.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files are replaced)")
    _add_model_options(g)
    _add_generation_options(g)

    b = sub.add_parser(
        "batch", help="every image in a folder x every description in a file (resumable, shardable)",
        description="Generate every image x prompt into OUT/<item id>/ (same files as 'generate'). "
                    "Resumable: finished items are skipped, and an item is only visible once complete. "
                    "--shard K/N runs the K-th of N disjoint slices, so a Slurm array, a Kubernetes job "
                    "or one process per GPU can share a batch with no coordination. Models load once "
                    "per process. Ends with OUT/summary.csv and OUT/contact_sheet.png; a failing item "
                    "is reported and the batch goes on (exit code 1 at the end).",
        epilog="example: know3d batch --models M --qwen Q --images fronts/ --prompts backs.txt --out out "
               "--shard 2/4 --device cuda:1")
    b.add_argument("--images", required=True, metavar="DIR", help="folder of front images (RGBA)")
    b.add_argument("--prompts", required=True, metavar="FILE",
                   help="text file, one description per line ('#' comments, blank lines skipped), or a "
                        "JSON list of strings")
    b.add_argument("--out", required=True, metavar="DIR", help="output folder")
    b.add_argument("--shard", metavar="K/N", help="run only the K-th of N slices (1-based), e.g. 1/4")
    _add_model_options(b)
    _add_generation_options(b)

    m = sub.add_parser(
        "models", help="check the model files; say where each missing one comes from",
        description="Check every file the chosen variant and resolution need. For each missing one, "
                    "prints the expected name, the folder it goes in and the public repository and "
                    "file it comes from. Exit code 0 when everything is there, 2 otherwise.")
    _add_model_options(m)
    m.add_argument("--sigma", type=float, help=argparse.SUPPRESS)
    m.add_argument("--layers", type=_int_list, help=argparse.SUPPRESS)

    d = sub.add_parser(
        "demo", help="the whole pipeline on tiny random weights (no downloads)",
        description="Write tiny RANDOM models in the official layouts to a temporary folder and run the "
                    "whole pipeline end to end (back view, hidden-state capture, injection, both TRELLIS.2 "
                    "stages, mesh, renders). The weights are random, so the mesh is meaningless: this "
                    "checks the installation, not the quality.")
    d.add_argument("--out", required=True, metavar="DIR", help="output folder")
    d.add_argument("--prompt", default=DEMO_PROMPT, metavar="TEXT", help="description (default: %(default)r)")
    d.add_argument("--variant", choices=VARIANTS, default="hidden", help="(default: %(default)s)")
    d.add_argument("--resolution", choices=RESOLUTIONS, help="(default: 512, the demo's fast setting)")
    d.add_argument("--keep-models", metavar="DIR", help="write the demo models here and keep them")
    _add_generation_options(d, demo=True)
    _register_families(sub)
    return parser


def _register_families(sub) -> None:
    import importlib

    for name in COMMAND_FAMILIES:
        importlib.import_module(name).register(sub)


def _size(text: str) -> tuple:
    parts = text.lower().replace(" ", "").split("x")
    try:
        h, w = (int(parts[0]), int(parts[1])) if len(parts) == 2 else (int(parts[0]), int(parts[0]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give HxW, e.g. 1024x1024") from None
    if h < 16 or w < 16 or h % 16 or w % 16:
        raise argparse.ArgumentTypeError(f"{text!r}: height and width must be multiples of 16 (at least 16)")
    return h, w


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1)")
    return value


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give block indices >= 0, e.g. 20,30,40")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


# --------------------------------------------------------------------------------------- inputs
def open_front_image(path: str, full_frame: bool = False, mask_path: Optional[str] = None):
    """``(PIL image, PIL mask | None)``; raises :class:`UsageError` (one line) when unusable."""
    from PIL import Image, UnidentifiedImageError

    def _open(p: str, what: str):
        if not os.path.isfile(p):
            raise UsageError(f"{what} {p} does not exist")
        try:
            with Image.open(p) as im:
                im.load()
                return im.copy()
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UsageError(f"{what} {p} cannot be read as an image ({' '.join(str(e).split())})") from None

    image = _open(path, "image")
    mask = None
    if mask_path is not None:
        mask = _open(mask_path, "mask").convert("L")
        if mask.size != image.size:
            raise UsageError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]}, image {path} is "
                             f"{image.size[0]}x{image.size[1]}")
    elif not _has_transparency(image):
        if not full_frame:
            raise UsageError(f"image {path} has no transparency: give it with the background removed (RGBA), "
                             "a --mask, or --full-frame to use the whole frame")
        mask = Image.new("L", image.size, 255)
    return image, mask


def _has_transparency(image) -> bool:
    if image.mode in ("RGBA", "LA", "PA"):
        return image.getchannel("A").getextrema()[0] < 255
    return image.mode == "P" and "transparency" in image.info


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here (use --device cpu)")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device (cuda, cuda:1, cpu, ...)") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def _resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


# --------------------------------------------------------------------------------------- pipeline
def load_pipeline(opts: argparse.Namespace, check: ModelCheck):
    """The real pipeline (``know3d_core.pipeline.Know3DPipeline``) from the checked files."""
    from .pipeline import Know3DPipeline

    if check.layout == "official":
        trellis2 = os.path.dirname(check.path("pipeline_json"))
    else:  # ComfyUI's single files (Comfy-Org/TRELLIS.2)
        trellis2 = (check.path("comfy_flows"), check.path("comfy_vae"))
    return Know3DPipeline.from_pretrained(
        trellis2,
        qwen=opts.qwen if needs_qwen(opts.variant) else None,
        know3d=check.path("know3d"),
        backview_loras=(opts.lora,) if opts.lora and needs_qwen(opts.variant) else (),
        dinov3=check.path("dinov3"),
        device=opts.device_resolved,
        dtype=opts.dtype_resolved,
        offload=opts.offload,
        pipeline_types=[opts.resolution],
        vae_image_area=getattr(opts, "vae_image_area", None),
    )


class _StageBars:
    """tqdm bars for the pipeline's ``callback(stage, step, total)``: one bar per stage."""

    def __init__(self, enabled: bool, leave: bool):
        self.enabled, self.leave = enabled, leave
        self.bar, self.stage = None, None

    def __call__(self, stage: str, step: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if stage != self.stage or self.bar is None:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit="step", leave=self.leave, dynamic_ncols=True)
        self.bar.n = step
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run_pipeline(pipe, image, mask, prompt: str, opts: argparse.Namespace, callback):
    kwargs = dict(mask=mask, sigma=opts.sigma, layers=opts.layers, seed=opts.seed, steps=opts.back_steps,
                  pipeline_type=opts.resolution, decode_back=opts.back_image, callback=callback)
    if opts.steps is not None:
        kwargs["trellis_steps"] = opts.steps
    if opts.back_size is not None:
        kwargs["back_view_size"] = opts.back_size
    return pipe.run(image, prompt, opts.variant, **kwargs)


# --------------------------------------------------------------------------------------- outputs
def _normal_strip(mesh, size: int = 256):
    """Normal renders front/back/left/right side by side: PIL RGB ``[size, 4*size]``."""
    import numpy as np
    from PIL import Image

    from .mesh import render_normals

    images = render_normals(mesh.cpu(), views=VIEWS, size=size, background=(0.1, 0.1, 0.1))
    strip = images.permute(1, 0, 2, 3).reshape(size, len(VIEWS) * size, 3)
    return Image.fromarray((strip.clamp(0, 1) * 255).round().numpy().astype(np.uint8), "RGB")


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _versions(device: str) -> Dict[str, Any]:
    from importlib import metadata

    import torch

    out: Dict[str, Any] = {"know3d": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "safetensors", "trimesh", "numpy", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None

    if device.startswith("cuda") and torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def postprocess_mesh(mesh, floaters: float = 0.01, target_faces: int = 0):
    """Drop unreferenced vertices and pieces below ``floaters`` of the faces; decimate to ``target_faces``."""
    from .mesh import remove_floaters, remove_unreferenced_vertices
    from .mesh.decimate import decimate

    mesh = remove_floaters(mesh, floaters) if floaters > 0 else remove_unreferenced_vertices(mesh)
    if target_faces and mesh.num_faces > target_faces:
        mesh = decimate(mesh, target_faces)
    return mesh


def write_outputs(result, folder: str, fmt: str, record: Dict[str, Any], normals_size: int = 256,
                  floaters: float = 0.01, target_faces: int = 0) -> Dict[str, Any]:
    """Write ``mesh.<fmt>``, ``back.png`` (if any), ``normals.png`` and ``record.json`` into ``folder``.

    ``result`` has ``mesh`` (know3d_core.mesh.Mesh), ``back_image`` (PIL | None), ``timings``
    ``{stage: s}``, ``peak_vram`` ``{stage: bytes}`` and ``knowledge`` (provenance | None). The mesh is
    cleaned with :func:`postprocess_mesh` first. Every file is written atomically; record.json comes
    last. Returns the record.
    """
    from .mesh import save_mesh

    raw = result.mesh
    if raw is None or raw.num_faces == 0:
        raise RuntimeError("the pipeline produced an empty mesh (no occupied voxels); try another seed or image")
    mesh = postprocess_mesh(raw.cpu(), floaters, target_faces)
    os.makedirs(folder, exist_ok=True)
    mesh_name = f"{MESH_BASENAME}.{fmt}"
    meta = {"generator": f"know3d {__version__}", "prompt": record.get("inputs", {}).get("prompt"),
            "seed": record.get("inputs", {}).get("seed")}
    mesh_path = save_mesh(mesh, os.path.join(folder, mesh_name), fmt, metadata=meta)
    back = getattr(result, "back_image", None)
    if back is not None:
        batchlib.atomic_write_bytes(os.path.join(folder, BACK_NAME), _png_bytes(back))
    batchlib.atomic_write_bytes(os.path.join(folder, batchlib.NORMALS_NAME), _png_bytes(_normal_strip(mesh, normals_size)))
    timings = {k: round(float(v), 4) for k, v in (getattr(result, "timings", None) or {}).items()}
    peak = {k: int(v) for k, v in (getattr(result, "peak_vram", None) or {}).items()}
    record = dict(record)
    record.update({
        "outputs": {"mesh": mesh_name, "back_image": BACK_NAME if back is not None else None,
                    "normals": batchlib.NORMALS_NAME, "normals_views": list(VIEWS)},
        "mesh": {"vertices": int(mesh.num_vertices), "faces": int(mesh.num_faces), "format": fmt,
                 "raw_vertices": int(raw.num_vertices), "raw_faces": int(raw.num_faces)},
        "stage_seconds": timings,
        "peak_vram_bytes": peak,
        "peak_vram_gb": round(max(peak.values()) / 2**30, 3) if peak else None,
        "knowledge": _jsonable(getattr(result, "knowledge", None)),
    })
    batchlib.atomic_write_json(os.path.join(folder, batchlib.RECORD_NAME), _jsonable(record))
    return record


def _settings(opts: argparse.Namespace) -> Dict[str, Any]:
    """What determines the generated files (compared on resume; device/dtype/offload excluded)."""
    return {
        "variant": opts.variant, "resolution": opts.resolution, "sigma": opts.sigma, "layers": opts.layers,
        "seed": opts.seed, "steps": opts.steps, "back_steps": opts.back_steps, "back_image": opts.back_image,
        "full_frame": opts.full_frame, "format": opts.format, "floaters": opts.floaters,
        "target_faces": opts.target_faces, "back_size": list(opts.back_size) if opts.back_size else None,
        "know3d": os.path.basename(opts.know3d) if getattr(opts, "know3d", None) else None,
        "lora": os.path.basename(opts.lora) if getattr(opts, "lora", None) else None,
    }


def _base_record(opts: argparse.Namespace, check: Optional[ModelCheck], image_path: str, prompt: str,
                 command: str) -> Dict[str, Any]:
    from PIL import Image

    with Image.open(image_path) as im:
        size, mode = list(im.size), im.mode
    return {
        "command": command,
        "inputs": {"image": os.path.abspath(image_path), "image_sha256": _sha256(image_path),
                   "image_size": size, "image_mode": mode, "prompt": prompt, **_settings(opts),
                   "device": opts.device_resolved, "dtype": str(opts.dtype_resolved).replace("torch.", ""),
                   "offload": opts.offload},
        "seeds": {"seed": opts.seed},
        "models": check.paths() if check is not None else {},
        "versions": _versions(opts.device_resolved),
    }


def _generate_into(pipe, opts, check, image_path: str, prompt: str, folder: str, command: str,
                   mask_path: Optional[str] = None, extra: Optional[Dict[str, Any]] = None,
                   leave_bars: bool = True) -> Dict[str, Any]:
    image, mask = open_front_image(image_path, opts.full_frame, mask_path)
    bars = _StageBars(not opts.quiet, leave_bars)
    start = time.perf_counter()
    try:
        result = _run_pipeline(pipe, image, mask, prompt, opts, bars)
    finally:
        bars.close()
    total = time.perf_counter() - start
    record = _base_record(opts, check, image_path, prompt, command)
    record["total_seconds"] = round(total, 4)
    if extra:
        record.update(extra)
    return write_outputs(result, folder, opts.format, record, opts.normals_size, opts.floaters, opts.target_faces)


# --------------------------------------------------------------------------------------- commands
def _check_or_raise(opts: argparse.Namespace) -> ModelCheck:
    check = check_models(opts.models, opts.qwen, opts.variant, opts.resolution, lora=opts.lora,
                         know3d=opts.know3d, sigma=getattr(opts, "sigma", None),
                         layers=getattr(opts, "layers", None), dinov3=opts.dinov3)
    if needs_qwen(opts.variant) and not opts.qwen:
        raise _CheckFailed(check, f"--variant {opts.variant} needs --qwen DIR (Qwen-Image-Edit-2511, diffusers "
                                  "format); --variant none runs TRELLIS.2 alone")
    if not check.ok:
        raise _CheckFailed(check, check.summary())
    return check


class _CheckFailed(UsageError):
    def __init__(self, check: ModelCheck, line: str):
        self.check = check
        super().__init__(line)


def _prepare_runtime(opts: argparse.Namespace) -> None:
    opts.device_resolved = _resolve_device(opts.device)
    opts.dtype_resolved = _resolve_dtype(opts.dtype, opts.device_resolved)


def _quiet_libraries() -> None:
    """No per-file progress bars from diffusers / transformers while loading (``--quiet``)."""
    for name in ("diffusers", "transformers"):
        with contextlib.suppress(Exception):
            __import__(f"{name}.utils.logging", fromlist=["disable_progress_bar"]).disable_progress_bar()


def _load(opts, check, factory: PipelineFactory, quiet: bool):
    from .knowledge.checkpoint import Know3DFormatError
    from .knowledge.kinds import KnowledgeMismatchError
    from .trellis2.loading import CheckpointError

    if quiet:
        _quiet_libraries()
    _say(quiet, f"loading models ({opts.variant}, {opts.resolution}) on {opts.device_resolved} ...")
    start = time.perf_counter()
    try:
        pipe = factory(opts, check)
    except (FileNotFoundError, CheckpointError, Know3DFormatError, KnowledgeMismatchError) as e:
        raise UsageError(f"cannot load the models: {_one_line(e)}") from None
    _say(quiet, f"models loaded in {time.perf_counter() - start:.1f} s")
    return pipe


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def cmd_models(opts, factory) -> int:
    check = check_models(opts.models, opts.qwen, opts.variant, opts.resolution, lora=opts.lora,
                         know3d=opts.know3d, sigma=opts.sigma, layers=opts.layers, dinov3=opts.dinov3)
    print(check.format())
    if needs_qwen(opts.variant) and not opts.qwen:
        print(f"--variant {opts.variant} needs --qwen DIR (Qwen-Image-Edit-2511 in diffusers format)")
        return EXIT_USAGE
    return EXIT_OK if check.ok else EXIT_USAGE


def cmd_generate(opts, factory) -> int:
    open_front_image(opts.image, opts.full_frame, opts.mask)  # fail fast, before loading anything
    check = _check_or_raise(opts)
    _prepare_runtime(opts)
    pipe = _load(opts, check, factory, opts.quiet)
    out = os.path.abspath(opts.out)
    os.makedirs(out, exist_ok=True)
    _remove_dead_generate_tmp(out)
    tmp = os.path.join(out, f"{batchlib.TMP_PREFIX}generate-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        record = _generate_into(pipe, opts, check, opts.image, opts.prompt, tmp, "generate", opts.mask)
        names = [record["outputs"]["mesh"], record["outputs"]["back_image"], batchlib.NORMALS_NAME,
                 batchlib.RECORD_NAME]
        for name in names:  # record.json last: its presence means the rest is there
            if name:
                os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print_record(record, out, opts.quiet)
    return EXIT_OK


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_dead_generate_tmp(out: str) -> None:
    """Temporary folders of killed ``generate`` runs into ``out`` (their process is gone)."""
    prefix = f"{batchlib.TMP_PREFIX}generate-"
    for name in os.listdir(out):
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def _print_record(record: Dict[str, Any], out: str, quiet: bool) -> None:
    times = ", ".join(f"{k} {v:.1f}s" for k, v in record.get("stage_seconds", {}).items())
    peak = record.get("peak_vram_gb")
    print(f"wrote {os.path.join(out, record['outputs']['mesh'])} ({record['mesh']['faces']} faces)"
          + (f", {record['outputs']['back_image']}" if record["outputs"]["back_image"] else "")
          + f", {batchlib.NORMALS_NAME}, {batchlib.RECORD_NAME}")
    if not quiet:
        print(f"total {record.get('total_seconds', 0):.1f} s" + (f" ({times})" if times else "")
              + (f"; peak VRAM {peak:.2f} GB" if peak is not None else ""))


def _check_batch_settings(out: str, settings: Dict[str, Any]) -> None:
    path = os.path.join(out, BATCH_SETTINGS)
    if os.path.isfile(path):
        try:
            with open(path, "r", encoding="utf-8") as f:
                old = json.load(f).get("settings", {})
        except (OSError, ValueError):
            old = None
        if old is not None:
            diff = [k for k in settings if k in old and old[k] != settings[k]]
            if diff:
                shown = ", ".join(f"{k} {old[k]!r} -> {settings[k]!r}" for k in diff)
                raise UsageError(f"--out {out} holds a batch made with other settings ({shown}); "
                                 "use another --out, or the same settings to resume")
            return
    batchlib.atomic_write_json(path, {"know3d": __version__, "settings": settings})


def cmd_batch(opts, factory) -> int:
    try:
        images = batchlib.list_images(opts.images)
        prompts = batchlib.read_prompts(opts.prompts)
        plan = batchlib.plan_items(images, prompts)
        k, n = batchlib.parse_shard(opts.shard)
    except batchlib.BatchError as e:
        raise UsageError(str(e)) from None
    mine = batchlib.shard_items(plan, k, n)
    check = _check_or_raise(opts)
    out = os.path.abspath(opts.out)
    os.makedirs(out, exist_ok=True)
    _check_batch_settings(out, _settings(opts))
    todo = [it for it in mine if not batchlib.is_finished(out, it.id)]
    shard = f" (shard {k}/{n}: {len(mine)} items)" if n > 1 else ""
    _say(opts.quiet, f"batch: {len(images)} images x {len(prompts)} prompts = {len(plan)} items{shard}; "
                     f"{len(mine) - len(todo)} already finished")
    pipe = None
    if todo:
        _prepare_runtime(opts)
        pipe = _load(opts, check, factory, opts.quiet)
    else:
        opts.device_resolved, opts.dtype_resolved = "cpu", None

    def generate(item: batchlib.BatchItem, folder: str):
        extra = {"batch": {"id": item.id, "index": item.index, "shard": [k, n]}}
        return _generate_into(pipe, opts, check, item.image, item.prompt, folder, "batch", extra=extra,
                              leave_bars=False)

    def report(res: batchlib.ItemResult) -> None:
        if res.status == "failed":
            from tqdm.auto import tqdm

            tqdm.write(f"FAILED {res.item.id}: {res.error}", file=sys.stderr)

    results = batchlib.run_batch(mine, out, generate, progress=not opts.quiet, on_result=report)
    rows = batchlib.summary_rows(plan, out, results)
    batchlib.write_summary(os.path.join(out, batchlib.SUMMARY_NAME), rows)
    sheet = batchlib.write_contact_sheet(os.path.join(out, batchlib.CONTACT_SHEET_NAME), plan, out)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed", "finished", "pending")}
    if not opts.quiet:
        print(batchlib.format_table(rows[:100]))
        if len(rows) > 100:
            print(f"... {len(rows) - 100} more rows in {batchlib.SUMMARY_NAME}")
    print(f"{len(plan)} items: " + ", ".join(f"{v} {s}" for s, v in counts.items() if v)
          + f"; summary {os.path.join(out, batchlib.SUMMARY_NAME)}"
          + (f", contact sheet {sheet}" if sheet else ""))
    return EXIT_FAILED if counts["failed"] else EXIT_OK


def _apply_demo_settings(opts: argparse.Namespace, settings: Dict[str, Any]) -> None:
    """Fill what the user left out with ``demo_models.DEMO_RUN_SETTINGS`` (a short CPU run)."""
    if opts.resolution is None:
        opts.resolution = str(settings.get("pipeline_type", "512"))
    if opts.steps is None:
        opts.steps = settings.get("ss_steps")
    if opts.back_steps is None:
        opts.back_steps = int(settings.get("steps", 4))
    if opts.back_size is None and settings.get("back_view_size"):
        opts.back_size = tuple(settings["back_view_size"])
    if opts.dtype == "auto":
        opts.dtype = str(settings.get("dtype", "float32"))
    if opts.floaters is None:
        opts.floaters = 0.0
    opts.vae_image_area = settings.get("vae_image_area")


def cmd_demo(opts, factory) -> int:
    from .demo_models import DEMO_RUN_SETTINGS, write_demo_models, write_demo_trellis2

    print("know3d demo: tiny RANDOM weights in the official layouts. The mesh is meaningless; this run "
          "checks that every stage works on this machine.", flush=True)
    if opts.quiet:
        _quiet_libraries()
    keep = opts.keep_models
    folder = os.path.abspath(keep) if keep else tempfile.mkdtemp(prefix="know3d-demo-models-")
    try:
        start = time.perf_counter()
        paths = write_demo_models(folder, seed=opts.seed)
        if opts.resolution == "1024":  # this type samples a 64^3 structure grid: official 16^3 latent
            write_demo_trellis2(paths.trellis2, seed=opts.seed, ss_resolution=16)
        _say(opts.quiet, f"demo models written to {folder} in {time.perf_counter() - start:.1f} s")
        opts.models, opts.qwen = paths.trellis2, paths.qwen
        opts.lora, opts.know3d, opts.dinov3 = paths.backview_lora, paths.know3d, paths.dinov3
        opts.image, opts.mask = paths.image, None
        _apply_demo_settings(opts, DEMO_RUN_SETTINGS)
        code = cmd_generate(opts, factory)
        print("know3d demo: done. Reminder: the weights were random; for real meshes see 'know3d models'.")
        return code
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


COMMANDS = {"generate": cmd_generate, "batch": cmd_batch, "models": cmd_models, "demo": cmd_demo}


# --------------------------------------------------------------------------------------- main
class _NeverRaised(Exception):
    pass


def _knowledge_mismatch_type() -> type:
    """``knowledge.KnowledgeMismatchError`` if it was imported (a mismatch is a bad argument, code 2)."""
    mod = sys.modules.get(__package__ + ".knowledge.kinds")
    return getattr(mod, "KnowledgeMismatchError", _NeverRaised)


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Optional[Sequence[str]] = None, *, pipeline_factory: Optional[PipelineFactory] = None) -> int:
    """Run the ``know3d`` command; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        opts = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, bad arguments (one line, code 2)
        return int(e.code or 0)
    if opts.command is None:
        parser.print_help()
        return EXIT_USAGE
    factory = pipeline_factory or load_pipeline
    previous = None
    with contextlib.suppress(ValueError):  # only the main thread may install handlers
        previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        run = getattr(opts, "run", None)
        return run(opts) if run is not None else COMMANDS[opts.command](opts, factory)
    except _CheckFailed as e:
        print(f"know3d {opts.command}: error: {e}", file=sys.stderr)
        print(e.check.format(only_problems=True), file=sys.stderr)
        return EXIT_USAGE
    except UsageError as e:
        print(f"know3d {opts.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except _knowledge_mismatch_type() as e:  # evaluated when an exception arrives
        print(f"know3d {opts.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"know3d {opts.command}: interrupted; no partial file was kept (finished batch items stay, "
              "rerun to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - one line for users, the traceback with --debug
        if opts.debug:
            raise
        print(f"know3d {opts.command}: failed: {type(e).__name__}: {_one_line(e)} (--debug shows the traceback)",
              file=sys.stderr)
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
