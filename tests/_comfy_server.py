"""A real ComfyUI server for the integration tests (CPU, loopback only, bounded waits, killed by PID).

``COMFYUI_DIR`` (a ComfyUI checkout) and ``COMFYUI_PYTHON`` (the python of a venv that runs it, with
this pack's requirements installed) come from the environment; docs/testing.md says how to set them
up. The server gets a temporary base directory whose ``custom_nodes`` links to this pack and to a
test-only pack (tests/data/comfyui/know3d_test_nodes) that stands in for the full-size Qwen-Image
loaders; tiny checkpoints are written into its ``models`` at start.
"""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import pytest

from _nodes_helpers import ROOT

COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", "")
START_TIMEOUT_S = 120
PROMPT_TIMEOUT_S = 300


def _skip_reason():
    if not COMFYUI_DIR or not os.path.isfile(os.path.join(COMFYUI_DIR, "main.py")):
        return ("COMFYUI_DIR is unset or has no main.py: set it to a ComfyUI checkout "
                "(see docs/testing.md)")
    if not COMFYUI_PYTHON or not os.path.isfile(COMFYUI_PYTHON):
        return ("COMFYUI_PYTHON is unset or missing: set it to the python of ComfyUI's venv "
                "(see docs/testing.md)")
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


def skip_reason():
    return _skip_reason()


def running_server(tmp_path_factory, prepare=None):
    """Generator for a module fixture: skip without ComfyUI, else start a server on a fresh base
    folder (``prepare(base)`` runs after the tiny models are written), yield it, stop it."""
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
    if prepare is not None:
        prepare(base)
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


