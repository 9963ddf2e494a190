"""TRELLIS.2 geometry pipeline: image -> sparse structure -> shape SLat -> mesh (reference
``Trellis2ImageTo3DPipeline`` without texture), with optional Know3D knowledge.

Stages (each a method, so hosts can run them one by one):

1. ``get_cond(images, resolution)``: DINOv3 tokens ``[B, T, C]`` at 512 or 1024 px; the negative
   condition is zeros.
2. ``sample_sparse_structure``: noise ``[B, 8, R, R, R]`` -> flow (CFG pairs batched, uncond only
   inside the guidance interval) -> structure decoder -> occupancy -> int32 coords ``[N, 4]`` at 32^3
   (``512`` and the cascades, max-pooled) or 64^3 (``1024``).
3. ``sample_shape_slat``: noise ``[N, 32]`` on the coords -> shape flow -> ``slat * std + mean``
   (``shape_slat_normalization`` of pipeline.json). The cascades sample the 512 model first, let the
   shape decoder predict the subdivisions (``upsample``, 512^3 voxels), quantise them to the HR token
   grid ``G = hr_res / 16`` (:func:`quantize_coords`), lower ``hr_res`` by 128 while the tokens
   reach ``max_num_tokens`` and ``hr_res > 1024`` (:func:`cascade_coords`), then sample the 1024 model.
4. ``decode_shape``: shape decoder -> O-Voxel flexible dual grid -> raw triangle mesh.
5. Texture (``run(texture=True)``, the reference's ``sample_tex_slat`` / ``decode_tex_slat``):
   ``sample_tex_slat``: noise ``[N, 32]`` on the final shape latent's coords, the normalised shape
   latent concatenated to it on every flow call (``concat_cond``), the texture flow of the type
   (``plan.PipelineType.texture_flow``, conditioned like the last shape stage), ``tex_slat_sampler``
   settings, ``* std + mean`` (``tex_slat_normalization``); optionally the back view as a second
   image condition (``back_cond``: the multi-view conditioning of the ``multiview`` variant).
   ``decode_textured``: the shape decoder's head and subdivisions, the texture decoder guided by them
   -> mesh + PBR voxels (``mesh.texture.PBRVoxels``) on the same voxels.

RNG parity with the reference: one ``torch.Generator().manual_seed(seed)`` draws, in order, the
structure noise and each shape stage's noise on the CPU in fp32 (the reference calls
``torch.manual_seed(seed)`` and ``torch.randn``: the same numbers).

Placement: with ``offload`` every network lives on the CPU and visits ``device`` only while its
stage runs (the reference's ``low_vram``); after :meth:`pin_host_copies`, on CUDA from pinned host
copies (``device_visits``).
Per-stage buffers (knowledge contexts, the CFG pair template, intermediate latents) are released when
a stage ends, also when it is cancelled.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .sampling import (
    FlowEulerGuidanceIntervalSampler,
    SamplerParams,
    dense_cfg_batch,
    reference_noise,
    sparse_cfg_batch,
    time_schedule,
    uses_cfg,
)
from .knowledge import (
    Knowledge,
    MultiViewCondition,
    apply_know3d,
    load_know3d_merged,
    multi_view_model_fn,
    prepare_knowledge,
    read_know3d,
    require_branch,
)
from .plan import (
    DECODER_MODELS,
    DINOV3_FOLDER,
    MAX_NUM_TOKENS,
    SHAPE_DECODER,
    SHAPE_FLOWS,
    SS_DECODER,
    SS_FLOW,
    SS_STAGE,
    TEX_DECODER,
    TEX_STAGE,
    TEXTURE_MODELS,
    cond_resolutions,
    models_for_types,
    shape_stages,
    ss_resolution,
    texture_models,
)
from .plan import pipeline_type as pipeline_type_plan
from .sparse import SparseTensor, flash_for_new_shapes, record_attention_plans
from .sparse.triton_start import start_triton_runtime
from .trellis2.loading import PipelineConfig, load_pipeline_models, read_pipeline_config
from .trellis2.sparse_structure_decoder import decode_occupancy

__all__ = [
    "GeometryResult",
    "Trellis2GeometryPipeline",
    "kernel_warmup_by_default",
    "quantize_coords",
    "cascade_coords",
    "StageTimer",
    "knowledge_info",
]

ProgressFn = Callable[[str, int, int], None]
CancelFn = Callable[[], bool]
ParamsArg = Union[None, SamplerParams, Mapping[str, Any]]


# ----------------------------------------------------------------------------------- cascade coords
def quantize_coords(coords: torch.Tensor, grid: int, source_resolution: int = 512) -> torch.Tensor:
    """Voxel coords on a ``source_resolution``^3 grid -> unique coords on a ``grid``^3 grid.

    ``q = floor((c + 0.5) / source_resolution * grid)`` per axis (the reference's float32 ``int()``
    truncation; exact for these sizes), then ``unique`` rows (sorted: batch-major, x, y, z).
    ``coords [N, 4]`` int (b, x, y, z) -> int32 ``[M, 4]``.
    """
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"quantize_coords: coords must be [N, 4], got {tuple(coords.shape)}")
    q = coords.int().clone()
    q[:, 1:] = ((coords[:, 1:].float() + 0.5) / source_resolution * grid).int()
    return torch.unique(q, dim=0)


def cascade_coords(
    fine_coords: torch.Tensor,
    hr_resolution: int,
    max_num_tokens: int = MAX_NUM_TOKENS,
    source_resolution: int = 512,
) -> Tuple[torch.Tensor, int]:
    """HR token coords of the cascade and the mesh resolution they belong to.

    Quantises ``fine_coords`` (512^3) to ``G = hr_resolution // 16``; while the token count is
    ``>= max_num_tokens`` and ``hr_resolution > 1024``, lowers ``hr_resolution`` by 128 and retries
    (1536 -> 1408 -> 1280 -> 1152 -> 1024; 1024 is never lowered). Returns ``(coords [M, 4], hr_res)``.
    """
    while True:
        coords = quantize_coords(fine_coords, hr_resolution // 16, source_resolution)
        if coords.shape[0] < max_num_tokens or hr_resolution <= 1024:
            return coords, hr_resolution
        hr_resolution -= 128


# ----------------------------------------------------------------------------------- timing
class StageTimer:
    """Wall time (and, on CUDA, peak allocated memory) per named stage."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.timings: Dict[str, float] = {}
        self.peak_vram: Dict[str, int] = {}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
                self.peak_vram[stage] = int(torch.cuda.max_memory_allocated(self.device))
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def merge(self, other: "StageTimer") -> None:
        self.timings.update(other.timings)
        self.peak_vram.update(other.peak_vram)


