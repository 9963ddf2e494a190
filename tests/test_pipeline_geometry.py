"""Trellis2GeometryPipeline on the tiny demo models: end to end, determinism, RNG parity, CFG
batching, the cascade's quantisation and token budget, Know3D injection, errors and cancellation."""
import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from know3d_core.knowledge import (KnowledgeMismatchError, install_branch, save_know3d,
                                   vae_latent_knowledge)
from know3d_core.knowledge.checkpoint import MODEL_NAMES
from know3d_core.sampling import Cancelled
from know3d_core.sampling.flow_euler import time_schedule, uses_cfg
from know3d_core.trellis2.loading import load_pipeline_models
from know3d_core.geometry_pipeline import Trellis2GeometryPipeline, cascade_coords, quantize_coords
from know3d_core.plan import (MAX_NUM_TOKENS, PIPELINE_TYPES, cond_resolutions, geometry_token_bound, progress_plan,
                              required_models, ss_resolution)

from _pipeline_helpers import FAST, geometry_demo, hidden_knowledge, mesh_equal, one_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return geometry_demo(tmp_path_factory)


@pytest.fixture(scope="module")
def plain(demo):
    return Trellis2GeometryPipeline.from_pretrained(demo.trellis2, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def know3d_pipe(demo):
    return Trellis2GeometryPipeline.from_pretrained(demo.trellis2, device="cpu", dtype="float32", know3d=demo.know3d)


@pytest.fixture(scope="module")
def image(demo):
    return Image.open(demo.image)


@pytest.fixture(scope="module")
def runs(plain, image):
    """One run per type (seed 0), shared by several tests."""
    out = {}
    for ptype in ("512", "1024_cascade"):
        steps = []
        res = plain.run(image, pipeline_type=ptype, seed=0, ss_params=FAST, shape_params=FAST,
                        callback=lambda *a: steps.append(a))
        out[ptype] = (res, steps)
    return out


# ----------------------------------------------------------------------------------- pure functions
def test_pipeline_type_tables():
    # research trellis2.md pipeline table: 64^3 structure grid only for direct "1024"; 512 and cascades use 32^3
    assert PIPELINE_TYPES == ("512", "1024", "1024_cascade", "1536_cascade")
    assert [ss_resolution(t) for t in PIPELINE_TYPES] == [32, 64, 32, 32]
    assert cond_resolutions("512") == (512,) and cond_resolutions("1536_cascade") == (512, 1024)
    assert "shape_slat_flow_model_1024" not in required_models("512")
    assert "shape_slat_flow_model_512" not in required_models("1024")
    assert progress_plan("1024_cascade", 5, 7) == [
        ("sparse_structure", 5), ("shape_slat_512", 7), ("shape_slat_1024", 7)]
    with pytest.raises(ValueError, match="unknown pipeline_type '2048'.*1536_cascade"):
        ss_resolution("2048")


def _expected_quantized(coords: np.ndarray, grid: int) -> np.ndarray:
    """fp64 recomputation: floor((c + 0.5) / 512 * G), unique rows in lexicographic order."""
    q = coords.copy()
    q[:, 1:] = np.floor((coords[:, 1:].astype(np.float64) + 0.5) / 512 * grid).astype(np.int64)
    return np.unique(q, axis=0)


@pytest.mark.parametrize("grid", [64, 96, 88, 72])
def test_quantize_coords_matches_formula(grid):
    rng = np.random.default_rng(grid)
    coords = np.concatenate([
        np.concatenate([np.full((3000, 1), b), rng.integers(0, 512, (3000, 3))], 1) for b in (0, 1)])
    coords = np.concatenate([coords, np.array([[0, 0, 0, 0], [1, 511, 511, 511], [0, 7, 8, 15]])])
    got = quantize_coords(torch.from_numpy(coords).int(), grid)
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), _expected_quantized(coords, grid))
    assert int(got[:, 1:].max()) < grid and int(got[:, 1:].min()) >= 0
    b = got[:, 0]
    assert bool((b[1:] >= b[:-1]).all())  # contiguous per batch item


