"""Tiny TRELLIS.2 folders in the official layout, with deterministic random weights.

``write_tiny_trellis2(folder)`` writes ``pipeline.json`` + ``ckpts/NAME.json`` + ``ckpts/NAME.safetensors``
for every model of the geometry path, under the official file names, with small widths. Flows are
stored all-bf16 like the real files, the shape decoder all-fp16, the sparse-structure decoder fp16
body with fp32 input/output layers (as the official files).
The sparse-structure decoder entry keeps the official TRELLIS v1 reference
(``microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16``) and its files go to ``ckpts/``,
so loading exercises the local lookup of that reference.
"""
import importlib
import json
import math
import os
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .loading import get_model_class

__all__ = [
    "OFFICIAL_MODEL_REFERENCES", "tiny_flow_args", "random_state_dict", "write_checkpoint",
    "write_tiny_trellis2", "write_tiny_encoders",
]

# pipeline.json "models" of microsoft/TRELLIS.2-4B (geometry path).
OFFICIAL_MODEL_REFERENCES: Dict[str, str] = {
    "sparse_structure_flow_model": "ckpts/ss_flow_img_dit_1_3B_64_bf16",
    "sparse_structure_decoder": "microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16",
    "shape_slat_flow_model_512": "ckpts/slat_flow_img2shape_dit_1_3B_512_bf16",
    "shape_slat_flow_model_1024": "ckpts/slat_flow_img2shape_dit_1_3B_1024_bf16",
    "shape_slat_decoder": "ckpts/shape_dec_next_dc_f16c32_fp16",
}


def _sampler(strength: float, rescale: float, interval, rescale_t: float) -> Dict[str, Any]:
    return {
        "name": "FlowEulerGuidanceIntervalSampler",
        "args": {"sigma_min": 1e-5},
        "params": {"steps": 12, "guidance_strength": strength, "guidance_rescale": rescale,
                   "guidance_interval": list(interval), "rescale_t": rescale_t},
    }


def tiny_flow_args(
    kind: str,
    model_channels: int = 64,
    num_blocks: int = 2,
    num_heads: int = 4,
    cond_channels: int = 32,
    resolution: Optional[int] = None,
) -> Dict[str, Any]:
    """Checkpoint-JSON args of a tiny flow with the official structure.

    kind: ``"ss"`` (resolution 16, 8 -> 8 channels), ``"shape512"`` (32, 32 -> 32) or
    ``"shape1024"`` (64, 32 -> 32). mlp_ratio stays the official 5.3334.
    """
    res, cin, cout = {"ss": (16, 8, 8), "shape512": (32, 32, 32), "shape1024": (64, 32, 32)}[kind]
    return dict(
        resolution=res if resolution is None else resolution, in_channels=cin, out_channels=cout,
        model_channels=model_channels, cond_channels=cond_channels, num_blocks=num_blocks,
        num_heads=num_heads, mlp_ratio=5.3334, pe_mode="rope", share_mod=True, initialization="scaled",
        qk_rms_norm=True, qk_rms_norm_cross=True, dtype="bfloat16",
    )


