"""The guided pair's all-zero negative condition (TRELLIS.2's): its cross-attention is one row.

Every key of a zero context is ``to_kv(0)``'s key, so a query's logits are all equal, the softmax is uniform
and the output is ``to_kv(0)``'s value for every query; ``to_out`` of it is the same row for all of that
sample's tokens. ``zero_cond_from`` tells the flows which samples these are; they then skip ``to_q``,
attention and ``to_out`` over those tokens, and SDPA sees only the other samples (the unguided steps' shapes).
Checked here: equal to the plain computation up to rounding, at the attention, the flows (dense, packed,
with the Know3D branch) and the pipeline's wiring; less work (rows into ``to_q``, SDPA batch).
"""
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from know3d_core.geometry_pipeline import ZERO_NEGATIVE_SHORTCUT_BY_DEFAULT
from know3d_core.sampling import dense_cfg_batch, sparse_cfg_batch
from know3d_core.trellis2.modules import attention as attention_mod
from know3d_core.trellis2.modules import blocks as blocks_mod
from know3d_core.trellis2.modules import fused as fused_mod
from know3d_core.trellis2.modules.attention import MultiHeadAttention, TokenLayout

from _knowledge_helpers import knowledge_tensor, sparse_input, ss_inputs, tiny_slat, tiny_ss, with_branch
from _pipeline_helpers import cpu_geometry, one_thread, tiny_geometry_bench_rows

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def _cross(qk_rms_norm: bool, bias: bool, seed: int = 0) -> MultiHeadAttention:
    torch.manual_seed(seed)
    m = MultiHeadAttention(32, 4, ctx_channels=16, type="cross", qkv_bias=bias, qk_rms_norm=qk_rms_norm)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)  # biases too: a zero token's key and value are not zero
    return m


def _layout(lens) -> TokenLayout:
    lens_t = torch.tensor(lens)
    return TokenLayout(lens_t, list(lens), torch.repeat_interleave(torch.arange(len(lens)), lens_t))


@pytest.mark.parametrize("qk_rms_norm", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("first", [0, 1, 2, 3])
def test_attention_with_zero_contexts_from_a_sample_on(qk_rms_norm, bias, first):
    m = _cross(qk_rms_norm, bias)
    ctx = torch.randn(3, 7, 16)
    ctx[first:] = 0
    x = torch.randn(3, 10, 32)
    got, ref = m(x, ctx, zero_from=first), m(x, ctx)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    tail = got[first:].reshape(-1, 32)
    assert torch.equal(tail, tail[:1].expand_as(tail))  # one row for every zero-context token
    lens = [4, 6, 5]
    xp = torch.randn(1, sum(lens), 32)
    got, ref = m(xp, ctx, layout=_layout(lens), zero_from=first), m(xp, ctx, layout=_layout(lens))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_zero_samples_skip_the_query_projection_and_attention(monkeypatch):
    m = _cross(True, True)
    ctx = torch.cat([torch.randn(1, 7, 16), torch.zeros(2, 7, 16)])
    rows, batches = [], []
    m.to_q.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:2]))
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: batches.append(q.shape[0]) or real(q, *a, **k))
    m(torch.randn(3, 10, 32), ctx, zero_from=1)
    assert rows == [(1, 10)] and batches == [1]  # the first sample only: the unguided steps' batch
    with pytest.raises(ValueError, match=r"zero_from must be in \[0, 3\]"):
        m(torch.randn(3, 10, 32), ctx, zero_from=4)


def _pair(cond):
    return torch.cat([cond, torch.zeros_like(cond)])


@pytest.fixture
def cross_batches(monkeypatch):
    """The batch of every SDPA call whose keys are the condition's (``COND_TOKENS`` long)."""
    batches = []
    real = F.scaled_dot_product_attention

    def spy(q, k, *args, **kwargs):
        if k.shape[2] == COND_TOKENS:
            batches.append(q.shape[0])
        return real(q, k, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return batches


COND_TOKENS = 5


def test_structure_flow_pair_with_a_zero_negative(cross_batches):
    model = tiny_ss()
    x, t, cond = ss_inputs(batch=1, cond_tokens=COND_TOKENS)
    x2, t2, c2 = torch.cat([x, x]), torch.cat([t, t]), _pair(cond)
    got = model(x2, t2, c2, zero_cond_from=1)
    assert cross_batches == [1] * len(model.blocks)  # every block's cross-attention: the positive half only
    torch.testing.assert_close(got, model(x2, t2, c2), rtol=1e-4, atol=1e-5)
    assert cross_batches[len(model.blocks):] == [2] * len(model.blocks)


@pytest.mark.parametrize("lengths", [[40, 40], [30, 45, 30, 45]], ids=["pair", "ragged-pairs"])
def test_shape_flow_pair_with_a_zero_negative_and_knowledge(lengths, cross_batches):
    """Equal lengths run dense ``[B, L, C]``, ragged ones packed ``[1, N, C]``; the Know3D branch on."""
    model = with_branch(tiny_slat(), seed=3)
    half = len(lengths) // 2
    x = sparse_input(lengths)
    t = torch.full((len(lengths),), 500.0)
    cond = _pair(torch.randn(half, COND_TOKENS, 32))
    know = knowledge_tensor(batch=len(lengths))
    got = model(x, t, cond, knowledge=know, zero_cond_from=half)
    calls = len(cross_batches)
    assert calls and sum(cross_batches) == half * len(model.blocks)  # the positive half's samples only
    ref = model(x, t, cond, knowledge=know)
    assert sum(cross_batches[calls:]) == len(lengths) * len(model.blocks)
    torch.testing.assert_close(got.feats, ref.feats, rtol=1e-4, atol=1e-5)


def test_cfg_batches_pass_the_zero_half_only_when_told():
    seen = []

    def model(x, t, cond, **kw):
        seen.append(kw)
        return x

    x, t, c = torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 4, 5)
    dense_cfg_batch(model)(x, t, c, c)
    dense_cfg_batch(model, neg_is_zero=True)(x, t, c, c)
    sparse_cfg_batch(model, neg_is_zero=True)(sparse_input([5, 7], channels=3), t, c, c)
    assert seen == [{}, {"zero_cond_from": 2}, {"zero_cond_from": 2}]


