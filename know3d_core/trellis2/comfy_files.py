"""Loading ComfyUI's native TRELLIS.2 files (``Comfy-Org/TRELLIS.2``), so that users who already
have them need not download the same weights again in the official layout.

ComfyUI splits the geometry path into two single ``.safetensors`` files (and a DINOv3 file in
``models/clip_vision``, which :mod:`..conditioning.dinov3` reads as it is):

* **diffusion file** (``models/diffusion_models``, e.g. ``trellis_2_bf16.safetensors``): the flows
  under ``structure_model.``, ``img2shape_512.``, ``img2shape.`` (the 1024 model, or the 512 model
  when the file's metadata says ``is_512``) and ``shape2txt.`` (texture, not loaded); an outer
  ``model.diffusion_model.`` may precede them. Split by :mod:`.loading`.
* **shape VAE file** (``models/vae``, e.g. ``trellis_2_shape_vae_bf16.safetensors``): the
  sparse-structure decoder under ``struct_dec.`` and the shape decoder (``FlexiDualGridVaeDecoder``)
  under ``shape_dec.``. ComfyUI recognises it by ``shape_dec.blocks.1.16.to_subdiv.weight``. Its
  texture VAE holds ``txt_dec.`` (texture decoder): geometry does not need it, so a shape VAE that
  also carries ``txt_dec.*`` loads (those keys are left unused, as ComfyUI leaves them); a file
  with only ``txt_dec.*`` is refused with a message naming the shape VAE.

Key suffixes are the official module paths. Sparse conv weights are stored ``[Co, 3, 3, 3, Ci]``,
the official FlexGEMM layout, so no conversion is needed. Why (from ComfyUI 0.33.0's
``comfy/ldm/trellis2/vae.py`` and ``flexgemm.py``): its ``SparseConv3d`` allocates an empty
``[Co, Ci, k, k, k]`` parameter and permutes it to ``[Co, k, k, k, Ci]`` in ``__init__``, before
any weight exists; ``VAE`` then calls ``load_state_dict`` (``comfy/sd.py``), which refuses any shape
mismatch even with ``strict=False``, so the file must hold ``[Co, 3, 3, 3, Ci]``; its conv flattens
the weight to ``[Co, 27 * Ci]`` with kernel index ``9 dx + 3 dy + dz`` over coordinate columns
(x, y, z), the official order. A weight found in PyTorch's ``[Co, Ci, 3, 3, 3]`` layout is refused.
The dense sparse-structure decoder uses ordinary ``Conv3d`` weights ``[Co, Ci, 3, 3, 3]``.

Decoder widths and depths are read from the tensor shapes (tiny test files load too); the
normalisation ``"layer"`` and the fp16 body (``use_fp16``) follow the official configs.

There is no ``pipeline.json`` beside these files: :data:`DEFAULT_PIPELINE_CONFIG` holds the
official sampler settings and shape-latent normalisation.
"""
import copy
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from safetensors import safe_open

from ..plan import (
    COMFY_FLOW_PREFIXES,
    COMFY_VAE_PREFIXES,
    DECODER_MODELS,
    DINOV3_REPO,
    FLOW_MODELS,
    GEOMETRY_MODELS,
    OFFICIAL_MODELS,
    PIPELINE_TYPES,
    SAFETENSORS_FLOAT_DTYPES,
    SHAPE_DECODER,
    SHAPE_FLOWS,
    SS_DECODER,
    SS_FLOW,
    COMFY_TEXTURE_VAE_PREFIX,
    TEX_DECODER,
    TEXTURE_FLOW,
    comfy_file_kind,
    comfy_is_512,
    comfy_source,
    shape_flows,
    strip_outer_prefix,
)
from ..safetensors_header import read_safetensors_header
from .loading import (
    CheckpointError,
    PipelineConfig,
    build_flows_from_state_dict,
    build_model,
    load_state_dict_strict,
    read_pipeline_config,
    split_state_dict_by_prefix,
)
from .modules.dit import parse_dtype

__all__ = [
    "COMFY_SOURCES", "DEFAULT_PIPELINE_CONFIG",
    "default_pipeline_config", "infer_sparse_structure_decoder_args", "infer_shape_decoder_args",
    "load_comfy_flows", "load_comfy_vae_file", "load_comfy_model_set", "infer_texture_decoder_args",
    "load_comfy_texture_vae",
]

PathLike = Union[str, "os.PathLike[str]"]
DTypeArg = Union[None, str, torch.dtype]

