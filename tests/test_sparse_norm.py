"""Norms, linear and activations on SparseTensor match their dense definitions."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from know3d_core.sparse import (
    SparseActivation,
    SparseGELU,
    SparseGroupNorm,
    SparseGroupNorm32,
    SparseLayerNorm,
    SparseLayerNorm32,
    SparseLinear,
    SparseSiLU,
    sparse_apply,
)

from _sparse_helpers import random_sparse


def test_group_norm_is_per_batch_item():
    """Reference semantics: nn.GroupNorm on [1, C, N_b] for each batch item separately."""
    x = random_sparse((6, 6, 6), [40, 17, 25], 12)
    x = x.replace(x.feats * torch.tensor([1.0, 5.0, -3.0])[x.batch_index].unsqueeze(1) + 2.0)
    norm = SparseGroupNorm(4, 12)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    ref = torch.cat([
        nn.functional.group_norm(x.feats[s].double().t()[None], 4, norm.weight.double(), norm.bias.double(), norm.eps)[0].t()
        for s in x.layout
    ])
    assert torch.allclose(norm(x).feats.double(), ref, atol=1e-5)


def test_norm32_variants_compute_in_fp32():
    x = random_sparse((5, 5, 5), [30, 20], 8, dtype=torch.bfloat16)
    gn = SparseGroupNorm32(2, 8)
    ref = SparseGroupNorm(2, 8)(x.float()).feats
    out = gn(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out.feats, ref.to(torch.bfloat16))
    ln = SparseLayerNorm32(8, eps=1e-6)
    out = ln(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.feats, F.layer_norm(x.feats.float(), (8,), ln.weight, ln.bias, 1e-6).to(torch.bfloat16))
    ln_noaffine = SparseLayerNorm32(8, elementwise_affine=False)
    assert torch.equal(ln_noaffine(x).feats, F.layer_norm(x.feats.float(), (8,)).to(torch.bfloat16))


def test_layer_norm_linear_activations_rowwise():
    x = random_sparse((5, 5, 5), [30, 20], 8)
    assert torch.equal(SparseLayerNorm(8)(x).feats, F.layer_norm(x.feats, (8,)))
    lin = SparseLinear(8, 3)
    y = lin(x)
    assert y.cache is x.cache and torch.equal(y.feats, F.linear(x.feats, lin.weight, lin.bias))
    assert set(lin.state_dict()) == {"weight", "bias"}
    assert torch.equal(SparseSiLU()(x).feats, F.silu(x.feats))
    assert torch.equal(SparseGELU(approximate="tanh")(x).feats, F.gelu(x.feats, approximate="tanh"))
    assert torch.equal(SparseActivation(nn.Tanh())(x).feats, torch.tanh(x.feats))
    assert torch.equal(sparse_apply(torch.relu, x).feats, torch.relu(x.feats))
