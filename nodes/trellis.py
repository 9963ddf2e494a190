"""TRELLIS.2 side: load the geometry networks (+ Know3D checkpoint), condition on the front image,
sample the sparse structure and the geometry. Every network runs under ComfyUI's model management.
The algorithms live in know3d_core.geometry_pipeline; these nodes call its stages one by one."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import _host
from ._common import CATEGORY, KNOW3D_CONDITION, KNOW3D_KNOWLEDGE, KNOW3D_MODEL, KNOW3D_STRUCTURE, SEED_MAX
from ._io import IO
from ..know3d_core import plan
from ..know3d_core.conditioning.dinov3 import prepare_pixels
from ..know3d_core.conditioning.preprocess import pil_to_tensor, preprocess_image
from ..know3d_core.mesh import z_up_to_y_up
from ..know3d_core.sampling.flow_euler import OFFICIAL_SAMPLER_PARAMS, Cancelled, SamplerParams
from ..know3d_core.trellis2.sparse_structure_decoder import coarsen_coords

CAT = f"{CATEGORY}/trellis2"
DTYPES = ("auto",) + plan.DTYPE_NAMES
FROM_FOLDER = "(from the TRELLIS.2 folder)"
NONE = "none"

# Where each file comes from (named in missing-file errors).
SOURCES = {
    "trellis2": f"Hugging Face {plan.TRELLIS_REPO} (the whole folder: pipeline.json + ckpts/) into models/trellis2/, "
                f"or {plan.comfy_source('flows')}",
    "diffusion_models": plan.comfy_source("flows"),
    "vae": plan.comfy_source("vae"),
    "clip_vision": f"Hugging Face {plan.DINOV3_REPO} (gated) or {plan.comfy_source('dinov3')}",
    "know3d": "the Know3D release (a know3d_*.safetensors checkpoint)",
}


def _pipeline_module():
    from ..know3d_core import geometry_pipeline as pipeline

    return pipeline


def _start_triton(device: torch.device) -> None:
    """Triton's own start (``sparse.triton_start``) on the kernel warm-up thread, where it runs (CUDA)."""
    from ..know3d_core.sparse.triton_start import start_triton_runtime

    start_triton_runtime(device)


def knowledge_info(knowledge) -> Optional[dict]:
    """What the mesh records about the knowledge it was built with (the CLI's record, same function)."""
    return _pipeline_module().knowledge_info(knowledge)


# ------------------------------------------------------------------------------ shared helpers
def one_image(image: torch.Tensor, name: str) -> torch.Tensor:
    """A ComfyUI IMAGE batch of exactly one image -> ``[H, W, C]``; clear errors otherwise."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"Know3D: {name} must be an IMAGE [B, H, W, C], got {shape}")
    if image.shape[0] != 1:
        raise ValueError(f"Know3D: {name} holds {image.shape[0]} images; Know3D processes one image at a time "
                         "(pick one with core 'Image From Batch')")
    if image.shape[-1] not in (3, 4):
        raise ValueError(f"Know3D: {name} has {image.shape[-1]} channels; only RGB (3) or RGBA (4) images are supported")
    return image[0]


def _one_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if mask.dim() == 3:
        if mask.shape[0] != 1:
            raise ValueError(f"Know3D: the mask holds {mask.shape[0]} masks; give one")
        mask = mask[0]
    if mask.dim() != 2:
        raise ValueError(f"Know3D: a MASK must be [H, W] or [1, H, W], got {tuple(mask.shape)}")
    return mask.to(torch.float32)


def preprocess_front(image: torch.Tensor, mask: Optional[torch.Tensor], assume_foreground: bool = False) -> torch.Tensor:
    """TRELLIS.2 preprocessing (crop to the object, centre, premultiply on black) -> ``[S, S, 3]``."""
    return pil_to_tensor(preprocess_image(image.cpu(), _one_mask(mask), assume_foreground=assume_foreground))


class _ComfyDinoV3:
    """ComfyUI's CLIP_VISION DINOv3 with the interface of our DinoV3FeatureExtractor."""

    def __init__(self, clip_vision):
        self.clip_vision = clip_vision

    def __call__(self, images, image_size: int) -> torch.Tensor:
        mm = _host._model_management()
        mm.load_model_gpu(self.clip_vision.patcher)
        device = self.clip_vision.patcher.load_device
        pixels = prepare_pixels(images, int(image_size)).to(device)
        tokens = self.clip_vision.model(pixels, skip_norm_elementwise=True)[0]
        return tokens.float()


