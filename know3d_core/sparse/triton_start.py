"""Triton's own start in a process, moved off the first kernel launch.

The first Triton launch of a process, even with every kernel already in Triton's disk cache, first
hashes Triton's compiler (its Python sources and the ~0.4 GB ``libtriton`` shared object; the key of
every cache lookup, computed once per process) and loads its CUDA driver utilities (a small C module
built once per machine). Measured on the H100 machine (``benchmarks/probe_first_call.py --mode steps``,
session 10): the first kernel took 529 ms with a warm disk cache and the next one 9 ms; with a cold
machine the driver utilities added 357 ms. :func:`start_triton_runtime` queues both on the kernel
warm-up thread (:mod:`.kernel_dispatch`), so they overlap what runs before the first launch (reading
the weights); the networks' own warm-ups queue behind it and find Triton started.
"""
from __future__ import annotations

import logging
from typing import Union

import torch

from .conv_triton import triton_available
from .kernel_dispatch import KernelWarmup

__all__ = ["start_triton_runtime"]

_log = logging.getLogger(__name__)
_RUNTIME = KernelWarmup()
_KEY = "triton-runtime"


def start_triton_runtime(device: Union[str, torch.device]) -> bool:
    """Queue Triton's start (compiler hash, driver utilities) on the warm-up thread, once per process.
    True if queued now; False off CUDA, without Triton, or when already started."""
    if torch.device(device).type != "cuda" or not triton_available():
        return False
    return _RUNTIME.start(_KEY, _start_runtime)


def _start_runtime() -> bool:
    """The start itself. Both calls are Triton internals (``triton.runtime``): on a Triton that lacks
    them nothing is lost but the head start (the first launch does the same work)."""
    try:
        from triton.runtime import driver
        from triton.runtime.cache import triton_key

        driver.active.utils  # noqa: B018 - the attribute access loads (or builds) the utilities
        triton_key()
    except Exception as exc:  # noqa: BLE001 - an optimisation only
        _log.info("Triton start ahead of the first launch skipped: %s: %s", type(exc).__name__, exc)
        return False
    return True
