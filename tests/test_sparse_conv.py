"""Submanifold conv == dense conv3d on the active voxels; the three algorithms agree; caching."""
import pytest
import torch
import torch.nn.functional as F

from know3d_core.sparse import SparseTensor, SubMConv3d, kernel_offsets, neighbour_map, submanifold_conv3d
from know3d_core.sparse import conv as conv_module

from _sparse_helpers import random_sparse, sample_dense

ALGOS = ["gather", "offset", "bag", "csr"]


def dense_reference(x: SparseTensor, weight, bias, dilation):
    """fp64 F.conv3d on the zero-filled grid, sampled at the active voxels -> [N, Co]."""
    k = weight.shape[1]
    w = weight.double().permute(0, 4, 1, 2, 3)
    b = None if bias is None else bias.double()
    dense = F.conv3d(x.double().to_dense(), w, b, padding=dilation * (k // 2), dilation=dilation)
    return sample_dense(dense, x.coords)


def rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("ci, co", [(1, 1), (3, 5), (8, 8), (16, 4)])
def test_conv_matches_dense_conv3d(algo, dilation, ci, co):
    # dense-ish small grid: many neighbours, many boundary voxels, 2 items of different sizes
    x = random_sparse((6, 5, 7), [150, 70], ci)
    conv = SubMConv3d(ci, co, dilation=dilation, algo=algo)
    with torch.no_grad():
        conv.bias.normal_()
        out = conv(x)
    assert out.coords is x.coords and out.cache is x.cache
    assert rel_err(out.feats, dense_reference(x, conv.weight, conv.bias, dilation)) <= 1e-5


@pytest.mark.parametrize("algo", ALGOS)
def test_conv_sparse_grid_kernel5_no_bias(algo):
    x = random_sparse((12, 10, 11), [90, 40], 6)
    weight = torch.randn(7, 5, 5, 5, 6)
    out = submanifold_conv3d(x, weight, None, 1, algo)
    assert rel_err(out.feats, dense_reference(x, weight, None, 1)) <= 1e-5


def test_algorithms_agree_with_small_chunks():
    """Tiny byte budgets force many gather chunks, offset sub-chunks and bag offset groups."""
    x = random_sparse((8, 8, 8), [200, 120], 12)
    weight, bias = torch.randn(10, 3, 3, 3, 12), torch.randn(10)
    outs = {a: submanifold_conv3d(x, weight, bias, 1, a, chunk_bytes=4096).feats for a in ALGOS}
    ref = submanifold_conv3d(x, weight, bias, 1, "gather").feats
    for a in ALGOS:
        assert torch.allclose(outs[a], ref, rtol=1e-5, atol=1e-5), a
    # one offset's product (320 rows x 10 ch x 4 B = 12 800 B) exceeds the 4096 B chunk: one group per offset
    assert len(conv_module._bag_groups(27, 320 * 10 * 4, 4096)) == 27


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_paths_close_to_fp64(dtype):
    x = random_sparse((7, 7, 7), [160, 90], 16, dtype=dtype)
    weight, bias = torch.randn(16, 3, 3, 3, 16) * 0.1, torch.randn(16)
    ref = dense_reference(x, weight.to(dtype), bias.to(dtype), 1)
    for a in ALGOS:
        out = submanifold_conv3d(x, weight, bias, 1, a).feats
        assert out.dtype == dtype
        assert rel_err(out, ref) <= (2e-2 if dtype == torch.bfloat16 else 3e-3), a


def test_neighbour_order_is_flexgemm():
    """Tap v = i*9 + j*3 + k reads the voxel at offset (i-1, j-1, k-1) on (x, y, z)."""
    offsets = kernel_offsets(3, 1)
    assert offsets[0] == (-1, -1, -1) and offsets[13] == (0, 0, 0)
    assert offsets[2 * 9 + 1 * 3 + 1] == (1, 0, 0) and offsets[1 * 9 + 1 * 3 + 2] == (0, 0, 1)
    coords = torch.tensor([[0, 2, 2, 2], [0, 3, 2, 2], [0, 2, 2, 1]], dtype=torch.int32)
    feats = torch.tensor([[0.0], [1.0], [10.0]])
    x = SparseTensor(feats, coords, (5, 5, 5))
    for algo in ALGOS:
        weight = torch.zeros(1, 3, 3, 3, 1)
        weight[0, 2, 1, 1, 0] = 1.0  # offset (+1, 0, 0)
        weight[0, 1, 1, 0, 0] = 100.0  # offset (0, 0, -1)
        out = submanifold_conv3d(x, weight, None, 1, algo).feats[:, 0]
        # voxel 0 sees (3,2,2) via +x and (2,2,1) via -z; voxel 2 sees (2,2,0)? absent, (3,2,1)? absent
        assert out.tolist() == [1.0 + 100.0 * 10.0, 0.0, 0.0], algo


def test_neighbour_map_missing_and_bounds():
    """Neighbours across the grid edge or in another batch item never alias."""
    X, Y, Z = 3, 3, 3
    # (x=0, y=2, z=2) + (0, 0, +1) would alias key of (0, 3-> next row...) without bounds checks
    coords = torch.tensor([[0, 0, 2, 2], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.int32)
    x = SparseTensor(torch.randn(3, 1), coords, (X, Y, Z))
    nbr = neighbour_map(x).nbr
    assert nbr.dtype == torch.int32 and nbr.shape == (3, 27)
    assert nbr[:, 13].tolist() == [0, 1, 2]
    assert (nbr[:, [v for v in range(27) if v != 13]] == 3).all()


def test_neighbour_map_is_cached_and_reused(monkeypatch):
    x = random_sparse((6, 6, 6), [80, 50], 4)
    calls = []
    real = conv_module._build_neighbour_map
    monkeypatch.setattr(conv_module, "_build_neighbour_map", lambda *a, **k: calls.append(1) or real(*a, **k))
    conv = SubMConv3d(4, 4)
    first = conv(x)
    second = conv(x)
    third = conv(x.replace(x.feats.clone()))  # same coords -> same cache
    assert len(calls) == 1
    assert torch.equal(first.feats, second.feats) and torch.equal(first.feats, third.feats)
    conv_d2 = SubMConv3d(4, 4, dilation=2)
    conv_d2(first)
    assert len(calls) == 2  # keyed by dilation
    assert ("subm_neighbour_map", 3, 1) in x.cache and ("subm_neighbour_map", 3, 2) in x.cache
    fresh = SparseTensor(x.feats, x.coords.clone(), x.spatial_shape)
    assert torch.allclose(conv(fresh).feats, first.feats, rtol=0, atol=0)
    assert len(calls) == 3


def test_official_parameter_layout_and_strict_load():
    conv = SubMConv3d(6, 9)
    assert conv.weight.shape == (9, 3, 3, 3, 6) and conv.bias.shape == (9,)
    state = {"weight": torch.randn(9, 3, 3, 3, 6), "bias": torch.randn(9)}
    conv.load_state_dict(state, strict=True)
    assert set(conv.state_dict()) == {"weight", "bias"}
    assert SubMConv3d(6, 9, bias=False).bias is None


def test_empty_and_bad_inputs():
    x = SparseTensor(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.int32), (4, 4, 4))
    assert SubMConv3d(4, 2)(x).feats.shape == (0, 2)
    y = random_sparse((4, 4, 4), [5], 3)
    with pytest.raises(ValueError, match="channels"):
        SubMConv3d(4, 2)(y)
    with pytest.raises(ValueError, match="algo"):
        SubMConv3d(3, 2, algo="nope")
    with pytest.raises(ValueError, match="odd"):
        SubMConv3d(3, 2, kernel_size=2)


def test_auto_rule():
    cuda = torch.device("cuda")
    assert conv_module.choose_algorithm(torch.device("cpu"), 64, 64, 0.6) == "bag"
    assert conv_module.choose_algorithm(torch.device("cpu"), 64, 64, 0.6, torch.bfloat16) == "bag"
    assert conv_module.choose_algorithm(cuda, 64, 64, 0.6) == "csr"
    assert conv_module.choose_algorithm(cuda, 256, 256, 0.6, torch.float32) == "csr"
    assert conv_module.choose_algorithm(cuda, 512, 512, 0.6) == "gather"
    assert conv_module.choose_algorithm(cuda, 64, 512, 0.6) == "gather"
    assert conv_module.choose_algorithm(cuda, 64, 64, 0.1) == "offset"
    half = conv_module.choose_algorithm(cuda, 64, 64, 0.6, torch.bfloat16)
    assert half == ("implicit" if conv_module.conv_triton.triton_available() else "csr")


@pytest.mark.parametrize("sort_rows", [True, False])
def test_tile_layout_covers_every_neighbour_once(sort_rows):
    """Tiles list every offset one of their rows has; rows are a permutation plus padding."""
    x = _shell_sparse(14, 1)
    nm = neighbour_map(x)
    N, K = nm.nbr.shape
    bm = 32
    lay = nm.tile_layout(bm, sort_rows)
    assert lay is nm.tile_layout(bm, sort_rows)  # cached
    T = lay.num_tiles
    assert T == -(-N // bm) and N % bm and lay.rows.shape == (N,) and lay.nbr.shape == (K, N)
    assert torch.equal(lay.rows.long().sort().values, torch.arange(N))
    assert torch.equal(lay.nbr.t(), nm.nbr[lay.rows.long()])
    for t in range(T):
        present = (lay.nbr[:, t * bm:(t + 1) * bm] < N).any(1).nonzero().flatten()
        c = int(lay.counts[t])
        assert torch.equal(lay.offsets[t, :c].long(), present)
    if sort_rows:  # grouping rows by neighbour pattern visits fewer offsets per tile than row order
        assert lay.mean_active_offsets < nm.tile_layout(bm, False).mean_active_offsets


def _shell_sparse(R, channels, shuffle=False):
    g = torch.arange(R)
    x, y, z = torch.meshgrid(g, g, g, indexing="ij")
    d = ((x - (R - 1) / 2) ** 2 + (y - (R - 1) / 2) ** 2 + (z - (R - 1) / 2) ** 2).sqrt()
    m = (d - R * 0.4).abs() < 1.0
    xyz = torch.stack([x[m], y[m], z[m]], 1)
    if shuffle:
        xyz = xyz[torch.randperm(xyz.shape[0])]
    coords = torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1).to(torch.int32)
    return SparseTensor(torch.randn(coords.shape[0], channels), coords, (R, R, R))


@pytest.mark.parametrize("algo", ["bag", "csr"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_bag_row_chunks_and_fallback(shuffle, algo):
    """Sorted shells run the bag algorithm in output-row chunks; shuffled rows fall back to groups."""
    x = _shell_sparse(16, 4, shuffle)
    weight, bias = torch.randn(4, 3, 3, 3, 4), torch.randn(4)
    budget_rows = 900
    out = submanifold_conv3d(x, weight, bias, 1, algo, chunk_bytes=budget_rows * 27 * 4 * 4).feats
    plan = neighbour_map(x).bag_row_plan(budget_rows)
    if shuffle:
        assert plan is None
    else:
        assert len(plan) > 1
        assert all(hi - lo <= budget_rows for _, _, lo, hi, _, _ in plan)
        assert [a for a, *_ in plan] == sorted(a for a, *_ in plan) and plan[-1][1] == x.num_voxels
    assert rel_err(out, dense_reference(x, weight, bias, 1)) <= 1e-5


def test_greedy_row_chunks_are_maximal():
    row_lo = torch.tensor([0, 0, 1, 2, 3, 4])
    row_hi = torch.tensor([2, 3, 4, 5, 6, 6])
    assert conv_module._greedy_row_chunks(row_lo, row_hi, 4) == [(0, 3, 0, 4), (3, 6, 2, 6)]
    assert conv_module._greedy_row_chunks(row_lo, row_hi, 1) is None


@pytest.mark.parametrize("dilation", [1, 2])
def test_table_and_sorted_neighbour_maps_agree(dilation):
    x = random_sparse((7, 6, 5), [120, 90, 30], 1)
    table = conv_module.build_neighbour_map(x.coords, x.spatial_shape, 3, dilation)
    hashed = conv_module.build_neighbour_map(x.coords, x.spatial_shape, 3, dilation, max_table_bytes=0)
    assert torch.equal(table, hashed)
    # brute force: every pair of voxels at offset v in the same batch item
    pos = {tuple(r): n for n, r in enumerate(x.coords.tolist())}
    for n, (b, i, j, k) in enumerate(x.coords.tolist()):
        for v, (dx, dy, dz) in enumerate(kernel_offsets(3, dilation)):
            assert table[n, v].item() == pos.get((b, i + dx, j + dy, k + dz), x.num_voxels)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_algorithms_match_dense(dtype):
    """Every algorithm on the GPU (incl. the cuSPARSE csr path) against the fp64 CPU reference."""
    x = _shell_sparse(24, 32)
    weight, bias = torch.randn(48, 3, 3, 3, 32) / 16, torch.randn(48)
    ref = dense_reference(x.to(dtype), weight.to(dtype), bias.to(dtype), 1)
    xc = x.to("cuda").to(dtype)
    tol = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]  # fp32: TF32 may be on
    for algo in ALGOS + ["implicit", "auto"]:
        for chunk in (conv_module.DEFAULT_CHUNK_BYTES, 48 * 27 * 2 * 2000):
            out = submanifold_conv3d(xc, weight.cuda(), bias.cuda(), 1, algo, chunk_bytes=chunk).feats
            assert out.dtype == dtype and out.is_cuda
            assert rel_err(out.cpu(), ref) <= tol, (algo, chunk)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ci, co, k, dilation", [(3, 5, 3, 1), (70, 130, 3, 2), (64, 64, 5, 1), (128, 300, 3, 1)])
def test_cuda_implicit_gemm_matches_dense(dtype, ci, co, k, dilation):
    """Triton implicit GEMM: odd channel counts (masked tails), kernel 5, dilation, 3 batch items."""
    x = random_sparse((9, 8, 10), [300, 150, 40], ci)
    weight, bias = torch.randn(co, k, k, k, ci) / (k ** 1.5 * ci ** 0.5), torch.randn(co)
    ref = dense_reference(x.to(dtype), weight.to(dtype), bias.to(dtype), dilation)
    xc = x.to("cuda").to(dtype)
    out = submanifold_conv3d(xc, weight.cuda(), bias.cuda(), dilation, "implicit").feats
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    assert out.dtype == dtype and rel_err(out.cpu(), ref) <= tol
    out_nb = submanifold_conv3d(xc, weight.cuda(), None, dilation, "implicit").feats
    assert rel_err(out_nb.cpu(), dense_reference(x.to(dtype), weight.to(dtype), None, dilation)) <= tol
    if dtype != torch.float32:
        assert conv_module.choose_algorithm(xc.device, ci, co, None, dtype) == "implicit"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_implicit_gemm_large_shell_every_row_written():
    """A ~37k-voxel shell (many tiles, sorted rows): NaN-poisoned memory first, then compared with csr."""
    x = _shell_sparse(96, 64).to("cuda").to(torch.bfloat16)
    weight, bias = (torch.randn(96, 3, 3, 3, 64, device="cuda") / 40).bfloat16(), torch.randn(96, device="cuda").bfloat16()
    nm = neighbour_map(x)
    lay = nm.tile_layout(128)
    poison = torch.full((x.num_voxels, 96), float("nan"), device="cuda", dtype=torch.bfloat16)
    del poison  # the caching allocator hands this block to the output next
    out = conv_module.conv_triton.conv_implicit_gemm(x.feats, lay, weight, bias)
    ref = submanifold_conv3d(x.to(torch.float32), weight.float(), bias.float(), 1, "csr").feats
    assert torch.isfinite(out).all() and rel_err(out.float().cpu(), ref.double().cpu()) <= 2e-2
    assert lay.mean_active_offsets < 27
