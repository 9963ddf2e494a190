"""Loading a diffusers-format Qwen-Image-Edit folder (transformer/, vae/, text_encoder/, scheduler/,
processor/) with errors that name any missing file."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .model_build import rebuild_meta_attributes, require_zero_cond_t

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


def _file_keys(files: list[str]) -> set[str]:
    from safetensors import safe_open
    keys = set()
    for p in files:
        with safe_open(p, framework="pt", device="cpu") as f:
            keys.update(f.keys())
    return keys


def load_diffusers_model(cls, folder: str, sub: str, dtype: torch.dtype, device="cpu", storage: str | None = None):
    """Strict, meta-device load of a diffusers model from ``folder/sub`` (config + safetensors).

    Builds the model from its config without allocating, checks that the files hold exactly the
    model's keys and shapes (the error names the folder, missing and unexpected keys), then
    assigns the tensors read straight onto ``device`` in ``dtype``. ``storage`` (``plan.FP8_STORAGE``):
    the Linear/Conv weights are stored in fp8 as they are read (``mmdit.memory.load_dtypes``).
    """
    d = os.path.join(folder, sub)
    cfg = _read_json(_need(os.path.join(d, "config.json"), f"{sub} config"))
    files = check_weights(folder, sub, "diffusion_pytorch_model")
    with torch.device("meta"):
        model = cls.from_config(cfg)
    from .memory import load_dtypes

    dtypes = load_dtypes(model, storage, dtype)
    expected = model.state_dict()
    keys = _file_keys(files)
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or unexpected:
        raise ValueError(f"{d}: state dict mismatch: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    from safetensors.torch import load_file
    state = {}
    for p in files:
        for k, v in load_file(p, device=str(device)).items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise ValueError(f"{p}: {k} has shape {tuple(v.shape)}, the config needs {tuple(expected[k].shape)}")
            state[k] = v.to(dtype).to(dtypes[k]) if v.is_floating_point() else v
    model.load_state_dict(state, strict=True, assign=True)
    rebuild_meta_attributes(model)
    return model.eval().requires_grad_(False)


def load_transformer(folder: str, dtype: torch.dtype = torch.bfloat16, device="cpu", storage: str | None = None):
    """``folder/transformer`` -> QwenImageTransformer2DModel (strict; 2511 flag honoured; ``storage``:
    weights stored in fp8 as read)."""
    from diffusers import QwenImageTransformer2DModel
    cfg = _read_json(_need(os.path.join(folder, "transformer", "config.json"), "transformer config"))
    if cfg.get("zero_cond_t"):
        require_zero_cond_t()
    return load_diffusers_model(QwenImageTransformer2DModel, folder, "transformer", dtype, device, storage)


def load_vae(folder: str, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    from diffusers import AutoencoderKLQwenImage
    return load_diffusers_model(AutoencoderKLQwenImage, folder, "vae", dtype, device)


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
                   model_name: str | None = None, files: dict | None = None,
                   storage: str | None = None) -> QwenEditComponents:
    """Load the named components of a diffusers-format Qwen-Image-Edit folder.

    ``files``: ``{"transformer" | "text_encoder": path}`` of ComfyUI single files to read those weights
    from instead (``mmdit.comfy_files``; the folder still gives their configs). ``storage``: the MMDiT's
    weights stored in fp8 as they are read (a memory plan's ``mmdit_storage``)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")
    sched = load_scheduler_config(folder)
    if model_name is None:
        index = os.path.join(folder, "model_index.json")
        model_name = os.path.basename(os.path.normpath(folder))
        if os.path.isfile(index):
            model_name = _read_json(index).get("_name_or_path", model_name) or model_name
    files = dict(files or {})
    if files:
        from .comfy_files import load_comfy_text_encoder, load_comfy_transformer
    if "transformer" in files:
        cfg = _read_json(_need(os.path.join(folder, "transformer", "config.json"), "transformer config"))
        transformer = load_comfy_transformer(files["transformer"], cfg, dtype, device, storage)
    else:
        transformer = load_transformer(folder, dtype, device, storage)
    text_encoder = None
    if "text_encoder" in components and "text_encoder" in files:
        _need(os.path.join(folder, "text_encoder", "config.json"), "text encoder config")
        text_encoder = load_comfy_text_encoder(files["text_encoder"], os.path.join(folder, "text_encoder"), dtype,
                                               device)
    elif "text_encoder" in components:
        text_encoder = load_text_encoder(folder, dtype, device)
    return QwenEditComponents(
        transformer=transformer,
        vae=load_vae(folder, dtype, device) if "vae" in components else None,
        text_encoder=text_encoder,
        processor=load_processor(folder) if "processor" in components else None,
        scheduler_config=sched, model_name=model_name,
    )
