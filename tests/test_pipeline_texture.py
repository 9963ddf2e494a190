"""The texture stage of Trellis2GeometryPipeline on the tiny demo models (+ tiny texture networks):
the reference's RNG order and inputs (noise then the normalised shape latent on the channels), PBR
voxels on the mesh's own voxels, sampler settings from pipeline.json, the back view as a second
image condition, and the bake of the result to a GLB that trimesh reads with its PBR material."""
import io

import pytest
import torch
from PIL import Image

from know3d_core.geometry_pipeline import Trellis2GeometryPipeline
from know3d_core.plan import PBR_LAYOUT, SHAPE_DECODER, TEX_FLOWS, TEX_STAGE, progress_plan
from know3d_core.trellis2.tiny_texture import TEX_SAMPLER

from _pipeline_helpers import FAST, geometry_demo, one_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return geometry_demo(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(demo):
    """The demo TRELLIS.2 folder holds the tiny texture networks (``tiny_texture.write_tiny_texture``)."""
    return Trellis2GeometryPipeline.from_pretrained(demo.trellis2, device="cpu", dtype="float32",
                                                    pipeline_types=["512"], texture=True, dinov3=demo.dinov3)


@pytest.fixture(scope="module")
def image(demo):
    return Image.open(demo.image)


@pytest.fixture(scope="module")
def textured(pipe, image):
    seen = {}
    flow = pipe.models[TEX_FLOWS["512"]]
    def grab(module, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    handle = flow.register_forward_pre_hook(grab, with_kwargs=True)
    steps = []
    try:
        res = pipe.run(image, pipeline_type="512", seed=3, ss_params=FAST, shape_params=FAST, texture=True,
                       tex_params=FAST, callback=lambda *a: steps.append(a))
    finally:
        handle.remove()
    return res, seen["call"], steps


def test_only_the_types_texture_models_load(pipe):
    assert TEX_FLOWS["512"] in pipe.models and TEX_FLOWS["1024"] not in pipe.models
    assert pipe.models["tex_slat_decoder"].dtype == torch.float32  # CPU: decoders in fp32


def test_texture_stage_follows_the_reference_inputs(pipe, textured):
    res, (args, kwargs), steps = textured
    n = res.slat.feats.shape[0]
    torch.manual_seed(3)  # the reference: SS noise, shape noise, then texture noise from one stream
    R = pipe.models["sparse_structure_flow_model"].resolution
    torch.randn(1, 8, R, R, R)
    torch.randn(res.num_tokens["shape_slat_512"], 32)
    tex_noise = torch.randn(n, 32)
    x = args[0]
    assert torch.equal(x.feats[:n], tex_noise)  # the first call (t = 1) sees the noise itself
    shape_norm = (res.slat.feats - pipe.slat_mean) / pipe.slat_std
    torch.testing.assert_close(kwargs["concat_cond"][:n], shape_norm, rtol=0, atol=1e-6)
    assert torch.equal(x.coords[:n].cpu(), res.slat.coords)
    assert [s for s in steps if s[0] == TEX_STAGE] == [(TEX_STAGE, i, 3) for i in range(1, 4)]
    assert steps[:-3] == [(s, i, n_) for s, n_ in progress_plan("512", 3, 3) for i in range(1, n_ + 1)]
    assert TEX_STAGE in res.timings and res.tex_slat.feats.shape == (n, 32)


def test_pbr_voxels_are_the_meshs_voxels(pipe, textured):
    res = textured[0]
    head = pipe.models[SHAPE_DECODER](res.slat)
    vox = res.texture
    assert torch.equal(vox.coords, head.coords[:, 1:].cpu()) and vox.resolution == res.resolution == 512
    assert vox.attrs.shape == (head.coords.shape[0], 6) and vox.layout == PBR_LAYOUT
    # the raw head, * 0.5 + 0.5 (the reference's decode_tex_slat)
    raw = pipe.models["tex_slat_decoder"](res.tex_slat, pipe.models[SHAPE_DECODER](res.slat, return_subs=True)[1])
    torch.testing.assert_close(vox.attrs, raw.feats * 0.5 + 0.5)


def test_tex_sampler_settings_come_from_pipeline_json(pipe):
    params = pipe.sampler_params(TEX_STAGE)
    official = TEX_SAMPLER["params"]
    assert (params.steps, params.guidance_strength, params.guidance_interval, params.rescale_t) == (
        official["steps"], official["guidance_strength"], tuple(official["guidance_interval"]), official["rescale_t"])
    assert pipe.sampler_params(TEX_STAGE, {"steps": 5}).steps == 5


def test_back_view_is_a_second_condition_of_the_texture_flow_only(pipe, image, textured):
    res = textured[0]
    back = image.rotate(90)  # the demo image is left-right symmetric
    with_back = pipe.run(image, pipeline_type="512", seed=3, ss_params=FAST, shape_params=FAST, texture=True,
                         tex_params=FAST, back_image=back)
    assert torch.equal(with_back.slat.feats, res.slat.feats)  # geometry untouched
    assert not torch.equal(with_back.tex_slat.feats, res.tex_slat.feats)


def test_textured_result_bakes_to_a_pbr_glb(textured):
    trimesh = pytest.importorskip("trimesh")
    pytest.importorskip("xatlas")
    from know3d_core.mesh import postprocess_mesh
    from know3d_core.mesh.texture import bake_pbr, textured_glb_bytes, vertex_color_glb_bytes

    res = textured[0]
    mesh = postprocess_mesh(res.mesh, target_faces=2000)
    baked = bake_pbr(mesh, res.texture, texture_size=128, surface=res.mesh)
    scene = trimesh.load(io.BytesIO(textured_glb_bytes(baked)), file_type="glb")
    geom = next(iter(scene.geometry.values()))
    assert isinstance(geom.visual.material, trimesh.visual.material.PBRMaterial)
    assert geom.visual.uv.shape == (geom.vertices.shape[0], 2)
    assert geom.visual.material.baseColorTexture.size == (128, 128)
    assert geom.visual.material.metallicRoughnessTexture is not None
    assert set(baked.metadata["timings"]) == {"uv_unwrap", "rasterize", "snap", "sample", "dilate"}
    scene = trimesh.load(io.BytesIO(vertex_color_glb_bytes(mesh, res.texture)), file_type="glb")
    geom = next(iter(scene.geometry.values()))
    assert geom.visual.vertex_colors.shape == (mesh.num_vertices, 4)


def test_cascade_textures_with_the_1024_flow_on_the_final_latent(demo, image):
    """1024_cascade: the texture flow is the 1024 one, on the second stage's coords, DINOv3 at 1024."""
    pipe = Trellis2GeometryPipeline.from_pretrained(demo.trellis2, device="cpu", dtype="float32",
                                                    pipeline_types=["1024_cascade"], texture=True,
                                                    dinov3=demo.dinov3)
    assert TEX_FLOWS["1024"] in pipe.models and TEX_FLOWS["512"] not in pipe.models
    seen = {}
    flow = pipe.models[TEX_FLOWS["1024"]]
    handle = flow.register_forward_pre_hook(lambda m, args: seen.setdefault("args", args) and None)
    try:
        res = pipe.run(image, pipeline_type="1024_cascade", seed=0, ss_params=FAST, shape_params=FAST,
                       texture=True, tex_params=FAST)
    finally:
        handle.remove()
    x, cond = seen["args"][0], seen["args"][2]
    assert torch.equal(x.coords[: res.slat.coords.shape[0]].cpu(), res.slat.coords)
    assert cond.shape[1] == pipe.get_cond(pipe.preprocess(image), 1024)["cond"].shape[1]
    assert res.texture.resolution == res.resolution == 1024
