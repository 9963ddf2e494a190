"""The Know3D checkpoint format: one safetensors file for the Know3D parts of the TRELLIS.2 flows.

Layout (README "Know3D checkpoint format" is the user-facing description):
- tensors, each under a per-model prefix (``MODEL_PREFIXES``) followed by the model's own key:
    ``{model}.knowledge_proj.{linear,norm}.{weight,bias}``                       projector
    ``{model}.blocks.{i}.knowledge_attn.{norm,to_q,to_kv,to_out}.{weight,bias}``  per-block branch
    ``{model}.blocks.{i}.knowledge_attn.{q,k}_rms_norm.gamma``
    ``{model}.blocks.{i}.<layer>.lora_A.weight [r, in]`` / ``.lora_B.weight [out, r]``  LoRA
  A ``merged`` file instead holds every key of each model (official keys with the LoRA folded in,
  plus the branch) and the model configs, so it loads without the official files.
- metadata (safetensors string map): ``format`` = "know3d", ``format_version``, ``content``
  ("delta" | "merged"), ``models`` (JSON list), ``knowledge_kind``, ``knowledge_dim``,
  ``mmdit_layers`` / ``sigma`` / ``mmdit_model`` (JSON, null unless mmdit_hidden), ``lora_rank``,
  ``lora_alpha``, ``lora_merged``, ``branch`` (JSON ``{num_heads, qk_rms_norm, ln_eps}``), and for
  merged files ``configs`` (JSON ``{model: {"name", "args"}}`` as in the official ckpts/*.json).

Loading: (a) official TRELLIS.2 models + a delta file: :func:`apply_know3d`; (b) a merged file:
:func:`load_know3d_merged`. :func:`save_know3d` writes either, so files round-trip.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .branch import BRANCH_PREFIXES, LN_EPS, branch_state_dict, has_branch, install_branch, remove_branch
from .kinds import INJECTED_KINDS, MMDIT_HIDDEN, Knowledge, check_knowledge, describe_expected
from .lora import (
    LORA_A,
    LORA_B,
    attach_lora,
    check_lora_factors,
    has_attached_lora,
    lora_factors_from_state_dict,
    lora_state_dict,
    merge_lora,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MODEL_NAMES",
    "Know3DFormatError",
    "Know3DSpec",
    "Know3DCheckpoint",
    "capture_spec",
    "read_know3d",
    "save_know3d",
    "apply_know3d",
    "load_know3d_merged",
]

FORMAT = "know3d"
FORMAT_VERSION = 1
MODEL_NAMES = ("sparse_structure_flow_model", "shape_slat_flow_model_512", "shape_slat_flow_model_1024")
CONTENTS = ("delta", "merged")


class Know3DFormatError(ValueError):
    """A file that is not a valid Know3D checkpoint, or that does not fit the models given."""


@dataclass
class Know3DSpec:
    """What a Know3D checkpoint was trained for (its metadata).

    Attributes:
        knowledge_kind: one of ``INJECTED_KINDS``.
        knowledge_dim: D of the knowledge tokens.
        mmdit_layers, sigma, mmdit_model: the capture (``mmdit_hidden`` only).
        lora_rank, lora_alpha: backbone LoRA (rank 0: none); scale = alpha / rank.
        lora_merged: the LoRA is already folded into a merged file's weights.
        num_heads, qk_rms_norm, ln_eps: branch architecture.
    """

    knowledge_kind: str
    knowledge_dim: int
    mmdit_layers: Optional[list[int]] = None
    sigma: Optional[float] = None
    mmdit_model: Optional[str] = None
    lora_rank: int = 0
    lora_alpha: Optional[float] = None
    lora_merged: bool = False
    num_heads: Optional[int] = None
    qk_rms_norm: bool = True
    ln_eps: float = LN_EPS

    def validate(self, origin: str) -> None:
        """Raise :class:`Know3DFormatError` naming ``origin`` on inconsistent metadata."""
        if self.knowledge_kind not in INJECTED_KINDS:
            raise Know3DFormatError(
                f"{origin}: knowledge_kind {self.knowledge_kind!r} is not an injected kind "
                f"({', '.join(INJECTED_KINDS)}); multi_view needs no Know3D weights"
            )
        if self.knowledge_dim <= 0:
            raise Know3DFormatError(f"{origin}: knowledge_dim must be positive, got {self.knowledge_dim}")
        if self.knowledge_kind == MMDIT_HIDDEN:
            if not self.mmdit_layers or self.sigma is None:
                raise Know3DFormatError(f"{origin}: mmdit_hidden checkpoints must state mmdit_layers and sigma")
            if self.knowledge_dim % len(self.mmdit_layers):
                raise Know3DFormatError(
                    f"{origin}: knowledge_dim {self.knowledge_dim} is not a multiple of the "
                    f"{len(self.mmdit_layers)} MMDiT layers {self.mmdit_layers}"
                )
        if self.lora_rank < 0 or (self.lora_rank and self.lora_alpha is None):
            raise Know3DFormatError(f"{origin}: lora_rank {self.lora_rank} needs a lora_alpha")
        if abs(self.ln_eps - LN_EPS) > 0:
            raise Know3DFormatError(f"{origin}: branch ln_eps {self.ln_eps} is not supported (only {LN_EPS})")

    def describe(self) -> str:
        return describe_expected(self.knowledge_kind, self.knowledge_dim, self.mmdit_layers, self.sigma)

    def check(self, knowledge: Union[Knowledge, torch.Tensor], origin: str = "the Know3D checkpoint") -> None:
        """Raise ``KnowledgeMismatchError`` naming both unless ``knowledge`` is what this was trained for."""
        check_knowledge(knowledge, self.knowledge_kind, self.knowledge_dim, self.mmdit_layers, self.sigma, origin)

    def capture_metadata(self) -> dict[str, Any]:
        """``{"layers", "sigma"}`` for ``mmdit.capture.CaptureSpec.from_metadata`` (None for other kinds)."""
        return {"layers": self.mmdit_layers, "sigma": self.sigma}

    def to_metadata(self) -> dict[str, str]:
        return {
            "knowledge_kind": self.knowledge_kind,
            "knowledge_dim": str(int(self.knowledge_dim)),
            "mmdit_layers": json.dumps(self.mmdit_layers),
            "sigma": json.dumps(self.sigma),
            "mmdit_model": json.dumps(self.mmdit_model),
            "lora_rank": str(int(self.lora_rank)),
            "lora_alpha": json.dumps(self.lora_alpha),
            "lora_merged": json.dumps(bool(self.lora_merged)),
            "branch": json.dumps({"num_heads": self.num_heads, "qk_rms_norm": self.qk_rms_norm,
                                  "ln_eps": self.ln_eps}),
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], origin: str) -> "Know3DSpec":
        try:
            branch = json.loads(meta.get("branch", "{}"))
            layers = json.loads(meta.get("mmdit_layers", "null"))
            sigma = json.loads(meta.get("sigma", "null"))
            alpha = json.loads(meta.get("lora_alpha", "null"))
            spec = cls(
                knowledge_kind=meta["knowledge_kind"],
                knowledge_dim=int(meta["knowledge_dim"]),
                mmdit_layers=None if layers is None else [int(i) for i in layers],
                sigma=None if sigma is None else float(sigma),
                mmdit_model=json.loads(meta.get("mmdit_model", "null")),
                lora_rank=int(meta.get("lora_rank", "0")),
                lora_alpha=None if alpha is None else float(alpha),
                lora_merged=bool(json.loads(meta.get("lora_merged", "false"))),
                num_heads=branch.get("num_heads"),
                qk_rms_norm=bool(branch.get("qk_rms_norm", True)),
                ln_eps=float(branch.get("ln_eps", LN_EPS)),
            )
        except KeyError as e:
            raise Know3DFormatError(f"{origin}: metadata lacks {e.args[0]!r}") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise Know3DFormatError(f"{origin}: unreadable metadata ({e})") from None
        spec.validate(origin)
        return spec


def capture_spec(spec: Optional[Know3DSpec], *, layers=None, sigma: Optional[float] = None):
    """The MMDiT capture to run for a loaded Know3D checkpoint (``spec``, or None): explicit
    ``layers`` / ``sigma`` > the checkpoint's ``mmdit_layers`` / ``sigma`` (only when it was trained on
    ``mmdit_hidden``) > ``mmdit.capture`` defaults. The one rule the CLI pipeline and the nodes share."""
    from ..mmdit.capture import CaptureSpec

    meta = spec.capture_metadata() if spec is not None and spec.knowledge_kind == MMDIT_HIDDEN else {}
    return CaptureSpec.from_metadata(meta, layers=layers, sigma=sigma)


@dataclass
class Know3DCheckpoint:
    """A read Know3D file: its spec, content kind, tensors per model (keys without prefix), configs."""

    path: str
    spec: Know3DSpec
    content: str
    tensors: dict[str, dict[str, torch.Tensor]]
    configs: dict[str, dict] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return list(self.tensors)

    def check(self, knowledge: Union[Knowledge, torch.Tensor]) -> None:
        """Raise ``KnowledgeMismatchError`` naming this file and the knowledge unless they fit."""
        self.spec.check(knowledge, origin=f"Know3D checkpoint {self.path}")


# --------------------------------------------------------------------------------------- reading
def read_know3d(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> Know3DCheckpoint:
    """Read and validate a Know3D file (metadata, prefixes, branch shapes, LoRA rank)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Know3D checkpoint not found: {path}")
    with safe_open(path, framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise Know3DFormatError(
                f"{path} is not a Know3D checkpoint (metadata format={meta.get('format')!r}, expected "
                f"{FORMAT!r}); write one with know3d_core.knowledge.save_know3d"
            )
        version = int(meta.get("format_version", "0"))
        if version < 1 or version > FORMAT_VERSION:
            raise Know3DFormatError(
                f"{path} has format_version {version}; this code reads 1..{FORMAT_VERSION} (update the pack)"
            )
        content = meta.get("content")
        if content not in CONTENTS:
            raise Know3DFormatError(f"{path}: content {content!r} must be one of {CONTENTS}")
        spec = Know3DSpec.from_metadata(meta, path)
        try:
            names = [str(n) for n in json.loads(meta.get("models", "[]"))]
            configs = json.loads(meta.get("configs", "{}"))
        except ValueError as e:
            raise Know3DFormatError(f"{path}: unreadable models/configs metadata ({e})") from None
        if not names:
            raise Know3DFormatError(f"{path}: metadata 'models' lists no flow model")
        tensors: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
        for key in f.keys():
            name, _, sub = key.partition(".")
            if name not in tensors or not sub:
                raise Know3DFormatError(f"{path}: tensor {key!r} does not start with a listed model {names}")
            tensors[name][sub] = f.get_tensor(key)
    ckpt = Know3DCheckpoint(path, spec, content, tensors, configs)
    for name in names:
        _validate_model_tensors(ckpt, name)
    return ckpt


def _is_branch_key(key: str) -> bool:
    return key.startswith(BRANCH_PREFIXES[0]) or f".{BRANCH_PREFIXES[1]}" in key


def _is_lora_key(key: str) -> bool:
    return key.endswith((f".{LORA_A}.weight", f".{LORA_B}.weight"))


def _validate_model_tensors(ckpt: Know3DCheckpoint, name: str) -> None:
    origin = f"{ckpt.path} [{name}]"
    tensors = ckpt.tensors[name]
    proj = tensors.get("knowledge_proj.linear.weight")
    if proj is None:
        raise Know3DFormatError(f"{origin}: no knowledge_proj.linear.weight")
    if proj.dim() != 2 or proj.shape[1] != ckpt.spec.knowledge_dim:
        raise Know3DFormatError(
            f"{origin}: knowledge_proj.linear.weight is {tuple(proj.shape)}, but the metadata says "
            f"knowledge_dim {ckpt.spec.knowledge_dim}"
        )
    if ckpt.content == "merged":
        if any(_is_lora_key(k) for k in tensors):
            raise Know3DFormatError(f"{origin}: a merged file must not hold LoRA factors")
        if name not in ckpt.configs:
            raise Know3DFormatError(f"{origin}: merged file without a config for {name} (metadata 'configs')")
        return
    other = sorted(k for k in tensors if not _is_branch_key(k) and not _is_lora_key(k))
    if other:
        raise Know3DFormatError(f"{origin}: a delta file holds only branch and LoRA tensors, found {other[:5]}")
    factors = lora_factors_from_state_dict({k: v for k, v in tensors.items() if _is_lora_key(k)}, origin)
    ranks = {int(a.shape[0]) for a, _ in factors.values()}
    if factors and ranks != {ckpt.spec.lora_rank}:
        raise Know3DFormatError(f"{origin}: LoRA factors have rank {sorted(ranks)}, metadata lora_rank {ckpt.spec.lora_rank}")
    if not factors and ckpt.spec.lora_rank:
        raise Know3DFormatError(f"{origin}: metadata lora_rank {ckpt.spec.lora_rank} but no LoRA factors")


# --------------------------------------------------------------------------------------- applying
def _install_from_spec(model: nn.Module, spec: Know3DSpec) -> None:
    """An uninitialised branch: the loaders fill every tensor (all keys are checked)."""
    install_branch(
        model, spec.knowledge_dim, kind=spec.knowledge_kind, mmdit_layers=spec.mmdit_layers,
        sigma=spec.sigma, num_heads=spec.num_heads, qk_rms_norm=spec.qk_rms_norm, empty=True,
    )


def _load_branch(model: nn.Module, tensors: Mapping[str, torch.Tensor], origin: str) -> None:
    """Copy the branch tensors into an installed branch; every key must match, shapes included."""
    expected = branch_state_dict(model)
    given = {k: v for k, v in tensors.items() if _is_branch_key(k)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(given) & set(expected) if given[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            details.append("wrong shapes " + ", ".join(
                f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:5]))
        raise Know3DFormatError(
            f"{origin}: the branch does not fit this model ({'; '.join(details)}); is the file for this "
            f"TRELLIS.2 model (width, number of blocks)?"
        )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(given[key])


def apply_know3d(
    models: Mapping[str, nn.Module],
    checkpoint: Union[str, os.PathLike, Know3DCheckpoint],
    merge: bool = True,
) -> Know3DSpec:
    """Case (a): turn official TRELLIS.2 flow models into Know3D models, in place.

    Args:
        models: ``{model name: flow model}`` with official weights loaded (any subset of the
            file's models, e.g. without the 1024 model for the 512 pipeline).
        checkpoint: a delta file (path or :func:`read_know3d` result).
        merge: fold the LoRA into the weights (no run-time cost); False attaches it unmerged.
    Returns:
        the file's :class:`Know3DSpec` (check knowledge with ``spec.check``).
    On any error no model is changed (branches installed so far are removed again).
    """
    ckpt = checkpoint if isinstance(checkpoint, Know3DCheckpoint) else read_know3d(checkpoint)
    if ckpt.content != "delta":
        raise Know3DFormatError(f"{ckpt.path} is a merged full checkpoint: load it with load_know3d_merged")
    for name, model in models.items():
        if name not in ckpt.tensors:
            raise Know3DFormatError(f"{ckpt.path} has no weights for {name!r} (it has {ckpt.models})")
        if has_branch(model):
            raise Know3DFormatError(f"{name} already carries a Know3D branch; load the delta into official weights")
    # Branches first (reversible), LoRA factors checked for every model, only then the weights change.
    installed, plans = [], []
    try:
        for name, model in models.items():
            origin = f"{ckpt.path} [{name}]"
            tensors = ckpt.tensors[name]
            _install_from_spec(model, ckpt.spec)
            installed.append(model)
            _load_branch(model, tensors, origin)
            factors = lora_factors_from_state_dict({k: v for k, v in tensors.items() if _is_lora_key(k)}, origin)
            check_lora_factors(model, factors, origin)
            plans.append((model, factors, origin))
    except Exception:
        for model in installed:
            remove_branch(model)
        raise
    for model, factors, origin in plans:
        if factors:
            (merge_lora if merge else attach_lora)(model, factors, ckpt.spec.lora_alpha, source=origin)
    return ckpt.spec


def _default_build(name: str, config: Mapping[str, Any]) -> nn.Module:
    """Build an uninitialised flow model from an official ``{"name", "args"}`` config."""
    from ..trellis2.loading import build_model

    return build_model(config.get("name"), config.get("args", {}), source=f"config of {name}", empty=True)


def load_know3d_merged(
    path: Union[str, os.PathLike],
    device: Union[str, torch.device] = "cpu",
    models: Optional[list[str]] = None,
    build: Optional[Callable[[str, Mapping[str, Any]], nn.Module]] = None,
) -> tuple[dict[str, nn.Module], Know3DSpec]:
    """Case (b): build Know3D flow models from a merged full checkpoint (no official files needed).

    Args:
        models: which of the file's models to build (default: all).
        build: ``build(name, config) -> model`` (default: the trellis2 flow classes).
    Returns:
        ``({name: model in eval mode on device}, spec)``; loading is strict.
    """
    ckpt = read_know3d(path)
    if ckpt.content != "merged":
        raise Know3DFormatError(f"{ckpt.path} is a delta file: load official weights, then apply_know3d")
    names = ckpt.models if models is None else list(models)
    out = {}
    for name in names:
        if name not in ckpt.tensors:
            raise Know3DFormatError(f"{ckpt.path} has no weights for {name!r} (it has {ckpt.models})")
        model = (build or _default_build)(name, ckpt.configs[name])
        _install_from_spec(model, ckpt.spec)
        _load_full(model, ckpt.tensors[name], f"{ckpt.path} [{name}]")
        out[name] = model.to(device).eval()
    return out, ckpt.spec


def _load_full(model: nn.Module, tensors: Mapping[str, torch.Tensor], origin: str) -> None:
    """Strict load: exactly the model's keys and shapes (dtypes are cast)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(tensors) & set(expected) if tensors[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise Know3DFormatError(
            f"{origin}: keys do not match the model built from its config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]})"
        )
    with torch.no_grad():
        model.load_state_dict(tensors, strict=True)


# --------------------------------------------------------------------------------------- saving
def _spec_from_models(models: Mapping[str, nn.Module], mmdit_model: Optional[str]) -> Know3DSpec:
    specs = []
    for name, model in models.items():
        if not has_branch(model):
            raise Know3DFormatError(f"{name} has no Know3D branch to save")
        proj = model.knowledge_proj
        attn = model.blocks[0].knowledge_attn
        if proj.kind is None:
            raise Know3DFormatError(
                f"{name}'s branch states no knowledge kind; a Know3D file must: "
                f"install_branch(model, dim, kind=..., mmdit_layers=..., sigma=...)"
            )
        _, alpha = lora_state_dict(model)
        rank = 0
        if has_attached_lora(model):
            rank = next(m.lora_A.weight.shape[0] for m in model.modules() if hasattr(m, "lora_A"))
        specs.append(Know3DSpec(
            knowledge_kind=proj.kind, knowledge_dim=proj.knowledge_dim, mmdit_layers=proj.mmdit_layers,
            sigma=proj.sigma, mmdit_model=mmdit_model, lora_rank=rank, lora_alpha=alpha,
            num_heads=attn.num_heads, qk_rms_norm=attn.qk_rms_norm,
        ))
    first = specs[0]
    for name, spec in zip(models, specs):
        if spec != first:
            raise Know3DFormatError(f"{name}'s branch/LoRA ({spec}) differs from the others' ({first}); one spec per file")
    return first


def _merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict with attached LoRA folded into copies of the weights (model untouched)."""
    sd = {k: v for k, v in model.state_dict().items() if not _is_lora_key(k)}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_scale"):
            w = module.weight
            delta = module.lora_B.weight.float() @ module.lora_A.weight.float()
            sd[f"{name}.weight"] = (w.float() + module.lora_scale * delta).to(w.dtype)
    return sd


def save_know3d(
    path: Union[str, os.PathLike],
    models: Mapping[str, nn.Module],
    content: str = "delta",
    configs: Optional[Mapping[str, Mapping[str, Any]]] = None,
    mmdit_model: Optional[str] = None,
    extra_metadata: Optional[Mapping[str, str]] = None,
) -> Know3DSpec:
    """Write Know3D models to ``path``; the spec comes from the models' branches and LoRA.

    Args:
        models: ``{model name: flow model with a branch}``; names become key prefixes.
        content: "delta" (branch + unmerged LoRA factors; a LoRA already merged into the weights
            cannot be recovered and is not saved) or "merged" (every key, LoRA folded in, and the
            configs).
        configs: ``{name: {"name": class, "args": {...}}}`` for a merged file (default: built from
            each model's ``config`` attribute and class name).
        mmdit_model: name of the MMDiT the knowledge comes from (metadata only).
        extra_metadata: more string metadata (e.g. the trainer's ``training`` record); a key of the
            format itself raises.
    Returns:
        the spec written.
    """
    if content not in CONTENTS:
        raise ValueError(f"content must be one of {CONTENTS}, got {content!r}")
    bad = [n for n in models if not n or "." in n]
    if bad:
        raise ValueError(f"model names {bad} cannot be key prefixes (empty or containing '.')")
    spec = _spec_from_models(models, mmdit_model)
    tensors: dict[str, torch.Tensor] = {}
    meta_configs = {}
    for name, model in models.items():
        if content == "delta":
            part = {**branch_state_dict(model), **lora_state_dict(model)[0]}
        else:
            part = _merged_state_dict(model)
            cfg = (configs or {}).get(name)
            if cfg is None:
                if not isinstance(getattr(model, "config", None), Mapping):
                    raise ValueError(f"no config for {name}: pass configs={{'{name}': {{'name': ..., 'args': ...}}}}")
                cfg = {"name": type(model).__name__, "args": dict(model.config)}
                if isinstance(getattr(model, "dtype", None), torch.dtype):
                    # the weights are saved in the dtype the model runs in, not the one it was loaded as
                    cfg["args"]["dtype"] = str(model.dtype).replace("torch.", "")
            meta_configs[name] = cfg
        for key, value in part.items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous().clone()
    if content == "merged":
        spec.lora_merged = spec.lora_rank > 0
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "content": content,
            "models": json.dumps(list(models)), **spec.to_metadata()}
    if content == "merged":
        meta["configs"] = json.dumps(meta_configs)
    clash = sorted(set(extra_metadata or {}) & (set(meta) | {"configs"}))
    if clash:
        raise ValueError(f"extra_metadata may not override the format's keys {clash}")
    meta.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
    spec.validate(os.fspath(path))
    save_file(tensors, os.fspath(path), metadata=meta)
    return spec