def clip_vision_extractor(clip_vision):
    if not hasattr(clip_vision, "patcher") or not hasattr(clip_vision, "model"):
        raise ValueError("Know3D: clip_vision must come from core 'Load CLIP Vision' with a DINOv3 file")
    return _ComfyDinoV3(clip_vision)


def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        dev = _host.torch_device()
        name = plan.auto_dtype_name(dev.type, dev.type == "cuda" and torch.cuda.is_bf16_supported())
    return getattr(torch, plan.dtype_name(name))


def _decoder_dtype() -> torch.dtype:
    """The decoders' stored fp16 on a GPU; fp32 on the CPU (half convolutions are slow there)."""
    return torch.float16 if _host.torch_device().type == "cuda" else torch.float32


def _progress(total_steps: int):
    bar = _host.Progress(total_steps)

    def callback(stage, step, total):
        bar.update(1)

    return callback


def _run_stage(fn, *args, **kwargs):
    """Run a pipeline stage; a cancel becomes ComfyUI's interrupt."""
    try:
        return fn(*args, **kwargs)
    except Cancelled:
        _host.check_interrupted()
        raise


# ------------------------------------------------------------------------------ the model
@dataclass
class Know3DModel:
    """KNOW3D_MODEL: the geometry pipeline plus each network under ComfyUI's model management.

    Shared read-only by every node that receives it; nodes never change its weights.
    """
    pipeline: Any
    managed: dict
    sources: dict = field(default_factory=dict)

    @property
    def know3d_spec(self):
        return getattr(self.pipeline, "know3d_spec", None)

    @property
    def dinov3_name(self) -> str:
        return os.path.basename(self.sources.get("dinov3", "dinov3"))

    def load(self, *keys: str, working_bytes: int = 0) -> None:
        """Load these networks together, with ``working_bytes`` kept free for the stage that runs them
        (``plan.flow_working_bytes`` ...): the host evicts other models (a Qwen MMDiT) for it."""
        _host.load_models((self.managed.get(k) for k in keys), memory_required=working_bytes)

    def dinov3(self):
        extractor = getattr(self.pipeline, "image_cond_model", None)
        if extractor is None:
            raise ValueError("Know3D: this model has no DINOv3; choose one in Load Know3D Model or connect clip_vision")
        self.load("dinov3")
        return extractor


def _wrap_pipeline(pipeline, sources: dict) -> Know3DModel:
    """Put the pipeline's networks under model management; the pipeline runs on the compute device."""
    managed = {k: _host.ManagedModel(m, k) for k, m in pipeline.models.items()}
    extractor = getattr(pipeline, "image_cond_model", None)
    if extractor is not None:
        managed["dinov3"] = _host.ManagedModel(extractor.model, "dinov3")
    pipeline.device = _host.torch_device()
    pipeline.offload = False
    return Know3DModel(pipeline=pipeline, managed=managed, sources=sources)


