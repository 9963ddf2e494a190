"""Know3DPipeline on the tiny demo models: back view -> knowledge -> TRELLIS.2 for every variant,
early exit, checks against the Know3D checkpoint, cancellation."""
import math

import pytest
import torch
from PIL import Image

from know3d_core.demo_models import DEMO_RUN_SETTINGS, KNOW3D_LAYERS, KNOW3D_SIGMA, QWEN_TRANSFORMER
from know3d_core.knowledge import KnowledgeMismatchError, install_branch, save_know3d
from know3d_core.knowledge.checkpoint import MODEL_NAMES
from know3d_core.mmdit.schedule import flow_match_sigmas, nearest_step
from know3d_core.pipeline import Know3DPipeline
from know3d_core.plan import VARIANTS, progress_plan
from know3d_core.sampling import Cancelled
from know3d_core.trellis2.loading import load_pipeline_models
from know3d_core.geometry_pipeline import Trellis2GeometryPipeline

from _pipeline_helpers import full_demo, mesh_equal, one_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

SIZE = DEMO_RUN_SETTINGS["back_view_size"]
STEPS = DEMO_RUN_SETTINGS["steps"]
RUN = dict(steps=STEPS, pipeline_type="512", back_view_size=SIZE, trellis_steps=3)
DESC = "a hollow backrest with three vertical slats"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return full_demo(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(demo):
    return Know3DPipeline.from_pretrained(
        demo.trellis2, qwen=demo.qwen, know3d=demo.know3d, backview_loras=[demo.backview_lora], device="cpu",
        dtype="float32", vae_image_area=DEMO_RUN_SETTINGS["vae_image_area"])


@pytest.fixture(scope="module")
def image(demo):
    return Image.open(demo.image)


def _capture_index(pipe) -> int:
    """Step of the back-view schedule whose cond forward captures (nearest to the checkpoint's sigma)."""
    n_target = (SIZE[0] // 16) * (SIZE[1] // 16)
    sigmas = flow_match_sigmas(STEPS, n_target, pipe.backview.c.scheduler_config)
    return nearest_step([float(s) for s in sigmas.tolist()], KNOW3D_SIGMA).index


def test_hidden_variant_end_to_end_with_early_exit(pipe, image):
    steps = []
    res = pipe.run(image, DESC, "hidden", seed=0, callback=lambda *a: steps.append(a), **RUN)
    res.mesh.validate()
    assert res.mesh.num_faces > 0 and res.back_image is None
    width = QWEN_TRANSFORMER["num_attention_heads"] * QWEN_TRANSFORMER["attention_head_dim"]
    n_tokens = (SIZE[0] // 16) * (SIZE[1] // 16)
    k = res.knowledge
    assert k["kind"] == "mmdit_hidden" and k["layers"] == KNOW3D_LAYERS and k["sigma"] == KNOW3D_SIGMA
    assert k["shape"] == [1, n_tokens, width * len(KNOW3D_LAYERS)]
    cap = _capture_index(pipe)
    assert 0 < cap < STEPS - 1  # the setup really exits early
    back = [(s, i, n) for s, i, n in steps if s == "back_view"]
    # the bar counts the steps that run (up to and including the capture step) and ends full there
    assert back == [("back_view", i, cap + 1) for i in range(1, cap + 2)]
    rest = [a for a in steps if a[0] != "back_view"]
    assert rest == [(s, i, n) for s, n in progress_plan("512", 3, 3) for i in range(1, n + 1)]
    assert {"preprocess", "back_view", "knowledge", "sparse_structure", "shape_slat", "decode"} <= set(res.timings)
    again = pipe.run(image, DESC, "hidden", seed=0, **RUN)
    assert mesh_equal(res.mesh, again.mesh)


def test_early_exit_captures_what_the_full_run_captures(pipe, image):
    front = pipe.preprocess(image)
    early = pipe.back_view(front, DESC, "hidden", seed=3, steps=STEPS, size=SIZE)
    full = pipe.back_view(front, DESC, "hidden", seed=3, steps=STEPS, size=SIZE, decode=True)
    assert early.exited_early and not full.exited_early and early.images is None
    assert torch.equal(early.mmdit.hidden, full.mmdit.hidden)
    assert full.image.size == (SIZE[1], SIZE[0]) and full.image_tensor.shape == (1, SIZE[0], SIZE[1], 3)
    other = pipe.back_view(front, "a solid wooden panel", "hidden", seed=3, steps=STEPS, size=SIZE)
    assert not torch.equal(other.mmdit.hidden, early.mmdit.hidden)  # the description matters


def test_multiview_and_none_need_no_know3d_knowledge(pipe, image):
    steps = []
    mv = pipe.run(image, DESC, "multiview", seed=0, callback=lambda *a: steps.append(a), **RUN)
    assert mv.back_image.size == (SIZE[1], SIZE[0]) and mv.knowledge["kind"] == "multi_view"
    assert mv.mesh.num_faces > 0
    assert [a for a in steps if a[0] == "back_view"] == [("back_view", i, STEPS) for i in range(1, STEPS + 1)]
    steps.clear()
    none = pipe.run(image, DESC, "none", seed=0, callback=lambda *a: steps.append(a), **RUN)
    assert none.knowledge is None and none.back_image is None and "back_view" not in none.timings
    assert all(a[0] != "back_view" for a in steps)
    plain = pipe.geometry.run(pipe.preprocess(image), preprocess=False, pipeline_type="512", seed=0,
                              ss_params={"steps": 3}, shape_params={"steps": 3})
    assert mesh_equal(none.mesh, plain.mesh)


@pytest.mark.parametrize("variant, other", [("latent", "vae_latent"), ("image", "dino_image")])
def test_wrong_variant_for_the_checkpoint_fails_before_any_work(pipe, image, variant, other):
    calls = []
    with pytest.raises(KnowledgeMismatchError) as err:
        pipe.run(image, DESC, variant, callback=lambda *a: calls.append(a), **RUN)
    assert "mmdit_hidden" in str(err.value) and other in str(err.value) and calls == []


def test_capture_other_than_the_checkpoint_fails_before_any_work(pipe, image):
    with pytest.raises(KnowledgeMismatchError, match=r"layers \[1, 2\].*\[0, 1\]"):
        pipe.run(image, DESC, "hidden", layers=[0, 1], **RUN)
    with pytest.raises(KnowledgeMismatchError, match="sigma 0.25.*sigma 0.6"):
        pipe.run(image, DESC, "hidden", sigma=0.6, **RUN)
    with pytest.raises(ValueError, match="unknown variant 'back'"):
        pipe.run(image, DESC, "back", **RUN)
    assert set(VARIANTS) == {"hidden", "latent", "image", "multiview", "none"}


def _branch_file(trellis2, path, kind, dim):
    """A Know3D delta file for ``kind`` with a random (non-zero) branch."""
    models = load_pipeline_models(trellis2, keys=MODEL_NAMES)
    gen = torch.Generator().manual_seed(5)
    for m in models.values():
        install_branch(m, dim, kind=kind)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "knowledge_attn.to_out" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    save_know3d(path, models)
    return path


@pytest.mark.parametrize("variant, kind, dim", [("latent", "vae_latent", 64), ("image", "dino_image", 32)])
def test_latent_and_image_variants_inject_their_knowledge(pipe, demo, image, tmp_path, variant, kind, dim):
    path = _branch_file(demo.trellis2, tmp_path / f"know3d_{kind}.safetensors", kind, dim)
    geometry = Trellis2GeometryPipeline.from_pretrained(demo.trellis2, device="cpu", dtype="float32", know3d=path)
    k3d = Know3DPipeline(geometry, pipe.backview)
    res = k3d.run(image, DESC, variant, seed=0, **RUN)
    assert res.knowledge["kind"] == kind and res.knowledge["shape"][-1] == dim and res.mesh.num_faces > 0
    if kind == "vae_latent":
        assert res.knowledge["shape"][1] == (SIZE[0] // 16) * (SIZE[1] // 16) and res.back_image is None
    else:
        assert res.back_image is not None and res.knowledge["resolution"] == 512
    none = k3d.run(image, DESC, "none", seed=0, **RUN)
    assert not torch.equal(res.geometry.slat.feats[:4], none.geometry.slat.feats[:4])  # knowledge was used


def test_cancel_during_the_back_view(pipe, image):
    steps = []
    with pytest.raises(Cancelled):
        pipe.run(image, DESC, "multiview", seed=0, callback=lambda *a: steps.append(a),
                 cancel=lambda: len(steps) >= 2, **RUN)
    assert steps == [("back_view", 1, STEPS), ("back_view", 2, STEPS)]


def test_without_a_back_view_model_only_none_runs(pipe, image):
    k3d = Know3DPipeline(pipe.geometry, None)
    with pytest.raises(ValueError, match="back-view model.*qwen="):
        k3d.run(image, DESC, "multiview", **RUN)
    assert k3d.run(image, DESC, "none", seed=0, **RUN).mesh.num_faces > 0
    assert math.isfinite(sum(k3d.run(image, "", "none", seed=0, **RUN).timings.values()))


def test_offload_path_gives_the_same_mesh(pipe, image):
    """The offload code path (models visit the device per stage; here device == CPU) changes nothing."""
    g = pipe.geometry
    geometry = Trellis2GeometryPipeline(g.models, g.config, g.image_cond_model, device="cpu", offload=True,
                                        know3d_spec=g.know3d_spec)
    k3d = Know3DPipeline(geometry, pipe.backview, offload=True)
    a = k3d.run(image, DESC, "hidden", seed=2, **RUN)
    b = pipe.run(image, DESC, "hidden", seed=2, **RUN)
    assert mesh_equal(a.mesh, b.mesh)
    assert all(p.device.type == "cpu" for m in g.models.values() for p in m.parameters())
