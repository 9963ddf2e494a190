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
pageable original freed right after), so pinning never holds a second copy of a whole network. Each
chunk is ONE pinned buffer that its tensors are views of (:func:`pin_in_chunks`; ``ModuleGroup`` keeps
a tensor that is already pinned as it is): torch's pinned-memory allocator rounds every allocation up
to a power of two, which for the MMDiT's 9 / 36 MiB fp8 matrices one by one would lock ~1.6x their
bytes; a full 256 MiB chunk is itself a power of two.
``pin_host=True`` of ``Know3DPipeline``; the CLI's ``--pin-host``, on by default for the block plans of
``--vram`` (``plan.MemoryPlan.pins_by_default``). Measured at full size on an H100 (session 9): the 16 GiB
plan ran a generation in 8.1 s against 20.2 s from pageable memory; pinning the whole fp8 MMDiT for the
``fp8`` plan made its build 56.8 s against 28.6 s. On a CPU device or without diffusers, :func:`visits_for`
returns None and the callers keep ``.to``.
"""
from __future__ import annotations

import torch

__all__ = ["CHUNK_BYTES", "PinnedVisits", "chunks", "pack_into", "packed_bytes", "pin_chunk", "pin_in_chunks",
           "visits_for"]

ALIGN = 64  # bytes: each tensor's offset in its chunk buffer

CHUNK_BYTES = 256 * 2 ** 20


def _aligned_bytes(t: torch.Tensor) -> int:
    return -(-t.numel() * t.element_size() // ALIGN) * ALIGN


def chunks(module: torch.nn.Module, max_bytes: int = CHUNK_BYTES) -> list[tuple[list, list]]:
    """``module``'s parameters and buffers in order, as ``[(parameters, buffers)]`` of at most
    ``max_bytes`` each (sizes rounded up to :data:`ALIGN`; a larger tensor alone); every tensor
    exactly once (tied ones once)."""
    out, params, bufs, size, seen = [], [], [], 0, set()
    tensors = [(p, True) for p in module.parameters()] + [(b, False) for b in module.buffers()]
    for t, is_param in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = _aligned_bytes(t)
        if (params or bufs) and size + n > max_bytes:
            out.append((params, bufs))
            params, bufs, size = [], [], 0
        (params if is_param else bufs).append(t)
        size += n
    if params or bufs:
        out.append((params, bufs))
    return out


def packed_bytes(tensors: list) -> int:
    """Bytes of the buffer :func:`pack_into` needs for ``tensors``."""
    return sum(_aligned_bytes(t) for t in tensors)


def pack_into(tensors: list, buf: torch.Tensor) -> None:
    """Copy ``tensors`` into ``buf`` (uint8 ``[packed_bytes]``), each at an :data:`ALIGN`-ed offset, and
    make each tensor's ``.data`` its view of ``buf`` (same dtype, shape and values)."""
    offset = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        view = buf[offset:offset + n].view(t.dtype).view(t.shape)
        view.copy_(t.data)
        t.data = view
        offset += _aligned_bytes(t)


def pin_chunk(tensors: list) -> int:
    """:func:`pack_into` one pinned buffer (the pageable originals are freed). Returns the bytes the
    pinned allocator locked for it (the request rounded up to a power of two)."""
    total = packed_bytes(tensors)
    if total:
        pack_into(tensors, torch.empty(total, dtype=torch.uint8, pin_memory=True))
    return 1 << (total - 1).bit_length() if total else 0


def pin_in_chunks(module: torch.nn.Module, max_bytes: int = CHUNK_BYTES) -> tuple[list, int]:
    """:func:`pin_chunk` over ``module``'s :func:`chunks`: ``(chunks, bytes locked)``. diffusers' group
    offloading with streams then keeps these pinned tensors instead of pinning each one again."""
    parts = chunks(module, max_bytes)
    return parts, sum(pin_chunk(params + bufs) for params, bufs in parts)


class PinnedVisits:
    """One network's pinned host copies and its visits to ``device`` (CUDA). Build it while the
    network is on the CPU; then :meth:`onload` / :meth:`offload` around each stage that runs it."""

    def __init__(self, module: torch.nn.Module, device: torch.device, max_bytes: int = CHUNK_BYTES):
        from diffusers.hooks.group_offloading import ModuleGroup

        self.module = module
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.groups = []
        parts, self.host_bytes = pin_in_chunks(module, max_bytes)
        for params, bufs in parts:
            group = ModuleGroup(modules=[], offload_device=torch.device("cpu"), onload_device=self.device,
                                offload_leader=module, onload_leader=module, parameters=params, buffers=bufs,
                                non_blocking=True, stream=self.stream, record_stream=False,
                                low_cpu_mem_usage=False, onload_self=True)
            group.offload_()  # the weights point at their pinned copies (the chunk's views, kept as they are)
            self.groups.append(group)

    def onload(self) -> None:
        """Copy every weight to the device (side stream), then wait for the copies."""
        for group in self.groups:
            group.onload_()
        self.stream.synchronize()

    def offload(self) -> None:
        """Point every weight back at its pinned host copy (after the device's pending work)."""
        for group in self.groups:
            group.offload_()


def visits_for(module, device) -> PinnedVisits | None:
    """:class:`PinnedVisits` of ``module`` (an ``nn.Module`` on the CPU) for a CUDA ``device``; None
    for any other device, any other object, or without diffusers (callers then move with ``.to``)."""
    device = torch.device(device)
    if device.type != "cuda" or not isinstance(module, torch.nn.Module) or not torch.cuda.is_available():
        return None
    try:
        import diffusers.hooks.group_offloading  # noqa: F401
    except ImportError:
        return None
    return PinnedVisits(module, device)
