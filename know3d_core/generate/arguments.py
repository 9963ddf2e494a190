"""Arguments of the generation commands (``generate``, ``batch``, ``models``, ``demo``): option
groups, argument types, and the inputs they name (front image, device, dtype). Torch-free at import."""
from __future__ import annotations

import argparse
import hashlib
import os
from typing import Any, Dict, Optional

from ..argtypes import fraction, int_list, positive_float, positive_int, size
from ..errors import UsageError
from ..plan import DTYPE_NAMES, MEMORY_PLANS, PIPELINE_TYPES, VARIANTS, auto_dtype_name, dtype_name, vram_plan
from .texture import add_texture_options, texture_settings

__all__ = ["add_model_options", "add_generation_options", "open_front_image", "resolve_device", "resolve_dtype",
           "resolve_memory_plan", "qwen_files", "run_settings", "sha256"]

_MODELS_HELP = """\
TRELLIS.2 folder: the official layout (pipeline.json + ckpts/, as in microsoft/TRELLIS.2-4B;
put ss_dec_conv3d_16l8_fp16.* from microsoft/TRELLIS-image-large in ckpts/ too) or ComfyUI's
single files (trellis_2_bf16, trellis_2_shape_vae_bf16, dino_v3_vit_l from Comfy-Org/TRELLIS.2),
plus DINOv3 and the Know3D checkpoint. 'know3d models' lists what is missing."""


def add_model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--models", metavar="DIR", required=required, help=_MODELS_HELP)
    g.add_argument("--qwen", metavar="DIR",
                   help="Qwen-Image-Edit-2511 in diffusers format (transformer/, vae/, text_encoder/, "
                        "processor/, scheduler/); needed by every variant but 'none'")
    g.add_argument("--lora", metavar="FILE", help="back-view LoRA for Qwen-Image-Edit (.safetensors; optional)")
    g.add_argument("--qwen-transformer", metavar="FILE",
                   help="ComfyUI's Qwen-Image-Edit-2511 diffusion model file (qwen_image_edit_2511_bf16, _fp8mixed "
                        "or _fp8_e4m3fn.safetensors) read instead of --qwen's transformer weights (its "
                        "config.json stays): one set of files for ComfyUI and the CLI")
    g.add_argument("--qwen-text-encoder", metavar="FILE",
                   help="ComfyUI's qwen_2.5_vl_7b_fp8_scaled.safetensors (or its bf16 file) read instead of "
                        "--qwen's text_encoder weights (its config.json stays)")
    g.add_argument("--know3d", metavar="FILE",
                   help="Know3D checkpoint (default: the one in DIR/know3d/ or DIR/know3d*.safetensors "
                        "trained for the variant)")
    g.add_argument("--dinov3", metavar="PATH",
                   help="DINOv3 ViT-L/16 folder or .safetensors (default: found in --models)")
    g.add_argument("--variant", choices=("auto",) + VARIANTS, default="auto",
                   help="what the back view contributes: hidden = MMDiT hidden states (the paper's "
                        "best), latent = its VAE latent, image = DINOv3 features of the decoded back "
                        "view, multiview = the back view as a second input image (no Know3D weights), "
                        "none = plain TRELLIS.2; auto = the variant of the Know3D checkpoint found, else "
                        "multiview (default: %(default)s)")
    g.add_argument("--resolution", choices=PIPELINE_TYPES, default="1024_cascade",
                   help="TRELLIS.2 pipeline type (default: %(default)s)")


