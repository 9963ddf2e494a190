"""Flow-matching Euler sampling with CFG, guidance interval and CFG rescale (TRELLIS.2 semantics)."""
from .flow_euler import (
    OFFICIAL_SAMPLER_PARAMS,
    Cancelled,
    FlowEulerGuidanceIntervalSampler,
    SamplerParams,
    count_model_calls,
    dense_cfg_batch,
    host_time,
    reference_noise,
    sparse_cfg_batch,
    time_schedule,
    uses_cfg,
)

__all__ = [
    "OFFICIAL_SAMPLER_PARAMS",
    "Cancelled",
    "FlowEulerGuidanceIntervalSampler",
    "SamplerParams",
    "count_model_calls",
    "dense_cfg_batch",
    "host_time",
    "reference_noise",
    "sparse_cfg_batch",
    "time_schedule",
    "uses_cfg",
]
