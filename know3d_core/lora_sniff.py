"""What a LoRA file is for, from its key names alone (for error messages).

``lora_modules(keys)`` strips the adapter suffixes (``.lora_A.weight``, ``.lora_down.weight``,
``.alpha``, LyCORIS ``.hada_w1_a`` ...) to count the modules a file patches;
``describe_lora(keys)`` names the architecture the key names look like, e.g.
"a Flux LoRA (keys like 'double_blocks.0.img_attn.qkv')".
"""
from __future__ import annotations

import re
from typing import Iterable

__all__ = ["lora_modules", "describe_lora", "looks_like_qwen_image"]

_SUFFIX = re.compile(
    r"\.(lora_[AB](\.default)?\.weight|lora_(up|down|mid)\.weight|lora\.(up|down)\.weight|"
    r"lora_linear_layer\.(up|down)\.weight|alpha|dora_scale|diff|diff_b|set_weight|w_norm|b_norm|"
    r"hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2|oft_blocks|oft_diag|rescale)$"
)
_PREFIXES = ("diffusion_model.", "transformer.", "model.diffusion_model.", "unet.", "base_model.model.")

# (name, regex on the module name with prefixes removed); first match wins.
_ARCHES = (
    ("Qwen-Image", r"(^|_|\.)transformer_blocks[._]\d+[._](attn[._](to_q|to_k|to_v|add_q_proj|add_k_proj|"
                   r"add_v_proj|to_out|to_add_out)|img_mlp|txt_mlp|img_mod|txt_mod)"),
    ("Flux", r"(^|_|\.)(double_blocks|single_blocks)[._]\d+"),
    ("Wan video", r"(^|_|\.)blocks[._]\d+[._](self_attn|cross_attn|ffn)"),
    ("SD3 / MMDiT", r"(^|_|\.)joint_blocks[._]\d+"),
    ("SD 1.x / SDXL UNet", r"(^|_|\.)(input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)"),
    ("text encoder", r"^(lora_te\d?_|te\d?\.|text_encoder|lora_te)"),
)


def _module_name(key: str) -> str | None:
    m = _SUFFIX.search(key)
    if m is None:
        return None
    name = key[: m.start()]
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def lora_modules(keys: Iterable[str]) -> set[str]:
    """Module names the LoRA patches (prefixes like ``diffusion_model.`` removed)."""
    return {n for n in (_module_name(k) for k in keys) if n is not None}


def looks_like_qwen_image(keys: Iterable[str]) -> bool:
    mods = lora_modules(keys)
    return bool(mods) and any(re.search(_ARCHES[0][1], m) for m in mods)


def describe_lora(keys: Iterable[str]) -> str:
    """A short phrase naming what the key names look like."""
    keys = list(keys)
    mods = sorted(lora_modules(keys))
    if not keys:
        return "an empty file (no tensors)"
    if not mods:
        sample = ", ".join(repr(k) for k in keys[:3])
        return f"not a LoRA (no LoRA weight names; keys like {sample})"
    for name, pattern in _ARCHES:
        hits = [m for m in mods if re.search(pattern, m)]
        if hits:
            return f"a {name} LoRA ({_count(mods)}, keys like {hits[0]!r})"
    return f"a LoRA for an unknown architecture ({_count(mods)}, keys like {mods[0]!r})"


def _count(mods) -> str:
    return f"{len(mods)} module" + ("" if len(mods) == 1 else "s")
