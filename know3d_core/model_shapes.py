"""``know3d models``, second pass: every network built from its config on the meta device and
compared, key by key (names, shapes, dtypes), with the safetensors headers. No weight is read.

The comparisons are the loaders' own (``trellis2.loading.load_state_dict_strict``, the ComfyUI
inference of widths, ``conditioning.dinov3``'s key normalisation, ``knowledge.apply_know3d``, the
back-view LoRA matching of ``mmdit.lora``), run on meta tensors made from the headers: a file that
passes here loads, and a file that fails gets the loader's message (the file, the first mismatching
keys, the fix) before minutes of loading. :func:`check_shapes` fills ``FileCheck.problem``.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, Iterable, Mapping, Optional

import torch

from .plan import COMFY_VAE_PREFIXES, OFFICIAL_MODELS, SS_FLOW, shape_flows, strip_outer_prefix
from .safetensors_header import SafetensorsInfo, read_safetensors_header

__all__ = ["SAFETENSORS_DTYPES", "meta_state_dict", "check_shapes"]

# safetensors header dtype -> torch dtype (what a loader would get).
SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
}
_CASTABLE = {"F32", "F16", "BF16"}  # a floating parameter stored in one of these is cast on load
_TEXT_ENCODER_EMBED = "embed_tokens.weight"


def meta_state_dict(info: SafetensorsInfo) -> Dict[str, torch.Tensor]:
    """``{key: empty meta tensor}`` with each header entry's shape and dtype (unknown dtypes, e.g.
    FP8, become uint8: they are reported by :func:`_dtype_problem`)."""
    return {k: torch.empty(shape, dtype=SAFETENSORS_DTYPES.get(d, torch.uint8), device="meta")
            for k, (d, shape) in info.tensors.items()}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _dtype_problem(info: SafetensorsInfo, model: torch.nn.Module, rename: Mapping[str, str] = {}) -> Optional[str]:
    """A floating parameter stored as anything but F32/F16/BF16 (quantised, FP8, integer)."""
    bad = []
    for k, v in model.state_dict().items():
        stored = info.tensors.get(rename.get(k, k))
        if stored is not None and v.is_floating_point() and stored[0] not in _CASTABLE:
            bad.append(f"{k} ({stored[0]})")
    if not bad:
        return None
    return (f"{len(bad)} weights are stored in a dtype this loader does not cast ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); use the bf16/fp16/fp32 files")


def _read_json(path: str) -> dict:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------- TRELLIS.2
def check_official_model(json_path: str, weights_path: str):
    """``(meta model, None)`` when ``NAME.safetensors`` fits the network ``NAME.json`` builds, else
    ``(None, problem)``."""
    from .trellis2.loading import CheckpointError, build_model, load_state_dict_strict, read_model_json

    info = read_safetensors_header(weights_path)
    try:
        name, args = read_model_json(json_path)
        model = build_model(name, args, device="meta", source=json_path, empty=True)
        problem = _dtype_problem(info, model)
        if problem:
            return None, problem
        load_state_dict_strict(model, meta_state_dict(info), weights_path)
    except (CheckpointError, ValueError, TypeError) as e:
        return None, _one_line(e)
    return model, None


def check_comfy_flows(path: str, keys: Iterable[str]):
    """``({pipeline key: meta flow}, None)`` for the flows ``keys`` of a ComfyUI diffusion file."""
    from .trellis2.loading import CheckpointError, build_flows_from_state_dict

    info = read_safetensors_header(path)
    sd = meta_state_dict(info)
    is_512 = str(info.metadata.get("is_512", "")).strip().lower() in ("1", "true", "yes")
    try:
        flows = build_flows_from_state_dict(sd, device="meta", source=path, is_512=is_512)
    except (CheckpointError, ValueError, TypeError) as e:
        return {}, _one_line(e)
    return {k: m for k, m in flows.items() if k in set(keys)}, None


def check_comfy_vae(path: str) -> Optional[str]:
    """Both decoders of ComfyUI's shape VAE file, from the widths its keys imply."""
    from .trellis2 import comfy_files as cf
    from .trellis2.loading import CheckpointError, build_model, load_state_dict_strict

    info = read_safetensors_header(path)
    bare = strip_outer_prefix(list(info.tensors))
    sd = meta_state_dict(info)
    try:
        for prefix, key in COMFY_VAE_PREFIXES.items():
            sub = {k[len(prefix):]: sd[full] for k, full in bare.items() if k.startswith(prefix)}
            source = f"{path} [{prefix}*]"
            if key == "shape_slat_decoder":
                cf._check_sparse_conv_layout(sub, source)
            name, infer = cf._DECODERS[key]
            model = build_model(name, infer(sub, source), device="meta", source=source, empty=True)
            load_state_dict_strict(model, sub, source)
    except (CheckpointError, ValueError, TypeError, KeyError) as e:
        return _one_line(e)
    return None