def add_generation_options(p: argparse.ArgumentParser, demo: bool = False) -> None:
    fast = "the demo's fast setting)"
    g = p.add_argument_group("generation")
    g.add_argument("--sigma", type=float, metavar="S",
                   help="noise level at which MMDiT hidden states are captured (default: the Know3D "
                        "checkpoint's own; a different value is refused)")
    g.add_argument("--layers", type=int_list, metavar="L1,L2,..",
                   help="MMDiT blocks to capture (default: the checkpoint's own)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--steps", type=positive_int, metavar="N", help="TRELLIS.2 sampler steps per stage (default: "
                   + (fast if demo else "pipeline.json's, 12)"))
    g.add_argument("--back-steps", type=positive_int, default=None if demo else 40, metavar="N",
                   help="Qwen-Image-Edit steps of the back view (default: " + (fast if demo else "%(default)s)"))
    g.add_argument("--back-size", type=size, metavar="HxW", help="back view size in pixels, multiples of 16 "
                   "(default: " + (fast if demo else "about 1 megapixel at the front image's aspect ratio)"))
    g.add_argument("--back-image", action="store_true",
                   help="also decode and save the back view when the variant does not need it "
                        "(hidden/latent stop sampling early)")
    g.add_argument("--full-frame", action="store_true",
                   help="the image has no transparency: use the whole frame as the object (otherwise "
                        "give images with the background removed, as RGBA)")
    g.add_argument("--format", choices=("glb", "obj", "ply", "stl"), default="glb",
                   help="mesh file format (default: %(default)s)")
    g.add_argument("--floaters", type=fraction, default=None if demo else 0.01, metavar="F",
                   help="remove pieces with fewer than this fraction of the faces; 0 keeps every piece "
                        "(default: " + ("0 for the demo: its random mesh is many small pieces)" if demo
                                        else "%(default)s)"))
    g.add_argument("--target-faces", type=int, default=0, metavar="N",
                   help="reduce the mesh to at most N faces (quadric edge collapse); 0 keeps all (default)")
    g.add_argument("--device", default="auto", help="cuda, cuda:1, cpu ... (default: cuda if available)")
    g.add_argument("--dtype", choices=("auto",) + DTYPE_NAMES, default="auto",
                   help="weights dtype (default: " + ("float32 for the demo" if demo else
                                                      "bfloat16 on CUDA, float32 on CPU") + ")")
    g.add_argument("--offload", action="store_true",
                   help="keep models on the CPU and move each to the GPU only while it runs (small cards)")
    g.add_argument("--vram", type=positive_float, metavar="GiB",
                   help="memory of the card in GiB: picks how the Qwen networks fit it (fp8 weight storage, "
                        "block offloading with prefetch) and implies --offload below 'resident'; printed in "
                        "the log and stored in record.json (plans: " + ", ".join(MEMORY_PLANS) + ")")
    g.add_argument("--pin-host", action=argparse.BooleanOptionalAction, default=None,
                   help="offloaded networks visit the GPU from pinned (page-locked) host copies, one copy in per "
                        "visit, none back; the offloaded weights' host RAM is locked (not swappable). Default: on "
                        "for the block plans of --vram (12-40 GiB cards), off otherwise; --pin-host with --vram 24+ "
                        "also allows the fp8 plan (faster per image, ~30 s more to load); stored in record.json")
    g.add_argument("--normals-size", type=positive_int, default=256, metavar="PX",
                   help="side of each normal render in normals.png (default: %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    add_texture_options(p)



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


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_device(name: str) -> str:
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


def resolve_dtype(name: str, device: str):
    """``--dtype`` -> torch dtype (``auto``: bfloat16 on CUDA, float32 on the CPU)."""
    import torch

    return getattr(torch, auto_dtype_name(device.split(":")[0]) if name == "auto" else dtype_name(name))


def qwen_files(opts: argparse.Namespace) -> Dict[str, str]:
    """``{"transformer" | "text_encoder": path}`` of the ComfyUI Qwen files given on the command line."""
    given = {"transformer": getattr(opts, "qwen_transformer", None),
             "text_encoder": getattr(opts, "qwen_text_encoder", None)}
    return {k: v for k, v in given.items() if v}


def resolve_memory_plan(opts: argparse.Namespace):
    """``--vram GiB`` -> ``plan.MemoryPlan`` (None without ``--vram``); :class:`UsageError` for a card
    below the smallest plan or together with ``--offload`` (the plan decides the offloading), and for
    ``--pin-host`` with neither (nothing is offloaded). Sets ``opts.pin_host`` to what runs: as asked, else
    the plan's ``pins_by_default`` (off without a plan)."""
    gib = getattr(opts, "vram", None)
    asked = getattr(opts, "pin_host", None)  # True / False from --pin-host / --no-pin-host, None: the plan's default
    if asked and gib is None and not getattr(opts, "offload", False):
        raise UsageError("--pin-host applies to offloaded networks: add --offload or --vram GiB")
    if gib is None:
        opts.pin_host = bool(asked)
        return None
    if getattr(opts, "offload", False):
        raise UsageError("--vram and --offload: give one (--vram picks the offloading for the card)")
    try:
        plan = vram_plan(gib, pin_host=bool(asked))
    except ValueError as e:
        raise UsageError(f"--vram {gib:g}: {e}") from None
    opts.pin_host = plan.pins_by_default if asked is None else asked
    opts.pin_host_by_plan = asked is None and plan.pins_by_default
    return plan


def run_settings(opts: argparse.Namespace) -> Dict[str, Any]:
    """What determines the generated files (compared on resume; device/dtype/offload excluded)."""
    return {
        "variant": opts.variant, "resolution": opts.resolution, "sigma": opts.sigma, "layers": opts.layers,
        "seed": opts.seed, "steps": opts.steps, "back_steps": opts.back_steps, "back_image": opts.back_image,
        "full_frame": opts.full_frame, "format": opts.format, "floaters": opts.floaters,
        "target_faces": opts.target_faces, "back_size": list(opts.back_size) if opts.back_size else None,
        "know3d": os.path.basename(opts.know3d) if getattr(opts, "know3d", None) else None,
        "lora": os.path.basename(opts.lora) if getattr(opts, "lora", None) else None,
        **texture_settings(opts),
    }


