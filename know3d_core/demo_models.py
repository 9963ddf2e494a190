"""A complete set of tiny models with RANDOM weights, in the real on-disk formats.

``write_demo_models(folder)`` writes everything the Know3D pipeline loads, small enough that a
whole run (back view, capture, injection, both TRELLIS.2 stages, mesh) takes seconds on a CPU:

    FOLDER/TRELLIS.2-4B/                    pipeline.json + ckpts/*.json + *.safetensors (official layout)
    FOLDER/dinov3-vitl16-pretrain-lvd1689m/ config.json + model.safetensors (Hugging Face layout)
    FOLDER/Qwen-Image-Edit-2511/            model_index.json, transformer/, vae/, scheduler/,
                                            text_encoder/, processor/ (diffusers layout)
    FOLDER/know3d_backview_lora.safetensors back-view LoRA (ComfyUI key family)
    FOLDER/know3d.safetensors               Know3D delta checkpoint (mmdit_hidden, branch + LoRA)
    FOLDER/front.png                        an RGBA demo image (an object on transparency)
    FOLDER/README.txt                       says the weights are random

The weights are random: the meshes mean nothing. They exist to run and test the plumbing.
Three changes keep a random model's output usable, each made only here:

* the structure latent is 8^3 (official 16^3), so the sparse-structure decoder gives a 32^3
  occupancy grid directly (the ``512`` and cascade types need 32^3);
* the output biases of both decoders are calibrated (on inputs drawn like the real ones) so that
  about ``DEMO_OCCUPANCY`` of the 32^3 voxels are occupied, each subdivision keeps about
  ``DEMO_SUBDIV_KEEP`` of the children and about ``DEMO_EDGE_FLAGS`` of the edge flags are set:
  a random decoder otherwise fills half of every grid (millions of voxels) or nothing;
* the Qwen processor is the real ``Qwen2_5_VLProcessor`` around a character-level tokenizer (the
  real tokenizer files are not available offline);
* the tiny MMDiT's text values (``attn.add_v_proj``) are scaled by ``DEMO_TEXT_GAIN``: a random
  MMDiT barely listens to its prompt (two descriptions changed its hidden states by 0.4%, and the
  meshes by a voxel), a trained one does. With the gain the description changes the hidden states
  by several percent, and so, through the Know3D checkpoint's non-zero branch, the mesh: the demo
  shows the knowledge path at work (``tests/test_validate_demo.py`` asserts it).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

__all__ = [
    "DemoPaths",
    "DEMO_RUN_SETTINGS",
    "DEMO_OCCUPANCY",
    "DEMO_SUBDIV_KEEP",
    "DEMO_EDGE_FLAGS",
    "DEMO_TEXT_GAIN",
    "write_demo_models",
    "write_demo_trellis2",
    "write_demo_dinov3",
    "write_demo_qwen",
    "write_demo_backview_lora",
    "write_demo_know3d",
    "write_demo_image",
]

RANDOM_WEIGHTS_NOTICE = (
    "These models have RANDOM weights (tiny configs in the real file formats). They exercise the "
    "Know3D pipeline end to end; the meshes they produce mean nothing."
)

DEMO_OCCUPANCY = 0.005      # occupied fraction of the 32^3 structure grid (~160 tokens on noise)
DEMO_SUBDIV_KEEP = 0.5      # children kept per channel-to-space subdivision
DEMO_EDGE_FLAGS = 0.5       # edge-crossing flags set in the decoder head
DEMO_TEXT_GAIN = 100.0      # scale of the tiny MMDiT's text values (see the module docstring)

FLOW_WIDTHS = dict(model_channels=32, num_blocks=2, num_heads=2, cond_channels=32)
SS_RESOLUTION = 8
DINO_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    num_register_tokens=4, patch_size=16, image_size=64, rope_theta=100.0, layer_norm_eps=1e-5,
)
QWEN_TRANSFORMER = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=3, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4), zero_cond_t=True,
)
QWEN_VAE = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
)
QWEN_MODEL_NAME = "tiny-random/Qwen-Image-Edit-2511"
KNOW3D_LAYERS = [1, 2]
KNOW3D_SIGMA = 0.25

# How to run the demo quickly (the pipeline's defaults are the real models' settings).
DEMO_RUN_SETTINGS: Dict[str, object] = {
    "pipeline_type": "512",
    "steps": 4,                    # back-view steps
    "back_view_size": (128, 128),  # (height, width) of the back view
    "vae_image_area": 128 * 128,   # VAE copy of the front image
    "ss_steps": 4,
    "shape_steps": 4,
    "dtype": "float32",
}

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


@dataclass(frozen=True)
class DemoPaths:
    """Where :func:`write_demo_models` put each part."""

    root: str
    trellis2: str
    dinov3: str
    qwen: str
    backview_lora: str
    know3d: str
    image: str

    def as_dict(self) -> Dict[str, str]:
        return asdict(self)


# ----------------------------------------------------------------------------------- TRELLIS.2
def _resave(stem: str, update) -> None:
    """Load ``stem.safetensors``, let ``update(state_dict)`` change it in place, write it back."""
    sd = load_file(stem + ".safetensors")
    update(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, stem + ".safetensors")


def _edit_json_args(stem: str, **args) -> None:
    with open(stem + ".json", "r", encoding="utf-8") as f:
        doc = json.load(f)
    doc["args"].update(args)
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=4)


def _quantile_bias(values: torch.Tensor, keep: float) -> float:
    """Bias b such that about ``keep`` of ``values + b`` are > 0."""
    return -float(torch.quantile(values.flatten().double(), 1.0 - keep))


@torch.no_grad()
def _calibrate_structure_decoder(stem: str, seed: int, resolution: int) -> None:
    """Set the occupancy head's bias so ~DEMO_OCCUPANCY of the 32^3 grid is occupied."""
    from .trellis2.loading import load_model

    decoder = load_model(stem)
    decoder.convert_to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(4, decoder.latent_channels, resolution, resolution, resolution, generator=gen)
    logits = decoder(z)
    grid = logits.shape[-1]
    pooled = F.max_pool3d(logits, grid // 32, grid // 32) if grid > 32 else logits
    shift = _quantile_bias(pooled, DEMO_OCCUPANCY)

    def update(sd):
        sd["out_layer.2.bias"] = sd["out_layer.2.bias"] + shift

    _resave(stem, update)


def _blob_coords(seed: int, grid: int = 32, count: int = 260) -> torch.Tensor:
    """A random connected-ish voxel set ``[count, 4]`` (b=0) near the grid centre."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.arange(grid)
    pts = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3).float()
    dist = (pts - (grid - 1) / 2).norm(dim=-1) + 2.0 * torch.rand(pts.shape[0], generator=gen)
    idx = torch.argsort(dist)[:count].sort().values
    coords = torch.zeros(count, 4, dtype=torch.int32)
    coords[:, 1:] = pts[idx].int()
    return coords


@torch.no_grad()
def _calibrate_shape_decoder(stem: str, mean: torch.Tensor, std: torch.Tensor, seed: int) -> None:
    """Set each subdivision bias (``to_subdiv``) and the edge-flag biases of the head, level by
    level, on a de-normalised random latent over a blob of 32^3 voxels."""
    from .sparse import SparseTensor
    from .trellis2.loading import load_model
    from .trellis2.shape_decoder import SparseResBlockC2S3d

    decoder = load_model(stem)
    decoder.convert_to(torch.float32)
    coords = _blob_coords(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    feats = torch.randn(coords.shape[0], decoder.latent_channels, generator=gen) * std + mean
    h = decoder.from_latent(SparseTensor(feats, coords, (32, 32, 32)))
    shifts: Dict[str, torch.Tensor] = {}
    for i, level in enumerate(decoder.blocks):
        for j, block in enumerate(level):
            if isinstance(block, SparseResBlockC2S3d):
                key = f"blocks.{i}.{j}.to_subdiv.bias"
                shift = _quantile_bias(block.subdivision_logits(h), DEMO_SUBDIV_KEEP)
                block.to_subdiv.bias.add_(shift)
                shifts[key] = torch.full((8,), shift)
                h, _ = block(h)
            else:
                h = block(h)
    head = decoder._head(h).feats
    flag_shift = _quantile_bias(head[:, 3:6], DEMO_EDGE_FLAGS)
    shifts["output_layer.bias"] = torch.tensor([0, 0, 0, flag_shift, flag_shift, flag_shift, 0.0])

    def update(sd):
        for key, shift in shifts.items():
            sd[key] = (sd[key].float() + shift).to(sd[key].dtype)

    _resave(stem, update)


def write_demo_trellis2(folder: str, seed: int = 0, ss_resolution: int = SS_RESOLUTION) -> str:
    """Tiny TRELLIS.2 folder (official layout, see ``trellis2/tiny.py``) with calibrated decoder
    biases and an ``ss_resolution``^3 structure latent (8: a 32^3 grid for ``512`` and the cascades;
    16, the official size: a 64^3 grid, needed by the ``1024`` type but slow on a CPU).
    Returns ``folder``."""
    from .trellis2.loading import read_pipeline_config, resolve_checkpoint
    from .trellis2.tiny import write_tiny_trellis2

    write_tiny_trellis2(folder, seed=seed, **FLOW_WIDTHS)
    config = read_pipeline_config(folder)
    ss_flow = resolve_checkpoint(folder, config.models["sparse_structure_flow_model"])
    _edit_json_args(ss_flow, resolution=ss_resolution)
    _calibrate_structure_decoder(
        resolve_checkpoint(folder, config.models["sparse_structure_decoder"]), seed, ss_resolution)
    mean, std = config.normalization("shape_slat_normalization")
    _calibrate_shape_decoder(resolve_checkpoint(folder, config.models["shape_slat_decoder"]), mean, std, seed)
    from .trellis2.tiny_texture import write_tiny_texture

    write_tiny_texture(folder, seed)  # the texture stage (know3d demo --texture)
    return folder


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed the global CPU RNG inside the block only (the caller's RNG state is restored after)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------- DINOv3
def write_demo_dinov3(folder: str, seed: int = 0) -> str:
    """Tiny DINOv3 ViT in the Hugging Face layout (``config.json`` + ``model.safetensors``)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    os.makedirs(folder, exist_ok=True)
    with _seeded(seed):  # HF constructors draw from the global RNG; keep the caller's stream intact
        model = DINOv3ViTModel(DINOv3ViTConfig(**DINO_CONFIG)).eval()
    sd = {k.replace("model.layer.", "layer."): v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**DINO_CONFIG, "model_type": "dinov3_vit", "architectures": ["DINOv3ViTModel"],
                   "torch_dtype": "float32"}, f, indent=2)
    return folder


