"""Test-only ComfyUI nodes for tests/test_comfyui_server.py (not part of the pack).

Core loaders read fixed full-size configs for Qwen-Image (width 3072, a 7B text encoder) and for
TRELLIS.2 (1536-wide flows, 1024-channel VAEs, ViT-L DINOv3), so the integration test swaps them for
these: a tiny Qwen-Image-Edit-2511 MODEL and Wan-2.1 VAE built in-process with seeded random weights,
a CONDITIONING that carries what TextEncodeQwenImageEditPlus would (text embeddings + the image's
reference latent), with text embeddings drawn from a hash of the prompt; and core's own TRELLIS.2
classes (the Trellis2 model through ComfyUI's detection, comfy.sd.VAE with core's shape / texture
VAE classes, ClipVisionModel with core's DINOv3 config) at the widths of the tiny Comfy-format files
the test writes (the demo's networks; the widths ride in each file's ``know3d_test_args`` metadata),
loaded strictly from those files. Everything downstream runs unchanged.
"""
import contextlib
import hashlib
import inspect
import json
import os
from unittest import mock

import torch

TINY_QWEN = {"image_model": "qwen_image", "in_channels": 64, "num_layers": 3,
             "default_ref_method": "index_timestep_zero", "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (4, 6, 6)}
TINY_WAN_VAE = {"dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                "temperal_downsample": [False, True, True], "dropout": 0.0}


def _fill(module, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in module.state_dict().items()}


class Know3DTestTinyQwen:
    CATEGORY = "Know3D/testing"
    FUNCTION = "build"
    RETURN_TYPES = ("MODEL", "VAE")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def build(self, seed):
        import comfy.ldm.wan.vae
        import comfy.model_detection
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.sd

        cfg = comfy.model_detection.model_config_from_unet_config(dict(TINY_QWEN))
        cfg.set_inference_dtype(torch.float32, None)
        model = cfg.get_model({})
        with torch.no_grad():
            sd = _fill(model.diffusion_model, seed)
            model.diffusion_model.load_state_dict(sd)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        vae = comfy.sd.VAE(sd=_fill(comfy.ldm.wan.vae.WanVAE(**TINY_WAN_VAE), seed + 1))
        return (patcher, vae)


class Know3DTestTinyQwenEncode:
    CATEGORY = "Know3D/testing"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("VAE",), "image": ("IMAGE",), "prompt": ("STRING", {"default": ""})}}

    def encode(self, vae, image, prompt):
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
        g = torch.Generator().manual_seed(seed)
        tokens = 3 + len(prompt.split())
        embeds = torch.randn(1, tokens, TINY_QWEN["joint_attention_dim"], generator=g)
        ref = vae.encode(image[:, :, :, :3])
        return ([[embeds, {"reference_latents": [ref]}]],)


def _tiny_file(folder, name):
    """(state dict, constructor args) of a tiny Comfy-format test file in a model folder."""
    import comfy.utils
    import folder_paths

    sd, metadata = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise(folder, name), return_metadata=True)
    if not metadata or "know3d_test_args" not in metadata:
        raise ValueError(f"{name}: not a tiny test file (no know3d_test_args metadata)")
    return sd, json.loads(metadata["know3d_test_args"])


def _build(cls, args):
    """``cls(**args)`` with the args its constructor takes (the official configs carry a few more)."""
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in args.items() if k in params})


TRELLIS_WIDTHS = ("model_channels", "cond_channels", "num_blocks", "num_heads", "mlp_ratio")


class Know3DTestTinyTrellis2:
    """Stands in for UNETLoader on Comfy-Org's TRELLIS.2 diffusion file: core's Trellis2 model (texture flow
    only, as ComfyUI detects a file with just ``shape2txt.*``) at the file's widths, weights loaded strictly."""
    CATEGORY = "Know3D/testing"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": ("STRING", {"default": ""})}}

    def load(self, unet_name):
        import comfy.model_detection
        import comfy.model_management as mm
        import comfy.model_patcher

        sd, args = _tiny_file("diffusion_models", unet_name)
        prefix = "shape2txt."
        tex = {k: v.float() for k, v in sd.items() if k.startswith(prefix)}
        config = comfy.model_detection.model_config_from_unet_config(comfy.model_detection.detect_unet_config(tex, ""))
        assert config.unet_config.get("txt_only"), config.unet_config
        config.unet_config.update({k: args[prefix][k] for k in TRELLIS_WIDTHS})
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({})
        model.diffusion_model.load_state_dict(tex, strict=True)
        return (comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device()),)


