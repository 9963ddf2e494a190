"""The rules every part of Know3D shares, in one torch-free table: what each TRELLIS.2 pipeline type
runs, what each variant injects, which files hold which networks, and the dtype names.

Nothing here imports torch (``know3d --help`` and ``know3d models`` stay fast); the pipelines, the
model check, the command line, the ComfyUI loaders and the nodes all import these names instead of
restating them.

Pipeline types (``PIPELINE_TYPES``; the reference's ``pipeline_type``):

| type           | structure grid | condition sizes | shape stages  | mesh grid            |
|----------------|----------------|-----------------|---------------|----------------------|
| ``512``          | 32             | 512             | 512           | 512                  |
| ``1024``         | 64             | 512, 1024       | 1024          | 1024                 |
| ``1024_cascade`` | 32             | 512, 1024       | 512, 1024     | 1024                 |
| ``1536_cascade`` | 32             | 512, 1024       | 512, 1024     | 1536, lowered by 128 while the tokens reach ``MAX_NUM_TOKENS`` |

The structure stage always conditions on DINOv3 at 512 px; a shape stage on the size of its name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    # pipeline types
    "PIPELINE_TYPES", "DEFAULT_PIPELINE_TYPE", "MAX_NUM_TOKENS", "SS_STAGE", "PipelineType", "pipeline_type",
    "ss_resolution", "cond_resolutions", "shape_stages", "shape_flows", "required_models", "progress_plan",
    "hr_resolution", "shape_condition_size",
    # pipeline.json model keys
    "SS_FLOW", "SS_DECODER", "SHAPE_FLOWS", "SHAPE_DECODER", "TEXTURE_FLOW", "GEOMETRY_MODELS", "FLOW_MODELS",
    "DECODER_MODELS", "models_for_types",
    # texture stage
    "TEX_FLOWS", "TEX_DECODER", "TEXTURE_MODELS", "TEX_STAGE", "PBR_LAYOUT", "texture_models",
    # variants and knowledge kinds
    "MMDIT_HIDDEN", "VAE_LATENT", "DINO_IMAGE", "MULTI_VIEW", "KINDS", "INJECTED_KINDS", "VARIANT_KINDS",
    "VARIANTS", "VARIANT_TEXT", "variant_kind", "variant_of", "needs_back_view", "needs_back_image",
    "needs_know3d",
    # files
    "TRELLIS_REPO", "TRELLIS_V1_REPO", "DINOV3_REPO", "DINOV3_FOLDER", "COMFY_TRELLIS_REPO", "QWEN_REPO",
    "OFFICIAL_MODELS", "COMFY_FLOW_PREFIXES", "COMFY_VAE_PREFIXES", "COMFY_TEXTURE_VAE_PREFIX",
    "COMFY_OUTER_PREFIXES", "COMFY_FILES", "COMFY_TEXTURE_FILES", "comfy_source", "strip_outer_prefix",
    "comfy_file_kind",
    "comfy_is_512", "COMFY_QWEN_FILES", "COMFY_QWEN_OUTER_PREFIXES", "COMFY_QWEN_TE_RENAMES",
    "COMFY_INDEX_TIMESTEP_ZERO", "COMFY_SCALED_FP8", "COMFY_WEIGHT_SCALES", "COMFY_DROPPED_SUFFIXES",
    "COMFY_FP8_FORMATS", "comfy_qwen_te_key",
    # dtypes
    "DTYPE_NAMES", "SAFETENSORS_FLOAT_DTYPES", "dtype_name", "auto_dtype_name",
    # memory plans (small cards)
    "FP8_STORAGE", "PLACEMENTS", "MemoryPlan", "MEMORY_PLANS", "vram_plan", "VRAM_HEADROOM_GIB",
    "FLOW_WORKING_BYTES_PER_TOKEN", "DECODER_WORKING_BYTES_PER_TOKEN", "SS_WORKING_BYTES", "flow_working_bytes",
    "decoder_working_bytes", "texture_working_bytes", "geometry_token_bound",
]

# ----------------------------------------------------------------------------------- model keys
SS_FLOW = "sparse_structure_flow_model"
SS_DECODER = "sparse_structure_decoder"
SHAPE_FLOWS: Dict[str, str] = {"512": "shape_slat_flow_model_512", "1024": "shape_slat_flow_model_1024"}
SHAPE_DECODER = "shape_slat_decoder"
TEXTURE_FLOW = "tex_slat_flow_model_1024"  # also in ComfyUI's diffusion file (``shape2txt.``)
# Texture stage (``know3d generate --texture``): flows by size and the decoder guided by the shape decoder.
TEX_FLOWS: Dict[str, str] = {"512": "tex_slat_flow_model_512", "1024": TEXTURE_FLOW}
TEX_DECODER = "tex_slat_decoder"
TEXTURE_MODELS: Tuple[str, ...] = (TEX_FLOWS["512"], TEX_FLOWS["1024"], TEX_DECODER)
TEX_STAGE = "tex_slat"  # progress stage of the texture flow; its sampler is pipeline.json "tex_slat_sampler"
# Channels of the texture decoder's PBR voxels (the reference pipeline's ``pbr_attr_layout``): name -> (start, stop).
PBR_LAYOUT: Dict[str, Tuple[int, int]] = {"base_color": (0, 3), "metallic": (3, 4), "roughness": (4, 5),
                                          "alpha": (5, 6)}
# pipeline.json "models" entries of the geometry path, in load order (texture models are not used).
GEOMETRY_MODELS: Tuple[str, ...] = (SS_FLOW, SS_DECODER, SHAPE_FLOWS["512"], SHAPE_FLOWS["1024"], SHAPE_DECODER)
FLOW_MODELS: Tuple[str, ...] = (SS_FLOW, SHAPE_FLOWS["512"], SHAPE_FLOWS["1024"])
DECODER_MODELS: Tuple[str, ...] = (SS_DECODER, SHAPE_DECODER)

# ----------------------------------------------------------------------------------- pipeline types
SS_STAGE = "sparse_structure"
MAX_NUM_TOKENS = 49152  # token budget of the cascades' second stage (the reference's max_num_tokens)
DEFAULT_PIPELINE_TYPE = "1024_cascade"


@dataclass(frozen=True)
class PipelineType:
    """What one pipeline type runs.

    Attributes:
        name: ``"512"`` | ``"1024"`` | ``"1024_cascade"`` | ``"1536_cascade"``.
        structure_grid: grid of the structure coords (32, or 64 for ``1024``).
        shape_stages: shape flows in run order, by their size (``("512", "1024")`` for the cascades).
        hr_resolution: mesh grid the cascade's second stage starts from (None: no cascade).
    """

    name: str
    structure_grid: int
    shape_stages: Tuple[str, ...]
    hr_resolution: Optional[int] = None

    @property
    def cascade(self) -> bool:
        return self.hr_resolution is not None

    @property
    def condition_sizes(self) -> Tuple[int, ...]:
        """DINOv3 image sizes the type needs: 512 for the structure, plus each shape stage's."""
        return tuple(sorted({512, *(int(s) for s in self.shape_stages)}))

    @property
    def shape_flows(self) -> Tuple[str, ...]:
        return tuple(SHAPE_FLOWS[s] for s in self.shape_stages)

    @property
    def required_models(self) -> Tuple[str, ...]:
        """pipeline.json model keys the type runs (the cascade upsamples through the shape decoder)."""
        return (SS_FLOW, SS_DECODER) + self.shape_flows + (SHAPE_DECODER,)

    @property
    def texture_stage(self) -> str:
        """Size of the texture flow the type runs (the reference: ``512`` for ``512``, else ``1024``);
        it is also the DINOv3 size of its condition."""
        return "512" if self.shape_stages == ("512",) else "1024"

    @property
    def texture_flow(self) -> str:
        return TEX_FLOWS[self.texture_stage]

    @property
    def mesh_resolution(self) -> int:
        """Mesh grid before any token-budget lowering (16 x the last stage's token grid)."""
        return self.hr_resolution or int(self.shape_stages[-1])

    def stage_grid(self, stage: str) -> int:
        """Token grid of a shape stage that samples on the structure coords (``512`` -> 32)."""
        return int(stage) // 16


