"""Test-only ComfyUI nodes for tests/test_comfyui_server.py (not part of the pack).

Core loaders read fixed full-size configs for Qwen-Image (width 3072, a 7B text encoder), so the
integration test swaps them for these: a tiny Qwen-Image-Edit-2511 MODEL and Wan-2.1 VAE built
in-process with seeded random weights, and a CONDITIONING that carries what
TextEncodeQwenImageEditPlus would (text embeddings + the image's reference latent), with
text embeddings drawn from a hash of the prompt. Everything downstream runs unchanged.
"""
import hashlib

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


NODE_CLASS_MAPPINGS = {"Know3DTestTinyQwen": Know3DTestTinyQwen, "Know3DTestTinyQwenEncode": Know3DTestTinyQwenEncode}