# Where users get the files (file names as Comfy-Org publishes them).
COMFY_SOURCES: Dict[str, str] = {"diffusion": comfy_source("flows"), "vae": comfy_source("vae")}
_QUANT_SUFFIXES = (".comfy_quant", ".weight_scale", ".weight_scale_2", ".input_scale", ".scale_weight")


# ----------------------------------------------------------------------------- default config
def _sampler(guidance_rescale: float, rescale_t: float) -> Dict[str, Any]:
    return {
        "name": "FlowEulerGuidanceIntervalSampler",
        "args": {"sigma_min": 1e-5},
        "params": {"steps": 12, "guidance_strength": 7.5, "guidance_rescale": guidance_rescale,
                   "guidance_interval": [0.6, 1.0], "rescale_t": rescale_t},
    }


# Shape SLat normalisation (32 channels). Same values in microsoft/TRELLIS.2 (commit 5565d24)
# configs/gen/slat_flow_img2shape_dit_1_3B_512_bf16.json (and its _ft1024 twin),
# dataset.args.normalization, and in ComfyUI 0.33.0 comfy/latent_formats.py Trellis2ShapeSLAT
# (latents_mean / latents_std); tests/test_trellis2_comfy_files.py compares them with ComfyUI's
# when COMFYUI_DIR is set.
_SHAPE_SLAT_MEAN = [
    0.781296, 0.018091, -0.495192, -0.558457, 1.060530, 0.093252, 1.518149, -0.933218,
    -0.732996, 2.604095, -0.118341, -2.143904, 0.495076, -2.179512, -2.130751, -0.996944,
    0.261421, -2.217463, 1.260067, -0.150213, 3.790713, 1.481266, -1.046058, -1.523667,
    -0.059621, 2.220780, 1.621212, 0.877230, 0.567247, -3.175944, -3.186688, 1.578665,
]
_SHAPE_SLAT_STD = [
    5.972266, 4.706852, 5.445010, 5.209927, 5.320220, 4.547237, 5.020802, 5.444004,
    5.226681, 5.683095, 4.831436, 5.286469, 5.652043, 5.367606, 5.525084, 4.730578,
    4.805265, 5.124013, 5.530808, 5.619001, 5.103930, 5.417670, 5.269677, 5.547194,
    5.634698, 5.235274, 6.110351, 5.511298, 6.237273, 4.879207, 5.347008, 5.405691,
]

# The geometry part of microsoft/TRELLIS.2-4B's pipeline.json. Sampler params: pipeline.json
# (research/trellis2.md §1.1); steps / strength / rescale / rescale_t are also the defaults of
# microsoft/TRELLIS.2 app.py; sigma_min 1e-5 is in every configs/gen/*.json.
# Texture SLat normalisation (32 channels): microsoft/TRELLIS.2 (5565d24)
# configs/gen/slat_flow_imgshape2tex_dit_1_3B_512_bf16.json, dataset.args.pbr_slat_normalization (the
# tex_slat_normalization of TRELLIS.2-4B's pipeline.json, research/trellis2.md §1.1).
_TEX_SLAT_MEAN = [
    3.501659, 2.212398, 2.226094, 0.251093, -0.026248, -0.687364, 0.439898, -0.928075,
    0.029398, -0.339596, -0.869527, 1.038479, -0.972385, 0.126042, -1.129303, 0.455149,
    -1.209521, 2.069067, 0.544735, 2.569128, -0.323407, 2.293000, -1.925608, -1.217717,
    1.213905, 0.971588, -0.023631, 0.106750, 2.021786, 0.250524, -0.662387, -0.768862,
]
_TEX_SLAT_STD = [
    2.665652, 2.743913, 2.765121, 2.595319, 3.037293, 2.291316, 2.144656, 2.911822,
    2.969419, 2.501689, 2.154811, 3.163343, 2.621215, 2.381943, 3.186697, 3.021588,
    2.295916, 3.234985, 3.233086, 2.260140, 2.874801, 2.810596, 3.292720, 2.674999,
    2.680878, 2.372054, 2.451546, 2.353556, 2.995195, 2.379849, 2.786195, 2.775190,
]


def _tex_sampler() -> Dict[str, Any]:
    """pipeline.json's ``tex_slat_sampler`` (``sampling.OFFICIAL_SAMPLER_PARAMS["tex_slat"]``)."""
    from ..sampling import OFFICIAL_SAMPLER_PARAMS

    p = OFFICIAL_SAMPLER_PARAMS["tex_slat"]
    return {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": p.sigma_min},
            "params": {"steps": p.steps, "guidance_strength": p.guidance_strength,
                       "guidance_rescale": p.guidance_rescale, "guidance_interval": list(p.guidance_interval),
                       "rescale_t": p.rescale_t}}


