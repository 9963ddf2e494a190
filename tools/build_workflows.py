"""Builds the example workflows from one description each: the UI format ComfyUI's template
browser and Load expect (``example_workflows/*.json``, the folder ComfyUI prefers; only workflows and
their thumbnails live there, since ComfyUI serves the whole folder) and the API-format twin that
``POST /prompt`` takes (``example_workflows_api/*.json``).

Node declarations come from the pack itself (our nodes' V3 schemas) and from the recorded core listing
``tests/data/comfyui/object_info_0.33.0.json``, so widget order (each node's ``input_order``), socket
types and defaults are the host's. Node sizes are those the real frontend gives each node type
(:data:`FRONTEND_SIZES`); nodes sit in one group per stage, so no two overlap (the browser test,
tests/test_comfyui_browser.py, checks it in the real frontend).

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


def input_kind(spec) -> tuple[str, dict]:
    """(socket or widget type, options) of one input declaration."""
    typ = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(typ, list):
        return "COMBO", opts
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
# Body size [w, h] (the 30 px title bar above it not included) the frontend (comfyui-frontend-package
# 1.49.6, ComfyUI 0.33.0) gives a new node of each type, measured in headless Chromium with
# LiteGraph.createNode (the frontend keeps a saved size at least this large). A few are set other than
# measured, all above the frontend's minimum (computeSize): multiline text nodes narrower (320 for
# 400), Preview 3D's viewport 400 x 500 (550 by default), Load Image and Preview Image with room for
# their image (Load Image grows to ~314 px high once its image loads; Preview Image once it ran).
FRONTEND_SIZES = {
    "CFGNorm": (270, 82), "CLIPLoader": (270, 106), "FluxKontextImageScale": (195, 26),
    "FluxKontextMultiReferenceLatentMethod": (311, 58), "ImageStitch": (270, 150), "InvertMask": (140, 26),
    "Know3DBackViewAsSecondView": (279, 78), "Know3DBackViewPrompt": (320, 200), "Know3DBackViewSample": (270, 262),
    "Know3DExtractHiddenStates": (295, 122), "Know3DGeometry": (295, 334), "Know3DImageCondition": (198, 86),
    "Know3DLoadModel": (278, 178), "Know3DLoadQwenEditLoRA": (270, 82), "Know3DRenderNormals": (270, 106),
    "Know3DSaveMesh": (270, 154), "Know3DSparseStructure": (295, 266), "Know3DTexture": (295, 358), "LoadImage": (283, 330),
    "ModelSamplingAuraFlow": (270, 58), "Preview3D": (400, 500), "PreviewImage": (300, 300),
    "TextEncodeQwenImageEditPlus": (320, 200), "UNETLoader": (270, 82), "VAEDecode": (140, 46),
    "VAEEncode": (140, 46), "VAELoader": (270, 58),
}
TITLE_H = 30          # LiteGraph.NODE_TITLE_HEIGHT: the title bar sits above a node's pos
GAP = 40              # between nodes of a group (after the title bar)
COLUMN_H = 720        # a group's columns are filled up to this height before a new one starts
COMPARE_COLUMN_H = 500  # compare_backs' rows lower, so its many groups fit a 16:9 screen at a readable zoom
GROUP_PAD = 30        # group edge to its nodes
GROUP_TITLE_H = 50    # group title bar above its nodes (LiteGraph's 24 px group title)
GROUP_GAP = 80        # between groups
NOTE_WIDTH = 460
NOTE_CHARS_PER_LINE = 52   # at NOTE_WIDTH in the frontend's markdown font
NOTE_LINE_H = 22


# (stage title, colour) in left-to-right order; lanes stack groups of one stage vertically.
STAGES = {
    "inputs": ("Models + front image", "#3f789e"),
    "back_view": ("Back view (Qwen-Image-Edit-2511)", "#a1309b"),
    "knowledge": ("Knowledge", "#b58b2a"),
    "geometry": ("3D (TRELLIS.2)", "#8A8"),
    "outputs": ("Outputs", "#88A"),
    "comparison": ("Comparison", "#3f789e"),
}


def node_size(n: "Node") -> list[int]:
    if n.type in FRONTEND_ONLY:
        return [NOTE_WIDTH, note_height(n.note or "")]
    return [int(v) for v in FRONTEND_SIZES[n.type]]


def note_height(text: str) -> int:
    """Body height that shows the whole markdown note at NOTE_WIDTH (wrapped lines + headings)."""
    lines = 0.0
    for line in text.split("\n"):
        if line.startswith("#"):
            lines += 2.0
        else:
            lines += max(1, -(-len(line) // NOTE_CHARS_PER_LINE))
    return int(lines * NOTE_LINE_H + 60)


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
    column_h: int = COLUMN_H
    _where: tuple = ("inputs", 0)

    @contextlib.contextmanager
    def group(self, stage: str, lane: int = 0, title: str | None = None):
        """Nodes added in the block go into the group of ``stage`` (a key of STAGES) in ``lane``."""
        if stage not in STAGES:
            raise KeyError(f"{self.name}: unknown stage {stage}")
        if title:
            self.lane_titles[(stage, lane)] = title
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

    def note(self, text: str, stage: str = "inputs") -> Node:
        """The read-me note: first in the inputs' row, or (``stage="comparison"``) below the comparison group."""
        node = Node(self, len(self.nodes) + 1, "MarkdownNote", {}, "Read me", note=text, stage=stage, lane=-1)
        self.nodes.append(node)
        return node

    # -- layout: one group per (stage, lane). The inputs' groups (and the read-me note) form the top
    # row; below it each lane is a row of groups, stages left to right. Inside a group, nodes go in
    # order of depth (longest path from a source) into columns up to ``column_h`` high.
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

    def _columns(self, nodes: list, depth: dict) -> tuple[dict, tuple[int, int]]:
        """Offsets of a group's nodes from its content corner and the content size: nodes by depth,
        each into the first column that still has room below its last node (a new column else)."""
        columns: list[list] = []  # [[node, ...], ...]
        height = lambda col: sum(TITLE_H + node_size(n)[1] for n in col) + GAP * (len(col) - 1)
        for n in sorted(nodes, key=lambda n: (depth[n.id], n.id)):
            need = TITLE_H + node_size(n)[1]
            for col in columns:
                if max(depth[m.id] for m in col) <= depth[n.id] and height(col) + GAP + need <= self.column_h:
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
        """({node id: (pos, size)}, groups as the frontend stores them)."""
        depth = self._depths()
        members: dict = {}
        for n in self.nodes:
            members.setdefault((n.stage, n.lane), []).append(n)
        inner = {key: self._columns(nodes, depth) for key, nodes in members.items()}
        box = {key: (w + 2 * GROUP_PAD, h + GROUP_TITLE_H + GROUP_PAD) for key, (_, (w, h)) in inner.items()}
        stages = [s for s in STAGES if s != "inputs" and any(k[0] == s for k in inner)]
        lanes = sorted({k[1] for k in inner if k[0] != "inputs" and k[1] >= 0})
        col_w = {s: max(box[k][0] for k in inner if k[0] == s) for s in stages}
        lane_h = {l: max(box[k][1] for k in inner if k[1] == l and k[0] != "inputs") for l in lanes}
        inputs = sorted(k for k in inner if k[0] == "inputs")  # the note (lane -1) first

        def arrange(inputs_on_top: bool) -> dict:
            """Group corners: the inputs' groups as a row above the lanes, or as a column left of them."""
            origin, x, y = {}, 0, 0
            for key in inputs:
                origin[key] = (x, y)
                if inputs_on_top:
                    x += box[key][0] + GROUP_GAP
                else:
                    y += box[key][1] + GROUP_GAP
            if inputs_on_top:
                x0, y = 0, max(box[k][1] for k in inputs) + GROUP_GAP
            else:
                x0, y = max(box[k][0] for k in inputs) + GROUP_GAP, 0
            for l in lanes:
                x = x0
                for s in stages:
                    if (s, l) in inner:
                        origin[(s, l)] = (x, y)
                    x += col_w[s] + GROUP_GAP
                y += lane_h[l] + GROUP_GAP
            if ("comparison", -1) in inner:  # the note, in the comparison column below its group
                cx, cy = origin[("comparison", lanes[0])]
                origin[("comparison", -1)] = (cx, cy + lane_h[lanes[0]] + GROUP_GAP)
            return origin

        def extent(origin: dict) -> tuple[int, int]:
            ends = [(x + (box[k][0] if k[0] == "inputs" or k[1] < 0 else col_w[k[0]]),
                     y + (box[k][1] if k[0] == "inputs" or k[1] < 0 else lane_h[k[1]])) for k, (x, y) in origin.items()]
            return max(e[0] for e in ends), max(e[1] for e in ends)

        origin = max((arrange(True), arrange(False)), key=lambda o: fit_scale(*extent(o)))
        placed, groups = {}, []
        for key in sorted(origin, key=lambda k: (origin[k][1], origin[k][0])):
            gx, gy = origin[key]
            for nid, (dx, dy) in inner[key][0].items():
                placed[nid] = ([gx + GROUP_PAD + dx, gy + GROUP_TITLE_H + dy], node_size(self.nodes[nid - 1]))
            stage, lane = key
            if lane < 0:  # the read-me note stands alone, no group around it
                continue
            title, color = STAGES[stage]
            w = box[key][0] if stage == "inputs" else col_w[stage]
            h = box[key][1] if stage == "inputs" else lane_h[lane]
            groups.append({"id": len(groups) + 1, "title": self.lane_titles.get(key, title), "bounding": [gx, gy, w, h],
                           "color": color, "flags": {}})
        return placed, groups

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


