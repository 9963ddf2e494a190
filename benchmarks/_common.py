"""Helpers shared by the benchmark scripts: timing, peak memory, random weights, devices, JSON.

Timing follows one rule everywhere: on CUDA, CUDA events around each call with a synchronize after
it; on the CPU, ``time.perf_counter``. Where the scripts differ (a synchronize before every call,
after the warm-up, peak-memory tracking), the difference is a keyword, so each script measures
exactly as it always did.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time

import torch

# Official TRELLIS.2 decoder configs (pipeline.json); the shape decoder's resolution is per stage.
SS_DECODER_FULL = dict(out_channels=1, latent_channels=8, num_res_blocks=2, channels=[512, 128, 32],
                       num_res_blocks_middle=2, norm_type="layer", use_fp16=True)
SHAPE_DECODER_FULL = dict(resolution=1024, model_channels=[1024, 512, 256, 128, 64], latent_channels=32,
                          num_blocks=[4, 16, 8, 4, 0], block_type=["SparseConvNeXtBlock3d"] * 5,
                          up_block_type=["SparseResBlockC2S3d"] * 4, block_args=[{}] * 5, use_fp16=True)


# ----------------------------------------------------------------------------------- devices
def default_device(requested: str | None, tiny: bool) -> torch.device:
    """``requested``, else cuda when available and not ``tiny``, else cpu."""
    return torch.device(requested or ("cpu" if tiny or not torch.cuda.is_available() else "cuda"))


def bench_device(args) -> torch.device | None:
    """``default_device(args.device, args.tiny)``; None (after a message) for a full-size run without CUDA."""
    device = default_device(args.device, args.tiny)
    if not args.tiny and device.type != "cuda":
        print("full size needs CUDA; use --tiny on the CPU", file=sys.stderr)
        return None
    return device


def flow_run_setup(args) -> torch.device | None:
    """Device, ``args.dtype`` default (float32 with ``--tiny``, else bfloat16) and ``--tiny``'s caps
    on warmup (1) and repeats (3); None (after a message) for a full-size run without CUDA."""
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    if args.tiny:
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 3)
    return bench_device(args)


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, ``"cpu"`` otherwise."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_json(path: str | None, result, indent: int = 1) -> None:
    """Write ``result`` to ``path`` (nothing when ``path`` is empty)."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=indent)


# ----------------------------------------------------------------------------------- timing
def _call(fn, keep: bool):
    if keep:
        return fn()
    fn()  # the result is freed here, inside the timed region
    return None


def sample_times(fn, device: torch.device, warmup: int, repeats: int, *, sync_each: bool = False,
                 sync_after_warmup: bool = False, track_peak: bool = False, empty_cache: bool = False,
                 keep_last: bool = False):
    """``(ms of each of the repeats, peak extra GiB or None, last result or None)``.

    ``warmup`` untimed calls first. On CUDA: ``sync_after_warmup`` synchronizes once after them;
    ``track_peak`` does too, then (after ``torch.cuda.empty_cache()`` if ``empty_cache``) records
    the allocated memory and resets the peak, so the peak is the maximum allocated during the
    repeats minus what was allocated before them; ``sync_each`` also synchronizes before every
    timed call. ``keep_last`` keeps the last result (each call's previous result is dropped first).
    """
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    base = None
    if cuda and (sync_after_warmup or track_peak):
        torch.cuda.synchronize()
        if empty_cache:
            torch.cuda.empty_cache()
        if track_peak:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
    times, out = [], None
    for _ in range(repeats):
        out = None
        if cuda:
            if sync_each:
                torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = _call(fn, keep_last)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = _call(fn, keep_last)
            times.append(1000 * (time.perf_counter() - t0))
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if base is not None else None
    return times, peak, out


def median_ms(fn, device: torch.device, warmup: int, repeats: int, **kw) -> float:
    """Median ms of ``fn()`` (``sample_times``' keywords)."""
    return statistics.median(sample_times(fn, device, warmup, repeats, **kw)[0])