# ----------------------------------------------------------------------------- in the pipeline
@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return cpu_geometry(tmp_path_factory)


def test_pipeline_tells_the_flows_when_its_negative_is_zero(pipe, monkeypatch):
    pipe, demo = pipe
    assert pipe.zero_negative_shortcut is ZERO_NEGATIVE_SHORTCUT_BY_DEFAULT is True
    image = pipe.preprocess(Image.open(demo.image))
    cond = pipe.get_cond(image, 512)
    flow = pipe.model("sparse_structure_flow_model")
    calls = []
    real = type(flow).forward
    monkeypatch.setattr(type(flow), "forward", lambda self, *a, **kw: calls.append(kw.get("zero_cond_from"))
                        or real(self, *a, **kw))
    params = {"steps": 2}
    a = pipe.sample_sparse_structure(cond, generator=torch.Generator().manual_seed(1), params=params)
    # 2 steps at t = 1 and 5 * 0.5 / (1 + 4 * 0.5) = 0.83 (rescale_t 5), both in the interval [0.6, 1]: two guided
    # pair forwards, each told its negative half starts at sample 1
    assert calls == [1, 1]
    pipe.zero_negative_shortcut = False
    try:
        b = pipe.sample_sparse_structure(cond, generator=torch.Generator().manual_seed(1), params=params)
    finally:
        pipe.zero_negative_shortcut = ZERO_NEGATIVE_SHORTCUT_BY_DEFAULT
    assert calls[2:] == [None, None]
    assert torch.equal(a, b)  # the same occupancy (the latents differ by rounding only)
    calls.clear()
    given = {"cond": cond["cond"], "neg_cond": torch.full_like(cond["cond"], 0.5)}  # a non-zero negative
    pipe.sample_sparse_structure(given, generator=torch.Generator().manual_seed(1), params=params)
    assert calls == [None, None]


def test_geometry_bench_times_the_shortcut_off_then_on(tmp_path):
    rows = tiny_geometry_bench_rows(tmp_path, "--zero-negative", "both")
    assert [r["zero_negative_shortcut"] for r in rows] == [False, True]
    tokens = [r["num_tokens"]["shape_slat_512"] for r in rows]
    assert rows[0]["warmup_tokens"] < tokens[0] < tokens[1]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or fused_mod.triton is None,
                    reason="needs Triton and TRITON_INTERPRET=1 (the fused block kernels on CPU tensors)")
def test_fused_block_path_with_a_zero_negative_in_the_interpreter(monkeypatch, cross_batches):
    """The blocks' fused path (what CUDA runs), here on CPU tensors through Triton's interpreter: with and
    without the shortcut, both flows, the Know3D branch on the shape flow."""
    for module in (fused_mod, blocks_mod, attention_mod):
        monkeypatch.setattr(module, "fused_enabled", lambda x: True)
    ss = tiny_ss()
    x, t, cond = ss_inputs(batch=1, cond_tokens=COND_TOKENS)
    x2, t2, c2 = torch.cat([x, x]), torch.cat([t, t]), _pair(cond)
    got = ss(x2, t2, c2, zero_cond_from=1)
    assert cross_batches == [1] * len(ss.blocks)  # the fused block passed it on
    torch.testing.assert_close(got, ss(x2, t2, c2), rtol=1e-4, atol=1e-5)
    slat = with_branch(tiny_slat(), seed=3)
    xs, ts = sparse_input([40, 40]), torch.full((2,), 500.0)
    cs, know = _pair(torch.randn(1, COND_TOKENS, 32)), knowledge_tensor(batch=2)
    torch.testing.assert_close(slat(xs, ts, cs, knowledge=know, zero_cond_from=1).feats,
                               slat(xs, ts, cs, knowledge=know).feats, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_flows_with_a_zero_negative():
    """The fused block path (CUDA + Triton) in bf16: the same as without, to bf16 rounding."""
    ss = tiny_ss("bfloat16").cuda()
    x, t, cond = (v.cuda() for v in ss_inputs(batch=1, cond_tokens=5))
    x2, t2, c2 = torch.cat([x, x]), torch.cat([t, t]), _pair(cond)
    got, ref = ss(x2, t2, c2, zero_cond_from=1), ss(x2, t2, c2)
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    slat = tiny_slat("bfloat16").cuda()
    xs = sparse_input([40, 40]).to("cuda")
    ts = torch.full((2,), 500.0, device="cuda")
    cs = _pair(torch.randn(1, 6, 32, device="cuda"))
    got, ref = slat(xs, ts, cs, zero_cond_from=1).feats, slat(xs, ts, cs).feats
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()