class Know3DLoadModel(IO.ComfyNode):
    @classmethod
    def define_schema(cls):
        return IO.Schema(
            node_id="Know3DLoadModel",
            display_name="Load Know3D Model",
            category=CAT,
            description=(
                "Load TRELLIS.2's geometry networks and, optionally, a Know3D checkpoint (the knowledge "
                "branch and backbone LoRA, merged at load). Takes the official folder (pipeline.json + "
                "ckpts/ in models/trellis2) or the single files ComfyUI users already have for core "
                "TRELLIS.2: the Comfy-Org diffusion file (models/diffusion_models), the shape VAE "
                "(models/vae) and DINOv3 (models/clip_vision)."
            ),
            inputs=[
                IO.Combo.Input("trellis2", options=_host.trellis2_folders() + _host.filename_list("diffusion_models"),
                               tooltip="An official TRELLIS.2 folder in models/trellis2 (ends with /) or Comfy-Org's TRELLIS.2 diffusion file in models/diffusion_models."),
                IO.Combo.Input("shape_vae", options=[FROM_FOLDER] + _host.filename_list("vae"),
                               tooltip="With a single diffusion file: Comfy-Org's TRELLIS.2 shape VAE in models/vae. Ignored for a folder."),
                IO.Combo.Input("dinov3", options=[FROM_FOLDER] + _host.filename_list("clip_vision"),
                               tooltip="DINOv3 ViT-L/16 in models/clip_vision, or the dinov3-vitl16-pretrain-lvd1689m folder next to the TRELLIS.2 folder."),
                IO.Combo.Input("know3d_checkpoint", options=[NONE] + _host.filename_list("know3d"),
                               tooltip="A Know3D checkpoint in models/know3d; 'none' = plain TRELLIS.2 (multi-view and baseline graphs)."),
                IO.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="Weights precision of the flows: auto = bfloat16 on a GPU that has it, else float32."),
                IO.Combo.Input("texture", options=[NONE, FROM_FOLDER] + _host.filename_list("vae"), default=NONE, optional=True,
                               tooltip="Also load the texture stage (for Know3D Texture): 'none' = geometry only; from the TRELLIS.2 folder "
                                       "(its texture flows and decoder); or, with a single diffusion file, Comfy-Org's TRELLIS.2 texture VAE in models/vae."),
            ],
            outputs=[KNOW3D_MODEL.Output("know3d_model", tooltip="TRELLIS.2 (+ Know3D) for Image Condition, Sparse Structure, Geometry and Texture.")],
        )

    @classmethod
    def execute(cls, trellis2, shape_vae, dinov3, know3d_checkpoint, dtype, texture=NONE) -> IO.NodeOutput:
        pipe_mod = _pipeline_module()
        dt = _dtype(dtype)
        know3d = None if know3d_checkpoint == NONE else _host.full_path("know3d", know3d_checkpoint, SOURCES["know3d"])
        dino = None if dinov3 == FROM_FOLDER else _host.full_path("clip_vision", dinov3, SOURCES["clip_vision"])
        sources = {"know3d": know3d, "dinov3": dino or "dinov3 (next to the TRELLIS.2 folder)"}
        _start_triton(_host.torch_device())  # the stages run there: Triton's start overlaps the reading
        with _host.stage("load TRELLIS.2", torch.device("cpu")):
            if trellis2.endswith("/"):
                folder = _host.full_path("trellis2", trellis2, SOURCES["trellis2"])
                sources["trellis2"] = folder
                if texture not in (NONE, FROM_FOLDER):
                    raise ValueError(f"Know3D: {trellis2} is a TRELLIS.2 folder: its texture networks are in it; "
                                     f"choose texture '{FROM_FOLDER}' (a texture VAE file is for a single diffusion file)")
                pipeline = pipe_mod.Trellis2GeometryPipeline.from_pretrained(
                    folder, device="cpu", dtype=dt, know3d=know3d, dinov3=dino, decoder_dtype=_decoder_dtype(),
                    texture=texture == FROM_FOLDER)
            else:
                flow = _host.full_path("diffusion_models", trellis2, SOURCES["diffusion_models"])
                if shape_vae == FROM_FOLDER:
                    raise ValueError(
                        f"Know3D: {trellis2} is a single diffusion file: also choose the TRELLIS.2 shape VAE "
                        f"(models/vae; from {SOURCES['vae']})")
                if dino is None:
                    raise ValueError(f"Know3D: with a single diffusion file choose DINOv3 in models/clip_vision "
                                     f"(from {SOURCES['clip_vision']})")
                vae = _host.full_path("vae", shape_vae, SOURCES["vae"])
                if texture == FROM_FOLDER:
                    raise ValueError(f"Know3D: {trellis2} is a single diffusion file: for the texture choose Comfy-Org's "
                                     f"TRELLIS.2 texture VAE (models/vae; from {plan.comfy_source('texture_vae')})")
                tex_vae = None if texture == NONE else _host.full_path("vae", texture, plan.comfy_source("texture_vae"))
                sources.update(trellis2=flow, shape_vae=vae, texture_vae=tex_vae)
                pipeline = pipe_mod.Trellis2GeometryPipeline.from_comfy_files(
                    flow, vae, device="cpu", dtype=dt, know3d=know3d, dinov3=dino, decoder_dtype=_decoder_dtype(),
                    texture_vae_file=tex_vae)
        return IO.NodeOutput(_wrap_pipeline(pipeline, sources))


# ------------------------------------------------------------------------------ condition
# Every size a pipeline type may need (Geometry's type is chosen after the condition is made).
CONDITION_SIZES = tuple(sorted({size for t in plan.PIPELINE_TYPES for size in plan.cond_resolutions(t)}))

@dataclass
class FrontCondition:
    """KNOW3D_CONDITION: the preprocessed front image and its DINOv3 features per resolution."""
    image: torch.Tensor          # [S, S, 3] in [0, 1]
    conds: dict                  # resolution -> {"cond": [1, T, C], "neg_cond": zeros}
    extractor: Any               # what encoded it (for a back image in multi-view mode)
    extractor_name: str