# ComfyUI recognises a TRELLIS.2 VAE file by a key of a deep block that a tiny file does not have.
VAE_DETECTION_KEYS = {"shape_dec.": "shape_dec.blocks.1.16.to_subdiv.weight", "txt_dec.": "txt_dec.blocks.3.4.conv2.weight"}


class _AsFullSize(dict):
    """A tiny file's state dict that also answers ComfyUI's detection key of the full-size file."""

    def __init__(self, sd, key):
        super().__init__(sd)
        self.key = key

    def __contains__(self, k):
        return k == self.key or super().__contains__(k)


class Know3DTestTinyTrellis2VAE:
    """Stands in for VAELoader on Comfy-Org's TRELLIS.2 shape or texture VAE: comfy.sd.VAE as for the real
    file, with core's ShapeVae / TextureVae built at the file's widths; every key of the file is used."""
    CATEGORY = "Know3D/testing"
    FUNCTION = "load"
    RETURN_TYPES = ("VAE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": ("STRING", {"default": ""})}}

    def load(self, vae_name):
        import comfy.ldm.trellis2.vae as cvae
        import comfy.sd

        sd, args = _tiny_file("vae", vae_name)

        class TinyShapeVae(cvae.ShapeVae):
            def __init__(self):
                torch.nn.Module.__init__(self)
                self.shape_dec = _build(cvae.FlexiDualGridVaeDecoder, args["shape_dec."])
                self.struct_dec = _build(cvae.SparseStructureDecoder, args["struct_dec."])
                self.register_buffer("resolution", torch.tensor(1024.0), persistent=False)

        class TinyTextureVae(cvae.TextureVae):
            def __init__(self):
                torch.nn.Module.__init__(self)
                self.txt_dec = _build(cvae.SparseUnetVaeDecoder, args["txt_dec."])
                self.register_buffer("resolution", torch.tensor(1024.0), persistent=False)

        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(cvae, "ShapeVae", TinyShapeVae))
            stack.enter_context(mock.patch.object(cvae, "TextureVae", TinyTextureVae))
            [key] = [VAE_DETECTION_KEYS[p] for p in args if p in VAE_DETECTION_KEYS]
            vae = comfy.sd.VAE(sd=_AsFullSize(sd, key))
        built = vae.first_stage_model.state_dict()
        assert set(built) == set(sd) and all(built[k].shape == sd[k].shape for k in sd), vae_name
        return (vae,)


class Know3DTestTinyDINOv3:
    """Stands in for CLIPVisionLoader on Comfy-Org's DINOv3 file: core's ClipVisionModel with core's DINOv3
    ViT-L config (normalisation, rope, ...) at the file's widths, weights loaded strictly."""
    CATEGORY = "Know3D/testing"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP_VISION",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": ("STRING", {"default": ""})}}

    def load(self, clip_name):
        import comfy.clip_vision

        sd, args = _tiny_file("clip_vision", clip_name)
        with open(os.path.join(os.path.dirname(comfy.clip_vision.__file__), "image_encoders", "dino3_large.json")) as f:
            config = {**json.load(f), **args}
        clip = comfy.clip_vision.ClipVisionModel(config)
        missing, unexpected = clip.load_sd(sd)
        assert not missing and not unexpected, (missing, unexpected)
        return (clip,)


NODE_CLASS_MAPPINGS = {"Know3DTestTinyQwen": Know3DTestTinyQwen, "Know3DTestTinyQwenEncode": Know3DTestTinyQwenEncode,
                       "Know3DTestTinyTrellis2": Know3DTestTinyTrellis2,
                       "Know3DTestTinyTrellis2VAE": Know3DTestTinyTrellis2VAE,
                       "Know3DTestTinyDINOv3": Know3DTestTinyDINOv3}
