"""Other sources of KNOW3D_KNOWLEDGE, swapped by rewiring: the denoised back-view latent, DINOv3
features of the back image, and the back image as TRELLIS.2's second view (no Know3D weights)."""
from __future__ import annotations

import torch

from . import _host
from ._common import CATEGORY, KNOW3D_KNOWLEDGE, KNOW3D_MODEL
from ._io import IO
from .trellis import clip_vision_extractor, one_image, preprocess_front
from ..know3d_core.knowledge.kinds import dino_image_knowledge, multi_view_knowledge, vae_latent_knowledge
from ..know3d_core.knowledge.multi_view import MULTI_VIEW_MODES

CAT = f"{CATEGORY}/knowledge"


class Know3DKnowledgeFromLatent(IO.ComfyNode):
    @classmethod
    def define_schema(cls):
        return IO.Schema(
            node_id="Know3DKnowledgeFromLatent",
            display_name="Knowledge from Latent",
            category=CAT,
            description=(
                "vae_latent knowledge: the fully denoised back-view latent, patchified like the MMDiT input "
                "[B, N, 64]. Connect the Qwen MODEL so the latent is normalised the way the model sees it "
                "(what Know3D checkpoints of this kind are trained on)."
            ),
            inputs=[
                IO.Latent.Input("back_latent", tooltip="The back-view LATENT from Back-View Sample (run to the end)."),
                IO.Model.Input("model", optional=True,
                               tooltip="The Qwen-Image-Edit MODEL: its latent format normalises the latent. Without it the raw VAE latent is used."),
            ],
            outputs=[KNOW3D_KNOWLEDGE.Output("knowledge", tooltip="vae_latent knowledge for Sparse Structure and Geometry.")],
        )

    @classmethod
    def execute(cls, back_latent, model=None) -> IO.NodeOutput:
        z = back_latent["samples"].to(torch.float32)
        if z.dim() == 4:
            z = z.unsqueeze(2)
        scale = 8
        normalisation = "raw VAE latent"
        if model is not None:
            fmt = model.get_model_object("latent_format")
            z = fmt.process_in(z)
            scale = int(getattr(fmt, "spacial_downscale_ratio", 8))
            normalisation = f"{type(fmt).__name__}.process_in (model space)"
        resolution = (int(z.shape[-2]) * scale, int(z.shape[-1]) * scale)
        knowledge = vae_latent_knowledge(z.to(_host.intermediate_device()), resolution,
                                         model="Qwen-Image VAE", normalisation=normalisation)
        return IO.NodeOutput(knowledge)


class Know3DKnowledgeFromImage(IO.ComfyNode):
    @classmethod
    def define_schema(cls):
        return IO.Schema(
            node_id="Know3DKnowledgeFromImage",
            display_name="Knowledge from Image (DINOv3)",
            category=CAT,
            description=(
                "dino_image knowledge: DINOv3 features [B, N, 1024] of the decoded back image, cropped and "
                "centred like the front image (the whole frame when it has no mask or alpha)."
            ),
            inputs=[
                KNOW3D_MODEL.Input("know3d_model", tooltip="Load Know3D Model (its DINOv3 encodes the image)."),
                IO.Image.Input("back_image", tooltip="The back view, e.g. core VAE Decode of Back-View Sample's latent."),
                IO.Combo.Input("resolution", options=["512", "1024"], default="512", tooltip="DINOv3 input size in pixels."),
                IO.Mask.Input("mask", optional=True, tooltip="Foreground of the back image (1 = object). Optional."),
                IO.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Use ComfyUI's DINOv3 (core Load CLIP Vision) instead of the model's."),
            ],
            outputs=[KNOW3D_KNOWLEDGE.Output("knowledge", tooltip="dino_image knowledge for Sparse Structure and Geometry.")],
        )

    @classmethod
    def execute(cls, know3d_model, back_image, resolution, mask=None, clip_vision=None) -> IO.NodeOutput:
        image = preprocess_front(one_image(back_image, "back_image"), mask, assume_foreground=True)
        extractor = clip_vision_extractor(clip_vision) if clip_vision is not None else know3d_model.dinov3()
        with _host.stage("back-image DINOv3"):
            feats = extractor(image, image_size=int(resolution)).to(_host.intermediate_device(), torch.float32)
        name = "ComfyUI CLIP_VISION" if clip_vision is not None else know3d_model.dinov3_name
        return IO.NodeOutput(dino_image_knowledge(feats, int(resolution), model=name))


class Know3DBackViewAsSecondView(IO.ComfyNode):
    @classmethod
    def define_schema(cls):
        return IO.Schema(
            node_id="Know3DBackViewAsSecondView",
            display_name="Back View as Second View",
            category=CAT,
            description=(
                "multi_view knowledge: the back image becomes TRELLIS.2's second image condition (the "
                "paper's multi-view baseline). Needs no Know3D weights: works with the public TRELLIS.2 "
                "files. 'stochastic' alternates front/back per step (reference default, same cost)."
            ),
            inputs=[
                IO.Image.Input("back_image", tooltip="The back view, e.g. core VAE Decode of Back-View Sample's latent."),
                IO.Combo.Input("mode", options=list(MULTI_VIEW_MODES), default="stochastic",
                               tooltip="stochastic: front and back alternate per step; multidiffusion: both every step (2x cost); concat: tokens of both views in one pass."),
                IO.Mask.Input("mask", optional=True, tooltip="Foreground of the back image (1 = object). Optional."),
            ],
            outputs=[KNOW3D_KNOWLEDGE.Output("knowledge", tooltip="multi_view knowledge for Sparse Structure and Geometry (plain TRELLIS.2).")],
        )

    @classmethod
    def execute(cls, back_image, mode, mask=None) -> IO.NodeOutput:
        image = preprocess_front(one_image(back_image, "back_image"), mask, assume_foreground=True)
        tensor = image.unsqueeze(0).to(_host.intermediate_device(), torch.float32)
        return IO.NodeOutput(multi_view_knowledge(tensor, source="back_view", mode=str(mode)))


NODES = (Know3DKnowledgeFromLatent, Know3DKnowledgeFromImage, Know3DBackViewAsSecondView)
