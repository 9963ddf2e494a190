"""Tiny checkpoints and inputs for the ComfyUI integration test, written where users put the real
ones (models/trellis2, models/clip_vision, models/loras, models/know3d, input/). Random weights
in the real file formats; names say 'tiny'."""
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

TRELLIS_FOLDER = "tiny_trellis2"
DINOV3_FILE = "tiny_dinov3.safetensors"
QWEN_LORA_FILE = "tiny_know3d_backview_lora.safetensors"
FRONT_IMAGE = "know3d_example_front.png"
TINY_DINOV3 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_register_tokens=4, patch_size=16, image_size=64, rope_theta=100.0, layer_norm_eps=1e-5)
# Must match tests/data/comfyui/know3d_test_nodes (tiny Qwen-Image: 3 blocks, width 2 x 16).
TINY_QWEN_WIDTH = 32
TINY_QWEN_BLOCKS = 3


def write_dinov3(path, seed=0):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    config = DINOv3ViTConfig(**TINY_DINOV3)
    model = DINOv3ViTModel(config).eval()
    sd = {k.replace("model.layer.", "layer."): v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, path)


def write_qwen_lora(path, rank=4, seed=0):
    """A PEFT-style LoRA for the tiny Qwen-Image model (ComfyUI 'diffusion_model.' key names)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(TINY_QWEN_BLOCKS):
        for mod in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj"):
            key = f"diffusion_model.transformer_blocks.{i}.{mod}"
            sd[f"{key}.lora_A.weight"] = torch.randn(rank, TINY_QWEN_WIDTH, generator=g) * 0.1
            sd[f"{key}.lora_B.weight"] = torch.randn(TINY_QWEN_WIDTH, rank, generator=g) * 0.1
    save_file(sd, path)


def write_front_image(path, size=96):
    """An RGBA object on a transparent background: a box with a darker stripe."""
    arr = np.zeros((size, size, 4), np.uint8)
    arr[20:76, 28:68] = (200, 120, 60, 255)
    arr[20:76, 44:52, :3] = (60, 40, 20)
    Image.fromarray(arr, "RGBA").save(path)


def write_all(base):
    from know3d_core.trellis2.tiny import write_tiny_trellis2

    models = os.path.join(base, "models")
    for sub in ("trellis2", "clip_vision", "loras", "know3d"):
        os.makedirs(os.path.join(models, sub), exist_ok=True)
    write_tiny_trellis2(os.path.join(models, "trellis2", TRELLIS_FOLDER), cond_channels=TINY_DINOV3["hidden_size"])
    write_dinov3(os.path.join(models, "clip_vision", DINOV3_FILE))
    write_qwen_lora(os.path.join(models, "loras", QWEN_LORA_FILE))
    write_front_image(os.path.join(base, "input", FRONT_IMAGE))
