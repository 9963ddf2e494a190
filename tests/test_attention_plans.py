"""Attention plans built ahead: the layouts recorded at one batch size, re-batched, are exactly the
layouts the flows use at the other batch size, and the plan-ahead wrapper never changes a sample."""
import pytest
import torch

from know3d_core.knowledge import prepare_knowledge
from know3d_core.sampling import FlowEulerGuidanceIntervalSampler, SamplerParams, dense_cfg_batch, sparse_cfg_batch
from know3d_core.trellis2 import pipeline as pipeline_mod
from know3d_core.trellis2.modules.attention import (_zeros_like_layout, prebuild_attention_plans,
                                                    rebatch_layout, record_attention_layouts)
from know3d_core.trellis2.pipeline import plan_ahead

from _knowledge_helpers import knowledge_tensor, sparse_input, ss_inputs, tiny_slat, tiny_ss, with_branch


def _rebatched(layouts, from_batch, to_batch):
    """The layouts of the tensors :func:`prebuild_attention_plans` hands to SDPA."""
    return {tuple(_layout(_zeros_like_layout(t)) for t in rebatch_layout(lay, from_batch, to_batch))
            for lay in layouts}


def _layout(t):
    return tuple(t.shape), tuple(t.stride()), t.dtype, t.device


def _record(fn, *args):
    with torch.no_grad(), record_attention_layouts() as layouts:
        fn(*args)
    return layouts


def _ss_pair_and_single(model, knowledge=None):
    x, t, cond = ss_inputs(batch=1)
    ctx = None if knowledge is None else prepare_knowledge(model, knowledge)

    def fn(xx, tt, cc):
        return model(xx, tt, cc) if ctx is None else model(xx, tt, cc, knowledge=ctx)

    pair = _record(lambda: dense_cfg_batch(fn)(x, t, cond, torch.zeros_like(cond)))
    single = _record(lambda: fn(x, t, cond))
    return pair, single


def _slat_pair_and_single(model, knowledge=None):
    x = sparse_input([40])
    t = torch.full((1,), 500.0)
    cond = torch.randn(1, 5, 32)
    ctx = None if knowledge is None else prepare_knowledge(model, knowledge)

    def fn(xx, tt, cc):
        return model(xx, tt, cc) if ctx is None else model(xx, tt, cc, knowledge=ctx)

    pair = _record(lambda: sparse_cfg_batch(fn)(x, t, cond, torch.zeros_like(cond)))
    single = _record(lambda: fn(x, t, cond))
    return pair, single


@pytest.mark.parametrize("stage", ["ss", "slat"])
@pytest.mark.parametrize("know3d", [False, True])
def test_rebatched_layouts_are_the_other_batch_sizes_layouts(stage, know3d):
    model = tiny_ss() if stage == "ss" else tiny_slat()
    knowledge = None
    if know3d:
        with_branch(model)
        knowledge = knowledge_tensor()
    pair, single = (_ss_pair_and_single if stage == "ss" else _slat_pair_and_single)(model, knowledge)
    # self, image cross (and knowledge cross): one layout each, every block the same
    assert len(pair) == len(single) == (3 if know3d else 2)
    assert {q[0][0] for q, _, _ in single} == {1}
    # the knowledge branch folds the batch into one long query against the shared keys
    assert sorted(q[0][0] for q, _, _ in pair) == ([1, 2, 2] if know3d else [2, 2])
    assert _rebatched(pair, 2, 1) == single
    folded = {lay for lay in pair if lay[0][0][0] == 1}
    # from a single pass the folded query cannot be told from a plain one: the rest must match
    assert pair - folded <= _rebatched(single, 1, 2)
    if not know3d:
        assert _rebatched(single, 1, 2) == pair


