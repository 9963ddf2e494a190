"""Shared tiny builders for the tests/test_mmdit_*.py files (no tests here).

Tiny configs follow diffusers' own Qwen-Image tests, with the real latent layout (transformer
in 64 / out 16, VAE z_dim 16, 8x spatial). The text side is a tiny random Qwen2.5-VL with the real
``Qwen2_5_VLProcessor`` around an offline character-level tokenizer (the real tokenizer cannot be
downloaded here) and the PIL image processor; the video processor (needs torchvision) is left out.
"""
from math import prod

import numpy as np
import torch
from PIL import Image

JOINT_DIM = 16


def tiny_transformer(num_layers: int = 4, zero_cond_t: bool = True, seed: int = 0):
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=JOINT_DIM, axes_dims_rope=(8, 4, 4),
        zero_cond_t=zero_cond_t).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLQwenImage
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.05 * i - 0.4 for i in range(16)], latents_std=[1.0 + 0.1 * i for i in range(16)]).eval()


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    arr = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    return Image.fromarray(arr)


def tiny_text_stack(seed: int = 0):
    """(Qwen2_5_VLForConditionalGeneration with text width JOINT_DIM, Qwen2_5_VLProcessor).

    The tokenizer and the config are the demo models' (``know3d_core.demo_models``)."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from know3d_core.demo_models import char_tokenizer, tiny_qwen25vl_config

    tok, vocab = char_tokenizer()

    class ProcessorWithoutVideo(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    proc = ProcessorWithoutVideo(image_processor=Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56),
                                 tokenizer=tok, video_processor=None)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(tiny_qwen25vl_config(vocab, JOINT_DIM)).eval(), proc


def blockwise_image_streams(model, hidden, embeds, timestep, img_shapes):
    """Run the MMDiT block by block from its parts (text mask None); returns
    (list of each block's output image stream [B, N, C], the model's final output)."""
    h = model.img_in(hidden)
    t = timestep.to(h.dtype)
    index = None
    if model.zero_cond_t:
        t = torch.cat([t, t * 0], dim=0)
        index = torch.tensor([[0] * prod(s[0]) + [1] * sum(prod(x) for x in s[1:]) for s in img_shapes],
                             dtype=torch.int)
    e = model.txt_in(model.txt_norm(embeds))
    temb = model.time_text_embed(t, h)
    rope = model.pos_embed(img_shapes, max_txt_seq_len=e.shape[1], device=h.device)
    outs = []
    for blk in model.transformer_blocks:
        e, h = blk(hidden_states=h, encoder_hidden_states=e, encoder_hidden_states_mask=None, temb=temb,
                   image_rotary_emb=rope, modulate_index=index)
        outs.append(h)
    if model.zero_cond_t:
        temb = temb.chunk(2, dim=0)[0]
    return outs, model.proj_out(model.norm_out(h, temb))
