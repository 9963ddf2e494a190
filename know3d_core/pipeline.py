"""The whole Know3D pipeline, headless: front image + back description -> mesh.

    front image --preprocess--> square crop on black
        --back_view--> Qwen-Image-Edit-2511 (+ back-view LoRA) denoises the back view; for the
                       ``hidden`` variant it captures MMDiT hidden states at sigma and, unless a back
                       image is asked for, stops right there (early exit)
        --make_knowledge--> Knowledge of the variant's kind, checked against the Know3D checkpoint
        --geometry--> TRELLIS.2 (structure + shape, knowledge injected) -> mesh

Variants (``VARIANTS``; the paper's ablation): ``hidden`` (MMDiT hidden states, the paper's best),
``latent`` (the denoised back-view latent), ``image`` (DINOv3 features of the decoded back view),
``multiview`` (the decoded back view as a second image condition of plain TRELLIS.2; no Know3D
weights) and ``none`` (plain TRELLIS.2, no back view at all).

Every stage is a method; ``run`` only chains them and records times and peak memory per stage.
With ``offload`` each network sits on the CPU and visits the device only while its stage runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from .geometry_pipeline import GeometryResult, StageTimer, Trellis2GeometryPipeline, knowledge_info
from .knowledge import KnowledgeMismatchError, capture_spec
from .knowledge.kinds import SIGMA_TOLERANCE
from .plan import (DINO_IMAGE, MMDIT_HIDDEN, VAE_LATENT, dtype_name, needs_back_image, needs_know3d, variant_kind,
                   variant_of)
from .sampling import Cancelled

__all__ = [
    "BackViewStage",
    "Know3DResult",
    "Know3DPipeline",
    "load_processor",
]

DEFAULT_BACK_STEPS = 40
DEFAULT_TRUE_CFG = 4.0
DINO_IMAGE_RESOLUTION = 512  # DINOv3 size of the back image for the ``image`` variant (the structure stage's)

ProgressFn = Callable[[str, int, int], None]
CancelFn = Callable[[], bool]


# ----------------------------------------------------------------------------------- results
@dataclass
class BackViewStage:
    """What the back-view stage produced.

    Attributes:
        latents: packed target latents ``[B, N, 64]`` (final, or at the capture step on early exit).
        images: decoded back views (PIL) or None; image_tensor: the same ``[B, H, W, 3]`` in [0, 1].
        mmdit: the captured ``mmdit.MMDiTKnowledge`` (``hidden`` variant) or None.
        resolution: ``(H, W)`` of the back view in pixels.
    """

    variant: str
    description: str
    prompt: str
    seed: int
    steps: int
    latents: torch.Tensor
    resolution: Tuple[int, int]
    exited_early: bool
    images: Optional[list] = None
    image_tensor: Optional[torch.Tensor] = None
    mmdit: Any = None
    model_name: str = ""

    @property
    def image(self):
        """The first decoded back view (PIL) or None."""
        return self.images[0] if self.images else None


@dataclass
class Know3DResult:
    """Output of :meth:`Know3DPipeline.run`.

    Attributes:
        mesh: raw mesh (model space, Z-up) on the CPU; back_image: PIL back view when decoded.
        knowledge: provenance of the knowledge used (``{"kind", "shape", ...}``) or None.
        timings: seconds per stage (``preprocess``, ``back_view``, ``knowledge`` + the geometry
            stages); peak_vram: bytes per stage on CUDA, else empty.
    """

    mesh: Any
    back_image: Any
    knowledge: Optional[Dict[str, Any]]
    variant: str
    geometry: GeometryResult
    timings: Dict[str, float] = field(default_factory=dict)
    peak_vram: Dict[str, int] = field(default_factory=dict)

    @property
    def peak_vram_total(self) -> Optional[int]:
        return max(self.peak_vram.values()) if self.peak_vram else None

    @property
    def texture(self) -> Any:
        """PBR voxels of the texture stage (``mesh.texture.PBRVoxels``) or None (``run(texture=False)``)."""
        return self.geometry.texture


# ----------------------------------------------------------------------------------- loading
def _processor_without_video(folder: str):
    """Qwen2.5-VL processor from tokenizer files + ``preprocessor_config.json`` without the video
    processor (transformers >= 5 builds that one with torchvision, which is not a dependency)."""
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor

    try:  # transformers >= 5
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as ImageProcessor,
        )
    except ImportError:  # transformers 4.x: the numpy/PIL processor has the plain name
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    class ProcessorWithoutVideo(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    return ProcessorWithoutVideo(image_processor=ImageProcessor.from_pretrained(folder),
                                 tokenizer=PreTrainedTokenizerFast.from_pretrained(folder), video_processor=None)


def load_processor(qwen_folder: str):
    """``QWEN/processor`` (or ``tokenizer/``): the mmdit loader, else the same files without a video
    processor (no torchvision needed)."""
    from .mmdit import loading

    d = os.path.join(qwen_folder, "processor")
    try:
        processor = loading.load_processor(qwen_folder)
    except RuntimeError as first:
        try:
            return _processor_without_video(d)
        except Exception as second:  # report both causes
            raise RuntimeError(f"{first}; loading {d} without a video processor also failed: {second}") from second
    if getattr(processor, "image_processor", None) is None:
        # AutoProcessor falls back to a bare tokenizer when the folder lacks processor_config.json;
        # the Edit-Plus prompt needs the image processor too.
        return _processor_without_video(d)
    return processor


# ----------------------------------------------------------------------------------- pipeline
class Know3DPipeline:
    """Know3D end to end over a TRELLIS.2 geometry pipeline and a headless Qwen-Image-Edit back view.

    Args:
        geometry: the TRELLIS.2 side (Know3D branch installed when a checkpoint was loaded).
        backview: ``mmdit.backview.QwenEditBackView`` or None (then only ``none`` runs).
        offload: Qwen components visit the geometry's device only while used.
        memory_plan: a ``plan.MemoryPlan`` (small cards): fp8 weight storage and block offloading of
            the Qwen networks (``mmdit.memory``); its ``geometry_offload`` replaces ``offload``.
        pin_host: offloaded networks (Qwen and TRELLIS.2) visit a CUDA device from pinned host copies
            (``device_visits``): faster visits, for page-locked host RAM (the offloaded weights) and
            a one-time cost to pin them (~40 s for 28 GB on an H200).
    """

    def __init__(self, geometry: Trellis2GeometryPipeline, backview: Any = None, offload: bool = False,
                 memory_plan: Any = None, pin_host: bool = False):
        self.geometry = geometry
        self.backview = backview
        self.memory_plan = memory_plan
        self.offload = bool(memory_plan.geometry_offload if memory_plan is not None else offload)
        self.pin_host = bool(pin_host)
        if self.pin_host:
            geometry.pin_host_copies()
        self.multi_view_mode = "stochastic"
        self.placement: Dict[str, str] = {}  # Qwen network -> how it is stored and placed (the plan's)
        if backview is not None and memory_plan is not None:
            from .mmdit.memory import apply_memory_plan

            self.placement = apply_memory_plan(backview, memory_plan, self.device, backview.dtype, self.pin_host)
        elif backview is not None:
            backview.place(self.device, offload=self.offload, pin_host=self.pin_host)

    @classmethod
    def from_pretrained(
        cls,
        trellis2: Union[str, os.PathLike, Tuple[str, str]],
        qwen: Union[None, str, os.PathLike] = None,
        know3d: Union[None, str, os.PathLike] = None,
        backview_loras: Sequence[Union[str, Tuple[str, float]]] = (),
        dinov3: Union[None, str, os.PathLike] = None,
        device: Union[str, torch.device] = "cuda",
        dtype: Union[None, str, torch.dtype] = torch.bfloat16,
        offload: bool = False,
        pipeline_types: Optional[Sequence[str]] = None,
        vae_image_area: Optional[int] = None,
        memory_plan: Any = None,
        qwen_files: Optional[Dict[str, str]] = None,
        texture: bool = False,
        pin_host: bool = False,
    ) -> "Know3DPipeline":
        """Load everything from local files (nothing is downloaded).

        Args:
            trellis2: official TRELLIS.2 folder (pipeline.json + ckpts/), or the pair
                ``(diffusion_file, shape_vae_file)`` of ComfyUI's single files (Comfy-Org/TRELLIS.2),
                ``+ texture_vae_file`` for the texture stage.
            qwen: diffusers-format Qwen-Image-Edit-2511 folder (transformer/, vae/, text_encoder/,
                processor/, scheduler/); None: only the ``none`` variant can run.
            know3d: Know3D checkpoint (needed by ``hidden``, ``latent``, ``image``).
            backview_loras: back-view LoRA files (or ``(path, strength)``), merged at load.
            dtype: compute dtype of the flows and the Qwen networks (None: the checkpoints').
            vae_image_area: pixel area of the VAE copy of the front image (default 1024^2).
            memory_plan: ``plan.MemoryPlan`` for small cards (``plan.vram_plan(GiB)``); it decides ``offload``.
            qwen_files: ``{"transformer" | "text_encoder": path}`` of ComfyUI's Qwen single files (bf16 or
                fp8) read instead of those weights of ``qwen`` (which still gives the configs).
            texture: also load the texture flow and decoder (official folders only; ``run(texture=True)``).
            pin_host: offloaded networks visit from pinned host copies (see the class).
        """
        if memory_plan is not None:
            offload = memory_plan.geometry_offload
        load = Trellis2GeometryPipeline.from_pretrained
        sources = (trellis2,)
        if isinstance(trellis2, (tuple, list)):
            load, sources = Trellis2GeometryPipeline.from_comfy_files, tuple(trellis2)
        extra = {"texture": True} if texture else {}
        if len(sources) > 1:  # ComfyUI files: (diffusion, shape VAE[, texture VAE])
            if texture and len(sources) < 3:
                raise ValueError("the texture stage from ComfyUI's files needs the texture VAE too: pass "
                                 "trellis2=(diffusion_file, shape_vae_file, texture_vae_file)")
            extra = {"texture_vae_file": sources[2]} if len(sources) > 2 else {}
            sources = sources[:2]
        geometry = load(*sources, device=device, dtype=dtype, know3d=know3d, offload=offload, dinov3=dinov3,
                        pipeline_types=pipeline_types, **extra)
        backview = None
        if qwen is not None:
            backview = cls._load_backview(os.fspath(qwen), dtype, torch.device("cpu") if offload else device,
                                          backview_loras, vae_image_area, qwen_files,
                                          memory_plan.mmdit_storage if memory_plan is not None else None)
        return cls(geometry, backview, offload=offload, memory_plan=memory_plan, pin_host=pin_host)

    @staticmethod
    def _load_backview(folder: str, dtype, device, loras, vae_image_area, files=None, storage=None):
        from .mmdit.backview import QwenEditBackView
        from .mmdit.loading import load_qwen_edit

        qdtype = getattr(torch, dtype_name(dtype)) if dtype is not None else torch.bfloat16
        components = load_qwen_edit(folder, dtype=qdtype, device=device,
                                    components=("transformer", "vae", "text_encoder"), files=files,
                                    storage=storage)  # fp8 as read: the LoRA then merges into fp8
        components.processor = load_processor(folder)
        backview = QwenEditBackView(components)
        backview.compute_dtype = qdtype  # the MMDiT's parameters may be stored in fp8 (a memory plan)
        if vae_image_area is not None:
            backview.vae_image_area = int(vae_image_area)
        for item in loras:
            path, strength = (item, 1.0) if isinstance(item, (str, os.PathLike)) else item
            backview.load_lora(os.fspath(path), float(strength))
        return backview

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.geometry.device

    @property
    def know3d_spec(self):
        return self.geometry.know3d_spec

    def capture_spec(self, variant: str, sigma: Optional[float] = None, layers: Optional[Sequence[int]] = None):
        """The MMDiT capture of a variant (``hidden`` only, else None): explicit arguments >
        the Know3D checkpoint's ``mmdit_layers`` / ``sigma`` > defaults (``mmdit.capture``)."""
        if variant_kind(variant) != MMDIT_HIDDEN:
            return None
        return capture_spec(self.know3d_spec, layers=layers, sigma=sigma)

    def check_variant(self, variant: str, pipeline_type: Optional[str] = None,
                      sigma: Optional[float] = None, layers: Optional[Sequence[int]] = None) -> None:
        """Fail before any work when a variant cannot run with what is loaded: unknown variant, no
        back-view model, no Know3D checkpoint for an injected kind, a checkpoint trained for another
        kind (``KnowledgeMismatchError`` naming both), a capture other than the checkpoint's, or flows
        of ``pipeline_type`` without a Know3D branch (``geometry.require_branch``)."""
        kind = variant_kind(variant)
        if kind is not None and self.backview is None:
            raise ValueError(f"variant {variant!r} needs the Qwen-Image-Edit back-view model: load with qwen=<folder>")
        if not needs_know3d(variant):
            return
        if self.know3d_spec is not None:
            self._check_checkpoint(variant, kind, sigma, layers)
        self.geometry.require_branch(kind, pipeline_type)  # also: no checkpoint loaded at all

    def _check_checkpoint(self, variant: str, kind: str, sigma: Optional[float],
                          layers: Optional[Sequence[int]]) -> None:
        """``KnowledgeMismatchError`` unless the loaded Know3D checkpoint was trained for the
        variant's kind and (``hidden``) for the capture that will run."""
        spec = self.know3d_spec
        if spec.knowledge_kind != kind:
            raise KnowledgeMismatchError(
                f"the loaded Know3D checkpoint was trained for {spec.describe()} knowledge, "
                f"variant {variant!r} produces {kind} knowledge; load a checkpoint for {kind} or use "
                f"variant {variant_of(spec.knowledge_kind)!r}"
            )
        if kind == MMDIT_HIDDEN:
            cap = self.capture_spec(variant, sigma, layers)
            layers_used = list(cap.resolve_layers(self.backview.sampler.num_blocks))
            if spec.mmdit_layers is not None and layers_used != list(spec.mmdit_layers):
                raise KnowledgeMismatchError(
                    f"the loaded Know3D checkpoint was trained on MMDiT layers {spec.mmdit_layers}, "
                    f"the capture asks for layers {layers_used}"
                )
            if spec.sigma is not None and abs(cap.sigma - spec.sigma) > SIGMA_TOLERANCE:
                raise KnowledgeMismatchError(
                    f"the loaded Know3D checkpoint was trained on hidden states at sigma {spec.sigma}, "
                    f"the capture asks for sigma {cap.sigma}"
                )

    # ------------------------------------------------------------------ stage 1: back view
    def preprocess(self, image: Any, mask: Any = None, **kwargs) -> Any:
        """Front image -> square crop on black (PIL RGB), TRELLIS.2's preprocessing."""
        return self.geometry.preprocess(image, mask, **kwargs)

    @torch.no_grad()
    def back_view(
        self,
        front: Any,
        description: str,
        variant: str = "hidden",
        *,
        seed: int = 0,
        steps: int = DEFAULT_BACK_STEPS,
        sigma: Optional[float] = None,
        layers: Optional[Sequence[int]] = None,
        decode: Optional[bool] = None,
        size: Optional[Tuple[int, int]] = None,
        true_cfg_scale: float = DEFAULT_TRUE_CFG,
        callback: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ) -> BackViewStage:
        """Denoise the back view of ``front`` (PIL, preprocessed) for ``description``.

        Args:
            variant: decides what is kept: ``hidden`` captures hidden states at ``sigma`` of
                ``layers`` (defaults: the checkpoint's) and exits early unless ``decode``;
                ``latent`` runs every step; ``image`` / ``multiview`` also decode.
            decode: decode the back image (default: only when the variant needs it).
            size: ``(height, width)`` of the back view (default: the front's aspect at ~1024^2 px).
            callback: ``callback("back_view", step, total)`` after each step; ``total`` is the
                number of steps that run: with an early exit, up to the capture step (the bar ends
                full there), else ``steps``. cancel: polled before the first and after every step
                (raises ``sampling.Cancelled``).
        """
        kind = variant_kind(variant)
        if kind is None:
            raise ValueError("variant 'none' has no back-view stage")
        if self.backview is None:
            raise ValueError("no back-view model loaded: Know3DPipeline.from_pretrained(..., qwen=<folder>)")
        decode = needs_back_image(variant) if decode is None else bool(decode)
        if needs_back_image(variant) and not decode:
            raise ValueError(f"variant {variant!r} needs the decoded back image; do not pass decode=False")
        capture = self.capture_spec(variant, sigma, layers)
        if cancel is not None and cancel():
            raise Cancelled("back view cancelled before it started")

        def on_progress(step, total):  # total: the capture step with an early exit, else ``steps``
            if callback is not None:
                callback("back_view", step, total)

        height, width = size if size is not None else (None, None)
        res = self.backview(
            [front], description, steps=int(steps), true_cfg_scale=true_cfg_scale,
            generator=torch.Generator().manual_seed(int(seed)), height=height, width=width, capture=capture,
            early_exit=capture is not None and not decode, decode=decode, record_trajectory=False,
            progress=on_progress, cancel=cancel)
        return BackViewStage(
            variant=variant, description=description, prompt=self.backview.prompt.build(description),
            seed=int(seed), steps=int(steps), latents=res.latents, resolution=tuple(res.inputs.resolution),
            exited_early=res.sample.exited_early, images=res.images, image_tensor=res.image_tensor,
            mmdit=res.knowledge, model_name=self.backview.c.model_name)

    # ------------------------------------------------------------------ stage 2: knowledge
    @torch.no_grad()
    def make_knowledge(self, stage: Optional[BackViewStage], variant: str,
                       pipeline_type: Optional[str] = None) -> Any:
        """The variant's ``knowledge.Knowledge`` from a back-view stage (None for ``none``),
        validated against the loaded Know3D checkpoint (``KnowledgeMismatchError`` naming both)."""
        from . import knowledge as K

        kind = variant_kind(variant)
        if kind is None:
            return None
        if stage is None:
            raise ValueError(f"variant {variant!r} needs a back-view stage")
        if kind == MMDIT_HIDDEN:
            if stage.mmdit is None:
                raise ValueError("the back-view stage captured no hidden states (it ran without a capture)")
            know = K.from_mmdit_capture(stage.mmdit)
        elif kind == VAE_LATENT:
            if stage.exited_early:
                raise ValueError("the back-view stage exited early; the latent variant needs every step")
            know = K.vae_latent_knowledge(stage.latents, stage.resolution, model=f"{stage.model_name} VAE",
                                          seed=stage.seed, steps=stage.steps)
        else:
            if stage.images is None:
                raise ValueError(f"variant {variant!r} needs the decoded back image (back_view(decode=True))")
            if kind == DINO_IMAGE:
                feats = self.geometry.get_cond(stage.images, DINO_IMAGE_RESOLUTION)["cond"]
                know = K.dino_image_knowledge(feats, DINO_IMAGE_RESOLUTION, seed=stage.seed, steps=stage.steps)
            else:
                know = K.multi_view_knowledge(stage.image_tensor, mode=self.multi_view_mode,
                                              seed=stage.seed, steps=stage.steps)
        self.geometry.check_knowledge(know, pipeline_type)
        return know

    # ------------------------------------------------------------------ stage 3: geometry
    def geometry_stage(self, front: Any, knowledge: Any = None, **kwargs) -> GeometryResult:
        """TRELLIS.2 on the preprocessed front image with the knowledge (see
        ``Trellis2GeometryPipeline.run``; ``preprocess`` is off here)."""
        kwargs.setdefault("preprocess", False)
        return self.geometry.run(front, knowledge=knowledge, **kwargs)

    # ------------------------------------------------------------------ all stages
    @torch.no_grad()
    def run(
        self,
        image: Any,
        description: str = "",
        variant: str = "hidden",
        *,
        mask: Any = None,
        sigma: Optional[float] = None,
        layers: Optional[Sequence[int]] = None,
        seed: int = 0,
        steps: int = DEFAULT_BACK_STEPS,
        pipeline_type: Optional[str] = None,
        decode_back: bool = False,
        back_view_size: Optional[Tuple[int, int]] = None,
        true_cfg_scale: float = DEFAULT_TRUE_CFG,
        trellis_steps: Optional[int] = None,
        ss_params: Any = None,
        shape_params: Any = None,
        preprocess: bool = True,
        callback: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
        texture: bool = False,
        tex_params: Any = None,
        texture_back: bool = True,
    ) -> Know3DResult:
        """Front image (+ mask) and a back description -> mesh.

        Args:
            variant: see ``VARIANTS``. sigma / layers: the capture (``hidden``; default: the checkpoint's).
            steps: back-view steps. trellis_steps: steps of both TRELLIS.2 samplers (default:
                pipeline.json's); ss_params / shape_params: any other sampler overrides (dicts).
            decode_back: also decode the back image for variants that do not need it.
            texture: also run the texture stage (``Know3DResult.texture``); tex_params: its sampler
                overrides. texture_back: a variant with a back view decodes it and gives it to the
                texture flow as a second image condition (the back's colours follow the description).
        """
        pipeline_type = pipeline_type or self.geometry.default_pipeline_type
        self.check_variant(variant, pipeline_type, sigma, layers)
        if trellis_steps is not None:
            ss_params = {**dict(ss_params or {}), "steps": int(trellis_steps)}
            shape_params = {**dict(shape_params or {}), "steps": int(trellis_steps)}
            tex_params = {**dict(tex_params or {}), "steps": int(trellis_steps)}
        back_for_texture = texture and texture_back and variant_kind(variant) is not None
        decode_back = decode_back or back_for_texture
        timer = StageTimer(self.device)
        with timer("preprocess"):
            front = self.preprocess(image, mask) if preprocess else image
        stage = None
        if variant_kind(variant) is not None:
            with timer("back_view"):
                stage = self.back_view(
                    front, description, variant, seed=seed, steps=steps, sigma=sigma, layers=layers,
                    decode=True if decode_back else None, size=back_view_size, true_cfg_scale=true_cfg_scale,
                    callback=callback, cancel=cancel)
        with timer("knowledge"):
            know = self.make_knowledge(stage, variant, pipeline_type)
        tex = {}
        if texture:
            back_image = stage.image_tensor if back_for_texture else None
            tex = {"texture": True, "tex_params": tex_params, "back_image": back_image}
        geo = self.geometry_stage(front, know, pipeline_type=pipeline_type, seed=seed, ss_params=ss_params,
                                  shape_params=shape_params, callback=callback, cancel=cancel, **tex)
        timings = {**timer.timings, **{k: v for k, v in geo.timings.items() if k != "preprocess"}}
        peak = {**timer.peak_vram, **{k: v for k, v in geo.peak_vram.items() if k != "preprocess"}}
        back = stage.image if stage is not None else None
        geo.mesh.metadata.update({"variant": variant, "description": description})
        return Know3DResult(mesh=geo.mesh, back_image=back, knowledge=knowledge_info(know), variant=variant,
                            geometry=geo, timings=timings, peak_vram=peak)


