"""The voxelize and encode steps of ``know3d data prepare`` on a real StepContext, with a tiny
official-layout TRELLIS.2 folder (random weights) for the encoders."""
import os

import pytest
import torch
from safetensors.torch import load_file

from know3d_core.data import layout
from know3d_core.data.encode import load_encoders, toolkit_dual
from know3d_core.data.encode import prepare_step as encode_step
from know3d_core.data.prepare import PrepareOptions, StepContext, StepSkipped
from know3d_core.data.voxelize import prepare_step as voxelize_step
from know3d_core.mesh.primitives import uv_torus
from know3d_core.sparse import SparseTensor
from know3d_core.trellis2.mesh_to_dual_grid import mesh_to_flexible_dual_grid
from know3d_core.trellis2.shape_encoder import encoder_input
from know3d_core.trellis2.tiny import write_tiny_encoders, write_tiny_trellis2

RES = (64, 128)  # any multiple of 64 works; the CLI offers 256 / 512 / 1024


@pytest.fixture(scope="module")
def trellis2_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("trellis2"))
    write_tiny_trellis2(folder, with_decoders=False)
    return write_tiny_encoders(folder, seed=1)


def make_ctx(tmp_path, trellis2=None):
    mesh = uv_torus(0.3, 0.12, 32, 16)
    folder = tmp_path / "asset"
    folder.mkdir()
    options = PrepareOptions(input=str(tmp_path), out=str(tmp_path), resolutions=RES, trellis2=trellis2)
    ctx = StepContext(str(tmp_path), str(folder), "ab" * 32, "torus.glb", {}, options, {})
    ctx.write_tensors(layout.MESH_FILE, {layout.KEY_VERTICES: mesh.vertices, layout.KEY_FACES: mesh.faces.int()})
    return ctx, mesh


