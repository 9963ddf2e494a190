"""ComfyUI's Qwen single files in the CLI: ``qwen_image_edit_2511_*.safetensors`` (the MMDiT) ->
diffusers' ``QwenImageTransformer2DModel``, ``qwen_2.5_vl_7b_fp8_scaled.safetensors`` (the text
encoder) -> transformers' ``Qwen2_5_VLForConditionalGeneration``, strictly.

ComfyUI stores a quantised Linear as ``<layer>.weight`` in fp8 with a per-tensor scale
(``<layer>.weight_scale``; ``<layer>.scale_weight`` in the older scaled-fp8 files marked by a
``scaled_fp8`` tensor), the format named by ``<layer>.comfy_quant`` (JSON bytes) or the file's
``_quantization_metadata``; plain ``fp8_e4m3fn`` files hold fp8 weights with no scale. Each weight is
read and dequantised (``fp8 * scale``) into the compute dtype, one tensor at a time; a memory plan
(``mmdit.memory``) may then store it in fp8 again. Key rules and markers: ``plan.COMFY_QWEN_*``.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterator, Tuple

import torch

from ..plan import (COMFY_DROPPED_SUFFIXES, COMFY_FP8_FORMATS, COMFY_INDEX_TIMESTEP_ZERO, COMFY_QWEN_OUTER_PREFIXES,
                    COMFY_SCALED_FP8, COMFY_WEIGHT_SCALES, comfy_qwen_te_key)

__all__ = ["ComfyFileError", "dense_tensors", "read_comfy_transformer", "read_comfy_text_encoder",
           "load_comfy_transformer", "load_comfy_text_encoder"]


class ComfyFileError(ValueError):
    """A ComfyUI file that cannot be read as the network asked for (the message names the file)."""


def _layer_formats(path: str, f, keys) -> Dict[str, str]:
    """``{layer prefix (with the dot): quantisation format}`` of a file, from ``_quantization_metadata``,
    ``<layer>.comfy_quant`` tensors, or (older files) ``scaled_fp8`` + ``<layer>.scale_weight``."""
    meta = f.metadata() or {}
    formats: Dict[str, str] = {}
    if "_quantization_metadata" in meta:
        for layer, conf in json.loads(meta["_quantization_metadata"]).get("layers", {}).items():
            formats[layer + "."] = conf.get("format")
    for k in keys:
        if k.endswith(".comfy_quant"):
            conf = json.loads(bytes(f.get_tensor(k).tolist()).decode("utf-8"))
            formats[k[:-len("comfy_quant")]] = conf.get("format")
    if any(k == COMFY_SCALED_FP8 or k.endswith("." + COMFY_SCALED_FP8) for k in keys):
        for k in keys:
            if k.endswith(".scale_weight"):
                formats.setdefault(k[:-len("scale_weight")], "float8_e4m3fn")
    bad = {layer: fmt for layer, fmt in formats.items() if fmt not in COMFY_FP8_FORMATS}
    if bad:
        layer, fmt = next(iter(bad.items()))
        raise ComfyFileError(f"{path}: layer {layer.rstrip('.')} is quantised as {fmt!r}; the CLI reads "
                             f"{', '.join(COMFY_FP8_FORMATS)} (scaled or not) and unquantised files")
    return formats


def _is_flag(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in (COMFY_INDEX_TIMESTEP_ZERO, COMFY_SCALED_FP8) or last in COMFY_DROPPED_SUFFIXES \
        or last in COMFY_WEIGHT_SCALES or last == "weight_scale_2"


def _scale_for(f, layer: str, keys, weight: torch.Tensor) -> torch.Tensor | None:
    """The layer's weight scale, shaped to broadcast over ``weight`` (per tensor or per output row)."""
    name = next((layer + s for s in COMFY_WEIGHT_SCALES if layer + s in keys), None)
    if name is None:
        return None
    scale = f.get_tensor(name).float()
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() == weight.shape[0]:
        return scale.reshape(-1, *([1] * (weight.dim() - 1)))
    raise ComfyFileError(f"{name} has {scale.numel()} values; expected 1 or {weight.shape[0]} (one per output row)")


