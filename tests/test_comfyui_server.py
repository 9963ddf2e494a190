"""Integration test against a real ComfyUI server (CPU, loopback only, bounded time).

Needs ``COMFYUI_DIR`` (a ComfyUI checkout) and ``COMFYUI_PYTHON`` (the python of a venv that runs
it, with this pack's requirements installed); see ../shared/COMFYUI.md. Without them the test is
skipped with the reason. The server gets a temporary base directory whose ``custom_nodes`` links
to this pack and to a test-only pack (tests/data/comfyui/know3d_test_nodes) that stands in for the
full-size Qwen-Image loaders; tiny checkpoints are written into its ``models`` at test time.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from _nodes_helpers import ROOT, load_pack

pytestmark = pytest.mark.comfyui

COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", "")
START_TIMEOUT_S = 120
PROMPT_TIMEOUT_S = 300


def _skip_reason():
    if not COMFYUI_DIR or not os.path.isfile(os.path.join(COMFYUI_DIR, "main.py")):
        return ("COMFYUI_DIR is unset or has no main.py: set it to a ComfyUI checkout "
                "(see ../shared/COMFYUI.md)")
    if not COMFYUI_PYTHON or not os.path.isfile(COMFYUI_PYTHON):
        return ("COMFYUI_PYTHON is unset or missing: set it to the python of ComfyUI's venv "
                "(see ../shared/COMFYUI.md)")
    return None


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base, port, proc, log_path):
        self.base, self.port, self.proc, self.log_path = base, port, proc, log_path
        self.url = f"http://127.0.0.1:{port}"

    def log_tail(self, n=200):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "<no log>"

    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def post(self, path, payload, timeout=30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode() or "{}")

    def fail(self, message):
        pytest.fail(f"{message}\n----- ComfyUI log (tail) -----\n{self.log_tail()}", pytrace=False)

    def run_prompt(self, prompt, timeout=PROMPT_TIMEOUT_S):
        """Queue an API-format prompt, wait (bounded) for it, return its history entry."""
        prompt_id = str(uuid.uuid4())
        status, reply = self.post("/prompt", {"prompt": prompt, "prompt_id": prompt_id, "client_id": "know3d-test"})
        if status != 200:
            self.fail(f"/prompt refused the graph (HTTP {status}): {json.dumps(reply, indent=1)[:4000]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"ComfyUI exited with {self.proc.returncode} while running the prompt")
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                if entry["status"].get("status_str") != "success":
                    self.fail(f"prompt failed: {json.dumps(entry['status'], indent=1)[:6000]}")
                return entry
            time.sleep(0.5)
        self.post("/interrupt", {})
        self.fail(f"prompt did not finish within {timeout} s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("comfy_base")
    nodes_dir = base / "custom_nodes"
    nodes_dir.mkdir()
    os.symlink(ROOT, nodes_dir / "ComfyUI-Know3D")
    os.symlink(os.path.join(ROOT, "tests", "data", "comfyui", "know3d_test_nodes"), nodes_dir / "know3d_test_nodes")
    for sub in ("input", "output", "models"):
        (base / sub).mkdir()
    write_tiny_models(base)
    port = _free_port()
    log_path = base / "server.log"
    cmd = [COMFYUI_PYTHON, os.path.join(COMFYUI_DIR, "main.py"), "--cpu", "--listen", "127.0.0.1",
           "--port", str(port), "--disable-auto-launch", "--base-directory", str(base),
           "--database-url", "sqlite:///:memory:", "--disable-api-nodes"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=str(base), stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
    srv = Server(base, port, proc, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                srv.fail(f"ComfyUI exited with {proc.returncode} during start-up")
            try:
                stats = srv.get("/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                if time.monotonic() > deadline:
                    srv.fail(f"ComfyUI did not answer /system_stats within {START_TIMEOUT_S} s")
                time.sleep(0.5)
        print(f"ComfyUI {stats.get('system', {}).get('comfyui_version')} up on port {port}")
        yield srv
    finally:
        srv.stop()


def write_tiny_models(base):
    """Tiny checkpoints in the folders users put the real ones in (filled in as stages land)."""
    from _nodes_server_models import write_all

    write_all(str(base))


def test_object_info_lists_every_node_with_our_declarations(server):
    info = server.get("/object_info", timeout=120)
    pack = load_pack()
    missing = sorted(set(pack.NODE_CLASS_MAPPINGS) - set(info))
    if missing:
        server.fail(f"/object_info lacks {missing}")
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        got = info[node_id]
        assert got["output"] == list(cls.RETURN_TYPES), node_id
        assert got["output_name"] == list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)), node_id
        assert got["display_name"] == pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert got["description"] == cls.DESCRIPTION
        assert set(got["input"]["required"]) == set(cls.INPUT_TYPES()["required"]), node_id
        assert got["python_module"].startswith("custom_nodes.ComfyUI-Know3D"), got["python_module"]
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
}


def tiny_host_graph(prompt):
    """The API workflow with core's full-size Qwen loaders swapped for the test pack's tiny ones
    (same socket types: MODEL, VAE, CONDITIONING) and the ~1 MP Kontext image scale swapped for a
    128 px core ImageScale (CPU time); every other node is left as it is."""
    p = json.loads(json.dumps(prompt))
    unets = [k for k, v in p.items() if v["class_type"] == "UNETLoader"]
    vaes = [k for k, v in p.items() if v["class_type"] == "VAELoader"]
    assert len(unets) == 1 and len(vaes) == 1
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


def load_workflow(name):
    with open(os.path.join(ROOT, "workflows", "api", f"{name}.json"), encoding="utf-8") as f:
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


@pytest.mark.parametrize("workflow", ["know3d_multiview_public", "know3d_full"])
def test_workflow_runs_to_a_mesh_on_disk(server, workflow):
    prompt = tiny_host_graph(load_workflow(workflow))
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
    if workflow == "know3d_full":
        assert "Know3D hidden-state capture" in log or "hidden-state capture" in log, "capture stage not logged"
