"""Knowledge: the typed input that carries what Qwen-Image-Edit knows about the hidden back.

One object, four kinds (paper §1 and its ablation; DESIGN.md "Injection variants"):

| kind           | tensor                          | D                        | used by                      |
|----------------|---------------------------------|--------------------------|------------------------------|
| ``mmdit_hidden`` | ``[B, N, L*W]`` MMDiT image-token hidden states of L blocks, concatenated on channels | ``L * 3072`` (Qwen-Image) | injection branch |
| ``vae_latent``   | ``[B, N, C*p*p]`` denoised back-view VAE latent, patchified like the MMDiT input | ``16 * 2 * 2 = 64``   | injection branch |
| ``dino_image``   | ``[B, N, 1024]`` DINOv3 features of the decoded back image | ``1024``          | injection branch |
| ``multi_view``   | ``[B, H, W, 3]`` the decoded back image, values in [0, 1] | (image)       | a second image condition of plain TRELLIS.2 (``multi_view.py``) |

Every object carries a ``provenance`` dict; the keys each kind needs are in ``REQUIRED_PROVENANCE``.
A Know3D checkpoint states the kind and dimension it was trained for; ``check_compatible`` turns a
mismatch into an error naming both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from ..plan import DINO_IMAGE, INJECTED_KINDS, KINDS, MMDIT_HIDDEN, MULTI_VIEW, VAE_LATENT
from .multi_view import MULTI_VIEW_MODES

__all__ = [
    "Knowledge",
    "KnowledgeMismatchError",
    "KINDS",
    "INJECTED_KINDS",
    "REQUIRED_PROVENANCE",
    "QWEN_IMAGE_HIDDEN",
    "SIGMA_TOLERANCE",
    "mmdit_hidden_knowledge",
    "vae_latent_knowledge",
    "dino_image_knowledge",
    "multi_view_knowledge",
    "pack_latent",
    "check_knowledge",
    "describe_expected",
    "from_mmdit_capture",
]


QWEN_IMAGE_HIDDEN = 3072
# The capture step is the schedule step nearest to the requested sigma, so hosts with different
# schedules land within half a step of it; 0.05 covers 20+ step schedules near sigma 0.25-0.85.
SIGMA_TOLERANCE = 0.05

REQUIRED_PROVENANCE: dict[str, tuple[str, ...]] = {
    MMDIT_HIDDEN: ("layers", "sigma", "resolution", "model"),
    VAE_LATENT: ("resolution", "model", "patch_size"),
    DINO_IMAGE: ("resolution", "model"),
    MULTI_VIEW: ("resolution", "source"),
}


class KnowledgeMismatchError(ValueError):
    """The knowledge given does not match what a Know3D checkpoint (or model) was trained for."""


@dataclass(frozen=True, eq=False)
class Knowledge:
    """A knowledge tensor with its kind and where it came from.

    Attributes:
        kind: one of ``KINDS``.
        tensor: ``[B, N, D]`` tokens for the injected kinds; ``[B, H, W, 3]`` image for ``multi_view``.
        provenance: facts about the producer (keys per kind in ``REQUIRED_PROVENANCE``; more allowed).
    """

    kind: str
    tensor: torch.Tensor
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown knowledge kind {self.kind!r}; known kinds: {', '.join(KINDS)}")
        if not isinstance(self.tensor, torch.Tensor):
            raise TypeError(f"{self.kind} knowledge needs a torch.Tensor, got {type(self.tensor).__name__}")
        expect_ndim = 4 if self.kind == MULTI_VIEW else 3
        if self.tensor.dim() != expect_ndim:
            layout = "[B, H, W, 3]" if self.kind == MULTI_VIEW else "[B, N, D]"
            raise ValueError(f"{self.kind} knowledge must be {layout}, got shape {tuple(self.tensor.shape)}")
        missing = [k for k in REQUIRED_PROVENANCE[self.kind] if k not in self.provenance]
        if missing:
            raise ValueError(f"{self.kind} knowledge provenance lacks {missing} (has {sorted(self.provenance)})")
        if self.kind == MULTI_VIEW and self.provenance.get("mode", MULTI_VIEW_MODES[0]) not in MULTI_VIEW_MODES:
            raise ValueError(
                f"multi_view mode {self.provenance['mode']!r} is not one of {', '.join(MULTI_VIEW_MODES)}"
            )
        if self.kind == MMDIT_HIDDEN:
            layers = list(self.provenance["layers"])
            if not layers or self.dim % len(layers):
                raise ValueError(
                    f"mmdit_hidden knowledge has D={self.dim}, not a multiple of its {len(layers)} layers {layers}"
                )
        object.__setattr__(self, "provenance", dict(self.provenance))

    @property
    def injected(self) -> bool:
        """True for kinds that enter the injection branch; False for ``multi_view``."""
        return self.kind in INJECTED_KINDS

    @property
    def batch_size(self) -> int:
        return int(self.tensor.shape[0])

    @property
    def num_tokens(self) -> int:
        """N (token count) of an injected kind."""
        self._require_tokens("num_tokens")
        return int(self.tensor.shape[1])

    @property
    def dim(self) -> int:
        """D (channels per token) of an injected kind."""
        self._require_tokens("dim")
        return int(self.tensor.shape[2])

    def to(self, *args, **kwargs) -> "Knowledge":
        """Same knowledge with ``tensor.to(*args, **kwargs)``."""
        return Knowledge(self.kind, self.tensor.to(*args, **kwargs), self.provenance)

    def describe(self) -> str:
        """One line for error messages, e.g. ``mmdit_hidden (D=12288, layers [20, 30, 40, 50], sigma 0.25)``."""
        if not self.injected:
            return f"{self.kind} (image {tuple(self.tensor.shape[1:3])})"
        text = f"{self.kind} (D={self.dim}"
        if self.kind == MMDIT_HIDDEN:
            text += f", layers {list(self.provenance['layers'])}, sigma {self.provenance['sigma']}"
        return text + ")"

    def _require_tokens(self, what: str) -> None:
        if not self.injected:
            raise ValueError(f"{self.kind} knowledge is an image, it has no {what}")


def mmdit_hidden_knowledge(
    hidden_states: Sequence[torch.Tensor] | torch.Tensor,
    layers: Sequence[int],
    sigma: float,
    resolution: Sequence[int],
    model: str = "Qwen-Image-Edit-2511",
    **extra: Any,
) -> Knowledge:
    """Knowledge from captured MMDiT image-token hidden states.

    Args:
        hidden_states: one ``[B, N, W]`` tensor per layer (concatenated here, in the order given),
            or the already concatenated ``[B, N, L*W]``.
        layers: MMDiT block indices, in the concatenation order.
        sigma: the noise level the capture was asked for (the checkpoint's sigma).
        resolution: ``(H, W)`` in pixels of the back view the target tokens belong to.
        model: name of the MMDiT model.
        extra: more provenance (e.g. ``sigma_actual``, ``step``, ``branch``).
    """
    if isinstance(hidden_states, torch.Tensor):
        tensor = hidden_states
    else:
        if len(hidden_states) != len(layers):
            raise ValueError(f"{len(hidden_states)} hidden-state tensors for {len(layers)} layers {list(layers)}")
        tensor = torch.cat(list(hidden_states), dim=-1)
    prov = {"layers": [int(i) for i in layers], "sigma": float(sigma),
            "resolution": [int(r) for r in resolution], "model": model, **extra}
    return Knowledge(MMDIT_HIDDEN, tensor, prov)


def from_mmdit_capture(captured: Any) -> Knowledge:
    """``mmdit_hidden`` knowledge from the mmdit package's ``MMDiTKnowledge`` (read by attribute).

    ``provenance["sigma"]`` is the sigma the capture asked for (what a checkpoint names);
    the schedule's actual sigma goes to ``sigma_actual``.
    """
    prov = {
        "layers": [int(i) for i in captured.layers],
        "sigma": float(captured.sigma_requested),
        "sigma_actual": float(captured.sigma),
        "resolution": [int(r) for r in captured.resolution],
        "model": captured.model_name,
        "step_index": captured.step_index,
        "num_steps": captured.num_steps,
        "token_grid": [int(g) for g in captured.token_grid],
        "width": int(captured.width),
        "branch": captured.branch,
        "tokens": captured.tokens,
    }
    return Knowledge(MMDIT_HIDDEN, captured.hidden, prov)


def pack_latent(latent: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """Patchify a VAE latent the way Qwen-Image packs its MMDiT input.

    Args:
        latent: ``[B, C, h, w]`` or ``[B, C, 1, h, w]`` (Wan-style VAE with a frame axis).
    Returns:
        ``[B, (h/p)*(w/p), C*p*p]``, tokens row-major, channels ordered ``(c, dy, dx)``.
    """
    if latent.dim() == 5:
        if latent.shape[2] != 1:
            raise ValueError(f"vae latent with {latent.shape[2]} frames; expected 1 ([B, C, 1, h, w])")
        latent = latent[:, :, 0]
    if latent.dim() != 4:
        raise ValueError(f"vae latent must be [B, C, h, w] or [B, C, 1, h, w], got {tuple(latent.shape)}")
    B, C, h, w = latent.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"vae latent {h}x{w} is not divisible by the patch size {p}")
    x = latent.reshape(B, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // p) * (w // p), C * p * p)


def vae_latent_knowledge(
    latent: torch.Tensor,
    resolution: Sequence[int],
    model: str = "Qwen-Image VAE",
    patch_size: int = 2,
    **extra: Any,
) -> Knowledge:
    """Knowledge from the fully denoised back-view latent.

    Args:
        latent: unpatchified ``[B, 16, h, w]`` / ``[B, 16, 1, h, w]`` (packed here) or already packed
            ``[B, N, 64]``.
        resolution: ``(H, W)`` of the back view in pixels.
    """
    tensor = latent if latent.dim() == 3 else pack_latent(latent, patch_size)
    prov = {"resolution": [int(r) for r in resolution], "model": model, "patch_size": int(patch_size), **extra}
    return Knowledge(VAE_LATENT, tensor, prov)


def dino_image_knowledge(
    features: torch.Tensor,
    resolution: int,
    model: str = "facebook/dinov3-vitl16-pretrain-lvd1689m",
    **extra: Any,
) -> Knowledge:
    """Knowledge from DINOv3 features ``[B, N, 1024]`` of the decoded back image at ``resolution`` px."""
    return Knowledge(DINO_IMAGE, features, {"resolution": int(resolution), "model": model, **extra})


def multi_view_knowledge(image: torch.Tensor, source: str = "qwen_back_view", **extra: Any) -> Knowledge:
    """The decoded back image ``[B, H, W, 3]`` (values in [0, 1]) as a second view for TRELLIS.2.

    ``extra`` may set ``mode`` (one of ``MULTI_VIEW_MODES``; the pipeline's default is "stochastic").
    """
    if image.dim() == 4 and image.shape[-1] not in (3, 4):
        raise ValueError(f"multi_view image must be [B, H, W, 3|4], got {tuple(image.shape)}")
    res = [int(image.shape[1]), int(image.shape[2])] if image.dim() == 4 else []
    return Knowledge(MULTI_VIEW, image, {"resolution": res, "source": source, **extra})


def describe_expected(kind: Optional[str], dim: int, layers: Optional[Sequence[int]] = None,
                      sigma: Optional[float] = None) -> str:
    """What a checkpoint/branch expects, e.g. ``mmdit_hidden (D=12288, layers [20, 30, 40], sigma 0.25)``."""
    text = f"{kind or 'any kind'} (D={dim}"
    if layers is not None:
        text += f", layers {list(layers)}"
    if sigma is not None:
        text += f", sigma {sigma}"
    return text + ")"


def check_knowledge(
    knowledge: "Knowledge | torch.Tensor",
    kind: Optional[str],
    dim: int,
    layers: Optional[Sequence[int]] = None,
    sigma: Optional[float] = None,
    origin: str = "the Know3D branch",
) -> None:
    """Raise :class:`KnowledgeMismatchError` naming both sides unless ``knowledge`` fits.

    Args:
        knowledge: a :class:`Knowledge` (kind, dim, and for mmdit_hidden layers and sigma are
            checked) or a raw ``[B, N, D]`` tensor (only D is checked).
        kind, dim, layers, sigma: what ``origin`` was trained for (None: not checked).
        origin: named in the message, e.g. ``"Know3D checkpoint know3d.safetensors"``.
    """
    expected = describe_expected(kind, dim, layers, sigma)
    if isinstance(knowledge, Knowledge):
        if not knowledge.injected:
            raise KnowledgeMismatchError(
                f"{origin} was trained for {expected} knowledge; {knowledge.kind} knowledge is an extra "
                f"image view, not an injected tensor: condition plain TRELLIS.2 on it (knowledge.multi_view)"
            )
        if kind is not None and knowledge.kind != kind:
            raise KnowledgeMismatchError(f"{origin} was trained for {expected} knowledge, got {knowledge.describe()}")
        if knowledge.kind == MMDIT_HIDDEN and layers is not None:
            got = list(knowledge.provenance["layers"])
            if got != [int(i) for i in layers]:
                raise KnowledgeMismatchError(
                    f"{origin} was trained on MMDiT layers {list(layers)}, the knowledge holds layers {got}; "
                    f"capture layers {list(layers)}"
                )
        _check_sigma(knowledge, sigma, origin)
        tensor = knowledge.tensor
    else:
        tensor = knowledge
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or tensor.shape[-1] != dim:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise KnowledgeMismatchError(
            f"{origin} was trained for {expected} knowledge [B, N, {dim}], got {shape}"
        )


def _check_sigma(knowledge: Knowledge, sigma: Optional[float], origin: str) -> None:
    """Raise if mmdit knowledge was captured at a sigma other than ``sigma`` (within ``SIGMA_TOLERANCE``)."""
    if sigma is None or knowledge.kind != MMDIT_HIDDEN:
        return
    got = float(knowledge.provenance["sigma"])
    if not math.isfinite(got) or abs(got - float(sigma)) > SIGMA_TOLERANCE:
        raise KnowledgeMismatchError(
            f"{origin} was trained on MMDiT hidden states captured at sigma {sigma}, "
            f"but the knowledge was captured at sigma {got}; capture again at sigma {sigma}"
        )
