"""DINOv3 ViT-L/16 image features, exactly as TRELLIS.2 conditions on them.

Checkpoint: ``facebook/dinov3-vitl16-pretrain-lvd1689m`` on Hugging Face (gated: accept Meta's
DINOv3 licence there, then download ``config.json`` and ``model.safetensors``). Nothing here
downloads; point :meth:`DinoV3FeatureExtractor.from_pretrained` at the folder, or at the single
``.safetensors`` file (ComfyUI's ``models/clip_vision`` copy works too: its key names are the
Hugging Face ones; a bundled ``naf.`` upsampler is ignored).

Features (reference ``DinoV3FeatureExtractor``):
  image -> LANCZOS resize to ``S x S`` (S = 512 or 1024) -> RGB [0, 1] -> ImageNet normalise ->
  ``embeddings`` -> ``rope_embeddings`` -> every transformer layer -> ``F.layer_norm`` WITHOUT
  affine parameters (eps 1e-5). The model's own final ``norm`` is NOT used. All tokens are kept:
  ``[CLS, 4 registers, (S/16)^2 patches row-major]`` -> ``[B, 1029, 1024]`` at 512,
  ``[B, 4101, 1024]`` at 1024. The negative condition is ``zeros_like(cond)``.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .preprocess import image_to_pil

__all__ = [
    "DinoV3FeatureExtractor",
    "DINOV3_VITL16_CONFIG",
    "DINOV3_SOURCE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "num_feature_tokens",
    "config_from_state_dict",
    "load_dinov3_model",
    "get_cond",
]

DINOV3_SOURCE = "facebook/dinov3-vitl16-pretrain-lvd1689m"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_LN_EPS = 1e-5
_HEAD_DIM = 64  # every DINOv3 ViT (S/B/L/H+/7B) uses 64-wide heads
_IGNORED_PREFIXES = ("naf.",)  # ComfyUI bundles an optional feature upsampler in the same file
_OPTIONAL_KEYS = ("embeddings.mask_token",)  # only used for masked pre-training; zeros if absent

# config.json of facebook/dinov3-vitl16-pretrain-lvd1689m (used when only the .safetensors is given).
DINOV3_VITL16_CONFIG: Dict[str, object] = {
    "model_type": "dinov3_vit",
    "architectures": ["DINOv3ViTModel"],
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-5,
    "layerscale_value": 1.0,
    "drop_path_rate": 0.0,
    "use_gated_mlp": False,
    "rope_theta": 100.0,
    "query_bias": True,
    "key_bias": False,
    "value_bias": True,
    "proj_bias": True,
    "mlp_bias": True,
    "num_register_tokens": 4,
    "pos_embed_shift": None,
    "pos_embed_jitter": None,
    "pos_embed_rescale": 2.0,
}

ImageInput = Union[Image.Image, torch.Tensor, Sequence[Union[Image.Image, torch.Tensor]]]


def num_feature_tokens(image_size: int, patch_size: int = 16, num_register_tokens: int = 4) -> int:
    """Tokens per image: ``1 + registers + (image_size / patch_size)^2`` (1029 at 512, 4101 at 1024)."""
    return 1 + num_register_tokens + (image_size // patch_size) ** 2


# ---------------------------------------------------------------------------------------- loading
def _transformers_classes():
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    return DINOv3ViTConfig, DINOv3ViTModel


def _no_init_weights():
    """transformers' context that skips random init (location moved between versions)."""
    for mod_name in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            mod = __import__(mod_name, fromlist=["no_init_weights"])
            return mod.no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def config_from_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """ViT-L/16 config with the sizes read off the tensors (hidden, layers, MLP, registers, patch).

    Heads are ``hidden / 64`` (true for all DINOv3 ViTs); RoPE theta, eps and biases are ViT-L's.
    """
    def find(suffix: str) -> Optional[torch.Tensor]:
        for k, v in state_dict.items():
            if k.endswith(suffix):
                return v
        return None

    patch = find("embeddings.patch_embeddings.weight")
    regs = find("embeddings.register_tokens")
    up = find("layer.0.mlp.up_proj.weight")
    if patch is None or regs is None or up is None:
        raise ValueError(
            "not a DINOv3 ViT state dict: expected embeddings.patch_embeddings.weight, "
            "embeddings.register_tokens and layer.0.mlp.up_proj.weight"
        )
    layers = {int(k.split("layer.")[1].split(".")[0]) for k in state_dict if ".layer." in f".{k}"}
    cfg = dict(DINOV3_VITL16_CONFIG)
    hidden = int(patch.shape[0])
    cfg.update(
        hidden_size=hidden,
        num_channels=int(patch.shape[1]),
        patch_size=int(patch.shape[2]),
        num_attention_heads=max(1, hidden // _HEAD_DIM),
        num_hidden_layers=len(layers),
        intermediate_size=int(up.shape[0]),
        num_register_tokens=int(regs.shape[1]),
        use_gated_mlp=find("layer.0.mlp.gate_proj.weight") is not None,
        key_bias=find("layer.0.attention.k_proj.bias") is not None,
    )
    return cfg


def _normalise_keys(state_dict: Dict[str, torch.Tensor], expected: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Map checkpoint keys onto the model's names (``layer.N`` <-> ``model.layer.N`` across
    transformers versions); drop known bundled extras."""
    expected_set = set(expected)
    out = {}
    for k, v in state_dict.items():
        if k.startswith(_IGNORED_PREFIXES):
            continue
        if k in expected_set:
            out[k] = v
        elif "model." + k in expected_set:
            out["model." + k] = v
        elif k.startswith("model.") and k[len("model."):] in expected_set:
            out[k[len("model."):]] = v
        else:
            out[k] = v  # reported as unexpected
    return out


def _load_strict(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], path: str) -> None:
    own = model.state_dict()
    sd = _normalise_keys(state_dict, list(own))
    for k in _OPTIONAL_KEYS:
        if k in own and k not in sd:
            sd[k] = torch.zeros_like(own[k])
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(sd) & set(own)
        if tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not match the DINOv3 config: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, wrong shapes {wrong[:8]}. "
            f"Use the files of {DINOV3_SOURCE} (config.json + model.safetensors)."
        )
    model.load_state_dict(sd, strict=True, assign=True)


def _missing_file_error(path: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"DINOv3 weights not found: {path}. Download config.json and model.safetensors of "
        f"{DINOV3_SOURCE} from Hugging Face (gated: accept Meta's DINOv3 licence first) into one "
        f"folder and pass that folder, or pass the model.safetensors file itself."
    )


def load_dinov3_model(path: str, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"):
    """Build ``transformers.DINOv3ViTModel`` from a folder (config.json + model.safetensors) or a
    single ``.safetensors`` file (config derived from the tensor shapes), strictly loaded, eval mode.

    Raises:
        FileNotFoundError: the folder lacks a file, or the path does not exist (names the file).
        ValueError: keys or shapes do not match the config (lists them).
    """
    from safetensors.torch import load_file

    config_cls, model_cls = _transformers_classes()
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        weights_path = os.path.join(path, "model.safetensors")
        for p in (cfg_path, weights_path):
            if not os.path.isfile(p):
                raise _missing_file_error(p)
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        state_dict = load_file(weights_path)
    elif os.path.isfile(path):
        weights_path = path
        state_dict = load_file(weights_path)
        cfg = config_from_state_dict(state_dict)
    else:
        raise _missing_file_error(path)
    config = config_cls.from_dict(cfg)
    config._attn_implementation = "sdpa"
    with _no_init_weights():
        model = model_cls(config)
    _load_strict(model, state_dict, weights_path)
    return model.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------- features
def _layers(model) -> torch.nn.ModuleList:
    """Transformer layers: ``model.model.layer`` (transformers >= 5) or ``model.layer`` (4.x)."""
    encoder = getattr(model, "model", None)
    if encoder is not None and hasattr(encoder, "layer"):
        return encoder.layer
    return model.layer


def _as_pil_list(images: ImageInput) -> List[Image.Image]:
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return [image_to_pil(im) for im in images]
    if isinstance(images, (Image.Image, torch.Tensor)):
        return [image_to_pil(images)]
    return [image_to_pil(im) for im in images]


def prepare_pixels(images: ImageInput, image_size: int) -> torch.Tensor:
    """Images -> normalised pixels ``[B, 3, S, S]`` float32 (CPU), the reference's PIL path.

    Args:
        images: PIL image(s), float tensor ``[H, W, 3]`` or a batch ``[B, H, W, 3]`` in [0, 1]
            (tensors are quantised to uint8 like a saved image, then resized with PIL LANCZOS).
        image_size: S (512 or 1024 in TRELLIS.2; any multiple of the patch size works).
    """
    arrays = []
    for im in _as_pil_list(images):
        im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
        arrays.append(np.asarray(im.convert("RGB")).astype(np.float32) / 255)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


class DinoV3FeatureExtractor:
    """TRELLIS.2 image conditioning: all DINOv3 tokens after a non-affine LayerNorm.

    Args:
        model: a ``transformers.DINOv3ViTModel`` (eval mode).
        image_size: default S for ``__call__`` (512 for the 512 stages, 1024 for the 1024 stage).
    """

    def __init__(self, model, image_size: int = 512):
        self.model = model
        self.image_size = image_size

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        image_size: int = 512,
    ) -> "DinoV3FeatureExtractor":
        """Load from a local folder or ``.safetensors`` file (see :func:`load_dinov3_model`)."""
        return cls(load_dinov3_model(path, dtype=dtype, device=device), image_size=image_size)

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embeddings.weight.dtype

    @property
    def num_register_tokens(self) -> int:
        return int(self.model.config.num_register_tokens)

    @property
    def patch_size(self) -> int:
        return int(self.model.config.patch_size)

    def to(self, device: Union[str, torch.device]) -> "DinoV3FeatureExtractor":
        self.model.to(device)
        return self

    @torch.no_grad()
    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3, S, S]`` -> features ``[B, 1 + R + (S/p)^2, D]`` float32.

        embeddings -> RoPE -> all layers -> non-affine LayerNorm (fp32, eps 1e-5); no final ``norm``.
        """
        x = pixel_values.to(device=self.device, dtype=self.dtype)
        hidden = self.model.embeddings(x, bool_masked_pos=None)
        position_embeddings = self.model.rope_embeddings(x)
        for layer in _layers(self.model):
            hidden = layer(hidden, position_embeddings=position_embeddings)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        hidden = hidden.float()
        return F.layer_norm(hidden, hidden.shape[-1:], eps=FEATURE_LN_EPS)

    def __call__(self, images: ImageInput, image_size: Optional[int] = None) -> torch.Tensor:
        """Images (see :func:`prepare_pixels`) -> features ``[B, 1 + R + (S/16)^2, D]`` float32."""
        size = self.image_size if image_size is None else int(image_size)
        if size % self.patch_size:
            raise ValueError(f"image_size {size} must be a multiple of the patch size {self.patch_size}")
        return self.extract_features(prepare_pixels(images, size))


def get_cond(extractor: DinoV3FeatureExtractor, images: ImageInput, image_size: int) -> Dict[str, torch.Tensor]:
    """``{"cond": features [B, T, D], "neg_cond": zeros_like(cond)}`` (reference ``get_cond``)."""
    cond = extractor(images, image_size=image_size)
    return {"cond": cond, "neg_cond": torch.zeros_like(cond)}
