"""Texture: TRELLIS.2's texture stage on a Know3D shape latent -> a textured core MESH (PBR maps on
UVs, or vertex colours). The stages are the library's (``Trellis2GeometryPipeline.sample_tex_slat`` /
``decode_textured``, ``mesh.texture.bake_reduced`` / ``vertex_rgba``), as ``know3d generate --texture``
runs them; Save Mesh writes the PBR GLB."""
from __future__ import annotations

from typing import Optional

import torch

from . import _host
from ._common import CATEGORY, KNOW3D_CONDITION, KNOW3D_MODEL
from ._io import IO
from .mesh import FLOATER_FRACTION
from .trellis import _progress, _run_stage, _sampler_inputs, _sampler_widgets, _to_device, one_image, preprocess_front
from ..know3d_core import plan
from ..know3d_core.generate.texture import (DEFAULT_TEXTURE_FACES, DEFAULT_TEXTURE_SIZE, MAX_TEXTURE_SIZE,
                                            MIN_TEXTURE_SIZE, TEXTURE_MODES)
from ..know3d_core.mesh import postprocess_mesh, z_up_to_y_up
from ..know3d_core.sparse.tensor import SparseTensor

CAT = f"{CATEGORY}/trellis2"


def shape_latent_to_slat(latent: dict, mean: torch.Tensor, std: torch.Tensor) -> tuple[SparseTensor, int]:
    """The shape latent Know3D Geometry outputs (``trellis.texture_stage_latent``: normalised feats
    ``[1, 32, N, 1]``, coords ``[N, 4]`` on the ``R / 16`` grid) -> (de-normalised SLat ``[N, 32]``, R)."""
    if not isinstance(latent, dict) or not {"samples", "coords", "coord_resolution"} <= set(latent):
        raise ValueError("Know3D Texture: shape_latent must be the shape_latent output of Know3D Geometry")
    samples, coords = latent["samples"], latent["coords"]
    if samples.dim() != 4 or samples.shape[0] != 1 or samples.shape[2] != coords.shape[0]:
        raise ValueError(f"Know3D Texture: shape_latent holds samples {tuple(samples.shape)} for {coords.shape[0]} "
                         "voxels; expected [1, C, N, 1] from Know3D Geometry (one mesh)")
    if samples.shape[1] != mean.numel():
        raise ValueError(f"Know3D Texture: shape_latent has {samples.shape[1]} channels, this model's shape latent "
                         f"{mean.numel()}; connect the Geometry output of the same model")
    grid = int(latent["coord_resolution"])
    feats = samples[0, :, :, 0].t().float() * std + mean
    return SparseTensor(feats, coords.to(torch.int32), (grid, grid, grid)), grid * 16


def texture_type(resolution: int) -> str:
    """The pipeline type whose texture flow fits a mesh grid: the 512 flow for 512, else the 1024 one."""
    return "512" if resolution == 512 else "1024"


def textured_core_mesh(vertices: torch.Tensor, faces: torch.Tensor, metadata: dict, uvs=None, base_color=None,
                       metallic_roughness=None, vertex_colors=None):
    """Core MESH (Y-up) of one textured mesh, in core's fields: ``uvs [1, V, 2]`` (glTF: v = 0 on the
    first row), ``texture [1, T, T, 3]`` and ``metallic_roughness [1, T, T, 3]`` float in [0, 1] (G
    roughness, B metallic), or ``vertex_colors [1, V, 4]``; the base colour's alpha rides along as
    ``know3d_alpha [1, T, T, 1]`` for Save Mesh. ``vertices`` Z-up ``[V, 3]``."""
    v = torch.from_numpy(z_up_to_y_up(vertices.detach().cpu().double().numpy())).float()
    mesh = _host.make_mesh([v], [faces.cpu()], metadata)
    if uvs is not None:
        mesh.uvs = uvs.float().cpu().unsqueeze(0)
        rgba = torch.from_numpy(base_color).float().div(255).unsqueeze(0)
        mesh.texture = rgba[..., :3].contiguous()
        mesh.know3d_alpha = rgba[..., 3:].contiguous()
        mesh.metallic_roughness = torch.from_numpy(metallic_roughness).float().div(255).unsqueeze(0)
    if vertex_colors is not None:
        mesh.vertex_colors = vertex_colors.float().cpu().unsqueeze(0)
    return mesh