def _layered_fine_coords() -> torch.Tensor:
    """Fine coords whose quantised token count grows with G: one voxel per fine x-slab, full y."""
    x = torch.arange(0, 512, 4)
    y = torch.arange(0, 512, 2)
    xx, yy = torch.meshgrid(x, y, indexing="ij")
    n = xx.numel()
    return torch.stack([torch.zeros(n, dtype=torch.long), xx.flatten(), yy.flatten(), torch.zeros(n, dtype=torch.long)], 1).int()


def test_cascade_token_budget_fallback():
    fine = _layered_fine_coords()
    counts = {r: _expected_quantized(fine.numpy(), r // 16).shape[0] for r in (1536, 1408, 1280, 1152, 1024)}
    assert counts[1536] > counts[1408] > counts[1280] > counts[1152] > counts[1024]  # the setup works
    # under budget: 1536 kept
    coords, res = cascade_coords(fine, 1536, max_num_tokens=counts[1536] + 1)
    assert res == 1536 and coords.shape[0] == counts[1536]
    # exactly at the budget counts as over (>=): lowered once
    coords, res = cascade_coords(fine, 1536, max_num_tokens=counts[1536])
    assert res == 1408 and coords.shape[0] == counts[1408]
    # the first resolution whose count is below the budget
    coords, res = cascade_coords(fine, 1536, max_num_tokens=counts[1152] + 1)
    assert res == 1152
    np.testing.assert_array_equal(coords.numpy(), _expected_quantized(fine.numpy(), 1152 // 16))
    # 1024 is never lowered, even over budget
    coords, res = cascade_coords(fine, 1536, max_num_tokens=1)
    assert res == 1024 and coords.shape[0] == counts[1024]
    assert cascade_coords(fine, 1024, max_num_tokens=1)[1] == 1024
    # the bound a host reserves working memory for, from the first stage's tokens (grid 32), holds at every budget
    n = _expected_quantized(fine.numpy(), 32).shape[0]
    for budget in (1, counts[1152] + 1, counts[1536], counts[1536] + 1, MAX_NUM_TOKENS):
        assert cascade_coords(fine, 1536, max_num_tokens=budget)[0].shape[0] <= geometry_token_bound("1536_cascade", n, budget)
    assert counts[1024] <= geometry_token_bound("1024_cascade", n) == 8 * n


# ----------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("ptype", ["512", "1024_cascade"])
def test_end_to_end_produces_a_mesh_and_reports_every_step(runs, ptype):
    res, steps = runs[ptype]
    mesh = res.mesh
    mesh.validate()
    assert mesh.num_faces > 0 and mesh.device.type == "cpu"
    assert res.resolution == (512 if ptype == "512" else 1024) == mesh.metadata["resolution"]
    assert float(mesh.vertices.abs().max()) <= 0.5 + 1.5 / res.resolution  # dual vertices stay in the box
    assert res.coords.dtype == torch.int32 and res.coords.shape[1] == 4
    assert int(res.coords[:, 1:].max()) < 32 and res.num_tokens["sparse_structure"] == res.coords.shape[0]
    assert res.slat.feats.shape == (res.num_tokens[progress_plan(ptype)[-1][0]], 32)
    assert max(res.num_tokens.values()) <= geometry_token_bound(ptype, res.coords.shape[0])
    expected = [(stage, i, n) for stage, n in progress_plan(ptype, 3, 3) for i in range(1, n + 1)]
    assert steps == expected
    assert set(res.timings) == {"preprocess", "cond", "sparse_structure", "shape_slat", "decode"}
    assert res.peak_vram == {}  # CPU


def test_same_seed_same_mesh_other_seed_differs(plain, image, runs):
    first = runs["512"][0]
    again = plain.run(image, pipeline_type="512", seed=0, ss_params=FAST, shape_params=FAST)
    assert mesh_equal(first.mesh, again.mesh) and torch.equal(first.coords, again.coords)
    other = plain.run(image, pipeline_type="512", seed=1, ss_params=FAST, shape_params=FAST)
    assert not torch.equal(first.slat.feats[:8], other.slat.feats[:8])


def test_1536_cascade_over_budget_falls_back_to_the_1024_cascade(plain, image, runs):
    """Stage by stage with the run's generator order: over budget, 1536 ends at the 1024 cascade."""
    ref = runs["1024_cascade"][0]
    img = plain.preprocess(image)
    cond, cond_hr = plain.get_cond(img, 512), plain.get_cond(img, 1024)
    gen = torch.Generator().manual_seed(0)
    coords = plain.sample_sparse_structure(cond, generator=gen, params=FAST)
    slat, res = plain.sample_shape_slat(coords, cond, None, "1536_cascade", cond_hr=cond_hr, generator=gen,
                                        params=FAST, max_num_tokens=1)
    assert res == 1024 == ref.resolution
    assert torch.equal(coords, ref.coords) and torch.equal(slat.feats, ref.slat.feats)
    assert torch.equal(slat.coords.cpu(), ref.slat.coords)


def test_noise_follows_the_reference_rng_order(plain, image):
    """First SS input == randn after torch.manual_seed(seed); first shape input == the next randn."""
    seen = {}

    def grab(name):
        def hook(module, args):
            seen.setdefault(name, args[0])
        return hook

    handles = [plain.models["sparse_structure_flow_model"].register_forward_pre_hook(grab("ss")),
               plain.models["shape_slat_flow_model_512"].register_forward_pre_hook(grab("shape"))]
    try:
        res = plain.run(image, pipeline_type="512", seed=7, ss_params=FAST, shape_params=FAST)
    finally:
        for h in handles:
            h.remove()
    R = plain.models["sparse_structure_flow_model"].resolution
    n = res.coords.shape[0]
    torch.manual_seed(7)
    ss_noise = torch.randn(1, 8, R, R, R)
    shape_noise = torch.randn(n, 32)
    assert torch.equal(seen["ss"][:1], ss_noise)
    assert torch.equal(seen["shape"].feats[:n], shape_noise)


def test_cfg_pairs_are_batched_only_inside_the_guidance_interval(plain, image):
    batches = {"ss": [], "shape": []}
    flows = {"ss": plain.models["sparse_structure_flow_model"], "shape": plain.models["shape_slat_flow_model_512"]}
    handles = [m.register_forward_pre_hook(
        lambda mod, args, k=k: batches[k].append((int(args[1].shape[0]), float(args[1][0]))))
        for k, m in flows.items()]
    try:
        plain.run(image, pipeline_type="512", seed=0, ss_params={"steps": 6}, shape_params={"steps": 6})
    finally:
        for h in handles:
            h.remove()
    for key, stage in (("ss", "sparse_structure"), ("shape", "shape_slat")):
        params = plain.sampler_params(stage, {"steps": 6})
        ts = time_schedule(6, params.rescale_t)[:-1]
        expected = [(2 if uses_cfg(t, params) else 1, pytest.approx(1000 * t, rel=1e-6)) for t in ts]
        assert batches[key] == expected
        assert {b for b, _ in batches[key]} == {1, 2}  # both kinds of step occur


# ----------------------------------------------------------------------------------- Know3D
@pytest.fixture(scope="module")
def zero_branch_file(demo, tmp_path_factory):
    """A Know3D delta file whose branch is freshly initialised (zero output layer), no LoRA."""
    models = load_pipeline_models(demo.trellis2, keys=MODEL_NAMES)
    for m in models.values():
        install_branch(m, 64, kind="mmdit_hidden", mmdit_layers=[1, 2], sigma=0.25)
    path = tmp_path_factory.mktemp("k3d") / "know3d_zero.safetensors"
    save_know3d(path, models)
    return path


def test_zero_initialised_branch_gives_exactly_plain_trellis2(demo, image, runs, zero_branch_file):
    pipe = Trellis2GeometryPipeline.from_pretrained(demo.trellis2, device="cpu", dtype="float32",
                                                    know3d=zero_branch_file)
    res = pipe.run(image, pipeline_type="512", seed=0, knowledge=hidden_knowledge(),
                   ss_params=FAST, shape_params=FAST)
    ref = runs["512"][0]
    assert res.knowledge["kind"] == "mmdit_hidden"
    assert torch.equal(res.coords, ref.coords) and torch.equal(res.slat.feats, ref.slat.feats)
    assert mesh_equal(res.mesh, ref.mesh)


def test_knowledge_reaches_both_stages(know3d_pipe, image):
    """With a trained (non-zero) branch, different knowledge changes the structure latent and the
    shape latent; the same knowledge gives the same result."""
    pipe = know3d_pipe
    cond = pipe.get_cond(image.convert("RGB"), 512)
    latents = []
    hook = pipe.models["sparse_structure_decoder"].register_forward_pre_hook(
        lambda mod, args: latents.append(args[0].clone()))
    try:
        coords = [pipe.sample_sparse_structure(cond, hidden_knowledge(seed=s), seed=0, params=FAST) for s in (0, 1)][0]
    finally:
        hook.remove()
    assert not torch.equal(latents[0], latents[1])
    slats = [pipe.sample_shape_slat(coords, cond, hidden_knowledge(seed=s), "512", seed=0, params=FAST)[0]
             for s in (0, 1)]
    assert not torch.equal(slats[0].feats, slats[1].feats)
    same = pipe.sample_shape_slat(coords, cond, hidden_knowledge(seed=0), "512", seed=0, params=FAST)[0]
    assert torch.equal(same.feats, slats[0].feats)


def test_knowledge_kind_mismatch_names_both_before_sampling(know3d_pipe, image):
    calls = []
    latent = vae_latent_knowledge(torch.randn(1, 16, 64), (64, 64))
    with pytest.raises(KnowledgeMismatchError) as err:
        know3d_pipe.run(image, pipeline_type="512", knowledge=latent, callback=lambda *a: calls.append(a))
    assert "mmdit_hidden" in str(err.value) and "vae_latent" in str(err.value)
    assert calls == []
    with pytest.raises(KnowledgeMismatchError, match=r"layers \[1, 2\].*\[0, 1\]"):
        know3d_pipe.check_knowledge(hidden_knowledge(layers=(0, 1)))


def test_injected_knowledge_without_a_branch_is_an_error(plain):
    with pytest.raises(ValueError, match="Know3D branch.*know3d="):
        plain.check_knowledge(hidden_knowledge(), "512")


def test_cancel_mid_stage_raises_and_leaves_nothing(demo, know3d_pipe, image, monkeypatch):
    import know3d_core.geometry_pipeline as G

    contexts = []
    real = G.prepare_knowledge

    def tracking(model, knowledge):
        ctx = real(model, knowledge)
        contexts.append(weakref.ref(ctx))
        return ctx

    monkeypatch.setattr(G, "prepare_knowledge", tracking)
    state = {"stop": False, "steps": []}

    def callback(stage, step, total):
        state["steps"].append((stage, step))
        if stage == "shape_slat_512" and step == 1:
            state["stop"] = True

    knowledge = hidden_knowledge()
    try:
        know3d_pipe.run(image, pipeline_type="1024_cascade", seed=0, knowledge=knowledge, ss_params=FAST,
                        shape_params=FAST, callback=callback, cancel=lambda: state["stop"])
    except Cancelled:
        pass
    else:
        pytest.fail("the run was not cancelled")
    gc.collect()
    assert state["steps"][-1] == ("shape_slat_512", 1)  # stopped right after the step that asked
    assert len(contexts) == 2 and all(ref() is None for ref in contexts)  # SS + 512 contexts released
    for key in MODEL_NAMES:
        assert know3d_pipe.models[key].knowledge_proj._last is None
    # nothing carried over: a fresh run equals a run that was never interrupted
    monkeypatch.setattr(G, "prepare_knowledge", real)
    a = know3d_pipe.run(image, pipeline_type="512", seed=0, knowledge=knowledge, ss_params=FAST, shape_params=FAST)
    fresh = Trellis2GeometryPipeline.from_pretrained(demo.trellis2, device="cpu", dtype="float32", know3d=demo.know3d)
    b = fresh.run(image, pipeline_type="512", seed=0, knowledge=knowledge, ss_params=FAST, shape_params=FAST)
    assert mesh_equal(a.mesh, b.mesh)


def test_missing_dinov3_and_models_name_the_fix(demo, image):
    pipe = Trellis2GeometryPipeline.from_pretrained(demo.trellis2, device="cpu", dtype="float32",
                                                    dinov3=None, pipeline_types=["512"])
    assert "shape_slat_flow_model_1024" not in pipe.models
    with pytest.raises(KeyError, match="shape_slat_flow_model_1024.*pipeline_types"):
        pipe.model("shape_slat_flow_model_1024")
    pipe.image_cond_model = None
    with pytest.raises(FileNotFoundError, match="dinov3-vitl16-pretrain-lvd1689m"):
        pipe.get_cond(image.convert("RGB"), 512)


def test_merged_know3d_file_loads_like_the_delta_file(demo, know3d_pipe, image, tmp_path):
    """A merged Know3D file (official weights + branch + LoRA folded in) replaces the flows and gives
    what the delta file applied to the official flows gives."""
    from know3d_core.knowledge import apply_know3d

    flows = load_pipeline_models(demo.trellis2, keys=MODEL_NAMES, dtype="float32")
    apply_know3d(flows, demo.know3d, merge=False)  # LoRA attached; save_know3d folds it
    merged = tmp_path / "know3d_merged.safetensors"
    save_know3d(merged, flows, content="merged")
    pipe = Trellis2GeometryPipeline.from_pretrained(demo.trellis2, device="cpu", dtype="float32", know3d=merged)
    assert pipe.know3d_spec.knowledge_kind == "mmdit_hidden"
    a = pipe.run(image, pipeline_type="512", seed=0, knowledge=hidden_knowledge(), ss_params=FAST, shape_params=FAST)
    b = know3d_pipe.run(image, pipeline_type="512", seed=0, knowledge=hidden_knowledge(), ss_params=FAST,
                        shape_params=FAST)
    assert torch.equal(a.coords, b.coords)
    torch.testing.assert_close(a.slat.feats, b.slat.feats, rtol=1e-5, atol=1e-5)


def test_1024_type_on_an_official_size_structure_latent(tmp_path_factory, demo, image):
    """``1024``: structure coords on 64^3 (no pooling), the 1024 shape model with DINOv3 at 1024 px."""
    from know3d_core.demo_models import write_demo_trellis2

    folder = write_demo_trellis2(str(tmp_path_factory.mktemp("t2_16") / "TRELLIS.2-4B"), ss_resolution=16)
    pipe = Trellis2GeometryPipeline.from_pretrained(folder, device="cpu", dtype="float32", dinov3=demo.dinov3,
                                                    pipeline_types=["1024"])
    assert "shape_slat_flow_model_512" not in pipe.models
    sizes = []
    real = pipe.get_cond
    pipe.get_cond = lambda images, res: sizes.append(res) or real(images, res)
    steps = []
    res = pipe.run(image, pipeline_type="1024", seed=0, ss_params={"steps": 1}, shape_params={"steps": 2},
                   callback=lambda *a: steps.append(a))
    assert sizes == [512, 1024] and res.resolution == 1024
    assert steps == [("sparse_structure", 1, 1), ("shape_slat_1024", 1, 2), ("shape_slat_1024", 2, 2)]
    assert int(res.coords[:, 1:].max()) >= 32  # a 64^3 grid, not pooled to 32^3
    assert torch.equal(res.slat.coords, res.coords)  # the 1024 model runs on the structure coords
    res.mesh.validate()