DEFAULT_PIPELINE_CONFIG = PipelineConfig(
    folder="<ComfyUI files: official TRELLIS.2 defaults>",
    models={key: OFFICIAL_MODELS[key][0] for key in GEOMETRY_MODELS},
    samplers={
        "sparse_structure_sampler": _sampler(guidance_rescale=0.7, rescale_t=5.0),
        "shape_slat_sampler": _sampler(guidance_rescale=0.5, rescale_t=3.0),
        "tex_slat_sampler": _tex_sampler(),
    },
    normalizations={"shape_slat_normalization": {"mean": _SHAPE_SLAT_MEAN, "std": _SHAPE_SLAT_STD},
                    "tex_slat_normalization": {"mean": _TEX_SLAT_MEAN, "std": _TEX_SLAT_STD}},
    default_pipeline_type="1024_cascade",
    image_cond_model={"name": "DinoV3FeatureExtractor", "args": {"model_name": DINOV3_REPO}},
    rembg_model={"name": "BiRefNet", "args": {"model_name": "briaai/RMBG-2.0"}},
)
DEFAULT_PIPELINE_CONFIG.args = {
    "models": dict(DEFAULT_PIPELINE_CONFIG.models),
    **DEFAULT_PIPELINE_CONFIG.samplers,
    **DEFAULT_PIPELINE_CONFIG.normalizations,
    "image_cond_model": DEFAULT_PIPELINE_CONFIG.image_cond_model,
    "rembg_model": DEFAULT_PIPELINE_CONFIG.rembg_model,
    "default_pipeline_type": DEFAULT_PIPELINE_CONFIG.default_pipeline_type,
}

def default_pipeline_config(folder: Optional[str] = None) -> PipelineConfig:
    """A fresh copy of :data:`DEFAULT_PIPELINE_CONFIG` (``folder`` replaces its label)."""
    config = copy.deepcopy(DEFAULT_PIPELINE_CONFIG)
    if folder is not None:
        config.folder = folder
    return config


