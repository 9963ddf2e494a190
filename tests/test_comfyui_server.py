"""Integration test against a real ComfyUI server (CPU, loopback only, bounded time).

Needs ``COMFYUI_DIR`` and ``COMFYUI_PYTHON`` (see docs/testing.md); skipped with the reason without
them. The server and its tiny checkpoints: tests/_comfy_server.py.
"""
import json
import os
import time

import pytest

from _comfy_server import running_server
from _nodes_helpers import ROOT, load_pack
from know3d_core import plan

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory)


# Combos whose options the host lists (model folders, core samplers): outside ComfyUI they are empty
# or a placeholder, so only their options differ between the two.
HOST_LISTED = {"Know3DLoadModel": {"trellis2", "shape_vae", "dinov3", "know3d_checkpoint", "texture"},
               "Know3DLoadQwenEditLoRA": {"lora_name"}, "Know3DBackViewSample": {"sampler_name", "scheduler"}}


def _without_host_lists(node_id, info):
    info = json.loads(json.dumps(info))
    info.pop("python_module")
    for section in info["input"].values():
        for name in HOST_LISTED.get(node_id, ()):
            if name in section:
                section[name][1].pop("options")
    return info


def test_object_info_equals_the_hostless_schema(server):
    """The real V3 API and the hostless stand-in (nodes/_io_hostless.py) give each node the same
    /object_info entry: types, input order, defaults, ranges, tooltips, outputs, names."""
    info = server.get("/object_info", timeout=120)
    pack = load_pack()
    missing = sorted(set(pack.NODE_CLASS_MAPPINGS) - set(info))
    if missing:
        server.fail(f"/object_info lacks {missing}")
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        got = info[node_id]
        assert got["python_module"].startswith("custom_nodes.ComfyUI-Know3D"), got["python_module"]
        assert _without_host_lists(node_id, got) == _without_host_lists(node_id, cls.GET_NODE_INFO_V1()), node_id
        assert got["display_name"] == pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]
    lora = info["Know3DLoadQwenEditLoRA"]["input"]["required"]["lora_name"][1]["options"]
    assert "know3d_backview_lora.safetensors" in lora  # the host lists the model folder
    assert "Know3DTestTinyQwen" in info
    log = server.log_tail(100_000)
    bad = [l for l in log.splitlines() if ("IMPORT FAILED" in l and ("Know3D" in l or "know3d" in l))
           or "node family" in l]
    assert not bad, bad


# ------------------------------------------------------------------------------ workflows on tiny models
FAST = {  # keep a CPU run short; everything else is the workflow's own setting
    "Know3DBackViewSample": {"steps": 3},
    "Know3DSparseStructure": {"steps": 2},
    "Know3DGeometry": {"steps": 2, "resolution": "512"},
    "Know3DRenderNormals": {"resolution": 64},
    "Know3DLoadModel": {"dtype": "float32"},
    "Know3DTexture": {"steps": 2, "texture_size": 128, "face_budget": 5000},
    "KSampler": {"steps": 2},  # core TRELLIS.2's texture flow (know3d_core_textured)
    "DecimateMesh": {"target_face_count": 5000},
    "UnwrapMesh": {"resolution": 256},
    "BakeTextureFromVoxel": {"texture_size": 128},
}
# Comfy-Org's TRELLIS.2 files (tests/_nodes_server_models.py writes the demo networks under these names):
# core's loaders build full-size networks, so the test pack's stand-ins load them (same outputs).
TRELLIS_FILES = {name for name, _, _ in {**plan.COMFY_FILES, **plan.COMFY_TEXTURE_FILES}.values()}
TRELLIS_LOADERS = {"UNETLoader": ("unet_name", "Know3DTestTinyTrellis2"),
                   "VAELoader": ("vae_name", "Know3DTestTinyTrellis2VAE"),
                   "CLIPVisionLoader": ("clip_name", "Know3DTestTinyDINOv3")}


def tiny_host_graph(prompt):
    """The API workflow with core's full-size Qwen and TRELLIS.2 loaders swapped for the test pack's
    tiny ones (same socket types: MODEL, VAE, CLIP_VISION, CONDITIONING) and the ~1 MP Kontext image
    scale swapped for a 128 px core ImageScale (CPU time); every other node is left as it is."""
    p = json.loads(json.dumps(prompt))
    for k, v in p.items():
        name_input, stand_in = TRELLIS_LOADERS.get(v["class_type"], (None, None))
        if name_input and v["inputs"][name_input] in TRELLIS_FILES:
            p[k] = {"class_type": stand_in, "inputs": {name_input: v["inputs"][name_input]}}
    unets = [k for k, v in p.items() if v["class_type"] == "UNETLoader"]
    vaes = [k for k, v in p.items() if v["class_type"] == "VAELoader"]
    assert len(unets) == len(vaes) <= 1  # the baseline has no Qwen side
    if unets:
        p[unets[0]] = {"class_type": "Know3DTestTinyQwen", "inputs": {"seed": 0}}
        for node in p.values():
            for name, v in node["inputs"].items():
                if isinstance(v, list) and v[0] == vaes[0]:
                    node["inputs"][name] = [unets[0], 1]
        del p[vaes[0]]
    for k, v in list(p.items()):
        if v["class_type"] == "CLIPLoader":
            del p[k]
        elif v["class_type"] == "TextEncodeQwenImageEditPlus":
            i = v["inputs"]
            p[k] = {"class_type": "Know3DTestTinyQwenEncode",
                    "inputs": {"vae": i["vae"], "image": i["image1"], "prompt": i["prompt"]}}
        elif v["class_type"] == "FluxKontextImageScale":
            p[k] = {"class_type": "ImageScale", "inputs": {"image": v["inputs"]["image"], "upscale_method": "area",
                                                           "width": 128, "height": 128, "crop": "center"}}
    for v in p.values():
        v["inputs"].update(FAST.get(v["class_type"], {}))
    return p


