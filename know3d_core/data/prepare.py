"""``know3d data prepare``: a folder of 3D assets -> the dataset of ``know3d_core.data.layout``.

Every asset (keyed by the SHA-256 of its file) goes through the steps of ``layout.STEPS``:

``mesh``      load, check and normalise (``assets.load_asset``); write ``mesh.safetensors``
``render``    the camera plan and RGBA views, ``cameras.json``, ``pairs.json`` (``render``)
``annotate``  back-view component descriptions into ``pairs.json`` (``annotate.prepare_step``)
``voxelize``  O-Voxel dual grids and 64^3 occupancy (``voxelize.prepare_step``)
``encode``    shape and sparse-structure latents (``encode.prepare_step``)

Step registry: ``STEP_FUNCTIONS`` names the module and function of each step; a step whose module
is not installed is reported and left undone (``prepare`` works with whatever steps exist). A step
function takes a :class:`StepContext` and returns a dict merged into the asset record (``asset.json``)
or None; it writes its files through ``ctx.write_*`` / ``ctx.publish_dir`` (atomic), and raises
``assets.AssetError`` for an unusable asset or any exception for a failure (recorded, run goes on).

On disk: a new asset is built in a temporary folder and renamed into place (``batch.item_output``);
a record names the steps done, so a resumed run skips finished work. Re-running a step on a
finished asset (``--only render``) rewrites its files atomically, then the record. Temporaries of a
killed run are removed when the run resumes. ``--shard K/N`` deals the sorted asset files
round-robin exactly like ``know3d batch`` (``batch.shard_items``). ``manifest.jsonl`` is rebuilt from
the records at the end of every run (of every shard); no pickle anywhere.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .. import batch as batchlib
from ..errors import UsageError, one_line
from . import layout
from .steps import StepSkipped
from .assets import DEFAULT_MAX_FACES, AssetError, list_assets, load_asset

__all__ = ["PrepareOptions", "StepContext", "STEP_FUNCTIONS", "resolve_steps", "step_function", "prepare",
           "prepare_asset", "read_record", "read_records", "write_manifest", "read_manifest", "plan_assets",
           "select_steps", "ANNOTATIONS_FILE", "StepSkipped", "prepare_dataset"]

# Step name -> (module, function). Modules are imported only when the step runs.
STEP_FUNCTIONS: Dict[str, Tuple[str, str]] = {
    "mesh": ("know3d_core.data.prepare", "step_mesh"),
    "render": ("know3d_core.data.prepare", "step_render"),
    "annotate": ("know3d_core.data.annotate", "prepare_step"),
    "voxelize": ("know3d_core.data.voxelize", "prepare_step"),
    "encode": ("know3d_core.data.encode", "prepare_step"),
}
# Annotations beside the assets (as synthetic.write_dataset_folder writes them) are imported by default.
ANNOTATIONS_FILE = "annotations.jsonl"


@dataclass
class PrepareOptions:
    input: str
    out: str
    steps: Tuple[str, ...] = layout.STEPS
    force: Tuple[str, ...] = ()          # steps re-run even where done (--only)
    shard: Tuple[int, int] = (1, 1)
    max_faces: int = DEFAULT_MAX_FACES
    up: str = "y"
    render_size: int = 512
    renderer: str = "opengl"             # render.RENDERERS: opengl (moderngl + EGL) or blender (bpy, Cycles)
    annotations: Optional[str] = None    # JSONL / CSV to import (default: INPUT/annotations.jsonl if present)
    annotator: Optional[str] = None      # Qwen2.5-VL folder for annotate
    annotate_sets: Tuple[str, ...] = layout.PAIR_SETS  # pair sets the annotator looks at
    annotate_max_new_tokens: int = 96
    resolutions: Tuple[int, ...] = (256,)
    trellis2: Optional[str] = None       # encode: the TRELLIS.2 folder with the shape and sparse-structure encoders
    device: str = "cpu"
    retry_failed: bool = False
    progress: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)  # options of steps owned elsewhere


class StepContext:
    """What a step sees: the asset folder being written, its record, the options and a per-run cache."""

    def __init__(self, root: str, folder: str, sha256: str, source: str, record: Dict, options: PrepareOptions,
                 cache: Dict):
        self.root, self.folder, self.sha256, self.source = root, folder, sha256, source
        self.record, self.options, self.cache = record, options, cache
        self._asset = None

    # -- inputs
    def asset(self):
        """The loaded, normalised ``assets.Asset`` (with materials), read once per asset."""
        if self._asset is None:
            self._asset = load_asset(self.source, max_faces=self.options.max_faces, up=self.options.up)
        return self._asset

    def mesh(self) -> Tuple[np.ndarray, np.ndarray]:
        """The normalised mesh: vertices float32 [V, 3], faces int32 [F, 3] (from mesh.safetensors)."""
        from safetensors.numpy import load_file

        t = load_file(self.path(layout.MESH_FILE))
        return t[layout.KEY_VERTICES], t[layout.KEY_FACES]

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def read_json(self, name: str) -> Any:
        with open(self.path(name), "r", encoding="utf-8") as f:
            return json.load(f)

    # -- outputs (atomic)
    def write_bytes(self, name: str, data: bytes) -> str:
        return batchlib.atomic_write_bytes(self.path(name), data)

    def write_json(self, name: str, obj: Any) -> str:
        return batchlib.atomic_write_json(self.path(name), obj)

    def write_tensors(self, name: str, tensors: Dict[str, Any]) -> str:
        """numpy arrays or torch tensors -> safetensors file ``name`` (atomic)."""
        from safetensors.numpy import save

        arrays = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in tensors.items()}
        return self.write_bytes(name, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))

    @contextlib.contextmanager
    def publish_dir(self, name: str) -> Iterator[str]:
        """Yield a temporary folder; on success it replaces ``name`` in the asset folder."""
        final = self.path(name)
        tmp = self.path(f"{layout.TMP_PREFIX}{name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            yield tmp
            old = None
            if os.path.exists(final):
                old = self.path(f"{layout.TMP_PREFIX}{name}-old-{os.getpid()}")
                os.replace(final, old)
            os.replace(tmp, final)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------- steps
def step_function(name: str) -> Optional[Callable[[StepContext], Optional[Dict]]]:
    """The function of step ``name``, or None when its module is not available (yet)."""
    module, attr = STEP_FUNCTIONS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None
        raise
    return getattr(mod, attr, None)


def resolve_steps(names: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(available, missing) among ``names``."""
    available, missing = [], []
    for n in names:
        (available if step_function(n) is not None else missing).append(n)
    return available, missing