# ----------------------------------------------------------------------------- file reading
def _header(path: str) -> Tuple[List[str], Dict[str, str], Dict[str, str]]:
    """``(keys, {key: dtype string}, metadata)`` of a safetensors file, reading no tensor data."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    info = read_safetensors_header(path)
    if info.problem is not None:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({info.problem}). Fix: download it again.")
    if not info.tensors:
        raise CheckpointError(f"{path} holds no tensors. Fix: download it again.")
    return list(info.tensors), {k: dtype for k, (dtype, _) in info.tensors.items()}, info.metadata


def _read(path: str, names: Mapping[str, str]) -> Dict[str, torch.Tensor]:
    """``{local name: tensor}`` for ``names`` = ``{local name: key in the file}`` (CPU)."""
    with safe_open(path, framework="pt", device="cpu") as f:
        return {local: f.get_tensor(full) for local, full in names.items()}


def _check_plain_floats(path: str, dtypes: Mapping[str, str]) -> None:
    quant = sorted(k for k, d in dtypes.items()
                   if d not in SAFETENSORS_FLOAT_DTYPES or k.endswith(_QUANT_SUFFIXES))
    if quant:
        kinds = sorted({dtypes[k] for k in quant})
        raise CheckpointError(
            f"{path} holds quantised weights ({', '.join(kinds)}; e.g. {', '.join(quant[:3])}), which this "
            "loader does not read. Fix: use the bf16 files of Comfy-Org/TRELLIS.2 "
            "(trellis_2_bf16.safetensors and trellis_2_shape_vae_bf16.safetensors)."
        )


def _sample_keys(keys: Sequence[str], n: int = 4) -> str:
    return ", ".join(list(keys)[:n]) + (", ..." if len(keys) > n else "")


# ----------------------------------------------------------------------------- flows
def _load_flows(
    path: str, keys: Optional[Iterable[str]], dtype: DTypeArg, device: Union[str, torch.device],
    ss_resolution: Optional[int] = None,
    need_geometry: bool = False,
) -> Tuple[Dict[str, nn.Module], Dict[str, str]]:
    """:func:`load_comfy_flows` plus ``{pipeline key: prefix it was read from}``. ``need_geometry``:
    before reading any tensor, require the structure flow and at least one shape flow."""
    names, dtypes, metadata = _header(path)
    kind = comfy_file_kind(names)
    if kind in ("vae", "texture_vae"):
        raise CheckpointError(
            f"{path} is ComfyUI's TRELLIS.2 {'shape' if kind == 'vae' else 'texture'} VAE, not the diffusion file: pass it as the "
            f"VAE file, and as the diffusion file {COMFY_SOURCES['diffusion']}."
        )
    _check_plain_floats(path, dtypes)
    if any(".cross_attn.proj_linear." in k for k in names):
        raise CheckpointError(
            f"{path} is a Pixal3D diffusion file (cross_attn.proj_linear), not TRELLIS.2. "
            f"Fix: use {COMFY_SOURCES['diffusion']}."
        )
    groups = split_state_dict_by_prefix({k: k for k in names}, COMFY_FLOW_PREFIXES, path)
    is_512 = comfy_is_512(metadata)
    if is_512 and "img2shape." in groups and "img2shape_512." in groups:
        raise CheckpointError(f"{path}: metadata is_512 but the file also holds img2shape_512.*")
    available: Dict[str, str] = {}  # pipeline key -> prefix
    for prefix in groups:
        key = SHAPE_FLOWS["512"] if prefix == "img2shape." and is_512 else COMFY_FLOW_PREFIXES[prefix]
        if key in FLOW_MODELS or key == TEXTURE_FLOW:
            available[key] = prefix
    wanted = [k for k in FLOW_MODELS if k in available] if keys is None else list(keys)  # texture: on request
    if need_geometry:
        lacking = [] if SS_FLOW in available else ["the structure flow (structure_model.*)"]
        if not any(k in available for k in SHAPE_FLOWS.values()):
            lacking.append("a shape flow (img2shape_512.* / img2shape.*)")
        if lacking:
            raise CheckpointError(
                f"{path} lacks {' and '.join(lacking)}, which the geometry path needs. "
                f"Fix: use {COMFY_SOURCES['diffusion']}."
            )
    for key in wanted:
        if key not in FLOW_MODELS and key != TEXTURE_FLOW:
            raise KeyError(f"{key!r} is not a flow of a ComfyUI TRELLIS.2 diffusion file; flows: "
                           f"{list(FLOW_MODELS) + [TEXTURE_FLOW]}")
        if key not in available:
            expected = {v: k for k, v in COMFY_FLOW_PREFIXES.items()}[key]
            has = ", ".join(f"{p}*" for p in groups)
            note = " (with metadata is_512, img2shape.* is the 512 model)" if is_512 else ""
            raise CheckpointError(
                f"{path} lacks the {_role(key)} ({expected}* keys){note}; it holds {has}. Fix: use the "
                f"complete file, {COMFY_SOURCES['diffusion']}, or run a pipeline type that needs only the "
                "flows it has."
            )
    models: Dict[str, nn.Module] = {}
    for key in wanted:
        prefix = available[key]
        state_dict = _read(path, {prefix + sub: full for sub, full in groups[prefix].items()})
        models.update(build_flows_from_state_dict(state_dict, dtype=dtype, device=device, source=path,
                                                  include_texture=key == TEXTURE_FLOW,
                                                  ss_resolution=ss_resolution, is_512=is_512))
        del state_dict
    return models, {key: available[key] for key in wanted}


def load_comfy_flows(
    path: PathLike,
    keys: Optional[Iterable[str]] = None,
    dtype: DTypeArg = None,
    device: Union[str, torch.device] = "cpu",
    ss_resolution: Optional[int] = None,
) -> Dict[str, nn.Module]:
    """The flows of a ComfyUI TRELLIS.2 diffusion file, one network at a time (reads only the
    tensors of the flows asked for; the texture flow is never read).

    Args:
        keys: pipeline.json flow keys to load; None: every geometry flow the file holds.
        dtype: compute dtype of the flows (None: the file's, bf16 for Comfy-Org's file).
        ss_resolution: structure latent size (not stored in the weights; None: the official 16).
    Returns:
        ``{pipeline key: model}``.
    Raises:
        CheckpointError naming the file: a VAE passed instead, quantised weights, a Pixal3D file,
        a requested flow the file lacks, keys or shapes that do not fit.
    """
    return _load_flows(os.fspath(path), keys, dtype, device, ss_resolution)[0]


# ----------------------------------------------------------------------------- decoders
def _shape(state_dict: Mapping[str, torch.Tensor], key: str, source: str, what: str) -> Tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointError(f"{source}: {what} lacks {key!r}; it is not a TRELLIS.2 {what}")
    return tuple(state_dict[key].shape)


def infer_sparse_structure_decoder_args(
    state_dict: Mapping[str, torch.Tensor], source: str = "<state dict>"
) -> Dict[str, Any]:
    """``SparseStructureDecoder`` constructor args read from its (official-key) state dict.

    ``input_layer.weight [C0, latent, 3, 3, 3]`` gives the first width and the latent channels,
    ``middle_block.i`` the middle depth, the ``blocks`` list (ResBlocks with ``conv1``, upsamplers
    with ``conv.weight [8 * C_next, C, 3, 3, 3]``) the widths and the res blocks per level,
    ``out_layer.2.weight [out, C_last, 3, 3, 3]`` the output channels. Norm type ``"layer"`` and
    ``use_fp16`` as the official TRELLIS v1 config (shapes cannot tell layer from group norm).
    """
    what = "sparse-structure decoder"
    c0, latent = _shape(state_dict, "input_layer.weight", source, what)[:2]
    out_channels, c_last = _shape(state_dict, "out_layer.2.weight", source, what)[:2]
    middle = len({k.split(".")[1] for k in state_dict if k.startswith("middle_block.")})
    indices = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")})
    channels, per_level, count = [c0], [], 0
    for i in indices:
        if f"blocks.{i}.conv.weight" in state_dict:  # UpsampleBlock3d
            per_level.append(count)
            count = 0
            channels.append(_shape(state_dict, f"blocks.{i}.conv.weight", source, what)[0] // 8)
        else:
            count += 1
    per_level.append(count)
    if len(set(per_level)) != 1:
        raise CheckpointError(
            f"{source}: sparse-structure decoder has {per_level} res blocks per level; the network needs "
            "the same number at every level"
        )
    if channels[-1] != c_last:
        raise CheckpointError(
            f"{source}: sparse-structure decoder's last level has {channels[-1]} channels but out_layer reads {c_last}"
        )
    return dict(out_channels=out_channels, latent_channels=latent, num_res_blocks=per_level[0],
                channels=channels, num_res_blocks_middle=middle, norm_type="layer", use_fp16=True)


def _check_sparse_conv_layout(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Sparse conv weights must be ``[Co, 3, 3, 3, Ci]``; PyTorch's ``[Co, Ci, 3, 3, 3]`` is refused."""
    for key, value in state_dict.items():
        if not key.endswith(("conv.weight", "conv1.weight", "conv2.weight")) or value.dim() != 5:
            continue
        if tuple(value.shape[1:4]) != (3, 3, 3):
            raise CheckpointError(
                f"{source}: sparse conv weight {key} has shape {tuple(value.shape)}; ComfyUI and the official "
                "files store [Co, 3, 3, 3, Ci] (FlexGEMM layout). Fix: this is not a Comfy-Org TRELLIS.2 shape "
                f"VAE; use {COMFY_SOURCES['vae']}."
            )


