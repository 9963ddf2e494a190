"""The example workflows: only existing node types, type-correct links, valid widget values in each
node's input_order, UI and API twins that agree, no overlapping nodes, a group per stage, a thumbnail
per template, files equal to what tools/build_workflows.py produces. Core nodes are checked against
the recorded /object_info listing in tests/data/comfyui (ComfyUI 0.33.0); the real frontend checks the
same files in tests/test_comfyui_browser.py."""
import glob
import json
import os

import pytest

from _nodes_helpers import ROOT, load_pack, load_workflow_builder

WF = os.path.join(ROOT, "example_workflows")
API = os.path.join(ROOT, "example_workflows_api")
BEFORE_V3 = os.path.join(ROOT, "tests", "data", "workflows_before_v3")
LISTING = os.path.join(ROOT, "tests", "data", "comfyui", "object_info_0.33.0.json")
FRONTEND_ONLY = {"MarkdownNote", "Note"}
# Folder names ComfyUI's template browser scans (app/custom_node_manager.py, 0.33.0).
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")
# Combos that list files of a model / input folder: their options depend on the machine.
FILE_INPUTS = {"unet_name", "clip_name", "vae_name", "lora_name", "image", "ckpt_name",
               "trellis2", "shape_vae", "dinov3", "know3d_checkpoint"}


build = load_workflow_builder()
DECL = build.declarations()
UI_FILES = sorted(glob.glob(os.path.join(WF, "*.json")))
API_FILES = sorted(glob.glob(os.path.join(API, "*.json")))
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
    assert os.path.basename(WF) == TEMPLATE_FOLDERS[0]  # the folder ComfyUI prefers
    assert set(NAMES) == set(build.BUILDERS) == {"know3d_full", "know3d_multiview_public", "trellis2_baseline",
                                                 "know3d_compare_backs", "know3d_textured", "know3d_core_textured"}
    assert [os.path.basename(p) for p in API_FILES] == [os.path.basename(p) for p in UI_FILES]


def test_only_workflows_and_their_thumbnails_are_served_as_templates():
    """ComfyUI lists every *.json of these folders as a template and serves the whole folder."""
    for folder in TEMPLATE_FOLDERS[1:]:
        assert not os.path.exists(os.path.join(ROOT, folder)), folder
    files = sorted(os.listdir(WF))
    assert files == sorted([f"{n}.json" for n in NAMES] + [f"{n}.jpg" for n in NAMES])


@pytest.mark.parametrize("name", NAMES)
def test_each_template_has_a_thumbnail(name):
    from PIL import Image

    with Image.open(os.path.join(WF, f"{name}.jpg")) as im:
        assert im.format == "JPEG" and im.size == build.THUMBNAIL_SIZE


def test_files_are_what_the_builder_writes():
    built = build.build_all()
    for name in NAMES:
        ui, api = built[name]
        assert load(os.path.join(WF, f"{name}.json")) == json.loads(build.dump(ui)), name
        assert load(os.path.join(API, f"{name}.json")) == json.loads(build.dump(api)), name


@pytest.mark.parametrize("name", NAMES)
def test_api_graph_types_links_and_values(name):
    prompt = load(os.path.join(API, f"{name}.json"))
    ours = set(load_pack().NODE_CLASS_MAPPINGS)
    has_output = False
    for nid, node in prompt.items():
        typ = node["class_type"]
        assert typ in DECL, f"{name}: node {nid} has unknown type {typ}"
        assert typ in ours or typ in load(LISTING)["nodes"], typ
        decl = DECL[typ]
        specs = {n: (s, req) for n, s, req in build.ordered_inputs(decl)}
        frontend = build.FRONTEND_WIDGETS.get(typ, {})
        assert {k: node["inputs"][k] for k in frontend} == frontend
        assert set(node["inputs"]) - set(frontend) <= set(specs), (typ, set(node["inputs"]) - set(specs))
        for inp, (spec, required) in specs.items():
            if required:
                assert inp in node["inputs"], f"{name}: {typ} lacks required input {inp}"
        for inp, value in node["inputs"].items():
            if inp in frontend:
                continue
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


def widget_ok(inp, spec, value) -> bool:
    kind, opts = build.input_kind(spec)
    if kind == "COMBO":
        options = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
        return isinstance(value, str) and bool(value) if inp in FILE_INPUTS else value in options
    if kind == "INT":
        return (isinstance(value, int) and not isinstance(value, bool)
                and opts.get("min", value) <= value <= opts.get("max", value))
    if kind == "FLOAT":
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and opts.get("min", value) <= value <= opts.get("max", value))
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    if kind == "STRING" or "widgetType" in opts:
        return isinstance(value, str)
    return False  # a socket type: needs a link


def check_widget(name, typ, inp, spec, value):
    assert widget_ok(inp, spec, value), f"{name}: {typ}.{inp} = {value!r}"


def ui_widget_problems(ui, older_file: bool = False) -> list[str]:
    """``type.widget = value`` for each UI node value that does not fit the widget the frontend puts
    at its position (widgets in the node's input_order, the frontend's order). ``older_file``: a file
    saved before optional widgets were added at the end (Load Know3D Model's texture) may lack them;
    the frontend keeps their defaults."""
    problems = []
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        decl = DECL[n["type"]]
        specs = {nm: sp for nm, sp, _ in build.ordered_inputs(decl)}
        required = {nm for nm, _, req in build.ordered_inputs(decl) if req}
        names = build.widget_names(decl)
        missing = names[len(n["widgets_values"]):]
        if older_file and missing and not (set(missing) & required):
            names = names[: len(n["widgets_values"])]
        if len(names) != len(n["widgets_values"]):
            problems.append(f"{n['type']}: {len(n['widgets_values'])} values for {len(names)} widgets")
            continue
        for name, value in zip(names, n["widgets_values"]):
            if ":" not in name and not widget_ok(name, specs[name], value):
                problems.append(f"{n['type']}.{name} = {value!r}")
    return problems


