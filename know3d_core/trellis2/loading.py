"""Loading TRELLIS.2 checkpoints: the official folder layout and ComfyUI single files.

Official layout (``microsoft/TRELLIS.2-4B``)::

    FOLDER/pipeline.json                     {"name": "Trellis2ImageTo3DPipeline", "args": {...}}
    FOLDER/ckpts/NAME.json                   {"name": <class name>, "args": {constructor args}}
    FOLDER/ckpts/NAME.safetensors            state dict, plain module paths

``pipeline.json``'s sparse-structure decoder points at the TRELLIS v1 repo
(``microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16``); it is looked up locally in
``FOLDER/ckpts/`` and in a sibling folder ``TRELLIS-image-large/`` (see :func:`resolve_checkpoint`).

ComfyUI (``Comfy-Org/TRELLIS.2``) repacks the flows into one file with key prefixes
``structure_model.``, ``img2shape_512.``, ``img2shape.`` (and ``shape2txt.``); see
:func:`load_comfy_flow_file`.

Every load is strict: missing keys, unexpected keys and wrong shapes raise one
:class:`CheckpointError` that names the file and the keys.
"""
import importlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from ..plan import COMFY_FLOW_PREFIXES, GEOMETRY_MODELS, strip_outer_prefix
from .modules.dit import parse_dtype

__all__ = [
    "MODEL_CLASSES", "GEOMETRY_MODELS", "COMFY_FLOW_PREFIXES", "FULL_SIZE_FLOW_CONFIGS",
    "CheckpointError", "PipelineConfig", "get_model_class", "check_state_dict", "load_state_dict_strict",
    "drop_reference_buffers",
    "read_model_json", "build_model", "load_model", "read_pipeline_config", "resolve_checkpoint",
    "load_pipeline_model", "load_pipeline_models", "split_state_dict_by_prefix", "infer_flow_config",
    "build_flows_from_state_dict", "load_comfy_flow_file",
]

PathLike = Union[str, "os.PathLike[str]"]
logger = logging.getLogger(__name__)

# Class name (as written in ckpts/*.json) -> (sibling module, class). Imported on first use, so a
# network whose file is not there yet only fails when it is actually asked for.
MODEL_CLASSES: Dict[str, Tuple[str, str]] = {
    "SparseStructureFlowModel": ("sparse_structure_flow", "SparseStructureFlowModel"),
    "SLatFlowModel": ("slat_flow", "SLatFlowModel"),
    "ElasticSLatFlowModel": ("slat_flow", "SLatFlowModel"),  # training-only memory mixin upstream
    "SparseStructureDecoder": ("sparse_structure_decoder", "SparseStructureDecoder"),
    "FlexiDualGridVaeDecoder": ("shape_decoder", "FlexiDualGridVaeDecoder"),
    "SparseStructureEncoder": ("sparse_structure_encoder", "SparseStructureEncoder"),
    "FlexiDualGridVaeEncoder": ("shape_encoder", "FlexiDualGridVaeEncoder"),
    "SparseUnetVaeDecoder": ("tex_decoder", "SparseUnetVaeDecoder"),  # the texture decoder
}

class CheckpointError(ValueError):
    """A checkpoint does not fit its network (names the file, the keys and the fix)."""


def get_model_class(name: str) -> type:
    """The network class for a checkpoint JSON ``name`` (see :data:`MODEL_CLASSES`)."""
    if name not in MODEL_CLASSES:
        raise CheckpointError(
            f"unknown TRELLIS.2 model class {name!r}; known: {', '.join(sorted(MODEL_CLASSES))}"
        )
    module_name, class_name = MODEL_CLASSES[name]
    module = importlib.import_module(f".{module_name}", __package__)
    return getattr(module, class_name)