_TYPES: Dict[str, PipelineType] = {
    "512": PipelineType("512", 32, ("512",)),
    "1024": PipelineType("1024", 64, ("1024",)),
    "1024_cascade": PipelineType("1024_cascade", 32, ("512", "1024"), 1024),
    "1536_cascade": PipelineType("1536_cascade", 32, ("512", "1024"), 1536),
}
PIPELINE_TYPES: Tuple[str, ...] = tuple(_TYPES)


def pipeline_type(name: str) -> PipelineType:
    """The :class:`PipelineType` called ``name``; ValueError naming the choices for any other."""
    if name not in _TYPES:
        raise ValueError(f"unknown pipeline_type {name!r}; use one of {', '.join(PIPELINE_TYPES)}")
    return _TYPES[name]


def ss_resolution(name: str) -> int:
    """Grid of the structure coords: 64 for ``1024``, else 32."""
    return pipeline_type(name).structure_grid


def cond_resolutions(name: str) -> Tuple[int, ...]:
    """DINOv3 image sizes a pipeline type needs: (512,) for ``512``, else (512, 1024)."""
    return pipeline_type(name).condition_sizes


def shape_stages(name: str) -> Tuple[str, ...]:
    """Shape flows in run order by size; their progress stages are ``shape_slat_<size>``."""
    return pipeline_type(name).shape_stages