# ----------------------------------------------------------------------------------- result
@dataclass
class GeometryResult:
    """Output of :meth:`Trellis2GeometryPipeline.run`.

    Attributes:
        mesh: raw O-Voxel mesh (model space, Z-up, ``[-0.5, 0.5]^3``), on the CPU.
        coords: structure coords ``[N, 4]`` int32 (CPU).
        slat: de-normalised shape latent of the last stage (SparseTensor, CPU).
        resolution: mesh grid (512, 1024, or the cascade's possibly lowered HR resolution).
        timings: seconds per stage; peak_vram: bytes per stage (CUDA only, else empty).
        num_tokens: tokens per shape stage (and ``sparse_structure``: occupied voxels).
        knowledge: provenance of the knowledge used (``{"kind": ..., **provenance}``) or None.
        texture: PBR voxels of the texture stage (``mesh.texture.PBRVoxels``, CPU) or None;
        tex_slat: the de-normalised texture latent (CPU) or None.
    """

    mesh: Any
    coords: torch.Tensor
    slat: SparseTensor
    resolution: int
    pipeline_type: str
    seed: int
    timings: Dict[str, float] = field(default_factory=dict)
    peak_vram: Dict[str, int] = field(default_factory=dict)
    num_tokens: Dict[str, int] = field(default_factory=dict)
    knowledge: Optional[Dict[str, Any]] = None
    texture: Any = None
    tex_slat: Optional[SparseTensor] = None

    @property
    def peak_vram_total(self) -> Optional[int]:
        return max(self.peak_vram.values()) if self.peak_vram else None


def knowledge_info(knowledge: Any) -> Optional[Dict[str, Any]]:
    """``{"kind", "shape", **provenance}`` of a Knowledge (None for None)."""
    if knowledge is None:
        return None
    return {"kind": knowledge.kind, "shape": list(knowledge.tensor.shape), **dict(knowledge.provenance)}


# ----------------------------------------------------------------------------------- helpers
def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _find_dinov3(folder: str, config: PipelineConfig) -> Optional[str]:
    """Local DINOv3 folder for pipeline.json's ``image_cond_model`` (inside or beside ``folder``)."""
    name = DINOV3_FOLDER
    model_name = ((config.image_cond_model or {}).get("args") or {}).get("model_name")
    if model_name:
        name = str(model_name).replace("\\", "/").rstrip("/").split("/")[-1]
    for cand in (os.path.join(folder, name), os.path.join(os.path.dirname(os.path.abspath(folder)), name)):
        if os.path.isfile(os.path.join(cand, "model.safetensors")):
            return cand
    return None


def _dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    from .trellis2.modules.dit import parse_dtype

    return parse_dtype(dtype)


