"""Helpers for the node tests: load the pack the way ComfyUI does (a package from its folder),
so the nodes' relative imports resolve, and build small real inputs."""
import importlib.util
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "know3d_pack_nodes_under_test"


def load_pack():
    """The pack package (cached): ``pack.nodes``, ``pack.know3d_core``, ``pack.NODE_CLASS_MAPPINGS``."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = mod
    spec.loader.exec_module(mod)
    return mod


def submodule(name: str):
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")


def icosphere(subdivisions: int = 2, radius: float = 0.3, center=(0.0, 0.0, 0.0)):
    """(vertices [V, 3] float32, faces [F, 3] int64) of an outward-oriented icosphere."""
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    v = torch.tensor(m.vertices, dtype=torch.float32) + torch.tensor(center, dtype=torch.float32)
    return v, torch.tensor(m.faces, dtype=torch.int64)


def load_workflow_builder():
    """``tools/build_workflows.py`` as a module (tools/ is no package), loaded once per session."""
    name = "know3d_workflow_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", "build_workflows.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]
