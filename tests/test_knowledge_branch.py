"""The Know3D injection branch in both TRELLIS.2 flow models (paper §3.2.1)."""
import math

import pytest
import torch
import torch.nn.functional as F

from _knowledge_helpers import (
    KNOW_DIM, knowledge_tensor, randomize_branch, sparse_input, ss_inputs, tiny_slat, tiny_ss, with_branch,
)
from know3d_core.knowledge import (
    KnowledgeContext, dino_image_knowledge, has_branch, install_branch, prepare_knowledge, remove_branch,
)
from know3d_core.knowledge.branch import KnowledgeCrossAttention, KnowledgeProjector


def _slat_inputs(lengths, seed=0):
    x = sparse_input(lengths, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.full((len(lengths),), 600.0)
    cond = torch.randn(len(lengths), 5, 32, generator=g)
    return x, t, cond


# ------------------------------------------------------------------ zero init == plain TRELLIS.2
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_branch_equals_plain_sparse_structure_exactly(dtype):
    plain = tiny_ss(dtype)
    know3d = with_branch(tiny_ss(dtype), zero=True)
    x, t, cond = ss_inputs(batch=2)
    k = knowledge_tensor(batch=1)
    with torch.no_grad():
        ref = plain(x, t, cond)
        out = know3d(x, t, cond, knowledge=k)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lengths", [[40], [30, 30], [25, 41]])
def test_zero_branch_equals_plain_shape_flow_exactly(dtype, lengths):
    plain = tiny_slat(dtype)
    know3d = with_branch(tiny_slat(dtype), zero=True)
    x, t, cond = _slat_inputs(lengths)
    k = knowledge_tensor(batch=1)
    with torch.no_grad():
        ref = plain(x, t, cond).feats
        out = know3d(x, t, cond, knowledge=k).feats
    assert torch.equal(ref, out)


def test_install_keeps_official_keys_and_adds_branch_keys():
    model = tiny_ss()
    before = {k: v.shape for k, v in model.state_dict().items()}
    install_branch(model, KNOW_DIM)
    after = model.state_dict()
    assert all(k in after and after[k].shape == s for k, s in before.items())
    added = sorted(set(after) - set(before))
    assert added and all(k.startswith("knowledge_proj.") or ".knowledge_attn." in k for k in added)
    assert "blocks.1.knowledge_attn.to_out.weight" in added
    assert after["knowledge_proj.linear.weight"].shape == (64, KNOW_DIM)
    remove_branch(model)
    assert set(model.state_dict()) == set(before) and not has_branch(model)


def test_branch_dtypes_follow_the_reference_precision_rule():
    model = with_branch(tiny_ss("bfloat16"), zero=True)
    attn = model.blocks[0].knowledge_attn
    assert attn.to_q.weight.dtype == torch.bfloat16 and attn.to_out.weight.dtype == torch.bfloat16
    assert attn.norm.weight.dtype == torch.float32 and attn.q_rms_norm.gamma.dtype == torch.float32
    assert model.knowledge_proj.linear.weight.dtype == torch.float32


# ------------------------------------------------------------------ non-zero branch
def test_no_knowledge_means_plain_trellis2_even_with_a_trained_branch():
    plain = tiny_ss()
    know3d = with_branch(tiny_ss())
    x, t, cond = ss_inputs()
    with torch.no_grad():
        assert torch.equal(plain(x, t, cond), know3d(x, t, cond, knowledge=None))


@pytest.mark.parametrize("stage", ["ss", "shape"])
def test_nonzero_branch_changes_output_and_depends_on_knowledge(stage):
    if stage == "ss":
        model, (x, t, cond) = with_branch(tiny_ss()), ss_inputs()
        run = lambda k: model(x, t, cond, knowledge=k)  # noqa: E731
    else:
        model, (x, t, cond) = with_branch(tiny_slat()), _slat_inputs([33])
        run = lambda k: model(x, t, cond, knowledge=k).feats  # noqa: E731
    k1, k2 = knowledge_tensor(seed=1), knowledge_tensor(seed=2)
    with torch.no_grad():
        base = run(None)
        a, a_again, b = run(k1), run(k1.clone()), run(k2)
    scale = base.abs().mean()
    assert (a - base).abs().mean() > 1e-2 * scale
    assert (a - b).abs().mean() > 1e-2 * scale
    torch.testing.assert_close(a, a_again, rtol=0, atol=0)


def test_branch_math_matches_an_fp64_recomputation():
    """One block's branch: ZeroLinear(Attn(rms(to_q(LN(h))), rms(K(P)), V(P))) with P = LN(Linear(C))."""
    torch.manual_seed(3)
    C, H, D = 64, 4, 24
    proj = KnowledgeProjector(D, C)
    attn = KnowledgeCrossAttention(C, H)
    with torch.no_grad():
        for p in list(proj.parameters()) + list(attn.parameters()):
            p.copy_(torch.randn(p.shape) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 2 and p.shape == (H, C // H) else 0))
    h = torch.randn(2, 11, C)
    know = torch.randn(2, 6, D)
    with torch.no_grad():
        ctx = proj(know)
        got = attn(h, ctx)

    dd = lambda m: {k: v.double() for k, v in m.state_dict().items()}  # noqa: E731
    pp, aa = dd(proj), dd(attn)
    P = F.layer_norm(know.double() @ pp["linear.weight"].T + pp["linear.bias"], (C,),
                     pp["norm.weight"], pp["norm.bias"], eps=1e-6)
    x = F.layer_norm(h.double(), (C,), aa["norm.weight"], aa["norm.bias"], eps=1e-6)
    q = (x @ aa["to_q.weight"].T + aa["to_q.bias"]).view(2, 11, H, C // H)
    kv = (P @ aa["to_kv.weight"].T + aa["to_kv.bias"]).view(2, 6, 2, H, C // H)
    k, v = kv[:, :, 0], kv[:, :, 1]
    rms = lambda z, g: F.normalize(z, dim=-1) * g * math.sqrt(C // H)  # noqa: E731
    q, k = rms(q, aa["q_rms_norm.gamma"]), rms(k, aa["k_rms_norm.gamma"])
    w = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(C // H)
    o = torch.einsum("bhlm,bmhd->blhd", w.softmax(-1), v).reshape(2, 11, C)
    expected = o @ aa["to_out.weight"].T + aa["to_out.bias"]
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_fresh_branch_output_is_exactly_zero():
    attn = KnowledgeCrossAttention(64, 4)
    proj = KnowledgeProjector(KNOW_DIM, 64)
    out = attn(torch.randn(1, 9, 64), proj(knowledge_tensor()))
    assert torch.count_nonzero(out) == 0


# ------------------------------------------------------------------ sparse: ragged batches
@pytest.mark.parametrize("lengths", [[23, 37], [30, 30]])
@pytest.mark.parametrize("shared", [True, False])
def test_sparse_batch_equals_each_sample_alone(lengths, shared):
    """Ragged or equal lengths, one knowledge for all samples or one per sample."""
    model = with_branch(tiny_slat())
    x, t, cond = _slat_inputs(lengths)
    k = knowledge_tensor(batch=1 if shared else 2, seed=5)
    with torch.no_grad():
        both = model(x, t, cond, knowledge=k).feats
        rows = 0
        for b, n in enumerate(lengths):
            xb = type(x)(x.feats[rows:rows + n], torch.cat([torch.zeros_like(x.coords[rows:rows + n, :1]),
                                                             x.coords[rows:rows + n, 1:]], 1), x.spatial_shape)
            alone = model(xb, t[b:b + 1], cond[b:b + 1], knowledge=k[:1] if shared else k[b:b + 1]).feats
            torch.testing.assert_close(both[rows:rows + n], alone, rtol=1e-5, atol=1e-5)
            rows += n


def test_branch_sees_the_sparse_tensor_the_block_gets():
    model = with_branch(tiny_slat())
    seen = []
    model.blocks[0].knowledge_attn.register_forward_hook(lambda m, a, o: seen.append((type(a[0]).__name__, type(o).__name__)))
    x, t, cond = _slat_inputs([20, 30])
    with torch.no_grad():
        model(x, t, cond, knowledge=knowledge_tensor())
    assert seen == [("SparseTensor", "SparseTensor")]


# ------------------------------------------------------------------ caching: K/V once per generation
def _count_kv_calls(model):
    calls = []
    for block in model.blocks:
        block.knowledge_attn.to_kv.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls


def test_prepared_context_computes_kv_once_and_matches_fresh_projection():
    model = with_branch(tiny_ss())
    x, t, cond = ss_inputs(batch=2)
    k = knowledge_tensor(batch=1)
    with torch.no_grad():
        fresh = model(x, t, cond, knowledge=k.clone())
        calls = _count_kv_calls(model)
        ctx = prepare_knowledge(model, dino_image_knowledge(k, 512))
        assert len(calls) == len(model.blocks)
        outs = [model(x, t * s, cond, knowledge=ctx) for s in (1.0, 0.5, 0.25)]
    assert len(calls) == len(model.blocks)  # three more forwards, no more K/V projections
    assert isinstance(ctx, KnowledgeContext) and ctx.kind == "dino_image"
    torch.testing.assert_close(outs[0], fresh, rtol=0, atol=0)


def test_same_knowledge_tensor_reuses_projection_without_prepare():
    model = with_branch(tiny_ss())
    x, t, cond = ss_inputs()
    k = knowledge_tensor()
    calls = _count_kv_calls(model)
    with torch.no_grad():
        a = model(x, t, cond, knowledge=k)
        model(x, t * 0.5, cond, knowledge=k)
        assert len(calls) == len(model.blocks)
        k.mul_(2.0)  # modified in place: must be projected again
        b = model(x, t, cond, knowledge=k)
        assert len(calls) == 2 * len(model.blocks)
    assert not torch.equal(a, b)


def test_cfg_pair_shares_one_knowledge_batch():
    """A batch-1 context serves a B=2 CFG pair: same as two B=1 runs."""
    model = with_branch(tiny_ss())
    x, t, cond = ss_inputs(batch=2)
    neg = torch.zeros_like(cond[:1])
    cond2 = torch.cat([cond[:1], neg])
    x2 = torch.cat([x[:1], x[:1]])
    with torch.no_grad():
        ctx = prepare_knowledge(model, knowledge_tensor())
        pair = model(x2, t, cond2, knowledge=ctx)
        c = model(x2[:1], t[:1], cond2[:1], knowledge=ctx)
        u = model(x2[1:], t[1:], cond2[1:], knowledge=ctx)
    torch.testing.assert_close(pair, torch.cat([c, u]), rtol=1e-5, atol=1e-5)


def test_knowledge_batch_tiles_over_a_concatenated_cfg_batch():
    """Knowledge for 2 samples, model batch 4 = [cond0, cond1, neg0, neg1]: sample i uses k[i % 2]."""
    model = with_branch(tiny_ss())
    x, t, cond = ss_inputs(batch=4)
    k = knowledge_tensor(batch=2, seed=7)
    with torch.no_grad():
        four = model(x, t, cond, knowledge=k)
        for i in range(4):
            one = model(x[i:i + 1], t[i:i + 1], cond[i:i + 1], knowledge=k[i % 2:i % 2 + 1])
            torch.testing.assert_close(four[i:i + 1], one, rtol=1e-5, atol=1e-5)


def test_knowledge_batch_that_does_not_divide_the_model_batch_is_an_error():
    model = with_branch(tiny_ss())
    x, t, cond = ss_inputs(batch=3)
    with torch.no_grad(), pytest.raises(ValueError, match="batch 2"):
        model(x, t, cond, knowledge=knowledge_tensor(batch=2))


def test_context_of_another_model_is_rejected():
    a, b = with_branch(tiny_ss()), with_branch(tiny_ss(seed=4))
    x, t, cond = ss_inputs()
    with torch.no_grad():
        ctx = prepare_knowledge(a, knowledge_tensor())
        with pytest.raises(ValueError, match="another model"):
            b(x, t, cond, knowledge=ctx)


def test_gradients_reach_the_branch_and_not_through_a_frozen_backbone():
    model = with_branch(tiny_ss())
    for name, p in model.named_parameters():
        p.requires_grad_("knowledge_" in name)
    x, t, cond = ss_inputs()
    out = model(x, t, cond, knowledge=knowledge_tensor())
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["knowledge_proj.linear.weight"].abs().sum() > 0


def test_double_install_and_missing_branch_errors():
    model = with_branch(tiny_ss(), zero=True)
    with pytest.raises(ValueError, match="already has a Know3D branch"):
        install_branch(model, KNOW_DIM)
    with pytest.raises(ValueError, match="no Know3D branch"):
        prepare_knowledge(tiny_ss(), knowledge_tensor())
    x, t, cond = ss_inputs()
    with pytest.raises(ValueError, match="no knowledge branch"):
        tiny_ss()(x, t, cond, knowledge=knowledge_tensor())


def test_randomize_helper_really_sets_every_branch_parameter():
    model = randomize_branch(with_branch(tiny_ss(), zero=True))
    assert all(torch.count_nonzero(p) > 0 for n, p in model.named_parameters() if "knowledge_" in n)


def test_empty_install_has_the_same_tensors_as_an_initialised_one():
    a = with_branch(tiny_ss("bfloat16"), zero=True)
    b = tiny_ss("bfloat16")
    install_branch(b, KNOW_DIM, empty=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    assert all(sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and sb[k].device.type == "cpu" for k in sa)


def test_inference_mode_knowledge_is_cached_by_identity():
    """ComfyUI samples under torch.inference_mode(): its tensors have no version counter."""
    model = with_branch(tiny_ss())
    x, t, cond = ss_inputs()
    calls = _count_kv_calls(model)
    with torch.inference_mode():
        k = knowledge_tensor()
        a = model(x, t, cond, knowledge=k)
        b = model(x, t * 0.5, cond, knowledge=k)
        model(x, t, cond, knowledge=k.clone())
    assert len(calls) == 2 * len(model.blocks)
    assert not torch.equal(a, b)


def test_moving_or_reloading_the_model_drops_the_cached_context():
    model = with_branch(tiny_ss())
    x, t, cond = ss_inputs()
    k = knowledge_tensor()
    calls = _count_kv_calls(model)
    with torch.no_grad():
        model(x, t, cond, knowledge=k)
        model.to(torch.float32)
        model(x, t, cond, knowledge=k)
        assert len(calls) == 2 * len(model.blocks)
        model.load_state_dict(model.state_dict())
        model(x, t, cond, knowledge=k)
    assert len(calls) == 3 * len(model.blocks)