VIEW = (2500, 1360)  # the canvas of a 2560 x 1440 browser window


def fit_scale(width: float, height: float, view=VIEW) -> float:
    return round(min(1.0, (view[0] - 80) / width, (view[1] - 80) / height), 3)


def fit_view(groups: list, placed: dict, view=VIEW) -> dict:
    """Canvas scale and offset that show the whole graph in a ``view``-sized canvas."""
    rects = [g["bounding"] for g in groups] + [[p[0], p[1] - TITLE_H, s[0], s[1] + TITLE_H] for p, s in placed.values()]
    x0, y0 = min(r[0] for r in rects), min(r[1] for r in rects)
    x1, y1 = max(r[0] + r[2] for r in rects), max(r[1] + r[3] for r in rects)
    scale = fit_scale(x1 - x0, y1 - y0, view)
    return {"scale": scale, "offset": [40 / scale - x0, 40 / scale - y0]}


def display_name(node_type: str, decl: dict) -> str:
    pack = load_pack()
    return pack.NODE_DISPLAY_NAME_MAPPINGS.get(node_type) or decl.get("display_name") or node_type


def _models_property(n: Node):
    for key, info in QWEN_MODELS.items():
        if info["name"] in n.values.values():
            return [info]
    return None


# ------------------------------------------------------------------------------ the four graphs
def _front(g: Graph, know3d_ckpt: str, texture: str = "none"):
    """Load Know3D Model + the front image -> (know3d_model, condition, front IMAGE)."""
    with g.group("inputs", 0, "TRELLIS.2 + front image"):
        model = g.add("Know3DLoadModel", trellis2=TRELLIS_FOLDER, shape_vae="(from the TRELLIS.2 folder)",
                      dinov3="(from the TRELLIS.2 folder)", know3d_checkpoint=know3d_ckpt, dtype="auto",
                      texture=texture)
        image = g.add("LoadImage", title="Front image (RGBA, transparent background)", image=FRONT_IMAGE)
        mask = g.add("InvertMask", title="Alpha -> object mask", mask=image[1])
        cond = g.add("Know3DImageCondition", know3d_model=model[0], image=image[0], mask=mask[0])
    return model, cond, cond[1]