def shape_flows(name: str) -> Tuple[str, ...]:
    """pipeline.json keys of the shape flows a type runs (``1024`` alone skips the 512 model)."""
    return pipeline_type(name).shape_flows


def shape_condition_size(name: str) -> int:
    """DINOv3 size of the first shape stage's condition (1024 for ``1024``, else 512)."""
    return int(pipeline_type(name).shape_stages[0])


def hr_resolution(name: str) -> int:
    """Mesh grid the cascade's second stage starts from; ValueError for a type without a cascade."""
    t = pipeline_type(name)
    if t.hr_resolution is None:
        raise ValueError(f"pipeline_type {name!r} has no cascade")
    return t.hr_resolution


def required_models(name: str) -> Tuple[str, ...]:
    """pipeline.json model keys a pipeline type runs."""
    return pipeline_type(name).required_models


def models_for_types(names: Optional[Iterable[str]]) -> List[str]:
    """The geometry networks the given pipeline types need, in load order (all of them for None)."""
    if names is None:
        return list(GEOMETRY_MODELS)
    needed = {k for n in names for k in required_models(n)}
    return [k for k in GEOMETRY_MODELS if k in needed]


def texture_models(name: str) -> Tuple[str, ...]:
    """pipeline.json keys the texture stage of a pipeline type adds: its texture flow and the decoder."""
    return (pipeline_type(name).texture_flow, TEX_DECODER)


def progress_plan(name: str, ss_steps: int = 12, shape_steps: int = 12) -> List[Tuple[str, int]]:
    """``[(stage, total steps)]`` in run order, as the progress callback reports them."""
    return [(SS_STAGE, ss_steps)] + [(f"shape_slat_{s}", shape_steps) for s in shape_stages(name)]


# ----------------------------------------------------------------------------------- variants
MMDIT_HIDDEN = "mmdit_hidden"
VAE_LATENT = "vae_latent"
DINO_IMAGE = "dino_image"
MULTI_VIEW = "multi_view"
KINDS = (MMDIT_HIDDEN, VAE_LATENT, DINO_IMAGE, MULTI_VIEW)
INJECTED_KINDS = (MMDIT_HIDDEN, VAE_LATENT, DINO_IMAGE)  # need a Know3D branch; multi_view does not

# The paper's ablation: what the back view contributes -> knowledge kind (None: plain TRELLIS.2).
VARIANT_KINDS: Dict[str, Optional[str]] = {
    "hidden": MMDIT_HIDDEN,
    "latent": VAE_LATENT,
    "image": DINO_IMAGE,
    "multiview": MULTI_VIEW,
    "none": None,
}
VARIANTS: Tuple[str, ...] = tuple(VARIANT_KINDS)
VARIANT_TEXT: Dict[str, str] = {
    "hidden": "MMDiT hidden states injected",
    "latent": "back-view VAE latent injected",
    "image": "DINOv3 features of the back view injected",
    "multiview": "back view as a second image, no Know3D weights",
    "none": "plain TRELLIS.2",
}