def random_state_dict(model: nn.Module, seed: int) -> Dict[str, torch.Tensor]:
    """Deterministic random values for every state-dict entry of ``model`` (in its dtypes).

    Weights (ndim >= 2) ~ N(0, 1/fan_in) with fan_in = numel / shape[0]; biases ~ N(0, 0.02^2);
    1-D weights (norms) and RMS gammas ~ 1 + N(0, 0.1^2); other 1-D entries (``modulation``) ~ N(0, 0.1^2);
    integer buffers are kept. Unlike the reference init nothing is zero, so outputs are non-trivial.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        leaf = key.rsplit(".", 1)[-1]
        if value.dim() >= 2 and leaf != "gamma":
            fan_in = max(1, value.numel() // value.shape[0])
            v = torch.randn(value.shape, generator=gen) / math.sqrt(fan_in)
        elif leaf == "bias":
            v = 0.02 * torch.randn(value.shape, generator=gen)
        elif leaf in ("gamma", "weight"):  # RMS gammas and (1-D) norm weights
            v = 1 + 0.1 * torch.randn(value.shape, generator=gen)
        else:
            v = 0.1 * torch.randn(value.shape, generator=gen)
        out[key] = v.to(value.dtype)
    return out


def write_checkpoint(
    stem: str,
    name: str,
    args: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    storage_dtype: Optional[torch.dtype] = None,
) -> None:
    """Write ``stem.json`` (``{"name", "args"}``) and ``stem.safetensors``.

    storage_dtype: cast every floating tensor to it (the official flows are all-bf16); None keeps
    each tensor's dtype.
    """
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump({"name": name, "args": dict(args)}, f, indent=4)
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        if storage_dtype is not None and v.is_floating_point():
            v = v.to(storage_dtype)
        tensors[k] = v.contiguous()
    save_file(tensors, stem + ".safetensors")


def _tiny_decoder(module_name: str, class_name: str):
    """``(class name, TINY_ARGS)`` of a decoder module, or None when that module is not there yet."""
    try:
        module = importlib.import_module(f".{module_name}", __package__)
    except ImportError:
        return None
    args = getattr(module, "TINY_ARGS", None)
    if args is None or not hasattr(module, class_name):
        return None
    return class_name, dict(args)


def write_tiny_trellis2(
    folder: str,
    seed: int = 0,
    model_channels: int = 64,
    num_blocks: int = 2,
    num_heads: int = 4,
    cond_channels: int = 32,
    with_decoders: bool = True,
) -> str:
    """Write a complete tiny TRELLIS.2 folder (official layout, geometry path). Returns ``folder``.

    Args:
        seed: weights, normalisation values: everything is a function of the seed.
        model_channels, num_blocks, num_heads, cond_channels: widths of the three flows
            (``cond_channels`` replaces DINOv3's 1024).
        with_decoders: also write the sparse-structure decoder and the shape decoder (their tiny
            configs come from ``TINY_ARGS`` in sparse_structure_decoder.py / shape_decoder.py).
    """
    os.makedirs(os.path.join(folder, "ckpts"), exist_ok=True)
    widths = dict(model_channels=model_channels, num_blocks=num_blocks, num_heads=num_heads,
                  cond_channels=cond_channels)
    specs = {
        "sparse_structure_flow_model": ("SparseStructureFlowModel", tiny_flow_args("ss", **widths), torch.bfloat16),
        "shape_slat_flow_model_512": ("SLatFlowModel", tiny_flow_args("shape512", **widths), torch.bfloat16),
        "shape_slat_flow_model_1024": ("SLatFlowModel", tiny_flow_args("shape1024", **widths), torch.bfloat16),
    }
    if with_decoders:
        # storage like the official files: the TRELLIS v1 SS decoder mixes F16 (body) and F32
        # (input/output layers), the shape decoder is all F16.
        for key, module_name, class_name, storage in (
            ("sparse_structure_decoder", "sparse_structure_decoder", "SparseStructureDecoder", None),
            ("shape_slat_decoder", "shape_decoder", "FlexiDualGridVaeDecoder", torch.float16),
        ):
            found = _tiny_decoder(module_name, class_name)
            if found is None:
                raise RuntimeError(
                    f"write_tiny_trellis2: {module_name}.py with {class_name} and TINY_ARGS is not available "
                    "yet; call with with_decoders=False"
                )
            specs[key] = (found[0], found[1], storage)

    models = {}
    for i, (key, (name, args, storage)) in enumerate(specs.items()):
        model = get_model_class(name)(**args)
        sd = random_state_dict(model, seed * 1000 + i)
        ref = OFFICIAL_MODEL_REFERENCES[key]
        stem = os.path.join(folder, "ckpts", ref.rsplit("/", 1)[-1])
        write_checkpoint(stem, name, args, sd, storage)
        models[key] = ref

    gen = torch.Generator().manual_seed(seed * 1000 + 999)
    mean = (0.1 * torch.randn(32, generator=gen)).tolist()
    std = (0.5 + torch.rand(32, generator=gen)).tolist()
    pipeline = {
        "name": "Trellis2ImageTo3DPipeline",
        "args": {
            "models": models,
            "sparse_structure_sampler": _sampler(7.5, 0.7, (0.6, 1.0), 5.0),
            "shape_slat_sampler": _sampler(7.5, 0.5, (0.6, 1.0), 3.0),
            "shape_slat_normalization": {"mean": mean, "std": std},
            "image_cond_model": {"name": "DinoV3FeatureExtractor",
                                 "args": {"model_name": "facebook/dinov3-vitl16-pretrain-lvd1689m"}},
            "rembg_model": {"name": "BiRefNet", "args": {"model_name": "briaai/RMBG-2.0"}},
            "default_pipeline_type": "1024_cascade",
        },
    }
    with open(os.path.join(folder, "pipeline.json"), "w", encoding="utf-8") as f:
        json.dump(pipeline, f, indent=4)
    return folder


def write_tiny_encoders(folder: str, seed: int = 0) -> str:
    """Add the tiny shape and sparse-structure encoders (``TINY_ARGS`` of shape_encoder.py /
    sparse_structure_encoder.py) to ``folder/ckpts`` under their official file names, stored like
    the official files (all F16; the SS encoder's input/output layers F32). Returns ``folder``."""
    from . import shape_encoder, sparse_structure_encoder

    for i, (module, name, storage) in enumerate((
        (shape_encoder, "FlexiDualGridVaeEncoder", torch.float16),
        (sparse_structure_encoder, "SparseStructureEncoder", None),
    )):
        model = getattr(module, name)(**module.TINY_ARGS)
        stem = os.path.join(folder, "ckpts", module.CHECKPOINT_REFERENCE.rsplit("/", 1)[-1])
        write_checkpoint(stem, name, module.TINY_ARGS, random_state_dict(model, seed * 1000 + 500 + i), storage)
    return folder