def _qwen(g: Graph, lora: bool):
    """Qwen-Image-Edit-2511 as the official ComfyUI graph loads it (+ the back-view LoRA)."""
    with g.group("inputs", 1, "Qwen-Image-Edit-2511" + (" + back-view LoRA" if lora else "")):
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


def _back_view(g: Graph, model, clip, vae, front, description, negative=None, stop_at_sigma=0.0, seed=0, lane=0,
               title=None):
    with g.group("back_view", lane, title):
        prompt = g.add("Know3DBackViewPrompt", description=description)
        pos = _encode(g, clip, vae, front, prompt[0], "Back-view prompt + front image")
        if negative is None:
            negative = _encode(g, clip, vae, front, "", "Negative (empty) + front image")
        scaled = g.add("FluxKontextImageScale", image=front)
        latent = g.add("VAEEncode", pixels=scaled[0], vae=vae[0])
        sample = g.add("Know3DBackViewSample", model=model[0], positive=pos[0], negative=negative[0],
                       latent_image=latent[0], seed=seed, steps=40, cfg=4.0, sampler_name="euler", scheduler="simple",
                       stop_at_sigma=stop_at_sigma)
    return sample, negative


def _geometry(g: Graph, model, cond, knowledge=None, prefix="know3d/mesh", seed=0, lane=0, suffix=""):
    extra = {"knowledge": knowledge} if knowledge is not None else {}
    with g.group("geometry", lane, STAGES["geometry"][0] + suffix):
        structure = g.add("Know3DSparseStructure", know3d_model=model[0], condition=cond[0], seed=seed, **extra)
        geometry = g.add("Know3DGeometry", know3d_model=model[0], structure=structure[0], condition=cond[0],
                         resolution="1024_cascade", seed=seed, **extra)
    with g.group("outputs", lane, STAGES["outputs"][0] + suffix):
        save = g.add("Know3DSaveMesh", mesh=geometry[0], filename_prefix=prefix, format="glb")
        g.add("Preview3D", model_file=save[0])
        normals = g.add("Know3DRenderNormals", mesh=geometry[0], resolution=512)
    return geometry, normals


