"""What ``know3d generate`` (and each ``batch`` item) writes into its folder: ``mesh.<format>`` (post-
processed by ``mesh.postprocess_mesh``, as the Save Mesh node does), ``back.png``, ``normals.png`` and
``record.json`` (inputs, seeds, model files, versions, per-stage times, peak VRAM), each atomically,
record.json last."""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
from typing import Any, Dict, Optional

from .. import __version__
from .. import batch as batchlib
from .arguments import run_settings, sha256

__all__ = ["MESH_BASENAME", "BACK_NAME", "VIEWS", "write_outputs", "base_record", "print_record"]

MESH_BASENAME = "mesh"
BACK_NAME = "back.png"
VIEWS = ("front", "back", "left", "right")


def _normal_strip(mesh, size: int = 256):
    """Normal renders front/back/left/right side by side: PIL RGB ``[size, 4*size]``."""
    import numpy as np
    from PIL import Image

    from ..mesh import render_normals

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


def write_outputs(result, folder: str, fmt: str, record: Dict[str, Any], normals_size: int = 256,
                  floaters: float = 0.01, target_faces: int = 0,
                  texture: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``mesh.<fmt>``, ``back.png`` (if any), ``normals.png`` and ``record.json`` into ``folder``.

    ``result`` has ``mesh`` (know3d_core.mesh.Mesh), ``back_image`` (PIL | None), ``timings``
    ``{stage: s}``, ``peak_vram`` ``{stage: bytes}`` and ``knowledge`` (provenance | None). The mesh is
    cleaned with ``mesh.postprocess_mesh`` first. Every file is written atomically; record.json comes
    last. Returns the record. ``texture`` (``generate.texture.texture_settings(...)["texture"]``): bake
    ``result.texture`` into the GLB (the face budget is ``target_faces`` or the texture's), timed per step.
    """
    from ..mesh import postprocess_mesh, save_mesh

    raw = result.mesh
    if raw is None or raw.num_faces == 0:
        raise RuntimeError("the pipeline produced an empty mesh (no occupied voxels); try another seed or image")
    if texture:
        target_faces = target_faces or texture["faces"]
    mesh = postprocess_mesh(raw.cpu(), floaters, target_faces)
    os.makedirs(folder, exist_ok=True)
    mesh_name = f"{MESH_BASENAME}.{fmt}"
    meta = {"generator": f"know3d {__version__}", "prompt": record.get("inputs", {}).get("prompt"),
            "seed": record.get("inputs", {}).get("seed")}
    baked = None
    if texture:
        from .texture import write_texture

        device = record.get("inputs", {}).get("device")
        baked = write_texture(result, raw.cpu(), mesh, os.path.join(folder, mesh_name), texture, meta, device)
    else:
        save_mesh(mesh, os.path.join(folder, mesh_name), fmt, metadata=meta)
    back = getattr(result, "back_image", None)
    if back is not None:
        batchlib.atomic_write_bytes(os.path.join(folder, BACK_NAME), _png_bytes(back))
    batchlib.atomic_write_bytes(os.path.join(folder, batchlib.NORMALS_NAME), _png_bytes(_normal_strip(mesh, normals_size)))
    timings = {k: round(float(v), 4) for k, v in (getattr(result, "timings", None) or {}).items()}
    if baked is not None:
        timings.update({k: round(float(v), 4) for k, v in baked.pop("seconds").items()})
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
    if baked is not None:
        record["texture"] = baked
    batchlib.atomic_write_json(os.path.join(folder, batchlib.RECORD_NAME), _jsonable(record))
    return record


def base_record(opts: argparse.Namespace, check: Any, image_path: str, prompt: str, command: str) -> Dict[str, Any]:
    """The record of one generation before the outputs are written: inputs (with the image's
    sha256), seeds, model files (``check.paths()``) and library versions."""
    from PIL import Image

    with Image.open(image_path) as im:
        size, mode = list(im.size), im.mode
    return {
        "command": command,
        "inputs": {"image": os.path.abspath(image_path), "image_sha256": sha256(image_path),
                   "image_size": size, "image_mode": mode, "prompt": prompt, **run_settings(opts),
                   "device": opts.device_resolved, "dtype": str(opts.dtype_resolved).replace("torch.", ""),
                   "offload": opts.offload, "pin_host": getattr(opts, "pin_host", False)},
        "seeds": {"seed": opts.seed},
        "memory_plan": _memory_plan(opts),
        "models": check.paths() if check is not None else {},
        "versions": _versions(opts.device_resolved),
    }



def _memory_plan(opts: argparse.Namespace):
    """``--vram``'s plan as the record keeps it (None without ``--vram``)."""
    plan = getattr(opts, "memory_plan", None)
    return None if plan is None else {"vram_gib": opts.vram, **plan.as_record()}


def print_record(record: Dict[str, Any], out: str, quiet: bool) -> None:
    """What a finished ``generate`` prints: the files written, then (unless ``quiet``) times and peak VRAM."""
    times = ", ".join(f"{k} {v:.1f}s" for k, v in record.get("stage_seconds", {}).items())
    peak = record.get("peak_vram_gb")
    print(f"wrote {os.path.join(out, record['outputs']['mesh'])} ({record['mesh']['faces']} faces)"
          + (f", {record['outputs']['back_image']}" if record["outputs"]["back_image"] else "")
          + f", {batchlib.NORMALS_NAME}, {batchlib.RECORD_NAME}")
    if not quiet:
        print(f"total {record.get('total_seconds', 0):.1f} s" + (f" ({times})" if times else "")
              + (f"; peak VRAM {peak:.2f} GB" if peak is not None else ""))
