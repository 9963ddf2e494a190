"""Issue 16 row 'reference-saved state dicts': the structure flow's ``rope_phases`` buffer, which the
reference class (microsoft/TRELLIS.2 ``SparseStructureFlowModel``) registers and so saves, is checked
against ours and dropped; a wrong one and any other stray key stay errors."""
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from know3d_core.trellis2.loading import CheckpointError, load_comfy_flow_file, load_model
from know3d_core.trellis2.sparse_structure_flow import SparseStructureFlowModel
from know3d_core.trellis2.tiny import random_state_dict, tiny_flow_args, write_checkpoint


def reference_rope_phases(resolution: int, head_dim: int, rope_freq=(1.0, 10000.0)) -> torch.Tensor:
    """``rope_phases`` as the reference computes it (trellis2/modules/attention/rope.py,
    RotaryPositionEmbedder on the 'ij' meshgrid): per axis ``outer(index, freqs)``, polar, then
    identity pairs ``polar(1, 0)`` up to head_dim / 2. Written from that description, not from ours."""
    freq_dim = head_dim // 2 // 3
    freqs = rope_freq[0] / (rope_freq[1] ** (torch.arange(freq_dim, dtype=torch.float32) / freq_dim))
    r = torch.arange(resolution)
    coords = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
    angles = torch.outer(coords.reshape(-1), freqs).reshape(coords.shape[0], -1)
    phases = torch.polar(torch.ones_like(angles), angles)
    pad = head_dim // 2 - phases.shape[-1]
    ones = torch.polar(torch.ones(phases.shape[0], pad), torch.zeros(phases.shape[0], pad))
    return torch.cat([phases, ones], dim=-1)


@pytest.fixture
def ss_flow(tmp_path):
    args = tiny_flow_args("ss", model_channels=32, num_blocks=1, num_heads=2, cond_channels=16, resolution=4)
    model = SparseStructureFlowModel(**args)
    stem = str(tmp_path / "ss_flow")
    write_checkpoint(stem, "SparseStructureFlowModel", args, random_state_dict(model, seed=3))
    return stem, args


def _add(stem, **extra):
    sd = load_file(stem + ".safetensors")
    sd.update(extra)
    save_file(sd, stem + ".safetensors")


def test_reference_rope_phases_are_checked_and_dropped(ss_flow, caplog):
    stem, args = ss_flow
    plain = load_model(stem, dtype="float32")
    head_dim = args["model_channels"] // args["num_heads"]
    _add(stem, rope_phases=reference_rope_phases(args["resolution"], head_dim))
    with caplog.at_level(logging.INFO, logger="know3d_core.trellis2.loading"):
        loaded = load_model(stem, dtype="float32")
    assert "dropped the reference buffer rope_phases" in caplog.text
    for (k, a), (_, b) in zip(plain.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_wrong_rope_phases_and_other_strays_stay_errors(ss_flow):
    stem, args = ss_flow
    head_dim = args["model_channels"] // args["num_heads"]
    wrong = reference_rope_phases(args["resolution"], head_dim, rope_freq=(1.0, 100.0))
    _add(stem, rope_phases=wrong)
    with pytest.raises(CheckpointError, match="rope_phases differs"):
        load_model(stem)
    _add(stem, rope_phases=reference_rope_phases(args["resolution"] + 1, head_dim))
    with pytest.raises(CheckpointError, match=r"rope_phases has shape \(125, 8\)"):
        load_model(stem)
    _add(stem, rope_phases=reference_rope_phases(args["resolution"], head_dim), pos_emb=torch.zeros(3))
    with pytest.raises(CheckpointError, match="unexpected keys \\(1\\): pos_emb"):
        load_model(stem)


def test_comfy_file_with_reference_buffer(ss_flow, tmp_path):
    stem, args = ss_flow
    sd = {f"structure_model.{k}": v for k, v in load_file(stem + ".safetensors").items()}
    head_dim = args["model_channels"] // args["num_heads"]
    # ComfyUI's loader keeps the 16^3 table of the official config, and so does ours (resolution 16)
    sd["structure_model.rope_phases"] = reference_rope_phases(16, head_dim)
    path = str(tmp_path / "flows.safetensors")
    save_file(sd, path)
    models = load_comfy_flow_file(path, dtype="float32")
    assert list(models) == ["sparse_structure_flow_model"]
    assert os.path.getsize(path) > 0
