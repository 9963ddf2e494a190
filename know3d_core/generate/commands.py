"""The generation commands of ``know3d``: ``generate`` (one mesh), ``batch`` (a folder x a prompt list,
resumable, shardable), ``models`` (which files are missing) and ``demo`` (tiny random weights).

A command family like any other (``register(subparsers)``; torch-free at import). The object that
generates one mesh comes from ``opts.pipeline_factory(opts, check)`` when the caller set one
(``cli.main(pipeline_factory=...)``), else :func:`load_pipeline` (``Know3DPipeline``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Optional

from .. import __version__
from .. import batch as batchlib
from ..errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, one_line
from ..model_check import ModelCheck, check_models
from ..plan import PIPELINE_TYPES, VARIANTS, needs_back_view
from ..argtypes import int_list
from .arguments import (add_generation_options, add_model_options, resolve_device,
                        qwen_files, resolve_dtype, resolve_memory_plan, run_settings)
from .outputs import base_record, print_record, write_outputs
from .texture import check_texture_files, check_texture_options, find_comfy_texture_vae, texture_settings
from .validate import (check_model_paths, check_options, check_out_folder, check_prompts, describe_prompt,
                       front_image, publish_result, resolve_variant, result_tmp)

__all__ = ["register", "load_pipeline", "cmd_generate", "cmd_batch", "cmd_models", "cmd_demo", "CheckFailed"]

DEMO_PROMPT = "a hollow backrest with three vertical slats"
BATCH_SETTINGS = "batch.json"

PipelineFactory = Callable[[argparse.Namespace, ModelCheck], Any]


def register(sub) -> None:
    """Add ``generate``, ``batch``, ``models`` and ``demo`` to the ``know3d`` sub-parsers."""
    g = sub.add_parser(
        "generate", help="one image + one description -> mesh, back view, normal renders, record",
        description="Generate one mesh. Writes to OUT: mesh.<format>, back.png (when the back view was "
                    "decoded), normals.png (front/back/left/right normal renders) and record.json "
                    "(inputs, seeds, versions, per-stage times, peak VRAM).")
    g.add_argument("--image", required=True, metavar="FILE", help="front image (RGBA with the background removed)")
    g.add_argument("--mask", metavar="FILE", help="foreground mask (white = object) for an opaque image")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="what the hidden back looks like")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: created, or a previous result there replaced as a whole")
    add_model_options(g)
    add_generation_options(g)

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
    add_model_options(b)
    add_generation_options(b)

    m = sub.add_parser(
        "models", help="check the model files; say where each missing one comes from",
        description="Check every file the chosen variant and resolution need. For each missing one, "
                    "prints the expected name, the folder it goes in and the public repository and "
                    "file it comes from. Exit code 0 when everything is there, 2 otherwise.")
    add_model_options(m)
    m.add_argument("--sigma", type=float, help=argparse.SUPPRESS)
    m.add_argument("--layers", type=int_list, help=argparse.SUPPRESS)

    d = sub.add_parser(
        "demo", help="the whole pipeline on tiny random weights (no downloads)",
        description="Write tiny RANDOM models in the official layouts to a temporary folder and run the "
                    "whole pipeline end to end (back view, hidden-state capture, injection, both TRELLIS.2 "
                    "stages, mesh, renders). The weights are random, so the mesh is meaningless: this "
                    "checks the installation, not the quality.")
    d.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: created, or a previous result there replaced as a whole")
    d.add_argument("--prompt", default=DEMO_PROMPT, metavar="TEXT", help="description (default: %(default)r)")
    d.add_argument("--variant", choices=VARIANTS, default="hidden",
                   help="(default: %(default)s; the demo's tiny Know3D checkpoint is for hidden)")
    d.add_argument("--resolution", choices=PIPELINE_TYPES, help="(default: 512, the demo's fast setting)")
    d.add_argument("--keep-models", metavar="DIR", help="write the demo models here and keep them")
    add_generation_options(d, demo=True)
    for parser, run in ((g, cmd_generate), (b, cmd_batch), (m, cmd_models), (d, cmd_demo)):
        parser.set_defaults(run=run)


# --------------------------------------------------------------------------------------- pipeline
def load_pipeline(opts: argparse.Namespace, check: ModelCheck):
    """The real pipeline (``know3d_core.pipeline.Know3DPipeline``) from the checked files."""
    from ..pipeline import Know3DPipeline

    if check.layout == "official":
        trellis2 = os.path.dirname(check.path("pipeline_json"))
        if getattr(opts, "texture", False):
            check_texture_files(trellis2, opts.resolution)
    else:  # ComfyUI's single files (Comfy-Org/TRELLIS.2)
        trellis2 = (check.path("comfy_flows"), check.path("comfy_vae"))
        if getattr(opts, "texture", False):
            trellis2 += (find_comfy_texture_vae(opts.models, opts.resolution),)
    return Know3DPipeline.from_pretrained(
        trellis2,
        qwen=opts.qwen if needs_back_view(opts.variant) else None,
        know3d=check.path("know3d"),
        backview_loras=(opts.lora,) if opts.lora and needs_back_view(opts.variant) else (),
        dinov3=check.path("dinov3"),
        device=opts.device_resolved,
        dtype=opts.dtype_resolved,
        offload=opts.offload,
        memory_plan=getattr(opts, "memory_plan", None),
        pin_host=getattr(opts, "pin_host", False),
        qwen_files=qwen_files(opts) or None,
        pipeline_types=[opts.resolution],
        vae_image_area=getattr(opts, "vae_image_area", None),
        texture=getattr(opts, "texture", False),
    )


class _StageBars:
    """tqdm bars for the pipeline's ``callback(stage, step, total)``: one bar per stage."""

    def __init__(self, enabled: bool, leave: bool, back_steps: Optional[int] = None):
        self.enabled, self.leave, self.back_steps = enabled, leave, back_steps
        self.bar, self.stage = None, None

    def __call__(self, stage: str, step: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if stage != self.stage or self.bar is None:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=self._label(stage, total), unit="step", leave=self.leave,
                            dynamic_ncols=True)
        self.bar.n = step
        self.bar.refresh()

    def _label(self, stage: str, total: int) -> str:
        if stage == "back_view" and self.back_steps and total < self.back_steps:
            return f"back_view (stops at the capture noise level: step {total} of {self.back_steps})"
        return stage

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
    if getattr(opts, "texture", False):
        kwargs.update(texture=True, texture_back=opts.texture_back)
    return pipe.run(image, prompt, opts.variant, **kwargs)




