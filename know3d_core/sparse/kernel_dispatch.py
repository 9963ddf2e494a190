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
- :class:`KernelWarmup` runs a network's kernel warm-up (Triton compiles, or loads from its disk
  cache) once per key: in the background from load (:meth:`KernelWarmup.start`), joined before the
  first use (:meth:`KernelWarmup.ensure`), or at the first use itself.

Torch-only (no Triton import): the lowest layer, shared by the sparse ops and the networks.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, Hashable, Iterator, Optional, Union

import torch

__all__ = ["grad_needed", "use_kernel", "check_no_grad", "KernelSwitch", "KernelWarmup", "wait_for_warmups"]


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


_BACKGROUND: Optional[ThreadPoolExecutor] = None  # one thread: warm-ups run one after another, in start order
_QUEUED: list = []  # futures of started warm-ups (cancelled at interpreter exit if still queued)
_in_warmup = threading.local()


def _background() -> ThreadPoolExecutor:
    global _BACKGROUND
    if _BACKGROUND is None:
        _BACKGROUND = ThreadPoolExecutor(1, thread_name_prefix="know3d-kernel-warmup")
        # The executor's exit hook runs every queued item before the process may end; drop the
        # queued warm-ups first (hooks registered later run earlier), so that exit waits for the
        # running one only.
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(_cancel_queued)
    return _BACKGROUND


def wait_for_warmups() -> None:
    """Block until every warm-up started so far has run (the background thread takes them in order), so
    that nothing runs beside what comes next (tests and benchmarks that watch the process as a whole)."""
    if _BACKGROUND is not None:
        _BACKGROUND.submit(lambda: None).result()


def _cancel_queued() -> None:
    for future in _QUEUED:
        future.cancel()
    _QUEUED.clear()


def _run_marked(fn: Callable[[], Any]) -> Any:
    """``fn()`` with this thread marked as inside a warm-up (nested ``ensure`` calls return at once)."""
    _in_warmup.active = True
    try:
        return fn()
    finally:
        _in_warmup.active = False


class KernelWarmup:
    """A network's kernel warm-up, run once per key (e.g. ``(device, dtype)``).

    Triton's first launch of each kernel variant in a process compiles it (empty disk cache) or
    loads it, and the process's first launch also pays Triton's own start (it hashes its compiler
    before the first cache lookup; ~0.5 s on the H100 machine). :meth:`start` moves that work into
    a background thread when the network is loaded, so that it overlaps whatever runs before the
    network's first call; :meth:`ensure` (called at the top of the forward) waits for it, or runs
    it there and then when nothing was started. All networks share one background thread: their
    warm-ups run one after another in start order, and one still waiting in the queue when its
    network is called runs in the caller instead.

    Errors: an exception raised by a background warm-up is re-raised by the first :meth:`ensure`
    of its key (the first use), as it would have been had the warm-up run there; later calls
    proceed. A warm-up that calls the network's forward (the flows' tiny forward) reaches
    :meth:`ensure` again from inside: that nested call returns at once.

    Copies (``deepcopy``, pickling) start with nothing warmed: threads and futures do not copy.
    """

    def __init__(self):
        self._state: Dict[Hashable, Union[bool, Future]] = {}  # key -> True (done) or the pending Future

    def __deepcopy__(self, memo) -> "KernelWarmup":
        return KernelWarmup()

    def __getstate__(self) -> dict:
        return {"_state": {}}

    @staticmethod
    def key(device: Union[str, torch.device], dtype: torch.dtype) -> tuple:
        """``(device, dtype)`` key with the CUDA device's index filled in (``"cuda"`` and
        ``"cuda:0"`` name the same warm-up)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return (str(device), dtype)

    def pending(self, key: Hashable) -> bool:
        """True while a background warm-up of ``key`` is queued or running and nobody has joined it."""
        return isinstance(self._state.get(key), Future)

    def done(self, key: Hashable) -> bool:
        """True once ``key``'s warm-up ran (or was joined, or marked with :meth:`mark_done`)."""
        return self._state.get(key) is True

    def mark_done(self, key: Hashable) -> None:
        """Record ``key`` as warmed (e.g. a probe that ran the warm-up's jobs itself)."""
        self._state[key] = True

    def start(self, key: Hashable, fn: Callable[[], Any]) -> bool:
        """Queue ``fn`` on the background thread unless ``key`` is warmed or pending; True if queued."""
        if key in self._state:
            return False
        future = _background().submit(_run_marked, fn)
        _QUEUED[:] = [f for f in _QUEUED if not f.done()] + [future]
        self._state[key] = future
        return True

    def ensure(self, key: Hashable, fn: Callable[[], Any]) -> None:
        """Before the first use of ``key``: join its background warm-up (re-raising its error), or run
        ``fn`` here when none was started or it has not left the queue yet. No-op once done."""
        if getattr(_in_warmup, "active", False):
            return
        state = self._state.get(key)
        if state is True:
            return
        self._state[key] = True
        if isinstance(state, Future) and not state.cancel():
            state.result()  # waits; raises what the warm-up raised
            return
        fn()
