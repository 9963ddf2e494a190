"""Whole networks visiting a CUDA device from pinned host copies (the ``model`` placement, ``--offload``).

A network that lives on the CPU and visits the device while its stage runs used to move with
``module.to(device)`` and back with ``module.to("cpu")``: from pageable memory in, and a fresh host
allocation for every weight on the way out (the H100's 24 GiB run spent ~24 s of a 28 s back view
on that). :class:`PinnedVisits` keeps the weights in page-locked host memory through diffusers'
``ModuleGroup`` (the unit its group offloading moves): a visit copies them in on a side stream
(``onload_``), and leaving points every parameter back at its host copy (``offload_``): nothing is
copied back and nothing is allocated on the host. Host RAM: the same bytes the network held on the
CPU before, now page-locked; while it visits, the host copy stays (the device holds a second one).

The weights are pinned in chunks of at most :data:`CHUNK_BYTES` (one ``ModuleGroup`` each, its
pageable original freed right after), so pinning never holds a second copy of a whole network.
On a CPU device, without diffusers, or with ``KNOW3D_PIN_HOST=0`` in the environment (a host short of
RAM to lock), :func:`visits_for` returns None and the callers keep ``.to``.
"""
from __future__ import annotations

import os

import torch

__all__ = ["CHUNK_BYTES", "PIN_HOST_ENV", "PinnedVisits", "chunks", "pin_host_enabled", "visits_for"]

PIN_HOST_ENV = "KNOW3D_PIN_HOST"

CHUNK_BYTES = 256 * 2 ** 20


def chunks(module: torch.nn.Module, max_bytes: int = CHUNK_BYTES) -> list[tuple[list, list]]:
    """``module``'s parameters and buffers in order, as ``[(parameters, buffers)]`` of at most
    ``max_bytes`` each (a larger tensor alone); every tensor exactly once (tied ones once)."""
    out, params, bufs, size, seen = [], [], [], 0, set()
    tensors = [(p, True) for p in module.parameters()] + [(b, False) for b in module.buffers()]
    for t, is_param in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = t.numel() * t.element_size()
        if (params or bufs) and size + n > max_bytes:
            out.append((params, bufs))
            params, bufs, size = [], [], 0
        (params if is_param else bufs).append(t)
        size += n
    if params or bufs:
        out.append((params, bufs))
    return out


class PinnedVisits:
    """One network's pinned host copies and its visits to ``device`` (CUDA). Build it while the
    network is on the CPU; then :meth:`onload` / :meth:`offload` around each stage that runs it."""

    def __init__(self, module: torch.nn.Module, device: torch.device, max_bytes: int = CHUNK_BYTES):
        from diffusers.hooks.group_offloading import ModuleGroup

        self.module = module
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.groups = []
        for params, bufs in chunks(module, max_bytes):
            group = ModuleGroup(modules=[], offload_device=torch.device("cpu"), onload_device=self.device,
                                offload_leader=module, onload_leader=module, parameters=params, buffers=bufs,
                                non_blocking=True, stream=self.stream, record_stream=False,
                                low_cpu_mem_usage=False, onload_self=True)
            group.offload_()  # the parameters now point at the pinned copies; the pageable ones are freed
            self.groups.append(group)
        self.host_bytes = sum(t.numel() * t.element_size() for g in self.groups for t in g.cpu_param_dict.values())

    def onload(self) -> None:
        """Copy every weight to the device (side stream), then wait for the copies."""
        for group in self.groups:
            group.onload_()
        self.stream.synchronize()

    def offload(self) -> None:
        """Point every weight back at its pinned host copy (after the device's pending work)."""
        for group in self.groups:
            group.offload_()


def pin_host_enabled() -> bool:
    """False when ``KNOW3D_PIN_HOST`` is ``0`` / ``false`` / ``no`` / ``off``."""
    return os.environ.get(PIN_HOST_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def visits_for(module, device) -> PinnedVisits | None:
    """:class:`PinnedVisits` of ``module`` (an ``nn.Module`` on the CPU) for a CUDA ``device``; None
    for any other device, any other object, without diffusers, or when :func:`pin_host_enabled` is
    False (callers then move with ``.to``)."""
    device = torch.device(device)
    if device.type != "cuda" or not isinstance(module, torch.nn.Module) or not torch.cuda.is_available():
        return None
    if not pin_host_enabled():
        return None
    try:
        import diffusers.hooks.group_offloading  # noqa: F401
    except ImportError:
        return None
    return PinnedVisits(module, device)