def variant_kind(variant: str) -> Optional[str]:
    """Knowledge kind of a variant (None for ``none``); ValueError naming the choices otherwise."""
    if variant not in VARIANT_KINDS:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    return VARIANT_KINDS[variant]


def variant_of(kind: Optional[str]) -> str:
    """The variant that produces ``kind`` (the kind itself when no variant does)."""
    return next((v for v, k in VARIANT_KINDS.items() if k == kind), str(kind))


def needs_back_view(variant: str) -> bool:
    """Every variant but ``none`` runs Qwen-Image-Edit for the back view."""
    return variant_kind(variant) is not None


def needs_back_image(variant: str) -> bool:
    """The variants that use the decoded back image (DINOv3 features, or a second image condition)."""
    return variant_kind(variant) in (DINO_IMAGE, MULTI_VIEW)


def needs_know3d(variant: str) -> bool:
    """The injected variants need a Know3D checkpoint (branch + backbone LoRA)."""
    return variant_kind(variant) in INJECTED_KINDS


# ----------------------------------------------------------------------------------- files
TRELLIS_REPO = "microsoft/TRELLIS.2-4B"
TRELLIS_V1_REPO = "microsoft/TRELLIS-image-large"
DINOV3_REPO = "facebook/dinov3-vitl16-pretrain-lvd1689m"
DINOV3_FOLDER = "dinov3-vitl16-pretrain-lvd1689m"
COMFY_TRELLIS_REPO = "Comfy-Org/TRELLIS.2"
QWEN_REPO = "Qwen/Qwen-Image-Edit-2511"

# pipeline.json key -> (official reference in pipeline.json, repository, role)
OFFICIAL_MODELS: Dict[str, Tuple[str, str, str]] = {
    SS_FLOW: ("ckpts/ss_flow_img_dit_1_3B_64_bf16", TRELLIS_REPO, "sparse-structure flow"),
    SS_DECODER: (f"{TRELLIS_V1_REPO}/ckpts/ss_dec_conv3d_16l8_fp16", TRELLIS_V1_REPO, "sparse-structure decoder"),
    SHAPE_FLOWS["512"]: ("ckpts/slat_flow_img2shape_dit_1_3B_512_bf16", TRELLIS_REPO, "shape flow 512"),
    SHAPE_FLOWS["1024"]: ("ckpts/slat_flow_img2shape_dit_1_3B_1024_bf16", TRELLIS_REPO, "shape flow 1024"),
    SHAPE_DECODER: ("ckpts/shape_dec_next_dc_f16c32_fp16", TRELLIS_REPO, "shape decoder"),
    TEX_FLOWS["512"]: ("ckpts/slat_flow_imgshape2tex_dit_1_3B_512_bf16", TRELLIS_REPO, "texture flow 512"),
    TEX_FLOWS["1024"]: ("ckpts/slat_flow_imgshape2tex_dit_1_3B_1024_bf16", TRELLIS_REPO, "texture flow 1024"),
    TEX_DECODER: ("ckpts/tex_dec_next_dc_f16c32_fp16", TRELLIS_REPO, "texture decoder"),
}

# ComfyUI's repack (Comfy-Org/TRELLIS.2): key prefix -> pipeline.json key, in the diffusion file
# (all flows; ``img2shape.`` is the 512 model when the file's metadata says ``is_512``) ...
COMFY_FLOW_PREFIXES: Dict[str, str] = {
    "structure_model.": SS_FLOW,
    "img2shape_512.": SHAPE_FLOWS["512"],
    "img2shape.": SHAPE_FLOWS["1024"],
    "shape2txt.": TEXTURE_FLOW,
}
# ... and in the shape VAE file (both decoders; a texture VAE holds ``txt_dec.``).
COMFY_VAE_PREFIXES: Dict[str, str] = {"struct_dec.": SS_DECODER, "shape_dec.": SHAPE_DECODER}
COMFY_TEXTURE_VAE_PREFIX = "txt_dec."
# A prefix shared by every key of a ComfyUI save, in front of the prefixes above (saves vary).
COMFY_OUTER_PREFIXES: Tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.", "model.",
                                         "first_stage_model.", "vae.")
