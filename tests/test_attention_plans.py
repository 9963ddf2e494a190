"""Attention plans built ahead (issue 21): the signatures recorded from the guided steps, with the batch
halved, are exactly the calls the unguided steps make, and building them early changes no number.

torch keeps cuDNN attention plans per (shape, strides); what is checked here is that the prebuilt calls
have the shapes and strides of the later real calls (on the CPU, where SDPA has no plans, the calls
themselves are the same). Its time is for benchmarks/bench_geometry.py --plan-ahead both (GPU; off by
default until that has run).
"""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from know3d_core.geometry_pipeline import PLAN_ATTENTION_AHEAD_BY_DEFAULT
from know3d_core.plan import SS_STAGE
from know3d_core.sampling import SamplerParams, time_schedule, uses_cfg
from know3d_core.sparse import AttentionPlans, attention as sparse_attention, dense_attention, record_attention_plans

from _pipeline_helpers import cpu_geometry, one_thread, tiny_geometry_bench_rows

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def _signature(q, k, v):
    return tuple((tuple(t.shape), t.stride(), t.storage_offset()) for t in (q, k, v))


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every SDPA call's (q, k, v) signature, in order (the real function still runs)."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append(_signature(q, k, v))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def _qkv_packed(B, L, H=2, D=8):
    """q, k, v ``[B, L, H, D]`` as views of one ``[B, L, 3, H, D]`` projection (a self-attention's strides)."""
    qkv = torch.randn(B, L, 3, H, D)
    return qkv.unbind(2)


def test_prebuild_calls_each_recorded_signature_once_at_the_new_batch(sdpa_calls):
    q, k, v = _qkv_packed(4, 6)
    ctx = torch.randn(4, 3, 2, 2, 8)
    with record_attention_plans() as plans:
        dense_attention(q, k, v)
        dense_attention(q, k, v)  # the same signature again: recorded once
        dense_attention(q, ctx[:, :, 0], ctx[:, :, 1])  # cross-attention: another
        dense_attention(*_qkv_packed(2, 6))  # already at the target batch: skipped
    dense_attention(*_qkv_packed(4, 5))  # outside the block: not recorded
    assert len(plans.signatures) == 3
    recorded = sdpa_calls[:]
    assert plans.prebuild(2) == 2
    assert not plans.recording
    prebuilt = sdpa_calls[len(recorded):]
    # the batch dim set to 2, strides and storage offsets as recorded (q/k/v: transposed [B, H, L, D] views of
    # one projection, k and v after q in it)
    want = [tuple(((2, *shape[1:]), stride, offset) for shape, stride, offset in recorded[i]) for i in (0, 2)]
    assert prebuilt == want
    with record_attention_plans() as again:
        pass
    assert again.prebuild(1) == 0 and sparse_attention._recorders == []


def test_a_recorder_ignores_other_threads_calls():
    """torch keeps cuDNN plans per thread, so a call on another thread (a kernel warm-up's forward running
    beside the sampler) says nothing about the plans the recording thread will need."""
    import threading

    q = torch.zeros(2, 2, 3, 4)
    with record_attention_plans() as plans:
        worker = threading.Thread(target=dense_attention, args=(q, q, q))
        worker.start()
        worker.join()
        assert plans.signatures == {}
        dense_attention(q, q, q)
    assert len(plans.signatures) == 1


def test_a_stopped_recorder_takes_no_more_calls():
    plans = AttentionPlans()
    plans.prebuild(1)
    plans.note(*(torch.zeros(1, 2, 3, 4),) * 3, None)
    assert plans.signatures == {}


# ----------------------------------------------------------------------------- in the pipeline
# 5 steps with CFG on t >= 0.5 only: guided first steps, then unguided ones (the official shape
# sampler's pattern, 12 steps on [0.6, 1])
SHAPE = {"steps": 5, "guidance_interval": (0.5, 1.0)}
STAGE = "shape_slat_512"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return cpu_geometry(tmp_path_factory)


def _run(pipe, demo, events, ahead):
    pipe.plan_attention_ahead = ahead
    try:
        return pipe.run(Image.open(demo.image), pipeline_type="512", seed=3, ss_params={"steps": 2},
                        shape_params=SHAPE, callback=lambda stage, step, total: events.append((stage, step)))
    finally:
        pipe.plan_attention_ahead = PLAN_ATTENTION_AHEAD_BY_DEFAULT