def _normals_preview(g: Graph, normals, lane=0, title="Normals: front, back, left, right"):
    with g.group("outputs", lane):
        g.add("PreviewImage", title=title, images=normals[0])


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


def build_full(decl) -> Graph:
    g = Graph("know3d_full", decl)
    g.note("# Know3D: front image + a sentence about the back -> mesh\n\nThe back-view model imagines the "
           "back; its MMDiT hidden states at sigma ~0.25 steer TRELLIS.2.\n\n" + NOTE_MODELS + NOTE_QWEN
           + NOTE_KNOW3D + NOTE_IMAGE)
    model, cond, front = _front(g, KNOW3D_CKPT)
    qwen, clip, vae = _qwen(g, lora=True)
    sample, _ = _back_view(g, qwen, clip, vae, front, "a hollow backrest with three vertical slats")
    with g.group("back_view"):
        back = g.add("VAEDecode", title="The imagined back view", samples=sample[0], vae=vae[0])
        g.add("PreviewImage", images=back[0])
    with g.group("knowledge"):
        knowledge = g.add("Know3DExtractHiddenStates", model=qwen[0], trajectory=sample[1], sigma=0.0,
                          layers="auto", know3d_model=model[0])
    _, normals = _geometry(g, model, cond, knowledge[0], "know3d/full")
    _normals_preview(g, normals)
    return g


def build_multiview(decl) -> Graph:
    g = Graph("know3d_multiview_public", decl)
    g.note("# Back view as a second view (public weights only)\n\nQwen-Image-Edit-2511 turns the camera "
           "around; the generated back image becomes TRELLIS.2's second image condition. No Know3D "
           "weights.\n\n" + NOTE_MODELS + NOTE_QWEN + NOTE_IMAGE)
    model, cond, front = _front(g, "none")
    qwen, clip, vae = _qwen(g, lora=False)
    sample, _ = _back_view(g, qwen, clip, vae, front, "")
    with g.group("back_view"):
        back = g.add("VAEDecode", title="Generated back view", samples=sample[0], vae=vae[0])
        g.add("PreviewImage", images=back[0])
    with g.group("knowledge"):
        knowledge = g.add("Know3DBackViewAsSecondView", back_image=back[0], mode="stochastic")
    _, normals = _geometry(g, model, cond, knowledge[0], "know3d/multiview")
    _normals_preview(g, normals)
    return g


def build_baseline(decl) -> Graph:
    g = Graph("trellis2_baseline", decl)
    g.note("# Plain TRELLIS.2 (baseline)\n\nThe same stages with no knowledge about the back.\n\n"
           + NOTE_MODELS + NOTE_IMAGE)
    model, cond, _ = _front(g, "none")
    _, normals = _geometry(g, model, cond, None, "know3d/baseline")
    _normals_preview(g, normals)
    return g


def build_textured(decl) -> Graph:
    g = Graph("know3d_textured", decl)
    g.note("# Know3D, textured: front image + a sentence about the back -> PBR-textured GLB\n\nAs *know3d_full*, "
           "then TRELLIS.2's texture stage (*Know3D Texture*) on the shape latent: the imagined back view is the "
           "texture flow's second image condition, so the back's colours follow the description too. The mesh is "
           "reduced to the face budget, UV-unwrapped and baked to PBR maps (base colour, metallic-roughness, "
           "alpha); *Save Mesh* writes them into the GLB.\n\n" + NOTE_MODELS + NOTE_QWEN + NOTE_KNOW3D
           + "- The texture flows and decoder come from the same TRELLIS.2 folder (*Load Know3D Model*: texture).\n"
           + NOTE_IMAGE)
    model, cond, front = _front(g, KNOW3D_CKPT, texture="(from the TRELLIS.2 folder)")
    qwen, clip, vae = _qwen(g, lora=True)
    sample, _ = _back_view(g, qwen, clip, vae, front, "a hollow backrest with three vertical slats")
    with g.group("back_view"):
        back = g.add("VAEDecode", title="The imagined back view", samples=sample[0], vae=vae[0])
        g.add("PreviewImage", images=back[0])
    with g.group("knowledge"):
        knowledge = g.add("Know3DExtractHiddenStates", model=qwen[0], trajectory=sample[1], sigma=0.0,
                          layers="auto", know3d_model=model[0])
    with g.group("geometry", 0, STAGES["geometry"][0]):
        structure = g.add("Know3DSparseStructure", know3d_model=model[0], condition=cond[0], seed=0,
                          knowledge=knowledge[0])
        geometry = g.add("Know3DGeometry", know3d_model=model[0], structure=structure[0], condition=cond[0],
                         resolution="1024_cascade", seed=0, knowledge=knowledge[0])
        textured = g.add("Know3DTexture", know3d_model=model[0], shape_latent=geometry[1], condition=cond[0],
                         seed=0, mode="pbr", back_image=back[0])
    with g.group("outputs", 0, STAGES["outputs"][0]):
        save = g.add("Know3DSaveMesh", mesh=textured[0], filename_prefix="know3d/textured", format="glb")
        g.add("Preview3D", model_file=save[0])
        normals = g.add("Know3DRenderNormals", mesh=geometry[0], resolution=512)
    _normals_preview(g, normals)
    return g