# role -> (file name as Comfy-Org publishes it, ComfyUI models/ sub-folder, description)
COMFY_FILES: Dict[str, Tuple[str, str, str]] = {
    "flows": ("trellis_2_bf16.safetensors", "diffusion_models", "TRELLIS.2 flows (ComfyUI repack)"),
    "vae": ("trellis_2_shape_vae_bf16.safetensors", "vae", "TRELLIS.2 shape VAE (ComfyUI repack)"),
    "dinov3": ("dino_v3_vit_l.safetensors", "clip_vision", "DINOv3 ViT-L/16 (ComfyUI repack)"),
}
# Optional, for the texture stage only (so not in COMFY_FILES, which lists what geometry needs).
COMFY_TEXTURE_FILES: Dict[str, Tuple[str, str, str]] = {
    "texture_vae": ("trellis_2_texture_vae_bf16.safetensors", "vae", "TRELLIS.2 texture VAE (ComfyUI repack)"),
}


def comfy_source(role: str) -> str:
    """Where a ComfyUI file comes from, in words (``role``: a key of :data:`COMFY_FILES`)."""
    name, sub, _ = {**COMFY_FILES, **COMFY_TEXTURE_FILES}[role]
    return f"{name} from huggingface.co/{COMFY_TRELLIS_REPO} (split_files/{sub}) into models/{sub}"


def strip_outer_prefix(keys: Sequence[str]) -> Dict[str, str]:
    """``{key without the outer prefix all keys share: key}`` (the first of :data:`COMFY_OUTER_PREFIXES`
    that every key starts with; none: keys unchanged)."""
    keys = list(keys)
    for outer in COMFY_OUTER_PREFIXES:
        if keys and all(k.startswith(outer) for k in keys):
            return {k[len(outer):]: k for k in keys}
    return {k: k for k in keys}


def comfy_file_kind(keys: Iterable[str]) -> Optional[str]:
    """What a ComfyUI TRELLIS.2 file holds, by its keys: ``"flows"``, ``"vae"`` (shape VAE),
    ``"texture_vae"`` or None (not a ComfyUI TRELLIS.2 file)."""
    bare = list(strip_outer_prefix(list(keys)))
    for kind, prefixes in (("vae", tuple(COMFY_VAE_PREFIXES)), ("texture_vae", (COMFY_TEXTURE_VAE_PREFIX,)),
                           ("flows", tuple(COMFY_FLOW_PREFIXES))):
        if any(k.startswith(prefixes) for k in bare):
            return kind
    return None


def comfy_is_512(metadata: Mapping[str, str]) -> bool:
    """ComfyUI's ``is_512`` metadata flag (its ``img2shape.`` weights are then the 512 model)."""
    return str(metadata.get("is_512", "")).strip().lower() in ("1", "true", "yes")


# ComfyUI's Qwen files (one set of files for ComfyUI and the CLI): role -> (name in the example workflows,
# models/ sub-folder, description). The MMDiT file also comes as ``_bf16`` and ``_fp8_e4m3fn``.
COMFY_QWEN_FILES: Dict[str, Tuple[str, str, str]] = {
    "transformer": ("qwen_image_edit_2511_fp8mixed.safetensors", "diffusion_models",
                    "Qwen-Image-Edit-2511 MMDiT (ComfyUI single file: bf16, fp8_e4m3fn or fp8mixed)"),
    "text_encoder": ("qwen_2.5_vl_7b_fp8_scaled.safetensors", "text_encoders",
                     "Qwen2.5-VL-7B text encoder (ComfyUI single file, scaled fp8)"),
}
# Key rules. The MMDiT file uses diffusers' names, bare or behind one outer prefix; the text encoder file
# uses the original Qwen2.5-VL names, renamed to transformers' (first matching rule; keys already in
# transformers' layout start with a target and are kept).
COMFY_QWEN_OUTER_PREFIXES: Tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.")
COMFY_QWEN_TE_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("model.language_model.", "model.language_model."), ("model.visual.", "model.visual."),
    ("model.", "model.language_model."), ("visual.", "model.visual."), ("lm_head.", "lm_head."))
