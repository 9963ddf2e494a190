"""Thin ComfyUI adapters over ``know3d_core``, one module per family of nodes, on ComfyUI's V3 node
API (``IO.ComfyNode``; see ``_io.py``).

Each family module lists its node classes in ``NODES``. A family whose optional dependency is
missing is skipped with one warning line; the others still load. ComfyUI registers the classes
from ``NODE_CLASS_MAPPINGS`` (node id -> class; the ids are those of the V1 nodes, so saved
workflows load) and shows each schema's display name.
"""
import importlib
import logging


_log = logging.getLogger("know3d")

_FAMILIES: tuple[str, ...] = ("mesh", "qwen", "trellis", "knowledge", "texture")

NODE_LIST: list = []
for _name in _FAMILIES:
    try:
        _mod = importlib.import_module(f".{_name}", __name__)
    except ImportError as exc:  # optional dependency missing: keep the other families
        _log.warning("Know3D: node family %r not loaded (%s)", _name, exc)
        continue
    NODE_LIST.extend(_mod.NODES)


def _schema(cls):
    return cls.define_schema()


NODE_CLASS_MAPPINGS: dict = {_schema(c).node_id: c for c in NODE_LIST}
NODE_DISPLAY_NAME_MAPPINGS: dict = {_schema(c).node_id: _schema(c).display_name for c in NODE_LIST}

