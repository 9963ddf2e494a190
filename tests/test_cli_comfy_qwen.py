"""``know3d generate`` with ComfyUI's Qwen files (``--qwen-transformer``, ``--qwen-text-encoder``) under a
``--vram`` plan, on the demo's tiny real networks: the --qwen folder keeps only configs, VAE, scheduler
and processor; the MMDiT comes from an fp8mixed file, the text encoder from a scaled-fp8 file."""
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from know3d_core import cli
from know3d_core.generate.commands import load_pipeline
from know3d_core.plan import COMFY_INDEX_TIMESTEP_ZERO

from test_cli_models import _complete
from test_mmdit_comfy_files import _comfy_sd, _comfy_te_names

pytestmark = pytest.mark.slow


def _to_comfy_files(qwen, tmp_path):
    """Move the folder's MMDiT and text-encoder weights into ComfyUI single files (their configs stay)."""
    t_path = os.path.join(qwen, "transformer", "diffusion_pytorch_model.safetensors")
    sd = _comfy_sd(load_file(t_path), "fp8mixed")
    sd[COMFY_INDEX_TIMESTEP_ZERO] = torch.tensor([])
    transformer = str(tmp_path / "qwen_image_edit_2511_fp8mixed.safetensors")
    save_file(sd, transformer)
    te_path = os.path.join(qwen, "text_encoder", "model.safetensors")
    te_sd = {k: v for k, v in load_file(te_path).items() if k != "lm_head.weight"}
    text_encoder = str(tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors")
    save_file(_comfy_sd(_comfy_te_names(te_sd), "scaled_fp8"), text_encoder)
    os.remove(t_path)
    os.remove(te_path)
    return transformer, text_encoder


def test_generate_with_comfy_qwen_files_under_a_vram_plan(tmp_path, capsys):
    models, qwen = _complete(tmp_path / "m")
    transformer, text_encoder = _to_comfy_files(qwen, tmp_path)
    front = tmp_path / "front.png"
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    im.paste(Image.new("RGBA", (32, 40), (200, 50, 50, 255)), (16, 12))
    im.save(front)

    def factory(opts, check):  # the demo's small VAE copy of the front image (no CLI option)
        opts.vae_image_area = 128 * 128
        return load_pipeline(opts, check)

    out = tmp_path / "out"
    argv = ["generate", "--models", models, "--qwen", qwen, "--qwen-transformer", transformer,
            "--qwen-text-encoder", text_encoder, "--vram", "16", "--image", str(front), "--prompt", "three slats",
            "--out", str(out), "--device", "cpu", "--dtype", "float32", "--resolution", "512", "--steps", "2",
            "--back-steps", "2", "--back-size", "128x128", "--floaters", "0", "--normals-size", "32", "--pin-host"]
    code = cli.main(argv, pipeline_factory=factory)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert "memory plan fp8_blocks" in err and "transformer fp8, block_level; text_encoder fp8, model" in err
    with open(out / "record.json", encoding="utf-8") as f:
        rec = json.load(f)
    assert rec["models"]["qwen_transformer"] == transformer and rec["models"]["qwen_text_encoder"] == text_encoder
    assert rec["memory_plan"]["name"] == "fp8_blocks" and rec["knowledge"]["kind"] == "mmdit_hidden"
    assert rec["inputs"]["pin_host"] is True  # the real loader takes it (on the CPU nothing is pinned)