# Flag tensors, not weights: ``__index_timestep_zero__`` marks 2511 (diffusers' ``zero_cond_t``),
# ``scaled_fp8`` marks the older scaled-fp8 format.
COMFY_INDEX_TIMESTEP_ZERO = "__index_timestep_zero__"
COMFY_SCALED_FP8 = "scaled_fp8"
# ComfyUI's quantised Linear: ``<layer>.weight`` in fp8 times a per-tensor scale ``<layer>.weight_scale``
# (``<layer>.scale_weight`` in the older scaled-fp8 files); ``comfy_quant`` (JSON bytes) or the file's
# ``_quantization_metadata`` names the format. Input scales only matter to fp8 matmuls and are dropped.
COMFY_WEIGHT_SCALES: Tuple[str, ...] = ("weight_scale", "scale_weight")
COMFY_DROPPED_SUFFIXES: Tuple[str, ...] = ("comfy_quant", "input_scale", "scale_input")
COMFY_FP8_FORMATS: Tuple[str, ...] = ("float8_e4m3fn", "float8_e5m2")


def comfy_qwen_te_key(key: str) -> Optional[str]:
    """A ComfyUI text-encoder key -> transformers' Qwen2.5-VL key (None: no rule matches)."""
    for old, new in COMFY_QWEN_TE_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return None


# ----------------------------------------------------------------------------------- dtypes
DTYPE_NAMES: Tuple[str, ...] = ("bfloat16", "float16", "float32")  # torch attribute names
_DTYPE_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "f16": "float16", "fp16": "float16", "float16": "float16", "half": "float16",
    "f32": "float32", "fp32": "float32", "float32": "float32", "float": "float32",
}
SAFETENSORS_FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})  # safetensors header names of DTYPE_NAMES


