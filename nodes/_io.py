"""The V3 node API the nodes are written against: ComfyUI's own ``comfy_api.latest`` (``IO``,
``ComfyExtension``) when the pack runs inside ComfyUI, else the hostless stand-in in
``_io_hostless`` (same names; tests, CI and the workflow builder import the pack without ComfyUI)."""
from . import _host

_latest = _host._module("comfy_api.latest") if _host._module("comfy") is not None else None

if _latest is not None:
    IO = _latest.IO
    ComfyExtension = _latest.ComfyExtension
    HOSTED = True
else:
    from . import _io_hostless as IO  # noqa: N812 (the host's name)

    ComfyExtension = IO.ComfyExtension
    HOSTED = False

__all__ = ["IO", "ComfyExtension", "HOSTED"]