def _batched_cond(cond: Mapping[str, Any], device: torch.device, check_zero: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """``(cond, neg_cond, neg_cond is known to be all zeros)`` on ``device``. With ``check_zero``, a given
    neg_cond is checked where it is (on a GPU: one host sync a stage, before its sampling); without, only
    a neg_cond made here counts as zero."""
    c, n = cond["cond"], cond.get("neg_cond")
    c = c.to(device)
    if n is None:
        return c, torch.zeros_like(c), True
    zero = check_zero and not bool(n.any())
    return c, n.to(device), zero


# ----------------------------------------------------------------------------------- pipeline
# Trellis2GeometryPipeline.plan_attention_ahead's default. Off: written in session 11 (the prebuilt calls
# have exactly the later calls' shapes, strides and offsets: tests/test_attention_plans.py; torch's plan cache
# keys on no more than those, see sparse.AttentionPlans) but its time on CUDA is not measured yet
# (`benchmarks/bench_geometry.py --plan-ahead both`): how much of the builds overlaps the GPU's queued work.
PLAN_ATTENTION_AHEAD_BY_DEFAULT = False
# Trellis2GeometryPipeline.flash_first_step's default. Off: written in session 13, not yet timed on CUDA
# (`benchmarks/bench_geometry.py --flash-first-step both`). Expected: a new object's first-step plan builds
# (+125 ms on an H100, session 11) against FlashAttention-2's slower first step (about +35 ms).
FLASH_FIRST_STEP_BY_DEFAULT = False
# Trellis2GeometryPipeline.zero_negative_shortcut's default. On (session 13): with an all-zero negative
# condition (TRELLIS.2's), the guided pair's negative half gets its cross-attention as one row (the value of a
# zero token: uniform attention over identical keys) instead of to_q, attention and to_out over its tokens,
# and its SDPA calls take the unguided steps' shapes (one cuDNN plan fewer per new token count). Less work by
# construction, equal up to rounding (tests/test_zero_negative.py); its time on CUDA is not measured yet
# (`benchmarks/bench_geometry.py --zero-negative both`).
ZERO_NEGATIVE_SHORTCUT_BY_DEFAULT = True


def kernel_warmup_by_default(device: torch.device) -> bool:
    """Whether a pipeline on ``device`` starts its kernel warm-ups at load unless told: on CUDA (the
    warm-ups compile Triton kernels; elsewhere there are none to compile)."""
    return torch.device(device).type == "cuda"


class Trellis2GeometryPipeline:
    """The geometry path of TRELLIS.2 over loaded networks.

    Args:
        models: pipeline.json key -> network (``required_models(type)`` for the types you run).
        config: the parsed pipeline.json (sampler defaults, shape-latent normalisation).
        image_cond_model: a ``conditioning.DinoV3FeatureExtractor`` (needed by ``get_cond``).
        device: where the networks run.
        offload: keep networks on the CPU, each on ``device`` only while its stage runs.
        know3d_spec: the ``knowledge.Know3DSpec`` of a loaded Know3D checkpoint, or None.
        kernel_warmup: start each network's kernel warm-up (Triton's start, compiles or cache loads) in
            a background thread now, so that it overlaps the stages before its first call (not with
            ``offload``). None (default): on a CUDA device. Measured on an H100 (session 9,
            ``benchmarks/probe_first_calls.py``, fresh processes): structure flow's first call then the 1024
            decoder's first forward went from 8.1 to 5.6 s with an empty Triton cache, 2.57 to 2.43 s with it.
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        config: PipelineConfig,
        image_cond_model: Any = None,
        device: Union[str, torch.device] = "cpu",
        offload: bool = False,
        know3d_spec: Any = None,
        kernel_warmup: Optional[bool] = None,
    ):
        self.models: Dict[str, nn.Module] = dict(models)
        self.config = config
        self.image_cond_model = image_cond_model
        self.device = torch.device(device)
        self.offload = bool(offload)
        self.offload_device = torch.device("cpu")
        self.know3d_spec = know3d_spec
        self.last_num_tokens: Dict[str, int] = {}  # tokens per shape stage of the last sample_shape_slat
        mean, std = config.normalization("shape_slat_normalization")
        self.slat_mean, self.slat_std = mean, std
        has_tex = "tex_slat_normalization" in config.normalizations
        self.tex_mean, self.tex_std = config.normalization("tex_slat_normalization") if has_tex else (None, None)
        home = self.offload_device if self.offload else self.device
        for model in self.models.values():
            model.to(home).eval()
        if self.image_cond_model is not None:
            self.image_cond_model.to(home)
        self.visits: Dict[int, Any] = {}  # id(network) -> device_visits.PinnedVisits (pin_host_copies)
        self.plan_attention_ahead = PLAN_ATTENTION_AHEAD_BY_DEFAULT  # see _attention_plan_builds
        self.flash_first_step = FLASH_FIRST_STEP_BY_DEFAULT  # see _attention_plan_builds
        self.zero_negative_shortcut = ZERO_NEGATIVE_SHORTCUT_BY_DEFAULT  # see _guided
        if kernel_warmup_by_default(self.device) if kernel_warmup is None else kernel_warmup:
            self.start_kernel_warmups()

    def pin_host_copies(self) -> None:
        """With ``offload`` on CUDA: pinned host copies of every network (the DINOv3 extractor's model
        too), which then visit ``device`` from them (``device_visits``); a no-op otherwise."""
        from .device_visits import visits_for

        if not self.offload:
            return
        nets = list(self.models.values()) + [getattr(self.image_cond_model, "model", None)]
        for net in nets:
            visits = visits_for(net, self.device) if net is not None else None
            if visits is not None:
                self.visits[id(net)] = visits

    def start_kernel_warmups(self) -> int:
        """Each network's kernel warm-up (Triton's start, compiles or cache loads) in the background,
        in run order, so that it overlaps the stages before the network's first call (the decoder's
        with both flows); each first call joins its own. Returns how many started: none with
        ``offload`` (the weights reach ``device`` only when the stage runs: the first call warms up
        there). The constructor calls it on CUDA (``kernel_warmup``)."""
        if self.offload:
            return 0
        start_triton_runtime(self.device)  # first in the queue (a no-op when the loading started it)
        started = 0
        for model in self.models.values():
            start = getattr(model, "start_kernel_precompile", None)
            if start is not None:
                started += bool(start(self.device))
        return started

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        folder: Union[str, os.PathLike],
        device: Union[str, torch.device] = "cuda",
        dtype: Union[None, str, torch.dtype] = None,
        know3d: Union[None, str, os.PathLike] = None,
        offload: bool = False,
        dinov3: Union[None, str, os.PathLike] = None,
        pipeline_types: Optional[Sequence[str]] = None,
        decoder_dtype: Union[None, str, torch.dtype] = None,
        texture: bool = False,
    ) -> "Trellis2GeometryPipeline":
        """Load an official TRELLIS.2 folder (pipeline.json + ckpts/), strictly.

        Args:
            device: where the networks run.
            dtype: compute dtype of the flow DiTs (None: the checkpoint's, bf16 for the official files).
            know3d: a Know3D checkpoint (``knowledge.save_know3d`` format): a delta file is applied to
                the official flows (branch installed, LoRA merged); a merged file replaces them.
            offload: networks stay on the CPU and visit ``device`` only while used.
            dinov3: DINOv3 folder or ``.safetensors``; default: ``dinov3-vitl16-pretrain-lvd1689m``
                inside ``folder`` or beside it. Not found: ``get_cond`` raises naming the places.
            pipeline_types: load only the flows these types need (default: all geometry models).
            decoder_dtype: compute dtype of the two decoders; None keeps the checkpoint's (fp16) on
                CUDA and uses fp32 on the CPU (CPU half-precision convolutions are very slow).
            texture: also load the texture flow(s) of ``pipeline_types`` (both for None) and the
                texture decoder (``run(texture=True)``).
        """
        folder = os.fspath(folder)
        device = torch.device(device)
        start_triton_runtime(device)  # overlaps the reading of the weights
        config = read_pipeline_config(folder)
        keys = models_for_types(pipeline_types)
        if texture:
            wanted = {k for t in pipeline_types for k in texture_models(t)} if pipeline_types else set(TEXTURE_MODELS)
            keys += [k for k in TEXTURE_MODELS if k in wanted]
        home = torch.device("cpu") if offload else device
        models = load_pipeline_models(folder, keys=keys, dtype=_dtype(dtype), device=home)
        dino_path = os.fspath(dinov3) if dinov3 is not None else _find_dinov3(folder, config)
        return cls._assemble(models, config, device, offload, know3d, decoder_dtype, dino_path,
                             dino_path or os.path.join(folder, DINOV3_FOLDER))

    @classmethod
    def from_comfy_files(
        cls,
        diffusion_file: Union[str, os.PathLike],
        vae_file: Union[str, os.PathLike],
        device: Union[str, torch.device] = "cuda",
        dtype: Union[None, str, torch.dtype] = None,
        know3d: Union[None, str, os.PathLike] = None,
        offload: bool = False,
        dinov3: Union[None, str, os.PathLike] = None,
        pipeline_types: Optional[Sequence[str]] = None,
        decoder_dtype: Union[None, str, torch.dtype] = None,
        pipeline_config: Union[None, str, os.PathLike] = None,
        texture_vae_file: Union[None, str, os.PathLike] = None,
    ) -> "Trellis2GeometryPipeline":
        """Load the single files ComfyUI users have for core's native TRELLIS.2 (Comfy-Org repack).

        ``diffusion_file``: ``models/diffusion_models/trellis_2_*.safetensors`` (all flows);
        ``vae_file``: ``models/vae/trellis_2_shape_vae_*.safetensors`` (both decoders);
        ``dinov3``: e.g. ``models/clip_vision/dino_v3_vit_l.safetensors``. Sampler settings and the
        shape-latent normalisation come from the official defaults unless ``pipeline_config`` names
        a ``pipeline.json``. ``texture_vae_file``: ``models/vae/trellis_2_texture_vae_*.safetensors``
        (the texture decoder; the texture flow comes from the diffusion file): ``run(texture=True)`` for
        the types with a 1024 texture flow (all but ``512``). Other arguments as :meth:`from_pretrained`.
        """
        from .trellis2.comfy_files import load_comfy_model_set

        device = torch.device(device)
        start_triton_runtime(device)  # overlaps the reading of the weights
        home = torch.device("cpu") if offload else device
        models, config = load_comfy_model_set(os.fspath(diffusion_file), os.fspath(vae_file), device=home,
                                              dtype=_dtype(dtype), keys=models_for_types(pipeline_types),
                                              pipeline_config=pipeline_config, texture_vae_file=texture_vae_file)
        dino_path = os.fspath(dinov3) if dinov3 is not None else None
        return cls._assemble(models, config, device, offload, know3d, decoder_dtype, dino_path,
                             dino_path or "a DINOv3 ViT-L/16 .safetensors in models/clip_vision (dinov3=...)")

    @classmethod
    def _assemble(cls, models: Dict[str, nn.Module], config: Any, device: torch.device, offload: bool,
                  know3d: Union[None, str, os.PathLike], decoder_dtype: Union[None, str, torch.dtype],
                  dino_path: Optional[str], dino_hint: str) -> "Trellis2GeometryPipeline":
        """Decoder precision, Know3D checkpoint and DINOv3 on a loaded model set -> the pipeline."""
        home = torch.device("cpu") if offload else device
        dec_dtype = _dtype(decoder_dtype) or (None if device.type == "cuda" else torch.float32)
        if dec_dtype is not None:
            for key in DECODER_MODELS + (TEX_DECODER,):
                if key in models:
                    models[key].convert_to(dec_dtype)
        spec = cls._load_know3d(models, os.fspath(know3d), home) if know3d is not None else None
        extractor = None
        if dino_path is not None:
            from .conditioning import DinoV3FeatureExtractor

            extractor = DinoV3FeatureExtractor.from_pretrained(dino_path, device=home)
        pipe = cls(models, config, extractor, device=device, offload=offload, know3d_spec=spec)
        pipe._dinov3_hint = dino_hint
        return pipe

    @staticmethod
    def _load_know3d(models: Dict[str, nn.Module], path: str, device: torch.device) -> Any:
        """Apply (delta) or load (merged) a Know3D checkpoint onto the loaded flows; returns its spec."""
        ckpt = read_know3d(path)
        flows = [k for k in models if "flow" in k and k in ckpt.tensors]
        if not flows:
            raise ValueError(
                f"Know3D checkpoint {path} holds weights for {ckpt.models}, none of the loaded flows "
                f"{[k for k in models if 'flow' in k]}"
            )
        if ckpt.content == "delta":
            return apply_know3d({k: models[k] for k in flows}, ckpt)
        merged, spec = load_know3d_merged(path, device=device, models=flows)
        for key, model in merged.items():
            old = models[key]
            if hasattr(old, "dtype") and hasattr(model, "convert_to") and model.dtype != old.dtype:
                model.convert_to(old.dtype)
            models[key] = model
        return spec

    # ------------------------------------------------------------------ configuration
    @property
    def default_pipeline_type(self) -> str:
        return self.config.default_pipeline_type

    def sampler_params(self, stage: str, overrides: ParamsArg = None) -> SamplerParams:
        """pipeline.json sampler defaults of ``stage`` (``"sparse_structure"`` | ``"shape_slat"`` | ``"tex_slat"``),
        with ``overrides`` (a dict of fields, e.g. ``{"steps": 8}``) or a full SamplerParams."""
        if isinstance(overrides, SamplerParams):
            return overrides
        key = {SS_STAGE: "sparse_structure_sampler", "shape_slat": "shape_slat_sampler",
               TEX_STAGE: "tex_slat_sampler"}[stage]
        block = self.config.samplers.get(key)
        if block is None:
            raise KeyError(f"{self.config.folder}/pipeline.json has no {key!r}")
        return FlowEulerGuidanceIntervalSampler.from_pipeline_json(block, **dict(overrides or {})).params

    def model(self, key: str) -> nn.Module:
        if key not in self.models:
            raise KeyError(
                f"model {key!r} is not loaded (loaded: {sorted(self.models)}); load the pipeline with "
                "pipeline_types covering the type you run"
            )
        return self.models[key]

    @contextlib.contextmanager
    def use(self, *modules: Any) -> Iterator[None]:
        """Keep ``modules`` (networks or the DINOv3 extractor) on ``device`` for the block (offload)."""
        visits = [self.visits.get(id(getattr(m, "model", m))) for m in modules]
        if self.offload:
            for m, v in zip(modules, visits):
                if v is not None:
                    v.onload()
                else:
                    m.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                for m, v in zip(modules, visits):
                    if v is not None:
                        v.offload()
                    else:
                        m.to(self.offload_device)
                _empty_cache(self.device)

    # ------------------------------------------------------------------ conditioning
    def preprocess(self, image: Any, mask: Any = None, **kwargs) -> Any:
        """Reference preprocessing (foreground crop on black), see ``conditioning.preprocess_image``."""
        from .conditioning import preprocess_image

        return preprocess_image(image, mask, **kwargs)

    def get_cond(self, images: Any, resolution: int) -> Dict[str, torch.Tensor]:
        """DINOv3 tokens of (preprocessed) images: ``{"cond": [B, T, C], "neg_cond": zeros}`` on device."""
        if self.image_cond_model is None:
            raise FileNotFoundError(
                f"no DINOv3 model loaded: put config.json + model.safetensors of "
                f"facebook/{DINOV3_FOLDER} into {getattr(self, '_dinov3_hint', DINOV3_FOLDER)} "
                "(or pass dinov3=...)"
            )
        from .conditioning import get_cond

        with self.use(self.image_cond_model):
            cond = get_cond(self.image_cond_model, images, int(resolution))
        return {k: v.to(self.device) for k, v in cond.items()}

    def check_knowledge(self, knowledge: Any, pipeline_type: Optional[str] = None) -> None:
        """Raise before any sampling when ``knowledge`` cannot be used: ``KnowledgeMismatchError``
        naming both sides (kind, dim, layers, sigma vs the Know3D checkpoint), or ValueError when an
        injected kind meets flows without a Know3D branch. None always passes."""
        if knowledge is None:
            return
        if not isinstance(knowledge, Knowledge):
            raise TypeError(f"knowledge must be a know3d_core.knowledge.Knowledge, got {type(knowledge).__name__}")
        if not knowledge.injected:
            return
        if self.know3d_spec is not None:
            self.know3d_spec.check(knowledge, origin="the loaded Know3D checkpoint")
        self.require_branch(knowledge.kind, pipeline_type)

    def require_branch(self, kind: str, pipeline_type: Optional[str] = None) -> None:
        """ValueError (``knowledge.require_branch``'s one message) unless every loaded flow that
        ``pipeline_type`` runs (the structure flow alone for None) carries a Know3D branch for ``kind``."""
        keys = (SS_FLOW,) + (pipeline_type_plan(pipeline_type).shape_flows if pipeline_type is not None else ())
        require_branch({k: self.models[k] for k in keys if k in self.models}, kind)

    # ------------------------------------------------------------------ guidance plumbing
    def _cond_pair(self, cond: Mapping[str, Any]) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """``(cond, neg_cond, use the zero-negative shortcut)`` on the device: the shortcut when
        :attr:`zero_negative_shortcut` is on and neg_cond is all zeros (checked only then)."""
        c, n, zero = _batched_cond(cond, self.device, check_zero=self.zero_negative_shortcut)
        return c, n, zero and self.zero_negative_shortcut

    @contextlib.contextmanager
    def _guided(self, flow: nn.Module, cond: Mapping[str, Any], knowledge: Any, image_size: int, sparse: bool):
        """``(model_fn, batched_model_fn | None, cond, neg_cond)`` for one stage; releases the
        knowledge context afterwards (also on errors and cancellation). With an all-zero negative
        condition and :attr:`zero_negative_shortcut` on (``ZERO_NEGATIVE_SHORTCUT_BY_DEFAULT``), the pair
        forward gets ``zero_cond_from`` (the flows compute that half's cross-attention as one row)."""
        c, n, neg_zero = self._cond_pair(cond)
        ctx = None
        make_batch = sparse_cfg_batch if sparse else dense_cfg_batch

        def batch(model_fn, zero: bool = neg_zero):
            return make_batch(model_fn, neg_is_zero=zero)
        try:
            if knowledge is not None and knowledge.injected:
                require_branch({type(flow).__name__: flow}, knowledge.kind)
                ctx = prepare_knowledge(flow, knowledge.to(self.device))

                def fn(x, t, cc, **kw):
                    return flow(x, t, cc, knowledge=ctx, **kw)

                yield fn, batch(fn), c, n
            elif knowledge is not None:  # multi_view: the back image is a second image condition
                back = self.get_cond(knowledge.tensor, image_size)["cond"]
                if back.shape[0] != c.shape[0]:
                    back = back.expand(c.shape[0], -1, -1)
                mode = knowledge.provenance.get("mode", "stochastic")
                view = MultiViewCondition([c, back], mode)

                def base(x, t, cc, **kw):
                    return flow(x, t, cc, **kw)

                if mode == "concat":  # zero negative tokens: same output for any token count
                    joint = view.concatenated()
                    yield base, batch(base, zero=self.zero_negative_shortcut), joint, torch.zeros_like(joint)
                else:
                    yield multi_view_model_fn(base), None, view, n
            else:
                def fn(x, t, cc, **kw):
                    return flow(x, t, cc, **kw)

                yield fn, batch(fn), c, n
        finally:
            if ctx is not None:
                ctx.clear()
            proj = getattr(flow, "knowledge_proj", None)
            if proj is not None:
                proj.clear_cache()

    @staticmethod
    def _generator(generator: Optional[torch.Generator], seed: Optional[int]) -> torch.Generator:
        if generator is not None:
            return generator
        return torch.Generator().manual_seed(0 if seed is None else int(seed))

    @staticmethod
    def _progress(callback: Optional[ProgressFn], stage: str):
        if callback is None:
            return None
        return lambda step, total, t: callback(stage, step, total)

    @contextlib.contextmanager
    def _attention_plan_builds(self, params: SamplerParams, batch: int, progress):
        """A sampler callback (wrapping ``progress``) that moves a new token count's cuDNN attention plan
        builds (40-60 ms of host time each on an H100, one per new attention shape) off the host's
        critical path; the sampler's steps after the first make no host sync, so a build made while the
        GPU runs queued work overlaps it.

        - :attr:`flash_first_step` (``FLASH_FIRST_STEP_BY_DEFAULT``): the first step's attention calls of
          shapes this thread has not run yet take FlashAttention-2 (``sparse.flash_for_new_shapes``), so
          the guided batch's plans are built at step 2, while the GPU runs step 1. Step 1's numbers then
          differ from a run whose shapes were seen before by the two kernels' rounding.
        - :attr:`plan_attention_ahead` (``PLAN_ATTENTION_AHEAD_BY_DEFAULT``), with a guided first step
          followed by an unguided one: once the first step is queued, the unguided batch ``batch``'s plans
          are built (the guided steps ran ``2 batch``; session 11: the first unguided step of a 512 pass
          took 182 ms against 60 ms for the same object again).
        Neither on: ``progress`` itself."""
        guided = [uses_cfg(t, params) for t in time_schedule(params.steps, params.rescale_t)[:-1]]
        ahead = self.plan_attention_ahead and guided and guided[0] and not all(guided)
        if not (ahead or self.flash_first_step):
            yield progress
            return
        with contextlib.ExitStack() as stack:
            stop_flash = stack.enter_context(flash_for_new_shapes()) if self.flash_first_step else None
            plans = stack.enter_context(record_attention_plans()) if ahead else None

            def step_done(step: int, total: int, t: float) -> None:
                if stop_flash is not None:
                    stop_flash()
                if plans is not None and plans.recording:
                    plans.prebuild(batch)
                if progress is not None:
                    progress(step, total, t)

            yield step_done

    # ------------------------------------------------------------------ stage 2: sparse structure
    @torch.no_grad()
    def sample_sparse_structure(
        self,
        cond: Mapping[str, torch.Tensor],
        knowledge: Any = None,
        *,
        resolution: int = 32,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        params: ParamsArg = None,
        callback: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ) -> torch.Tensor:
        """Structure coords of the occupied voxels.

        Args:
            cond: ``get_cond(images, 512)``; its batch B is the number of samples.
            knowledge: a ``knowledge.Knowledge`` or None.
            resolution: grid of the returned coords (32, or 64 for the ``1024`` type).
            generator / seed: noise source (a generator continues a run's stream).
            params: sampler overrides (dict) or SamplerParams; default pipeline.json's.
        Returns:
            int32 ``[N, 4]`` (b, x, y, z) on the CPU, batch-major, x/y/z ascending.
        """
        flow = self.model(SS_FLOW)
        decoder = self.model(SS_DECODER)
        sampler = FlowEulerGuidanceIntervalSampler(self.sampler_params(SS_STAGE, params))
        gen = self._generator(generator, seed)
        B = cond["cond"].shape[0]
        R = flow.resolution
        noise = reference_noise(gen, B, flow.in_channels, R, R, R, device=self.device)
        with self.use(flow), self._guided(flow, cond, knowledge, 512, sparse=False) as (fn, batched, c, n), \
                self._attention_plan_builds(sampler.params, B, self._progress(callback, SS_STAGE)) as progress:
            z = sampler.sample(fn, noise, c, n, batched_model_fn=batched, callback=progress, cancel_check=cancel)
        del noise
        with self.use(decoder):
            logits = decoder(z)
        del z
        coords = decode_occupancy(logits, resolution).cpu()
        del logits
        if coords.shape[0] == 0:
            raise RuntimeError(
                "the sparse structure is empty (no voxel occupied): nothing to build; try another seed "
                "or check the input image (the object must be on a transparent/black background)"
            )
        return coords

    # ------------------------------------------------------------------ stage 3: shape SLat
    @torch.no_grad()
    def sample_shape_slat(
        self,
        coords: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        knowledge: Any = None,
        pipeline_type: str = "1024_cascade",
        *,
        cond_hr: Optional[Mapping[str, torch.Tensor]] = None,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        params: ParamsArg = None,
        max_num_tokens: int = MAX_NUM_TOKENS,
        callback: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ) -> Tuple[SparseTensor, int]:
        """Shape latent on the structure coords (and, for the cascades, on the upsampled coords).

        Args:
            coords: ``sample_sparse_structure`` output (32^3, or 64^3 for ``1024``).
            cond: DINOv3 condition of the first shape model: 512 px, or 1024 px for the ``1024`` type.
            cond_hr: 1024 px condition of the cascades' second stage (required there).
            max_num_tokens: token budget of ``1536_cascade`` (see :func:`cascade_coords`).
        Returns:
            ``(slat, resolution)``: de-normalised SparseTensor ``[N, 32]`` on ``device`` and the mesh grid.
        """
        plan = pipeline_type_plan(pipeline_type)
        self.last_num_tokens = {}
        gen = self._generator(generator, seed)
        params = self.sampler_params("shape_slat", params)
        first = plan.shape_stages[0]
        if not plan.cascade:
            slat = self._sample_slat(first, coords, plan.structure_grid, cond, knowledge, gen, params, callback,
                                     cancel)
            return slat, plan.mesh_resolution
        if cond_hr is None:
            raise ValueError(f"{pipeline_type} needs cond_hr = get_cond(images, 1024) for its second stage")
        lr = self._sample_slat(first, coords, plan.structure_grid, cond, knowledge, gen, params, callback, cancel)
        fine = self.upsample(lr)
        del lr
        hr_coords, hr_res = cascade_coords(fine, plan.hr_resolution, max_num_tokens, int(first))
        del fine
        slat = self._sample_slat(plan.shape_stages[1], hr_coords, hr_res // 16, cond_hr, knowledge, gen, params,
                                 callback, cancel)
        return slat, hr_res

    def _sample_slat(self, which: str, coords: torch.Tensor, grid: int, cond, knowledge, gen, params,
                     callback, cancel) -> SparseTensor:
        """One shape flow on ``coords`` (grid^3), de-normalised. ``which``: the flow's size, which is
        also its DINOv3 condition size (``"512"`` | ``"1024"``)."""
        flow = self.model(SHAPE_FLOWS[which])
        stage = f"shape_slat_{which}"
        image_size = int(which)
        coords = coords.to(self.device, torch.int32).contiguous()
        B = cond["cond"].shape[0]
        noise = reference_noise(gen, coords.shape[0], flow.in_channels, device=self.device)
        x = SparseTensor(noise, coords, (grid, grid, grid))
        if x.batch_size != B:
            raise ValueError(f"coords hold {x.batch_size} batch items, the condition {B}")
        self.last_num_tokens[stage] = int(coords.shape[0])
        sampler = FlowEulerGuidanceIntervalSampler(params)
        with self.use(flow), self._guided(flow, cond, knowledge, image_size, sparse=True) as (fn, batched, c, n), \
                self._attention_plan_builds(sampler.params, B, self._progress(callback, stage)) as progress:
            out = sampler.sample(fn, x, c, n, batched_model_fn=batched, callback=progress, cancel_check=cancel)
        del x, noise
        mean = self.slat_mean.to(self.device)
        std = self.slat_std.to(self.device)
        return SparseTensor(out.feats * std + mean, coords, (grid, grid, grid), batch_size=B)

    @torch.no_grad()
    def sample_geometry(
        self,
        coords: torch.Tensor,
        conds: Mapping[int, Mapping[str, torch.Tensor]],
        knowledge: Any = None,
        pipeline_type: str = "1024_cascade",
        **kwargs: Any,
    ) -> Tuple[SparseTensor, int]:
        """``sample_shape_slat`` from the DINOv3 conditions by image size (``{512: get_cond(img, 512),
        1024: ...}``, the sizes ``cond_resolutions(pipeline_type)`` lists): each shape stage gets the
        condition of its own size. ``kwargs``: those of ``sample_shape_slat`` (generator, params, ...)."""
        stages = shape_stages(pipeline_type)
        missing = sorted({int(s) for s in stages} - set(conds))
        if missing:
            raise ValueError(f"pipeline_type {pipeline_type} needs DINOv3 conditions at {missing} px")
        cond_hr = conds[int(stages[1])] if len(stages) > 1 else None
        return self.sample_shape_slat(coords, conds[int(stages[0])], knowledge, pipeline_type, cond_hr=cond_hr,
                                      **kwargs)

    # ------------------------------------------------------------------ stages run one call at a time
    @property
    def structure_noise_shape(self) -> Tuple[int, int, int, int, int]:
        """``(1, C, R, R, R)``: the structure noise of one sample, which a run draws first."""
        flow = self.model(SS_FLOW)
        r = int(flow.resolution)
        return (1, int(flow.in_channels), r, r, r)

    @property
    def structure_decoder_grid(self) -> int:
        """Grid of the structure decoder's occupancy (64 for TRELLIS.2): the finest ``resolution``
        ``sample_sparse_structure`` can return (coarser grids are max-pooled from it)."""
        flow = self.model(SS_FLOW)
        return int(flow.resolution) * int(self.model(SS_DECODER).upsample_factor)

    def shape_generator(self, seed: int) -> torch.Generator:
        """The noise source of a shape stage run apart from its structure stage (a host's separate
        node): seeded with ``seed`` and advanced past the structure noise of one sample, so one seed in
        both calls gives the numbers of ``run(seed=seed)``."""
        generator = torch.Generator().manual_seed(int(seed))
        reference_noise(generator, *self.structure_noise_shape)
        return generator

    @torch.no_grad()
    def upsample(self, slat: SparseTensor) -> torch.Tensor:
        """The shape decoder's predicted voxels 16x finer than ``slat`` (``[N', 4]`` int32)."""
        decoder = self.model(SHAPE_DECODER)
        with self.use(decoder):
            return decoder.upsample(slat, upsample_times=4)

    # ------------------------------------------------------------------ stage 4: decode
    @torch.no_grad()
    def decode_shapes(self, slat: SparseTensor, resolution: int) -> List[Any]:
        """Shape latent -> one raw mesh per batch item (on the CPU)."""
        decoder = self.model(SHAPE_DECODER)
        with self.use(decoder):
            meshes = decoder.decode(slat.to(self.device), int(resolution))
        return [m.cpu() for m in meshes]

    def decode_shape(self, slat: SparseTensor, resolution: int) -> Any:
        """Shape latent of one sample -> raw mesh (model space, Z-up), on the CPU."""
        meshes = self.decode_shapes(slat, resolution)
        if len(meshes) != 1:
            raise ValueError(f"decode_shape decodes one sample, the latent holds {len(meshes)}; use decode_shapes")
        return meshes[0]

    # ------------------------------------------------------------------ stage 5: texture
    @torch.no_grad()
    def sample_tex_slat(
        self,
        slat: SparseTensor,
        cond: Mapping[str, torch.Tensor],
        pipeline_type: str = "1024_cascade",
        *,
        back_cond: Optional[Mapping[str, torch.Tensor]] = None,
        back_mode: str = "stochastic",
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        params: ParamsArg = None,
        callback: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ) -> SparseTensor:
        """Texture latent on the shape latent's coords (the reference's ``sample_tex_slat``).

        Args:
            slat: de-normalised shape latent of the last shape stage (``sample_shape_slat``).
            cond: DINOv3 condition at the texture flow's size (``PipelineType.texture_stage``: 512 for
                ``512``, else 1024).
            back_cond: the back view's DINOv3 condition at the same size, a second image condition
                (``knowledge.MultiViewCondition``, ``back_mode``); None: front only (the reference).
            generator / seed / params / callback / cancel: as :meth:`sample_shape_slat`
                (params: ``tex_slat_sampler`` overrides).
        Returns:
            de-normalised texture latent ``[N, 32]`` on ``slat``'s coords (device).
        """
        plan = pipeline_type_plan(pipeline_type)
        flow = self.model(plan.texture_flow)
        if self.tex_mean is None:
            raise KeyError(f"{self.config.folder}/pipeline.json has no 'tex_slat_normalization' (texture stage)")
        gen = self._generator(generator, seed)
        sampler = FlowEulerGuidanceIntervalSampler(self.sampler_params(TEX_STAGE, params))
        coords = slat.coords.to(self.device)
        mean, std = self.slat_mean.to(self.device), self.slat_std.to(self.device)
        shape_feats = (slat.feats.to(self.device).float() - mean) / std
        noise = reference_noise(gen, coords.shape[0], flow.in_channels - shape_feats.shape[1], device=self.device)
        x = SparseTensor(noise, coords, slat.spatial_shape)
        B = cond["cond"].shape[0]
        if x.batch_size != B:
            raise ValueError(f"the shape latent holds {x.batch_size} batch items, the condition {B}")

        def fn(xt, t, cc, **kw):  # the CFG pair stacks x twice: the shape latent follows it
            reps = xt.feats.shape[0] // shape_feats.shape[0]
            return flow(xt, t, cc, concat_cond=shape_feats if reps == 1 else shape_feats.repeat(reps, 1), **kw)

        c, n, neg_zero = self._cond_pair(cond)
        if back_cond is not None:
            view = MultiViewCondition([c, back_cond["cond"].to(self.device).expand(c.shape[0], -1, -1)], back_mode)
            model_fn, batched, c = multi_view_model_fn(fn), None, view
        else:
            model_fn, batched = fn, sparse_cfg_batch(fn, neg_is_zero=neg_zero)
        with self.use(flow), self._attention_plan_builds(sampler.params, B, self._progress(callback, TEX_STAGE)) \
                as progress:
            out = sampler.sample(model_fn, x, c, n, batched_model_fn=batched, callback=progress, cancel_check=cancel)
        del x, noise
        feats = out.feats * self.tex_std.to(self.device) + self.tex_mean.to(self.device)
        return SparseTensor(feats, coords, slat.spatial_shape, batch_size=B)

    @torch.no_grad()
    def decode_textured(self, slat: SparseTensor, tex_slat: SparseTensor, resolution: int) -> List[Tuple[Any, Any]]:
        """Shape + texture latents -> ``[(raw mesh, PBRVoxels)]`` per batch item (CPU): the shape
        decoder's head and subdivisions, then the texture decoder guided by those subdivisions
        (``* 0.5 + 0.5``); the voxels are the mesh's own (grid ``resolution``)."""
        from .mesh.texture import PBRVoxels

        shape_dec, tex_dec = self.model(SHAPE_DECODER), self.model(TEX_DECODER)
        with self.use(shape_dec):
            head, subs = shape_dec(slat.to(self.device), return_subs=True)
            meshes = shape_dec.to_meshes(head, int(resolution))
        del head
        with self.use(tex_dec):
            pbr = tex_dec.decode(tex_slat.to(self.device), subs)
        del subs
        out = []
        for mesh, rows in zip(meshes, pbr.layout):
            voxels = PBRVoxels(pbr.coords[rows, 1:].cpu(), pbr.feats[rows].float().cpu(), int(resolution))
            out.append((mesh.cpu(), voxels))
        return out

    # ------------------------------------------------------------------ all stages
    @torch.no_grad()
    def run(
        self,
        image: Any,
        mask: Any = None,
        pipeline_type: Optional[str] = None,
        seed: int = 0,
        knowledge: Any = None,
        *,
        preprocess: bool = True,
        ss_params: ParamsArg = None,
        shape_params: ParamsArg = None,
        max_num_tokens: int = MAX_NUM_TOKENS,
        callback: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
        texture: bool = False,
        tex_params: ParamsArg = None,
        back_image: Any = None,
    ) -> GeometryResult:
        """Image -> mesh. ``image``: PIL or float tensor ``[H, W, 3|4]``; preprocessed (foreground
        crop on black, needs alpha or ``mask``) unless ``preprocess=False``.

        ``texture``: also sample and decode the texture (``GeometryResult.texture``); ``back_image``
        (preprocessed like ``image``) then becomes the texture flow's second image condition."""
        pipeline_type = pipeline_type_plan(pipeline_type or self.default_pipeline_type).name
        self.check_knowledge(knowledge, pipeline_type)
        timer = StageTimer(self.device)
        with timer("preprocess"):
            img = self.preprocess(image, mask) if preprocess else image
        gen = torch.Generator().manual_seed(int(seed))
        with timer("cond"):
            conds = {size: self.get_cond(img, size) for size in cond_resolutions(pipeline_type)}
            tex_size = int(pipeline_type_plan(pipeline_type).texture_stage)
            back_cond = None
            if texture and back_image is not None:
                back = self.preprocess(back_image) if preprocess else back_image
                back_cond = self.get_cond(back, tex_size)
        with timer(SS_STAGE):
            coords = self.sample_sparse_structure(
                conds[512], knowledge, resolution=ss_resolution(pipeline_type), generator=gen,
                params=ss_params, callback=callback, cancel=cancel)
        with timer("shape_slat"):
            slat, res = self.sample_geometry(
                coords, conds, knowledge, pipeline_type, generator=gen, params=shape_params,
                max_num_tokens=max_num_tokens, callback=callback, cancel=cancel)
        tex_slat = voxels = None
        if texture:
            with timer(TEX_STAGE):
                tex_slat = self.sample_tex_slat(slat, conds[tex_size], pipeline_type, back_cond=back_cond,
                                                generator=gen, params=tex_params, callback=callback, cancel=cancel)
        del conds
        with timer("decode"):
            if texture:
                [(mesh, voxels)] = self.decode_textured(slat, tex_slat, res)
            else:
                mesh = self.decode_shape(slat, res)
        mesh.metadata.update({"seed": int(seed), "pipeline_type": pipeline_type, "resolution": res})
        return GeometryResult(
            mesh=mesh, coords=coords, slat=slat.cpu(), resolution=res, pipeline_type=pipeline_type,
            seed=int(seed), timings=timer.timings, peak_vram=timer.peak_vram,
            num_tokens={SS_STAGE: int(coords.shape[0]), **self.last_num_tokens},
            knowledge=knowledge_info(knowledge), texture=voxels,
            tex_slat=tex_slat.cpu() if tex_slat is not None else None,
        )