@pytest.mark.parametrize("name", NAMES)
def test_ui_widget_values_fit_the_widgets_in_input_order(name):
    assert ui_widget_problems(load(os.path.join(WF, f"{name}.json"))) == []


def test_the_widget_order_check_catches_the_alphabetical_order_of_the_old_compare_backs():
    """The compare_backs saved before the fix ordered ImageStitch's values alphabetically (issue 17)."""
    old = ui_widget_problems(load(os.path.join(BEFORE_V3, "know3d_compare_backs.json")), older_file=True)
    assert old == ["ImageStitch.spacing_width = 'white'", "ImageStitch.spacing_color = 0"] * 2
    for other in ("know3d_full", "know3d_multiview_public", "trellis2_baseline"):
        assert ui_widget_problems(load(os.path.join(BEFORE_V3, f"{other}.json")), older_file=True) == [], other


def _overlapping(rects):
    return [(a, b) for i, (a, ra) in enumerate(rects) for b, rb in rects[i + 1:]
            if ra[0] < rb[0] + rb[2] and rb[0] < ra[0] + ra[2] and ra[1] < rb[1] + rb[3] and rb[1] < ra[1] + ra[3]]


@pytest.mark.parametrize("name", NAMES)
def test_nodes_do_not_overlap_and_sit_in_one_group_per_stage(name):
    ui = load(os.path.join(WF, f"{name}.json"))
    nodes = [(f"{n['id']}:{n['type']}", [n["pos"][0], n["pos"][1] - build.TITLE_H, n["size"][0],
                                         n["size"][1] + build.TITLE_H]) for n in ui["nodes"]]
    groups = [(g["title"], g["bounding"]) for g in ui["groups"]]
    assert _overlapping(nodes) == [] and _overlapping(groups) == []
    for label, r in nodes:
        inside = [t for t, g in groups if g[0] <= r[0] and r[0] + r[2] <= g[0] + g[2]
                  and g[1] + build.GROUP_TITLE_H <= r[1] and r[1] + r[3] <= g[1] + g[3]]
        assert len(inside) == (0 if label.endswith("MarkdownNote") else 1), (label, inside)
    for n in ui["nodes"]:  # sizes the frontend keeps: at least its minimum for the type and as wide as the title
        if n["type"] not in FRONTEND_ONLY:
            w, h = build.FRONTEND_SIZES[n["type"]]
            assert n["size"][1] == h and n["size"][0] >= w, n["type"]
            assert all(s >= m for s, m in zip(n["size"], build.FRONTEND_MIN[n["type"]])), n["type"]
            assert n["size"][0] >= build.TITLE_PAD_W + build.TITLE_CHAR_W * len(n.get("title") or ""), n["type"]
    stages = {t.split(" - ")[0] for t, _ in groups}
    expected = {build.STAGES["geometry"][0], build.STAGES["outputs"][0], "TRELLIS.2 + front image"}
    if name != "trellis2_baseline":
        expected |= {build.STAGES["back_view"][0], build.STAGES["knowledge"][0]}
    assert all(any(e in s for s in stages) for e in expected), stages  # compare_backs: "Knowledge + 3D ..."


@pytest.mark.parametrize("name", NAMES)
def test_fit_to_view_zoom_is_readable(name):
    """The zoom the frontend's fit to view gives the nodes' extent (its rule, the 2560 x 1440 window's canvas;
    the browser test measures the real one) shows node text: every template opens readable on a 16:9 screen."""
    ui = load(os.path.join(WF, f"{name}.json"))
    placed = {n["id"]: (n["pos"], n["size"]) for n in ui["nodes"]}
    x0, y0, x1, y1 = build.graph_extent(ui["groups"], placed)
    assert build.fit_scale(x1 - x0, y1 - y0) >= build.READABLE_ZOOM + 0.02, (name, x1 - x0, y1 - y0)


def test_fit_scale_is_the_frontends_rule():
    """fitToBounds: 75 % of the 2560 x 1440 canvas, the smaller of the two ratios, bounds 10 px larger a side,
    extents below 300 counted as 300."""
    assert build.fit_scale(2540, 100) == 0.75 and build.fit_scale(10, 10) == round(0.75 * 1440 / 300, 3)
    assert build.fit_scale(3180, 1000) == 0.6 and build.fit_scale(1000, 1780) == 0.6


@pytest.mark.parametrize("name", NAMES)
def test_ui_graph_links_are_type_correct_and_match_the_api_twin(name):
    ui = load(os.path.join(WF, f"{name}.json"))
    api = load(os.path.join(API, f"{name}.json"))
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
    for node, name in (("DecimateMesh", "mesh"), ("UnwrapMesh", "mesh"), ("PaintMesh", "mesh"),
                       ("BakeTextureFromVoxel", "mesh")):  # know3d_core_textured: core's bake nodes on our mesh
        assert accepts(core[node]["input"]["required"][name], geometry[0]), node
    assert accepts(core["BakeTextureFromVoxel"]["input"]["optional"]["reference_mesh"], geometry[0])
    assert accepts(ours["Know3DSaveMesh"].INPUT_TYPES()["required"]["mesh"], core["ApplyTextureToMesh"]["output"][0])
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
