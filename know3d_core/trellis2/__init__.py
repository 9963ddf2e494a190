"""TRELLIS.2 geometry networks in pure PyTorch, loading the official checkpoints.

Flows: :class:`SparseStructureFlowModel` (dense, ``sparse_structure_flow.py``) and
:class:`SLatFlowModel` (sparse tokens, ``slat_flow.py``). Loading: ``loading.py``; tiny
official-layout folders for tests and demos: ``tiny.py``. Names are imported on first use.
"""
import importlib

_LAZY = {
    "SparseStructureFlowModel": "sparse_structure_flow",
    "SLatFlowModel": "slat_flow",
    "ElasticSLatFlowModel": "slat_flow",
    "load_model": "loading",
    "load_pipeline_model": "loading",
    "load_pipeline_models": "loading",
    "read_pipeline_config": "loading",
    "load_comfy_flow_file": "loading",
    "CheckpointError": "loading",
    "write_tiny_trellis2": "tiny",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
