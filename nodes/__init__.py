"""Thin ComfyUI adapters over ``know3d_core``, one module per family of nodes.

Each family module exposes ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS``. A family
whose optional dependency is missing is skipped with one warning line; the others still load.
"""
import importlib
import logging

_log = logging.getLogger("know3d")

_FAMILIES: tuple[str, ...] = ("mesh", "qwen", "trellis", "knowledge")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _name in _FAMILIES:
    try:
        _mod = importlib.import_module(f".{_name}", __name__)
    except ImportError as exc:  # optional dependency missing: keep the other families
        _log.warning("Know3D: node family %r not loaded (%s)", _name, exc)
        continue
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)
