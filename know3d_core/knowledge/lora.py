"""Backbone LoRA for the TRELLIS.2 flow models (paper §4.1.2: rank 64 on the original network).

A LoRA on a linear layer ``y = x W^T + b`` (``W [out, in]``) adds ``s * (x A^T) B^T`` with
``A [r, in]``, ``B [out, r]``, ``s = alpha / r``. Two ways to run it:
- merged (the default at load time): ``W <- cast(float32(W) + s * float32(B) @ float32(A))``, so the
  forward costs nothing extra; the sum is formed in fp32 and cast once, so bf16 weights get one
  rounding, not two;
- unmerged (verification, training): the factors are attached to the layer as ``lora_A`` /
  ``lora_B`` sub-modules plus a forward hook; the layer's own ``weight`` / ``bias`` stay untouched
  and ``model.state_dict()`` shows the factors under the names the Know3D file uses
  (``blocks.3.self_attn.to_qkv.lora_A.weight``).

Which layers: every attention and MLP linear layer of every block (``DEFAULT_LORA_TARGETS``):
self-attention ``to_qkv``/``to_out``, image cross-attention ``to_q``/``to_kv``/``to_out`` and the
MLP's two layers — 7 per block, 210 per flow model. Not the input/output layers, the timestep
embedder, the shared adaLN modulation, or the Know3D branch (that one is trained in full). A Know3D
file may name any other linear layer; its factors say which layers they belong to.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
import torch.nn as nn

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LoRAError",
    "check_lora_factors",
    "lora_target_names",
    "init_lora",
    "attach_lora",
    "merge_lora",
    "merge_attached_lora",
    "detach_lora",
    "lora_state_dict",
    "lora_factors_from_state_dict",
    "has_attached_lora",
]

DEFAULT_LORA_TARGETS = (
    "self_attn.to_qkv",
    "self_attn.to_out",
    "cross_attn.to_q",
    "cross_attn.to_kv",
    "cross_attn.to_out",
    "mlp.mlp.0",
    "mlp.mlp.2",
)
LORA_A = "lora_A"
LORA_B = "lora_B"
_HOOK_ATTR = "_know3d_lora_hook"

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


class LoRAError(ValueError):
    """LoRA factors that do not fit the model (unknown layer, wrong shape, mixed ranks)."""


def _is_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) or (
        isinstance(weight, nn.Parameter) and weight.dim() == 2 and "Linear" in type(module).__name__
    )


def lora_target_names(model: nn.Module, targets: Iterable[str] = DEFAULT_LORA_TARGETS) -> list[str]:
    """Module names ``blocks.{i}.{target}`` of ``model`` that are linear layers, in block order."""
    suffixes = tuple(targets)
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) < 3 or parts[0] != "blocks" or not _is_linear(module):
            continue
        if ".".join(parts[2:]) in suffixes:
            names.append(name)
    if not names:
        raise LoRAError(f"{type(model).__name__} has no linear layers named blocks.N.{{{', '.join(suffixes)}}}")
    return names


def check_lora_factors(model: nn.Module, factors: Factors, source: str = "LoRA factors") -> dict[str, nn.Module]:
    """Resolve factor names to linear modules; raise naming ``source`` and the layer on any misfit."""
    modules = dict(model.named_modules())
    ranks = set()
    resolved = {}
    for name, (a, b) in factors.items():
        module = modules.get(name)
        if module is None or not _is_linear(module):
            what = "no such layer" if module is None else f"a {type(module).__name__}, not a linear layer"
            raise LoRAError(f"{source}: LoRA factors for {name!r}, but the model has {what}")
        out_f, in_f = module.weight.shape
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise LoRAError(
                f"{source}: LoRA factors for {name!r} have A {tuple(a.shape)} and B {tuple(b.shape)}; "
                f"the layer is [{out_f}, {in_f}], so A must be [r, {in_f}] and B [{out_f}, r]"
            )
        ranks.add(int(a.shape[0]))
        resolved[name] = module
    if len(ranks) > 1:
        raise LoRAError(f"{source}: LoRA factors of different ranks {sorted(ranks)}; one rank per file")
    return resolved


@torch.no_grad()
def merge_lora(model: nn.Module, factors: Factors, alpha: float, source: str = "LoRA factors") -> int:
    """Fold LoRA factors into the weights: ``W <- cast(W + (alpha / r) * B @ A)`` computed in fp32.

    Args:
        factors: ``{module name: (A [r, in], B [out, r])}``.
        alpha: LoRA alpha; the scale is ``alpha / r``.
        source: named in errors (the file the factors came from).
    Returns:
        the number of layers changed.
    """
    for name, module in check_lora_factors(model, factors, source).items():
        a, b = factors[name]
        scale = float(alpha) / a.shape[0]
        w = module.weight
        delta = b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)
        w.copy_((w.float() + scale * delta).to(w.dtype))
    return len(factors)


def _lora_forward_hook(module: nn.Module, args: tuple, output):
    """Adds ``scale * lora_B(lora_A(x))``; works for dense tensors and sparse tensors (``.feats``)."""
    x = args[0]
    sparse = hasattr(output, "feats") and hasattr(output, "replace")
    feats_in = x.feats if hasattr(x, "feats") else x
    lora_dtype = module.lora_A.weight.dtype
    delta = module.lora_B(module.lora_A(feats_in.to(lora_dtype))) * module.lora_scale
    if sparse:
        return output.replace(output.feats + delta.to(output.feats.dtype))
    return output + delta.to(output.dtype)


def _attach_one(module: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float, dtype) -> None:
    if getattr(module, _HOOK_ATTR, None) is not None:
        raise LoRAError(f"a LoRA is already attached to this {type(module).__name__}; detach or merge it first")
    device = module.weight.device
    r, in_f = a.shape
    module.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=dtype)
    module.lora_B = nn.Linear(r, b.shape[0], bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        module.lora_A.weight.copy_(a)
        module.lora_B.weight.copy_(b)
    module.lora_scale = scale
    setattr(module, _HOOK_ATTR, module.register_forward_hook(_lora_forward_hook))


def attach_lora(
    model: nn.Module,
    factors: Factors,
    alpha: float,
    source: str = "LoRA factors",
    dtype: torch.dtype = torch.float32,
) -> int:
    """Unmerged mode: attach the factors as ``lora_A`` / ``lora_B`` sub-modules with a forward hook.

    ``dtype``: the factors' storage and compute dtype (fp32 by default, whatever the layer's dtype:
    the verification mode should not add roundings). Returns the number of layers.
    """
    for name, module in check_lora_factors(model, factors, source).items():
        a, b = factors[name]
        _attach_one(module, a, b, float(alpha) / a.shape[0], dtype)
    return len(factors)


def init_lora(
    model: nn.Module,
    rank: int,
    alpha: Optional[float] = None,
    targets: Iterable[str] = DEFAULT_LORA_TARGETS,
    dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
    b_std: float = 0.0,
) -> list[str]:
    """Attach fresh trainable factors to every target layer (A ~ N(0, 1/in), B = 0 unless ``b_std``).

    Returns the layer names. ``alpha`` defaults to ``rank`` (scale 1).
    """
    alpha = float(rank if alpha is None else alpha)
    names = lora_target_names(model, targets)
    modules = dict(model.named_modules())
    for name in names:
        out_f, in_f = modules[name].weight.shape
        a = torch.randn(rank, in_f, generator=generator) / in_f ** 0.5
        b = torch.randn(out_f, rank, generator=generator) * b_std
        _attach_one(modules[name], a, b, alpha / rank, dtype)
    return names


def _attached(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if getattr(m, _HOOK_ATTR, None) is not None}


def has_attached_lora(model: nn.Module) -> bool:
    """True when any layer carries unmerged LoRA factors."""
    return bool(_attached(model))


def detach_lora(model: nn.Module) -> int:
    """Remove attached factors without merging (back to the plain weights). Returns the layer count."""
    mods = _attached(model)
    for module in mods.values():
        getattr(module, _HOOK_ATTR).remove()
        delattr(module, _HOOK_ATTR)
        del module.lora_A, module.lora_B, module.lora_scale
    return len(mods)


@torch.no_grad()
def merge_attached_lora(model: nn.Module) -> int:
    """Fold attached (unmerged) factors into the weights, then remove them. Returns the layer count."""
    mods = _attached(model)
    for module in mods.values():
        w = module.weight
        delta = module.lora_B.weight.float() @ module.lora_A.weight.float()
        w.copy_((w.float() + module.lora_scale * delta.to(w.device)).to(w.dtype))
    detach_lora(model)
    return len(mods)


def lora_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], Optional[float]]:
    """Attached factors as ``{name.lora_A.weight: A, name.lora_B.weight: B}`` and their common alpha.

    Returns ``({}, None)`` when no LoRA is attached.
    """
    mods = _attached(model)
    out: dict[str, torch.Tensor] = {}
    alphas = set()
    for name, module in mods.items():
        a, b = module.lora_A.weight, module.lora_B.weight
        out[f"{name}.{LORA_A}.weight"] = a.detach()
        out[f"{name}.{LORA_B}.weight"] = b.detach()
        alphas.add(round(module.lora_scale * a.shape[0], 6))
    if len(alphas) > 1:
        raise LoRAError(f"attached LoRAs use different alphas {sorted(alphas)}; one alpha per file")
    return out, (alphas.pop() if alphas else None)


def lora_factors_from_state_dict(
    tensors: Mapping[str, torch.Tensor], source: str = "LoRA factors"
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name.lora_A.weight, name.lora_B.weight}`` pairs -> ``{name: (A, B)}``; unpaired keys raise."""
    a_keys = {k[: -len(f".{LORA_A}.weight")]: k for k in tensors if k.endswith(f".{LORA_A}.weight")}
    b_keys = {k[: -len(f".{LORA_B}.weight")]: k for k in tensors if k.endswith(f".{LORA_B}.weight")}
    unpaired = sorted(set(a_keys) ^ set(b_keys))
    if unpaired:
        raise LoRAError(f"{source}: LoRA layers with only one of lora_A / lora_B: {unpaired[:5]}")
    return {name: (tensors[a_keys[name]], tensors[b_keys[name]]) for name in sorted(a_keys)}