def test_packed_ragged_batches_are_not_recorded():
    model = tiny_slat()
    x = sparse_input([30, 41])
    layouts = _record(model, x, torch.full((2,), 500.0), torch.randn(2, 5, 32))
    # samples of different lengths are packed: self and cross attention both take the varlen path
    # (per-sample SDPA calls of per-object shapes), which plan-ahead leaves alone
    assert layouts == set()


def test_prebuild_is_cuda_only():
    _, single = _ss_pair_and_single(tiny_ss())
    assert prebuild_attention_plans(single, 1, 2) == 0


def _params(steps=6, interval=(0.6, 1.0)):
    return SamplerParams(steps=steps, guidance_strength=3.0, guidance_rescale=0.5,
                         guidance_interval=interval, rescale_t=3.0)


def _spy(monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline_mod, "prebuild_attention_plans",
                        lambda layouts, a, b: calls.append((set(layouts), a, b)) or len(layouts))
    return calls


def test_plan_ahead_prebuilds_the_single_pass_once_and_changes_nothing(monkeypatch):
    calls = _spy(monkeypatch)
    model = tiny_ss()
    x, t, cond = ss_inputs(batch=1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    params = _params()
    sampler = FlowEulerGuidanceIntervalSampler(params)

    def fn(xx, tt, cc):
        return model(xx, tt, cc)

    neg = torch.zeros_like(cond)
    plain = sampler.sample(fn, noise, cond, neg, batched_model_fn=dense_cfg_batch(fn))
    wfn, wbatched = plan_ahead(fn, dense_cfg_batch(fn), params, torch.device("cuda"))
    wrapped = sampler.sample(wfn, noise, cond, neg, batched_model_fn=wbatched)
    assert torch.equal(plain, wrapped)
    # the schedule starts inside the guidance interval: the first forward is the B=2 pair, so the
    # B=1 layouts are prebuilt, once, from the pair's recorded layouts
    assert len(calls) == 1
    layouts, from_batch, to_batch = calls[0]
    assert (from_batch, to_batch) == (2, 1) and {q[0][0] for q, _, _ in layouts} == {2}
    _, single = _ss_pair_and_single(model)
    assert _rebatched(layouts, 2, 1) == single


def test_plan_ahead_first_single_pass_prebuilds_the_pair(monkeypatch):
    calls = _spy(monkeypatch)
    model = tiny_ss()
    params = _params(interval=(0.0, 0.5))  # t = 1 is outside: the first forward is B=1
    fn = lambda xx, tt, cc: model(xx, tt, cc)  # noqa: E731
    wfn, wbatched = plan_ahead(fn, dense_cfg_batch(fn), params, torch.device("cuda"))
    x, t, cond = ss_inputs(batch=1)
    FlowEulerGuidanceIntervalSampler(params).sample(wfn, x, cond, torch.zeros_like(cond), batched_model_fn=wbatched)
    assert len(calls) == 1 and calls[0][1:] == (1, 2)


@pytest.mark.parametrize("device, interval, batched", [
    ("cpu", (0.6, 1.0), True),      # nothing to build off CUDA
    ("cuda", (0.0, 1.0), True),     # every step is a CFG pair: one batch size only
    ("cuda", (0.6, 1.0), False),    # no batched function (e.g. multi-view stochastic)
])
def test_plan_ahead_is_a_no_op_when_nothing_switches(device, interval, batched):
    fn = lambda *a: None  # noqa: E731
    bfn = dense_cfg_batch(fn) if batched else None
    assert plan_ahead(fn, bfn, _params(interval=interval), torch.device(device)) == (fn, bfn)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prebuild_runs_every_recorded_layout_on_cuda():
    model = tiny_ss().cuda()
    x, t, cond = (a.cuda() for a in ss_inputs(batch=1))
    with torch.no_grad(), record_attention_layouts() as layouts:
        dense_cfg_batch(model)(x, t, cond, torch.zeros_like(cond))
    assert prebuild_attention_plans(layouts, 2, 1) == len(layouts) == 2
