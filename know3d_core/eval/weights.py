"""Reading user-supplied checkpoints of evaluation models and checking them against a module, key by
key, before any slow work (the Uni3D point encoder and its OpenCLIP image tower).

``read_state(path, what)``: tensors of a ``.safetensors`` file or of a tensors-only ``.pt`` / ``.pth``
/ ``.bin`` (``torch.load(weights_only=True)``: no code is run), unwrapped from a training container
(``{"module": ...}`` as DeepSpeed saves, ``{"state_dict": ...}``, ``{"model": ...}``) and stripped of
a DistributedDataParallel ``module.`` prefix. ``check_state(module, state, ...)``: every key the
module has must be there with its shape, and every other key must be one the caller names as
unused by design; anything else raises :class:`WeightsError` naming the file and what it should be.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Mapping, Sequence

import torch
from torch import nn

__all__ = ["WeightsError", "read_state", "check_state", "load_strict"]

CONTAINERS = ("module", "state_dict", "model")
DDP_PREFIX = "module."


class WeightsError(ValueError):
    """A checkpoint that is missing, unreadable or of another layout; the message names the file."""


def _resave_hint(path: str) -> str:
    return ("re-save its tensors as safetensors (only for a file you trust): python -c \"import torch; "
            "from safetensors.torch import save_file; s = torch.load('" + path + "', map_location='cpu', "
            "weights_only=False); s = s.get('module', s.get('state_dict', s)); save_file({k: v.contiguous() for k, v in s.items() "
            "if torch.is_tensor(v)}, 'weights.safetensors')\"")


def read_state(path: str, what: str) -> Dict[str, torch.Tensor]:
    """``{key: tensor}`` of the checkpoint ``path`` (``what`` names it in errors)."""
    if not os.path.isfile(path):
        raise WeightsError(f"{what} {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure: the same advice
            raise WeightsError(f"{what} {path} cannot be read as a tensors-only checkpoint "
                               f"({type(e).__name__}); {_resave_hint(path)}") from None
    for key in CONTAINERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{what} {path}: expected a state dict of tensors")
    if state and all(k.startswith(DDP_PREFIX) for k in state):
        state = {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    return state


def _few(items: Sequence[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def check_state(module: nn.Module, state: Mapping[str, torch.Tensor], path: str, what: str,
                unused: Callable[[str], bool] = lambda key: False, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The tensors of ``state`` that ``module`` takes (keys under ``prefix``, prefix removed).

    Raises :class:`WeightsError` for a missing key, a wrong shape, or a key under ``prefix`` that
    is neither the module's nor ``unused(full key)``.
    """
    expected = module.state_dict()
    mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing = sorted(prefix + k for k in set(expected) - set(mine))
    unexpected = sorted(prefix + k for k in set(mine) - set(expected) if not unused(prefix + k))
    shapes = [f"{prefix}{k} {tuple(mine[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in mine and mine[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = ([f"missing {_few(missing)}"] if missing else []) + \
            ([f"unexpected {_few(unexpected)}"] if unexpected else []) + ([f"wrong shapes {_few(shapes)}"] if shapes else [])
        raise WeightsError(f"{path} is not {what}: " + "; ".join(parts))
    return {k: v for k, v in mine.items() if k in expected}


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: str, what: str,
                unused: Callable[[str], bool] = lambda key: False, prefix: str = "") -> nn.Module:
    """:func:`check_state`, then ``module.load_state_dict(..., strict=True)``; returns the module in eval mode."""
    module.load_state_dict(check_state(module, state, path, what, unused, prefix), strict=True)
    return module.eval().requires_grad_(False)
