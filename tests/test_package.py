"""The pack imports without ComfyUI, both as a library and as a ComfyUI custom-node package."""
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_pack():
    spec = importlib.util.spec_from_file_location(
        "know3d_pack_under_test", os.path.join(ROOT, "__init__.py"),
        submodule_search_locations=[ROOT])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_pack_exports_mappings_without_comfyui():
    pack = _load_pack()
    assert isinstance(pack.NODE_CLASS_MAPPINGS, dict)
    assert isinstance(pack.NODE_DISPLAY_NAME_MAPPINGS, dict)
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) <= set(pack.NODE_CLASS_MAPPINGS)
    assert "comfy" not in sys.modules


def test_core_never_imports_comfy():
    core = os.path.join(ROOT, "know3d_core")
    offenders = []
    for dirpath, _, files in os.walk(core):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                    text = fh.read()
                for line in text.splitlines():
                    s = line.strip()
                    if s.startswith(("import comfy", "from comfy")):
                        offenders.append(f"{f}: {s}")
    assert not offenders, offenders


def test_core_imports_in_a_clean_interpreter():
    code = "import know3d_core, sys; assert 'comfy' not in sys.modules; print(know3d_core.__version__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
