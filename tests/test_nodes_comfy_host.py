"""The Qwen-side nodes on real ComfyUI classes, in-process (LoRA patching, sampling with a
trajectory, early exit, hidden-state capture). ComfyUI cannot be installed in CI, so this runs
tests/data/comfyui/host_checks.py with COMFYUI_PYTHON next to COMFYUI_DIR and skips without them
(see docs/testing.md)."""
import json
import os
import subprocess

import pytest

from _comfy_server import COMFYUI_DIR, COMFYUI_PYTHON, skip_reason
from _nodes_helpers import ROOT

pytestmark = pytest.mark.comfyui

CHECKS = ["lora_adds_strength_scaled_delta_on_a_clone", "lora_for_another_architecture_is_a_clear_error",
          "missing_lora_file_names_file_folder_and_source", "back_view_sample_equals_core_ksampler_and_records_every_step",
          "early_exit_records_the_same_latent_as_the_full_run",
          "hidden_states_are_the_cond_target_tokens_of_the_chosen_blocks",
          "cond_rows_under_batched_cfg_equal_the_cond_only_capture", "back_view_sample_progress_per_step_and_cancel",
          "trellis_stages_progress_per_step_and_cancel"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if skip_reason():
        pytest.skip(skip_reason())
    work = tmp_path_factory.mktemp("host")
    out = work / "results.json"
    script = os.path.join(ROOT, "tests", "data", "comfyui", "host_checks.py")
    proc = subprocess.run([COMFYUI_PYTHON, script, COMFYUI_DIR, ROOT, str(work), str(out)], cwd=str(work),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"host_checks.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", CHECKS)
def test_host_check(results, name):
    assert name in results, sorted(results)
    print(name, "->", results[name]["detail"].splitlines()[-1] if results[name]["detail"] else "")
    assert results[name]["ok"], results[name]["detail"]
