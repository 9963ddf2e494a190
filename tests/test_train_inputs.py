"""Bad input to ``know3d train`` -> exit code 2 with a message naming the file or setting, before
any training step (no checkpoint folder appears)."""
import json
import os

import pytest
import torch

from _train_helpers import run_cli, train_args, write_tiny_models, write_train_dataset
from know3d_core.data import layout as L


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_inputs")
    models = write_tiny_models(root / "models")
    qwen = root / "qwen"
    (qwen / "transformer").mkdir(parents=True)
    (qwen / "transformer" / "config.json").write_text(json.dumps(
        {"num_layers": 3, "num_attention_heads": 2, "attention_head_dim": 16}))
    return root, models, qwen


def _data(tmp_path, **kw):
    data = tmp_path / "data"
    shas = write_train_dataset(data, n_assets=2, pairs_per_asset=1, **kw)
    return data, shas


def _fails(argv, capsys, *needles):
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    for n in needles:
        assert str(n) in err, (n, err)
    return err


def _know3d_file(path, width=64, dim=12):
    from know3d_core.knowledge import init_lora, install_branch, save_know3d
    from know3d_core.trellis2.loading import get_model_class
    from know3d_core.trellis2.tiny import tiny_flow_args

    flow = get_model_class("SparseStructureFlowModel")(**tiny_flow_args("ss", model_channels=width, num_blocks=1,
                                                                         num_heads=2, resolution=4))
    install_branch(flow, dim, kind="mmdit_hidden", mmdit_layers=[0, 1], sigma=0.25)
    init_lora(flow, 4)
    save_know3d(path, {"sparse_structure_flow_model": flow})
    return path


def test_missing_dataset_and_files(env, tmp_path, capsys):
    root, models, _ = env
    out = tmp_path / "run"
    _fails(train_args("trellis2", tmp_path / "nope", out, models), capsys, "--data", "nope")
    data, shas = _data(tmp_path)
    os.remove(os.path.join(L.asset_dir(str(data), shas[1]), L.view_file(1)))
    _fails(train_args("trellis2", data, out, models), capsys, L.view_file(1), shas[1])
    os.rename(L.asset_dir(str(data), shas[1]), str(tmp_path / "moved"))
    _fails(train_args("trellis2", data, out, models), capsys, L.MANIFEST_NAME, shas[1])
    assert not out.exists() or not (out / "checkpoints").exists()


def test_latents_that_do_not_fit_the_model(env, tmp_path, capsys):
    root, models, _ = env
    data, shas = _data(tmp_path, ss_shape=(8, 16, 16, 16))  # the official 16^3; this model is 4^3
    _fails(train_args("trellis2", data, tmp_path / "run", models), capsys, L.SS_LATENT_FILE, "[8, 4, 4, 4]")
    _fails(train_args("trellis2", data, tmp_path / "run", models, "--max-tokens", "8", stage="shape512"),
           capsys, "--max-tokens 8")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_models_folder_and_run_folder(env, tmp_path, capsys):
    root, models, _ = env
    data, _ = _data(tmp_path)
    _fails(train_args("trellis2", data, tmp_path / "run", tmp_path), capsys, "pipeline.json")
    _fails(train_args("trellis2", data, tmp_path / "run", models, "--resume"), capsys, "--resume")
    assert run_cli(train_args("trellis2", data, tmp_path / "run", models, steps=1))[0] == 0
    _fails(train_args("trellis2", data, tmp_path / "run", models, steps=1), capsys, "--resume", "already holds")
    _fails(train_args("trellis2", data, tmp_path / "run", models, "--resume", "--lr", "1", steps=1),
           capsys, "lr")
    _fails(["train", "backview", "--data", str(data), "--out", str(tmp_path / "bv"), "--device", "cpu"], capsys,
           "backview")  # the dataset has only 3d pairs
    bv = tmp_path / "bv_data"
    write_train_dataset(bv, n_assets=1, pairs_per_asset=0, backview_pairs=1)
    _fails(["train", "backview", "--data", str(bv), "--out", str(tmp_path / "bv"), "--device", "cpu"], capsys, "--qwen")


def test_init_checkpoint_or_knowledge_that_does_not_fit(env, tmp_path, capsys):
    root, models, qwen = env
    data, _ = _data(tmp_path)
    init = _know3d_file(str(tmp_path / "k.safetensors"))  # D = 12; the Qwen config gives 32 x 2 layers
    _fails(train_args("know3d", data, tmp_path / "a", models, "--qwen", qwen, "--init", init), capsys,
           "D=12", "64")
    wide = _know3d_file(str(tmp_path / "w.safetensors"), width=64, dim=64)  # fits the knowledge, not the model
    _fails(train_args("know3d", data, tmp_path / "b", models, "--qwen", qwen, "--init", wide), capsys,
           "--init", "does not fit")
    _fails(train_args("know3d", data, tmp_path / "c", models, "--qwen", qwen, "--init", wide, "--sigma", "0.5"),
           capsys, "--sigma 0.5")
    _fails(train_args("know3d", data, tmp_path / "d", models, "--qwen", qwen, "--layers", "0,7"), capsys, "--layers")
    for name in "abcd":
        assert not (tmp_path / name / "checkpoints").exists()


def test_commands_module_is_torch_free():
    import subprocess
    import sys

    code = "import sys, know3d_core.train.commands; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False", out.stderr
