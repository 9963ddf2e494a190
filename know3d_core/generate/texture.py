"""``know3d generate --texture``: the options of the texture stage and what it writes.

With ``--texture`` the pipeline also runs TRELLIS.2's texture flow and decoder (PBR voxels: base
colour, metallic, roughness, alpha) and ``mesh.glb`` is baked (``mesh.texture``): cleaned and reduced
to ``--texture-faces``, UV-unwrapped (xatlas), ``--texture-size``² maps as a glTF PBR material; or,
with ``--texture-mode vertex``, vertex colours (no UVs, fast). For variants with a back view the
generated back image is the texture flow's second image condition (``--no-texture-back``: front
only, as plain TRELLIS.2). Torch-free at import.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional

from ..argtypes import positive_int
from ..errors import UsageError

__all__ = ["TEXTURE_MODES", "add_texture_options", "texture_settings", "check_texture_options", "write_texture",
           "find_comfy_texture_vae", "check_texture_files"]

TEXTURE_MODES = ("pbr", "vertex")
DEFAULT_TEXTURE_SIZE = 1024
DEFAULT_TEXTURE_FACES = 200_000
MAX_TEXTURE_SIZE = 8192
MIN_TEXTURE_SIZE = 64


def add_texture_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("texture")
    g.add_argument("--texture", action="store_true",
                   help="also run TRELLIS.2's texture stage and write a textured mesh.glb (PBR material: base "
                        "colour, metallic-roughness, alpha); needs the texture files of the TRELLIS.2 folder")
    g.add_argument("--texture-size", type=positive_int, default=DEFAULT_TEXTURE_SIZE, metavar="PX",
                   help="side of the PBR maps (default: %(default)s)")
    g.add_argument("--texture-faces", type=positive_int, default=DEFAULT_TEXTURE_FACES, metavar="N",
                   help="face budget of the textured mesh before its UV unwrap (default: %(default)s; "
                        "--target-faces wins when given)")
    g.add_argument("--texture-mode", choices=TEXTURE_MODES, default="pbr",
                   help="pbr: UV-mapped maps (default); vertex: colours on the vertices (fast, no maps)")
    g.add_argument("--no-texture-back", dest="texture_back", action="store_false",
                   help="do not give the generated back view to the texture flow (front image only)")


def texture_settings(opts: argparse.Namespace) -> Dict[str, Any]:
    """The texture options as record.json and the resume check keep them (``{}`` without ``--texture``)."""
    if not getattr(opts, "texture", False):
        return {}
    return {"texture": {"mode": opts.texture_mode, "size": opts.texture_size, "faces": opts.texture_faces,
                        "back_view_condition": bool(opts.texture_back)}}


def check_texture_options(opts: argparse.Namespace) -> None:
    """One UsageError naming the option (before any model loads)."""
    if not getattr(opts, "texture", False):
        return
    if opts.format != "glb":
        raise UsageError(f"--texture writes a GLB (PBR material or vertex colours): use --format glb, "
                         f"not {opts.format}")
    if not MIN_TEXTURE_SIZE <= opts.texture_size <= MAX_TEXTURE_SIZE:
        raise UsageError(f"--texture-size {opts.texture_size}: between {MIN_TEXTURE_SIZE} and {MAX_TEXTURE_SIZE}")


def check_texture_files(folder: str, resolution: str) -> None:
    """Before loading anything: the texture flow of ``resolution`` and the texture decoder that the
    official TRELLIS.2 ``folder``'s pipeline.json names must be there (UsageError naming them)."""
    from ..plan import texture_models
    from ..trellis2.loading import read_pipeline_config, resolve_checkpoint

    config = read_pipeline_config(folder)
    for key in texture_models(resolution):
        if key not in config.models:
            raise UsageError(f"--texture: {folder}/pipeline.json lists no {key!r} (not a TRELLIS.2-4B pipeline.json?)")
        try:
            resolve_checkpoint(folder, config.models[key], key)
        except FileNotFoundError as e:
            first = str(e).split("\n")[0].replace(" Looked for:", "")
            raise UsageError(f"--texture: {first} Fix: {str(e).split('Fix: ')[-1].strip()}") from None


def find_comfy_texture_vae(models_dir: str, resolution: str) -> str:
    """The ComfyUI texture VAE (``txt_dec.*``) in ``models_dir`` or its ``vae/`` folder, for a
    ``--models`` folder of ComfyUI files; UsageError naming the file and where it comes from."""
    from ..plan import COMFY_TEXTURE_FILES, comfy_file_kind, comfy_source, pipeline_type
    from ..safetensors_header import read_safetensors_header

    if pipeline_type(resolution).texture_stage != "1024":
        raise UsageError(f"--texture with ComfyUI's files and --resolution {resolution}: their diffusion file holds "
                         "the 1024 texture flow only; use a cascade or 1024 (or the official TRELLIS.2 folder)")
    name = COMFY_TEXTURE_FILES["texture_vae"][0]
    for folder in (os.path.join(models_dir, "vae"), models_dir):
        if not os.path.isdir(folder):
            continue
        names = sorted(os.listdir(folder), key=lambda n: n != name)  # the published name first
        for entry in names:
            path = os.path.join(folder, entry)
            if entry.endswith(".safetensors") and os.path.isfile(path):
                info = read_safetensors_header(path)
                if info.problem is None and comfy_file_kind(info.tensors) == "texture_vae":
                    return path
    raise UsageError(f"--texture: no ComfyUI TRELLIS.2 texture VAE in {models_dir} or its vae/ folder; "
                     f"get {comfy_source('texture_vae')}")


def write_texture(result: Any, raw: Any, mesh: Any, path: str, settings: Dict[str, Any], metadata: Dict[str, Any],
                  device: Optional[str] = None) -> Dict[str, Any]:
    """Bake ``result.texture`` (PBR voxels) onto ``mesh`` (cleaned and reduced from ``raw``) and write the
    GLB to ``path`` atomically. Returns ``{"seconds": {step: s}, **facts}`` for record.json."""
    import time

    from ..fileio import atomic_write_bytes
    from ..mesh.texture import bake_reduced, textured_glb_bytes, vertex_color_glb_bytes

    voxels = result.texture
    if voxels is None:
        raise RuntimeError("--texture: the pipeline returned no texture voxels")
    if settings["mode"] == "vertex":
        start = time.perf_counter()
        data = vertex_color_glb_bytes(mesh, voxels, metadata)
        atomic_write_bytes(path, data)
        return {"seconds": {"texture_vertex_colors": time.perf_counter() - start}, "mode": "vertex"}
    baked = bake_reduced(mesh, raw, voxels, texture_size=settings["size"], device=device)
    start = time.perf_counter()
    atomic_write_bytes(path, textured_glb_bytes(baked, metadata))
    seconds = {f"texture_{k}": v for k, v in baked.metadata["timings"].items()}
    seconds["texture_write_glb"] = time.perf_counter() - start
    return {"seconds": seconds, "mode": "pbr", "size": settings["size"],
            "texel_coverage": round(baked.metadata["texel_coverage"], 4),
            "vertices": int(baked.vertices.shape[0]), "faces": int(baked.faces.shape[0])}
