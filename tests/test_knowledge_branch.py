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
    branch = [p for n, p in model.named_parameters() if "knowledge_" in n]
    assert branch and all(torch.count_nonzero(p) > 0 for p in branch)  # non-empty: all([]) would pass


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


# ------------------------------------------------------------------ CUDA: fused kernels == PyTorch path
def _fused_available():
    from know3d_core.trellis2.modules import fused
    return torch.cuda.is_available() and fused.triton is not None


cuda = pytest.mark.skipif(not _fused_available(), reason="needs CUDA + Triton")
_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cuda_branch(dtype, C=256, H=2, seed=0):
    """Projector + one block's branch on CUDA, every parameter random (head_dim 128, as the flows)."""
    g = torch.Generator().manual_seed(seed)
    proj, attn = KnowledgeProjector(KNOW_DIM, C, out_dtype=dtype), KnowledgeCrossAttention(C, H)
    with torch.no_grad():
        for name, p in list(proj.named_parameters()) + list(attn.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma") or name == "norm.weight":
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.5 * noise)
            else:  # linear weights
                p.copy_(noise / p.shape[1] ** 0.5)
    for m in attn.modules():
        if isinstance(m, torch.nn.Linear):
            m.to(dtype)
    return proj.cuda(), attn.cuda()


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the branch's fused-kernel calls (proves the CUDA run really took the fused path)."""
    from know3d_core.knowledge import branch as branch_mod
    calls = {"ln": 0, "rms": 0}

    def counted(name, fn):
        def wrapper(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(branch_mod, "layer_norm_modulate", counted("ln", branch_mod.layer_norm_modulate))
    monkeypatch.setattr(branch_mod, "qk_norm_rope", counted("rms", branch_mod.qk_norm_rope))
    return calls


def _branch_ab(proj, attn, h, know, calls):
    """(fused, PyTorch) branch outputs as tensors, each with a freshly projected context."""
    from know3d_core.trellis2.modules.fused import use_fused_kernels
    outs = []
    for on in (True, False):
        before = dict(calls)
        with torch.no_grad(), use_fused_kernels(on):
            proj.clear_cache()
            out = attn(h, proj(know))
        used = calls["ln"] - before["ln"], calls["rms"] - before["rms"]
        assert used == ((1, 2) if on else (0, 0)), used  # LN, q and k RMS norm
        outs.append(out.feats if not isinstance(out, torch.Tensor) else out)
    return outs


@pytest.fixture
def no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("know_batch", [1, 2])
def test_fused_branch_matches_pytorch_branch_dense(dtype, know_batch, fused_calls, no_tf32):
    proj, attn = _cuda_branch(dtype)
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(2, 40, 256, generator=g) * 2 + 0.5).to("cuda", dtype)
    know = knowledge_tensor(batch=know_batch, tokens=19).cuda()
    fast, ref = _branch_ab(proj, attn, h, know, fused_calls)
    assert fast.shape == h.shape and fast.dtype == dtype
    assert torch.isfinite(fast).all() and ref.abs().mean() > 0.1
    assert _rel(fast, ref) <= _TOL[dtype]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths,know_batch", [([23, 37], 1), ([23, 37], 2), ([30, 30], 2)])
