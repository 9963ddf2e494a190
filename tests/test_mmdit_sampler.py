"""Our Edit-Plus sampling loop: parity with diffusers' pipeline, early exit, trajectory re-forward."""
import pytest
import torch

from know3d_core.mmdit import CaptureSpec, flow_match_sigmas, nearest_step
from know3d_core.mmdit.backview import QwenEditBackView
from know3d_core.mmdit.loading import QwenEditComponents
from know3d_core.mmdit.schedule import QWEN_IMAGE_SCHEDULER_CONFIG

from test_mmdit_common import JOINT_DIM, random_image, tiny_transformer, tiny_vae

AREA = 64 * 64     # reference images VAE-encoded at 64x64 instead of 1024x1024 (CPU speed)


@pytest.fixture(scope="module")
def backview():
    comp = QwenEditComponents(transformer=tiny_transformer(num_layers=4), vae=tiny_vae(), text_encoder=None,
                              processor=None, scheduler_config=dict(QWEN_IMAGE_SCHEDULER_CONFIG), model_name="tiny")
    return QwenEditBackView(comp, vae_image_area=AREA)


@pytest.fixture(scope="module")
def embeds():
    g = torch.Generator().manual_seed(7)
    pe, ne = torch.randn(1, 7, JOINT_DIM, generator=g), torch.randn(1, 5, JOINT_DIM, generator=g)
    pm = torch.ones(1, 7, dtype=torch.long)
    pm[0, 6] = 0
    return pe, pm, ne, torch.ones(1, 5, dtype=torch.long)


def _count_forwards(model):
    calls = []
    return calls, model.register_forward_pre_hook(lambda m, a: calls.append(1))


@pytest.mark.parametrize("n_images", [1, 2])
def test_latents_equal_diffusers_edit_plus_pipeline(backview, embeds, monkeypatch, n_images):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus
    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", AREA)
    pe, pm, ne, nm = embeds
    images = [random_image(80, 64, seed=1), random_image(48, 64, seed=2)][:n_images]
    pipe = QwenImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
                                     vae=backview.c.vae, text_encoder=None, tokenizer=None, processor=None,
                                     transformer=backview.c.transformer)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(image=images, prompt_embeds=pe, prompt_embeds_mask=pm, negative_prompt_embeds=ne,
                  negative_prompt_embeds_mask=nm, true_cfg_scale=4.0, num_inference_steps=4, height=64, width=96,
                  generator=torch.Generator().manual_seed(3), output_type="latent").images
    ours = backview(images, prompt_embeds=pe, prompt_mask=pm, negative_embeds=ne, negative_mask=nm, steps=4,
                    height=64, width=96, generator=torch.Generator().manual_seed(3), decode=False)
    assert ours.inputs.n_target == 24 and len(ours.inputs.ref_grids) == n_images
    assert torch.equal(ours.latents, theirs)


def _run(backview, embeds, **kw):
    pe, pm, ne, nm = embeds
    img = random_image(80, 64, seed=1)
    return backview([img], prompt_embeds=pe, prompt_mask=pm, negative_embeds=ne, negative_mask=nm, steps=6,
                    height=64, width=96, generator=torch.Generator().manual_seed(3), decode=False, **kw)


@pytest.fixture(scope="module")
def full_run(backview, embeds):
    calls, h = _count_forwards(backview.c.transformer)
    try:
        res = _run(backview, embeds)   # no capture: trajectory only
    finally:
        h.remove()
    return res, len(calls)


def test_trajectory_reforward_equals_in_loop_capture(backview, embeds, full_run):
    full, n_calls = full_run
    assert n_calls == 12 == full.sample.forwards and not full.sample.exited_early  # 6 steps x (cond + uncond)
    assert [s.sigma for s in full.trajectory.steps] == flow_match_sigmas(6, 24)[:-1].tolist()
    spec = CaptureSpec(layers=(0, 2, 3), sigma=0.4)
    in_loop = _run(backview, embeds, capture=spec)
    assert torch.equal(in_loop.latents, full.latents)      # capturing changes nothing
    re = backview.sampler.capture_from_trajectory(full.trajectory, full.inputs, spec)
    assert re.step_index == in_loop.knowledge.step_index and re.sigma == in_loop.knowledge.sigma
    assert torch.equal(re.hidden, in_loop.knowledge.hidden)
    assert re.hidden.shape == (1, 24, 3 * 32)


@pytest.mark.parametrize("sigma", [0.85, 0.5, 0.25])
def test_early_exit_runs_exactly_the_steps_down_to_sigma(backview, embeds, full_run, sigma):
    full, _ = full_run
    spec = CaptureSpec(layers=(1, 3), sigma=sigma)
    k = nearest_step(flow_match_sigmas(6, 24), sigma).index
    calls, h = _count_forwards(backview.c.transformer)
    seen = []
    try:
        early = _run(backview, embeds, capture=spec, early_exit=True, progress=lambda i, n: seen.append((i, n)))
    finally:
        h.remove()
    assert seen == [(i + 1, k + 1) for i in range(k + 1)]
    # steps 0..k-1 run cond + uncond, step k runs its cond forward only
    assert len(calls) == 2 * k + 1 == early.sample.forwards and early.sample.steps_run == k + 1
    assert early.sample.exited_early and early.images is None
    assert len(early.trajectory.steps) == k + 1
    assert torch.equal(early.latents, full.trajectory.steps[k].latent)
    # the state is the one a full run's trajectory gives at that step
    ref = backview.sampler.capture_from_trajectory(full.trajectory, full.inputs, spec)
    assert early.knowledge.step_index == k == ref.step_index
    assert torch.equal(early.knowledge.hidden, ref.hidden)


def test_knowledge_provenance(backview, embeds):
    res = _run(backview, embeds, capture=CaptureSpec(sigma=0.25))
    k = res.knowledge
    sched = flow_match_sigmas(6, 24)
    assert k.layers == (1, 2, 3) and k.sigma == sched[k.step_index].item() and k.sigma_requested == 0.25
    assert k.resolution == (64, 96) and k.token_grid == (4, 6) and k.model_name == "tiny"
    meta = k.metadata()
    assert meta["branch"] == "cond" and meta["tokens"] == "target" and meta["shape"] == [1, 24, 96]


def test_cancel_stops_before_the_next_step(backview, embeds):
    from know3d_core.sampling import Cancelled
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > 2

    calls, h = _count_forwards(backview.c.transformer)
    try:
        with pytest.raises(Cancelled, match="before step 3 of 6"):
            _run(backview, embeds, cancel=cancel)
    finally:
        h.remove()
    assert len(calls) == 4     # two full CFG steps ran


def test_sampler_validates_inputs(backview, embeds):
    with pytest.raises(ValueError, match="early_exit"):
        _run(backview, embeds, early_exit=True)