def dense_tensors(path: str, dtype: torch.dtype) -> Tuple[Iterator[Tuple[str, torch.Tensor]], set]:
    """``(iterator of (key, dense tensor in dtype), flag keys)`` of a ComfyUI safetensors file: fp8
    weights times their scale, every other float tensor cast, flags/scales/input scales left out
    (their names are returned)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"ComfyUI file not found: {path}")
    f = safe_open(path, framework="pt", device="cpu")
    keys = set(f.keys())
    formats = _layer_formats(path, f, keys)
    flags = {k for k in keys if _is_flag(k)}

    def tensors():
        for k in sorted(keys - flags):
            t = f.get_tensor(k)
            layer = k[:-len("weight")] if k.endswith(".weight") else None
            if layer is not None and layer in formats and t.dtype == torch.uint8:  # fp8 stored as bytes
                t = t.view(getattr(torch, formats[layer]))
            scale = _scale_for(f, layer, keys, t) if layer is not None else None
            if scale is not None:
                t = t.float() * scale
            yield k, (t.to(dtype) if t.is_floating_point() else t)

    return tensors(), flags


def _strip_outer(keys) -> str:
    keys = list(keys)
    return next((p for p in COMFY_QWEN_OUTER_PREFIXES if keys and all(k.startswith(p) for k in keys)), "")


def _check_keys(path: str, what: str, got: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        raise ComfyFileError(f"{path}: not a {what}: {len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}) keys")
    for k, v in got.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ComfyFileError(f"{path}: {k} has shape {tuple(v.shape)}, the config needs {tuple(expected[k].shape)}")


def read_comfy_transformer(path: str, dtype: torch.dtype, dtypes: Dict[str, torch.dtype] | None = None
                           ) -> Tuple[Dict[str, torch.Tensor], bool]:
    """ComfyUI MMDiT file -> (diffusers state dict in ``dtype``, 2511 marker present); ``dtypes``:
    ``{key: dtype}`` each tensor is then stored in as it is read (fp8 for a plan's stored weights)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        outer = _strip_outer(list(f.keys()))
    items, flags = dense_tensors(path, dtype)
    dtypes = dtypes or {}
    state = {}
    for k, v in items:
        key = k[len(outer):]
        state[key] = v.to(dtypes[key]) if key in dtypes and v.is_floating_point() else v
    return state, any(k.endswith(COMFY_INDEX_TIMESTEP_ZERO) for k in flags)


def read_comfy_text_encoder(path: str, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """ComfyUI Qwen2.5-VL file -> transformers' state dict in ``dtype`` (keys renamed by
    ``plan.COMFY_QWEN_TE_RENAMES``; a key no rule matches is an error)."""
    items, _ = dense_tensors(path, dtype)
    state = {}
    for k, v in items:
        new = comfy_qwen_te_key(k)
        if new is None:
            raise ComfyFileError(f"{path}: key {k!r} is not a Qwen2.5-VL key (model.*, visual.*, lm_head.*)")
        state[new] = v
    return state


def load_comfy_transformer(path: str, config: dict, dtype: torch.dtype = torch.bfloat16, device="cpu",
                           storage: str | None = None):
    """ComfyUI MMDiT file + the diffusers config (``QWEN/transformer/config.json``) ->
    ``QwenImageTransformer2DModel`` (strict: exactly the config's keys and shapes; the file's 2511
    marker must agree with ``zero_cond_t``). ``storage`` (``plan.FP8_STORAGE``): the Linear weights
    are stored in fp8 as they are read (dequantised to ``dtype``, then cast)."""
    from diffusers import QwenImageTransformer2DModel

    from .model_build import rebuild_meta_attributes, require_zero_cond_t
    from .memory import load_dtypes

    with torch.device("meta"):
        model = QwenImageTransformer2DModel.from_config(config)
    dtypes = load_dtypes(model, storage, dtype)
    state, is_2511 = read_comfy_transformer(path, dtype, dtypes)
    if is_2511 != bool(config.get("zero_cond_t", False)):
        raise ComfyFileError(f"{path}: the file is {'' if is_2511 else 'not '}Qwen-Image-Edit-2511 (marker "
                             f"{COMFY_INDEX_TIMESTEP_ZERO}), the transformer config says zero_cond_t="
                             f"{config.get('zero_cond_t', False)}")
    if is_2511:
        require_zero_cond_t()
    _check_keys(path, "Qwen-Image MMDiT of this config", state, model.state_dict())
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    rebuild_meta_attributes(model)
    return model.eval().requires_grad_(False)


def load_comfy_text_encoder(path: str, config_folder: str, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    """ComfyUI Qwen2.5-VL file + the config folder (``QWEN/text_encoder``) ->
    ``Qwen2_5_VLForConditionalGeneration`` (strict). ComfyUI's text encoder has no LM head and its files
    may leave it out: the prompt encoder reads the last hidden state only, so a missing ``lm_head.weight``
    is tied to the input embedding."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(config_folder)
    state = read_comfy_text_encoder(path, dtype)
    with torch.device("meta"):
        expected = Qwen2_5_VLForConditionalGeneration(config).state_dict()
    embed = "model.language_model.embed_tokens.weight"
    if "lm_head.weight" in expected and "lm_head.weight" not in state and embed in state:
        state["lm_head.weight"] = state[embed]
    _check_keys(path, "Qwen2.5-VL text encoder of this config", state, expected)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)
