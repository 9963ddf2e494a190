"""The pack as ComfyUI imports it: every node registered, one warning line (and the other nodes
still there) when a family's dependency is missing, no install and no process-global changes."""
import json
import os
import subprocess
import sys

from _nodes_helpers import ROOT

LOADER = r"""
import importlib.abc, importlib.util, json, logging, os, sys, warnings
root, blocked = sys.argv[1], sys.argv[2:]

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.endswith("." + b) for b in blocked):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, Block())
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger().addHandler(Keep())
logging.getLogger().setLevel(logging.INFO)

import torch
def state():
    return {"dtype": str(torch.get_default_dtype()), "grad": torch.is_grad_enabled(),
            "threads": torch.get_num_threads(), "path": list(sys.path), "cwd": os.getcwd(),
            "filters": len(warnings.filters), "env": sorted(os.environ), "root_level": logging.getLogger().level,
            "deterministic": torch.are_deterministic_algorithms_enabled()}
before = state()
spec = importlib.util.spec_from_file_location("pack_under_test", os.path.join(root, "__init__.py"),
                                              submodule_search_locations=[root])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
after = state()
print(json.dumps({"nodes": sorted(mod.NODE_CLASS_MAPPINGS), "log": records,
                  "changed": {k: [before[k], after[k]] for k in before if before[k] != after[k]},
                  "pip": any(m.startswith("pip") for m in sys.modules)}))
"""


def load_pack_in_subprocess(*blocked):
    out = subprocess.run([sys.executable, "-c", LOADER, ROOT, *blocked], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


ALL = {"Know3DSaveMesh", "Know3DRenderNormals", "Know3DLoadQwenEditLoRA", "Know3DBackViewPrompt",
       "Know3DBackViewSample", "Know3DExtractHiddenStates", "Know3DLoadModel", "Know3DImageCondition",
       "Know3DSparseStructure", "Know3DGeometry", "Know3DKnowledgeFromLatent", "Know3DKnowledgeFromImage",
       "Know3DBackViewAsSecondView", "Know3DTexture"}


def test_every_node_registers_without_side_effects():
    res = load_pack_in_subprocess()
    assert set(res["nodes"]) == ALL
    assert res["changed"] == {}, res["changed"]
    assert not res["pip"]
    assert not [m for m in res["log"] if "Know3D" in m], res["log"]


def test_missing_optional_dependencies_do_not_break_the_pack():
    # trimesh, diffusers, transformers are only needed when a node runs, never at import.
    res = load_pack_in_subprocess("trimesh", "diffusers", "transformers", "scipy")
    assert set(res["nodes"]) == ALL, res["log"]


def test_a_family_whose_import_fails_is_skipped_with_one_warning_line():
    res = load_pack_in_subprocess("mmdit")  # what the qwen family needs
    qwen = {"Know3DLoadQwenEditLoRA", "Know3DBackViewPrompt", "Know3DBackViewSample", "Know3DExtractHiddenStates"}
    assert set(res["nodes"]) == ALL - qwen
    warnings = [m for m in res["log"] if "Know3D" in m]
    assert len(warnings) == 1 and "'qwen'" in warnings[0] and "mmdit" in warnings[0], warnings


def test_a_folder_named_comfy_on_sys_path_is_not_comfyui(tmp_path):
    """ComfyUI's ``comfy`` is a namespace package, so a folder named ``comfy`` next to a checkout of
    this pack (pytest puts the checkout's parent on sys.path) would import as one: the pack must still
    run hostless and import none of it."""
    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy_api").mkdir()
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
            "import importlib.util, os; root = sys.argv[1]; "
            "spec = importlib.util.spec_from_file_location('pack_under_test', os.path.join(root, '__init__.py'), "
            "submodule_search_locations=[root]); mod = importlib.util.module_from_spec(spec); "
            "sys.modules[spec.name] = mod; spec.loader.exec_module(mod); "
            "io = sys.modules['pack_under_test.nodes._io']; "
            "print(len(mod.NODE_CLASS_MAPPINGS), io.HOSTED, 'comfy' in sys.modules, 'comfy_api' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(len(ALL)), "False", "False", "False"]
