"""Flow-matching Euler sampler with CFG, guidance interval and CFG rescale (TRELLIS.2's
``FlowEulerGuidanceIntervalSampler``).

Rectified flow: ``x_t = (1 - t) x_0 + (sigma_min + (1 - sigma_min) t) eps``; the model predicts the
velocity ``v`` and is called with the time ``1000 * t``.

* Time grid: ``t_lin = linspace(1, 0, steps + 1)``, ``t = r t_lin / (1 + (r - 1) t_lin)``
  (``r = rescale_t``, the SD3 "shift").
* Euler: ``x_prev = x_t - (t - t_prev) v``.
* CFG only when ``lo <= t <= hi`` (``guidance_interval``, on the rescaled t) and
  ``guidance_strength != 1``: ``v = g v_cond + (1 - g) v_neg`` (``g == 0``: a single neg pass).
  Outside the interval a single cond pass.
* Rescale (``guidance_rescale = phi > 0``): ``x0 = (1 - s) x_t - (s + (1 - s) t) v`` for v_cond and
  the CFG v; ``x0_cfg`` is scaled per sample by ``std(x0_cond) / std(x0_cfg)``, blended
  ``phi x0_rescaled + (1 - phi) x0_cfg`` and turned back into v. The std follows the reference's
  types: dense tensors use ``torch.std`` (unbiased) over all non-batch dims per sample; sparse tensors
  (anything with ``.feats`` and ``.layout``) use the population std over all tokens x channels of
  each batch item, computed as ``sqrt(E[x^2] - E[x]^2)``.

Values: ``x`` is a dense tensor ``[B, ...]`` or a sparse tensor-like object with ``.feats [N, C]``,
``.layout`` (list of row slices per batch item) and ``.replace(feats)`` (e.g.
``know3d_core.sparse.SparseTensor``); the model returns the same kind. ``cond`` / ``neg_cond`` are
passed to the model untouched (put extra inputs such as Know3D knowledge in them or in a closure).

RNG parity with the reference: it calls ``torch.manual_seed(seed)`` and then draws every noise with
``torch.randn`` on the CPU in float32 (sparse structure ``[B, 8, 16, 16, 16]`` first, then each shape
stage's ``[N, 32]``), moving it to the device afterwards. ``torch.Generator().manual_seed(seed)``
yields the same stream, so :func:`reference_noise` with one generator, called in the same order,
reproduces the reference's noises without touching the global RNG.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "SamplerParams",
    "OFFICIAL_SAMPLER_PARAMS",
    "Cancelled",
    "FlowEulerGuidanceIntervalSampler",
    "time_schedule",
    "in_guidance_interval",
    "uses_cfg",
    "count_model_calls",
    "dense_std",
    "sparse_std",
    "cfg_rescale_x0",
    "reference_noise",
    "dense_cfg_batch",
    "sparse_cfg_batch",
    "host_time",
]

ModelFn = Callable[[Any, torch.Tensor, Any], Any]
BatchedModelFn = Callable[[Any, torch.Tensor, Any, Any], Tuple[Any, Any]]
StdFn = Callable[[Any], torch.Tensor]


class Cancelled(RuntimeError):
    """Sampling was stopped by the cancellation check; no output is produced."""


# ------------------------------------------------------------------------------------------ params
@dataclass(frozen=True)
class SamplerParams:
    """Parameters of one sampling run (the ``params`` block of a pipeline.json sampler).

    ``guidance_interval`` is ``(lo, hi)`` on the rescaled time t in [0, 1]. Frozen: derive
    variants with ``dataclasses.replace(params, steps=...)``.
    """

    steps: int = 12
    guidance_strength: float = 7.5
    guidance_rescale: float = 0.0
    guidance_interval: Tuple[float, float] = (0.0, 1.0)
    rescale_t: float = 1.0
    sigma_min: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "steps", int(self.steps))
        lo, hi = self.guidance_interval
        object.__setattr__(self, "guidance_interval", (float(lo), float(hi)))
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.rescale_t <= 0:
            raise ValueError(f"rescale_t must be > 0, got {self.rescale_t}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale}")

    @classmethod
    def from_pipeline_json(cls, block: Mapping[str, Any], **overrides) -> "SamplerParams":
        """From a pipeline.json sampler entry ``{"name", "args": {"sigma_min"}, "params": {...}}`` or
        from its bare ``params`` dict; ``overrides`` (e.g. a user's steps) win. Unknown keys are errors.
        """
        params = dict(block.get("params", block))
        params.pop("name", None)
        params.pop("args", None)
        sigma_min = block.get("args", {}).get("sigma_min") if "args" in block else None
        if sigma_min is not None:
            params.setdefault("sigma_min", sigma_min)
        params.update(overrides)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown sampler parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**params)


# Values of microsoft/TRELLIS.2-4B pipeline.json (also the app.py defaults).
OFFICIAL_SAMPLER_PARAMS = {
    "sparse_structure": SamplerParams(12, 7.5, 0.7, (0.6, 1.0), 5.0),
    "shape_slat": SamplerParams(12, 7.5, 0.5, (0.6, 1.0), 3.0),
    "tex_slat": SamplerParams(12, 1.0, 0.0, (0.6, 0.9), 3.0),
}


# ------------------------------------------------------------------------------------------ schedule
def time_schedule(steps: int, rescale_t: float) -> List[float]:
    """``steps + 1`` times from 1 to 0: ``r t / (1 + (r - 1) t)`` of ``linspace(1, 0, steps + 1)``
    (float64, as the reference computes it with numpy)."""
    t = np.linspace(1, 0, steps + 1)
    return (rescale_t * t / (1 + (rescale_t - 1) * t)).tolist()


def in_guidance_interval(t: float, interval: Sequence[float]) -> bool:
    """``lo <= t <= hi`` (closed on both ends, as the reference)."""
    return interval[0] <= t <= interval[1]


def uses_cfg(t: float, params: SamplerParams) -> bool:
    """True when the step at time t runs two passes (cond and neg)."""
    g = params.guidance_strength
    return in_guidance_interval(t, params.guidance_interval) and g != 1 and g != 0


def count_model_calls(params: SamplerParams) -> int:
    """Model forwards of one run with separate cond/neg passes (22 for the official SS stage)."""
    ts = time_schedule(params.steps, params.rescale_t)[:-1]
    return sum(2 if uses_cfg(t, params) else 1 for t in ts)


# ------------------------------------------------------------------------------------------ values
def _is_sparse(x: Any) -> bool:
    return hasattr(x, "feats") and hasattr(x, "layout") and hasattr(x, "replace")


def _data(x: Any) -> torch.Tensor:
    return x.feats if _is_sparse(x) else x


def _wrap(like: Any, data: torch.Tensor) -> Any:
    return like.replace(data) if _is_sparse(like) else data


def _batch_size(x: Any) -> int:
    return len(x.layout) if _is_sparse(x) else x.shape[0]


def _device(x: Any) -> torch.device:
    return _data(x).device


def dense_std(x: torch.Tensor) -> torch.Tensor:
    """Per-sample unbiased std over all non-batch dims: ``[B, ...] -> [B]``."""
    if x.dim() < 2:
        raise ValueError(f"dense sample must be [B, ...] with at least 2 dims, got shape {tuple(x.shape)}")
    return x.std(dim=list(range(1, x.dim())))


def sparse_std(x: Any) -> torch.Tensor:
    """Per-item population std over tokens x channels, ``sqrt(E[x^2] - E[x]^2)``, computed in the
    reference's order (``VarLenTensor.std``: row means, then a segment mean per item):
    sparse ``feats [N, C, ...]`` with ``layout`` -> ``[B]``."""
    f = x.feats
    dims = list(range(1, f.dim()))
    lengths = getattr(x, "seqlens", None)  # know3d_core.sparse caches it on the device
    if lengths is None:
        lengths = torch.tensor([s.stop - s.start for s in x.layout], device=f.device)
    # unsafe: skips segment_reduce's checks of the lengths (two host syncs a call on CUDA); the
    # lengths come from the tensor's own layout, so they are non-negative and sum to N.
    mean = torch.segment_reduce(f.mean(dim=dims, keepdim=True), "mean", lengths=lengths, unsafe=True)
    mean2 = torch.segment_reduce((f**2).mean(dim=dims, keepdim=True), "mean", lengths=lengths, unsafe=True)
    return (mean2 - mean**2).sqrt().reshape(-1)


def _default_std(x: Any) -> torch.Tensor:
    return sparse_std(x) if _is_sparse(x) else dense_std(x)


def _per_sample(like: Any, values: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sample values ``[B]`` against ``_data(like)``."""
    data = _data(like)
    if _is_sparse(like):
        rows = getattr(like, "batch_index", None)  # know3d_core.sparse caches it
        if rows is None:
            lengths = torch.tensor([s.stop - s.start for s in like.layout], device=values.device)
            rows = torch.repeat_interleave(torch.arange(len(like.layout), device=values.device), lengths)
        values = values[rows]
    return values.reshape(values.shape[0], *([1] * (data.dim() - 1)))


def cfg_rescale_x0(x0_cfg: Any, x0_pos: Any, rescale: float, std_fn: Optional[StdFn] = None) -> Any:
    """``rescale * x0_cfg * std(x0_pos) / std(x0_cfg) + (1 - rescale) * x0_cfg`` per sample."""
    std_fn = std_fn or _default_std
    ratio = _per_sample(x0_cfg, std_fn(x0_pos) / std_fn(x0_cfg))
    data = _data(x0_cfg)
    return _wrap(x0_cfg, rescale * (data * ratio) + (1 - rescale) * data)


# ------------------------------------------------------------------------------------------ noise
def reference_noise(generator: torch.Generator, *shape: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """``torch.randn(shape)`` in float32 on the CPU from ``generator``, then moved to ``device``
    (same numbers as the reference after ``torch.manual_seed(seed)`` when the generator is
    ``torch.Generator().manual_seed(seed)`` and draws happen in the same order)."""
    return torch.randn(*shape, generator=generator, dtype=torch.float32, device="cpu").to(device)


# ------------------------------------------------------------------------------------------ batching
def _cat_pair(a: Any, b: Any) -> Any:
    if a is None and b is None:
        return None
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, Mapping):
        return {k: _cat_pair(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(_cat_pair(x, y) for x, y in zip(a, b))
    raise TypeError(
        f"cannot batch a condition of type {type(a).__name__}; pass your own batched_model_fn"
    )


def _zero_negative(neg_is_zero: bool, batch: int) -> dict:
    """The pair forward's keyword telling it that samples ``batch..`` (the negative half) have an all-zero
    condition (the flows' ``zero_cond_from``); none when the negative condition is not known to be zero."""
    return {"zero_cond_from": batch} if neg_is_zero else {}


def dense_cfg_batch(model_fn: ModelFn, neg_is_zero: bool = False) -> BatchedModelFn:
    """A ``batched_model_fn`` for dense models: one forward on ``[x; x]`` with ``[cond; neg_cond]``
    (tensors, or dicts/tuples of tensors, concatenated on dim 0); returns ``(v_cond, v_neg)``.
    ``neg_is_zero``: neg_cond is all zeros; the forward is called with ``zero_cond_from=B``."""

    def batched(x: torch.Tensor, t: torch.Tensor, cond: Any, neg_cond: Any):
        v = model_fn(torch.cat([x, x], 0), torch.cat([t, t], 0), _cat_pair(cond, neg_cond),
                     **_zero_negative(neg_is_zero, x.shape[0]))
        return v.chunk(2, dim=0)

    return batched


def sparse_cfg_batch(model_fn: ModelFn, neg_is_zero: bool = False) -> BatchedModelFn:
    """A ``batched_model_fn`` for sparse models: the pair is one sparse tensor with 2B batch items
    (rows of the neg copy follow, batch index + B; same coords, so no padding). The doubled coords
    are built once per coordinate set and reused (their cache, e.g. neighbour maps, too).
    ``neg_is_zero``: neg_cond is all zeros; the forward is called with ``zero_cond_from=B``."""
    memo: dict = {}

    def batched(x: Any, t: torch.Tensor, cond: Any, neg_cond: Any):
        template = memo.get("template")
        if template is None or memo.get("coords") is not x.coords:
            coords2 = x.coords.clone()
            coords2[:, 0] += _batch_size(x)
            coords = torch.cat([x.coords, coords2], 0)
            template = x.replace(torch.cat([x.feats, x.feats], 0), coords=coords)
            memo.update(template=template, coords=x.coords)
        pair = template.replace(torch.cat([x.feats, x.feats], 0))
        v = model_fn(pair, torch.cat([t, t], 0), _cat_pair(cond, neg_cond),
                     **_zero_negative(neg_is_zero, _batch_size(x)))
        n = x.feats.shape[0]
        return x.replace(v.feats[:n]), x.replace(v.feats[n:])

    return batched


# ------------------------------------------------------------------------------------------ model time
_HOST_TIME = "host_time"  # attribute of the sampler's model-time tensors: their value as a python float


def host_time(t_model: torch.Tensor) -> float:
    """The model time of a call (``t_model [B]``, all equal) as a python float: the value the sampler
    attached to it (no host sync), else read from the tensor (a host sync when it is on a GPU)."""
    value = getattr(t_model, _HOST_TIME, None)
    return float(value) if value is not None else float(torch.as_tensor(t_model).reshape(-1)[0])


# ------------------------------------------------------------------------------------------ sampler
class FlowEulerGuidanceIntervalSampler:
    """Euler sampler for rectified-flow velocity models with interval CFG and CFG rescale.

    Args:
        params: steps, guidance and time rescale (defaults: the official sparse-structure stage
            is ``OFFICIAL_SAMPLER_PARAMS["sparse_structure"]``).
    """

    def __init__(self, params: Optional[SamplerParams] = None):
        self.params = params if params is not None else SamplerParams()

    @classmethod
    def from_pipeline_json(cls, block: Mapping[str, Any], **overrides) -> "FlowEulerGuidanceIntervalSampler":
        """From a pipeline.json sampler entry (see :meth:`SamplerParams.from_pipeline_json`)."""
        name = block.get("name")
        if name is not None and name != cls.__name__:
            raise ValueError(f"pipeline.json names sampler {name!r}; only {cls.__name__} is implemented")
        return cls(SamplerParams.from_pipeline_json(block, **overrides))

    # -- conversions (reference _pred_to_xstart / _xstart_to_pred)
    def v_to_x0(self, x_t: torch.Tensor, t: float, v: torch.Tensor) -> torch.Tensor:
        """``x0 = (1 - s) x_t - (s + (1 - s) t) v`` with s = sigma_min."""
        s = self.params.sigma_min
        return (1 - s) * x_t - (s + (1 - s) * t) * v

    def x0_to_v(self, x_t: torch.Tensor, t: float, x0: torch.Tensor) -> torch.Tensor:
        """``v = ((1 - s) x_t - x0) / (s + (1 - s) t)`` with s = sigma_min."""
        s = self.params.sigma_min
        return ((1 - s) * x_t - x0) / (s + (1 - s) * t)

    @staticmethod
    def model_time(x: Any, t: float) -> torch.Tensor:
        """The model's time input: ``[1000 t] * B`` float32 on x's device, filled there (a tensor
        made from host data would be a synchronous copy: the host would wait for the GPU every step).
        It carries its value as a python float for :func:`host_time`."""
        out = torch.full((_batch_size(x),), 1000 * t, device=_device(x), dtype=torch.float32)
        setattr(out, _HOST_TIME, 1000 * t)
        return out

    def guided_velocity(
        self,
        model_fn: ModelFn,
        x: Any,
        t: float,
        cond: Any,
        neg_cond: Any,
        batched_model_fn: Optional[BatchedModelFn] = None,
        std_fn: Optional[StdFn] = None,
    ) -> torch.Tensor:
        """Velocity data (``[B, ...]`` dense or ``feats [N, C]`` sparse) for one step at time t."""
        p = self.params
        g = p.guidance_strength
        t_model = self.model_time(x, t)
        if not in_guidance_interval(t, p.guidance_interval) or g == 1:
            return _data(model_fn(x, t_model, cond))
        if g == 0:
            return _data(model_fn(x, t_model, neg_cond))
        if batched_model_fn is not None:
            v_pos, v_neg = batched_model_fn(x, t_model, cond, neg_cond)
            v_pos, v_neg = _data(v_pos), _data(v_neg)
        else:
            v_pos = _data(model_fn(x, t_model, cond))
            v_neg = _data(model_fn(x, t_model, neg_cond))
        v = g * v_pos + (1 - g) * v_neg
        if p.guidance_rescale > 0:
            x_t = _data(x)
            x0_pos = _wrap(x, self.v_to_x0(x_t, t, v_pos))
            x0_cfg = _wrap(x, self.v_to_x0(x_t, t, v))
            x0 = _data(cfg_rescale_x0(x0_cfg, x0_pos, p.guidance_rescale, std_fn))
            v = self.x0_to_v(x_t, t, x0)
        return v

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: Any,
        cond: Any,
        neg_cond: Any,
        *,
        batched_model_fn: Optional[BatchedModelFn] = None,
        std_fn: Optional[StdFn] = None,
        callback: Optional[Callable[[int, int, float], None]] = None,
        cancel_check: Optional[Callable[[], bool]] = None,
    ) -> Any:
        """Integrate from t = 1 (noise) to t = 0.

        Args:
            model_fn: ``model_fn(x, t_model [B] float32 = 1000 t, cond) -> v`` (same kind as x).
            noise: dense ``[B, ...]`` or sparse tensor; draw it with :func:`reference_noise`.
            cond, neg_cond: passed to the model as they are (neg_cond: zeros for TRELLIS.2).
            batched_model_fn: optional ``f(x, t_model [B], cond, neg_cond) -> (v_cond, v_neg)``
                running both passes in one forward (:func:`dense_cfg_batch`,
                :func:`sparse_cfg_batch`); must equal two ``model_fn`` calls.
            std_fn: per-sample std ``x -> [B]`` for the rescale (default: by type, see module doc).
            callback: ``callback(step, total, t)`` after each step, step = 1..total, t = the time
                the model was evaluated at.
            cancel_check: called before every step; returning True raises :class:`Cancelled`.

        Returns:
            the sample at t = 0, same kind and shape as ``noise``.
        """
        steps = self.params.steps
        ts = time_schedule(steps, self.params.rescale_t)
        x = noise
        for i in range(steps):
            if cancel_check is not None and cancel_check():
                raise Cancelled(f"sampling cancelled before step {i + 1} of {steps}")
            t, t_prev = ts[i], ts[i + 1]
            v = self.guided_velocity(model_fn, x, t, cond, neg_cond, batched_model_fn, std_fn)
            x = _wrap(x, _data(x) - (t - t_prev) * v)
            if callback is not None:
                callback(i + 1, steps, t)
        return x
