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


_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
             "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def tiny_text_stack(seed: int = 0):
    """(Qwen2_5_VLForConditionalGeneration with text width JOINT_DIM, Qwen2_5_VLProcessor)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab = {"[UNK]": 0, "\n": 1}
    for i in range(32, 127):
        vocab[chr(i)] = len(vocab)
    for s in _SPECIALS:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), "isolated")
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIALS])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<|endoftext|>")

    class ProcessorWithoutVideo(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    proc = ProcessorWithoutVideo(image_processor=Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56),
                                 tokenizer=tok, video_processor=None)
    ids = {s: vocab[s] for s in _SPECIALS}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=JOINT_DIM, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(vocab), rope_theta=1e6,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=JOINT_DIM,
                           spatial_merge_size=2, patch_size=14, temporal_patch_size=2, window_size=28,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval(), proc


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
