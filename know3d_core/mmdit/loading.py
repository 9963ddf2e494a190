"""Loading a diffusers-format Qwen-Image-Edit folder (transformer/, vae/, text_encoder/, scheduler/,
processor/) with errors that name any missing file."""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass

import torch

MIN_DIFFUSERS_FOR_ZERO_COND_T = "0.37.0"


def diffusers_supports_zero_cond_t() -> bool:
    from diffusers import QwenImageTransformer2DModel
    return "zero_cond_t" in inspect.signature(QwenImageTransformer2DModel.__init__).parameters


def require_zero_cond_t() -> None:
    """Raise if the installed diffusers cannot run Qwen-Image-Edit-2511 (``zero_cond_t``)."""
    if not diffusers_supports_zero_cond_t():
        import diffusers
        raise RuntimeError(
            f"Qwen-Image-Edit-2511 needs diffusers >= {MIN_DIFFUSERS_FOR_ZERO_COND_T} "
            f"(QwenImageTransformer2DModel(zero_cond_t=...)); installed: {diffusers.__version__}. "
            "Older versions silently ignore the flag and give wrong results.")


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _need(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {what}: {path}")
    return path


def check_weights(folder: str, sub: str, stem: str) -> list[str]:
    """The weight files of ``folder/sub``: ``stem.safetensors`` or an index and all its shards."""
    d = os.path.join(folder, sub)
    single = os.path.join(d, f"{stem}.safetensors")
    index = os.path.join(d, f"{stem}.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(d, s))]
        if missing:
            raise FileNotFoundError(f"missing {len(missing)} weight shard(s) listed in {index}: {missing[:3]}")
        return [os.path.join(d, s) for s in shards]
    raise FileNotFoundError(f"missing weights: neither {single} nor {index}")


def _check_strict(model: torch.nn.Module, files: list[str]) -> None:
    from safetensors import safe_open
    keys = set()
    for p in files:
        with safe_open(p, framework="pt", device="cpu") as f:
            keys.update(f.keys())
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    if missing or unexpected:
        raise ValueError(f"{os.path.dirname(files[0])}: state dict mismatch: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def load_transformer(folder: str, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    """``folder/transformer`` -> QwenImageTransformer2DModel (strict; 2511 flag honoured)."""
    from diffusers import QwenImageTransformer2DModel
    cfg = _read_json(_need(os.path.join(folder, "transformer", "config.json"), "transformer config"))
    files = check_weights(folder, "transformer", "diffusion_pytorch_model")
    if cfg.get("zero_cond_t"):
        require_zero_cond_t()
    model = QwenImageTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype)
    _check_strict(model, files)
    return model.to(device).eval()


def load_vae(folder: str, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    from diffusers import AutoencoderKLQwenImage
    _need(os.path.join(folder, "vae", "config.json"), "VAE config")
    files = check_weights(folder, "vae", "diffusion_pytorch_model")
    vae = AutoencoderKLQwenImage.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
    _check_strict(vae, files)
    return vae.to(device).eval()


def load_text_encoder(folder: str, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    from transformers import Qwen2_5_VLForConditionalGeneration
    _need(os.path.join(folder, "text_encoder", "config.json"), "text encoder config")
    check_weights(folder, "text_encoder", "model")
    te = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(folder, "text_encoder"), dtype=dtype)
    return te.to(device).eval()


def load_processor(folder: str):
    """``folder/processor`` (or ``tokenizer/``) -> Qwen2.5-VL processor. Needs torchvision in
    transformers >= 5 (video processor)."""
    d = os.path.join(folder, "processor")
    if not os.path.isdir(d):
        raise FileNotFoundError(f"missing processor folder: {d}")
    _need(os.path.join(d, "preprocessor_config.json"), "image processor config")
    if not any(os.path.isfile(os.path.join(d, n)) for n in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(f"missing tokenizer files in {d} (tokenizer.json or vocab.json + merges.txt)")
    from transformers import AutoProcessor
    try:
        return AutoProcessor.from_pretrained(d)
    except Exception as e:  # transformers' own message rarely names the cause
        raise RuntimeError(f"could not load the Qwen2.5-VL processor from {d}: {e} "
                           "(transformers >= 5 needs torchvision for Qwen2-VL processors)") from e


def load_scheduler_config(folder: str) -> dict:
    return _read_json(_need(os.path.join(folder, "scheduler", "scheduler_config.json"), "scheduler config"))


@dataclass
class QwenEditComponents:
    transformer: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    processor: object | None
    scheduler_config: dict
    model_name: str


def load_qwen_edit(folder: str, *, dtype: torch.dtype = torch.bfloat16, device="cpu",
                   components: tuple[str, ...] = ("transformer", "vae", "text_encoder", "processor"),
                   model_name: str | None = None) -> QwenEditComponents:
    """Load the named components of a diffusers-format Qwen-Image-Edit folder."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")
    sched = load_scheduler_config(folder)
    if model_name is None:
        index = os.path.join(folder, "model_index.json")
        model_name = os.path.basename(os.path.normpath(folder))
        if os.path.isfile(index):
            model_name = _read_json(index).get("_name_or_path", model_name) or model_name
    return QwenEditComponents(
        transformer=load_transformer(folder, dtype, device),
        vae=load_vae(folder, dtype, device) if "vae" in components else None,
        text_encoder=load_text_encoder(folder, dtype, device) if "text_encoder" in components else None,
        processor=load_processor(folder) if "processor" in components else None,
        scheduler_config=sched, model_name=model_name,
    )
