"""``know3d train know3d --knowledge-source latent | image`` (the ablation's other injection sources) on
the tiny demo models (CPU): the branch trains on the denoised back-view latent (``vae_latent``, D = the
MMDiT's packed input channels) and on the DINOv3 tokens of the decoded back view (``dino_image``,
D = the DINOv3 width), the files state that kind, ``know3d generate`` injects them through the
matching variant, and settings of another kind are refused before any model loads."""
import json

import pytest
import torch

from _pipeline_helpers import full_demo
from _train_helpers import FAST_QWEN, run_cli, train_args, write_train_dataset
from know3d_core.knowledge import read_know3d

# (source, kind, D of the tiny models: 16 latent channels x 2 x 2 patch; the tiny DINOv3's width)
SOURCES = [("latent", "vae_latent", 64), ("image", "dino_image", 32)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    demo = full_demo(tmp_path_factory)
    root = tmp_path_factory.mktemp("train_sources")
    data = root / "data"
    write_train_dataset(data, n_assets=2, pairs_per_asset=1, ss_shape=(8, 8, 8, 8))
    return demo, data, root


@pytest.fixture(scope="module", params=SOURCES, ids=[s[0] for s in SOURCES])
def trained(request, setup):
    demo, data, root = setup
    source, kind, dim = request.param
    out = root / source
    code, _ = run_cli(train_args("know3d", data, out, demo.trellis2, "--qwen", demo.qwen, *FAST_QWEN,
                                 "--knowledge-source", source, "--knowledge-cache", root / f"kc_{source}",
                                 "--lr", "1e-2", steps=3))
    assert code == 0
    return source, kind, dim, out


def test_branch_trains_on_the_source_and_the_file_states_its_kind(trained, setup):
    source, kind, dim, out = trained
    ckpt = read_know3d(out / "export" / "know3d.safetensors")
    assert ckpt.spec.knowledge_kind == kind and ckpt.spec.knowledge_dim == dim
    assert ckpt.spec.mmdit_layers is None and ckpt.spec.sigma is None
    ss = ckpt.tensors["sparse_structure_flow_model"]
    # gradients reached the whole branch: the zero-initialised output and the projector of the knowledge
    assert torch.count_nonzero(ss["blocks.0.knowledge_attn.to_out.weight"]) > 0
    assert ss["knowledge_proj.linear.weight"].shape[1] == dim
    fresh = json.loads((setup[2] / f"kc_{source}" / "cache.json").read_text())
    assert fresh["kind"] == kind and fresh["dim"] == dim and fresh["source"] == source


def test_the_file_injects_through_know3d_generate(trained, setup, tmp_path):
    source, kind, _, out = trained
    demo = setup[0]
    gen = tmp_path / "gen"
    code, _ = run_cli(["generate", "--models", demo.trellis2, "--qwen", demo.qwen, "--know3d",
                       str(out / "export" / "know3d.safetensors"), "--image", demo.image, "--prompt", "slats",
                       "--variant", source, "--out", str(gen), "--resolution", "512", "--steps", "2",
                       "--back-steps", "2", "--back-size", "64x64", "--device", "cpu", "--dtype", "float32",
                       "--quiet", "--normals-size", "64"])
    assert code == 0
    assert kind in json.dumps(json.loads((gen / "record.json").read_text()))


@pytest.mark.parametrize("extra, words", [
    (("--knowledge-source", "latent", "--sigma", "0.3"), ["--sigma", "latent", "vae_latent"]),
    (("--knowledge-source", "image", "--layers", "1,2"), ["--layers", "image", "dino_image"]),
])
def test_hidden_state_settings_are_refused_for_other_kinds(setup, tmp_path, capsys, extra, words):
    demo, data, _ = setup
    code, err = run_cli(train_args("know3d", data, tmp_path / "r", demo.trellis2, "--qwen", demo.qwen, *extra,
                                   steps=1), capsys)
    assert code == 2 and all(w in err for w in words), err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_init_of_another_kind_is_refused(trained, setup, tmp_path, capsys):
    source, kind, _, out = trained
    demo, data, _ = setup
    other = "trajectory"
    code, err = run_cli(train_args("know3d", data, tmp_path / "r", demo.trellis2, "--qwen", demo.qwen,
                                   "--init", out / "export" / "know3d.safetensors", "--knowledge-source", other,
                                   stage="shape512", steps=1), capsys)
    assert code == 2 and kind in err and "mmdit_hidden" in err, err