# --------------------------------------------------------------------------------------- DINOv3
def check_dinov3(path: str) -> Optional[str]:
    """DINOv3 folder (config.json + model.safetensors) or single file, as ``load_dinov3_model``."""
    from .conditioning import dinov3 as dv

    weights = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    sd = meta_state_dict(read_safetensors_header(weights))
    try:
        cfg = _read_json(os.path.join(path, "config.json")) if os.path.isdir(path) else dv.config_from_state_dict(sd)
        config_cls, model_cls = dv._transformers_classes()
        with torch.device("meta"):
            model = model_cls(config_cls.from_dict(cfg))
        dv._load_strict(model, sd, weights)
    except (ValueError, TypeError, KeyError) as e:
        return _one_line(e)
    return None


# --------------------------------------------------------------------------------------- Qwen
def _sharded_info(files: Iterable[str]) -> SafetensorsInfo:
    infos = [read_safetensors_header(p) for p in files]
    tensors = {k: v for i in infos for k, v in i.tensors.items()}
    return SafetensorsInfo(infos[0].path if infos else "", tensors, {})


def check_diffusers(folder: str, sub: str, class_name: str):
    """``(meta model, None)`` when ``folder/sub``'s weights fit the diffusers class its config builds."""
    import diffusers

    from .mmdit.loading import check_weights

    d = os.path.join(folder, sub)
    try:
        info = _sharded_info(check_weights(folder, sub, "diffusion_pytorch_model"))
        with torch.device("meta"):
            model = getattr(diffusers, class_name).from_config(_read_json(os.path.join(d, "config.json")))
    except (OSError, ValueError, TypeError, KeyError) as e:
        return None, _one_line(e)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(info.tensors))
    unexpected = sorted(set(info.tensors) - set(expected))
    wrong = [f"{k} (file {info.tensors[k][1]}, config {tuple(v.shape)})" for k, v in expected.items()
             if k in info.tensors and tuple(info.tensors[k][1]) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"{n} {what} (e.g. {', '.join(keys[:3])})" for what, keys, n in (
            ("missing", missing, len(missing)), ("unexpected", unexpected, len(unexpected)),
            ("wrong shapes", wrong, len(wrong))) if keys]
        return None, (f"{d}: the weights do not fit {class_name} of its config.json: {'; '.join(parts)}. "
                      "Fix: download config.json and the weights of the same repository revision")
    return model, _dtype_problem(info, model)


def check_text_encoder(folder: str, joint_attention_dim: Optional[int]) -> Optional[str]:
    """Qwen2.5-VL: the token embedding fits config.json and its width is the MMDiT's text width."""
    from .mmdit.loading import check_weights

    d = os.path.join(folder, "text_encoder")
    try:
        cfg = _read_json(os.path.join(d, "config.json"))
        info = _sharded_info(check_weights(folder, "text_encoder", "model"))
    except (OSError, ValueError, KeyError) as e:
        return _one_line(e)
    text = cfg.get("text_config") or cfg
    hidden, vocab = text.get("hidden_size", cfg.get("hidden_size")), text.get("vocab_size", cfg.get("vocab_size"))
    embed = next((shape for k, (_, shape) in info.tensors.items() if k.endswith(_TEXT_ENCODER_EMBED)), None)
    if embed is None:
        return f"{d}: no {_TEXT_ENCODER_EMBED} in the weights: not a Qwen2.5-VL text encoder"
    if tuple(embed) != (vocab, hidden):
        return (f"{d}: {_TEXT_ENCODER_EMBED} is {tuple(embed)}, config.json says ({vocab}, {hidden}). "
                "Fix: download config.json and the weights of the same repository revision")
    if joint_attention_dim is not None and hidden != joint_attention_dim:
        return (f"{d}: text width {hidden}, but the MMDiT reads {joint_attention_dim}-wide text "
                "(transformer/config.json joint_attention_dim): text encoder of another model")
    return None


def check_backview_lora(path: str, transformer: torch.nn.Module) -> Optional[str]:
    """Every LoRA module matches a Linear of the (meta) MMDiT with fitting shapes."""
    from .mmdit.lora import LoraError, group_lora_tensors, match_lora

    try:
        groups, family = group_lora_tensors(meta_state_dict(read_safetensors_header(path)).items(), path)
        match_lora(transformer, groups, family, path)
    except LoraError as e:
        return _one_line(e)
    return None