def infer_shape_decoder_args(state_dict: Mapping[str, torch.Tensor], source: str = "<state dict>") -> Dict[str, Any]:
    """``FlexiDualGridVaeDecoder`` constructor args read from its (official-key) state dict.

    Level L holds ConvNeXt blocks ``blocks.L.j`` (``mlp.0.weight [4 * C, C]``) and, except the last
    level, a channel-to-space block ``blocks.L.n`` (``conv2.weight [C_next, 3, 3, 3, C_next]``,
    ``to_subdiv``); a last level without blocks has no keys. ``from_latent.weight [C0, latent]``.
    ``resolution`` is the official config's 256 (``set_resolution`` changes it per run).
    """
    what = "shape decoder"
    out_channels = _shape(state_dict, "output_layer.weight", source, what)[0]
    if out_channels != 7:
        raise CheckpointError(
            f"{source}: decoder head has {out_channels} outputs, a FlexiDualGrid shape decoder has 7 "
            "(a texture decoder has 6): this is not the shape decoder"
        )
    return dict(resolution=256, **_unet_decoder_levels(state_dict, source, what, subdiv=True))


def _unet_decoder_levels(state_dict: Mapping[str, torch.Tensor], source: str, what: str,
                         subdiv: bool) -> Dict[str, Any]:
    """The level walk shared by the shape (``subdiv``: C2S blocks with ``to_subdiv``) and texture
    decoders (none): channels, blocks per level, latent width, block types, fp16 body."""
    c0, latent = _shape(state_dict, "from_latent.weight", source, what)
    c_last = _shape(state_dict, "output_layer.weight", source, what)[1]
    channels, num_blocks, block_args = [c0], [], []
    level = 0
    while True:
        c = channels[-1]
        n = 0
        while f"blocks.{level}.{n}.mlp.0.weight" in state_dict:
            n += 1
        num_blocks.append(n)
        mlp = f"blocks.{level}.0.mlp.0.weight"
        if n and _shape(state_dict, mlp, source, what)[0] != 4 * c:
            # block_args reach a level's C2S block too, which takes no mlp_ratio: only 4 can exist.
            raise CheckpointError(
                f"{source}: {mlp} is {_shape(state_dict, mlp, source, what)} for {c} channels; "
                "TRELLIS.2 shape decoders have ConvNeXt MLPs of 4 x channels"
            )
        block_args.append({})
        c2s = f"blocks.{level}.{n}"
        if f"{c2s}.conv1.weight" not in state_dict:
            break
        if subdiv and f"{c2s}.to_subdiv.weight" not in state_dict:
            raise CheckpointError(
                f"{source}: {c2s} has no to_subdiv (no subdivision prediction): this is a texture decoder, "
                "not the shape decoder"
            )
        if not subdiv and f"{c2s}.to_subdiv.weight" in state_dict:
            raise CheckpointError(f"{source}: {c2s} predicts subdivisions (to_subdiv): this is a shape decoder, "
                                  "not the texture decoder")
        channels.append(_shape(state_dict, f"{c2s}.conv2.weight", source, what)[0])
        level += 1
    if channels[-1] != c_last:
        raise CheckpointError(
            f"{source}: {what}'s last level has {channels[-1]} channels but output_layer reads {c_last}"
        )
    levels = len(channels)
    return dict(model_channels=channels, latent_channels=latent, num_blocks=num_blocks,
                block_type=["SparseConvNeXtBlock3d"] * levels, up_block_type=["SparseResBlockC2S3d"] * (levels - 1),
                block_args=block_args, use_fp16=True)