def dtype_name(dtype: object) -> str:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` ... -> ``"bfloat16"`` (one of :data:`DTYPE_NAMES`)."""
    text = str(dtype).replace("torch.", "").lower()
    if text not in _DTYPE_ALIASES:
        raise ValueError(f"unsupported dtype {dtype!r}: use 'float32', 'bfloat16' or 'float16'")
    return _DTYPE_ALIASES[text]


def auto_dtype_name(device_type: str, bf16_supported: bool = True) -> str:
    """``auto``: bfloat16 on a CUDA device that has it, else float32."""
    return "bfloat16" if device_type == "cuda" and bf16_supported else "float32"


# ----------------------------------------------------------------------------------- memory plans (small cards)
# How the Qwen side fits a card (``know3d generate --vram GB``). Storage dtype of a network's Linear/Conv
# weights: None keeps the compute dtype; FP8_STORAGE stores them in float8 e4m3 and casts each layer to
# the compute dtype while it runs (diffusers' layer-wise casting). Placement: ``resident`` stays on the
# device, ``model`` visits the device whole while it runs (the MMDiT once per back view, the text
# encoder once for both prompts; with ``pin_host`` from pinned host copies: ``device_visits``),
# ``blocks`` stays on the CPU and its blocks visit one group at a time, the next group prefetched on a
# side stream (diffusers' group offloading, which pins each weight itself). Pinning is not part of a
# plan: the plans say where weights live on the card, ``pin_host`` what the host gives for it.
FP8_STORAGE = "float8_e4m3fn"
PLACEMENTS: Tuple[str, ...] = ("resident", "model", "blocks")
GIB = 2 ** 30
# Parameter counts behind the estimates. Qwen-Image MMDiT: 60 blocks of width 3072, each 8 attention
# projections (8 * 3072^2), two modulations (2 * 3072 * 6 * 3072) and two MLPs (2 * 2 * 3072 * 4 * 3072):
# 340M per block, 20.4B in all. Qwen2.5-VL-7B text encoder with its vision tower: 8.29B. TRELLIS.2: 4B.
QWEN_MMDIT_PARAMS = 60 * (8 + 2 * 6 + 2 * 2 * 4) * 3072 ** 2
QWEN_MMDIT_BLOCKS = 60
QWEN_TEXT_ENCODER_PARAMS = 8_290_000_000
QWEN_TEXT_ENCODER_LAYERS = 28
TRELLIS2_PARAMS = 4_000_000_000
TRELLIS2_OFFLOAD_PEAK_BYTES = int(3.2 * GIB)  # measured peak of the 1024 cascade with --offload (issue 22)
# Activations at 1 MP (8k image tokens + prompt), the CUDA context and the VAE decode, over the weights.
VRAM_HEADROOM_GIB = 4.0


@dataclass(frozen=True)
class MemoryPlan:
    """Where the networks live and how their weights are stored (see the section comment).

    Attributes:
        name: a key of :data:`MEMORY_PLANS`; mmdit_* / text_encoder_*: storage (None | FP8_STORAGE)
        and placement (one of :data:`PLACEMENTS`) of the Qwen networks; geometry_offload: the TRELLIS.2
        networks (and the Qwen VAE) visit the device only while they run; pinned_only: :func:`vram_plan`
        picks it only with ``pin_host`` (measured slower than the next plan without pinned copies);
        pins_by_default: the command line gives the plan pinned host copies unless told not to
        (``--no-pin-host``): the block plans, whose MMDiT diffusers pins anyway.
    """

    name: str
    mmdit_storage: Optional[str]
    mmdit_placement: str
    text_encoder_storage: Optional[str]
    text_encoder_placement: str
    geometry_offload: bool
    pinned_only: bool = False
    pins_by_default: bool = False

    def weight_peak_bytes(self) -> int:
        """Largest set of weights on the device at once (bytes), from the parameter counts."""
        def size(params: int, storage: Optional[str], placement: str, blocks: int) -> int:
            nbytes = params * (1 if storage == FP8_STORAGE else 2)  # fp8: 1 byte; bf16: 2
            return 2 * nbytes // blocks if placement == "blocks" else nbytes  # blocks: one + the prefetched one

        mmdit = size(QWEN_MMDIT_PARAMS, self.mmdit_storage, self.mmdit_placement, QWEN_MMDIT_BLOCKS)
        te = size(QWEN_TEXT_ENCODER_PARAMS, self.text_encoder_storage, self.text_encoder_placement,
                  QWEN_TEXT_ENCODER_LAYERS)
        if not self.geometry_offload:  # everything resident together
            return mmdit + te + 2 * TRELLIS2_PARAMS
        return max(mmdit, te, TRELLIS2_OFFLOAD_PEAK_BYTES)

    def needs_gib(self) -> float:
        """Card size the plan is chosen for: weights + :data:`VRAM_HEADROOM_GIB`."""
        return self.weight_peak_bytes() / GIB + VRAM_HEADROOM_GIB

    def describe(self) -> str:
        def one(storage, placement):
            return f"{'fp8' if storage == FP8_STORAGE else 'compute dtype'}, {placement}"
        return (f"{self.name}: MMDiT {one(self.mmdit_storage, self.mmdit_placement)}; text encoder "
                f"{one(self.text_encoder_storage, self.text_encoder_placement)}; TRELLIS.2 "
                f"{'offloaded' if self.geometry_offload else 'resident'} (needs ~{self.needs_gib():.1f} GiB"
                f"{'; with pinned host copies only' if self.pinned_only else ''})")

    def as_record(self) -> Dict[str, object]:
        return {"name": self.name, "mmdit_storage": self.mmdit_storage, "mmdit_placement": self.mmdit_placement,
                "text_encoder_storage": self.text_encoder_storage,
                "text_encoder_placement": self.text_encoder_placement, "geometry_offload": self.geometry_offload,
                "pinned_only": self.pinned_only, "pins_by_default": self.pins_by_default,
                "estimated_gib": round(self.needs_gib(), 2)}


# Fastest first; :func:`vram_plan` takes the first that fits. ``fp8`` only with pinned host copies: moving
# the whole fp8 MMDiT in and out of pageable memory made it slower than ``fp8_blocks`` on a 24 GiB card
# (H100, session 6: 37.0 s against 20.2 s at 4 back-view steps; estimated 68.1 against 57.4 s at 40).
# The block plans pin by default: with pinned copies ``fp8_blocks`` ran 8.1 s against 20.2 s and built in
# 26.5 s against 31.9 s (H100, session 9; diffusers pins the streamed MMDiT either way, so only the text
# encoder's and TRELLIS.2's host copies become page-locked). ``fp8`` with pinned copies is faster per
# image still (6.9 against 7.1 s once warm) but pinning its whole MMDiT made its build 56.8 s: it pays
# from about the fifth image (``batch``), so it stays an explicit ``--pin-host``.
MEMORY_PLANS: Dict[str, MemoryPlan] = {p.name: p for p in (
    MemoryPlan("resident", None, "resident", None, "resident", False),
    MemoryPlan("offload", None, "model", None, "model", True),
    MemoryPlan("fp8", FP8_STORAGE, "model", FP8_STORAGE, "model", True, pinned_only=True),
    MemoryPlan("fp8_blocks", FP8_STORAGE, "blocks", FP8_STORAGE, "model", True, pins_by_default=True),
    MemoryPlan("fp8_blocks_all", FP8_STORAGE, "blocks", FP8_STORAGE, "blocks", True, pins_by_default=True),
)}


def vram_plan(vram_gib: float, pin_host: bool = False) -> MemoryPlan:
    """Card size (GiB) -> the fastest :class:`MemoryPlan` whose estimate fits (``needs_gib() <= vram_gib``),
    ``pinned_only`` plans only with ``pin_host``. ValueError naming the smallest plan's need for a card
    below it."""
    for plan in MEMORY_PLANS.values():
        if plan.needs_gib() <= vram_gib and (pin_host or not plan.pinned_only):
            return plan
    smallest = list(MEMORY_PLANS.values())[-1]
    raise ValueError(f"{vram_gib:g} GiB is below the smallest plan ({smallest.name} needs "
                     f"~{smallest.needs_gib():.1f} GiB)")


# Working memory of the TRELLIS.2 stages beyond their weights, which a host's model manager must keep free
# next to them (ComfyUI: ``load_models_gpu(..., memory_required=...)``; without it, a 24 GB card kept 11 GiB
# of the Qwen MMDiT loaded and the 1024 decode ran out of memory, issue 22). Per token, from peaks measured
# on an H100 with the 3D side offloaded (issue 22/21 device runs), plus about a quarter for margin:
# - shape decoder: +1.19 GiB at 8128 tokens -> 512 and +2.96 GiB at 20336 -> 1024, i.e. 153-157 KiB a token;
# - shape flow 1024 with the CFG pair at 9600 tokens: 4.72 GiB less 3.02 of weights and 0.1 of conditions,
#   ~175 KiB a token;
# - structure stage (flow at its 16^3 latent, then the dense decoder): 4.24 GiB less 3.16 of weights, 1.1 GiB.
FLOW_WORKING_BYTES_PER_TOKEN = 224 * 1024
DECODER_WORKING_BYTES_PER_TOKEN = 192 * 1024
SS_WORKING_BYTES = int(1.5 * GIB)


def flow_working_bytes(tokens: int) -> int:
    """Bytes a shape flow (CFG pair, conditions) needs beyond its weights at ``tokens`` tokens."""
    return int(tokens) * FLOW_WORKING_BYTES_PER_TOKEN


def decoder_working_bytes(tokens: int) -> int:
    """Bytes the shape decoder needs beyond its weights to decode ``tokens`` latent tokens to a mesh."""
    return int(tokens) * DECODER_WORKING_BYTES_PER_TOKEN


def texture_working_bytes(tokens: int) -> int:
    """Bytes the texture stage needs beyond its weights on a shape latent of ``tokens`` tokens: its flow
    runs on those voxels, then the shape and texture decoders decode them side by side (two decoders)."""
    return max(flow_working_bytes(tokens), 2 * decoder_working_bytes(tokens))


def geometry_token_bound(name: str, structure_tokens: int, max_num_tokens: int = MAX_NUM_TOKENS) -> int:
    """Most tokens a shape stage of pipeline type ``name`` can hold, known before it runs, from the
    structure's voxel count at the type's grid. A cascade's second stage quantises each first-stage token
    to ``ceil(G / grid)^3`` cells of its grid ``G = hr_resolution / 16`` (8 at 1024, 27 at 1536); above
    1024 the pipeline lowers the resolution until the tokens are under ``max_num_tokens`` or it reaches
    1024 (``geometry_pipeline.cascade_coords``)."""
    t = pipeline_type(name)
    n = int(structure_tokens)
    if not t.cascade:
        return n

    def cells(resolution: int) -> int:
        return math.ceil(resolution / 16 / t.structure_grid) ** 3

    second = n * cells(t.hr_resolution)
    if t.hr_resolution > 1024:
        second = min(second, max(int(max_num_tokens) - 1, n * cells(1024)))
    return max(n, second)
