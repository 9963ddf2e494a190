"""Everything ``generate``, ``demo`` and ``batch`` can check before a model is loaded (issue 16).

Each check raises :class:`~know3d_core.errors.UsageError` (exit code 2) with one line naming the
argument and the fix, and leaves nothing on disk. The order a command follows: :func:`check_options`
(every range), :func:`check_out_folder`, :func:`resolve_variant` (``--variant auto``),
:func:`front_image` (readable, supported, a foreground, not degenerate: the pipeline's own
preprocessing is run on it), the model check, :func:`check_prompt` (length, from the tokenizer
alone); only then the models load. :func:`publish_result` replaces a previous result set as a whole.
Torch-free at import.
"""
from __future__ import annotations

import argparse
import os
import shutil
from typing import Iterable, Optional

from .. import batch as batchlib
from ..errors import UsageError, one_line

__all__ = [
    "MAX_STEPS", "MAX_SIDE", "SEED_RANGE", "check_options", "check_model_paths", "check_out_folder", "result_names",
    "result_tmp", "front_image", "resolve_variant", "describe_prompt", "check_prompt", "check_prompts",
    "publish_result",
]

MAX_STEPS = 1000          # sampler steps (TRELLIS.2 and back view): beyond is a typo, not a setting
MAX_SIDE = 4096           # back-view side and normal-render side in pixels
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts
MIN_TARGET_FACES = 4      # a closed mesh needs at least 4 triangles (tetrahedron)


# --------------------------------------------------------------------------------------- options
def check_options(opts: argparse.Namespace) -> None:
    """Ranges argparse types cannot express (one UsageError naming the option and the range)."""
    target = getattr(opts, "target_faces", 0)
    if target is not None and target != 0 and target < MIN_TARGET_FACES:
        raise UsageError(f"--target-faces {target}: give 0 (keep every face) or at least {MIN_TARGET_FACES}")
    seed = getattr(opts, "seed", 0)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UsageError(f"--seed {seed}: must fit in 64 bits ({SEED_RANGE[0]} .. {SEED_RANGE[1]})")
    sigma = getattr(opts, "sigma", None)
    if sigma is not None and not 0.0 < sigma <= 1.0:
        raise UsageError(f"--sigma {sigma}: a noise level in (0, 1] (or leave it out: the checkpoint's own)")
    for name in ("steps", "back_steps"):
        value = getattr(opts, name, None)
        if value is not None and value > MAX_STEPS:
            raise UsageError(f"--{name.replace('_', '-')} {value}: at most {MAX_STEPS}")
    back = getattr(opts, "back_size", None)
    if back is not None and max(back) > MAX_SIDE:
        raise UsageError(f"--back-size {back[0]}x{back[1]}: at most {MAX_SIDE} pixels a side")
    normals = getattr(opts, "normals_size", None)
    if normals is not None and normals > MAX_SIDE:
        raise UsageError(f"--normals-size {normals}: at most {MAX_SIDE}")


def check_model_paths(opts: argparse.Namespace) -> None:
    """Model options that name the wrong kind of path: a file where a folder goes (``--models``,
    ``--qwen``) or a folder where a file goes (``--lora``, ``--know3d``). Missing paths are left to
    the model check, which says where each file comes from."""
    for option in ("models", "qwen"):
        path = getattr(opts, option, None)
        if path and os.path.isfile(path):
            raise UsageError(f"--{option} {path} is a file: give the folder that holds the model files")
    for option in ("lora", "know3d"):
        path = getattr(opts, option, None)
        if path and os.path.isdir(path):
            raise UsageError(f"--{option} {path} is a folder: give the .safetensors file")


