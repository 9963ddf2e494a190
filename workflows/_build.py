"""Builds the example workflows from one description each: the UI format ComfyUI's template
browser and Load expect (``workflows/*.json``) and the API-format twin that ``POST /prompt``
takes (``workflows/api/*.json``).

Node declarations come from the pack itself (our nodes) and from the recorded core listing
``tests/data/comfyui/object_info_0.33.0.json``, so widget order, socket types and defaults are the
hosts'. ``python workflows/_build.py`` rewrites the files; tests/test_workflows.py checks that the
committed files are what this script produces.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OBJECT_INFO = os.path.join(ROOT, "tests", "data", "comfyui", "object_info_0.33.0.json")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"MarkdownNote", "Note"}
MIN_COMFYUI = "0.33.0"

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
    inputs = cls.INPUT_TYPES()
    return {
        "input": {k: v for k, v in inputs.items() if k in ("required", "optional")},
        "output": list(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
    }


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
    """[(name, spec, required)] in declaration order (required first)."""
    out = []
    for section in ("required", "optional"):
        for name, spec in decl["input"].get(section, {}).items():
            out.append((name, spec, section == "required"))
    return out


# ------------------------------------------------------------------------------ graph description
@dataclass
class Node:
    graph: "Graph"
    id: int
    type: str
    values: dict
    title: str | None = None
    note: str | None = None  # MarkdownNote text

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

    def add(self, type_: str, title: str | None = None, **values) -> Node:
        if type_ not in self.decl and type_ not in FRONTEND_ONLY:
            raise KeyError(f"{self.name}: unknown node type {type_}")
        node = Node(self, len(self.nodes) + 1, type_, values, title)
        self.nodes.append(node)
        return node

    def note(self, text: str) -> Node:
        node = Node(self, len(self.nodes) + 1, "MarkdownNote", {}, "Read me", note=text)
        self.nodes.append(node)
        return node

    # -- layout: column = longest path from a source, rows stacked per column
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
                elif required and is_widget(spec):
                    inputs[name] = default_value(spec)
            unknown = set(n.values) - {name for name, _, _ in ordered_inputs(decl)}
            if unknown:
                raise KeyError(f"{self.name}: {n.type} has no inputs {sorted(unknown)}")
            prompt[str(n.id)] = {"class_type": n.type, "inputs": inputs,
                                 "_meta": {"title": n.title or display_name(n.type, decl)}}
        return prompt

    def to_ui(self) -> dict:
        depth = self._depths()
        links, link_id = [], 0
        incoming = {}
        for n in self.nodes:
            if n.type in FRONTEND_ONLY:
                continue
            for name, v in n.values.items():
                if isinstance(v, Out):
                    link_id += 1
                    src_decl = self.decl[v.node.type]
                    typ = src_decl["output"][v.slot]
                    target_slot = [nm for nm, _, _ in ordered_inputs(self.decl[n.type])].index(name)
                    links.append([link_id, v.node.id, v.slot, n.id, target_slot, typ])
                    incoming[(n.id, name)] = link_id
        outgoing = {}
        for lid, src, slot, *_ in links:
            outgoing.setdefault((src, slot), []).append(lid)
        order = {n.id: i for i, n in enumerate(sorted(self.nodes, key=lambda n: (depth[n.id], n.id)))}
        rows, ui_nodes = {}, []
        for n in self.nodes:
            col = depth[n.id]
            y = rows.get(col, 0)
            if n.type in FRONTEND_ONLY:
                size = [420, 260]
                ui_nodes.append({"id": n.id, "type": n.type, "pos": [col * 400, y], "size": size, "flags": {},
                                 "order": order[n.id], "mode": 0, "inputs": [], "outputs": [],
                                 "title": n.title, "properties": {}, "widgets_values": [n.note]})
                rows[col] = y + size[1] + 40
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
            size = [340, 60 + 26 * (len(inputs) + len(outputs))]
            props = {"Node name for S&R": n.type}
            if n.type.startswith("Know3D"):
                props["cnr_id"] = "comfyui-know3d"
            else:
                props["cnr_id"] = "comfy-core"
            models = _models_property(n)
            if models:
                props["models"] = models
            node = {"id": n.id, "type": n.type, "pos": [col * 400, y], "size": size, "flags": {},
                    "order": order[n.id], "mode": 0, "inputs": inputs, "outputs": outputs,
                    "properties": props, "widgets_values": widgets}
            if n.title:
                node["title"] = n.title
            ui_nodes.append(node)
            rows[col] = y + size[1] + 40
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "know3d/" + self.name)),
            "revision": 0,
            "last_node_id": max(n.id for n in self.nodes),
            "last_link_id": link_id,
            "nodes": ui_nodes,
            "links": links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [40, 40]}, "know3d": {"min_comfyui": MIN_COMFYUI}},
            "version": 0.4,
        }


def display_name(node_type: str, decl: dict) -> str:
    pack = load_pack()
    return pack.NODE_DISPLAY_NAME_MAPPINGS.get(node_type) or decl.get("display_name") or node_type


def _models_property(n: Node):
    for key, info in QWEN_MODELS.items():
        if info["name"] in n.values.values():
            return [info]
    return None


# ------------------------------------------------------------------------------ the four graphs
def _front(g: Graph, know3d_ckpt: str):
    """Load Know3D Model + the front image -> (know3d_model, condition, front IMAGE)."""
    model = g.add("Know3DLoadModel", trellis2=TRELLIS_FOLDER, shape_vae="(from the TRELLIS.2 folder)",
                  dinov3="(from the TRELLIS.2 folder)", know3d_checkpoint=know3d_ckpt, dtype="auto")
    image = g.add("LoadImage", title="Front image (RGBA, transparent background)", image=FRONT_IMAGE)
    mask = g.add("InvertMask", title="Alpha -> object mask", mask=image[1])
    cond = g.add("Know3DImageCondition", know3d_model=model[0], image=image[0], mask=mask[0])
    return model, cond, cond[1]


def _qwen(g: Graph, lora: bool):
    """Qwen-Image-Edit-2511 as the official ComfyUI graph loads it (+ the back-view LoRA)."""
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


def _back_view(g: Graph, model, clip, vae, front, description, negative=None, stop_at_sigma=0.0, seed=0):
    prompt = g.add("Know3DBackViewPrompt", description=description)
    pos = _encode(g, clip, vae, front, prompt[0], "Back-view prompt + front image")
    if negative is None:
        negative = _encode(g, clip, vae, front, "", "Negative (empty) + front image")
    scaled = g.add("FluxKontextImageScale", image=front)
    latent = g.add("VAEEncode", pixels=scaled[0], vae=vae[0])
    sample = g.add("Know3DBackViewSample", model=model[0], positive=pos[0], negative=negative[0], latent_image=latent[0],
                   seed=seed, steps=40, cfg=4.0, sampler_name="euler", scheduler="simple", stop_at_sigma=stop_at_sigma)
    return sample, negative


def _geometry(g: Graph, model, cond, knowledge=None, prefix="know3d/mesh", seed=0):
    extra = {"knowledge": knowledge} if knowledge is not None else {}
    structure = g.add("Know3DSparseStructure", know3d_model=model[0], condition=cond[0], seed=seed, **extra)
    geometry = g.add("Know3DGeometry", know3d_model=model[0], structure=structure[0], condition=cond[0],
                     resolution="1024_cascade", seed=seed, **extra)
    save = g.add("Know3DSaveMesh", mesh=geometry[0], filename_prefix=prefix, format="glb")
    g.add("Preview3D", model_file=save[0])
    normals = g.add("Know3DRenderNormals", mesh=geometry[0], resolution=512)
    return geometry, normals


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
    back = g.add("VAEDecode", title="The imagined back view", samples=sample[0], vae=vae[0])
    g.add("PreviewImage", images=back[0])
    knowledge = g.add("Know3DExtractHiddenStates", model=qwen[0], trajectory=sample[1], sigma=0.0, layers="auto",
                      know3d_model=model[0])
    _, normals = _geometry(g, model, cond, knowledge[0], "know3d/full")
    g.add("PreviewImage", title="Normals: front, back, left, right", images=normals[0])
    return g


def build_multiview(decl) -> Graph:
    g = Graph("know3d_multiview_public", decl)
    g.note("# Back view as a second view (public weights only)\n\nQwen-Image-Edit-2511 turns the camera "
           "around; the generated back image becomes TRELLIS.2's second image condition. No Know3D "
           "weights.\n\n" + NOTE_MODELS + NOTE_QWEN + NOTE_IMAGE)
    model, cond, front = _front(g, "none")
    qwen, clip, vae = _qwen(g, lora=False)
    sample, _ = _back_view(g, qwen, clip, vae, front, "")
    back = g.add("VAEDecode", title="Generated back view", samples=sample[0], vae=vae[0])
    g.add("PreviewImage", images=back[0])
    knowledge = g.add("Know3DBackViewAsSecondView", back_image=back[0], mode="stochastic")
    _, normals = _geometry(g, model, cond, knowledge[0], "know3d/multiview")
    g.add("PreviewImage", title="Normals: front, back, left, right", images=normals[0])
    return g


def build_baseline(decl) -> Graph:
    g = Graph("trellis2_baseline", decl)
    g.note("# Plain TRELLIS.2 (baseline)\n\nThe same stages with no knowledge about the back.\n\n"
           + NOTE_MODELS + NOTE_IMAGE)
    model, cond, _ = _front(g, "none")
    _, normals = _geometry(g, model, cond, None, "know3d/baseline")
    g.add("PreviewImage", title="Normals: front, back, left, right", images=normals[0])
    return g


COMPARE_DESCRIPTIONS = (
    "a hollow backrest with three vertical slats",
    "a solid backrest with a rounded top",
    "a backrest made of two horizontal bars",
)


def build_compare(decl) -> Graph:
    g = Graph("know3d_compare_backs", decl)
    g.note("# One front image, three backs\n\nEach description gives its own back view, knowledge and mesh; "
           "the normal renders are stitched side by side (one image per view: front, back, left, right).\n\n"
           + NOTE_MODELS + NOTE_QWEN + NOTE_KNOW3D + NOTE_IMAGE)
    model, cond, front = _front(g, KNOW3D_CKPT)
    qwen, clip, vae = _qwen(g, lora=True)
    negative, renders = None, []
    for i, text in enumerate(COMPARE_DESCRIPTIONS):
        sample, negative = _back_view(g, qwen, clip, vae, front, text, negative=negative, stop_at_sigma=0.25)
        knowledge = g.add("Know3DExtractHiddenStates", model=qwen[0], trajectory=sample[1], sigma=0.0,
                          layers="auto", know3d_model=model[0])
        _, normals = _geometry(g, model, cond, knowledge[0], f"know3d/compare_{i + 1}")
        renders.append(normals)
    row = g.add("ImageStitch", image1=renders[0][0], image2=renders[1][0], direction="right")
    row = g.add("ImageStitch", image1=row[0], image2=renders[2][0], direction="right")
    g.add("PreviewImage", title="Normals side by side (descriptions 1 | 2 | 3)", images=row[0])
    return g


BUILDERS = {
    "know3d_full": build_full,
    "know3d_multiview_public": build_multiview,
    "trellis2_baseline": build_baseline,
    "know3d_compare_backs": build_compare,
}


def build_all() -> dict[str, tuple[dict, dict]]:
    decl = declarations()
    return {name: (b(decl).to_ui(), b(decl).to_api()) for name, b in BUILDERS.items()}


def dump(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def main() -> None:
    os.makedirs(os.path.join(HERE, "api"), exist_ok=True)
    for name, (ui, api) in build_all().items():
        with open(os.path.join(HERE, f"{name}.json"), "w", encoding="utf-8") as f:
            f.write(dump(ui))
        with open(os.path.join(HERE, "api", f"{name}.json"), "w", encoding="utf-8") as f:
            f.write(dump(api))
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
