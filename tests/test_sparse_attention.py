"""varlen_attention == per-sample attention, for every strategy it picks."""
import math

import pytest
import torch

from know3d_core.sparse import varlen_attention
from know3d_core.sparse import attention as attention_module


def per_sample_reference(q, k, v, q_lens, kv_lens, scale=None):
    """fp64 softmax(q k^T * scale) v, one batch item at a time."""
    outs, a, b = [], 0, 0
    for nq, nk in zip(q_lens, kv_lens):
        qi, ki, vi = (t.double().transpose(0, 1) for t in (q[a:a + nq], k[b:b + nk], v[b:b + nk]))
        s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        outs.append(((qi @ ki.transpose(1, 2)) * s).softmax(-1).matmul(vi).transpose(0, 1))
        a, b = a + nq, b + nk
    return torch.cat(outs)


CASES = {
    "self_equal": ([9, 9, 9], None, "_equal_lengths"),
    "self_ragged": ([5, 13, 1], None, "_per_item"),
    "cross_equal_kv_ragged_q": ([4, 11], [6, 6], "_padded_queries"),
    "cross_ragged": ([7, 3], [2, 10], "_per_item"),
    "cross_equal": ([8, 8], [5, 5], "_equal_lengths"),
    "empty_item": ([0, 6], [3, 4], "_per_item"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_varlen_matches_per_sample(name, monkeypatch):
    q_lens, kv_lens, strategy = CASES[name]
    kv = q_lens if kv_lens is None else kv_lens
    H, D, Dv = 3, 8, 5
    q, k, v = torch.randn(sum(q_lens), H, D), torch.randn(sum(kv), H, D), torch.randn(sum(kv), H, Dv)
    used = []
    real = getattr(attention_module, strategy)
    monkeypatch.setattr(attention_module, strategy, lambda *a: used.append(1) or real(*a))
    out = varlen_attention(q, k, v, q_lens, kv_lens)
    assert used, f"expected strategy {strategy}"
    assert out.shape == (sum(q_lens), H, Dv)
    assert torch.allclose(out.double(), per_sample_reference(q, k, v, q_lens, kv), atol=1e-5)


def test_tensor_seqlens_and_scale():
    q_lens = torch.tensor([3, 7])
    q, k, v = torch.randn(10, 2, 4), torch.randn(10, 2, 4), torch.randn(10, 2, 4)
    out = varlen_attention(q, k, v, q_lens, q_lens, scale=0.3)
    assert torch.allclose(out.double(), per_sample_reference(q, k, v, [3, 7], [3, 7], 0.3), atol=1e-5)


def test_bad_inputs_raise():
    q = torch.randn(6, 2, 4)
    with pytest.raises(ValueError, match="q_seqlens"):
        varlen_attention(q, q, q, [2, 3])
    with pytest.raises(ValueError, match="ndim 3"):
        varlen_attention(q[:, 0], q, q, [6])
    with pytest.raises(ValueError, match="no keys"):
        varlen_attention(q, q[:3], q[:3], [3, 3], [3, 0])
    with pytest.raises(ValueError, match="key lengths"):
        varlen_attention(q, q, q, [3, 3], [6])
    with pytest.raises(ValueError, match="mismatch"):
        varlen_attention(q, torch.randn(6, 3, 4), torch.randn(6, 3, 4), [6])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_varlen_matches_per_sample(dtype):
    for name, (q_lens, kv_lens, _) in CASES.items():
        kv = q_lens if kv_lens is None else kv_lens
        q, k, v = (torch.randn(sum(n), 4, 64) for n in (q_lens, kv, kv))
        out = varlen_attention(q.cuda().to(dtype), k.cuda().to(dtype), v.cuda().to(dtype), q_lens, kv_lens)
        ref = per_sample_reference(q.to(dtype), k.to(dtype), v.to(dtype), q_lens, kv)
        assert (out.cpu().double() - ref).abs().max().item() < 2e-2, name


def test_padding_index_places_each_item_at_its_slots():
    """Item b's n_b rows go to slots b*L .. b*L + n_b - 1 of the padded layout."""
    idx = attention_module._padding_index([2, 0, 3], 4, torch.device("cpu"))
    assert idx.tolist() == [0, 1, 8, 9, 10]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_varlen_with_python_lengths_never_syncs():
    """With the lengths as python ints every strategy only queues work (the padded-query one included:
    its row index is made on the device); torch's sync debug mode raises on any synchronising call."""
    inputs = {}
    for name, (q_lens, kv_lens, _) in CASES.items():
        kv = q_lens if kv_lens is None else kv_lens
        inputs[name] = [torch.randn(sum(n), 4, 64, device="cuda", dtype=torch.bfloat16) for n in (q_lens, kv, kv)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, (q_lens, kv_lens, _) in CASES.items():
            varlen_attention(*inputs[name], q_lens, kv_lens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
