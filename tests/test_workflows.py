"""The example workflows: only existing node types, type-correct links, valid widget values, UI and
API twins that agree, files equal to what workflows/_build.py produces. Core nodes are checked
against the recorded /object_info listing in tests/data/comfyui (ComfyUI 0.33.0)."""
import glob
import importlib.util
import json
import os
import sys

import pytest

from _nodes_helpers import ROOT, load_pack

WF = os.path.join(ROOT, "workflows")
LISTING = os.path.join(ROOT, "tests", "data", "comfyui", "object_info_0.33.0.json")
FRONTEND_ONLY = {"MarkdownNote", "Note"}
# Folder names ComfyUI's template browser scans (app/custom_node_manager.py, 0.33.0).
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")
# Combos that list files of a model / input folder: their options depend on the machine.
FILE_INPUTS = {"unet_name", "clip_name", "vae_name", "lora_name", "image", "ckpt_name",
               "trellis2", "shape_vae", "dinov3", "know3d_checkpoint"}


def _builder():
    spec = importlib.util.spec_from_file_location("know3d_workflow_build", os.path.join(WF, "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


build = _builder()
DECL = build.declarations()
UI_FILES = sorted(glob.glob(os.path.join(WF, "*.json")))
API_FILES = sorted(glob.glob(os.path.join(WF, "api", "*.json")))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in UI_FILES]


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def accepts(input_spec, typ):
    declared, _ = build.input_kind(input_spec)
    allowed = declared.split(",")
    return "*" in allowed or typ in allowed


def test_listing_is_versioned_and_workflows_are_where_comfyui_looks():
    listing = load(LISTING)
    assert listing["comfyui_version"] == "0.33.0" and listing["nodes"]
    assert os.path.basename(WF) in TEMPLATE_FOLDERS
    assert set(NAMES) == {"know3d_full", "know3d_multiview_public", "trellis2_baseline", "know3d_compare_backs"}
    assert [os.path.basename(p) for p in API_FILES] == [os.path.basename(p) for p in UI_FILES]


def test_files_are_what_the_builder_writes():
    built = build.build_all()
    for name in NAMES:
        ui, api = built[name]
        assert load(os.path.join(WF, f"{name}.json")) == json.loads(build.dump(ui)), name
        assert load(os.path.join(WF, "api", f"{name}.json")) == json.loads(build.dump(api)), name


@pytest.mark.parametrize("name", NAMES)
def test_api_graph_types_links_and_values(name):
    prompt = load(os.path.join(WF, "api", f"{name}.json"))
    ours = set(load_pack().NODE_CLASS_MAPPINGS)
    has_output = False
    for nid, node in prompt.items():
        typ = node["class_type"]
        assert typ in DECL, f"{name}: node {nid} has unknown type {typ}"
        assert typ in ours or typ in load(LISTING)["nodes"], typ
        decl = DECL[typ]
        specs = {n: (s, req) for n, s, req in build.ordered_inputs(decl)}
        assert set(node["inputs"]) <= set(specs), (typ, set(node["inputs"]) - set(specs))
        for inp, (spec, required) in specs.items():
            if required:
                assert inp in node["inputs"], f"{name}: {typ} lacks required input {inp}"
        for inp, value in node["inputs"].items():
            spec, _ = specs[inp]
            if isinstance(value, list):
                src = prompt[value[0]]
                out_type = DECL[src["class_type"]]["output"][value[1]]
                assert accepts(spec, out_type), f"{name}: {src['class_type']} -> {typ}.{inp}: {out_type}"
            else:
                check_widget(name, typ, inp, spec, value)
        if typ in ("Know3DSaveMesh", "PreviewImage", "Preview3D", "SaveGLB"):
            has_output = True
    assert has_output


def check_widget(name, typ, inp, spec, value):
    kind, opts = build.input_kind(spec)
    where = f"{name}: {typ}.{inp} = {value!r}"
    if kind == "COMBO":
        options = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
        if inp in FILE_INPUTS:
            assert isinstance(value, str) and value, where
        else:
            assert value in options, where
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert opts.get("min", value) <= value <= opts.get("max", value), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert opts.get("min", value) <= value <= opts.get("max", value), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind == "STRING" or "widgetType" in opts:
        assert isinstance(value, str), where
    else:
        pytest.fail(f"{where}: a {kind} socket needs a link")


@pytest.mark.parametrize("name", NAMES)
def test_ui_graph_links_are_type_correct_and_match_the_api_twin(name):
    ui = load(os.path.join(WF, f"{name}.json"))
    api = load(os.path.join(WF, "api", f"{name}.json"))
    assert ui["version"] == 0.4 and ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    nodes = {n["id"]: n for n in ui["nodes"]}
    for n in ui["nodes"]:
        assert n["type"] in DECL or n["type"] in FRONTEND_ONLY, n["type"]
    link_ids = set()
    for lid, src, slot, dst, dslot, typ in ui["links"]:
        link_ids.add(lid)
        s, d = nodes[src], nodes[dst]
        assert s["outputs"][slot]["type"] == typ == DECL[s["type"]]["output"][slot]
        assert lid in s["outputs"][slot]["links"]
        target = d["inputs"][dslot]
        assert target["link"] == lid
        spec = dict((nm, sp) for nm, sp, _ in build.ordered_inputs(DECL[d["type"]]))[target["name"]]
        assert accepts(spec, typ), f"{name}: {s['type']} -> {d['type']}.{target['name']}: {typ}"
        # The API twin has the same link.
        assert api[str(dst)]["inputs"][target["name"]] == [str(src), slot]
    for n in ui["nodes"]:
        for out in n["outputs"]:
            assert set(out["links"]) <= link_ids
        if n["type"] in FRONTEND_ONLY:
            assert str(n["id"]) not in api
            continue
        assert api[str(n["id"])]["class_type"] == n["type"]
        widgets = [nm for nm, sp, _ in build.ordered_inputs(DECL[n["type"]]) if build.is_widget(sp)]
        extra = sum(1 for nm, sp, _ in build.ordered_inputs(DECL[n["type"]])
                    if build.is_widget(sp) and (build.input_kind(sp)[1].get("control_after_generate")
                                               or build.input_kind(sp)[1].get("image_upload")))
        assert len(n["widgets_values"]) == len(widgets) + extra, n["type"]
    assert len(api) == sum(1 for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY)


def test_core_3d_nodes_accept_our_outputs():
    core = load(LISTING)["nodes"]
    ours = load_pack().NODE_CLASS_MAPPINGS
    geometry = ours["Know3DGeometry"].RETURN_TYPES
    assert accepts(core["SaveGLB"]["input"]["required"]["mesh"], geometry[0])  # MESH -> Save 3D Model
    assert accepts(core["Preview3D"]["input"]["required"]["model_file"], ours["Know3DSaveMesh"].RETURN_TYPES[0])
    assert accepts(core["MeshToFile3D"]["input"]["required"]["mesh"], geometry[0])
    assert accepts(core["Trellis2TextureStage"]["input"]["required"]["shape_latent"], geometry[1])
    assert accepts(core["VaeDecodeShapeTrellis"]["input"]["required"]["samples"], geometry[1])
    structure = ours["Know3DSparseStructure"].RETURN_TYPES
    assert accepts(core["VoxelToMesh"]["input"]["required"]["voxel"], structure[1])
    assert accepts(core["Trellis2ShapeStage"]["input"]["required"]["voxel"], structure[1])
    assert accepts(ours["Know3DRenderNormals"].INPUT_TYPES()["required"]["mesh"], core["VoxelToMesh"]["output"][0])


def test_every_node_has_tooltips_and_description():
    for node_id, cls in load_pack().NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("Know3D")
        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40, node_id
        for section, inputs in cls.INPUT_TYPES().items():
            if section == "hidden":
                continue
            for inp, spec in inputs.items():
                assert len(spec) == 2 and spec[1].get("tooltip"), f"{node_id}.{inp} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), node_id
