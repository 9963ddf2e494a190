"""The knowledge-capture contract and the host-independent collector.

Knowledge = (layers, sigma, branch="cond", tokens="target"):
  * ``layers``: 0-based indices into the MMDiT's ``transformer_blocks``; the state captured at
    layer l is the OUTPUT image stream of block l.
  * ``sigma``: a flow-matching noise level in [0, 1] (x_sigma = sigma*noise + (1-sigma)*x0). It is
    mapped to the nearest step of whatever schedule runs (``schedule.nearest_step``) and the sigma
    actually used is recorded.
  * ``branch``: only the conditional (prompt) forward of true CFG is captured.
  * ``tokens``: only the target (noisy back-view) tokens; the reference-image tokens that follow
    them in the image stream are sliced off.
Captured layers are concatenated on channels: ``[B, N_target, L * width]`` (width 3072 at full size).

DEFAULT_SIGMA = 0.25 is an ASSUMPTION. The paper (arXiv 2603.22782 §3.2.1) gives no number; the
only hint ("roughly the quarter mark; too early: pixel details, too late: noise") and every work
it cites (DIFT t=261/1000, much3d t=0.25, Open-Sora t=0.25) read as noise level 0.25. A Know3D
checkpoint's metadata overrides it, and so can the user.

DEFAULT_LAYER_FRACTIONS = (1/3, 1/2, 2/3) of the depth -> blocks (20, 30, 40) of 60: an
unverified starting point over the middle of the network (much3d: mid layers at ~2/3 depth are
the most 3D-aware; "Unraveling MMDiT Blocks": semantics in early-to-mid blocks). The checkpoint's
layer list, when present, wins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

DEFAULT_SIGMA = 0.25
DEFAULT_LAYER_FRACTIONS = (1 / 3, 1 / 2, 2 / 3)
QWEN_IMAGE_NUM_BLOCKS = 60


def default_layers(num_blocks: int = QWEN_IMAGE_NUM_BLOCKS) -> tuple[int, ...]:
    """Default capture layers for a model with ``num_blocks`` blocks: (20, 30, 40) for 60 blocks."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    idx = sorted({min(num_blocks - 1, int(round(num_blocks * f))) for f in DEFAULT_LAYER_FRACTIONS})
    return tuple(idx)


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture. ``layers=None`` means ``default_layers(num_blocks)`` of the model at hand."""
    layers: tuple[int, ...] | None = None
    sigma: float = DEFAULT_SIGMA
    branch: str = "cond"
    tokens: str = "target"

    def __post_init__(self):
        if self.branch != "cond":
            raise ValueError(f"only branch='cond' is supported, got {self.branch!r}")
        if self.tokens != "target":
            raise ValueError(f"only tokens='target' is supported, got {self.tokens!r}")
        if not 0.0 <= float(self.sigma) <= 1.0:
            raise ValueError(f"sigma must be a noise level in [0, 1], got {self.sigma}")
        if self.layers is not None:
            layers = tuple(int(i) for i in self.layers)
            if not layers:
                raise ValueError("layers must not be empty")
            if len(set(layers)) != len(layers):
                raise ValueError(f"duplicate layers in {layers}")
            object.__setattr__(self, "layers", layers)

    def resolve_layers(self, num_blocks: int) -> tuple[int, ...]:
        """Concrete layer list for a model with ``num_blocks`` blocks; raises if out of range."""
        layers = self.layers if self.layers is not None else default_layers(num_blocks)
        bad = [i for i in layers if not 0 <= i < num_blocks]
        if bad:
            raise ValueError(f"capture layers {bad} out of range for a model with {num_blocks} blocks")
        return layers

    @classmethod
    def from_metadata(cls, metadata: dict | None, *, layers: Sequence[int] | None = None,
                      sigma: float | None = None) -> "CaptureSpec":
        """Spec from a Know3D checkpoint's metadata (keys ``layers``, ``sigma``), then user overrides.

        Precedence: explicit argument > checkpoint metadata > defaults.
        """
        meta = metadata or {}
        m_layers = meta.get("layers")
        m_sigma = meta.get("sigma")
        return cls(
            layers=tuple(layers) if layers is not None else (tuple(m_layers) if m_layers is not None else None),
            sigma=float(sigma if sigma is not None else (m_sigma if m_sigma is not None else DEFAULT_SIGMA)),
        )


def slice_target_rows(img: torch.Tensor, n_target: int, cond_rows=None) -> torch.Tensor:
    """Copy of the target tokens of the chosen batch rows.

    img: [B, N_target + N_refs, C] image stream of one block (target tokens first).
    cond_rows: None (all rows), a slice, a list of row indices or a 1-D index tensor.
    Returns: a new contiguous tensor [B_sel, n_target, C] that shares no storage with ``img``
    (a view would keep the whole sequence alive).
    """
    if img.dim() != 3:
        raise ValueError(f"image stream must be [B, N, C], got {tuple(img.shape)}")
    if not 0 < n_target <= img.shape[1]:
        raise ValueError(f"n_target={n_target} outside the image stream length {img.shape[1]}")
    x = img.detach()[:, :n_target]
    if cond_rows is None:
        return x.clone(memory_format=torch.contiguous_format)
    if isinstance(cond_rows, slice):
        return x[cond_rows].clone(memory_format=torch.contiguous_format)
    rows = torch.as_tensor(cond_rows, dtype=torch.long).to(img.device)
    return torch.index_select(x, 0, rows).contiguous()


class HiddenStateCollector:
    """Host-agnostic store of captured block outputs.

    ``collect(block_index, img, n_target, cond_rows)`` is all a host adapter calls: a diffusers
    forward hook, a ComfyUI ``double_block`` patch, or anything else that sees a block's image
    stream. Only blocks in ``layers`` are kept; the first capture of a block wins until ``reset``.
    """

    def __init__(self, layers: Iterable[int], store_device: torch.device | str | None = None):
        self.layers: tuple[int, ...] = tuple(int(i) for i in layers)
        self.store_device = torch.device(store_device) if store_device is not None else None
        self._states: dict[int, torch.Tensor] = {}

    def wants(self, block_index: int) -> bool:
        return block_index in self.layers and block_index not in self._states

    def collect(self, block_index: int, img: torch.Tensor, n_target: int, cond_rows=None) -> bool:
        """Store the target-token slice of ``img`` for ``block_index``; returns True if stored."""
        if not self.wants(block_index):
            return False
        state = slice_target_rows(img, n_target, cond_rows)
        if self.store_device is not None:
            state = state.to(self.store_device)
        self._states[block_index] = state
        return True

    @property
    def complete(self) -> bool:
        return all(i in self._states for i in self.layers)

    @property
    def collected(self) -> tuple[int, ...]:
        return tuple(i for i in self.layers if i in self._states)

    def reset(self) -> None:
        self._states.clear()

    def state(self, block_index: int) -> torch.Tensor:
        return self._states[block_index]

    def concatenated(self) -> torch.Tensor:
        """[B, N_target, L * C], layers in the order of ``self.layers``."""
        missing = [i for i in self.layers if i not in self._states]
        if missing:
            raise RuntimeError(f"hidden states of layers {missing} were not captured "
                               f"(captured: {list(self.collected)})")
        return torch.cat([self._states[i] for i in self.layers], dim=-1)


@dataclass
class MMDiTKnowledge:
    """Captured MMDiT hidden states with provenance.

    hidden: [B, N_target, L * width]; N_target = token_grid[0] * token_grid[1] (row-major h, w).
    """
    hidden: torch.Tensor
    layers: tuple[int, ...]
    sigma: float                      # sigma actually used
    sigma_requested: float
    step_index: int | None            # step of the schedule that ran (None if not from a schedule)
    num_steps: int | None
    token_grid: tuple[int, int]       # (H/16, W/16) target tokens
    resolution: tuple[int, int]       # (H, W) target pixels
    model_name: str
    width: int                        # channels per layer
    branch: str = "cond"
    tokens: str = "target"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        b, n, c = self.hidden.shape
        if c != len(self.layers) * self.width:
            raise ValueError(f"hidden has {c} channels, expected {len(self.layers)} layers x {self.width}")
        if n != self.token_grid[0] * self.token_grid[1]:
            raise ValueError(f"hidden has {n} tokens, token grid {self.token_grid} implies "
                             f"{self.token_grid[0] * self.token_grid[1]}")

    def layer(self, layer_index: int) -> torch.Tensor:
        """[B, N_target, width] slice of one captured layer (a view)."""
        k = self.layers.index(layer_index)
        return self.hidden[..., k * self.width:(k + 1) * self.width]

    def metadata(self) -> dict[str, Any]:
        """JSON-able provenance (no tensors)."""
        return {
            "kind": "mmdit_hidden_states",
            "layers": list(self.layers),
            "sigma": self.sigma,
            "sigma_requested": self.sigma_requested,
            "step_index": self.step_index,
            "num_steps": self.num_steps,
            "branch": self.branch,
            "tokens": self.tokens,
            "token_grid": list(self.token_grid),
            "resolution": list(self.resolution),
            "model_name": self.model_name,
            "width": self.width,
            "shape": list(self.hidden.shape),
            "dtype": str(self.hidden.dtype).replace("torch.", ""),
            **self.extra,
        }
