"""Builds the example workflows from one description each: the UI format ComfyUI's template
browser and Load expect (``example_workflows/*.json``, the folder ComfyUI prefers; only workflows and
their thumbnails live there, since ComfyUI serves the whole folder) and the API-format twin that
``POST /prompt`` takes (``example_workflows_api/*.json``).

Node declarations come from the pack itself (our nodes' V3 schemas) and from the recorded core listing
``tests/data/comfyui/object_info_0.33.0.json``, so widget order (each node's ``input_order``), socket
types and defaults are the host's. Node sizes are ones the real frontend keeps (:data:`FRONTEND_SIZES`,
at least its measured minimum :data:`FRONTEND_MIN` and the title's width); nodes sit in one group per
stage (``(stage, lane)``), and each graph places its groups with rows and columns (:func:`row`,
:func:`col`), so no two overlap, at the column height that gives the largest fit-to-view zoom in the
frontend's rule (:func:`fit_scale`; every template must reach :data:`READABLE_ZOOM`). The browser test,
tests/test_comfyui_browser.py, checks sizes, overlaps and the zoom in the real frontend.

``python tools/build_workflows.py`` rewrites the files; tests/test_workflows.py checks that the
committed files are what this script produces. ``python tools/build_workflows.py --thumbnails DIR``
turns the browser test's screenshots (``DIR/<name>.png``) into the template thumbnails
(``example_workflows/<name>.jpg``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
UI_DIR = os.path.join(ROOT, "example_workflows")
API_DIR = os.path.join(ROOT, "example_workflows_api")
OBJECT_INFO = os.path.join(ROOT, "tests", "data", "comfyui", "object_info_0.33.0.json")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"MarkdownNote", "Note"}
# Widgets the frontend adds to a core node (not in its schema) and sends in the prompt it builds.
FRONTEND_WIDGETS = {"Preview3D": {"image": ""}}
MIN_COMFYUI = "0.33.0"
THUMBNAIL_SIZE = (800, 500)
SIDEBAR_W, TOPBAR_H = 60, 40  # the frontend's bars around the canvas in a screenshot (2560 x 1440)

QWEN_MODELS = {
    "unet": {"name": "qwen_image_edit_2511_bf16.safetensors", "directory": "diffusion_models",
             "url": "https://huggingface.co/Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files/diffusion_models/qwen_image_edit_2511_bf16.safetensors"},
    "clip": {"name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "directory": "text_encoders",
             "url": "https://huggingface.co/Comfy-Org/HunyuanVideo_1.5_repackaged/resolve/main/split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"},
    "vae": {"name": "qwen_image_vae.safetensors", "directory": "vae",
            "url": "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/qwen_image_vae.safetensors"},
}
TRELLIS_FOLDER = "TRELLIS.2-4B/"
KNOW3D_CKPT = "know3d.safetensors"
KNOW3D_LORA = "know3d_backview_lora.safetensors"
FRONT_IMAGE = "know3d_example_front.png"


# ------------------------------------------------------------------------------ declarations
def load_pack():
    name = "know3d_pack_workflow_builder"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def core_listing() -> dict:
    with open(OBJECT_INFO, encoding="utf-8") as f:
        return json.load(f)["nodes"]


def our_declaration(cls) -> dict:
    """Our node's /object_info entry (the same on the real server: tests/test_comfyui_server.py)."""
    return cls.GET_NODE_INFO_V1()


def declarations() -> dict:
    decl = dict(core_listing())
    for node_id, cls in load_pack().NODE_CLASS_MAPPINGS.items():
        decl[node_id] = our_declaration(cls)
    return decl


DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # a combo whose options may add inputs (none for the ones used here)


def input_kind(spec) -> tuple[str, dict]:
    """(socket or widget type, options) of one input declaration (a dynamic combo: a combo of its keys)."""
    typ = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(typ, list):
        return "COMBO", opts
    if typ == DYNAMIC_COMBO:
        return "COMBO", {**opts, "options": [o["key"] for o in opts["options"]]}
    return typ, opts


def is_widget(spec) -> bool:
    typ, opts = input_kind(spec)
    return typ in WIDGET_TYPES or "widgetType" in opts


