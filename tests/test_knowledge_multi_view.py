"""multi_view: the back image as a second image condition of plain TRELLIS.2, three combinators."""
import pytest
import torch

from _knowledge_helpers import ss_inputs, tiny_ss
from know3d_core.knowledge import MultiViewCondition, multi_view_condition, multi_view_model_fn
from know3d_core.sampling import FlowEulerGuidanceIntervalSampler, SamplerParams


class Recorder:
    """Stand-in velocity model: v = mean of cond tokens (broadcast); records which cond it saw."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, t, cond):
        self.seen.append((float(t[0]), cond))
        return x * 0 + cond.mean(dim=(1, 2)).view(-1, *([1] * (x.dim() - 1)))


def _views(b=1):
    front = torch.full((b, 3, 4), 1.0)
    back = torch.full((b, 5, 4), 3.0)
    return front, back


def test_stochastic_alternates_views_per_step_like_the_reference():
    """TRELLIS v1 run_multi_image('stochastic'): step i uses view i % V; both CFG passes of a step
    see the same step; a new run starts again at view 0."""
    front, back = _views()
    rec = Recorder()
    params = SamplerParams(steps=6, guidance_strength=3.0, guidance_interval=(0.0, 1.0), rescale_t=1.0)
    sampler = FlowEulerGuidanceIntervalSampler(params)
    cond = multi_view_condition(front, back, "stochastic")
    fn = multi_view_model_fn(rec)
    for _ in range(2):
        rec.seen.clear()
        sampler.sample(fn, torch.zeros(1, 2), cond, cond.negative())
        positives = [c for _, c in rec.seen if c.abs().sum() > 0]
        assert len(positives) == 6
        assert [c is front for c in positives] == [True, False] * 3
        assert [c is back for c in positives] == [False, True] * 3


def test_multidiffusion_averages_the_views_conditional_velocities():
    front, back = _views()
    model = tiny_ss()
    x, t, _ = ss_inputs()
    f, b = torch.randn(1, 5, 32), torch.randn(1, 7, 32)
    fn = multi_view_model_fn(lambda x_, t_, c: model(x_, t_, c))
    with torch.no_grad():
        got = fn(x, t, MultiViewCondition([f, b], "multidiffusion"))
        want = (model(x, t, f) + model(x, t, b)) / 2
        neg = fn(x, t, torch.zeros_like(f))
        assert torch.equal(neg, model(x, t, torch.zeros_like(f)))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_concat_is_one_forward_on_both_views_tokens():
    model = tiny_ss()
    x, t, _ = ss_inputs()
    f, b = torch.randn(1, 5, 32), torch.randn(1, 7, 32)
    cond = MultiViewCondition([f, b], "concat")
    calls = []
    fn = multi_view_model_fn(lambda x_, t_, c: calls.append(c.shape) or model(x_, t_, c))
    with torch.no_grad():
        got = fn(x, t, cond)
        assert torch.equal(got, model(x, t, torch.cat([f, b], 1)))
        # zero negative tokens: every key is the same, so the token count does not matter
        z1 = model(x, t, torch.zeros(1, 5, 32))
        z2 = model(x, t, torch.zeros(1, 12, 32))
    assert calls == [(1, 12, 32)]
    torch.testing.assert_close(z1, z2, rtol=1e-5, atol=1e-5)


def test_sparse_predictions_are_averaged_on_feats():
    from _knowledge_helpers import sparse_input

    x = sparse_input([5, 6], channels=3)
    fn = multi_view_model_fn(lambda x_, t_, c: x_.replace(x_.feats * c.mean()))
    out = fn(x, torch.zeros(2), MultiViewCondition([torch.ones(2, 1, 2), 3 * torch.ones(2, 1, 2)], "multidiffusion"))
    assert out.coords is x.coords
    torch.testing.assert_close(out.feats, 2 * x.feats)


def test_condition_errors():
    with pytest.raises(ValueError, match="unknown multi-view mode 'mix'"):
        MultiViewCondition([torch.zeros(1, 2, 3)], "mix")
    with pytest.raises(ValueError, match="at least one view"):
        MultiViewCondition([])
    with pytest.raises(ValueError, match="view 1 has shape"):
        MultiViewCondition([torch.zeros(1, 2, 3), torch.zeros(1, 2, 4)])