def _generate_into(pipe, opts, check, image_path: str, prompt: str, folder: str, command: str,
                   mask_path: Optional[str] = None, extra: Optional[Dict[str, Any]] = None,
                   leave_bars: bool = True) -> Dict[str, Any]:
    image, mask, _ = front_image(image_path, opts.full_frame, mask_path)
    bars = _StageBars(not opts.quiet, leave_bars, opts.back_steps)
    start = time.perf_counter()
    try:
        result = _run_pipeline(pipe, image, mask, prompt, opts, bars)
    finally:
        bars.close()
    total = time.perf_counter() - start
    record = base_record(opts, check, image_path, prompt, command)
    record["total_seconds"] = round(total, 4)
    if extra:
        record.update(extra)
    if getattr(opts, "variant_reason", None):
        record["variant_reason"] = opts.variant_reason
    if getattr(opts, "relabel_record", None):
        record = opts.relabel_record(record)
    return write_outputs(result, folder, opts.format, record, opts.normals_size, opts.floaters, opts.target_faces,
                         texture=texture_settings(opts).get("texture"))


# --------------------------------------------------------------------------------------- commands
def _check_or_raise(opts: argparse.Namespace) -> ModelCheck:
    check = check_models(opts.models, opts.qwen, opts.variant, opts.resolution, lora=opts.lora,
                         know3d=opts.know3d, sigma=getattr(opts, "sigma", None),
                         layers=getattr(opts, "layers", None), dinov3=opts.dinov3, qwen_files=qwen_files(opts))
    if needs_back_view(opts.variant) and not opts.qwen:
        raise CheckFailed(check, f"--variant {opts.variant} needs --qwen DIR (Qwen-Image-Edit-2511, diffusers "
                                  "format); --variant none runs TRELLIS.2 alone")
    if not check.ok:
        raise CheckFailed(check, check.summary())
    return check


