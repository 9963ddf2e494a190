"""know3d_core.plan: the one torch-free home of the shared tables (pipeline types, variants, file
names and key prefixes, dtype names)."""
import os
import re
import subprocess
import sys

import pytest

from know3d_core import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_the_tables_and_building_the_cli_parser_import_no_torch():
    code = ("import sys; import know3d_core.plan, know3d_core.model_check, know3d_core.cli as cli; "
            "cli.build_parser(); "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# Names of the shared tables: assigned in plan.py and nowhere else in the package or the nodes.
TABLES = ("PIPELINE_TYPES", "VARIANTS", "VARIANT_KINDS", "RESOLUTIONS", "COMFY_FLOW_PREFIX", "COMFY_FLOW_PREFIXES",
          "COMFY_VAE_PREFIX", "COMFY_VAE_PREFIXES", "COMFY_OUTER_PREFIXES", "MAX_NUM_TOKENS", "GEOMETRY_MODELS",
          "OFFICIAL_MODELS", "DTYPE_NAMES", "KINDS", "INJECTED_KINDS", "DINOV3_FOLDER", "COMFY_FILES")
# Literals only a table holds (a key prefix followed by its network, a dtype alias entry).
TABLE_LITERALS = ('"structure_model.":', '"struct_dec.":', '"img2shape_512.":', '"bf16":', '"multiview":')


def _sources():
    for top in ("know3d_core", "nodes"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    with open(path, encoding="utf-8") as f:
                        yield os.path.relpath(path, ROOT), f.read()


def test_each_table_is_defined_once():
    assignment = re.compile(rf"^\s*({'|'.join(TABLES)})\s*(:[^=\n]*)?=(?!=)", re.M)
    found = {}
    for path, text in _sources():
        for m in assignment.finditer(text):
            found.setdefault(m.group(1), []).append(path)
        for literal in TABLE_LITERALS:
            if literal in text:
                found.setdefault(literal, []).append(path)
    home = os.path.join("know3d_core", "plan.py")
    elsewhere = {name: [p for p in paths if p != home] for name, paths in found.items()}
    assert not {k: v for k, v in elsewhere.items() if v}, "restated outside plan.py"
    assert set(TABLE_LITERALS) <= set(found) and {"PIPELINE_TYPES", "VARIANTS", "COMFY_FLOW_PREFIXES"} <= set(found)


def test_pipeline_types_match_the_reference_table():
    # research/trellis2.md: "512" samples a 32^3 structure and the 512 flow; "1024" a 64^3 structure
    # and the 1024 flow on DINOv3 at 1024 px; the cascades 32^3 -> 512 flow -> 1024 flow at 1024/1536.
    assert plan.PIPELINE_TYPES == ("512", "1024", "1024_cascade", "1536_cascade")
    assert [plan.ss_resolution(t) for t in plan.PIPELINE_TYPES] == [32, 64, 32, 32]
    assert [plan.cond_resolutions(t) for t in plan.PIPELINE_TYPES] == [(512,), (512, 1024), (512, 1024), (512, 1024)]
    assert [plan.shape_condition_size(t) for t in plan.PIPELINE_TYPES] == [512, 1024, 512, 512]
    assert [plan.pipeline_type(t).mesh_resolution for t in plan.PIPELINE_TYPES] == [512, 1024, 1024, 1536]
    assert plan.required_models("1024") == ("sparse_structure_flow_model", "sparse_structure_decoder",
                                            "shape_slat_flow_model_1024", "shape_slat_decoder")
    assert plan.models_for_types(["512"]) == ["sparse_structure_flow_model", "sparse_structure_decoder",
                                              "shape_slat_flow_model_512", "shape_slat_decoder"]
    assert plan.models_for_types(None) == list(plan.GEOMETRY_MODELS)
    with pytest.raises(ValueError, match="unknown pipeline_type '2048'.*1536_cascade"):
        plan.ss_resolution("2048")
    with pytest.raises(ValueError, match="no cascade"):
        plan.hr_resolution("512")


def test_variants_kinds_and_dtypes():
    assert [plan.needs_back_view(v) for v in plan.VARIANTS] == [True, True, True, True, False]
    assert [plan.needs_know3d(v) for v in plan.VARIANTS] == [True, True, True, False, False]
    assert [plan.needs_back_image(v) for v in plan.VARIANTS] == [False, False, True, True, False]
    assert [plan.variant_of(plan.variant_kind(v)) for v in plan.VARIANTS] == list(plan.VARIANTS)
    with pytest.raises(ValueError, match="unknown variant 'back'"):
        plan.variant_kind("back")
    torch = pytest.importorskip("torch")
    assert [plan.dtype_name(x) for x in ("bf16", "FP16", "float", torch.float32)] == ["bfloat16", "float16",
                                                                                     "float32", "float32"]
    with pytest.raises(ValueError, match="unsupported dtype"):
        plan.dtype_name(torch.float64)
    assert plan.auto_dtype_name("cuda") == "bfloat16" and plan.auto_dtype_name("cuda", False) == "float32"


def test_comfy_key_rules():
    keys = ["model.diffusion_model.img2shape.x", "model.diffusion_model.structure_model.y"]
    assert plan.strip_outer_prefix(keys) == {"img2shape.x": keys[0], "structure_model.y": keys[1]}
    assert plan.comfy_file_kind(keys) == "flows"
    assert plan.comfy_file_kind(["vae.shape_dec.a", "vae.struct_dec.b"]) == "vae"
    assert plan.comfy_file_kind(["txt_dec.a"]) == "texture_vae" and plan.comfy_file_kind(["w"]) is None
    assert plan.comfy_is_512({"is_512": "True"}) and not plan.comfy_is_512({})