def test_fused_branch_matches_pytorch_branch_sparse(dtype, lengths, know_batch, fused_calls, no_tf32):
    """Shared knowledge (one long query), ragged per-sample knowledge (varlen), equal lengths."""
    from know3d_core.sparse import SparseTensor
    proj, attn = _cuda_branch(dtype)
    x = sparse_input(lengths, channels=256)
    h = SparseTensor((x.feats * 2 + 0.5).to("cuda", dtype), x.coords.cuda(), x.spatial_shape,
                     batch_size=len(lengths))
    know = knowledge_tensor(batch=know_batch, tokens=19).cuda()
    fast, ref = _branch_ab(proj, attn, h, know, fused_calls)
    assert fast.shape == h.feats.shape and fast.dtype == dtype
    assert torch.isfinite(fast).all() and ref.abs().mean() > 0.1
    assert _rel(fast, ref) <= _TOL[dtype]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_branch_equals_plain_exactly_on_cuda_with_fused_kernels(dtype):
    with torch.no_grad():
        ss = with_branch(tiny_ss(dtype), zero=True).cuda()
        x, t, cond = (a.cuda() for a in ss_inputs(batch=2))
        assert torch.equal(ss(x, t, cond), ss(x, t, cond, knowledge=knowledge_tensor().cuda()))
        slat = with_branch(tiny_slat(dtype), zero=True).cuda()
        xs, ts, cs = _slat_inputs([25, 41])
        xs, ts, cs = xs.cuda(), ts.cuda(), cs.cuda()
        assert torch.equal(slat(xs, ts, cs).feats, slat(xs, ts, cs, knowledge=knowledge_tensor().cuda()).feats)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_trained_branch_in_fused_blocks_matches_pytorch_path(dtype, monkeypatch, no_tf32):
    """Fused blocks compute the branch's LayerNorm in norm2's pass (``prenormed=True``) and add the
    delta in the next residual: same model output as the PyTorch path, dense and sparse."""
    from know3d_core.trellis2.modules.fused import use_fused_kernels
    seen = []
    forward = KnowledgeCrossAttention.forward

    def spy(self, h, ctx, prenormed=False):
        seen.append(prenormed)
        return forward(self, h, ctx, prenormed)

    monkeypatch.setattr(KnowledgeCrossAttention, "forward", spy)
    tol = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    ss = with_branch(tiny_ss(dtype)).cuda()
    slat = with_branch(tiny_slat(dtype)).cuda()
    x, t, cond = (a.cuda() for a in ss_inputs(batch=2))
    xs, ts, cs = (a.cuda() for a in _slat_inputs([25, 41]))
    know = knowledge_tensor().cuda()
    for model, args, data in ((ss, (x, t, cond), lambda o: o), (slat, (xs, ts, cs), lambda o: o.feats)):
        outs = {}
        for on in (True, False):
            seen.clear()
            with torch.no_grad(), use_fused_kernels(on):
                model.knowledge_proj.clear_cache()
                outs[on] = data(model(*args, knowledge=know))
                plain = data(model(*args))
            assert seen == [on] * len(model.blocks)  # the fused run took the one-pass norm
        assert _rel(outs[True], outs[False]) <= tol
        assert _rel(outs[False], plain) > 20 * tol  # the branch matters: the comparison can fail


def test_prenormed_input_gives_the_same_delta():
    """``forward(norm(h), ctx, prenormed=True)`` (the fused blocks' call) == ``forward(h, ctx)``."""
    model = with_branch(tiny_ss())
    attn = model.blocks[0].knowledge_attn
    weight, bias, eps = attn.prenorm()
    assert weight is attn.norm.weight and bias is attn.norm.bias and eps == attn.norm.eps
    h = torch.randn(2, 9, model.model_channels, generator=torch.Generator().manual_seed(3)) * 2 + 1
    with torch.no_grad():
        ctx = model.knowledge_proj(knowledge_tensor())
        normed = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
        ref = attn(h, ctx)
        assert ref.abs().mean() > 0.01
        assert torch.allclose(attn(normed, ctx, prenormed=True), ref, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(attn(normed, ctx), ref, atol=1e-3)  # normalising twice differs


def test_cached_keys_and_values_are_contiguous_copies():
    """The cache holds k and v alone (v is not a view keeping the whole to_kv output alive)."""
    attn, proj = KnowledgeCrossAttention(64, 4), KnowledgeProjector(KNOW_DIM, 64)
    with torch.no_grad():
        ctx = proj(knowledge_tensor(tokens=9))
        k, v = ctx.kv(attn)
    assert k.shape == v.shape == (1, 9, 4, 64 // 4)  # (batch, knowledge tokens, heads, head dim)
    assert k.is_contiguous() and v.is_contiguous()
    assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