# ----------------------------------------------------------------------------------- Qwen-Image-Edit
def char_tokenizer():
    """Offline character-level tokenizer with the Qwen2.5-VL special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "\n": 1}
    for i in range(32, 127):
        vocab[chr(i)] = len(vocab)
    for s in _SPECIAL_TOKENS:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), "isolated")
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<|endoftext|>"), vocab


def tiny_qwen25vl_config(vocab: dict, width: int):
    """Tiny Qwen2.5-VL config (2 text + 2 vision layers) whose text width is the MMDiT's ``width`` and
    whose special-token ids are those of :func:`char_tokenizer`'s ``vocab``."""
    from transformers import Qwen2_5_VLConfig

    ids = {s: vocab[s] for s in _SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=width, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(vocab), rope_theta=1e6,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=width,
                           spatial_merge_size=2, patch_size=14, temporal_patch_size=2, window_size=28,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _image_processor_class():
    try:  # transformers >= 5
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        return Qwen2VLImageProcessorPil
    except ImportError:  # transformers 4.x: the numpy/PIL processor has the plain name
        from transformers import Qwen2VLImageProcessor
        return Qwen2VLImageProcessor


def write_demo_qwen(folder: str, seed: int = 0) -> str:
    """Tiny Qwen-Image-Edit-2511 in the diffusers layout: transformer/, vae/, scheduler/,
    text_encoder/ (tiny Qwen2.5-VL) and processor/ (tokenizer + image processor)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .mmdit.schedule import QWEN_IMAGE_SCHEDULER_CONFIG

    os.makedirs(folder, exist_ok=True)
    with _seeded(seed):
        transformer = QwenImageTransformer2DModel(**QWEN_TRANSFORMER)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if ".attn.add_v_proj." in name:
                p.mul_(DEMO_TEXT_GAIN)
    transformer.save_pretrained(os.path.join(folder, "transformer"))
    with _seeded(seed + 1):
        AutoencoderKLQwenImage(
            **QWEN_VAE, latents_mean=[0.05 * i - 0.4 for i in range(16)],
            latents_std=[1.0 + 0.1 * i for i in range(16)],
        ).save_pretrained(os.path.join(folder, "vae"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump({"_class_name": "FlowMatchEulerDiscreteScheduler", **QWEN_IMAGE_SCHEDULER_CONFIG}, f, indent=2)

    tok, vocab = char_tokenizer()
    cfg = tiny_qwen25vl_config(vocab, QWEN_TRANSFORMER["joint_attention_dim"])
    with _seeded(seed + 2):
        Qwen2_5_VLForConditionalGeneration(cfg).eval().save_pretrained(os.path.join(folder, "text_encoder"))
    proc_dir = os.path.join(folder, "processor")
    tok.save_pretrained(proc_dir)
    _image_processor_class()(min_pixels=56 * 56, max_pixels=56 * 56).save_pretrained(proc_dir)

    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump({"_class_name": "QwenImageEditPlusPipeline", "_name_or_path": QWEN_MODEL_NAME,
                   "transformer": ["diffusers", "QwenImageTransformer2DModel"],
                   "vae": ["diffusers", "AutoencoderKLQwenImage"],
                   "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                   "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                   "processor": ["transformers", "Qwen2_5_VLProcessor"]}, f, indent=2)
    return folder


def write_demo_backview_lora(path: str, seed: int = 0, rank: int = 2) -> str:
    """A back-view LoRA for the tiny transformer (ComfyUI key family, ``alpha`` per module)."""
    gen = torch.Generator().manual_seed(seed)
    inner = QWEN_TRANSFORMER["num_attention_heads"] * QWEN_TRANSFORMER["attention_head_dim"]
    tensors = {}
    for i in range(QWEN_TRANSFORMER["num_layers"]):
        for proj in ("to_q", "to_k", "to_v"):
            name = f"diffusion_model.transformer_blocks.{i}.attn.{proj}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, inner, generator=gen) / math.sqrt(inner)
            tensors[f"{name}.lora_B.weight"] = 0.1 * torch.randn(inner, rank, generator=gen)
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path)
    return path


# ----------------------------------------------------------------------------------- Know3D
@torch.no_grad()
def write_demo_know3d(path: str, trellis2_folder: str, seed: int = 0, lora_rank: int = 4) -> str:
    """A Know3D delta file for the tiny flows: ``mmdit_hidden`` knowledge of the tiny transformer's
    layers ``KNOW3D_LAYERS`` at sigma ``KNOW3D_SIGMA``; random (non-zero) branch and LoRA."""
    from .knowledge import init_lora, install_branch, save_know3d
    from .knowledge.checkpoint import MODEL_NAMES
    from .trellis2.loading import load_pipeline_models

    models = load_pipeline_models(trellis2_folder, keys=MODEL_NAMES)
    width = QWEN_TRANSFORMER["num_attention_heads"] * QWEN_TRANSFORMER["attention_head_dim"]
    dim = width * len(KNOW3D_LAYERS)
    gen = torch.Generator().manual_seed(seed)
    for model in models.values():
        install_branch(model, dim, kind="mmdit_hidden", mmdit_layers=KNOW3D_LAYERS, sigma=KNOW3D_SIGMA)
        for name, p in model.named_parameters():
            if "knowledge" not in name:
                continue
            if name.endswith("norm.weight") or name.endswith("gamma"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "to_out" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        init_lora(model, lora_rank, generator=gen, b_std=0.01)
    save_know3d(path, models, content="delta", mmdit_model=QWEN_MODEL_NAME)
    return path


# ----------------------------------------------------------------------------------- image
def write_demo_image(path: str, size: int = 256) -> str:
    """An RGBA image: a two-tone 'chair back' shape on a transparent background."""
    arr = np.zeros((size, size, 4), dtype=np.uint8)
    s = size / 256
    y, x = np.mgrid[0:size, 0:size]
    seat = (x > 70 * s) & (x < 186 * s) & (y > 140 * s) & (y < 160 * s)
    back = (x > 70 * s) & (x < 186 * s) & (y > 50 * s) & (y < 140 * s)
    legs = ((np.abs(x - 80 * s) < 6 * s) | (np.abs(x - 176 * s) < 6 * s)) & (y >= 160 * s) & (y < 220 * s)
    arr[back] = (150, 90, 40, 255)
    arr[seat] = (190, 120, 60, 255)
    arr[legs] = (90, 60, 30, 255)
    Image.fromarray(arr, "RGBA").save(path)
    return path


# ----------------------------------------------------------------------------------- all
def write_demo_models(folder: str, seed: int = 0) -> DemoPaths:
    """Write the whole tiny random model set into ``folder`` (created if needed).

    Everything is a function of ``seed``. Takes a few seconds; the result is ~15 MB.
    """
    folder = os.path.abspath(os.fspath(folder))
    os.makedirs(folder, exist_ok=True)
    paths = DemoPaths(
        root=folder,
        trellis2=os.path.join(folder, "TRELLIS.2-4B"),
        dinov3=os.path.join(folder, "dinov3-vitl16-pretrain-lvd1689m"),
        qwen=os.path.join(folder, "Qwen-Image-Edit-2511"),
        backview_lora=os.path.join(folder, "know3d_backview_lora.safetensors"),
        know3d=os.path.join(folder, "know3d.safetensors"),
        image=os.path.join(folder, "front.png"),
    )
    write_demo_trellis2(paths.trellis2, seed)
    write_demo_dinov3(paths.dinov3, seed)
    write_demo_qwen(paths.qwen, seed)
    write_demo_backview_lora(paths.backview_lora, seed)
    write_demo_know3d(paths.know3d, paths.trellis2, seed)
    write_demo_image(paths.image)
    with open(os.path.join(folder, "README.txt"), "w", encoding="utf-8") as f:
        f.write(RANDOM_WEIGHTS_NOTICE + "\n\nWritten by know3d_core.demo_models.write_demo_models"
                f"(seed={seed}).\nRun settings that keep a CPU run short: {json.dumps(DEMO_RUN_SETTINGS)}\n")
    return paths
