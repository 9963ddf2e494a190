"""Shared builders for the sparse toolkit tests (random voxel sets, dense references)."""
import torch

from know3d_core.sparse import SparseTensor


def random_coords(spatial_shape, counts, generator=None):
    """``[sum(counts), 4]`` int32 coords: ``counts[b]`` distinct random voxels for batch item b."""
    X, Y, Z = spatial_shape
    rows = []
    for b, n in enumerate(counts):
        flat = torch.randperm(X * Y * Z, generator=generator)[:n]
        x, y, z = flat // (Y * Z), (flat // Z) % Y, flat % Z
        rows.append(torch.stack([torch.full_like(x, b), x, y, z], 1))
    return torch.cat(rows).to(torch.int32)


def random_sparse(spatial_shape, counts, channels, dtype=torch.float32):
    coords = random_coords(spatial_shape, counts)
    return SparseTensor(torch.randn(coords.shape[0], channels, dtype=dtype), coords, spatial_shape, batch_size=len(counts))


def sample_dense(dense, coords):
    """Values of a dense ``[B, C, X, Y, Z]`` grid at ``coords [N, 4]`` -> ``[N, C]``."""
    c = coords.long()
    return dense.permute(0, 2, 3, 4, 1)[c[:, 0], c[:, 1], c[:, 2], c[:, 3]]