class CheckFailed(UsageError):
    """The model check failed: one line, and ``details`` (the files missing or unusable)."""

    def __init__(self, check: ModelCheck, line: str):
        self.check = check
        self.details = check.format(only_problems=True)
        super().__init__(line)


def _prepare_runtime(opts: argparse.Namespace) -> None:
    opts.device_resolved = resolve_device(opts.device)
    opts.dtype_resolved = resolve_dtype(opts.dtype, opts.device_resolved)
    opts.memory_plan = resolve_memory_plan(opts)


def _quiet_libraries() -> None:
    """No per-file progress bars from diffusers / transformers while loading (``--quiet``)."""
    for name in ("diffusers", "transformers"):
        with contextlib.suppress(Exception):
            __import__(f"{name}.utils.logging", fromlist=["disable_progress_bar"]).disable_progress_bar()


def _load(opts, check, quiet: bool):
    from ..knowledge.checkpoint import Know3DFormatError
    from ..knowledge.kinds import KnowledgeMismatchError
    from ..mmdit.comfy_files import ComfyFileError
    from ..trellis2.loading import CheckpointError

    if quiet:
        _quiet_libraries()
    _say(quiet, f"loading models ({opts.variant}, {opts.resolution}) on {opts.device_resolved} ...")
    if getattr(opts, "memory_plan", None) is not None:
        _say(quiet, f"--vram {opts.vram:g}: memory plan {opts.memory_plan.describe()}")
    if getattr(opts, "pin_host", False):
        why = (f"--vram {opts.vram:g} (plan {opts.memory_plan.name}'s default; --no-pin-host turns it off)"
               if getattr(opts, "pin_host_by_plan", False) else "--pin-host")
        _say(quiet, f"{why}: offloaded networks visit the GPU from pinned host copies (pinned once, at load)")
    start = time.perf_counter()
    try:
        pipe = (getattr(opts, "pipeline_factory", None) or load_pipeline)(opts, check)
    except (FileNotFoundError, CheckpointError, Know3DFormatError, KnowledgeMismatchError, ComfyFileError) as e:
        raise UsageError(f"cannot load the models: {one_line(e)}") from None
    _say(quiet, f"models loaded in {time.perf_counter() - start:.1f} s")
    if getattr(pipe, "placement", None):
        _say(quiet, "Qwen networks: " + "; ".join(f"{k} {v}" for k, v in pipe.placement.items()))
    return pipe


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def cmd_models(opts) -> int:
    check_model_paths(opts)
    reason = resolve_variant(opts)
    if reason:
        print(reason)
    check = check_models(opts.models, opts.qwen, opts.variant, opts.resolution, lora=opts.lora,
                         know3d=opts.know3d, sigma=opts.sigma, layers=opts.layers, dinov3=opts.dinov3,
                         qwen_files=qwen_files(opts))
    print(check.format())
    if needs_back_view(opts.variant) and not opts.qwen:
        print(f"--variant {opts.variant} needs --qwen DIR (Qwen-Image-Edit-2511 in diffusers format)")
        return EXIT_USAGE
    return EXIT_OK if check.ok else EXIT_USAGE


def _validate(opts: argparse.Namespace) -> ModelCheck:
    """Every check that needs no model, in the order of issue 16 (options, --out, --variant auto,
    image, model files, prompt); sets ``opts.variant_reason``. Nothing is loaded or written."""
    check_options(opts)
    check_texture_options(opts)
    check_model_paths(opts)
    opts.out = check_out_folder(opts.out)
    opts.variant_reason = resolve_variant(opts)
    _, _, front = front_image(opts.image, opts.full_frame, opts.mask)
    check = _check_or_raise(opts)
    check_prompts(opts, [opts.prompt], front, check.path("know3d"))
    _prepare_runtime(opts)
    return check


