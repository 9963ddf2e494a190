"""demo_models.write_demo_models: every part loads strictly with the real loaders, the random-weights
notice is there, the writer is deterministic and the calibrated biases do what they say."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from know3d_core import demo_models as dm
from know3d_core.knowledge import read_know3d
from know3d_core.trellis2.loading import GEOMETRY_MODELS, load_pipeline_models, read_pipeline_config
from know3d_core.trellis2.sparse_structure_decoder import decode_occupancy

from _pipeline_helpers import full_demo, one_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return full_demo(tmp_path_factory)


def test_every_part_loads_with_the_real_loaders(demo):
    from know3d_core.conditioning import DinoV3FeatureExtractor
    from know3d_core.mmdit.loading import load_qwen_edit
    from know3d_core.mmdit.lora import merge_lora
    from know3d_core.pipeline import load_processor

    config = read_pipeline_config(demo.trellis2)
    assert config.default_pipeline_type == "1024_cascade"
    assert config.models["sparse_structure_decoder"].startswith("microsoft/TRELLIS-image-large/")
    models = load_pipeline_models(demo.trellis2)
    assert set(models) == set(GEOMETRY_MODELS)
    assert models["sparse_structure_flow_model"].resolution == dm.SS_RESOLUTION
    dino = DinoV3FeatureExtractor.from_pretrained(demo.dinov3)
    assert dino.model.config.hidden_size == models["sparse_structure_flow_model"].cond_channels
    qwen = load_qwen_edit(demo.qwen, dtype=torch.float32, components=("transformer", "vae", "text_encoder"))
    assert qwen.model_name == dm.QWEN_MODEL_NAME and qwen.transformer.config.zero_cond_t
    processor = load_processor(demo.qwen)
    assert processor.tokenizer.pad_token == "<|endoftext|>"
    from PIL import Image

    batch = processor(text=["<|vision_start|><|image_pad|><|vision_end|>x"], images=[Image.open(demo.image).convert("RGB")],
                      return_tensors="pt")
    assert batch["pixel_values"].shape[0] > 0 and batch["image_grid_thw"].shape == (1, 3)
    report = merge_lora(qwen.transformer, demo.backview_lora, 1.0)
    assert report.family == "comfyui"
    spec = read_know3d(demo.know3d).spec
    width = dm.QWEN_TRANSFORMER["num_attention_heads"] * dm.QWEN_TRANSFORMER["attention_head_dim"]
    assert (spec.knowledge_kind, spec.knowledge_dim, spec.mmdit_layers, spec.sigma) == (
        "mmdit_hidden", width * len(dm.KNOW3D_LAYERS), dm.KNOW3D_LAYERS, dm.KNOW3D_SIGMA)
    assert spec.lora_rank > 0
    with open(os.path.join(demo.root, "README.txt"), encoding="utf-8") as f:
        assert "RANDOM weights" in f.read()


def test_trellis2_part_is_a_function_of_the_seed(tmp_path):
    a, b, c = (dm.write_demo_trellis2(str(tmp_path / n), seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    for name in sorted(os.listdir(os.path.join(a, "ckpts"))):
        if not name.endswith(".safetensors"):
            continue
        ta, tb, tc = (load_file(os.path.join(d, "ckpts", name)) for d in (a, b, c))
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
        assert not all(torch.equal(ta[k], tc[k]) for k in ta)
    with open(os.path.join(a, "pipeline.json")) as fa, open(os.path.join(b, "pipeline.json")) as fb:
        assert json.load(fa) == json.load(fb)


def test_structure_decoder_bias_gives_the_stated_occupancy(demo):
    """On latents drawn like the calibration's (N(0, 1)), about DEMO_OCCUPANCY of 32^3 is occupied."""
    decoder = load_pipeline_models(demo.trellis2, keys=["sparse_structure_decoder"])["sparse_structure_decoder"]
    decoder.convert_to(torch.float32)
    r = dm.SS_RESOLUTION
    z = torch.randn(4, 8, r, r, r, generator=torch.Generator().manual_seed(123))
    coords = decode_occupancy(decoder(z), 32)
    fraction = coords.shape[0] / (4 * 32 ** 3)
    assert dm.DEMO_OCCUPANCY / 2 < fraction < dm.DEMO_OCCUPANCY * 2


def test_writing_demo_models_leaves_the_global_rng_alone(tmp_path):
    import torch

    from know3d_core.demo_models import write_demo_dinov3

    before = torch.random.get_rng_state()
    write_demo_dinov3(str(tmp_path / "dino"), seed=3)
    assert torch.equal(before, torch.random.get_rng_state())