def test_voxelize_step_writes_grids_and_occupancy(tmp_path):
    ctx, mesh = make_ctx(tmp_path)
    out = voxelize_step(ctx)
    for res in RES:
        t = load_file(ctx.path(layout.dual_grid_file(res)))
        ref = mesh_to_flexible_dual_grid(mesh.vertices, mesh.faces, res)
        assert t[layout.KEY_COORDS].dtype == torch.int32 and torch.equal(t[layout.KEY_COORDS], ref.coords)
        assert torch.equal(t[layout.KEY_DUAL_VERTICES], ref.dual_vertices.clamp(0, 1))
        assert t[layout.KEY_INTERSECTED].dtype == torch.bool and torch.equal(t[layout.KEY_INTERSECTED], ref.intersected)
        assert out["voxels"][str(res)] == ref.num_voxels
    occ = load_file(ctx.path(layout.OCCUPANCY_FILE))[layout.KEY_OCCUPANCY]
    assert occ.shape == (64, 64, 64) and occ.dtype == torch.bool
    fine = load_file(ctx.path(layout.dual_grid_file(128)))[layout.KEY_COORDS].long()
    assert torch.equal(torch.argwhere(occ), torch.unique(fine // 2, dim=0))  # finest grid, coords // (128 / 64)


def test_encode_step_writes_normalised_latents(tmp_path, trellis2_folder):
    ctx, _ = make_ctx(tmp_path, trellis2_folder)
    voxelize_step(ctx)
    out = encode_step(ctx)
    enc = load_encoders(trellis2_folder)
    for res in RES:
        coords, dual, inter = (load_file(ctx.path(layout.dual_grid_file(res)))[k]
                               for k in (layout.KEY_COORDS, layout.KEY_DUAL_VERTICES, layout.KEY_INTERSECTED))
        t = load_file(ctx.path(layout.shape_latent_file(res)))
        assert torch.equal(t[layout.KEY_COORDS].long(), torch.unique(coords.long() // 16, dim=0))
        assert out["tokens"][str(res)] == t[layout.KEY_COORDS].shape[0]
        # the encoder on the toolkit-quantised grid, then (z - mean) / std of pipeline.json
        x = SparseTensor(encoder_input(toolkit_dual(dual), inter.bool()),
                         torch.cat([torch.zeros_like(coords[:, :1]), coords], 1), (res,) * 3)
        raw = enc.shape(x).feats
        assert t[layout.KEY_FEATS].shape == (raw.shape[0], layout.SHAPE_LATENT_CHANNELS)
        torch.testing.assert_close(t[layout.KEY_FEATS] * enc.std + enc.mean, raw, rtol=1e-5, atol=1e-5)
    ss = load_file(ctx.path(layout.SS_LATENT_FILE))[layout.KEY_LATENT]
    occ = load_file(ctx.path(layout.OCCUPANCY_FILE))[layout.KEY_OCCUPANCY]
    assert ss.shape == layout.SS_LATENT_SHAPE and ss.dtype == torch.float32
    torch.testing.assert_close(ss, enc.ss(occ[None, None].float())[0])  # stored as is (no normalisation)


def test_encode_step_is_skipped_without_a_trellis2_folder(tmp_path):
    ctx, _ = make_ctx(tmp_path)
    with pytest.raises(StepSkipped, match="--trellis2"):
        encode_step(ctx)


def test_encode_step_needs_the_dual_grids(tmp_path, trellis2_folder):
    ctx, _ = make_ctx(tmp_path, trellis2_folder)
    with pytest.raises(FileNotFoundError, match="voxelize"):
        encode_step(ctx)


def test_toolkit_dual_is_uint8_truncation():
    d = torch.tensor([[0.0, 1.0, 0.5], [1.2, -0.1, 254.9 / 255]])
    assert torch.equal(toolkit_dual(d) * 255, torch.tensor([[0.0, 255, 127], [255, 0, 254]]))


def test_missing_encoder_checkpoint_names_the_fix(tmp_path):
    folder = str(tmp_path / "t2")
    write_tiny_trellis2(folder, with_decoders=False)
    with pytest.raises(FileNotFoundError, match="shape_enc_next_dc_f16c32_fp16"):
        load_encoders(folder)
    assert not os.path.exists(os.path.join(folder, "ckpts", "shape_enc_next_dc_f16c32_fp16.json"))


def test_prepare_runs_voxelize_and_encode_on_a_synthetic_asset(tmp_path, trellis2_folder):
    """``prepare`` with the mesh, voxelize and encode steps on one procedural GLB: every file of the
    layout is written, the record has voxel and token counts, a second run has nothing to do."""
    from know3d_core.data.prepare import prepare, read_manifest
    from know3d_core.data.synthetic import write_dataset_folder

    src = tmp_path / "in"
    write_dataset_folder(str(src), seeds=[0], features=["handle"])
    out = str(tmp_path / "ds")
    options = PrepareOptions(input=str(src), out=out, steps=("mesh", "voxelize", "encode"), resolutions=(256,),
                             trellis2=trellis2_folder, progress=False)
    prepare(options, log=lambda *_: None)
    (row,) = read_manifest(out)
    assert row["status"] == layout.STATUS_OK and row["steps"] == ["mesh", "voxelize", "encode"]
    folder = layout.asset_dir(out, row["sha256"])
    for name in (layout.dual_grid_file(256), layout.OCCUPANCY_FILE, layout.shape_latent_file(256), layout.SS_LATENT_FILE):
        assert os.path.exists(os.path.join(folder, name)), name
    grid = load_file(os.path.join(folder, layout.dual_grid_file(256)))
    assert row["voxels"] == {"256": grid[layout.KEY_COORDS].shape[0]} and row["voxels"]["256"] > 1000
    latent = load_file(os.path.join(folder, layout.shape_latent_file(256)))
    assert latent[layout.KEY_COORDS].max() < 16  # 256 / 16 tokens a side
    before = os.path.getmtime(os.path.join(folder, layout.SS_LATENT_FILE))
    prepare(options, log=lambda *_: None)  # resumed: finished steps are skipped
    assert os.path.getmtime(os.path.join(folder, layout.SS_LATENT_FILE)) == before