API_DIR = os.path.join(ROOT, "example_workflows_api")
# The API twins as saved before the nodes moved to the V3 schema (same node ids, same inputs).
API_DIR_BEFORE_V3 = os.path.join(ROOT, "tests", "data", "workflows_before_v3", "api")


def load_workflow(name, folder=API_DIR):
    with open(os.path.join(folder, f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def saved_meshes(server, entry, prompt):
    import trimesh

    files = []
    for nid, out in entry["outputs"].items():
        if prompt[nid]["class_type"] == "Know3DSaveMesh":
            for item in out["3d"]:
                path = os.path.join(server.base, "output", item["subfolder"], item["filename"])
                mesh = trimesh.load(path, file_type=os.path.splitext(path)[1][1:], force="mesh", process=False)
                files.append((path, len(mesh.vertices), len(mesh.faces)))
    return files


def assert_textured_glb(path, size):
    """The GLB holds one UV-mapped mesh with a glTF PBR material: base colour and metallic-roughness
    maps of ``size``² (Know3D Texture, or core's bake nodes -> Save Mesh)."""
    import trimesh

    [mesh] = trimesh.load(path, file_type="glb", process=False).geometry.values()
    assert mesh.visual.kind == "texture" and len(mesh.visual.uv) == len(mesh.vertices), path
    material = mesh.visual.material
    assert material.baseColorTexture.size == (size, size), path
    assert material.metallicRoughnessTexture.size == (size, size), path


def assert_vertex_coloured_glb(path):
    """The GLB holds one mesh with a colour per vertex, not all the same (core Paint Mesh -> Save Mesh)."""
    import numpy as np
    import trimesh

    [mesh] = trimesh.load(path, file_type="glb", process=False).geometry.values()
    assert mesh.visual.kind == "vertex", path
    colours = np.asarray(mesh.visual.vertex_colors)[:, :3]
    assert len(colours) == len(mesh.vertices) and len(np.unique(colours, axis=0)) > 1, path


@pytest.mark.parametrize("workflow,folder", [("know3d_multiview_public", API_DIR), ("know3d_full", API_DIR),
                                             ("trellis2_baseline", API_DIR_BEFORE_V3),
                                             ("know3d_full", API_DIR_BEFORE_V3), ("know3d_textured", API_DIR),
                                             ("know3d_core_textured", API_DIR)],
                         ids=["multiview_public", "full", "baseline_before_v3", "full_before_v3", "textured",
                              "core_textured"])
def test_workflow_runs_to_a_mesh_on_disk(server, workflow, folder):
    prompt = tiny_host_graph(load_workflow(workflow, folder))
    t0 = time.monotonic()
    entry = server.run_prompt(prompt)
    meshes = saved_meshes(server, entry, prompt)
    if not meshes or any(faces == 0 for _, _, faces in meshes):
        server.fail(f"{workflow}: no non-empty mesh saved: {meshes}")
    previews = [out for nid, out in entry["outputs"].items() if prompt[nid]["class_type"] == "Preview3D"]
    assert previews and previews[0]["result"][0].endswith(".glb")
    for path, nv, nf in meshes:
        print(f"{workflow}: {os.path.relpath(path, server.base)}: {nv} vertices, {nf} faces "
              f"({time.monotonic() - t0:.1f} s)")
    log = server.log_tail(100_000)
    print("\n".join(l for l in log.splitlines() if "Know3D" in l and " s" in l)[-3000:])
    if workflow == "know3d_textured":
        assert_textured_glb(meshes[0][0], FAST["Know3DTexture"]["texture_size"])
    if workflow == "know3d_core_textured":  # core's texture stage and bake nodes on Know3D's mesh
        by_prefix = {os.path.basename(path).rsplit("_", 2)[0]: path for path, _, _ in meshes}
        assert_textured_glb(by_prefix["core_textured"], FAST["BakeTextureFromVoxel"]["texture_size"])
        assert_vertex_coloured_glb(by_prefix["core_painted"])
    if workflow == "know3d_full":
        assert "Know3D hidden-state capture" in log or "hidden-state capture" in log, "capture stage not logged"