def cmd_generate(opts) -> int:
    check = _validate(opts)  # fail fast, before loading anything
    if opts.variant_reason:
        _say(opts.quiet, opts.variant_reason)
    _say(opts.quiet, f"back view: {describe_prompt(opts.prompt)}" if needs_back_view(opts.variant)
         else "--variant none: plain TRELLIS.2, the prompt is not used")
    pipe = _load(opts, check, opts.quiet)
    out = opts.out
    tmp = result_tmp(out)
    try:
        record = _generate_into(pipe, opts, check, opts.image, opts.prompt, tmp, "generate", opts.mask)
        publish_result(tmp, out)  # a previous result set is replaced as a whole
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_record(record, out, opts.quiet)
    return EXIT_OK


def _check_batch_settings(out: str, settings: Dict[str, Any], write: bool = True) -> None:
    """Refuse a batch folder made with other settings; record them when new (``write``)."""
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
    if write:
        batchlib.atomic_write_json(path, {"know3d": __version__, "settings": settings})


def cmd_batch(opts) -> int:
    try:
        images = batchlib.list_images(opts.images)
        prompts = batchlib.read_prompts(opts.prompts)
        plan = batchlib.plan_items(images, prompts)
        k, n = batchlib.parse_shard(opts.shard)
    except batchlib.BatchError as e:
        raise UsageError(str(e)) from None
    mine = batchlib.shard_items(plan, k, n)
    check_options(opts)
    check_texture_options(opts)
    check_model_paths(opts)
    out = check_out_folder(opts.out, result=False)
    opts.variant_reason = resolve_variant(opts)
    if opts.variant_reason:
        _say(opts.quiet, opts.variant_reason)
    check = _check_or_raise(opts)
    check_prompts(opts, [it.prompt for it in mine], None, check.path("know3d"), option="--prompts")
    _check_batch_settings(out, run_settings(opts), write=False)  # the folder is created once models load
    todo = [it for it in mine if not batchlib.is_finished(out, it.id)]
    shard = f" (shard {k}/{n}: {len(mine)} items)" if n > 1 else ""
    _say(opts.quiet, f"batch: {len(images)} images x {len(prompts)} prompts = {len(plan)} items{shard}; "
                     f"{len(mine) - len(todo)} already finished")
    pipe = None
    if todo:
        _prepare_runtime(opts)
        pipe = _load(opts, check, opts.quiet)
    else:
        opts.device_resolved, opts.dtype_resolved = "cpu", None
    os.makedirs(out, exist_ok=True)
    _check_batch_settings(out, run_settings(opts))

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


def _temporary_paths(folder: str):
    """A record fix for the demo's temporary models: their paths say so instead of pointing at
    files that are deleted when the demo ends (kept models, ``--keep-models``, keep their paths)."""
    tag = "<temporary demo models, deleted after the run>"

    def fix(path):
        return tag + path[len(folder):] if isinstance(path, str) and path.startswith(folder) else path

    def relabel(record: Dict[str, Any]) -> Dict[str, Any]:
        record = dict(record)
        record["models"] = {k: fix(v) for k, v in record.get("models", {}).items()}
        record["inputs"] = {**record.get("inputs", {}), "image": fix(record.get("inputs", {}).get("image"))}
        record["demo"] = {"models": "temporary: written for this run and deleted after it "
                                    "(know3d demo --keep-models DIR keeps them)"}
        return record
    return relabel


def cmd_demo(opts) -> int:
    from ..demo_models import DEMO_RUN_SETTINGS, write_demo_models, write_demo_trellis2

    print("know3d demo: tiny RANDOM weights in the official layouts. The mesh is meaningless; this run "
          "checks that every stage works on this machine.", flush=True)
    if opts.quiet:
        _quiet_libraries()
    check_options(opts)  # before the models are written
    check_texture_options(opts)
    check_out_folder(opts.out)
    keep = opts.keep_models
    if keep:
        check_out_folder(keep, "--keep-models", result=False)
    folder = os.path.abspath(keep) if keep else tempfile.mkdtemp(prefix="know3d-demo-models-")
    if not keep:
        opts.relabel_record = _temporary_paths(folder)
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
        code = cmd_generate(opts)
        print("know3d demo: done. Reminder: the weights were random; for real meshes see 'know3d models'.")
        return code
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