# --------------------------------------------------------------------------------------- Know3D
def check_know3d(path: str, flows: Mapping[str, torch.nn.Module]) -> Optional[str]:
    """A delta Know3D file against the (meta) flows it patches, by ``knowledge.apply_know3d``."""
    from .knowledge.checkpoint import Know3DCheckpoint, Know3DFormatError, Know3DSpec, apply_know3d
    from .knowledge.checkpoint import _validate_model_tensors
    from .knowledge.kinds import KnowledgeMismatchError
    from .knowledge.lora import LoRAError

    info = read_safetensors_header(path)
    meta = info.metadata
    try:
        spec = Know3DSpec.from_metadata(meta, path)
        names = [str(n) for n in json.loads(meta.get("models", "[]"))]
        tensors: Dict[str, Dict[str, torch.Tensor]] = {n: {} for n in names}
        for key, t in meta_state_dict(info).items():
            name, _, sub = key.partition(".")
            if name not in tensors or not sub:
                raise Know3DFormatError(f"{path}: tensor {key!r} does not start with a listed model {names}")
            tensors[name][sub] = t
        ckpt = Know3DCheckpoint(path, spec, meta.get("content", ""), tensors, json.loads(meta.get("configs", "{}")))
        for name in names:
            _validate_model_tensors(ckpt, name)
        if ckpt.content == "delta":
            targets = {k: m for k, m in flows.items() if k in tensors}
            lacking = [k for k in flows if k not in tensors]
            if lacking:
                return f"{path} has no weights for {', '.join(lacking)}, which this pipeline type runs"
            apply_know3d(targets, ckpt, merge=False)
    except (Know3DFormatError, KnowledgeMismatchError, LoRAError, ValueError, TypeError) as e:
        return _one_line(e)
    return None


# --------------------------------------------------------------------------------------- all
def _set(check, key: str, problem: Optional[str]) -> None:
    for f in check.files:
        if f.key == key and f.ok and problem:
            f.problem = problem


def check_shapes(check) -> None:
    """Fill ``problem`` of every usable file of ``check`` (a ``ModelCheck``) whose tensors do not fit
    the network its config (or, for ComfyUI files and Know3D deltas, its partner files) builds."""
    flow_keys = (SS_FLOW,) + shape_flows(check.resolution)
    flows: Dict[str, torch.nn.Module] = {}
    with _quiet():
        if check.layout == "official":
            for key in OFFICIAL_MODELS:
                weights, config = check.path(key), check.path(key + "_json")
                if weights and config:
                    model, problem = check_official_model(config, weights)
                    _set(check, key, problem)
                    if model is not None and key in flow_keys:
                        flows[key] = model
        else:
            if check.path("comfy_flows"):
                flows, problem = check_comfy_flows(check.path("comfy_flows"), flow_keys)
                _set(check, "comfy_flows", problem)
            if check.path("comfy_vae"):
                _set(check, "comfy_vae", check_comfy_vae(check.path("comfy_vae")))
        if check.path("dinov3"):
            _set(check, "dinov3", check_dinov3(check.path("dinov3")))
        if check.path("know3d") and len(flows) == len(flow_keys):
            _set(check, "know3d", check_know3d(check.path("know3d"), flows))
        _check_qwen(check)


def _complete(check, qwen: str, sub: str) -> bool:
    """Every file of ``qwen/sub`` was found and is sound (else that is the problem reported)."""
    folder = os.path.join(qwen, sub)
    path = check.path(f"qwen_{sub}")
    if path and os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder):
        return False  # a ComfyUI single file (--qwen-transformer / --qwen-text-encoder): checked as it loads
    return bool(path) and all(f.ok for f in check.files if f.folder == folder)


def _check_qwen(check) -> None:
    qwen = check.path("qwen")
    if not qwen:
        return
    transformer, problem = (check_diffusers(qwen, "transformer", "QwenImageTransformer2DModel")
                            if _complete(check, qwen, "transformer") else (None, None))
    _set(check, "qwen_transformer", problem)
    if _complete(check, qwen, "vae"):
        _set(check, "qwen_vae", check_diffusers(qwen, "vae", "AutoencoderKLQwenImage")[1])
    if _complete(check, qwen, "text_encoder"):
        try:
            width = _read_json(os.path.join(qwen, "transformer", "config.json")).get("joint_attention_dim")
        except (OSError, ValueError):
            width = None
        _set(check, "qwen_text_encoder", check_text_encoder(qwen, width))
    if transformer is not None and check.path("lora"):
        _set(check, "lora", check_backview_lora(check.path("lora"), transformer))


@contextlib.contextmanager
def _quiet():
    """No transformers/diffusers INFO/WARNING chatter while configs are turned into meta models."""
    import logging

    names = ("transformers", "diffusers")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in old.items():
            logging.getLogger(n).setLevel(level)
