"""The one rule for when a hand-written (Triton) kernel may run, and the guard that enforces it.

A Triton launch is invisible to autograd: its output has no ``grad_fn``, so a kernel without a
backward pass that runs on a tensor that requires grad cuts the graph without a word (every
parameter upstream silently gets no gradient). Hence:

- :func:`use_kernel` is the dispatch decision every fused call site takes: the kernel when the
  device allows it (``device_ok``) and either it has a backward pass (an ``autograd.Function``) or
  no input needs a gradient; otherwise the caller's PyTorch path.
- :func:`check_no_grad` is called by every raw kernel entry point that has no backward: it raises
  instead of returning a result that autograd would treat as a constant.
- :class:`KernelSwitch` is each kernel family's on/off setting (on by default; scoped off for A/B runs).

Torch-only (no Triton import): the lowest layer, shared by the sparse ops and the networks.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

__all__ = ["grad_needed", "use_kernel", "check_no_grad", "KernelSwitch"]


class KernelSwitch:
    """One kernel family's on/off setting for the process (an explicit object, no environment variable),
    with :meth:`use` to change it inside a block only (A/B runs, tests)."""

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)

    def set(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    @contextlib.contextmanager
    def use(self, enabled: bool) -> Iterator[None]:
        previous = self.enabled
        self.enabled = bool(enabled)
        try:
            yield
        finally:
            self.enabled = previous


def grad_needed(*tensors: Optional[torch.Tensor]) -> bool:
    """True when autograd is recording and any given tensor requires grad (None entries ignored)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def use_kernel(device_ok: bool, has_backward: bool, *inputs: Optional[torch.Tensor]) -> bool:
    """Whether to launch the kernel (True) or take the PyTorch path (False).

    Args:
        device_ok: the kernel can run here at all (CUDA tensor, Triton present, switch on, dtype).
        has_backward: the kernel is wrapped in an ``autograd.Function`` whose backward covers
            every input in ``inputs``.
        inputs: the kernel's tensor inputs (parameters included).
    """
    if not device_ok:
        return False
    return has_backward or not grad_needed(*inputs)


def check_no_grad(name: str, *inputs: Optional[torch.Tensor]) -> None:
    """Raise when a kernel without a backward pass would run on an input that needs a gradient."""
    if grad_needed(*inputs):
        raise RuntimeError(
            f"{name}: this Triton kernel has no backward pass but an input requires grad "
            "(its output would silently cut the autograd graph); run it under torch.no_grad() "
            "or call the dispatching wrapper, which takes the PyTorch path when gradients are needed"
        )