_DECODERS = {
    SS_DECODER: ("SparseStructureDecoder", infer_sparse_structure_decoder_args),
    SHAPE_DECODER: ("FlexiDualGridVaeDecoder", infer_shape_decoder_args),
}


def _role(key: str) -> str:
    """``"shape flow 512"``, ``"shape decoder (FlexiDualGridVaeDecoder)"`` ... for messages."""
    role = OFFICIAL_MODELS[key][2]
    return f"{role} ({_DECODERS[key][0]})" if key in _DECODERS else role


def infer_texture_decoder_args(state_dict: Mapping[str, torch.Tensor],
                               source: str = "<state dict>") -> Dict[str, Any]:
    """``SparseUnetVaeDecoder`` (texture decoder) constructor args from its official-key state dict:
    the shape decoder's level walk (:func:`infer_shape_decoder_args`) with 6 outputs and no ``to_subdiv``."""
    out_channels = _shape(state_dict, "output_layer.weight", source, "texture decoder")[0]
    if out_channels != 6:
        raise CheckpointError(f"{source}: decoder head has {out_channels} outputs, the texture decoder has 6 "
                              "(base colour, metallic, roughness, alpha)")
    return dict(out_channels=6, **_unet_decoder_levels(state_dict, source, "texture decoder", subdiv=False),
                pred_subdiv=False)


def load_comfy_texture_vae(
    path: PathLike,
    device: Union[str, torch.device] = "cpu",
    decoder_dtype: DTypeArg = None,
) -> nn.Module:
    """The texture decoder of ComfyUI's TRELLIS.2 texture VAE file (``txt_dec.*``,
    ``trellis_2_texture_vae_bf16.safetensors`` in models/vae), strictly; fp16 body unless ``decoder_dtype``."""
    path = os.fspath(path)
    names, dtypes, _ = _header(path)
    bare = strip_outer_prefix(names)
    group = {k[len(COMFY_TEXTURE_VAE_PREFIX):]: full for k, full in bare.items()
             if k.startswith(COMFY_TEXTURE_VAE_PREFIX)}
    if not group:
        raise CheckpointError(f"{path} is not ComfyUI's TRELLIS.2 texture VAE: no {COMFY_TEXTURE_VAE_PREFIX}* keys "
                              f"(it has {_sample_keys(names)}). Fix: use {comfy_source('texture_vae')}.")
    _check_plain_floats(path, {full: dtypes[full] for full in group.values()})
    source = f"{path} [{COMFY_TEXTURE_VAE_PREFIX}*]"
    state_dict = _read(path, group)
    _check_sparse_conv_layout(state_dict, source)
    model = build_model("SparseUnetVaeDecoder", infer_texture_decoder_args(state_dict, source), device=device,
                        source=source, empty=True)
    load_state_dict_strict(model, state_dict, source)
    if decoder_dtype is not None:
        model.convert_to(parse_dtype(decoder_dtype))
    return model