class Know3DTexture(IO.ComfyNode):
    @classmethod
    def define_schema(cls):
        return IO.Schema(
            node_id="Know3DTexture",
            display_name="Know3D Texture",
            category=CAT,
            description=(
                "TRELLIS.2's texture stage on the shape latent of Know3D Geometry: the texture flow (the "
                "shape latent concatenated, conditioned on the front image and, when connected, the back "
                "image as a second view), the texture decoder (PBR voxels: base colour, metallic, roughness, "
                "alpha), then the mesh cleaned and reduced to the face budget and baked: UV-unwrapped PBR "
                "maps, or vertex colours. Needs Load Know3D Model with its texture option. Save Mesh (GLB) "
                "writes the PBR material; core Save GLB / Preview 3D show it too."
            ),
            inputs=[
                KNOW3D_MODEL.Input("know3d_model", tooltip="Load Know3D Model with texture loaded."),
                IO.Latent.Input("shape_latent", tooltip="The shape_latent output of Know3D Geometry."),
                KNOW3D_CONDITION.Input("condition", tooltip="Image Condition of the front image (the one Geometry used)."),
                *_sampler_widgets(plan.TEX_STAGE),
                IO.Int.Input("texture_size", default=DEFAULT_TEXTURE_SIZE, min=MIN_TEXTURE_SIZE, max=MAX_TEXTURE_SIZE,
                             step=64, tooltip="Side of the PBR maps in pixels (pbr mode)."),
                IO.Int.Input("face_budget", default=DEFAULT_TEXTURE_FACES, min=0, max=50_000_000, step=1000,
                             tooltip="The mesh is reduced to at most this many faces before its UV unwrap (0 keeps every face)."),
                IO.Combo.Input("mode", options=list(TEXTURE_MODES), default=TEXTURE_MODES[0],
                               tooltip="pbr: UV-mapped PBR maps (base colour, metallic-roughness, alpha); vertex: colours on the vertices (fast, no maps)."),
                IO.Image.Input("back_image", optional=True,
                               tooltip="The back view (e.g. the generated back image): a second image condition of the texture flow, "
                                       "so the back's colours follow it. Not connected: front only (plain TRELLIS.2)."),
            ],
            outputs=[IO.Mesh.Output("mesh", tooltip="The textured mesh (core MESH, Y-up, with uvs + texture + metallic_roughness, or vertex colours).")],
        )

    @classmethod
    def execute(cls, know3d_model, shape_latent, condition, seed, steps, cfg, guidance_interval_start,
                guidance_interval_end, guidance_rescale, rescale_t, texture_size, face_budget, mode,
                back_image: Optional[torch.Tensor] = None) -> IO.NodeOutput:
        from ..know3d_core.mesh.texture import bake_reduced, vertex_rgba

        pipe = know3d_model.pipeline
        if mode not in TEXTURE_MODES:
            raise ValueError(f"Know3D Texture: unknown mode {mode!r}; choose one of {', '.join(TEXTURE_MODES)}")
        mean, std = pipe.config.normalization("shape_slat_normalization")
        slat, resolution = shape_latent_to_slat(shape_latent, mean, std)
        ptype = texture_type(resolution)
        flow_key = plan.pipeline_type(ptype).texture_flow
        missing = [k for k in (flow_key, plan.TEX_DECODER) if k not in pipe.models]
        if missing:
            raise ValueError(f"Know3D Texture: the model has no {', '.join(missing)}; in Load Know3D Model choose a "
                             "texture option (the TRELLIS.2 folder's, or the texture VAE beside a single diffusion file)")
        size = int(plan.pipeline_type(ptype).texture_stage)
        params = pipe.sampler_params(plan.TEX_STAGE, _sampler_inputs(
            steps, cfg, guidance_interval_start, guidance_interval_end, guidance_rescale, rescale_t))
        back_cond = None
        if back_image is not None:
            back = preprocess_front(one_image(back_image, "back_image"), None, assume_foreground=True)
            with _host.stage("DINOv3 back view"):
                feats = condition.extractor(back, image_size=size).to(pipe.device, torch.float32)
            back_cond = {"cond": feats, "neg_cond": torch.zeros_like(feats)}
        know3d_model.load(flow_key, plan.SHAPE_DECODER, plan.TEX_DECODER,
                          working_bytes=plan.texture_working_bytes(slat.feats.shape[0]))
        with _host.stage(f"texture {size}"):
            tex_slat = _run_stage(
                pipe.sample_tex_slat, slat.to(pipe.device), _to_device(condition.conds[size], pipe.device), ptype,
                back_cond=back_cond, generator=torch.Generator().manual_seed(int(seed)), params=params,
                callback=_progress(params.steps), cancel=_host.interrupted)
        with _host.stage("texture decode"):
            _host.check_interrupted()
            [(raw, voxels)] = pipe.decode_textured(slat, tex_slat, resolution)
        if raw.num_faces == 0:
            raise ValueError("Know3D Texture: the shape decoder gave an empty mesh; try another seed")
        mesh = postprocess_mesh(raw, FLOATER_FRACTION, int(face_budget))
        meta = {"texture": {"mode": mode, "seed": int(seed), "steps": int(steps), "back_view_condition": back_cond is not None,
                            "resolution": int(resolution)}}
        with _host.stage(f"texture bake ({mode})"):
            if mode == "vertex":
                return IO.NodeOutput(textured_core_mesh(mesh.vertices, mesh.faces, meta,
                                                        vertex_colors=vertex_rgba(mesh, voxels)))
            baked = bake_reduced(mesh, raw, voxels, texture_size=int(texture_size), device=pipe.device)
        meta["texture"].update(size=int(texture_size), texel_coverage=round(baked.metadata["texel_coverage"], 4))
        return IO.NodeOutput(textured_core_mesh(baked.vertices, baked.faces, meta, uvs=baked.uvs,
                                                base_color=baked.base_color,
                                                metallic_roughness=baked.metallic_roughness))


NODES = (Know3DTexture,)