def select_steps(only: Optional[Sequence[str]] = None, skip: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
    """``--only`` / ``--skip`` -> the steps to run, in ``layout.STEPS`` order (UsageError for unknown names)."""
    for flag, names in (("--only", only), ("--skip", skip)):
        for n in names or ():
            if n not in layout.STEPS:
                raise UsageError(f"{flag} {n!r}: unknown step; choose from {', '.join(layout.STEPS)}")
    chosen = [s for s in layout.STEPS if (not only or s in only) and s not in (skip or ())]
    if not chosen:
        raise UsageError("--only/--skip leave no step to run")
    return tuple(chosen)


def step_mesh(ctx: StepContext) -> Dict:
    """Load, check and normalise the asset; write mesh.safetensors (see ``assets.load_asset``)."""
    asset = ctx.asset()
    vertices, faces = asset.merged()
    ctx.write_tensors(layout.MESH_FILE, {layout.KEY_VERTICES: vertices, layout.KEY_FACES: faces})
    return {"faces": asset.n_faces, "normalization": {"center": list(asset.center), "scale": asset.scale},
            "asset_info": asset.info}


def _view_seed(sha256: str) -> int:
    return int(sha256[8:16], 16)


def step_render(ctx: StepContext) -> Dict:
    """Camera plan, RGBA views, cameras.json and pairs.json (annotations kept when re-rendered)."""
    from . import render

    renderer = ctx.cache.get("renderer")
    if renderer is None:
        renderer = ctx.cache["renderer"] = render.make_renderer(ctx.options.renderer, ctx.options.render_size)
    views = render.plan_views(_view_seed(ctx.sha256))
    pairs = render.plan_pairs(views)
    old = _read_json(ctx.path(layout.PAIRS_FILE)) or []
    known = {(p["front"], p["back"]): p.get("annotations", []) for p in old}
    for p in pairs:
        p["annotations"] = known.get((p["front"], p["back"]), [])
    with ctx.publish_dir(layout.VIEWS_DIR) as tmp:
        shifted = [dict(v, file=os.path.relpath(os.path.join(tmp, os.path.basename(v["file"])), ctx.folder)) for v in views]
        render.render_asset(renderer, ctx.asset(), shifted, ctx.folder)
    ctx.write_json(layout.CAMERAS_FILE, {"size": ctx.options.render_size, "renderer": renderer.renderer_name,
                                         "views": views})
    ctx.write_json(layout.PAIRS_FILE, pairs)
    return {"n_pairs": len(pairs), "render_size": ctx.options.render_size}


# ----------------------------------------------------------------------------- records
def _read_json(path: str) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_record(root: str, sha256: str) -> Optional[Dict]:
    return _read_json(os.path.join(layout.asset_dir(root, sha256), layout.ASSET_RECORD))


def read_records(root: str) -> List[Dict]:
    """Every published asset record under ``root/assets`` (sorted by sha256)."""
    base = layout.assets_root(root)
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.startswith(layout.TMP_PREFIX):
            continue
        rec = read_record(root, n)
        if rec is not None:
            out.append(rec)
    return out


def manifest_row(record: Dict) -> Dict:
    return {k: record.get(k) for k in layout.MANIFEST_FIELDS}


def write_manifest(root: str) -> str:
    """Rebuild ``manifest.jsonl`` from the asset records (atomic)."""
    rows = [manifest_row(r) for r in read_records(root)]
    text = "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows)
    return batchlib.atomic_write_text(layout.manifest_path(root), text)


def read_manifest(root: str) -> List[Dict]:
    path = layout.manifest_path(root)
    with open(path, "r", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------ prepare
def _run_steps(ctx: StepContext, steps: Sequence[str], save_record: Callable[[], None]) -> None:
    rec = ctx.record
    for name in steps:
        fn = step_function(name)
        if fn is None:
            continue
        try:
            extra = fn(ctx)
        except StepSkipped as e:
            rec.setdefault("notes", {})[name] = str(e)
            save_record()
            continue
        except AssetError as e:
            rec.update(status=layout.STATUS_FAILED, reason=e.reason, error=str(e), failed_step=name)
            save_record()
            return
        except Exception as e:  # a step failure is recorded and the run goes on
            rec.update(status=layout.STATUS_FAILED, reason="step_failed", error=f"{type(e).__name__}: {one_line(e)}"[:300], failed_step=name)
            save_record()
            return
        if extra:
            for k, v in extra.items():
                if isinstance(v, dict) and isinstance(rec.get(k), dict):
                    rec[k] = {**rec[k], **v}
                else:
                    rec[k] = v
        (rec.get("notes") or {}).pop(name, None)
        rec["steps"] = layout.steps_of({"steps": list(rec.get("steps") or []) + [name]})
        save_record()


def _new_record(sha256: str, source: str, meta: Dict) -> Dict:
    rec = {k: None for k in layout.MANIFEST_FIELDS}
    rec.update(sha256=sha256, source=os.path.abspath(source), status=layout.STATUS_OK, steps=[], voxels={},
               n_pairs=0, split=layout.split_of(sha256), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    rec.update({k: v for k, v in meta.items() if k in ("feature",)})
    return rec


def _remove_step_temporaries(folder: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        for n in os.listdir(folder):
            if n.startswith(layout.TMP_PREFIX):
                p = os.path.join(folder, n)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)


def prepare_asset(path: str, sha256: str, options: PrepareOptions, cache: Dict, meta: Optional[Dict] = None) -> Dict:
    """Run the missing (and forced) steps of one asset; returns its record."""
    root, meta = options.out, meta or {}
    final = layout.asset_dir(root, sha256)
    record = read_record(root, sha256)
    if record is None:
        with batchlib.item_output(layout.assets_root(root), sha256) as tmp:
            record = _new_record(sha256, path, meta)
            ctx = StepContext(root, tmp, sha256, path, record, options, cache)
            ctx.cache["meta"] = meta
            save = lambda: ctx.write_json(layout.ASSET_RECORD, record)  # noqa: E731
            save()
            # "mesh" checks and normalises the asset: every later step relies on it
            _run_steps(ctx, [s for s in layout.STEPS if s in options.steps or s == "mesh"], save)
        return record
    if record.get("status") == layout.STATUS_FAILED:
        if not options.retry_failed:
            return record
        record.update(status=layout.STATUS_OK, reason=None, error=None, failed_step=None)
    done = set(record.get("steps") or ())
    todo = [s for s in layout.STEPS if (s in options.steps or s == "mesh") and (s not in done or s in options.force)]
    if todo:
        _remove_step_temporaries(final)
        record["source"] = os.path.abspath(path)
        ctx = StepContext(root, final, sha256, path, record, options, cache)
        ctx.cache["meta"] = meta
        save = lambda: ctx.write_json(layout.ASSET_RECORD, record)  # noqa: E731
        _run_steps(ctx, todo, save)
    return record


def _start_renderer(options: PrepareOptions, cache: Dict[str, Any], steps: Sequence[str]) -> None:
    """Start the renderer before any asset when "render" will run: no renderer is a usage error
    (exit code 2), not a failure of every asset."""
    if "render" not in steps:
        return
    from . import render

    try:
        cache["renderer"] = render.make_renderer(options.renderer, options.render_size)
    except render.RendererUnavailable as e:
        raise UsageError(f"--renderer {options.renderer}: {e}") from None


def plan_assets(input_dir: str, shard: Tuple[int, int] = (1, 1)) -> List[str]:
    """The asset files of this shard: sorted, dealt round-robin like ``know3d batch``."""
    if not os.path.isdir(input_dir):
        raise UsageError(f"--input {input_dir}: not a folder (give a folder of {', '.join(layout.ASSET_EXTENSIONS)} files)")
    files = list_assets(input_dir)
    if not files:
        raise UsageError(f"--input {input_dir}: no {', '.join(layout.ASSET_EXTENSIONS)} files found")
    return batchlib.shard_items(files, *shard)


def prepare(options: PrepareOptions, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Prepare this shard's assets; returns counts ``{ok, failed, skipped_steps, seconds}``."""
    from tqdm.auto import tqdm

    from . import annotate

    files = plan_assets(options.input, options.shard)
    available, missing = resolve_steps(options.steps)
    if missing:
        log(f"steps not available in this install (left undone): {', '.join(missing)}")
    imported = annotate.load_annotation_source(options.annotations, options.input)
    os.makedirs(layout.assets_root(options.out), exist_ok=True)
    shas = [layout.sha256_file(p) for p in files]
    batchlib.remove_stale_tmp(layout.assets_root(options.out), shas)
    cache: Dict[str, Any] = {"annotations": imported}
    _start_renderer(options, cache, available)
    counts: Dict[str, Any] = {"ok": 0, "failed": 0}
    undone: Dict[str, int] = {}  # "step: why" -> assets (steps that raised StepSkipped)
    t0 = time.time()
    try:
        bar = tqdm(list(zip(files, shas)), desc="prepare", unit="asset", disable=not options.progress, dynamic_ncols=True)
        for path, sha in bar:
            meta = annotate.lookup(imported, path, sha) or {}
            rec = prepare_asset(path, sha, options, cache, meta)
            counts["ok" if rec.get("status") == layout.STATUS_OK else "failed"] += 1
            for step, note in (rec.get("notes") or {}).items():
                undone[f"{step}: {note}"] = undone.get(f"{step}: {note}", 0) + 1
    finally:
        renderer = cache.pop("renderer", None)
        if renderer is not None:
            renderer.release()
        write_manifest(options.out)
    counts["missing_steps"] = missing
    counts["undone"] = undone
    counts["seconds"] = round(time.time() - t0, 3)
    return counts


def prepare_dataset(options: PrepareOptions, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run ``options.steps`` on the assets already in the dataset ``options.out`` (no input folder:
    sources come from the records). Assets are sorted by SHA-256 and sharded like :func:`prepare`."""
    from tqdm.auto import tqdm

    from . import annotate

    records = [r for r in read_records(options.out) if r.get("status") == layout.STATUS_OK or options.retry_failed]
    if not os.path.isdir(layout.assets_root(options.out)):
        raise UsageError(f"--dataset {options.out}: no {layout.ASSETS_DIR}/ folder (run know3d data prepare first)")
    records = batchlib.shard_items(records, *options.shard)
    imported = annotate.load_annotation_source(options.annotations, None)
    cache: Dict[str, Any] = {"annotations": imported}
    _start_renderer(options, cache, options.steps)
    counts: Dict[str, Any] = {"ok": 0, "failed": 0}
    undone: Dict[str, int] = {}  # "step: why" -> assets (steps that raised StepSkipped)
    t0 = time.time()
    try:
        for rec in tqdm(records, desc=",".join(options.steps), unit="asset", disable=not options.progress,
                        dynamic_ncols=True):
            src = rec.get("source") or ""
            meta = annotate.lookup(imported, src, rec["sha256"]) or {}
            out = prepare_asset(src, rec["sha256"], options, cache, meta)
            counts["ok" if out.get("status") == layout.STATUS_OK else "failed"] += 1
            for step, note in (out.get("notes") or {}).items():
                undone[f"{step}: {note}"] = undone.get(f"{step}: {note}", 0) + 1
    finally:
        renderer = cache.pop("renderer", None)
        if renderer is not None:
            renderer.release()
        write_manifest(options.out)
    counts["undone"] = undone
    counts["seconds"] = round(time.time() - t0, 3)
    return counts