def load_comfy_vae_file(
    path: PathLike,
    keys: Iterable[str] = DECODER_MODELS,
    device: Union[str, torch.device] = "cpu",
    decoder_dtype: DTypeArg = None,
) -> Dict[str, nn.Module]:
    """The decoders of ComfyUI's TRELLIS.2 shape VAE file (``struct_dec.*`` + ``shape_dec.*``).

    Args:
        keys: ``"sparse_structure_decoder"`` and/or ``"shape_slat_decoder"``.
        decoder_dtype: compute dtype of the decoder bodies; None keeps the official fp16 body
            (norms, first and last layers stay fp32 either way).
    Returns:
        ``{pipeline key: model}``.
    Raises:
        CheckpointError naming the file: a texture-only VAE, the diffusion file instead, a
        missing part (named), quantised weights, a foreign sparse-conv layout, keys or shapes.
    """
    path = os.fspath(path)
    names, dtypes, _ = _header(path)
    kind = comfy_file_kind(names)
    if kind == "texture_vae":
        raise CheckpointError(
            f"{path} is ComfyUI's TRELLIS.2 texture VAE (txt_dec.* only). Geometry needs the shape VAE "
            f"(struct_dec.* + shape_dec.*): {COMFY_SOURCES['vae']}."
        )
    if kind == "flows":
        raise CheckpointError(
            f"{path} is ComfyUI's TRELLIS.2 diffusion file (the flows), not the shape VAE: pass it as the "
            f"diffusion file, and as the VAE file {COMFY_SOURCES['vae']}."
        )
    if kind is None:
        raise CheckpointError(
            f"{path} is not ComfyUI's TRELLIS.2 shape VAE: no struct_dec.* / shape_dec.* keys "
            f"(it has {_sample_keys(names)}). Fix: use {COMFY_SOURCES['vae']}."
        )
    bare = strip_outer_prefix(names)
    groups: Dict[str, Dict[str, str]] = {}
    for key, full in bare.items():
        prefix = next((p for p in COMFY_VAE_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            groups.setdefault(prefix, {})[key[len(prefix):]] = full
    keys = list(keys)
    prefix_of = {v: k for k, v in COMFY_VAE_PREFIXES.items()}
    for key in keys:
        if key not in prefix_of:
            raise KeyError(f"{key!r} is not a decoder of ComfyUI's shape VAE; decoders: {list(prefix_of)}")
    missing = [key for key in keys if prefix_of[key] not in groups]
    if missing:
        parts = "; ".join(f"{prefix_of[k]}* (the {_role(k)})" for k in missing)
        raise CheckpointError(
            f"{path} lacks {parts}; ComfyUI's TRELLIS.2 shape VAE holds struct_dec.* and shape_dec.*. "
            f"Fix: use the complete file, {COMFY_SOURCES['vae']}."
        )
    _check_plain_floats(path, {full: dtypes[full] for key in keys for full in groups[prefix_of[key]].values()})
    models: Dict[str, nn.Module] = {}
    for key in keys:
        prefix = prefix_of[key]
        source = f"{path} [{prefix}*]"
        state_dict = _read(path, groups[prefix])
        if key == "shape_slat_decoder":
            _check_sparse_conv_layout(state_dict, source)
        name, infer = _DECODERS[key]
        model = build_model(name, infer(state_dict, source), device=device, source=source, empty=True)
        load_state_dict_strict(model, state_dict, source)
        if decoder_dtype is not None:
            model.convert_to(parse_dtype(decoder_dtype))
        models[key] = model
        del state_dict
    return models


# ----------------------------------------------------------------------------- the set
def _pick_pipeline_type(preferred: str, loaded: Iterable[str]) -> str:
    loaded = set(loaded)
    if preferred in PIPELINE_TYPES and set(shape_flows(preferred)) <= loaded:
        return preferred
    for candidate in ("1024_cascade", "1024", "512"):
        if set(shape_flows(candidate)) <= loaded:
            return candidate
    return preferred


def load_comfy_model_set(
    diffusion_file: PathLike,
    vae_file: PathLike,
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: DTypeArg = None,
    decoder_dtype: DTypeArg = None,
    keys: Optional[Iterable[str]] = None,
    pipeline_config: Union[None, PathLike, PipelineConfig] = None,
    ss_resolution: Optional[int] = None,
    texture_vae_file: Optional[PathLike] = None,
) -> Tuple[Dict[str, nn.Module], PipelineConfig]:
    """The TRELLIS.2 geometry networks from ComfyUI's diffusion file + shape VAE file.

    Args:
        diffusion_file: ComfyUI's TRELLIS.2 diffusion file (flows).
        vae_file: ComfyUI's TRELLIS.2 shape VAE file (both decoders).
        device: where the networks live.
        dtype: compute dtype of the flows (None: the file's, bf16).
        decoder_dtype: compute dtype of the decoder bodies (None: official fp16 body).
        keys: pipeline.json model keys to load (e.g. ``required_models(type)``); None: both
            decoders and every geometry flow in the file (which must include the structure flow
            and at least one shape flow).
        pipeline_config: a ``pipeline.json`` (its folder or the file) or a PipelineConfig whose
            samplers / normalisation to use; None: :data:`DEFAULT_PIPELINE_CONFIG`.
        ss_resolution: structure latent size of the structure flow (None: the official 16; the
            weights do not store it).
        texture_vae_file: ComfyUI's texture VAE: also load the texture decoder from it and the texture
            flow (``shape2txt.*``, the 1024 one) from the diffusion file.
    Returns:
        ``(models, config)``: models keyed like pipeline.json (``sparse_structure_flow_model``,
        ``sparse_structure_decoder``, ``shape_slat_flow_model_512``, ``shape_slat_flow_model_1024``,
        ``shape_slat_decoder``), config with ``models`` naming each network's file and prefix and
        ``default_pipeline_type`` lowered to what the loaded flows can run.
    """
    diffusion_file, vae_file = os.fspath(diffusion_file), os.fspath(vae_file)
    if keys is None:
        flow_keys, decoder_keys = None, list(DECODER_MODELS)
    else:
        keys = list(keys)
        unknown = [k for k in keys if k not in GEOMETRY_MODELS]
        if unknown:
            raise KeyError(f"unknown model key(s) {unknown}; geometry models: {list(GEOMETRY_MODELS)}")
        flow_keys = [k for k in keys if k in FLOW_MODELS]
        decoder_keys = [k for k in keys if k in DECODER_MODELS]
    if pipeline_config is None:
        config = default_pipeline_config(os.path.dirname(os.path.abspath(diffusion_file)))
    elif isinstance(pipeline_config, PipelineConfig):
        config = copy.deepcopy(pipeline_config)
    else:
        folder = os.fspath(pipeline_config)
        config = read_pipeline_config(os.path.dirname(folder) if folder.endswith(".json") else folder)
    # The VAE first: it is small, and a swapped pair fails before gigabytes of flows are read.
    decoders: Dict[str, nn.Module] = {}
    if decoder_keys:
        decoders = load_comfy_vae_file(vae_file, keys=decoder_keys, device=device, decoder_dtype=decoder_dtype)
    flows: Dict[str, nn.Module] = {}
    flow_prefixes: Dict[str, str] = {}
    if flow_keys != []:
        flows, flow_prefixes = _load_flows(diffusion_file, flow_keys, dtype, device, ss_resolution,
                                           need_geometry=keys is None)
    vae_prefix = {v: k for k, v in COMFY_VAE_PREFIXES.items()}
    models = {k: flows[k] if k in flows else decoders[k] for k in GEOMETRY_MODELS if k in flows or k in decoders}
    sources = {k: f"{diffusion_file}#{flow_prefixes[k]}" if k in flows else f"{vae_file}#{vae_prefix[k]}"
               for k in models}
    if texture_vae_file is not None:
        texture_vae_file = os.fspath(texture_vae_file)
        models[TEX_DECODER] = load_comfy_texture_vae(texture_vae_file, device=device, decoder_dtype=decoder_dtype)
        sources[TEX_DECODER] = f"{texture_vae_file}#{COMFY_TEXTURE_VAE_PREFIX}"
        tex_flow, tex_prefix = _load_flows(diffusion_file, [TEXTURE_FLOW], dtype, device)
        models.update(tex_flow)
        sources[TEXTURE_FLOW] = f"{diffusion_file}#{tex_prefix[TEXTURE_FLOW]}"
    config.models = sources
    config.default_pipeline_type = _pick_pipeline_type(config.default_pipeline_type, flows)
    return models, config
