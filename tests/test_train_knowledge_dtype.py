"""The knowledge a Know3D run trains on is made in the dtype of the run's precision: bf16 on CUDA for
bf16 runs (as ``know3d generate``'s default dtype makes it), fp32 for ``--precision fp32`` runs (as
fp32 generation makes it; the experiment's case: its GPU run trained on bf16 hidden states and was
evaluated on fp32 ones), fp32 on the CPU; and the dtype is part of the knowledge cache's spec, so a
cache of one rounding is not reused by a run of the other."""
import pytest
import torch

from _pipeline_helpers import full_demo
from _train_helpers import write_train_dataset
from know3d_core.errors import UsageError
from know3d_core.train.config import TrainConfig
from know3d_core.train.features import FeatureCache, knowledge_dtype
from know3d_core.train.flows import FlowTask


def test_knowledge_dtype_follows_the_run_precision():
    assert knowledge_dtype("fp32", "cuda") == "float32"
    assert knowledge_dtype("auto", "cuda") == knowledge_dtype("bf16", "cuda") == "bfloat16"
    assert {knowledge_dtype(p, "cpu") for p in ("auto", "bf16", "fp32")} == {"float32"}


@pytest.mark.parametrize("precision,dtype", [("fp32", "float32"), ("auto", "bfloat16")])
def test_the_spec_of_a_cuda_run_states_its_dtype_and_the_cache_keeps_them_apart(tmp_path_factory, tmp_path,
                                                                                precision, dtype):
    demo = full_demo(tmp_path_factory)
    data = tmp_path / "data"
    write_train_dataset(data, n_assets=1, pairs_per_asset=1, ss_shape=(8, 8, 8, 8))
    cfg = TrainConfig(task="know3d", data=str(data), out=str(tmp_path / "run"), models=str(demo.trellis2),
                      qwen=str(demo.qwen), precision=precision, back_size=(64, 64), back_steps=2)
    spec = FlowTask(branch=True)._knowledge_spec(cfg, torch.device("cuda"))  # reads configs only: no GPU needed
    assert spec.dtype == dtype and spec.cache_spec()["dtype"] == dtype
    FeatureCache(str(tmp_path / "cache"), spec.cache_spec())
    other = "bfloat16" if dtype == "float32" else "float32"
    with pytest.raises(UsageError, match="dtype"):
        FeatureCache(str(tmp_path / "cache"), {**spec.cache_spec(), "dtype": other})