def wall_ms(fn, device: torch.device) -> float:
    """Wall ms of one ``fn()`` between two synchronizes (e.g. a first call, compiles included)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return 1000 * (time.perf_counter() - t0)


def kernel_times(fn, steps: int = 3, warmup: int = 3) -> dict:
    """``{kernel name: {"us", "calls"}}`` per call of ``fn`` on CUDA: device time of each kernel from
    torch.profiler (aten ops left out), so host launch gaps do not count."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us and ev.key and not ev.key.startswith("aten::"):
            out[ev.key] = {"us": us / steps, "calls": ev.count / steps}
    return out


def sdpa_backend_ms(q, k, v, warmup: int, repeats: int, digits: int = 4) -> dict:
    """``{backend: median ms}`` of ``F.scaled_dot_product_attention(q, k, v)`` for torch's own choice
    ("default"), cuDNN, FlashAttention-2 and memory-efficient (an error message where one refuses)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention
    backends = [("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    row = {}
    for name, backend in backends:
        def call():
            if backend is None:
                return sdpa(q, k, v)
            with sdpa_kernel(backend):
                return sdpa(q, k, v)
        try:
            row[name] = round(median_ms(call, q.device, warmup, repeats), digits)
        except RuntimeError as err:
            row[name] = f"error: {str(err).splitlines()[0][:80]}"
    return row


def gpu_ms(fn, device: torch.device, steps: int = 3) -> float | None:
    """Summed kernel time (ms) of one ``fn()`` on CUDA (:func:`kernel_times`); None on the CPU."""
    if device.type != "cuda":
        return None
    return sum(v["us"] for v in kernel_times(fn, steps).values()) / 1e3


def peak_extra(fn, device: torch.device, unit: int = 2 ** 30, run_on_cpu: bool = False) -> float | None:
    """Peak allocated memory above the current allocation during one ``fn()``, in ``unit`` bytes.

    CUDA only: on the CPU returns None (after calling ``fn`` once if ``run_on_cpu``).
    """
    if device.type != "cuda":
        if run_on_cpu:
            fn()
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / unit


# ----------------------------------------------------------------------------------- random weights
def gamma_or_norm_weight(name: str, leaf: str) -> bool:
    """Parameters set to 1: every ``gamma`` and every ``weight`` with "norm" in its name."""
    return leaf == "gamma" or ("norm" in name and leaf == "weight")


def gamma_or_norm2_weight(name: str, leaf: str) -> bool:
    """Parameters set to 1: every ``gamma`` and the blocks' ``norm2.weight``."""
    return leaf == "gamma" or name.endswith("norm2.weight")


def matrix_fan_in(p: torch.Tensor) -> int:
    """``p.shape[1]`` (a Linear's in_features)."""
    return p.shape[1]


def flat_fan_in(p: torch.Tensor) -> int:
    """Elements per output channel (in_features, or in_channels x kernel volume)."""
    return p.numel() // p.shape[0]


def init_random_(model: torch.nn.Module, seed: int, device=None, *, ones=gamma_or_norm_weight,
                 fan_in=matrix_fan_in) -> None:
    """Random values in place: ``ones(name, leaf)`` -> 1, biases 0, other vectors N(0, 0.05),
    tensors N(0, 1/fan_in(p)). The generator lives on ``device`` (default: the parameters')."""
    gen = torch.Generator(device=device or next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if ones(name, leaf):
                p.fill_(1.0)
            elif leaf == "bias":
                p.zero_()
            elif p.dim() == 1:
                p.normal_(0.0, 0.05, generator=gen)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(fan_in(p)), generator=gen)


def random_model(cls, kwargs: dict, device: torch.device, seed: int, gen_device=None, **init) -> torch.nn.Module:
    """``cls(**kwargs)`` built on 'meta', allocated on ``device``, ``init_random_`` in place, eval."""
    with torch.device("meta"):
        model = cls(**kwargs)
    model = model.to_empty(device=device)
    init_random_(model, seed, gen_device, **init)
    return model.eval()


def random_coords(n: int, res: int, batch: int, device) -> torch.Tensor:
    """``[batch * n, 4]`` int32: the same n random cells of a res^3 grid for every batch item."""
    flat = torch.randperm(res ** 3, device=device)[:n].sort().values
    xyz = torch.stack([flat // res ** 2, (flat // res) % res, flat % res], 1)
    return torch.cat([torch.cat([torch.full_like(xyz[:, :1], b), xyz], 1) for b in range(batch)]).int()