# ----------------------------------------------------------------------------- strict loading
def _key_list(keys: List[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly the model's keys and shapes.

    dtypes may differ (values are cast on load). ``source`` (a file name) goes into the message.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or wrong):
        return
    lines = [f"checkpoint {source} does not fit {type(model).__name__}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_key_list(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_key_list(unexpected)}")
    if wrong:
        lines.append(f"  wrong shapes ({len(wrong)}): {_key_list(wrong)}")
    lines.append(
        "  Fix: use the checkpoint that belongs to this config (its .json next to the .safetensors), "
        "or re-download the file if it is truncated."
    )
    raise CheckpointError("\n".join(lines))


def drop_reference_buffers(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> Dict[str, torch.Tensor]:
    """``state_dict`` without the buffers that the reference class saves and ``model`` rebuilds
    (``model.reference_buffers()``, e.g. ``rope_phases`` of the structure flow).

    Each such buffer must have our shape and, unless it is on the meta device (a header-only check),
    our values (``allclose``, atol 1e-5); otherwise :class:`CheckpointError`. A dropped buffer is
    logged (INFO). Every other key is left for :func:`check_state_dict` to judge.
    """
    known = getattr(model, "reference_buffers", None)
    if known is None:
        return dict(state_dict)
    own = model.state_dict()
    kept = dict(state_dict)
    for key, ours in known().items():
        if key not in kept or key in own:
            continue
        theirs = kept.pop(key)
        if tuple(theirs.shape) != tuple(ours.shape):
            raise CheckpointError(
                f"checkpoint {source}: buffer {key} has shape {tuple(theirs.shape)}, {type(model).__name__} "
                f"builds {tuple(ours.shape)}. Fix: use the .json config the checkpoint was trained with.")
        if theirs.device.type != "meta" and not torch.allclose(
                theirs.to("cpu", torch.complex64 if ours.is_complex() else torch.float32), ours.cpu(), atol=1e-5):
            raise CheckpointError(
                f"checkpoint {source}: buffer {key} differs from the one {type(model).__name__} builds "
                "(another rope_freq or resolution than its .json config?). Fix: use the matching config.")
        logger.info("%s: dropped the reference buffer %s (equal to the one %s builds)",
                    source, key, type(model).__name__)
    return kept


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Check (:func:`check_state_dict`) and copy ``state_dict`` into ``model`` (cast to its dtypes).
    Reference-only buffers are checked and dropped first (:func:`drop_reference_buffers`)."""
    state_dict = drop_reference_buffers(model, state_dict, source)
    check_state_dict(model, state_dict, source)
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=True)
    return model


# ----------------------------------------------------------------------------- single models
def read_model_json(path: PathLike) -> Tuple[str, Dict[str, Any]]:
    """``{"name": cls, "args": {...}}`` -> ``(cls, args)``; errors name the file."""
    path = os.fspath(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"model config {path} not found (it belongs next to the .safetensors)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"model config {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or "name" not in doc or not isinstance(doc.get("args", {}), dict):
        raise CheckpointError(f"model config {path} must be {{\"name\": <class>, \"args\": {{...}}}}")
    return doc["name"], dict(doc.get("args", {}))


def build_model(
    name: str,
    args: Mapping[str, Any],
    dtype: Optional[Union[str, torch.dtype]] = None,
    device: Union[str, torch.device] = "cpu",
    source: str = "<config>",
    empty: bool = False,
) -> nn.Module:
    """Instantiate ``name(**args)`` on ``device``.

    Args:
        dtype: compute dtype of the network body (``model.convert_to(dtype)``); None keeps the
            config's choice (bf16 for the official flows).
        empty: allocate parameters without initialising them (they must be loaded afterwards);
            used when the class sets ``supports_empty_init = True``.
        source: file name for error messages.
    """
    cls = get_model_class(name)
    try:
        if empty and getattr(cls, "supports_empty_init", False):
            with torch.device("meta"):
                model = cls(**args)
            model = model.to_empty(device=device)
        else:
            model = cls(**args).to(device)
    except TypeError as e:
        raise CheckpointError(f"{source}: cannot build {name} from its args: {e}") from None
    if dtype is not None:
        if not hasattr(model, "convert_to"):
            raise CheckpointError(f"{name} has no convert_to(dtype); load it with dtype=None")
        model.convert_to(parse_dtype(dtype))
    return model.eval()


def _stem(path: PathLike) -> str:
    path = os.fspath(path)
    for ext in (".json", ".safetensors"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def load_model(
    path: PathLike,
    dtype: Optional[Union[str, torch.dtype]] = None,
    device: Union[str, torch.device] = "cpu",
) -> nn.Module:
    """Load ``PATH.json`` + ``PATH.safetensors`` (PATH with or without extension), strictly.

    Args:
        dtype: None keeps the config's dtype; ``'float32'`` / ``'bfloat16'`` / ``'float16'``
            choose the network body's compute dtype (fp32-by-design layers stay fp32).
        device: where the parameters live.
    """
    stem = _stem(path)
    name, args = read_model_json(stem + ".json")
    weights = stem + ".safetensors"
    if not os.path.exists(weights):
        raise FileNotFoundError(f"weights {weights} not found (expected next to {stem}.json)")
    model = build_model(name, args, dtype=dtype, device=device, source=stem + ".json", empty=True)
    state_dict = load_file(weights, device=str(device))
    return load_state_dict_strict(model, state_dict, weights)


# ----------------------------------------------------------------------------- pipeline.json
@dataclass
class PipelineConfig:
    """Parsed ``pipeline.json`` of a TRELLIS.2 folder.

    Attributes:
        folder: the folder holding pipeline.json.
        models: pipeline key (e.g. ``"shape_slat_flow_model_512"``) -> checkpoint reference.
        samplers: ``"sparse_structure_sampler"`` etc. -> ``{"name", "args", "params"}``.
        normalizations: ``"shape_slat_normalization"`` etc. -> ``{"mean": [C], "std": [C]}``.
        default_pipeline_type: ``"512"``, ``"1024"``, ``"1024_cascade"`` or ``"1536_cascade"``.
        image_cond_model, rembg_model: ``{"name", "args"}`` or None.
        args: the whole ``args`` object.
    """

    folder: str
    models: Dict[str, str]
    samplers: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    normalizations: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)
    default_pipeline_type: str = "1024_cascade"
    image_cond_model: Optional[Dict[str, Any]] = None
    rembg_model: Optional[Dict[str, Any]] = None
    args: Dict[str, Any] = field(default_factory=dict)

    def sampler_params(self, sampler: str) -> Dict[str, Any]:
        """``params`` of a sampler entry merged over its ``args`` (e.g. ``sigma_min``)."""
        if sampler not in self.samplers:
            raise KeyError(f"{self.folder}/pipeline.json has no {sampler!r}; has {sorted(self.samplers)}")
        entry = self.samplers[sampler]
        return {**entry.get("args", {}), **entry.get("params", {})}

    def normalization(self, name: str = "shape_slat_normalization") -> Tuple[torch.Tensor, torch.Tensor]:
        """``(mean [C], std [C])`` fp32 tensors of a latent normalisation entry."""
        if name not in self.normalizations:
            raise KeyError(f"{self.folder}/pipeline.json has no {name!r}")
        n = self.normalizations[name]
        return torch.tensor(n["mean"], dtype=torch.float32), torch.tensor(n["std"], dtype=torch.float32)


def read_pipeline_config(folder: PathLike) -> PipelineConfig:
    """Parse ``FOLDER/pipeline.json``; errors name the file and what is wrong."""
    folder = os.fspath(folder)
    path = os.path.join(folder, "pipeline.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: point at the TRELLIS.2 folder (the copy of microsoft/TRELLIS.2-4B "
            "that holds pipeline.json and ckpts/)"
        )
    try:
        with open(path, "r", encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    args = doc.get("args") if isinstance(doc, dict) else None
    if not isinstance(args, dict) or not isinstance(args.get("models"), dict):
        raise CheckpointError(f"{path} must be {{\"name\": ..., \"args\": {{\"models\": {{...}}, ...}}}}")
    return PipelineConfig(
        folder=folder,
        models={k: str(v) for k, v in args["models"].items()},
        samplers={k: v for k, v in args.items() if k.endswith("_sampler") and isinstance(v, dict)},
        normalizations={k: v for k, v in args.items() if k.endswith("_normalization") and isinstance(v, dict)},
        default_pipeline_type=str(args.get("default_pipeline_type", "1024_cascade")),
        image_cond_model=args.get("image_cond_model"),
        rembg_model=args.get("rembg_model"),
        args=args,
    )


def _exists(stem: str) -> bool:
    return os.path.exists(stem + ".json") and os.path.exists(stem + ".safetensors")


def resolve_checkpoint(folder: PathLike, reference: str, key: str = "model") -> str:
    """Local stem (path without extension) of a ``pipeline.json`` model reference.

    Tried in order: an absolute reference; ``FOLDER/REF``; for a hub reference
    ``OWNER/REPO/SUB/NAME`` also ``FOLDER/SUB/NAME``, ``FOLDER/../REPO/SUB/NAME`` and
    ``FOLDER/REPO/SUB/NAME``; finally ``FOLDER/ckpts/NAME``. Raises FileNotFoundError naming the
    expected files, the folders searched and, for hub references, the source repository.
    """
    folder = os.fspath(folder)
    parts = reference.replace("\\", "/").split("/")
    name = parts[-1]
    candidates = [reference] if os.path.isabs(reference) else [os.path.join(folder, *parts)]
    repo = None
    if not os.path.isabs(reference) and len(parts) >= 3 and parts[0] != "ckpts":
        repo = "/".join(parts[:2])
        rest = parts[2:]
        candidates += [
            os.path.join(folder, *rest),
            os.path.join(os.path.dirname(os.path.abspath(folder)), parts[1], *rest),
            os.path.join(folder, parts[1], *rest),
        ]
    candidates.append(os.path.join(folder, "ckpts", name))
    seen = []
    for stem in candidates:
        stem = os.path.normpath(stem)
        if stem in seen:
            continue
        seen.append(stem)
        if _exists(stem):
            return stem
    where = "\n".join(f"    {s}.json / .safetensors" for s in seen)
    hint = (
        f"download ckpts/{name}.json and ckpts/{name}.safetensors from the Hugging Face repo {repo} "
        f"into {os.path.join(folder, 'ckpts')} (or into a sibling folder {parts[1]}/ckpts)"
        if repo else f"the TRELLIS.2 folder {folder} is incomplete: re-download ckpts/{name}.*"
    )
    raise FileNotFoundError(
        f"{key}: checkpoint {reference!r} from {os.path.join(folder, 'pipeline.json')} not found. "
        f"Looked for:\n{where}\n  Fix: {hint}."
    )


def load_pipeline_model(
    config: Union[PipelineConfig, PathLike],
    key: str,
    dtype: Optional[Union[str, torch.dtype]] = None,
    device: Union[str, torch.device] = "cpu",
) -> nn.Module:
    """Load one ``pipeline.json`` model (e.g. ``"shape_slat_flow_model_512"``) strictly."""
    if not isinstance(config, PipelineConfig):
        config = read_pipeline_config(config)
    if key not in config.models:
        raise KeyError(
            f"{os.path.join(config.folder, 'pipeline.json')} has no model {key!r}; has {sorted(config.models)}"
        )
    return load_model(resolve_checkpoint(config.folder, config.models[key], key), dtype=dtype, device=device)


def load_pipeline_models(
    folder: PathLike,
    keys: Iterable[str] = GEOMETRY_MODELS,
    dtype: Optional[Union[str, torch.dtype]] = None,
    device: Union[str, torch.device] = "cpu",
) -> Dict[str, nn.Module]:
    """Load several ``pipeline.json`` models (default: the geometry path) -> ``{key: model}``.

    ``dtype`` applies to the flow models only; decoders keep their config's precision.
    """
    config = read_pipeline_config(folder)
    out = {}
    for key in keys:
        flow = "flow" in key
        out[key] = load_pipeline_model(config, key, dtype=dtype if flow else None, device=device)
    return out


# ----------------------------------------------------------------------------- ComfyUI single files
_FLOW_COMMON = dict(
    model_channels=1536, cond_channels=1024, num_blocks=30, num_heads=12, mlp_ratio=5.3334,
    pe_mode="rope", share_mod=True, initialization="scaled", qk_rms_norm=True, qk_rms_norm_cross=True,
    dtype="bfloat16",
)
# (class name, args) of the official full-size flows (configs/gen/*.json of microsoft/TRELLIS.2).
FULL_SIZE_FLOW_CONFIGS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "sparse_structure_flow_model": (
        "SparseStructureFlowModel", dict(resolution=16, in_channels=8, out_channels=8, **_FLOW_COMMON)),
    "shape_slat_flow_model_512": (
        "SLatFlowModel", dict(resolution=32, in_channels=32, out_channels=32, **_FLOW_COMMON)),
    "shape_slat_flow_model_1024": (
        "SLatFlowModel", dict(resolution=64, in_channels=32, out_channels=32, **_FLOW_COMMON)),
    "tex_slat_flow_model_1024": (
        "SLatFlowModel", dict(resolution=64, in_channels=64, out_channels=32, **_FLOW_COMMON)),
}

def split_state_dict_by_prefix(
    state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str], source: str = "<state dict>"
) -> Dict[str, Dict[str, torch.Tensor]]:
    """Split ``{prefix + key: tensor}`` into ``{prefix: {key: tensor}}`` (prefixes without a key are
    left out). A common outer prefix (``model.diffusion_model.`` ..., ``plan.strip_outer_prefix``) is
    stripped first. Keys that match no prefix raise :class:`CheckpointError` naming them and the file."""
    prefixes = sorted(prefixes, key=len, reverse=True)
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    stray = []
    for k, full in strip_outer_prefix(list(state_dict)).items():
        p = next((p for p in prefixes if k.startswith(p)), None)
        if p is None:
            stray.append(full)
        else:
            out.setdefault(p, {})[k[len(p):]] = state_dict[full]
    if stray:
        raise CheckpointError(
            f"{source}: keys with no known prefix ({len(stray)}): {_key_list(stray)}; expected prefixes "
            f"{', '.join(prefixes)}. Fix: this file is not a ComfyUI TRELLIS.2 diffusion file."
        )
    return out


def infer_flow_config(state_dict: Mapping[str, torch.Tensor], base: Mapping[str, Any]) -> Dict[str, Any]:
    """Flow constructor args for ``state_dict``: ``base`` (a full-size config) with every width,
    depth and head count read from the tensor shapes (so tiny files load too).

    The latent resolution is not stored in the weights and is taken from ``base``.
    """
    def shape(key):
        if key not in state_dict:
            raise CheckpointError(f"flow state dict lacks {key!r}; it is not a TRELLIS.2 flow DiT")
        return tuple(state_dict[key].shape)

    args = dict(base)
    channels, args["in_channels"] = shape("input_layer.weight")
    args["model_channels"] = channels
    args["out_channels"] = shape("out_layer.weight")[0]
    args["cond_channels"] = shape("blocks.0.cross_attn.to_kv.weight")[1]
    args["num_blocks"] = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    args["qk_rms_norm"] = "blocks.0.self_attn.q_rms_norm.gamma" in state_dict
    args["qk_rms_norm_cross"] = "blocks.0.cross_attn.q_rms_norm.gamma" in state_dict
    args["share_mod"] = "blocks.0.modulation" in state_dict
    if args["qk_rms_norm"]:
        args["num_heads"] = shape("blocks.0.self_attn.q_rms_norm.gamma")[0]
    elif channels != base.get("model_channels"):
        raise CheckpointError("cannot infer num_heads of a flow without q/k RMS norms")
    hidden = shape("blocks.0.mlp.mlp.0.weight")[0]
    if int(channels * float(base.get("mlp_ratio", 4))) != hidden:
        args["mlp_ratio"] = (hidden + 0.5) / channels  # int(channels * ratio) == hidden
    dtypes = {v.dtype for k, v in state_dict.items() if k.startswith("blocks.") and v.dim() == 2}
    unsupported = dtypes - {torch.float32, torch.bfloat16, torch.float16}
    if unsupported:
        raise CheckpointError(
            f"flow weights stored as {sorted(map(str, unsupported))} are not supported; use a bf16/fp16/fp32 file"
        )
    if len(dtypes) == 1:
        args["dtype"] = str(dtypes.pop()).replace("torch.", "")
    return args


def build_flows_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    dtype: Optional[Union[str, torch.dtype]] = None,
    device: Union[str, torch.device] = "cpu",
    source: str = "<state dict>",
    include_texture: bool = False,
    ss_resolution: Optional[int] = None,
    is_512: bool = False,
) -> Dict[str, nn.Module]:
    """Build and strictly load every flow found in a ComfyUI-prefixed state dict.

    Returns ``{pipeline key: model}`` for the prefixes present (``"sparse_structure_flow_model"``,
    ``"shape_slat_flow_model_512"``, ``"shape_slat_flow_model_1024"``; the texture flow only with
    ``include_texture``). ``ss_resolution`` overrides the structure latent size (default 16).
    ``is_512`` (ComfyUI's file metadata flag): the ``img2shape.`` weights are the 512 model.
    """
    parts = split_state_dict_by_prefix(state_dict, COMFY_FLOW_PREFIXES, source)
    models = {}
    for prefix, sub in parts.items():
        key = COMFY_FLOW_PREFIXES[prefix]
        if prefix == "img2shape." and is_512:
            if "img2shape_512." in parts:
                raise CheckpointError(f"{source}: metadata is_512 but the file also holds img2shape_512.*")
            key = "shape_slat_flow_model_512"
        if key.startswith("tex_") and not include_texture:
            continue
        name, base = FULL_SIZE_FLOW_CONFIGS[key]
        args = infer_flow_config(sub, base)
        if ss_resolution is not None and name == "SparseStructureFlowModel":
            args["resolution"] = ss_resolution
        model = build_model(name, args, dtype=dtype, device=device, source=f"{source} [{prefix}*]", empty=True)
        models[key] = load_state_dict_strict(model, sub, f"{source} [{prefix}*]")
    return models


def load_comfy_flow_file(
    path: PathLike,
    dtype: Optional[Union[str, torch.dtype]] = None,
    device: Union[str, torch.device] = "cpu",
    include_texture: bool = False,
    ss_resolution: Optional[int] = None,
) -> Dict[str, nn.Module]:
    """Load a ComfyUI TRELLIS.2 diffusion file (one .safetensors, prefixed keys); see
    :func:`build_flows_from_state_dict`. The file's metadata ``is_512`` marks ``img2shape.`` as the
    512 model (as ComfyUI reads it)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
    state_dict = load_file(path, device=str(device))
    if not state_dict:
        raise CheckpointError(f"{path} holds no tensors")
    is_512 = str(metadata.get("is_512", "")).strip().lower() in ("1", "true", "yes")
    return build_flows_from_state_dict(
        state_dict, dtype=dtype, device=device, source=path, include_texture=include_texture,
        ss_resolution=ss_resolution, is_512=is_512,
    )
