"""``--knowledge-seeds N``: N knowledge samples per pair (back-view noise seeds), one drawn each time a
pair is used. With one sample per pair and many epochs the branch learns each sample's noise: in the
small-scale experiment (8^3, 32 pairs, 800 steps) it named the feature on 13 of 16 training
generations with the training knowledge and on 6 of 16 with a new back-view seed."""
import json
import os

import torch
from safetensors.torch import load_file

from _pipeline_helpers import full_demo
from _train_helpers import FAST_QWEN, run_cli, train_args, write_train_dataset


def _knowledge_files(cache):
    return sorted(p for p in os.listdir(cache) if p.endswith(".safetensors"))


def test_seeds_fill_the_cache_draw_zero_is_the_single_seed_file_and_training_draws_them(tmp_path_factory, tmp_path,
                                                                                         capsys):
    demo = full_demo(tmp_path_factory)
    data = tmp_path / "data"
    write_train_dataset(data, n_assets=1, pairs_per_asset=1, ss_shape=(8, 8, 8, 8))

    def fill(cache, seeds):
        code, _ = run_cli(["train", "knowledge", "--data", str(data), "--out", str(tmp_path / "k"), "--models",
                           demo.trellis2, "--qwen", demo.qwen, *FAST_QWEN, "--knowledge-cache", str(cache),
                           "--layers", "1,2", "--knowledge-seeds", str(seeds), "--device", "cpu", "--no-progress"])
        assert code == 0

    fill(tmp_path / "one", 1)
    fill(tmp_path / "three", 3)
    (single,) = _knowledge_files(tmp_path / "one")
    key = single[: -len(".safetensors")]
    assert _knowledge_files(tmp_path / "three") == sorted([single, f"{key}_k1.safetensors", f"{key}_k2.safetensors"])
    t = {name: load_file(tmp_path / "three" / name)["tensor"] for name in _knowledge_files(tmp_path / "three")}
    assert torch.equal(t[single], load_file(tmp_path / "one" / single)["tensor"])  # draw 0: the old per-pair seed
    assert not torch.equal(t[single], t[f"{key}_k1.safetensors"]) and not torch.equal(t[f"{key}_k1.safetensors"],
                                                                                   t[f"{key}_k2.safetensors"])
    # a run with 3 seeds trains from that cache alone (no --qwen: a draw outside it would have to compute)
    out = tmp_path / "run"
    code, _ = run_cli(train_args("know3d", data, out, demo.trellis2, *FAST_QWEN, "--knowledge-cache",
                                 tmp_path / "three", "--layers", "1,2", "--knowledge-seeds", "3", steps=4))
    assert code == 0
    from safetensors import safe_open

    with safe_open(str(out / "export" / "know3d.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["training"])[-1]["knowledge_seeds"] == 3
    # ... and it does draw the other seeds: from the one-seed cache alone it must compute (and has no --qwen)
    code, err = run_cli(train_args("know3d", data, tmp_path / "run1", demo.trellis2, *FAST_QWEN, "--knowledge-cache",
                                   tmp_path / "one", "--layers", "1,2", "--knowledge-seeds", "3", steps=4), capsys)
    assert code == 2 and "--qwen" in err


def test_zero_seeds_is_refused(tmp_path_factory, tmp_path, capsys):
    demo = full_demo(tmp_path_factory)
    code, err = run_cli(train_args("know3d", tmp_path / "none", tmp_path / "run", demo.trellis2,
                                   "--knowledge-seeds", "0"), capsys)
    assert code == 2 and "--knowledge-seeds" in err
