"""benchmarks/bench_comfy_small_cards.py (issue 22, part 3): the know3d_full graph's nodes under ComfyUI's
model management in-process. The graph test runs the script's tiny CPU path with COMFYUI_PYTHON from the
minimum copy of ComfyUI that travels to the GPU machine (``--make-min``), and skips without a ComfyUI
(see docs/testing.md); the PyAV stand-in is checked without one."""
import importlib
import json
import os
import subprocess
import sys

import pytest

from _comfy_server import COMFYUI_DIR, COMFYUI_PYTHON, skip_reason
from _nodes_helpers import ROOT
from know3d_core import plan

SCRIPT = os.path.join(ROOT, "benchmarks", "bench_comfy_small_cards.py")
# know3d_full.json's nodes that run (Load*, Save and Preview nodes aside), in the graph's order.
GRAPH = [("5", "Know3DImageCondition"), ("7", "ModelSamplingAuraFlow"), ("8", "CFGNorm"),
         ("9", "Know3DLoadQwenEditLoRA"), ("12", "Know3DBackViewPrompt"), ("13", "TextEncodeQwenImageEditPlus"),
         ("14", "FluxKontextMultiReferenceLatentMethod"), ("15", "TextEncodeQwenImageEditPlus"),
         ("16", "FluxKontextMultiReferenceLatentMethod"), ("17", "FluxKontextImageScale"), ("18", "VAEEncode"),
         ("19", "Know3DBackViewSample"), ("20", "VAEDecode"), ("22", "Know3DExtractHiddenStates"),
         ("23", "Know3DSparseStructure"), ("24", "Know3DGeometry")]
STAGE_LINES = {"5": ["DINOv3 conditioning"], "19": ["back-view sampling"], "22": ["hidden-state capture"],
               "23": ["sparse structure"], "24": ["geometry 1024_cascade", "shape decode"]}


def test_graph_ids_are_those_of_the_example_workflow():
    with open(os.path.join(ROOT, "example_workflows_api", "know3d_full.json"), encoding="utf-8") as f:
        api = json.load(f)
    assert all(api[node]["class_type"] == cls for node, cls in GRAPH)