class Know3DImageCondition(IO.ComfyNode):
    @classmethod
    def define_schema(cls):
        return IO.Schema(
            node_id="Know3DImageCondition",
            display_name="Image Condition",
            category=CAT,
            description=(
                "Prepare the front image like TRELLIS.2: crop to the object (mask or alpha), centre on a "
                "square, premultiply on black, then DINOv3 features at 512 and 1024 px. Uses the model's "
                "DINOv3, or ComfyUI's (core Load CLIP Vision) when clip_vision is connected."
            ),
            inputs=[
                KNOW3D_MODEL.Input("know3d_model", tooltip="Load Know3D Model (its DINOv3 encodes the image)."),
                IO.Image.Input("image", tooltip="The front image (RGB or RGBA; alpha marks the object)."),
                IO.Mask.Input("mask", optional=True,
                              tooltip="Object mask, 1 = object (a background-removal node's output; for core Load Image's mask use Invert Mask)."),
                IO.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="ComfyUI's DINOv3 (core Load CLIP Vision) instead of the model's."),
            ],
            outputs=[
                KNOW3D_CONDITION.Output("condition", tooltip="Front-image condition for Sparse Structure and Geometry."),
                IO.Image.Output("front_image", tooltip="The preprocessed (cropped, centred) front image, e.g. for the back-view model."),
            ],
        )

    @classmethod
    def execute(cls, know3d_model, image, mask=None, clip_vision=None) -> IO.NodeOutput:
        front = preprocess_front(one_image(image, "image"), mask)
        if clip_vision is not None:
            extractor, name = clip_vision_extractor(clip_vision), "ComfyUI CLIP_VISION"
        else:
            extractor, name = know3d_model.dinov3(), know3d_model.dinov3_name
        conds = {}
        with _host.stage("DINOv3 conditioning"):
            for res in CONDITION_SIZES:
                _host.check_interrupted()
                feats = extractor(front, image_size=res).to(_host.intermediate_device(), torch.float32)
                conds[res] = {"cond": feats, "neg_cond": torch.zeros_like(feats)}
        return IO.NodeOutput(FrontCondition(front, conds, extractor, name), front.unsqueeze(0).clone())


# ------------------------------------------------------------------------------ stages
@dataclass
class Structure:
    """KNOW3D_STRUCTURE: occupied voxels of the sparse structure at ``resolution``."""
    coords: torch.Tensor         # [N, 4] int32 (b, x, y, z), CPU
    resolution: int
    seed: int
    knowledge: Optional[dict] = None

    def at(self, resolution: int) -> torch.Tensor:
        """Coords on a coarser grid: a coarse voxel is occupied if any fine voxel is (max-pool)."""
        if resolution == self.resolution:
            return self.coords
        if resolution > self.resolution or self.resolution % resolution:
            raise ValueError(f"Know3D Geometry: this type needs a {resolution}^3 structure, but the structure "
                             f"decoder of this model gives {self.resolution}^3; choose 512 or a cascade")
        return coarsen_coords(self.coords, self.resolution // resolution)


def _sampler_inputs(steps, cfg, interval_start, interval_end, rescale, rescale_t):
    return dict(steps=int(steps), guidance_strength=float(cfg), guidance_rescale=float(rescale),
                guidance_interval=(float(interval_start), float(interval_end)), rescale_t=float(rescale_t))


def _sampler_widgets(stage: str) -> list:
    p: SamplerParams = OFFICIAL_SAMPLER_PARAMS[stage]
    return [
        IO.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                     tooltip="Noise seed (explicit generator). Same seed in Sparse Structure and Geometry = the reference's single-seed run."),
        IO.Int.Input("steps", default=p.steps, min=1, max=200, tooltip="Sampling steps."),
        IO.Float.Input("cfg", default=p.guidance_strength, min=0.0, max=30.0, step=0.1,
                       tooltip="Guidance strength (classifier-free guidance)."),
        IO.Float.Input("guidance_interval_start", default=p.guidance_interval[0], min=0.0, max=1.0, step=0.01,
                       tooltip="CFG only while the time t is in [start, end] (t = 1 is pure noise)."),
        IO.Float.Input("guidance_interval_end", default=p.guidance_interval[1], min=0.0, max=1.0, step=0.01,
                       tooltip="End of the CFG interval on t."),
        IO.Float.Input("guidance_rescale", default=p.guidance_rescale, min=0.0, max=1.0, step=0.01,
                       tooltip="CFG rescale (0 = off): pulls the guided prediction's std back to the conditional one."),
        IO.Float.Input("rescale_t", default=p.rescale_t, min=0.1, max=20.0, step=0.1,
                       tooltip="Time-schedule shift (more steps at high noise when > 1)."),
    ]


