"""The trainer on a dataset made by the real ``know3d data prepare`` (mesh, render, annotate steps on
the procedural test assets), with the encode step's latent files written in its layout: the
contract between the data toolkit and the trainer, file names, pairs and manifest included."""
import os

import pytest
import torch
from safetensors.torch import save_file

from _train_helpers import SS_SHAPE, checkpoint_state, run_cli, train_args, write_tiny_models
from know3d_core.data import layout as L
from know3d_core.data import prepare as prep
from tests._data_helpers import MAX_FACES, write_asset_folder

pytest.importorskip("moderngl")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_prepared")
    assets, data = str(root / "assets"), str(root / "data")
    write_asset_folder(assets)
    prep.prepare(prep.PrepareOptions(input=assets, out=data, render_size=32, max_faces=MAX_FACES, progress=False,
                                     steps=("mesh", "render", "annotate")), log=lambda m: None)
    gen = torch.Generator().manual_seed(0)
    ok = [r for r in prep.read_manifest(data) if r["status"] == L.STATUS_OK]
    for row in ok:  # what the encode step writes (its encoders are not part of this test)
        save_file({L.KEY_LATENT: torch.randn(SS_SHAPE, generator=gen)},
                  os.path.join(L.asset_dir(data, row["sha256"]), L.SS_LATENT_FILE))
    return data, ok, write_tiny_models(root / "models")


def test_trains_on_a_prepared_dataset(prepared, tmp_path):
    data, ok, models = prepared
    out = tmp_path / "run"
    assert run_cli(train_args("trellis2", data, out, models, steps=2))[0] == 0
    task = checkpoint_state(out)["task"]
    train_rows = [r for r in ok if r.get("split", "train") == "train"]
    assert task["pairs"] == sum(8 for _ in train_rows)  # 4 pairs of the 3d set + 4 perturbed per asset
    assert (out / "export" / "TRELLIS.2" / "pipeline.json").is_file()
