"""Know3D Texture and Save Mesh's textured GLB on the tiny demo models (+ their tiny texture networks,
know3d_core.demo_models); no ComfyUI needed. The node must equal the library stages the CLI runs."""
import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from _nodes_helpers import submodule

tr = submodule("nodes.trellis")
tx = submodule("nodes.texture")
mesh_nodes = submodule("nodes.mesh")
host = submodule("nodes._host")
demo = submodule("know3d_core.demo_models")
meshlib = submodule("know3d_core.mesh")
texlib = submodule("know3d_core.mesh.texture")
sparse = submodule("know3d_core.sparse.tensor")

FAST = dict(steps=2, cfg=7.5, guidance_interval_start=0.6, guidance_interval_end=1.0, guidance_rescale=0.5, rescale_t=3.0)
TEX = dict(steps=2, cfg=2.0, guidance_interval_start=0.0, guidance_interval_end=1.0, guidance_rescale=0.0, rescale_t=3.0)
SIZE, FACES = 64, 3000


def u8(x):
    return (x * 255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_tex")
    trellis = demo.write_demo_trellis2(str(root / "TRELLIS.2-4B"))
    demo.write_demo_dinov3(str(root / "dinov3-vitl16-pretrain-lvd1689m"))
    image = demo.write_demo_image(str(root / "front.png"), size=128)
    return {"trellis": trellis + "/", "image": image}


@pytest.fixture(scope="module")
def model(files):
    (m,) = tr.Know3DLoadModel.execute(files["trellis"], tr.FROM_FOLDER, tr.FROM_FOLDER, tr.NONE, "float32",
                                      tr.FROM_FOLDER)
    return m


@pytest.fixture(scope="module")
def geometry(files, model):
    front = torch.from_numpy(np.asarray(Image.open(files["image"])).astype(np.float32) / 255)[None]
    condition, front_image = tr.Know3DImageCondition.execute(model, front)
    structure, _ = tr.Know3DSparseStructure.execute(model, condition, 0, **FAST)
    mesh, latent = tr.Know3DGeometry.execute(model, structure, condition, "512", 0, **FAST, max_num_tokens=49152)
    return condition, front_image, latent


def texture(model, geometry, mode="pbr", back=False, seed=5):
    condition, front_image, latent = geometry
    (mesh,) = tx.Know3DTexture.execute(model, latent, condition, seed, **TEX, texture_size=SIZE, face_budget=FACES,
                                       mode=mode, back_image=front_image.flip(2) if back else None)
    return mesh


@pytest.fixture(scope="module")
def pbr(model, geometry):
    return texture(model, geometry)


def test_shape_latent_round_trip_is_the_geometry_latent():
    g = torch.Generator().manual_seed(0)
    coords = torch.cat([torch.zeros(7, 1, dtype=torch.int32), torch.randint(0, 32, (7, 3), generator=g, dtype=torch.int32)], 1)
    feats, mean, std = torch.randn(7, 32, generator=g), torch.randn(32, generator=g), torch.rand(32, generator=g) + 0.5
    latent = tr.texture_stage_latent(sparse.SparseTensor(feats, coords, (32, 32, 32)), 512, mean, std)
    slat, resolution = tx.shape_latent_to_slat(latent, mean, std)
    assert resolution == 512 and tuple(slat.spatial_shape) == (32, 32, 32)
    assert torch.equal(slat.coords, coords)
    torch.testing.assert_close(slat.feats, feats, rtol=1e-6, atol=1e-6)
    assert tx.texture_type(512) == "512" and tx.texture_type(1024) == tx.texture_type(1536) == "1024"


def test_texture_node_equals_the_library_stages(model, geometry, pbr):
    """Texture node = sample_tex_slat + decode_textured + postprocess_mesh + bake_reduced (what
    ``know3d generate --texture`` runs), same seed and settings."""
    condition, _, latent = geometry
    pipe = model.pipeline
    slat, res = tx.shape_latent_to_slat(latent, *pipe.config.normalization("shape_slat_normalization"))
    params = pipe.sampler_params("tex_slat", dict(steps=2, guidance_strength=2.0, guidance_rescale=0.0,
                                                  guidance_interval=(0.0, 1.0), rescale_t=3.0))
    tex_slat = pipe.sample_tex_slat(slat, condition.conds[512], "512", generator=torch.Generator().manual_seed(5),
                                    params=params)
    [(raw, voxels)] = pipe.decode_textured(slat, tex_slat, res)
    reduced = meshlib.postprocess_mesh(raw, mesh_nodes.FLOATER_FRACTION, FACES)
    baked = texlib.bake_reduced(reduced, raw, voxels, texture_size=SIZE)
    v_yup = torch.from_numpy(meshlib.z_up_to_y_up(baked.vertices.double().numpy())).float()
    torch.testing.assert_close(pbr.vertices[0], v_yup)
    assert torch.equal(pbr.faces[0], baked.faces)
    assert torch.equal(pbr.uvs[0], baked.uvs)
    assert pbr.texture.shape == pbr.metallic_roughness.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_array_equal(u8(pbr.texture[0]), baked.base_color[..., :3])
    np.testing.assert_array_equal(u8(pbr.know3d_alpha[0, ..., 0]), baked.base_color[..., 3])
    np.testing.assert_array_equal(u8(pbr.metallic_roughness[0]), baked.metallic_roughness)
    assert pbr.know3d_metadata["texture"]["back_view_condition"] is False
    assert baked.faces.shape[0] <= FACES


def test_back_image_conditions_the_colours_not_the_shape(model, geometry):
    front_only = texture(model, geometry, mode="vertex")
    with_back = texture(model, geometry, mode="vertex", back=True)
    assert torch.equal(front_only.vertices, with_back.vertices) and torch.equal(front_only.faces, with_back.faces)
    assert front_only.vertex_colors.shape == (1, front_only.vertices.shape[1], 4)
    assert not torch.allclose(front_only.vertex_colors, with_back.vertex_colors)
    assert with_back.know3d_metadata["texture"]["back_view_condition"] is True
    assert front_only.uvs is None and front_only.texture is None


def test_save_mesh_writes_the_pbr_glb(tmp_path, monkeypatch, pbr, model, geometry):
    monkeypatch.setattr(host, "output_directory", lambda: str(tmp_path))
    res = mesh_nodes.Know3DSaveMesh.execute(pbr, "know3d/textured", "glb")
    scene = trimesh.load(str(tmp_path / res.result[0]), file_type="glb", process=False)
    [tm] = scene.geometry.values()
    assert len(tm.faces) == pbr.faces.shape[1]  # a textured mesh keeps its faces
    np.testing.assert_allclose(tm.vertices, pbr.vertices[0].numpy(), atol=1e-6)  # Y-up in both
    np.testing.assert_allclose(tm.visual.uv, np.stack([pbr.uvs[0, :, 0], 1 - pbr.uvs[0, :, 1]], 1), atol=1e-6)
    mat = tm.visual.material
    base = np.asarray(mat.baseColorTexture.convert("RGBA"))
    assert base.shape == (SIZE, SIZE, 4)
    np.testing.assert_array_equal(base[..., :3], u8(pbr.texture[0]))
    mr = np.asarray(mat.metallicRoughnessTexture.convert("RGB"))
    np.testing.assert_array_equal(mr, u8(pbr.metallic_roughness[0]))

    vertex = texture(model, geometry, mode="vertex")
    res = mesh_nodes.Know3DSaveMesh.execute(vertex, "know3d/vertex", "glb")
    [tm] = trimesh.load(str(tmp_path / res.result[0]), file_type="glb", process=False).geometry.values()
    np.testing.assert_array_equal(tm.visual.vertex_colors, u8(vertex.vertex_colors[0]))

    with pytest.raises(ValueError, match="textured.*target_faces to 0.*face_budget"):
        mesh_nodes.Know3DSaveMesh.execute(pbr, "know3d/x", "glb", target_faces=100)


def test_texture_needs_the_texture_networks_and_the_geometry_latent(files, geometry):
    (plain,) = tr.Know3DLoadModel.execute(files["trellis"], tr.FROM_FOLDER, tr.FROM_FOLDER, tr.NONE, "float32")
    condition, _, latent = geometry
    with pytest.raises(ValueError, match="no tex_slat_flow_model_512, tex_slat_decoder.*texture option"):
        tx.Know3DTexture.execute(plain, latent, condition, 0, **TEX, texture_size=SIZE, face_budget=FACES, mode="pbr")
    with pytest.raises(ValueError, match="shape_latent output of Know3D Geometry"):
        tx.Know3DTexture.execute(plain, {"samples": torch.zeros(1, 4, 8, 8)}, condition, 0, **TEX, texture_size=SIZE,
                                 face_budget=FACES, mode="pbr")
    with pytest.raises(ValueError, match="TRELLIS.2 folder.*choose texture"):
        tr.Know3DLoadModel.execute(files["trellis"], tr.FROM_FOLDER, tr.FROM_FOLDER, tr.NONE, "float32", "x.safetensors")


def test_load_model_takes_comfy_orgs_texture_vae_beside_a_single_diffusion_file(files, model, tmp_path):
    """Single files (diffusion file with ``shape2txt.*``, shape VAE, texture VAE ``txt_dec.*``): the
    texture networks load, equal to the folder's; 'from the folder' with a diffusion file names the fix."""
    from safetensors.torch import load_file, save_file

    plan = submodule("know3d_core.plan")
    folder = files["trellis"].rstrip("/")
    config = model.pipeline.config

    def sd(key):
        return load_file(submodule("know3d_core.trellis2.loading").resolve_checkpoint(folder, config.models[key])
                         + ".safetensors")

    flows = {"structure_model.": plan.SS_FLOW, "img2shape_512.": "shape_slat_flow_model_512",
             "img2shape.": "shape_slat_flow_model_1024", "shape2txt.": plan.TEX_FLOWS["1024"]}
    diffusion, vae, tex_vae = (str(tmp_path / n) for n in ("trellis_2.safetensors", "shape_vae.safetensors",
                                                          "texture_vae.safetensors"))
    save_file({"model.diffusion_model." + p + k: v for p, key in flows.items() for k, v in sd(key).items()}, diffusion)
    save_file({p + k: v for p, key in {"struct_dec.": plan.SS_DECODER, "shape_dec.": plan.SHAPE_DECODER}.items()
               for k, v in sd(key).items()}, vae)
    save_file({"txt_dec." + k: v for k, v in sd(plan.TEX_DECODER).items()}, tex_vae)
    dino = demo.write_demo_dinov3(str(tmp_path / "dino")) + "/model.safetensors"
    (single,) = tr.Know3DLoadModel.execute(diffusion, vae, dino, tr.NONE, "float32", tex_vae)
    for key in (plan.TEX_FLOWS["1024"], plan.TEX_DECODER):
        ours, ref = single.pipeline.models[key].state_dict(), model.pipeline.models[key].state_dict()
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), key
    with pytest.raises(ValueError, match="single diffusion file.*texture VAE"):
        tr.Know3DLoadModel.execute(diffusion, vae, dino, tr.NONE, "float32", tr.FROM_FOLDER)
