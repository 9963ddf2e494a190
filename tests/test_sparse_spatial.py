"""spatial_to_channel / channel_to_spatial: exact round trip, naive-loop equivalence, caching."""
import pytest
import torch

from know3d_core.sparse import SubMConv3d, channel_to_spatial, spatial_to_channel

from _sparse_helpers import random_sparse


def _bits(k):
    return (k & 1, (k >> 1) & 1, (k >> 2) & 1)


def test_round_trip_restores_feats_coords_and_cache():
    x = random_sparse((9, 6, 7), [120, 55], 5)  # odd sizes: parents on a ceil grid
    down = spatial_to_channel(x)
    assert down.spatial_shape == (5, 3, 4) and down.feats.shape[1] == 40  # ceil((9, 6, 7) / 2); 8 children x 5 ch
    down.validate()
    up = channel_to_spatial(down)
    assert torch.equal(up.feats, x.feats)
    assert up.coords is x.coords and up.spatial_shape == x.spatial_shape and up.cache is x.cache
    # feats transformed at the coarse level still map back to the same rows
    up2 = channel_to_spatial(down.replace(down.feats * 3))
    assert torch.equal(up2.feats, x.feats * 3)


def test_spatial_to_channel_matches_naive_loop():
    x = random_sparse((6, 6, 6), [60, 30], 3)
    down = spatial_to_channel(x)
    parents = {tuple(c): i for i, c in enumerate(down.coords.tolist())}
    expected = torch.zeros_like(down.feats)
    for n, (b, i, j, k) in enumerate(x.coords.tolist()):
        child = (i % 2) + 2 * (j % 2) + 4 * (k % 2)
        expected[parents[(b, i // 2, j // 2, k // 2)], child * 3:(child + 1) * 3] = x.feats[n]
    assert torch.equal(down.feats, expected)
    assert len(parents) == down.coords.shape[0]
    keys = [tuple(c) for c in down.coords.tolist()]
    assert keys == sorted(keys)  # parents sorted by (b, x, y, z)
    sub = down.cache["subdivision"]
    assert sub.sum().item() == x.num_voxels


def test_channel_to_spatial_partial_mask_matches_naive_loop():
    parent = random_sparse((4, 3, 5), [10, 7], 16)  # 8 children x 2 channels
    mask = torch.rand(parent.num_voxels, 8) < 0.4
    up = channel_to_spatial(parent, mask)
    coords, feats = [], []
    for n, (b, i, j, k) in enumerate(parent.coords.tolist()):
        for child in range(8):
            if mask[n, child]:
                dx, dy, dz = _bits(child)
                coords.append([b, 2 * i + dx, 2 * j + dy, 2 * k + dz])
                feats.append(parent.feats[n, child * 2:(child + 1) * 2])
    assert up.coords.tolist() == coords
    assert torch.equal(up.feats, torch.stack(feats))
    assert up.spatial_shape == (8, 6, 10)
    up.validate()


def test_same_mask_gives_same_coords_for_residual_add():
    """Decoder pattern: h and the skip x are both upsampled with one mask, then added and convolved."""
    x = random_sparse((4, 4, 4), [12, 9], 16)
    h = SubMConv3d(16, 32)(x)  # same coords and cache as x
    mask = torch.rand(x.num_voxels, 8) < 0.5
    h_up, x_up = channel_to_spatial(h, mask), channel_to_spatial(x, mask)
    assert h_up.coords is x_up.coords and h_up.cache is x_up.cache
    out = SubMConv3d(4, 2)(h_up + x_up.feats.repeat(1, 2))
    assert out.coords is x_up.coords
    other = channel_to_spatial(x, mask.clone())  # a different mask object: recomputed, same values
    assert other.coords is not x_up.coords and torch.equal(other.coords, x_up.coords)


def test_subdivision_mask_sparse_tensor_accepted():
    x = random_sparse((4, 4, 4), [6], 8)
    mask = x.replace(torch.randn(x.num_voxels, 8) > 0)
    assert torch.equal(channel_to_spatial(x, mask).feats, channel_to_spatial(x, mask.feats).feats)


def test_channel_to_spatial_bad_inputs():
    x = random_sparse((4, 4, 4), [6], 8)
    with pytest.raises(ValueError, match="subdiv_mask"):
        channel_to_spatial(x)
    with pytest.raises(ValueError, match="bool"):
        channel_to_spatial(x, torch.ones(6, 8))
    with pytest.raises(ValueError, match=r"\[6, 8\]"):
        channel_to_spatial(x, torch.ones(5, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"8\*C"):
        channel_to_spatial(random_sparse((4, 4, 4), [6], 7), torch.ones(6, 8, dtype=torch.bool))