COMPARE_DESCRIPTIONS = (
    "a hollow backrest with three vertical slats",
    "a solid backrest with a rounded top",
    "a backrest made of two horizontal bars",
)


def build_compare(decl) -> Graph:
    """Compact for fit-to-view (a 16:9 screen): the negative prompt and the front's latent are built once
    beside the loaders and shared by every row; a row is back view | knowledge + 3D | save + normals (no
    Preview 3D per row: the stitched normals are the comparison)."""
    g = Graph("know3d_compare_backs", decl, column_h=COMPARE_COLUMN_H)
    g.note("# One front image, three backs\n\nEach description gives its own back view, knowledge and mesh "
           "(one row of groups each); the normal renders are stitched side by side (one image per view: "
           "front, back, left, right).\n\n" + NOTE_MODELS + NOTE_QWEN + NOTE_KNOW3D + NOTE_IMAGE, stage="comparison")
    model, cond, front = _front(g, KNOW3D_CKPT)
    qwen, clip, vae = _qwen(g, lora=True)
    with g.group("inputs", 1):
        negative = _encode(g, clip, vae, front, "", "Negative (empty) + front image")
        latent = g.add("VAEEncode", pixels=g.add("FluxKontextImageScale", image=front)[0], vae=vae[0])
    renders = []
    for i, text in enumerate(COMPARE_DESCRIPTIONS):
        suffix = f" - description {i + 1}"
        with g.group("back_view", i, STAGES["back_view"][0] + suffix):
            prompt = g.add("Know3DBackViewPrompt", description=text)
            pos = _encode(g, clip, vae, front, prompt[0], "Back-view prompt + front image")
            sample = g.add("Know3DBackViewSample", model=qwen[0], positive=pos[0], negative=negative[0],
                           latent_image=latent[0], seed=0, steps=40, cfg=4.0, sampler_name="euler",
                           scheduler="simple", stop_at_sigma=0.25)
        with g.group("geometry", i, f"{STAGES['knowledge'][0]} + {STAGES['geometry'][0]}{suffix}"):
            knowledge = g.add("Know3DExtractHiddenStates", model=qwen[0], trajectory=sample[1], sigma=0.0,
                              layers="auto", know3d_model=model[0])
            structure = g.add("Know3DSparseStructure", know3d_model=model[0], condition=cond[0], seed=0,
                              knowledge=knowledge[0])
            geometry = g.add("Know3DGeometry", know3d_model=model[0], structure=structure[0], condition=cond[0],
                             resolution="1024_cascade", seed=0, knowledge=knowledge[0])
        with g.group("outputs", i, STAGES["outputs"][0] + suffix):
            g.add("Know3DSaveMesh", mesh=geometry[0], filename_prefix=f"know3d/compare_{i + 1}", format="glb")
            renders.append(g.add("Know3DRenderNormals", mesh=geometry[0], resolution=512))
    with g.group("comparison", 0):
        row = g.add("ImageStitch", image1=renders[0][0], image2=renders[1][0], direction="right")
        row = g.add("ImageStitch", image1=row[0], image2=renders[2][0], direction="right")
        g.add("PreviewImage", title="Normals side by side (descriptions 1 | 2 | 3)", images=row[0])
    return g


BUILDERS = {
    "know3d_full": build_full,
    "know3d_multiview_public": build_multiview,
    "trellis2_baseline": build_baseline,
    "know3d_compare_backs": build_compare,
    "know3d_textured": build_textured,
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