def _stage_models(knowledge, *keys):
    keys = list(keys)
    if knowledge is not None and knowledge.kind == "multi_view":
        keys.append("dinov3")
    return keys


class Know3DSparseStructure(IO.ComfyNode):
    @classmethod
    def define_schema(cls):
        return IO.Schema(
            node_id="Know3DSparseStructure",
            display_name="Sparse Structure",
            category=CAT,
            description=(
                "TRELLIS.2 stage 1: sample which voxels the object occupies (dense flow on a 16^3 latent, "
                "decoded to a 64^3 grid), conditioned on the front image and, when connected, on Know3D knowledge. "
                "Also gives the occupancy as a core VOXEL (core VoxelToMesh shows it)."
            ),
            inputs=[
                KNOW3D_MODEL.Input("know3d_model", tooltip="Load Know3D Model."),
                KNOW3D_CONDITION.Input("condition", tooltip="Image Condition of the front image."),
                *_sampler_widgets(plan.SS_STAGE),
                KNOW3D_KNOWLEDGE.Input("knowledge", optional=True,
                                      tooltip="Knowledge about the back (any source). Not connected = plain TRELLIS.2."),
            ],
            outputs=[
                KNOW3D_STRUCTURE.Output("structure", tooltip="Occupied voxels for Geometry."),
                IO.Voxel.Output("voxel", tooltip="Occupancy [1, R, R, R] (the structure decoder's grid, 64 for TRELLIS.2; Z-up) for core 3D nodes."),
            ],
        )

    @classmethod
    def execute(cls, know3d_model, condition, seed, steps, cfg, guidance_interval_start, guidance_interval_end,
                guidance_rescale, rescale_t, knowledge=None) -> IO.NodeOutput:
        pipe = know3d_model.pipeline
        pipe.check_knowledge(knowledge)
        params = pipe.sampler_params(plan.SS_STAGE, _sampler_inputs(
            steps, cfg, guidance_interval_start, guidance_interval_end, guidance_rescale, rescale_t))
        grid = pipe.structure_decoder_grid  # Geometry coarsens it to its type's grid
        know3d_model.load(*_stage_models(knowledge, plan.SS_FLOW, plan.SS_DECODER), working_bytes=plan.SS_WORKING_BYTES)
        with _host.stage("sparse structure"):
            coords = _run_stage(
                pipe.sample_sparse_structure, _to_device(condition.conds[512], pipe.device), knowledge,
                resolution=grid, seed=int(seed), params=params, callback=_progress(params.steps),
                cancel=_host.interrupted)
        coords = coords.to("cpu", torch.int32)
        structure = Structure(coords=coords, resolution=grid, seed=int(seed), knowledge=knowledge_info(knowledge))
        return IO.NodeOutput(structure, _host.make_voxel(occupancy(coords, grid), grid))


