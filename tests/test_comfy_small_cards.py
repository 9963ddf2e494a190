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
def test_vae_decode_falls_back_to_tiled_inside_the_executors_inference_mode(tiny_run):
    """The H100's 24 GB run: the regular VAE decode ran out of memory and core's tiled fallback (made under
    its own inference mode) failed its in-place update outside the executor's; the harness now runs the
    nodes as ComfyUI's executor does, and the simulated out-of-memory takes the same fallback."""
    result, _sizes, _minimum, proc = tiny_run
    assert result["vae_oom_simulated"] and result["executor"]["inference_mode"]
    assert "retrying with tiled VAE decoding" in proc.stderr + proc.stdout
    assert next(r for r in result["rows"] if r["node"] == "20")["ok"]
