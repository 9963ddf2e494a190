"""Launch compiled Triton kernels with less host time than Triton's JIT dispatch (CUDA).

Used by the flows' fused kernels (``trellis2/modules/fused.py``), the neighbour-map kernels
(``neighbour_triton.py``) and the sparse conv (``conv_triton.py``). Kernels launched this way mark their
varying ints ``do_not_specialize``, so one compiled kernel serves every size and the key below stays small;
an int left specialised (the conv's channel counts) goes into the caller's ``spec`` by value.
"""
from __future__ import annotations

import logging
from typing import ContextManager, Optional

import torch

from .kernel_dispatch import KernelSwitch

__all__ = ["TritonLauncher", "in_int32", "use_direct_launches"]

_log = logging.getLogger(__name__)
_direct_switch = KernelSwitch(True)


def use_direct_launches(enabled: bool) -> ContextManager[None]:
    """Context manager: every :class:`TritonLauncher` launches through Triton's JIT inside the block when
    ``enabled`` is False (the A/B baseline of benchmarks/bench_vs_reference.py's ``jit_launches`` variant)."""
    return _direct_switch.use(enabled)


def in_int32(*values: int) -> bool:
    """Whether every int fits int32: Triton types an int argument i32 or i64 by its value, so this is part
    of a launch's specialisation even for ``do_not_specialize`` arguments."""
    return all(-2**31 <= v < 2**31 for v in values)


class TritonLauncher:
    """Launch a ``@triton.jit`` kernel with less host time.

    The first launch of each specialisation goes through Triton's JIT (compile + launch) and keeps
    the compiled kernel; later launches with the same key call it directly, skipping Triton's
    per-call argument binding (about 35 us of host time per launch, which adds up to several ms
    per DiT forward where the GPU would otherwise wait). The key holds everything Triton
    specialises on here: each tensor's dtype, device and 16-byte alignment, the caller's ``spec`` (the
    values of specialised ints, and :func:`in_int32` of the others), the constexprs, the warps. Any error
    on the direct path switches it off for good (plain JIT launches). In Triton's interpreter every launch
    is a JIT launch (it returns no compiled kernel).
    """

    def __init__(self, fn):
        self.fn = fn
        self.compiled: dict = {}
        self.direct = True

    def __call__(self, grid: int, args: list, spec: tuple, constexprs: dict, num_warps: int,
                 num_stages: Optional[int] = None) -> None:
        """Launch ``fn`` on a 1-D ``grid`` with positional ``args`` then ``constexprs`` (in the kernel's
        parameter order); ``num_stages``: Triton's default when None."""
        key = (spec, num_warps, num_stages, tuple(constexprs.values()),
               tuple((a.dtype, a.device, a.data_ptr() % 16 == 0) for a in args if isinstance(a, torch.Tensor)))
        kernel = self.compiled.get(key) if self.direct and _direct_switch.enabled else None
        if kernel is not None:
            try:
                from triton import knobs
                from triton.runtime import driver
                all_args = (*args, *constexprs.values())
                stream = driver.active.get_current_stream(driver.active.get_current_device())
                meta = kernel.launch_metadata((grid, 1, 1), stream, *all_args)
                kernel.run(grid, 1, 1, stream, kernel.function, kernel.packed_metadata, meta,
                           knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *all_args)
                return
            except Exception as exc:  # noqa: BLE001 - Triton internals differ between versions
                self.direct = False
                _log.info("direct Triton launch unavailable (%s: %s); using the JIT launcher", type(exc).__name__, exc)
        options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
        compiled = self.fn[(grid,)](*args, **constexprs, **options)
        if self.direct and compiled is not None:
            self.compiled[key] = compiled
