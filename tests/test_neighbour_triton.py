"""The Triton neighbour-map build (issue 21) gives exactly the PyTorch build's map and tile layout.

Runs on CUDA (marked ``cuda``) and under Triton's CPU interpreter (``TRITON_INTERPRET=1`` with Triton
installed); on CPU-only installs the PyTorch build is the one in use and both are skipped.
"""
import os

import pytest
import torch

from know3d_core.sparse import SparseTensor, conv, conv_triton, neighbour_triton, spatial, submanifold_conv3d

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and neighbour_triton.triton is not None),
                          reason="needs CUDA + Triton")
interpreter = pytest.mark.skipif(
    neighbour_triton.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton and TRITON_INTERPRET=1 (kernels on CPU tensors)",
)
LAYOUT_FIELDS = ("rows", "nbr", "offsets", "counts")


def _coords(batch: int, res: int, n: int, seed: int, device) -> torch.Tensor:
    """``[batch * n, 4]`` int32: n distinct random voxels per batch item (edges of the grid included)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batch):
        flat = torch.randperm(res ** 3, generator=gen)[:n]
        xyz = torch.stack([flat // res ** 2, (flat // res) % res, flat % res], 1)
        out.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    return torch.cat(out).int().to(device)


def _check(device, cases, bm, batch_known=False):
    for batch, res, n, k, d in cases:
        coords = _coords(batch, res, n, seed=res + n, device=device)
        ref = conv._build_neighbour_map_torch(coords, (res,) * 3, k, d, conv.DEFAULT_TABLE_BYTES)
        nbr, bits = neighbour_triton.build_neighbour_map_triton(coords, (res,) * 3, k, d,
                                                                batch if batch_known else None)
        assert torch.equal(nbr, ref), (batch, res, n, k, d)
        if k ** 3 > 31:
            assert bits is None
            continue
        expected_bits = ((ref < ref.shape[0]).int() << torch.arange(k ** 3, device=device).int()).sum(1).int()
        assert torch.equal(bits, expected_bits)
        want = conv_triton.tile_layout(ref, bm)
        got = neighbour_triton.tile_layout_triton(nbr, bits, bm)
        assert got.num_tiles == want.num_tiles and got.bm == bm
        for field in LAYOUT_FIELDS:
            assert torch.equal(getattr(got, field), getattr(want, field)), field


# The build's variants: module settings, the half lookup on or off, the batch size passed (int32 keys in
# the packed table with the half lookup); a small table and a program of 64 lanes (not a multiple of the
# 14 lanes a voxel) give long probes and voxels split across programs.
VARIANTS = {
    "full": ({}, False, False),
    "full_eager": ({"EAGER_VALUES": True}, False, False),
    "half_int64": ({}, True, False),
    "half_packed": ({}, True, True),
    "half_packed_s2_b64": ({"HALF_SLOTS_PER_VOXEL": 2, "HALF_BLOCK": 64, "HALF_WARPS": 2, "HALF_INSERT_BLOCK": 32,
                            "HALF_INSERT_WARPS": 1}, True, True),
    "half_unpacked_batch_known": ({"PACKED_TABLE": False}, True, True),
    "half_fill_before": ({"HALF_FILL_IN_INSERT": False, "HALF_INSERT_BLOCK": 256, "HALF_INSERT_WARPS": 4}, True, True),
    "half_int64_fill_before": ({"HALF_FILL_IN_INSERT": False}, True, False),
    "half_bits_in_lookup": ({"HALF_BITS_IN_LOOKUP": True, "HALF_BLOCK": 64, "HALF_WARPS": 2}, True, True),
    "half_int64_bits_in_lookup": ({"HALF_BITS_IN_LOOKUP": True, "HALF_FILL_IN_INSERT": False}, True, False),
}


def _check_variant(monkeypatch, device, name, cases, bm):
    settings, half, batch_known = VARIANTS[name]
    for key, value in settings.items():
        monkeypatch.setattr(neighbour_triton, key, value)
    with neighbour_triton.use_half_lookup(half):  # offsets before the centre + mirror writes
        _check(device, cases, bm=bm, batch_known=batch_known)


@interpreter
@pytest.mark.parametrize("name", list(VARIANTS))
def test_triton_build_matches_torch_in_the_interpreter(monkeypatch, name):
    _check_variant(monkeypatch, "cpu", name, [(2, 10, 300, 3, 1), (1, 12, 400, 3, 2), (1, 6, 80, 5, 1)], bm=16)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", list(VARIANTS))
def test_triton_build_matches_torch_on_cuda(monkeypatch, name):
    # dense and sparse fills, two batch items, dilation 2, a 5^3 kernel (no pattern bits), a
    # partial last tile
    _check_variant(monkeypatch, "cuda", name, [(2, 40, 20000, 3, 1), (1, 64, 3000, 3, 1), (1, 30, 5000, 3, 2),
                                               (1, 16, 900, 5, 1), (3, 20, 1001, 3, 1)], bm=128)


@cuda
@pytest.mark.cuda
def test_conv_output_is_the_same_with_either_build():
    coords = _coords(2, 48, 30000, 7, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    feats = torch.randn(coords.shape[0], 64, device="cuda", generator=gen).half()
    w = (torch.randn(96, 3, 3, 3, 64, device="cuda", generator=gen) * 0.05).half()
    b = torch.randn(96, device="cuda", generator=gen).half()
    a = submanifold_conv3d(SparseTensor(feats, coords, (48,) * 3), w, b).feats
    with neighbour_triton.use_triton_maps(False):
        x = SparseTensor(feats, coords, (48,) * 3)
        ref = submanifold_conv3d(x, w, b).feats
        assert "bits" not in conv.neighbour_map(x)._derived
    assert torch.equal(a, ref)


def test_cpu_builds_with_torch():
    coords = _coords(1, 8, 50, 0, "cpu")
    assert not neighbour_triton.available(coords)
    x = SparseTensor(torch.zeros(50, 2), coords, (8, 8, 8))
    assert "bits" not in conv.neighbour_map(x)._derived


# ----------------------------------------------------------------------------- subdivision children
def _children_case(device, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    coords = _coords(2, 50, n, seed, "cpu").to(device)
    mask = (torch.rand(coords.shape[0], 8, generator=gen) > 0.45).to(device)
    mask[::7] = False  # parents without children
    return SparseTensor(torch.zeros(coords.shape[0], 8, device=device), coords, (50, 50, 50)), mask


def _children_torch(x, mask):
    with neighbour_triton.use_triton_children(False):
        return spatial._subdivide(x, mask)


def test_children_kernel_is_on_by_default_for_cuda_coords_only():
    assert neighbour_triton.CHILDREN_BY_DEFAULT is True  # measured faster on an H100 (session 9)
    assert not neighbour_triton.children_available(torch.zeros(4, 4, dtype=torch.int32))  # CPU coords: PyTorch ops


@interpreter
def test_children_kernel_matches_torch_in_the_interpreter():
    x, mask = _children_case("cpu", 300, 3)
    coords, src = neighbour_triton.children_triton(x.coords, mask.nonzero())
    _, want_coords, want_src, _ = _children_torch(x, mask)
    assert torch.equal(coords, want_coords) and torch.equal(src, want_src)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("n,seed", [(20000, 0), (1001, 1), (1, 2)])
def test_children_kernel_matches_torch_on_cuda(n, seed):
    """The one-launch children (coords, src rows) equal the PyTorch ops bit for bit, and the C2S
    path takes the kernel on CUDA (same results through channel_to_spatial)."""
    x, mask = _children_case("cuda", n, seed)
    with neighbour_triton.use_triton_children(True):  # off by default until this has run on CUDA
        got = spatial._subdivide(x, mask)
    want = _children_torch(x, mask)
    assert got[1].dtype == torch.int32 and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    empty = torch.zeros_like(mask)
    assert neighbour_triton.children_triton(x.coords, empty.nonzero())[0].shape == (0, 4)
