"""TRELLIS.2 and knowledge nodes run on tiny random checkpoints written in the official layout
(know3d_core.demo_models), with real images, masks and files; no ComfyUI needed."""
import os

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from _nodes_helpers import submodule

tr = submodule("nodes.trellis")
kn = submodule("nodes.knowledge")
mesh_nodes = submodule("nodes.mesh")
host = submodule("nodes._host")
demo = submodule("know3d_core.demo_models")
kinds = submodule("know3d_core.knowledge.kinds")
meshlib = submodule("know3d_core.mesh")

SS = dict(steps=2, cfg=7.5, guidance_interval_start=0.6, guidance_interval_end=1.0, guidance_rescale=0.7, rescale_t=5.0)
SHAPE = dict(steps=2, cfg=7.5, guidance_interval_start=0.6, guidance_interval_end=1.0, guidance_rescale=0.5, rescale_t=3.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    trellis = demo.write_demo_trellis2(str(root / "TRELLIS.2-4B"))
    demo.write_demo_dinov3(str(root / "dinov3-vitl16-pretrain-lvd1689m"))
    know3d = demo.write_demo_know3d(str(root / "know3d.safetensors"), trellis)
    image = demo.write_demo_image(str(root / "front.png"), size=128)
    return {"trellis": trellis + "/", "know3d": know3d, "image": image,
            "dinov3_file": str(root / "dinov3-vitl16-pretrain-lvd1689m" / "model.safetensors")}


def load_model(files, know3d=True, dinov3=None):
    (model,) = tr.Know3DLoadModel.execute(files["trellis"], tr.FROM_FOLDER, dinov3 or tr.FROM_FOLDER,
                                         files["know3d"] if know3d else tr.NONE, "float32")
    return model


@pytest.fixture(scope="module")
def know3d_model(files):
    return load_model(files)


@pytest.fixture(scope="module")
def plain_model(files):
    return load_model(files, know3d=False, dinov3=files["dinov3_file"])


def front_rgba(files):
    return torch.from_numpy(np.asarray(Image.open(files["image"])).astype(np.float32) / 255)[None]


@pytest.fixture(scope="module")
def condition(files, know3d_model):
    return tr.Know3DImageCondition.execute(know3d_model, front_rgba(files))


def mmdit_knowledge(layers=(1, 2), sigma=0.25, width=32, tokens=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return kinds.mmdit_hidden_knowledge(torch.randn(1, tokens, width * len(layers), generator=g), layers, sigma, (64, 64))


def run_stages(model, condition, knowledge=None, ptype="512", seed=0):
    structure, voxel = tr.Know3DSparseStructure.execute(model, condition, seed, **SS, knowledge=knowledge)
    mesh, latent = tr.Know3DGeometry.execute(model, structure, condition, ptype, seed, **SHAPE,
                                              max_num_tokens=49152, knowledge=knowledge)
    return structure, voxel, mesh, latent


def test_load_model_official_folder_and_know3d(know3d_model, plain_model):
    assert know3d_model.know3d_spec.knowledge_kind == "mmdit_hidden"
    assert plain_model.know3d_spec is None
    assert {"sparse_structure_flow_model", "shape_slat_decoder", "dinov3"} <= set(know3d_model.managed)


def test_load_model_starts_triton_on_the_comfy_device_before_reading(files, monkeypatch):
    """The loader reads the weights on the CPU; the stages run on ComfyUI's device, where Triton's start is
    queued first so that it overlaps the reading."""
    triton_start = submodule("know3d_core.sparse.triton_start")
    order = []
    monkeypatch.setattr(host, "torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(triton_start, "start_triton_runtime", lambda device: order.append(("start", str(device))))
    real = tr._pipeline_module().Trellis2GeometryPipeline.from_pretrained

    def reading(*args, **kwargs):
        order.append("read")
        return real(*args, **kwargs)

    monkeypatch.setattr(tr._pipeline_module().Trellis2GeometryPipeline, "from_pretrained", reading)
    load_model(files, know3d=False)
    assert order == [("start", "cuda:0"), "read"]


def test_load_model_missing_files_name_file_folder_and_source(files):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors.*know3d.*Know3D release"):
        tr.Know3DLoadModel.execute(files["trellis"], tr.FROM_FOLDER, tr.FROM_FOLDER, "nope.safetensors", "float32")
    with pytest.raises(ValueError, match="shape VAE"):
        tr.Know3DLoadModel.execute(os.path.abspath(__file__), tr.FROM_FOLDER, tr.FROM_FOLDER, tr.NONE, "float32")


def test_image_condition_crops_and_encodes(condition, files):
    cond, front = condition
    assert front.shape[0] == 1 and front.shape[1] == front.shape[2] and front.shape[-1] == 3
    assert set(cond.conds) == {512, 1024}
    assert cond.conds[512]["cond"].shape == (1, 1 + 4 + 32 * 32, 32)
    assert cond.conds[1024]["cond"].shape == (1, 1 + 4 + 64 * 64, 32)
    assert torch.count_nonzero(cond.conds[512]["neg_cond"]) == 0
    # Transparent pixels become black; the object fills the square crop.
    assert float(front[0, 0, 0].abs().sum()) == 0.0


def test_image_condition_mask_equals_alpha(files, know3d_model, condition):
    rgba = front_rgba(files)
    mask = (rgba[..., 3] > 0.5).float()
    cond2, front2 = tr.Know3DImageCondition.execute(know3d_model, rgba[..., :3].clone(), mask=mask)
    cond1, front1 = condition
    assert torch.equal(front1, front2)
    assert torch.equal(cond1.conds[512]["cond"], cond2.conds[512]["cond"])


@pytest.mark.parametrize("case", ["two_channels", "batch_of_two", "empty_mask", "opaque_no_mask"])
def test_image_condition_bad_inputs_are_clear_errors(files, know3d_model, case):
    rgba = front_rgba(files)
    args, match = {
        "two_channels": ((rgba[..., :2],), "channels"),
        "batch_of_two": ((rgba.repeat(2, 1, 1, 1),), "one image at a time"),
        "empty_mask": ((rgba[..., :3], torch.zeros(rgba.shape[:3])), "empty|no foreground|transparent"),
        "opaque_no_mask": ((rgba[..., :3],), "mask"),
    }[case]
    with pytest.raises(ValueError, match=match):
        tr.Know3DImageCondition.execute(know3d_model, *args)


@pytest.fixture(scope="module")
def plain_run(know3d_model, condition):
    """Stages without knowledge, seed 7, type 512 (the inputs are checked to stay untouched)."""
    cond, _ = condition
    conds_before = cond.conds[512]["cond"].clone()
    out = run_stages(know3d_model, cond, ptype="512", seed=7)
    assert torch.equal(cond.conds[512]["cond"], conds_before)
    return out


def test_stages_match_the_single_seed_pipeline_run(know3d_model, plain_run, files):
    structure, voxel, mesh, latent = plain_run
    ref = know3d_model.pipeline.run(front_rgba(files)[0], pipeline_type="512", seed=7,
                                    ss_params={k: v for k, v in _params(SS).items()},
                                    shape_params=_params(SHAPE))
    assert torch.equal(structure.coords, ref.coords)
    want = torch.from_numpy(meshlib.z_up_to_y_up(ref.mesh.vertices.double().numpy())).float()
    assert torch.equal(mesh.vertices[0], want)
    assert torch.equal(mesh.faces[0], ref.mesh.faces)
    # The structure as a core VOXEL: dense occupancy of exactly those coords.
    assert voxel.data.shape == (1, structure.resolution, structure.resolution, structure.resolution)
    assert int(voxel.data.sum()) == structure.coords.shape[0]
    # Shape latent in core's texture-stage form: normalised feats [1, 32, N, 1] on the 512/16 grid.
    assert latent["samples"].shape == (1, 32, ref.slat.feats.shape[0], 1)
    assert latent["coord_resolution"] == 32 and latent["type"] == "trellis2" and latent["model_frame"] == "z_up"
    mean, std = know3d_model.pipeline.config.normalization("shape_slat_normalization")
    torch.testing.assert_close(latent["samples"][0, :, :, 0].t() * std + mean, ref.slat.feats.cpu(), rtol=1e-5, atol=1e-5)
    assert mesh.know3d_metadata["seed"] == 7 and mesh.know3d_metadata["pipeline_type"] == "512"


def _params(w):
    return dict(steps=w["steps"], guidance_strength=w["cfg"], guidance_rescale=w["guidance_rescale"],
                guidance_interval=(w["guidance_interval_start"], w["guidance_interval_end"]), rescale_t=w["rescale_t"])


def test_knowledge_changes_the_result_and_mismatches_are_errors(know3d_model, condition, plain_run):
    cond, _ = condition
    plain = plain_run
    k = mmdit_knowledge()
    tensor_before = k.tensor.clone()
    with_k = run_stages(know3d_model, cond, k, seed=7)
    assert torch.equal(k.tensor, tensor_before)
    assert not torch.equal(plain[0].coords, with_k[0].coords) or not torch.equal(plain[2].vertices, with_k[2].vertices)
    assert with_k[2].know3d_metadata["knowledge"]["layers"] == [1, 2]
    mismatch = kinds.KnowledgeMismatchError
    with pytest.raises(mismatch, match="layers"):
        tr.Know3DSparseStructure.execute(know3d_model, cond, 0, **SS, knowledge=mmdit_knowledge(layers=(0, 1)))
    with pytest.raises(mismatch, match="sigma"):
        tr.Know3DSparseStructure.execute(know3d_model, cond, 0, **SS, knowledge=mmdit_knowledge(sigma=0.6))
    latent_k = kn.Know3DKnowledgeFromLatent.execute({"samples": torch.randn(1, 16, 1, 8, 8)})[0]
    with pytest.raises(mismatch, match="vae_latent"):
        tr.Know3DGeometry.execute(know3d_model, with_k[0], cond, "512", 0, **SHAPE, max_num_tokens=49152,
                                   knowledge=latent_k)


def test_knowledge_from_image_and_latent(files, know3d_model):
    back = front_rgba(files)[..., :3].flip(2)
    (k,) = kn.Know3DKnowledgeFromImage.execute(know3d_model, back, "512")
    assert k.kind == "dino_image" and k.tensor.shape == (1, 1 + 4 + 32 * 32, 32)
    assert k.provenance["resolution"] == 512
    (lat,) = kn.Know3DKnowledgeFromLatent.execute({"samples": torch.randn(1, 16, 8, 12)})
    # 2x2 packing: (8/2)*(12/2) tokens of 16*2*2 channels; pixels = latent size x the VAE's factor 8
    assert lat.kind == "vae_latent" and lat.tensor.shape == (1, 4 * 6, 64)
    assert lat.provenance["resolution"] == [8 * 8, 12 * 8]


def test_back_view_as_second_view_runs_plain_trellis(files, plain_model):
    cond, _ = tr.Know3DImageCondition.execute(plain_model, front_rgba(files))
    back = front_rgba(files).flip(2)
    (k,) = kn.Know3DBackViewAsSecondView.execute(back, "stochastic")
    assert k.kind == "multi_view" and k.provenance["mode"] == "stochastic"
    structure, _, mesh, _ = run_stages(plain_model, cond, k, seed=1)
    assert structure.knowledge["kind"] == "multi_view" and mesh.vertices.shape[1] > 0
    with pytest.raises(ValueError, match="Know3D branch"):
        tr.Know3DSparseStructure.execute(plain_model, cond, 0, **SS, knowledge=mmdit_knowledge())


def test_cascade_geometry_and_save(know3d_model, condition, tmp_path, monkeypatch):
    cond, _ = condition
    structure, _, mesh, latent = run_stages(know3d_model, cond, ptype="1024_cascade", seed=2)
    assert latent["coord_resolution"] == 64
    with pytest.raises(ValueError, match="64\\^3 structure"):
        tr.Know3DGeometry.execute(know3d_model, structure, cond, "1024", 0, **SHAPE, max_num_tokens=49152)
    monkeypatch.setattr(host, "output_directory", lambda: str(tmp_path))
    res = mesh_nodes.Know3DSaveMesh.execute(mesh, "know3d/cascade", "glb", remove_floaters=False)
    path = os.path.join(tmp_path, res.result[0])
    scene = trimesh.load(path, file_type="glb")
    assert scene.metadata["know3d"]["pipeline_type"] == "1024_cascade"
    loaded = trimesh.load(path, file_type="glb", force="mesh", process=False)
    assert len(loaded.faces) == mesh.faces.shape[1]


def test_load_model_from_comfy_single_files_matches_the_official_folder(tmp_path):
    """Load Know3D Model on Comfy-Org's diffusion file + shape VAE + clip_vision DINOv3 (no pipeline.json)."""
    from test_pipeline_comfy_files import _write_comfy_files

    folder = demo.write_demo_trellis2(str(tmp_path / "TRELLIS.2-4B"), ss_resolution=16)  # official 16^3 latent
    dino = demo.write_demo_dinov3(str(tmp_path / "dinov3-vitl16-pretrain-lvd1689m"))
    diffusion, vae = _write_comfy_files(folder, str(tmp_path))
    dino_file = os.path.join(dino, "model.safetensors")
    (single,) = tr.Know3DLoadModel.execute(diffusion, vae, dino_file, tr.NONE, "float32")
    (official,) = tr.Know3DLoadModel.execute(folder + "/", tr.FROM_FOLDER, dino_file, tr.NONE, "float32")
    image = demo.write_demo_image(str(tmp_path / "front.png"), size=128)
    rgba = torch.from_numpy(np.asarray(Image.open(image)).astype(np.float32) / 255)[None]
    structures = []
    for model in (single, official):
        cond = tr.Know3DImageCondition.execute(model, rgba)[0]
        structure, _ = tr.Know3DSparseStructure.execute(model, cond, 0, **SS)
        structures.append(structure)
    assert structures[0].coords.shape[0] > 0
    assert torch.equal(structures[0].coords, structures[1].coords)