def _shape_stage(events):
    """``({step: [signature]}, [prebuilt signature])`` of the shape stage (the events after the structure
    stage's last step): a call belongs to the step whose callback comes next."""
    steps, prebuilt, step = {}, [], 1
    for kind, value in events:
        if kind == "prebuild":
            prebuilt.extend(value)
        elif kind == STAGE:
            step = value + 1
        elif kind == "call":
            steps.setdefault(step, []).append(value)
    return steps, prebuilt


def test_unguided_steps_only_make_calls_that_were_prebuilt(pipe, monkeypatch):
    pipe, demo = pipe
    events = []
    real_sdpa, real_prebuild = F.scaled_dot_product_attention, AttentionPlans.prebuild
    inside = []

    def spy(q, k, v, *args, **kwargs):
        if inside:  # a call made by prebuild
            inside[-1].append(_signature(q, k, v))
        else:
            events.append(("call", _signature(q, k, v)))
        return real_sdpa(q, k, v, *args, **kwargs)

    def prebuild(self, batch):
        inside.append([])
        try:
            return real_prebuild(self, batch)
        finally:
            events.append(("prebuild", inside.pop()))

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(AttentionPlans, "prebuild", prebuild)
    out = _run(pipe, demo, events, ahead=True)

    params = pipe.sampler_params("shape_slat", SHAPE)
    guided = [uses_cfg(t, params) for t in time_schedule(params.steps, params.rescale_t)[:-1]]
    assert guided[0] and not all(guided), guided  # the case this test is about
    prebuilds = [i for i, e in enumerate(events) if e[0] == "prebuild"]
    first_step = events.index((STAGE, 1))
    assert len(prebuilds) == 1 and prebuilds[0] < first_step  # once, at the end of the first step
    calls, prebuilt = _shape_stage(events[events.index((SS_STAGE, 2)) + 1:])
    assert prebuilt and all(sig[0][0][0] == 1 for sig in prebuilt)  # batch 1: the unguided steps' batch
    unguided = {sig for step, sigs in calls.items() if not guided[step - 1] for sig in sigs}
    in_guided = {sig for step, sigs in calls.items() if guided[step - 1] for sig in sigs}
    # every unguided call's plan exists before those steps: prebuilt, or made by the guided steps themselves
    # (the zero negative's shortcut runs the pair's cross-attention at the unguided batch), and nothing else
    # is prebuilt
    assert unguided <= set(prebuilt) | in_guided and set(prebuilt) <= unguided and not set(prebuilt) & in_guided

    # building them early changes nothing
    plain = _run(pipe, demo, [], ahead=False)
    assert torch.equal(out.slat.feats, plain.slat.feats) and torch.equal(out.slat.coords, plain.slat.coords)


def test_off_by_default_and_without_unguided_steps(pipe):
    pipe, _ = pipe
    progress = object()
    assert pipe.plan_attention_ahead is PLAN_ATTENTION_AHEAD_BY_DEFAULT is False  # until measured on CUDA
    with pipe._attention_plan_builds(pipe.sampler_params("shape_slat", SHAPE), 1, progress) as cb:
        assert cb is progress and sparse_attention._recorders == []
    pipe.plan_attention_ahead = True
    try:
        every_step_guided = SamplerParams(steps=4, guidance_interval=(0.0, 1.0))
        with pipe._attention_plan_builds(every_step_guided, 1, progress) as cb:
            assert cb is progress and sparse_attention._recorders == []
        with pipe._attention_plan_builds(pipe.sampler_params("shape_slat", SHAPE), 1, progress) as cb:
            assert cb is not progress and len(sparse_attention._recorders) == 1
    finally:
        pipe.plan_attention_ahead = PLAN_ATTENTION_AHEAD_BY_DEFAULT


def test_geometry_bench_times_the_plans_ahead_off_then_on_each_on_new_tokens(tmp_path):
    """``bench_geometry.py --plan-ahead both`` (the A/B that decides the default): a row without, then one
    with, on token counts no earlier row used (so both pay, or save, the plan builds of a new object)."""
    rows = tiny_geometry_bench_rows(tmp_path, "--plan-ahead", "both")
    assert [r["plan_attention_ahead"] for r in rows] == [False, True]
    tokens = [r["num_tokens"]["shape_slat_512"] for r in rows]
    assert rows[0]["warmup_tokens"] == rows[1]["warmup_tokens"] < tokens[0] < tokens[1]