def test_pyav_stand_in_answers_comfy_api_imports_and_refuses_use():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    bench = importlib.import_module("bench_comfy_small_cards")
    finder = bench._AbsentVideoLibrary()
    sys.meta_path.insert(0, finder)
    try:
        # what comfy_api.latest's video types import and read at import time
        from av.container import InputContainer  # noqa: F401
        from av.subtitles.stream import SubtitleStream  # noqa: F401
        from av.video.reformatter import ColorPrimaries, ColorTrc

        names = {ColorTrc.BT709: "sRGB", ColorTrc.SMPTE2084: "HDR PQ"}
        assert names[ColorTrc.BT709] == "sRGB" and ColorTrc.SMPTE2084 is not ColorTrc.BT709
        assert ColorPrimaries.BT709 is ColorPrimaries.BT709
        import av

        with pytest.raises(ImportError, match="PyAV is not installed"):
            av.open("clip.mp4")
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "av" or n.startswith("av.")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if skip_reason():
        pytest.skip(skip_reason())
    work = tmp_path_factory.mktemp("comfy_cards")
    site = subprocess.run([COMFYUI_PYTHON, "-c", "import comfy_kitchen, os; print(os.path.dirname(os.path.dirname("
                           "comfy_kitchen.__file__)))"], capture_output=True, text=True, check=True).stdout.strip()
    minimum = work / "min"
    made = subprocess.run([COMFYUI_PYTHON, SCRIPT, "--comfyui", COMFYUI_DIR, "--make-min", str(minimum), "--site", site],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(minimum / "site"))
    out = work / "result.json"
    proc = subprocess.run([COMFYUI_PYTHON, SCRIPT, "--comfyui", str(minimum / "ComfyUI"), "--tiny", "--vae-oom-once",
                           "--out", str(out)],
                          cwd=str(work), env=env, capture_output=True, text=True, timeout=600)
    if not out.exists():
        pytest.fail(f"bench_comfy_small_cards.py --tiny wrote nothing ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    return json.loads(out.read_text()), json.loads(made.stdout.strip().splitlines()[-1]), minimum, proc


@pytest.mark.comfyui
def test_minimum_copy_is_small_and_is_what_runs(tiny_run):
    result, sizes, minimum, _proc = tiny_run
    assert float(sizes["ComfyUI"].split()[0]) < 16 and float(sizes["site"].split()[0]) < 4, sizes
    assert result["comfy"]["comfy_dir"] == str(minimum / "ComfyUI")
    for name, path in result["comfy"]["packages"].items():
        assert path.startswith(str(minimum / "site")), (name, path)
    assert not any(f.endswith(".so") for _b, _d, files in os.walk(minimum / "site" / "comfy_kitchen") for f in files)


@pytest.mark.comfyui
def test_know3d_full_nodes_run_under_comfy_model_management(tiny_run):
    result, _sizes, _minimum, proc = tiny_run
    assert result["ok"], f"{result['error']}\n{proc.stderr[-4000:]}"
    rows = result["rows"]
    assert [(r["node"], r["class_type"]) for r in rows] == GRAPH
    assert all(r["ok"] for r in rows)
    for node, stages in STAGE_LINES.items():
        lines = next(r for r in rows if r["node"] == node)["know3d_log"]
        assert [any(line.startswith(f"Know3D {s}: ") for line in lines) for s in stages] == [True] * len(stages), lines
    loaded = {r["node"]: {m["model"] for m in r["loaded_after"]} for r in rows}
    # core's loaders made ModelPatchers ComfyUI loads; ours are loaded beside them by load_models_gpu
    assert {"QwenImageTEModel_", "WanVAE"} <= loaded["13"] and "QwenImage" in loaded["19"]
    assert {"DINOv3ViTModel"} <= loaded["5"] and {"SparseStructureFlowModel", "SparseStructureDecoder"} <= loaded["23"]
    assert {"SLatFlowModel", "FlexiDualGridVaeDecoder"} <= loaded["24"]
    capture = next(r for r in rows if r["node"] == "22")
    layers = result["build"]["capture_layers"]
    assert capture["knowledge_shape"] == [1, 64 * 64, 32 * len(layers)]  # 1 MP back view: 64 x 64 tokens of width 32
    assert next(r for r in rows if r["node"] == "24")["faces"] > 0


@pytest.mark.comfyui
def test_our_stages_ask_comfy_to_keep_their_working_memory_free(tiny_run):
    """The H100's 24 GB run (ComfyUI 0.33.0): our nodes loaded their networks with no working memory asked
    for, so ComfyUI left 11 GiB of the Qwen MMDiT on the card and the 1024 decode ran out of memory. Each
    stage now asks ``load_models_gpu`` for its working memory (plan's per-token figures), for which ComfyUI
    evicts other models, and the decode asks again for its real token count."""
    result, _sizes, _minimum, proc = tiny_run
    assert result["ok"], f"{result['error']}\n{proc.stderr[-4000:]}"
    loads = {r["node"]: r["loads"] for r in result["rows"]}
    structure = [c for c in loads["23"] if "SparseStructureFlowModel" in c["models"]]
    assert [c["memory_required"] for c in structure] == [plan.SS_WORKING_BYTES]
    flows, decode = [c for c in loads["24"] if "SLatFlowModel" in c["models"]], loads["24"][-1]
    bound, rest = divmod(flows[0]["memory_required"], plan.FLOW_WORKING_BYTES_PER_TOKEN)
    assert len(flows) == 1 and rest == 0 and bound > 0 and bound % 8 == 0  # 1024 cascade: 8 cells a structure voxel
    assert decode["models"] == ["FlexiDualGridVaeDecoder"]
    tokens, rest = divmod(decode["memory_required"], plan.DECODER_WORKING_BYTES_PER_TOKEN)
    assert rest == 0 and 0 < tokens <= bound  # the latent decoded is within the bound asked for before sampling


def test_working_memory_covers_the_measured_peaks():
    """The per-token figures against the H100 peaks they come from (plan.py's comment): each estimate is
    above its measurement by less than half."""
    for tokens, measured_gib in ((8128, 1.19), (20336, 2.96)):  # shape decoder -> 512 / -> 1024
        assert 1.0 < plan.decoder_working_bytes(tokens) / (measured_gib * 2 ** 30) < 1.5
    assert 1.0 < plan.flow_working_bytes(9600) / (1.6 * 2 ** 30) < 1.5  # shape flow 1024, CFG pair
    assert plan.SS_WORKING_BYTES > 1.1 * 2 ** 30
    # texture: two decoders side by side outweigh the flow (2 x 192 > 224 KiB a token)
    assert plan.texture_working_bytes(20336) == 2 * plan.decoder_working_bytes(20336) > plan.flow_working_bytes(20336)
    assert plan.geometry_token_bound("512", 3000) == 3000 == plan.geometry_token_bound("1024", 3000)
    # 1024 cascade: grid 32 -> 64, each structure voxel at most 2^3 second-stage tokens, never lowered
    assert plan.geometry_token_bound("1024_cascade", 3000, 20000) == 24000
    # 1536 cascade: 27 cells each (grid 96) unless lowered under the budget, at worst down to 1024's 8
    assert plan.geometry_token_bound("1536_cascade", 1000) == 27000
    assert plan.geometry_token_bound("1536_cascade", 3000, 49152) == 49151
    assert plan.geometry_token_bound("1536_cascade", 7000, 49152) == 56000


@pytest.mark.comfyui
def test_vae_decode_falls_back_to_tiled_inside_the_executors_inference_mode(tiny_run):
    """The H100's 24 GB run: the regular VAE decode ran out of memory and core's tiled fallback (made under
    its own inference mode) failed its in-place update outside the executor's; the harness now runs the
    nodes as ComfyUI's executor does, and the simulated out-of-memory takes the same fallback."""
    result, _sizes, _minimum, proc = tiny_run
    assert result["vae_oom_simulated"] and result["executor"]["inference_mode"]
    assert "retrying with tiled VAE decoding" in proc.stderr + proc.stdout
    assert next(r for r in result["rows"] if r["node"] == "20")["ok"]