def default_value(spec):
    typ, opts = input_kind(spec)
    if "default" in opts:
        return opts["default"]
    if isinstance(spec[0], list):
        return spec[0][0] if spec[0] else ""
    if typ == "COMBO":
        return (opts.get("options") or [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(typ, "")


def ordered_inputs(decl: dict) -> list[tuple[str, list, bool]]:
    """[(name, spec, required)] in the node's ``input_order`` (required first), the order the
    frontend creates sockets and widgets in, so the order of a UI node's ``widgets_values``."""
    out = []
    for section in ("required", "optional"):
        specs = decl["input"].get(section, {})
        for name in decl.get("input_order", {}).get(section, list(specs)):
            out.append((name, specs[name], section == "required"))
    return out


def widget_names(decl: dict) -> list[str]:
    """Names of a UI node's ``widgets_values`` entries in order (a seed's control_after_generate and an
    image upload add one entry after their widget)."""
    names = []
    for name, spec, _ in ordered_inputs(decl):
        if is_widget(spec):
            names.append(name)
            opts = input_kind(spec)[1]
            if opts.get("control_after_generate"):
                names.append(f"{name}:control_after_generate")
            if opts.get("image_upload"):
                names.append(f"{name}:upload")
    return names


# ------------------------------------------------------------------------------ sizes and layout
# The smallest body [w, h] (the 30 px title bar above it not included) the frontend
# (comfyui-frontend-package 1.49.6, ComfyUI 0.33.0) allows each node type: LiteGraph.createNode(type)
# .computeSize() measured in headless Chromium. A workflow's saved size at least this large is kept.
FRONTEND_MIN = {
    "ApplyTextureToMesh": (189, 126), "BakeTextureFromVoxel": (210, 98), "CFGNorm": (210, 82),
    "CLIPLoader": (210, 106), "CLIPVisionLoader": (210, 58), "DecimateMesh": (210, 82),
    "FluxKontextImageScale": (195, 26), "FluxKontextMultiReferenceLatentMethod": (252, 58), "ImageStitch": (210, 150),
    "InvertMask": (140, 26), "KSampler": (210, 262), "Know3DBackViewAsSecondView": (219, 78),
    "Know3DBackViewPrompt": (210, 166), "Know3DBackViewSample": (210, 262), "Know3DExtractHiddenStates": (236, 122),
    "Know3DGeometry": (236, 334), "Know3DImageCondition": (199, 86), "Know3DLoadModel": (218, 178),
    "Know3DLoadQwenEditLoRA": (210, 82), "Know3DRenderNormals": (210, 106), "Know3DSaveMesh": (210, 154),
    "Know3DSparseStructure": (236, 266), "Know3DTexture": (236, 358), "LoadImage": (223, 102),
    "ModelSamplingAuraFlow": (210, 58), "PaintMesh": (147, 46), "Preview3D": (210, 132), "PreviewImage": (140, 26),
    "TextEncodeQwenImageEditPlus": (250, 168), "Trellis2Conditioning": (193, 46), "Trellis2TextureStage": (176, 66),
    "UNETLoader": (210, 82), "UnwrapMesh": (210, 130), "VAEDecode": (140, 46), "VAEEncode": (140, 46),
    "VAELoader": (210, 58), "VaeDecodeShapeTrellis": (197, 46), "VaeDecodeTextureTrellis": (217, 66),
}
# The body sizes the workflows save: 250 wide where the minimum is narrower (values and titles stay
# legible at fit-to-view zoom, beside the title's badge; the frontend's own default is 270-400), small
# helpers a little wider than their minimum, the minimum height, and room for what a node shows: Load
# Image's image (it grows to ~314 px high once its image loads), Preview Image's result, Preview 3D's
# viewport, Back-View Prompt's two text boxes.
W = 250
FRONTEND_SIZES = {
    **{t: (max(W, w), h) for t, (w, h) in FRONTEND_MIN.items()},
    "FluxKontextImageScale": (195, 26), "FluxKontextMultiReferenceLatentMethod": (260, 58), "InvertMask": (160, 26),
    "Know3DBackViewPrompt": (260, 200), "Know3DImageCondition": (200, 86), "LoadImage": (250, 330),
    "PaintMesh": (160, 46), "Preview3D": (360, 420), "PreviewImage": (260, 260), "TextEncodeQwenImageEditPlus": (260, 170),
    "VAEDecode": (160, 46), "VAEEncode": (160, 46),
}
TITLE_H = 30          # LiteGraph.NODE_TITLE_HEIGHT: the title bar sits above a node's pos
GAP = 40              # between nodes of a group (after the title bar)
# A group's columns are filled up to a height before a new one starts: the group's own (Graph.group), else
# the one of these that gives the graph the largest fit-to-view zoom (the larger height on a tie).
COLUMN_HEIGHTS = tuple(range(440, 801, 20))
GROUP_PAD = 30        # group edge to its nodes
GROUP_TITLE_H = 50    # group title bar above its nodes (LiteGraph's 24 px group title)
GROUP_GAP = 60        # between groups
NOTE_WIDTH = 460
NOTE_CHARS_PER_LINE = 52   # at NOTE_WIDTH in the frontend's markdown font
NOTE_LINE_H = 22
NOTE = ("note", 0)    # the read-me note's place in an arrangement (it stands alone, no group)

# Fit to view (the frontend's Comfy.Canvas.FitView: fitViewToSelectionAnimated -> ds.animateToBounds over
# the bounds of every node, title bar included, and group, 10 px added a side (createBounds), filling 75 %
# of the canvas element, which spans the whole 2560 x 1440 window under the side and top bars; checked in
# tests/test_comfyui_browser.py).
# Node text is drawn from ~0.57 zoom on (the frontend's low-quality threshold): READABLE_ZOOM is what
# every template must reach.
FIT_FILL = 0.75
FIT_PAD = 20
CANVAS = (2560, 1440)
READABLE_ZOOM = 0.6
# A node is at least as wide as its title (LiteGraph computeSize: the title's text + ~52 px; 7 px a
# character: the frontend's sans font measured 6.1-6.8 px for the titles here).
TITLE_CHAR_W, TITLE_PAD_W = 7.0, 52


# (stage title, colour); an arrangement (``row`` / ``col``) places the groups.
STAGES = {
    "inputs": ("Models + front image", "#3f789e"),
    "back_view": ("Back view (Qwen-Image-Edit-2511)", "#a1309b"),
    "knowledge": ("Knowledge", "#b58b2a"),
    "geometry": ("3D (TRELLIS.2)", "#8A8"),
    "texture": ("Texture (core TRELLIS.2 nodes)", "#b06634"),
    "bake": ("UV unwrap + bake (core mesh nodes)", "#b06634"),
    "outputs": ("Outputs", "#88A"),
    "comparison": ("Comparison", "#3f789e"),
    "note": ("Read me", ""),
}


def node_size(n: "Node") -> list[int]:
    if n.type in FRONTEND_ONLY:
        return [n.graph.note_width, note_height(n.note or "", n.graph.note_width)]
    w, h = FRONTEND_SIZES[n.type]
    if n.title:  # a custom title may be wider than the type's (its display name is in FRONTEND_MIN)
        w = max(w, math.ceil(TITLE_PAD_W + TITLE_CHAR_W * len(n.title)))
    return [int(w), int(h)]


def note_height(text: str, width: int = NOTE_WIDTH) -> int:
    """Body height that shows the whole markdown note at ``width`` (wrapped lines + headings)."""
    per_line = NOTE_CHARS_PER_LINE * width // NOTE_WIDTH
    lines = 0.0
    for line in text.split("\n"):
        if line.startswith("#"):
            lines += 2.0 * max(1, -(-len(line) // per_line))
        else:
            lines += max(1, -(-len(line) // per_line))
    return int(lines * NOTE_LINE_H + 60)


def fit_scale(width: float, height: float, canvas=CANVAS) -> float:
    """The zoom the frontend's fit to view gives a graph whose nodes (title bars included) and groups
    span ``width`` x ``height``."""
    w, h = width + FIT_PAD, height + FIT_PAD
    return round(min(FIT_FILL * canvas[0] / max(w, 300), FIT_FILL * canvas[1] / max(h, 300)), 3)


@dataclass(frozen=True)
class Stack:
    """Groups (``(stage, lane)`` keys), the note (:data:`NOTE`) or nested stacks, side by side
    (``across``, tops aligned, groups as high as the row) or one below another (groups as wide as the column)."""
    across: bool
    items: tuple


def row(*items) -> Stack:
    return Stack(True, items)


def col(*items) -> Stack:
    return Stack(False, items)


# ------------------------------------------------------------------------------ graph description
@dataclass
class Node:
    graph: "Graph"
    id: int
    type: str
    values: dict
    title: str | None = None
    note: str | None = None  # MarkdownNote text
    stage: str = "inputs"
    lane: int = 0

    def __getitem__(self, slot: int) -> "Out":
        return Out(self, slot)


@dataclass(frozen=True)
class Out:
    node: Node
    slot: int


@dataclass
class Graph:
    name: str
    decl: dict
    nodes: list = field(default_factory=list)
    lane_titles: dict = field(default_factory=dict)  # (stage, lane) -> group title
    column_h: dict = field(default_factory=dict)     # (stage, lane) -> its columns' height (else COLUMN_HEIGHTS)
    arrangement: Stack | None = None
    note_width: int = NOTE_WIDTH
    group_gap: int = GROUP_GAP
    _where: tuple = ("inputs", 0)

    @contextlib.contextmanager
    def group(self, stage: str, lane: int = 0, title: str | None = None, column_h: int | None = None):
        """Nodes added in the block go into the group of ``stage`` (a key of STAGES) in ``lane``."""
        if stage not in STAGES:
            raise KeyError(f"{self.name}: unknown stage {stage}")
        if title:
            self.lane_titles[(stage, lane)] = title
        if column_h:
            self.column_h[(stage, lane)] = column_h
        before, self._where = self._where, (stage, lane)
        try:
            yield
        finally:
            self._where = before

    def add(self, type_: str, title: str | None = None, **values) -> Node:
        if type_ not in self.decl and type_ not in FRONTEND_ONLY:
            raise KeyError(f"{self.name}: unknown node type {type_}")
        node = Node(self, len(self.nodes) + 1, type_, values, title, stage=self._where[0], lane=self._where[1])
        self.nodes.append(node)
        return node

    def note(self, text: str, width: int = NOTE_WIDTH) -> Node:
        """The read-me note (placed as :data:`NOTE` in the arrangement; no group around it)."""
        self.note_width = width
        node = Node(self, len(self.nodes) + 1, "MarkdownNote", {}, "Read me", note=text, stage=NOTE[0], lane=NOTE[1])
        self.nodes.append(node)
        return node

    def arrange(self, arrangement: Stack) -> None:
        self.arrangement = arrangement

    # -- layout: one group per (stage, lane), placed by the arrangement. Inside a group, nodes go in
    # order of depth (longest path from a source) into columns up to the group's column height.
    def _depths(self) -> dict:
        depth = {}

        def d(n: Node) -> int:
            if n.id not in depth:
                ups = [v.node for v in n.values.values() if isinstance(v, Out)]
                depth[n.id] = 1 + max((d(u) for u in ups), default=-1)
            return depth[n.id]

        for n in self.nodes:
            d(n)
        return depth

    def _columns(self, nodes: list, depth: dict, column_h: int) -> tuple[dict, tuple[int, int]]:
        """Offsets of a group's nodes from its content corner and the content size: nodes by depth,
        each into the first column that still has room below its last node (a new column else)."""
        columns: list[list] = []  # [[node, ...], ...]
        height = lambda col: sum(TITLE_H + node_size(n)[1] for n in col) + GAP * (len(col) - 1)
        for n in sorted(nodes, key=lambda n: (depth[n.id], n.id)):
            need = TITLE_H + node_size(n)[1]
            for col in columns:
                if max(depth[m.id] for m in col) <= depth[n.id] and height(col) + GAP + need <= column_h:
                    col.append(n)
                    break
            else:
                columns.append([n])
        offsets, x = {}, 0
        for col in columns:
            y = 0
            for n in col:
                offsets[n.id] = (x, y + TITLE_H)
                y += TITLE_H + node_size(n)[1] + GAP
            x += max(node_size(n)[0] for n in col) + GAP
        return offsets, (x - GAP, max(height(col) for col in columns))

    def layout(self) -> tuple[dict, list]:
        """({node id: (pos, size)}, groups as the frontend stores them): the arrangement at the column
        height of :data:`COLUMN_HEIGHTS` that fits the screen best (:meth:`fit_zoom`)."""
        def zoom(laid):
            x0, y0, x1, y1 = graph_extent(laid[1], laid[0])
            return fit_scale(x1 - x0, y1 - y0)

        return max((self._layout(h) for h in COLUMN_HEIGHTS), key=lambda laid: (zoom(laid), laid[2]))[:2]

    def _layout(self, column_h: int) -> tuple[dict, list, int]:
        depth = self._depths()
        members: dict = {}
        for n in self.nodes:
            members.setdefault((n.stage, n.lane), []).append(n)
        inner = {key: self._columns(nodes, depth, self.column_h.get(key, column_h)) for key, nodes in members.items()}
        placed_keys = []

        def box(item) -> tuple[int, int]:
            if isinstance(item, Stack):
                sizes = [box(i) for i in item.items]
                gaps = self.group_gap * (len(sizes) - 1)
                if item.across:
                    return sum(w for w, _ in sizes) + gaps, max(h for _, h in sizes)
                return max(w for w, _ in sizes), sum(h for _, h in sizes) + gaps
            w, h = inner[item][1]
            return (w, h) if item == NOTE else (w + 2 * GROUP_PAD, h + GROUP_TITLE_H + GROUP_PAD)

        corners: dict = {}  # key -> [x, y, w, h] of its group (the note: of its node)

        def place(item, x: int, y: int, w: int, h: int) -> None:
            if not isinstance(item, Stack):
                corners[item] = [x, y, w, h]
                placed_keys.append(item)
                return
            for child in item.items:
                cw, ch = box(child)
                if item.across:
                    place(child, x, y, cw, h if not isinstance(child, Stack) else ch)
                    x += cw + self.group_gap
                else:
                    place(child, x, y, w if not isinstance(child, Stack) else cw, ch)
                    y += ch + self.group_gap

        if self.arrangement is None:
            raise ValueError(f"{self.name}: no arrangement (Graph.arrange)")
        place(self.arrangement, 0, 0, *box(self.arrangement))
        if sorted(placed_keys) != sorted(inner):
            raise ValueError(f"{self.name}: the arrangement places {sorted(placed_keys)}, the graph has {sorted(inner)}")
        placed, groups = {}, []
        for key in sorted(corners, key=lambda k: (corners[k][1], corners[k][0])):
            gx, gy, w, h = corners[key]
            dx0, dy0 = (0, 0) if key == NOTE else (GROUP_PAD, GROUP_TITLE_H)
            for nid, (dx, dy) in inner[key][0].items():
                placed[nid] = ([gx + dx0 + dx, gy + dy0 + dy], node_size(self.nodes[nid - 1]))
            if key == NOTE:
                continue
            title, color = STAGES[key[0]]
            groups.append({"id": len(groups) + 1, "title": self.lane_titles.get(key, title), "bounding": [gx, gy, w, h],
                           "color": color, "flags": {}})
        return placed, groups, column_h

    def fit_zoom(self) -> float:
        """The fit-to-view zoom the frontend gives this graph (:func:`fit_scale` of its extent)."""
        placed, groups = self.layout()
        x0, y0, x1, y1 = graph_extent(groups, placed)
        return fit_scale(x1 - x0, y1 - y0)

    def to_api(self) -> dict:
        prompt = {}
        for n in self.nodes:
            if n.type in FRONTEND_ONLY:
                continue
            decl = self.decl[n.type]
            inputs = {}
            for name, spec, required in ordered_inputs(decl):
                if name in n.values:
                    v = n.values[name]
                    inputs[name] = [str(v.node.id), v.slot] if isinstance(v, Out) else v
                elif is_widget(spec):  # the frontend sends every widget, optional ones too
                    inputs[name] = default_value(spec)
            unknown = set(n.values) - {name for name, _, _ in ordered_inputs(decl)}
            if unknown:
                raise KeyError(f"{self.name}: {n.type} has no inputs {sorted(unknown)}")
            inputs.update(FRONTEND_WIDGETS.get(n.type, {}))
            prompt[str(n.id)] = {"class_type": n.type, "inputs": inputs,
                                 "_meta": {"title": n.title or display_name(n.type, decl)}}
        return prompt

    def to_ui(self) -> dict:
        placed, groups = self.layout()
        depth = self._depths()
        links, link_id = [], 0
        incoming = {}
        for n in self.nodes:
            if n.type in FRONTEND_ONLY:
                continue
            for name, v in n.values.items():
                if isinstance(v, Out):
                    link_id += 1
                    typ = self.decl[v.node.type]["output"][v.slot]
                    target_slot = [nm for nm, _, _ in ordered_inputs(self.decl[n.type])].index(name)
                    links.append([link_id, v.node.id, v.slot, n.id, target_slot, typ])
                    incoming[(n.id, name)] = link_id
        outgoing = {}
        for lid, src, slot, *_ in links:
            outgoing.setdefault((src, slot), []).append(lid)
        order = {n.id: i for i, n in enumerate(sorted(self.nodes, key=lambda n: (depth[n.id], n.id)))}
        ui_nodes = []
        for n in self.nodes:
            pos, size = placed[n.id]
            if n.type in FRONTEND_ONLY:
                ui_nodes.append({"id": n.id, "type": n.type, "pos": pos, "size": size, "flags": {},
                                 "order": order[n.id], "mode": 0, "inputs": [], "outputs": [],
                                 "title": n.title, "properties": {}, "widgets_values": [n.note]})
                continue
            decl = self.decl[n.type]
            inputs, widgets = [], []
            for name, spec, _ in ordered_inputs(decl):
                typ, opts = input_kind(spec)
                entry = {"name": name, "type": typ, "link": incoming.get((n.id, name))}
                if is_widget(spec):
                    entry["widget"] = {"name": name}
                    v = n.values.get(name, default_value(spec))
                    widgets.append(default_value(spec) if isinstance(v, Out) else v)
                    if opts.get("control_after_generate"):
                        widgets.append("fixed")
                    if opts.get("image_upload"):
                        widgets.append("image")
                inputs.append(entry)
            outputs = [{"name": decl["output_name"][i], "type": t, "slot_index": i,
                        "links": outgoing.get((n.id, i), [])} for i, t in enumerate(decl["output"])]
            props = {"Node name for S&R": n.type, "cnr_id": "comfyui-know3d" if n.type.startswith("Know3D") else "comfy-core"}
            models = _models_property(n)
            if models:
                props["models"] = models
            node = {"id": n.id, "type": n.type, "pos": pos, "size": size, "flags": {},
                    "order": order[n.id], "mode": 0, "inputs": inputs, "outputs": outputs,
                    "properties": props, "widgets_values": widgets}
            if n.title:
                node["title"] = n.title
            ui_nodes.append(node)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "know3d/" + self.name)),
            "revision": 0,
            "last_node_id": max(n.id for n in self.nodes),
            "last_link_id": link_id,
            "nodes": ui_nodes,
            "links": links,
            "groups": groups,
            "config": {},
            "extra": {"ds": fit_view(groups, placed), "know3d": {"min_comfyui": MIN_COMFYUI}},
            "version": 0.4,
        }


def graph_extent(groups: list, placed: dict) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the nodes (title bars included) and groups: what the frontend fits to view."""
    rects = [[p[0], p[1] - TITLE_H, s[0], s[1] + TITLE_H] for p, s in placed.values()] + [g["bounding"] for g in groups]
    return (min(r[0] for r in rects), min(r[1] for r in rects),
            max(r[0] + r[2] for r in rects), max(r[1] + r[3] for r in rects))


def fit_view(groups: list, placed: dict, canvas=CANVAS) -> dict:
    """The canvas scale and offset the workflow opens with: as the frontend's fit to view (:func:`fit_scale`, centred)."""
    x0, y0, x1, y1 = graph_extent(groups, placed)
    scale = fit_scale(x1 - x0, y1 - y0, canvas)
    return {"scale": scale, "offset": [round(canvas[0] / scale / 2 - (x0 + x1) / 2, 1),
                                       round(canvas[1] / scale / 2 - (y0 + y1) / 2, 1)]}


def display_name(node_type: str, decl: dict) -> str:
    pack = load_pack()
    return pack.NODE_DISPLAY_NAME_MAPPINGS.get(node_type) or decl.get("display_name") or node_type


def _models_property(n: Node):
    for key, info in QWEN_MODELS.items():
        if info["name"] in n.values.values():
            return [info]
    return None


# ------------------------------------------------------------------------------ the graphs
IN_TRELLIS, IN_QWEN, IN_CORE = ("inputs", 0), ("inputs", 1), ("inputs", 2)
BACK, KNOW, GEO, TEX, BAKE, OUT = (("back_view", 0), ("knowledge", 0), ("geometry", 0), ("texture", 0), ("bake", 0),
                                   ("outputs", 0))
PAINT = ("outputs", 1)


def _front(g: Graph, know3d_ckpt: str, texture: str = "none"):
    """Load Know3D Model + the front image -> (know3d_model, condition, front IMAGE)."""
    with g.group(*IN_TRELLIS, "TRELLIS.2 + front image"):
        model = g.add("Know3DLoadModel", trellis2=TRELLIS_FOLDER, shape_vae="(from the TRELLIS.2 folder)",
                      dinov3="(from the TRELLIS.2 folder)", know3d_checkpoint=know3d_ckpt, dtype="auto",
                      texture=texture)
        image = g.add("LoadImage", title="Front image (RGBA)", image=FRONT_IMAGE)
        mask = g.add("InvertMask", title="Alpha -> mask", mask=image[1])
        cond = g.add("Know3DImageCondition", know3d_model=model[0], image=image[0], mask=mask[0])
    return model, cond, cond[1]


def _qwen(g: Graph, lora: bool):
    """Qwen-Image-Edit-2511 as the official ComfyUI graph loads it (+ the back-view LoRA)."""
    with g.group(*IN_QWEN, "Qwen-Image-Edit-2511" + (" + back-view LoRA" if lora else "")):
        unet = g.add("UNETLoader", unet_name=QWEN_MODELS["unet"]["name"], weight_dtype="default")
        shift = g.add("ModelSamplingAuraFlow", model=unet[0], shift=3.1)
        model = g.add("CFGNorm", model=shift[0], strength=1.0)
        if lora:
            model = g.add("Know3DLoadQwenEditLoRA", model=model[0], lora_name=KNOW3D_LORA, strength=1.0)
        clip = g.add("CLIPLoader", clip_name=QWEN_MODELS["clip"]["name"], type="qwen_image")
        vae = g.add("VAELoader", vae_name=QWEN_MODELS["vae"]["name"])
    return model, clip, vae


def _encode(g: Graph, clip, vae, front, prompt, title):
    enc = g.add("TextEncodeQwenImageEditPlus", title=title, clip=clip[0], prompt=prompt, vae=vae[0], image1=front)
    return g.add("FluxKontextMultiReferenceLatentMethod", conditioning=enc[0], reference_latents_method="index_timestep_zero")


def _back_view(g: Graph, model, clip, vae, front, description, stop_at_sigma=0.0, preview=True):
    """Back-view prompt -> Qwen-Image-Edit sampling (-> the decoded back view and its preview)."""
    with g.group(*BACK):
        prompt = g.add("Know3DBackViewPrompt", description=description)
        pos = _encode(g, clip, vae, front, prompt[0], "Prompt + front image")
        negative = _encode(g, clip, vae, front, "", "Negative + front image")
        scaled = g.add("FluxKontextImageScale", image=front)
        latent = g.add("VAEEncode", pixels=scaled[0], vae=vae[0])
        sample = g.add("Know3DBackViewSample", model=model[0], positive=pos[0], negative=negative[0],
                       latent_image=latent[0], seed=0, steps=40, cfg=4.0, sampler_name="euler", scheduler="simple",
                       stop_at_sigma=stop_at_sigma)
        back = None
        if preview:
            back = g.add("VAEDecode", title="Imagined back view", samples=sample[0], vae=vae[0])
            g.add("PreviewImage", images=back[0])
    return sample, back


def _hidden_states(g: Graph, qwen, sample, model):
    with g.group(*KNOW):
        return g.add("Know3DExtractHiddenStates", model=qwen[0], trajectory=sample[1], sigma=0.0, layers="auto",
                     know3d_model=model[0])


def _shape(g: Graph, model, cond, knowledge=None, seed=0, key=GEO, title=None):
    """Sparse Structure -> Geometry (mesh + shape latent)."""
    extra = {"knowledge": knowledge} if knowledge is not None else {}
    with g.group(*key, title):
        structure = g.add("Know3DSparseStructure", know3d_model=model[0], condition=cond[0], seed=seed, **extra)
        return g.add("Know3DGeometry", know3d_model=model[0], structure=structure[0], condition=cond[0],
                     resolution="1024_cascade", seed=seed, **extra)


def _outputs(g: Graph, mesh, normals_of, prefix, key=OUT, title=None, preview_3d=True):
    """Save Mesh (-> Preview 3D), normal renders of ``normals_of`` and their preview."""
    with g.group(*key, title):
        save = g.add("Know3DSaveMesh", mesh=mesh, filename_prefix=prefix, format="glb")
        if preview_3d:
            g.add("Preview3D", model_file=save[0])
        normals = g.add("Know3DRenderNormals", mesh=normals_of, resolution=512)
        g.add("PreviewImage", title="Normal renders", images=normals[0])
    return normals


NOTE_MODELS = (
    "**Models** (nothing is downloaded for you):\n"
    f"- `models/trellis2/{TRELLIS_FOLDER}`: the whole microsoft/TRELLIS.2-4B folder (pipeline.json + ckpts/), "
    "with `dinov3-vitl16-pretrain-lvd1689m/` (facebook, gated) next to it - or pick Comfy-Org's DINOv3 file "
    "from models/clip_vision in *Load Know3D Model*.\n"
)
NOTE_QWEN = (
    "- Qwen-Image-Edit-2511: the loaders name Comfy-Org's files (diffusion model, Qwen2.5-VL text encoder, VAE).\n"
)
NOTE_KNOW3D = (
    f"- `models/loras/{KNOW3D_LORA}` (back-view LoRA) and `models/know3d/{KNOW3D_CKPT}` (Know3D checkpoint): "
    "from the Know3D release.\n"
)
NOTE_IMAGE = (
    f"\n**Input**: `input/{FRONT_IMAGE}`, an RGBA image of one object on a transparent background "
    "(or feed a background-removal node's mask to *Image Condition*).\n"
    f"\nNeeds ComfyUI >= {MIN_COMFYUI}."
)
# Two rows: the note, the loaders and the knowledge above; back view, 3D and outputs below.
TWO_ROWS = col(row(NOTE, IN_TRELLIS, IN_QWEN, KNOW), row(BACK, GEO, OUT))


def build_full(decl) -> Graph:
    g = Graph("know3d_full", decl)
    g.note("# Know3D: front image + a sentence about the back -> mesh\n\nThe back-view model imagines the "
           "back; its MMDiT hidden states at sigma ~0.25 steer TRELLIS.2.\n\n" + NOTE_MODELS + NOTE_QWEN
           + NOTE_KNOW3D + NOTE_IMAGE)
    model, cond, front = _front(g, KNOW3D_CKPT)
    qwen, clip, vae = _qwen(g, lora=True)
    sample, _ = _back_view(g, qwen, clip, vae, front, "a hollow backrest with three vertical slats")
    knowledge = _hidden_states(g, qwen, sample, model)
    geometry = _shape(g, model, cond, knowledge[0])
    _outputs(g, geometry[0], geometry[0], "know3d/full")
    g.arrange(TWO_ROWS)
    return g


def build_multiview(decl) -> Graph:
    g = Graph("know3d_multiview_public", decl)
    g.note("# Back view as a second view (public weights only)\n\nQwen-Image-Edit-2511 turns the camera "
           "around; the generated back image becomes TRELLIS.2's second image condition. No Know3D "
           "weights.\n\n" + NOTE_MODELS + NOTE_QWEN + NOTE_IMAGE)
    model, cond, front = _front(g, "none")
    qwen, clip, vae = _qwen(g, lora=False)
    _, back = _back_view(g, qwen, clip, vae, front, "")
    with g.group(*KNOW):
        knowledge = g.add("Know3DBackViewAsSecondView", back_image=back[0], mode="stochastic")
    geometry = _shape(g, model, cond, knowledge[0])
    _outputs(g, geometry[0], geometry[0], "know3d/multiview")
    g.arrange(TWO_ROWS)
    return g


def build_baseline(decl) -> Graph:
    g = Graph("trellis2_baseline", decl)
    g.note("# Plain TRELLIS.2 (baseline)\n\nThe same stages with no knowledge about the back.\n\n"
           + NOTE_MODELS + NOTE_IMAGE)
    model, cond, _ = _front(g, "none")
    geometry = _shape(g, model, cond)
    _outputs(g, geometry[0], geometry[0], "know3d/baseline")
    g.arrange(col(row(NOTE, IN_TRELLIS), row(GEO, OUT)))
    return g


def build_textured(decl) -> Graph:
    g = Graph("know3d_textured", decl)
    g.note("# Know3D, textured: front image + a sentence about the back -> PBR-textured GLB\n\nAs *know3d_full*, "
           "then TRELLIS.2's texture stage (*Know3D Texture*) on the shape latent: the imagined back view is the "
           "texture flow's second image condition, so the back's colours follow the description too. The mesh is "
           "reduced to the face budget, UV-unwrapped and baked to PBR maps (base colour, metallic-roughness, "
           "alpha); *Save Mesh* writes them into the GLB.\n\n" + NOTE_MODELS + NOTE_QWEN + NOTE_KNOW3D
           + "- The texture flows and decoder come from the same TRELLIS.2 folder (*Load Know3D Model*: texture).\n"
           + NOTE_IMAGE, width=560)
    model, cond, front = _front(g, KNOW3D_CKPT, texture="(from the TRELLIS.2 folder)")
    qwen, clip, vae = _qwen(g, lora=True)
    sample, back = _back_view(g, qwen, clip, vae, front, "a hollow backrest with three vertical slats")
    knowledge = _hidden_states(g, qwen, sample, model)
    geometry = _shape(g, model, cond, knowledge[0])
    with g.group(*GEO):
        textured = g.add("Know3DTexture", know3d_model=model[0], shape_latent=geometry[1], condition=cond[0],
                         seed=0, mode="pbr", back_image=back[0])
    _outputs(g, textured[0], geometry[0], "know3d/textured")
    g.arrange(TWO_ROWS)
    return g


def trellis_plan():
    """know3d_core.plan (the pack's; Comfy-Org's TRELLIS.2 file names live there)."""
    return importlib.import_module(f"{load_pack().__name__}.know3d_core.plan")


def core_trellis_files() -> dict:
    """role -> file name of Comfy-Org's TRELLIS.2 files."""
    plan = trellis_plan()
    return {role: name for role, (name, _, _) in {**plan.COMFY_FILES, **plan.COMFY_TEXTURE_FILES}.items()}


def texture_sampler() -> dict:
    """KSampler settings of TRELLIS.2's texture stage (pipeline.json's tex_slat_sampler: steps, guidance;
    its rescale_t 3 is core TRELLIS.2's own sampling shift)."""
    sampling = importlib.import_module(f"{load_pack().__name__}.know3d_core.sampling")
    p = sampling.OFFICIAL_SAMPLER_PARAMS["tex_slat"]
    return {"steps": p.steps, "cfg": float(p.guidance_strength), "sampler_name": "euler", "scheduler": "normal"}


CORE_FACES = 200_000      # DecimateMesh before unwrapping (core's default)
CORE_TEXTURE_SIZE = 2048  # UV atlas and baked maps


def build_core_textured(decl) -> Graph:
    """Know3D's mesh and shape latent (as *know3d_full*) textured by ComfyUI's own nodes: core TRELLIS.2's
    texture stage on Comfy-Org's files, then core's decimate / unwrap / bake / apply, and Paint Mesh's
    vertex colours as the fast alternative."""
    g = Graph("know3d_core_textured", decl)
    files = core_trellis_files()
    g.note("# Know3D mesh, textured by ComfyUI's own nodes\n\nAs *know3d_full* up to *Geometry*. Its shape latent "
           "goes through core TRELLIS.2's texture stage (*Trellis2 Texture Stage* -> *KSampler* -> texture VAE "
           "decode, guided by the shape VAE's subdivisions); core's mesh nodes decimate and UV-unwrap Know3D's mesh "
           "and bake the voxel colours onto it (PBR GLB); *Paint Mesh* gives vertex colours.\n\n"
           "**Models**: as in *know3d_full* (its read-me note), plus Comfy-Org/TRELLIS.2's "
           f"`{files['flows']}` (models/diffusion_models), `{files['vae']}` and `{files['texture_vae']}` "
           f"(models/vae), `{files['dinov3']}` (models/clip_vision).\n\nNeeds ComfyUI >= {MIN_COMFYUI}.")
    model, cond, front = _front(g, KNOW3D_CKPT)
    qwen, clip, vae = _qwen(g, lora=True)
    sample, _ = _back_view(g, qwen, clip, vae, front, "a hollow backrest with three vertical slats", preview=False)
    knowledge = _hidden_states(g, qwen, sample, model)
    geometry = _shape(g, model, cond, knowledge[0])
    with g.group(*IN_CORE, "Core texture models"):
        flow = g.add("UNETLoader", title="TRELLIS.2 (texture flow)", unet_name=files["flows"], weight_dtype="default")
        shape_vae = g.add("VAELoader", title="TRELLIS.2 shape VAE", vae_name=files["vae"])
        tex_vae = g.add("VAELoader", title="TRELLIS.2 texture VAE", vae_name=files["texture_vae"])
        dino = g.add("CLIPVisionLoader", title="DINOv3", clip_name=files["dinov3"])
    with g.group(*TEX):
        conds = g.add("Trellis2Conditioning", clip_vision_model=dino[0], image=front)
        subdivs = g.add("VaeDecodeShapeTrellis", samples=geometry[1], vae=shape_vae[0])
        stage = g.add("Trellis2TextureStage", positive=conds[0], negative=conds[1], shape_latent=geometry[1])
        tex = g.add("KSampler", title="Texture flow", model=flow[0], positive=stage[0], negative=stage[1],
                    latent_image=stage[2], seed=0, denoise=1.0, **texture_sampler())
        voxels = g.add("VaeDecodeTextureTrellis", samples=tex[0], vae=tex_vae[0], shape_subdivides=subdivs[1])
    with g.group(*BAKE):
        low = g.add("DecimateMesh", mesh=geometry[0], target_face_count=CORE_FACES, placement_mode="midpoint")
        uv = g.add("UnwrapMesh", mesh=low[0], segmenter="pec", resolution=CORE_TEXTURE_SIZE, padding=1,
                   weld_distance=0.0)
        maps = g.add("BakeTextureFromVoxel", mesh=uv[0], voxel_colors=voxels[0], texture_size=CORE_TEXTURE_SIZE,
                     reference_mesh=geometry[0])
        pbr = g.add("ApplyTextureToMesh", mesh=uv[0], base_color=maps[0], metallic=maps[1], roughness=maps[2])
    with g.group(*OUT):
        save = g.add("Know3DSaveMesh", title="Save Mesh (PBR)", mesh=pbr[0], filename_prefix="know3d/core_textured",
                     format="glb")
        g.add("Preview3D", model_file=save[0])
    with g.group(*PAINT, "Vertex colours"):
        painted = g.add("PaintMesh", mesh=geometry[0], voxel_colors=voxels[0])
        g.add("Know3DSaveMesh", title="Save Mesh (vertex colours)", mesh=painted[0],
              filename_prefix="know3d/core_painted", format="glb")
    g.arrange(col(row(NOTE, IN_TRELLIS, IN_QWEN, KNOW, IN_CORE, PAINT), row(BACK, GEO, TEX, BAKE, OUT)))
    return g


COMPARE_DESCRIPTIONS = (
    "a hollow backrest with three vertical slats",
    "a solid backrest with a rounded top",
    "a backrest made of two horizontal bars",
)
COMPARE_COLUMN_H = 500  # each description's column of groups stays lower than the screen


def build_compare(decl) -> Graph:
    """Compact for fit-to-view (a 16:9 screen): the negative prompt and the front's latent are built once
    beside the loaders and shared by every description; a description is a column of groups (back view,
    knowledge + 3D, save + normals; no Preview 3D per description: the stitched normals are the comparison)."""
    g = Graph("know3d_compare_backs", decl, group_gap=40)  # 16 groups: closer together
    g.note("# One front image, three backs\n\nEach description (a column of groups) gives its own back view, "
           "knowledge and mesh; the normal renders are stitched side by side (one image per view: front, back, "
           "left, right).\n\nModels and input: as in *know3d_full* (its read-me note).", width=300)
    model, cond, front = _front(g, KNOW3D_CKPT)
    qwen, clip, vae = _qwen(g, lora=True)
    with g.group(*IN_QWEN):
        negative = _encode(g, clip, vae, front, "", "Negative + front image")
        latent = g.add("VAEEncode", pixels=g.add("FluxKontextImageScale", image=front)[0], vae=vae[0])
    renders, columns = [], []
    for i, text in enumerate(COMPARE_DESCRIPTIONS):
        suffix = f" - {i + 1}"
        back_key, shape_key, out_key = ("back_view", i), ("geometry", i), ("outputs", i)
        with g.group(*back_key, STAGES["back_view"][0] + suffix, column_h=COMPARE_COLUMN_H):
            prompt = g.add("Know3DBackViewPrompt", description=text)
            pos = _encode(g, clip, vae, front, prompt[0], "Prompt + front image")
            sample = g.add("Know3DBackViewSample", model=qwen[0], positive=pos[0], negative=negative[0],
                           latent_image=latent[0], seed=0, steps=40, cfg=4.0, sampler_name="euler",
                           scheduler="simple", stop_at_sigma=0.25)
        with g.group(*shape_key, f"{STAGES['knowledge'][0]} + {STAGES['geometry'][0]}{suffix}",
                     column_h=COMPARE_COLUMN_H):
            knowledge = g.add("Know3DExtractHiddenStates", model=qwen[0], trajectory=sample[1], sigma=0.0,
                              layers="auto", know3d_model=model[0])
        geometry = _shape(g, model, cond, knowledge[0], key=shape_key)
        with g.group(*out_key, STAGES["outputs"][0] + suffix, column_h=200):  # side by side
            g.add("Know3DSaveMesh", mesh=geometry[0], filename_prefix=f"know3d/compare_{i + 1}", format="glb")
            renders.append(g.add("Know3DRenderNormals", mesh=geometry[0], resolution=512))
        columns.append(col(back_key, shape_key, out_key))
    with g.group("comparison", 0, column_h=1000):  # one column
        stitched = g.add("ImageStitch", image1=renders[0][0], image2=renders[1][0], direction="right")
        stitched = g.add("ImageStitch", image1=stitched[0], image2=renders[2][0], direction="right")
        g.add("PreviewImage", title="Normals 1 | 2 | 3", images=stitched[0])
    g.arrange(row(col(IN_TRELLIS, IN_QWEN), *columns, col(("comparison", 0), NOTE)))
    return g


BUILDERS = {
    "know3d_full": build_full,
    "know3d_multiview_public": build_multiview,
    "trellis2_baseline": build_baseline,
    "know3d_compare_backs": build_compare,
    "know3d_textured": build_textured,
    "know3d_core_textured": build_core_textured,
}


def build_all() -> dict[str, tuple[dict, dict]]:
    decl = declarations()
    return {name: (b(decl).to_ui(), b(decl).to_api()) for name, b in BUILDERS.items()}


def dump(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def write_all() -> None:
    os.makedirs(UI_DIR, exist_ok=True)
    os.makedirs(API_DIR, exist_ok=True)
    for name, (ui, api) in build_all().items():
        with open(os.path.join(UI_DIR, f"{name}.json"), "w", encoding="utf-8") as f:
            f.write(dump(ui))
        with open(os.path.join(API_DIR, f"{name}.json"), "w", encoding="utf-8") as f:
            f.write(dump(api))
        print(f"wrote example_workflows/{name}.json and example_workflows_api/{name}.json")


def write_thumbnails(screens: str) -> None:
    """``screens/<name>.png`` (the browser test's fit-to-view screenshots) -> ``<name>.jpg`` cards."""
    from PIL import Image, ImageOps

    for name in BUILDERS:
        src = os.path.join(screens, f"{name}.png")
        if not os.path.isfile(src):
            raise SystemExit(f"{src} is missing: run tests/test_comfyui_browser.py first (docs/testing.md)")
        with Image.open(src) as im:  # the canvas without the frontend's side and top bars
            canvas = im.convert("RGB").crop((SIDEBAR_W, TOPBAR_H, im.width, im.height))
            thumb = ImageOps.fit(canvas, THUMBNAIL_SIZE, Image.Resampling.LANCZOS)
        thumb.save(os.path.join(UI_DIR, f"{name}.jpg"), quality=85, optimize=True)
        print(f"wrote example_workflows/{name}.jpg")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thumbnails", metavar="DIR", help="make the template thumbnails from DIR/<name>.png")
    opts = parser.parse_args(argv)
    if opts.thumbnails:
        write_thumbnails(opts.thumbnails)
    else:
        write_all()


if __name__ == "__main__":
    main()
