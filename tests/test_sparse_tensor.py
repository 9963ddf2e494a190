import pytest
import torch

from know3d_core.sparse import SparseTensor, sparse_cat

from _sparse_helpers import random_coords


def _tensor(coords, shape=(4, 4, 4), channels=3):
    return SparseTensor(torch.randn(coords.shape[0], channels), coords, shape)


def test_layout_seqlens_and_batch_size():
    coords = random_coords((5, 5, 5), [7, 3, 5])
    x = _tensor(coords, (5, 5, 5)).validate()
    assert x.batch_size == 3
    assert x.seqlens.tolist() == [7, 3, 5]
    assert x.layout == [slice(0, 7), slice(7, 10), slice(10, 15)]
    assert x.shape == torch.Size([3, 3])


def test_replace_shares_cache_only_for_same_coords():
    coords = random_coords((5, 5, 5), [4, 6])
    x = _tensor(coords, (5, 5, 5))
    x.cache["probe"] = 1
    y = x.replace(x.feats * 2)
    assert y.cache is x.cache and y.coords is x.coords
    z = x.replace(x.feats, coords=coords.clone())
    assert z.cache is not x.cache and "probe" not in z.cache
    w = x.replace(x.feats, spatial_shape=(6, 6, 6))
    assert w.cache is not x.cache


def test_arithmetic_broadcasts_per_batch_item():
    coords = random_coords((5, 5, 5), [4, 6])
    x = _tensor(coords, (5, 5, 5))
    per_item = torch.randn(2, 3)
    expected = x.feats + per_item[coords[:, 0].long()]
    assert torch.equal((x + per_item).feats, expected)
    assert torch.equal((x * 2 - x).feats, x.feats * 2 - x.feats)
    assert torch.equal((x * torch.ones(3)).feats, x.feats)
    with pytest.raises(ValueError, match="rows"):
        _ = x + torch.randn(5, 3)


def test_to_dense_places_feats():
    coords = random_coords((3, 4, 5), [6, 2])
    x = _tensor(coords, (3, 4, 5))
    dense = x.to_dense()
    assert dense.shape == (2, 3, 3, 4, 5)
    for n, (b, i, j, k) in enumerate(coords.tolist()):
        assert torch.equal(dense[b, :, i, j, k], x.feats[n])
    assert dense.abs().sum() == pytest.approx(x.feats.abs().sum().item(), rel=1e-6)


def test_sparse_cat_batches():
    a = _tensor(random_coords((4, 4, 4), [3, 2]))
    b = _tensor(random_coords((4, 4, 4), [5]))
    c = sparse_cat([a, b]).validate()
    assert c.batch_size == 3 and c.seqlens.tolist() == [3, 2, 5]
    assert torch.equal(c.coords[5:, 1:], b.coords[:, 1:])
    parts = c.unbind()
    assert [p.num_voxels for p in parts] == [3, 2, 5]
    assert torch.equal(parts[2].coords, b.coords) and torch.equal(parts[2].feats, b.feats)


@pytest.mark.parametrize(
    "coords, match",
    [
        (torch.tensor([[0, 0, 0, 0], [0, 4, 0, 0]], dtype=torch.int32), "outside spatial shape"),
        (torch.tensor([[0, 0, 0, 0], [0, 0, -1, 0]], dtype=torch.int32), "outside spatial shape"),
        (torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]], dtype=torch.int32), "duplicate coords"),
        (torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32), "batch not contiguous"),
        (torch.tensor([[-1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32), "negative batch"),
    ],
)
def test_validate_names_the_problem(coords, match):
    x = _tensor(coords)
    with pytest.raises(ValueError, match=match):
        x.validate()


def test_constructor_rejects_wrong_dtype_and_ndim():
    with pytest.raises(ValueError, match="dtype must be torch.int32"):
        SparseTensor(torch.randn(2, 3), torch.zeros(2, 4, dtype=torch.int64), (4, 4, 4))
    with pytest.raises(ValueError, match="ndim 2"):
        SparseTensor(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.int32), (4, 4, 4))
    with pytest.raises(ValueError, match="ndim >= 2"):
        SparseTensor(torch.randn(2), torch.zeros(2, 4, dtype=torch.int32), (4, 4, 4))
    with pytest.raises(ValueError, match="rows"):
        SparseTensor(torch.randn(3, 2), torch.zeros(2, 4, dtype=torch.int32), (4, 4, 4))
    with pytest.raises(ValueError, match="spatial_shape"):
        SparseTensor(torch.randn(2, 2), torch.zeros(2, 4, dtype=torch.int32), (4, 4))


def test_validate_batch_size_too_small():
    coords = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.int32)
    x = SparseTensor(torch.randn(2, 3), coords, (4, 4, 4), batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        x.validate()
