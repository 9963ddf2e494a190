"""The ``multi_view`` variant: the generated back image as a second image condition of plain TRELLIS.2.

No Know3D weights are involved, so it runs with the public TRELLIS.2 checkpoints. TRELLIS.2 itself
has no multi-image entry point; TRELLIS (v1) has one, ``run_multi_image``, with two modes that
change only which image tokens each model call sees (read in microsoft/TRELLIS
``trellis/pipelines/trellis_image_to_3d.py``, ``inject_sampler_multi_image``):

- ``stochastic`` (the reference default): sampling step i is conditioned on view ``i % V`` only
  (front, back, front, ...); the negative condition is the zero tokens of one view. Same cost as
  one image.
- ``multidiffusion``: at every step the conditional velocity is the mean of one forward per view;
  the negative pass and CFG are unchanged. V conditional forwards per step.

We add a third mode that is not in the reference:
- ``concat``: the tokens of all views concatenated along the token axis ``[B, T1 + T2, 1024]`` —
  one forward per pass, a plain tensor, so it also works with batched CFG. (Zero negative tokens
  give the same keys for every position, so the negative pass is the same for any token count.)

Default: ``stochastic``, the reference's default and the cheapest; the Know3D paper's multi-view
baseline does not say which it used (the text is cut off there).

Use with the sampler: ``model_fn = multi_view_model_fn(lambda x, t, c: model(x, t, c))`` and
``cond = MultiViewCondition([front_tokens, back_tokens], mode)``, ``neg_cond = zeros(front_tokens)``.
``stochastic`` and ``multidiffusion`` need separate cond/neg passes (no ``batched_model_fn``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..sampling import host_time

__all__ = ["MULTI_VIEW_MODES", "MultiViewCondition", "multi_view_model_fn", "multi_view_condition"]

MULTI_VIEW_MODES = ("stochastic", "multidiffusion", "concat")

ModelFn = Callable[[Any, torch.Tensor, Any], Any]


class MultiViewCondition:
    """Image tokens of V views for one flow model and how to combine them.

    Args:
        views: V tensors ``[B, T_v, C]`` (DINOv3 tokens of each view at the stage's resolution;
            view 0 is the front image).
        mode: one of ``MULTI_VIEW_MODES``.

    In ``stochastic`` mode the condition counts sampling steps from the model time it is called
    with: a smaller time than the last call starts the next step, a larger one a new trajectory
    (so one object serves several runs). The sampler's time tensors carry their value
    (``sampling.host_time``), so reading it costs no host sync.
    """

    def __init__(self, views: Sequence[torch.Tensor], mode: str = "stochastic"):
        if mode not in MULTI_VIEW_MODES:
            raise ValueError(f"unknown multi-view mode {mode!r}; use one of {', '.join(MULTI_VIEW_MODES)}")
        views = list(views)
        if not views:
            raise ValueError("MultiViewCondition needs at least one view")
        for i, v in enumerate(views):
            if v.dim() != 3 or v.shape[0] != views[0].shape[0] or v.shape[2] != views[0].shape[2]:
                raise ValueError(
                    f"view {i} has shape {tuple(v.shape)}; every view must be [B, T, C] with "
                    f"B={views[0].shape[0]} and C={views[0].shape[2]} like view 0"
                )
        self.views = views
        self.mode = mode
        self._last_t: Optional[float] = None
        self._step = -1

    @property
    def num_views(self) -> int:
        return len(self.views)

    def concatenated(self) -> torch.Tensor:
        """``[B, sum T_v, C]``: all views' tokens, view 0 first."""
        return torch.cat(self.views, dim=1)

    def negative(self) -> torch.Tensor:
        """Zero tokens of one view, the reference's negative condition ``[B, T_0, C]``."""
        return torch.zeros_like(self.views[0])

    def step_for_time(self, t: float) -> int:
        """Sampling step of a call at model time ``t`` (0 for the first call of a trajectory)."""
        if self._last_t is None or t > self._last_t:
            self._step = 0
        elif t < self._last_t:
            self._step += 1
        self._last_t = t
        return self._step

    def reset(self) -> None:
        """Start counting steps from 0 at the next call."""
        self._last_t = None
        self._step = -1

    def view_for_step(self, step: int) -> torch.Tensor:
        """``stochastic``: the tokens of view ``step % V``."""
        return self.views[step % self.num_views]


def multi_view_condition(front: torch.Tensor, back: torch.Tensor, mode: str = "stochastic") -> MultiViewCondition:
    """Front and back image tokens (``[B, T, C]`` each) as one condition."""
    return MultiViewCondition([front, back], mode)


def _mean_prediction(preds: list) -> Any:
    """Mean of dense tensors, or of sparse tensors' feats (same coords)."""
    if hasattr(preds[0], "feats") and hasattr(preds[0], "replace"):
        return preds[0].replace(torch.stack([p.feats for p in preds]).mean(0))
    return torch.stack(preds).mean(0)


def multi_view_model_fn(model_fn: ModelFn) -> ModelFn:
    """Wrap ``model_fn(x, t, cond)`` so a :class:`MultiViewCondition` cond is combined per its mode.

    Any other cond (e.g. the zero negative tokens) goes to ``model_fn`` unchanged.
    """

    def fn(x: Any, t: torch.Tensor, cond: Any) -> Any:
        if not isinstance(cond, MultiViewCondition):
            return model_fn(x, t, cond)
        if cond.mode == "concat":
            return model_fn(x, t, cond.concatenated())
        if cond.mode == "stochastic":
            return model_fn(x, t, cond.view_for_step(cond.step_for_time(host_time(t))))
        return _mean_prediction([model_fn(x, t, view) for view in cond.views])

    return fn