def occupancy(coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """Dense ``[B, R, R, R]`` float occupancy of ``[N, 4]`` coords."""
    batch = int(coords[:, 0].max()) + 1 if coords.numel() else 1
    grid = torch.zeros(batch, resolution, resolution, resolution)
    c = coords.long()
    grid[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = 1.0
    return grid


def _to_device(cond: dict, device) -> dict:
    return {k: v.to(device) for k, v in cond.items()}


def texture_stage_latent(slat, resolution: int, mean: torch.Tensor, std: torch.Tensor) -> dict:
    """Our shape latent in the LATENT form core's TRELLIS.2 texture stage / shape VAE decode read:
    normalised feats ``[1, 32, N, 1]``, coords ``[N, 4]`` on the ``resolution / 16`` grid, Z-up."""
    feats = ((slat.feats.float().cpu() - mean) / std)
    coords = slat.coords.to("cpu", torch.int32)
    return {"samples": feats.t().unsqueeze(0).unsqueeze(-1).contiguous(), "coords": coords,
            "coord_counts": torch.tensor([coords.shape[0]], dtype=torch.int64),
            "coord_resolution": int(resolution) // 16, "type": "trellis2", "model_frame": "z_up"}


class Know3DGeometry(IO.ComfyNode):
    @classmethod
    def define_schema(cls):
        return IO.Schema(
            node_id="Know3DGeometry",
            display_name="Geometry",
            category=CAT,
            description=(
                "TRELLIS.2 stage 2: sample the shape latent on the structure's voxels (512, 1024, or a "
                "cascade 512 -> 1024 / 1536), conditioned on the front image and Know3D knowledge, then "
                "decode it to a triangle mesh (O-Voxel). Outputs a core MESH (Y-up) and the shape latent "
                "in the form core's TRELLIS.2 texture stage reads."
            ),
            inputs=[
                KNOW3D_MODEL.Input("know3d_model", tooltip="Load Know3D Model."),
                KNOW3D_STRUCTURE.Input("structure", tooltip="From Sparse Structure."),
                KNOW3D_CONDITION.Input("condition", tooltip="Image Condition of the front image."),
                IO.Combo.Input("resolution", options=list(plan.PIPELINE_TYPES), default=plan.DEFAULT_PIPELINE_TYPE,
                               tooltip="512 | 1024 | 1024 cascade (512 then 1024, the default) | 1536 cascade."),
                *_sampler_widgets("shape_slat"),
                IO.Int.Input("max_num_tokens", default=plan.MAX_NUM_TOKENS, min=1024, max=1 << 20, step=1024,
                             tooltip="Cascades lower the final resolution until the voxel count fits this budget."),
                KNOW3D_KNOWLEDGE.Input("knowledge", optional=True,
                                      tooltip="Knowledge about the back (any source). Not connected = plain TRELLIS.2."),
            ],
            outputs=[
                IO.Mesh.Output("mesh", tooltip="The mesh (core MESH, Y-up): Save Mesh, core Save 3D Model, Render Normals."),
                IO.Latent.Output("shape_latent", tooltip="Shape latent for core Trellis2TextureStage / VaeDecodeShapeTrellis (texturing with core nodes)."),
            ],
        )

    @classmethod
    def execute(cls, know3d_model, structure, condition, resolution, seed, steps, cfg, guidance_interval_start,
                guidance_interval_end, guidance_rescale, rescale_t, max_num_tokens, knowledge=None) -> IO.NodeOutput:
        pipe = know3d_model.pipeline
        ptype = plan.pipeline_type(str(resolution)).name
        pipe.check_knowledge(knowledge, ptype)
        params = pipe.sampler_params("shape_slat", _sampler_inputs(
            steps, cfg, guidance_interval_start, guidance_interval_end, guidance_rescale, rescale_t))
        coords = structure.at(plan.ss_resolution(ptype))
        conds = {size: _to_device(c, pipe.device) for size, c in condition.conds.items()}
        total = sum(n for stage, n in plan.progress_plan(ptype, 0, params.steps) if stage != plan.SS_STAGE)
        tokens = plan.geometry_token_bound(ptype, coords.shape[0], int(max_num_tokens))
        know3d_model.load(*_stage_models(knowledge, *plan.shape_flows(ptype), plan.SHAPE_DECODER),
                          working_bytes=plan.flow_working_bytes(tokens))
        with _host.stage(f"geometry {ptype}"):
            slat, grid = _run_stage(
                pipe.sample_geometry, coords, conds, knowledge, ptype, generator=pipe.shape_generator(seed),
                params=params, max_num_tokens=int(max_num_tokens), callback=_progress(total),
                cancel=_host.interrupted)
        with _host.stage("shape decode"):
            _host.check_interrupted()
            know3d_model.load(plan.SHAPE_DECODER, working_bytes=plan.decoder_working_bytes(slat.feats.shape[0]))
            mesh = pipe.decode_shape(slat, grid)
        mean, std = pipe.config.normalization("shape_slat_normalization")
        latent = texture_stage_latent(slat, grid, mean, std)
        meta = {"seed": int(seed), "structure_seed": structure.seed, "pipeline_type": ptype, "resolution": int(grid),
                "steps": int(steps), "cfg": float(cfg), "knowledge": knowledge_info(knowledge),
                "know3d_checkpoint": os.path.basename(know3d_model.sources.get("know3d") or "") or None}
        v = torch.from_numpy(z_up_to_y_up(mesh.vertices.detach().cpu().double().numpy())).float()
        return IO.NodeOutput(_host.make_mesh([v], [mesh.faces.cpu()], meta), latent)


NODES = (Know3DLoadModel, Know3DImageCondition, Know3DSparseStructure, Know3DGeometry)