# --------------------------------------------------------------------------------------- output folder
def result_names() -> set:
    """File names a ``generate`` result folder may hold (any mesh format)."""
    from ..mesh.export import FORMATS
    from .outputs import BACK_NAME, MESH_BASENAME

    return {f"{MESH_BASENAME}.{f}" for f in FORMATS} | {BACK_NAME, batchlib.NORMALS_NAME, batchlib.RECORD_NAME}


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_out_folder(out: str, option: str = "--out", result: bool = True) -> str:
    """``--out`` is a folder (or can be created) that this process can write, and (``result``) it is
    new, empty or a previous ``generate`` result, which :func:`publish_result` replaces as a whole.
    Returns the absolute path. Creates nothing."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{option} {out} is a file: give a folder (it is created if missing)")
    where = _nearest_existing(os.path.dirname(out) if not os.path.isdir(out) else out)
    if not os.path.isdir(where):
        raise UsageError(f"{option} {out}: {where} is a file, so the folder cannot be created there")
    parent = _nearest_existing(os.path.dirname(out))
    for folder in {where, parent}:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"{option} {out}: no permission to write in {folder}; choose a folder you can write")
    if result and os.path.isdir(out):
        names = [n for n in os.listdir(out) if not n.startswith(batchlib.TMP_PREFIX)]
        foreign = sorted(set(names) - result_names())
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UsageError(f"{option} {out} holds files that are not a know3d result ({shown}); give a new or "
                             "empty folder (a previous result there is replaced as a whole)")
    return out


def publish_result(tmp: str, out: str) -> None:
    """Make the finished folder ``tmp`` (a sibling of ``out``) the result at ``out``: a previous result
    is moved aside, ``tmp`` renamed in its place, the old one deleted. No stale file survives and
    ``out`` never holds a mix of two runs."""
    old = None
    if os.path.isdir(out):
        old = f"{tmp}-old"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def result_tmp(out: str) -> str:
    """A new temporary sibling of ``out`` (``.tmp-<name>-<pid>``) to write a result into; its parents
    are created now."""
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    _remove_dead_tmp(parent, name)
    tmp = os.path.join(parent, batchlib.tmp_dir_name(name))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_dead_tmp(parent: str, name: str) -> None:
    """Temporary siblings of ``name`` left by killed ``generate`` runs (their process is gone)."""
    prefix = f"{batchlib.TMP_PREFIX}{name}-"
    for entry in os.listdir(parent):
        pid = entry[len(prefix):].split("-")[0]
        if entry.startswith(prefix) and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


# --------------------------------------------------------------------------------------- image
def _open(path: str, what: str, option: str):
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        hint = " (for a folder of images use 'know3d batch --images FOLDER')" if option == "--image" else ""
        raise UsageError(f"{option} {path} is a folder: give an image file{hint}")
    if not os.path.isfile(path):
        raise UsageError(f"{option} {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"{option} {path} cannot be read as an image ({one_line(e)})") from None


def front_image(path: str, full_frame: bool = False, mask_path: Optional[str] = None):
    """``(image, mask | None, front)``: the file's PIL image, the mask to give the pipeline, and the
    preprocessed front (square RGB crop, what every model sees). Runs the pipeline's preprocessing
    (``conditioning.preprocess_image``), so every image the pipeline would refuse is refused here."""
    from PIL import Image

    from ..conditioning.preprocess import NoTransparencyError, preprocess_image

    image = _open(path, "image", "--image")
    mask = None
    if mask_path is not None:
        mask = _open(mask_path, "mask", "--mask").convert("L")
        if mask.size != image.size:
            raise UsageError(f"--mask {mask_path} is {mask.size[0]}x{mask.size[1]}, --image {path} is "
                             f"{image.size[0]}x{image.size[1]}: give a mask of the image's size")
    try:
        try:
            front = preprocess_image(image, mask)
        except NoTransparencyError:
            if not full_frame:
                raise UsageError(f"--image {path} has no transparency: give it with the background removed "
                                 "(RGBA), a --mask, or --full-frame to use the whole frame") from None
            mask = Image.new("L", image.size, 255)
            front = preprocess_image(image, mask)
    except ValueError as e:
        raise UsageError(f"--image {path} ({image.width}x{image.height}, mode {image.mode}): {one_line(e)}") from None
    return image, mask, front


# --------------------------------------------------------------------------------------- variant
def resolve_variant(opts: argparse.Namespace) -> Optional[str]:
    """``--variant auto``: the variant of the Know3D checkpoint found (``--know3d`` or in ``--models``),
    else ``multiview`` (public weights only). Sets ``opts.variant``; returns why (None when the user
    chose the variant)."""
    if opts.variant != "auto":
        return None
    from ..model_check import check_models, read_safetensors_header
    from ..plan import INJECTED_KINDS, variant_of

    if opts.know3d and os.path.isfile(opts.know3d):  # the file given decides
        info = read_safetensors_header(opts.know3d)
        kind = info.metadata.get("knowledge_kind")
        if info.problem or info.metadata.get("format") != "know3d" or kind not in INJECTED_KINDS:
            why = info.problem or "its metadata names no Know3D format and knowledge kind"
            raise UsageError(f"--know3d {opts.know3d}: not a Know3D checkpoint ({why}); give a Know3D file, "
                             "or --variant multiview / none")
        opts.variant = variant_of(kind)
        return f"--variant auto: {opts.variant}, the variant --know3d {opts.know3d} is trained for ({kind})"

    for kind in INJECTED_KINDS:
        variant = variant_of(kind)
        check = check_models(opts.models, None, variant, opts.resolution, know3d=opts.know3d, shapes=False)
        found = check.path("know3d")
        if found:
            opts.variant = variant
            return f"--variant auto: {variant}, the Know3D checkpoint {found} is trained for {kind}"
    opts.variant = "multiview"
    where = opts.know3d or opts.models
    return (f"--variant auto: multiview (the back view as a second image; public weights only), no Know3D "
            f"checkpoint found in {where}")


# --------------------------------------------------------------------------------------- prompt
def describe_prompt(description: str) -> str:
    """How a description is shown: an empty one is 'no description' (the unconditional back view)."""
    desc = (description or "").strip()
    return repr(desc) if desc else "no description (the unconditional back view, as the paper's dropout trains it)"


def _back_view_prompt(know3d: Optional[str]):
    from ..mmdit.prompt import BackViewPrompt
    from ..model_check import read_safetensors_header

    meta = read_safetensors_header(know3d).metadata if know3d else None
    return BackViewPrompt.from_metadata(meta)


def check_prompts(opts: argparse.Namespace, descriptions: Iterable[str], front, know3d: Optional[str],
                  option: str = "--prompt") -> Optional[int]:
    """The back-view prompt of every description fits the MMDiT (tokenizer and image processor only;
    ``front``: the preprocessed front image; None: any, since every preprocessed front is square and
    so gives the same vision tokens). Returns the largest token count (None: no back view)."""
    from ..plan import needs_back_view

    if not needs_back_view(opts.variant) or not opts.qwen:
        return None
    import json

    from ..mmdit.backview import condition_images
    from ..mmdit.loading import load_processor
    from ..mmdit.prompt import PromptTooLong, check_prompt_length, max_prompt_tokens

    try:
        processor = load_processor(opts.qwen)
        with open(os.path.join(opts.qwen, "text_encoder", "config.json"), "r", encoding="utf-8") as f:
            limit = max_prompt_tokens(json.load(f))
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"--qwen {opts.qwen}: cannot read its tokenizer ({one_line(e)})") from None
    prompt = _back_view_prompt(know3d)
    if front is None:
        from PIL import Image

        front = Image.new("RGB", (518, 518))
    images = condition_images([front])
    longest = 0
    for i, desc in enumerate(dict.fromkeys(descriptions)):
        try:
            longest = max(longest, check_prompt_length(processor, images, prompt, desc, limit))
        except PromptTooLong as e:
            where = option if option == "--prompt" else f"{option} (description {i + 1})"
            raise UsageError(f"{where}: {one_line(e)}") from None
    return longest


def check_prompt(opts: argparse.Namespace, description: str, front, know3d: Optional[str]) -> Optional[int]:
    """:func:`check_prompts` for one ``--prompt``."""
    return check_prompts(opts, [description], front, know3d)

