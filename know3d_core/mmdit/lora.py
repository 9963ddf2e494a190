"""Qwen-Image(-Edit) LoRA files, merged into a diffusers ``QwenImageTransformer2DModel`` at load.

Key families accepted (module paths equal diffusers' names, e.g. ``transformer_blocks.0.attn.to_q``):

| family    | example key                                                        |
|-----------|--------------------------------------------------------------------|
| diffusers | ``transformer.<module>.lora_A.weight`` / ``lora_B`` (PEFT save)      |
| bare      | ``<module>.lora_A.weight`` (also ``lora_A.default.weight``)         |
| comfyui   | ``diffusion_model.<module>.lora_A.weight`` (ComfyUI / ai-toolkit)   |
| kohya     | ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up`` / ``alpha`` |

Every family may use either ``lora_A/lora_B`` or ``lora_down/lora_up``. Scale per module:
``alpha / rank`` from the module's ``.alpha`` tensor, else from diffusers' PEFT metadata
(``lora_adapter_metadata``: ``lora_alpha``, ``r``, ``alpha_pattern``), else 1.
Merge: ``W += strength * (alpha / rank) * B @ A`` computed in float32.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".alpha": "alpha",
}
_FAMILY_PREFIXES = (("diffusers", "transformer."), ("comfyui", "diffusion_model."), ("kohya", "lora_unet_"))


class LoraError(ValueError):
    pass


@dataclass
class LoraReport:
    path: str
    family: str
    modules: list[str]
    ranks: dict[str, int]
    scales: dict[str, float] = field(default_factory=dict)


def _split_key(key: str) -> tuple[str, str] | None:
    for suf, role in _SUFFIXES.items():
        if key.endswith(suf):
            return key[: -len(suf)], role
    return None


def _family_of(name: str) -> tuple[str, str]:
    for fam, pre in _FAMILY_PREFIXES:
        if name.startswith(pre):
            return fam, name[len(pre):]
    return "bare", name


def _peft_alpha(metadata: dict, module: str, rank: int) -> float | None:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    cfg = json.loads(raw)
    # keys are plain PEFT config fields, or prefixed "transformer." by diffusers' pipeline save
    get = lambda k: cfg.get(k, cfg.get(f"transformer.{k}"))  # noqa: E731
    for pattern, value in (get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    alpha = get("lora_alpha")
    return float(alpha) if alpha is not None else None


def read_lora(path: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict, str]:
    """Group a LoRA safetensors file by module: {raw_module_name: {"down", "up", "alpha"}}.

    Returns (groups, file metadata, family). Unrecognised keys raise ``LoraError``.
    """
    if not os.path.isfile(path):
        raise LoraError(f"LoRA file not found: {path}")
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        groups, family = group_lora_tensors(((key, f.get_tensor(key)) for key in f.keys()), path)
    return groups, metadata, family


def group_lora_tensors(items, path: str) -> tuple[dict[str, dict[str, torch.Tensor]], str]:
    """``(key, tensor)`` pairs of a LoRA file -> ``({raw_module_name: {"down", "up", "alpha"}}, family)``
    (tensors may be meta tensors made from the header). Unrecognised keys raise ``LoraError``."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in items:
        parts = _split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        groups.setdefault(parts[0], {})[parts[1]] = tensor
    if unknown:
        raise LoraError(f"{path}: {len(unknown)} keys are not LoRA down/up/alpha tensors of a supported "
                        f"kind (e.g. {unknown[:3]}); LyCORIS/LoHa/LoKr/DoRA files are not supported")
    if not groups:
        raise LoraError(f"{path}: no LoRA tensors found")
    families = {_family_of(name)[0] for name in groups}
    if len(families) > 1:
        raise LoraError(f"{path}: mixes key families {sorted(families)}")
    return groups, families.pop()


def _resolve(name: str, family: str, linears: dict[str, torch.nn.Linear],
             underscored: dict[str, str]) -> str | None:
    _, bare = _family_of(name)
    if family == "kohya":
        return underscored.get(bare)
    return bare if bare in linears else None


def match_lora(transformer: torch.nn.Module, groups: dict, family: str, path: str) -> dict[str, str]:
    """``{LoRA module: Linear of transformer}``; raises ``LoraError`` naming the file when any LoRA
    module matches no module of the model (a LoRA for another architecture), when shapes disagree,
    or when up/down are incomplete. Reads only shapes (works on meta tensors and models)."""
    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    underscored = {n.replace(".", "_"): n for n in linears}
    resolved, unmatched = {}, []
    for name, g in groups.items():
        target = _resolve(name, family, linears, underscored)
        if target is None:
            unmatched.append(name)
        else:
            resolved[name] = target
    if unmatched:
        raise LoraError(
            f"{path}: {len(unmatched)} of {len(groups)} LoRA modules ({family} keys) match no module of "
            f"{type(transformer).__name__} (e.g. {sorted(unmatched)[:3]}); {len(resolved)} matched. "
            "Is it a LoRA for another architecture?")
    for name, target in resolved.items():
        g = groups[name]
        if "down" not in g or "up" not in g:
            raise LoraError(f"{path}: module {name} lacks its {'up' if 'down' in g else 'down'} matrix")
        down, up, lin = g["down"], g["up"], linears[target]
        rank = down.shape[0]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != rank or \
                (up.shape[0], down.shape[1]) != tuple(lin.weight.shape):
            raise LoraError(f"{path}: module {name}: up {tuple(up.shape)} @ down {tuple(down.shape)} does not "
                            f"fit {target}.weight {tuple(lin.weight.shape)}")
    return resolved


@torch.no_grad()
def merge_lora(transformer: torch.nn.Module, path: str, strength: float = 1.0) -> LoraReport:
    """Merge the LoRA at ``path`` into ``transformer``'s Linear weights in place.

    Raises ``LoraError`` as :func:`match_lora`. Nothing is modified unless every module matches.
    """
    groups, metadata, family = read_lora(path)
    resolved = match_lora(transformer, groups, family, path)
    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    plan = []
    for name, target in resolved.items():
        g = groups[name]
        down, up, lin = g["down"], g["up"], linears[target]
        rank = down.shape[0]
        alpha = float(g["alpha"].item()) if "alpha" in g else _peft_alpha(metadata, target, rank)
        plan.append((target, lin, up, down, (alpha / rank) if alpha is not None else 1.0, rank))
    report = LoraReport(path=path, family=family, modules=[], ranks={})
    for target, lin, up, down, scale, rank in plan:
        w = lin.weight
        delta = (up.to(w.device, torch.float32) @ down.to(w.device, torch.float32)) * (scale * strength)
        w.copy_((w.to(torch.float32) + delta).to(w.dtype))
        report.modules.append(target)
        report.ranks[target] = rank
        report.scales[target] = scale
    return report
