"""Loading a diffusers-format Qwen-Image-Edit folder, and the headless back view end to end."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from know3d_core.mmdit import CaptureSpec, back_view_prompt
from know3d_core.mmdit import loading
from know3d_core.mmdit.backview import QwenEditBackView
from know3d_core.mmdit.schedule import QWEN_IMAGE_SCHEDULER_CONFIG

from test_mmdit_common import random_image, tiny_text_stack, tiny_transformer, tiny_vae

AREA = 64 * 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_edit_tiny")
    tiny_transformer(num_layers=3).save_pretrained(root / "transformer")
    tiny_vae().save_pretrained(root / "vae")
    te, _ = tiny_text_stack()
    te.save_pretrained(root / "text_encoder")
    os.makedirs(root / "scheduler")
    with open(root / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump({"_class_name": "FlowMatchEulerDiscreteScheduler", **QWEN_IMAGE_SCHEDULER_CONFIG}, f)
    return root


def _copy(folder, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_load_folder(folder):
    c = loading.load_qwen_edit(str(folder), dtype=torch.float32, components=("transformer", "vae", "text_encoder"))
    assert c.transformer.config.zero_cond_t and c.transformer.zero_cond_t
    assert c.processor is None and c.scheduler_config["shift_terminal"] == 0.02
    ref = tiny_transformer(num_layers=3)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in c.transformer.state_dict().items())


def test_missing_files_are_named(folder, tmp_path):
    d = _copy(folder, tmp_path)
    os.remove(d / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"vae[/\\]diffusion_pytorch_model\.safetensors"):
        loading.load_qwen_edit(str(d), dtype=torch.float32, components=("transformer", "vae"))
    os.remove(d / "scheduler" / "scheduler_config.json")
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        loading.load_qwen_edit(str(d), dtype=torch.float32, components=("transformer",))
    with pytest.raises(FileNotFoundError, match="processor"):
        loading.load_processor(str(d))
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        loading.load_qwen_edit(str(tmp_path / "nowhere"))


def test_transformer_weights_must_match_exactly(folder, tmp_path):
    d = _copy(folder, tmp_path)
    p = d / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(p))
    sd.pop("transformer_blocks.1.attn.to_q.weight")
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(p))
    with pytest.raises(ValueError, match=r"transformer: state dict mismatch.*to_q.*extra"):
        loading.load_transformer(str(d), dtype=torch.float32)


def test_old_diffusers_without_zero_cond_t_is_refused(folder, monkeypatch):
    from know3d_core.mmdit import model_build
    monkeypatch.setattr(model_build, "diffusers_supports_zero_cond_t", lambda: False)
    with pytest.raises(RuntimeError, match=r"diffusers >= 0\.37\.0"):
        loading.load_transformer(str(folder), dtype=torch.float32)


def test_headless_back_view_equals_diffusers_pipeline(folder, tmp_path, monkeypatch):
    """Folder + LoRA + text encoding + sampling + decode, against QwenImageEditPlusPipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus
    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", AREA)
    te_ref, proc = tiny_text_stack()
    lora = str(tmp_path / "backview_lora.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({"diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 32, generator=g),
               "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 2, generator=g)}, lora)
    bv = QwenEditBackView.from_folder(str(folder), dtype=torch.float32, loras=[lora],
                                      components=("transformer", "vae", "text_encoder"))
    bv.c.processor = proc
    bv.vae_image_area = AREA
    img = random_image(80, 64, seed=4)
    desc = "two straps and a zipper"
    ours = bv([img], desc, steps=3, height=64, width=96, generator=torch.Generator().manual_seed(1),
              capture=CaptureSpec(sigma=0.5))
    pipe = QwenImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
                                     vae=bv.c.vae, text_encoder=bv.c.text_encoder, tokenizer=proc.tokenizer,
                                     processor=proc, transformer=bv.c.transformer)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(image=[img], prompt=back_view_prompt(desc), negative_prompt=" ", true_cfg_scale=4.0,
              num_inference_steps=3, height=64, width=96)
    seen = {}

    def last_latents(p, i, t, kwargs):
        seen["latents"] = kwargs["latents"]
        return {}

    their_img = pipe(**kw, generator=torch.Generator().manual_seed(1), output_type="np",
                     callback_on_step_end=last_latents).images[0]
    assert torch.equal(ours.latents, seen["latents"])
    import numpy as np
    ours_np = np.asarray(ours.images[0]).astype(np.float32) / 255
    assert ours.images[0].size == (96, 64)
    assert np.abs(ours_np - their_img).max() <= 1 / 255 + 1e-6     # ours is uint8-rounded PIL
    k = ours.knowledge
    assert k.hidden.shape == (1, 24, 2 * 32) and k.extra["loras"] == [lora]
    assert bv.loras[0].family == "comfyui"
