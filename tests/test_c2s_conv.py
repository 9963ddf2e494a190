"""Channel-to-space convs of the decoders (issue 21): conv1 for the existing children only, and
conv2 with the skip added in its epilogue, equal the full conv + gather / conv + add.

CPU: the child tile layout's invariants and the PyTorch paths (always); the tile-flag kernel under
Triton's CPU interpreter (``TRITON_INTERPRET=1`` with Triton installed). CUDA (``-m cuda``): the
Triton implicit GEMM forms against the full conv, and a decoder with and without them.
"""
import os

import pytest
import torch

from know3d_core.sparse import SparseTensor, conv, conv_triton, neighbour_map, neighbour_triton, submanifold_conv3d
from know3d_core.trellis2 import shape_decoder as shape_mod

from _sparse_helpers import random_sparse

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and conv_triton.triton is not None),
                          reason="needs CUDA + Triton")
interpreter = pytest.mark.skipif(
    conv_triton.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton and TRITON_INTERPRET=1 (kernels on CPU tensors)",
)
LAYOUT_FIELDS = ("rows", "parents", "slots", "offsets", "counts")


def _children(n: int, seed: int, device="cpu", p: float = 0.5) -> torch.Tensor:
    """``src [M]`` int32 = parent * 8 + slot of a random subdivision mask, parent-major."""
    gen = torch.Generator().manual_seed(seed)
    pk = (torch.rand(n, 8, generator=gen) < p).nonzero()
    return (pk[:, 0] * 8 + pk[:, 1]).to(torch.int32).to(device)


def _full_blocks(x, weight, bias, src):
    """Reference: the full conv (csr path, fp32) gathered at ``src`` -> ``[M, Co]`` float."""
    full = submanifold_conv3d(x.to(torch.float32), weight.float(), None if bias is None else bias.float(), 1,
                              "csr").feats
    return full.view(-1, weight.shape[0] // 8)[src.long()]


def _check_child_layout(nbr, src, lay, bm):
    """Every child once, tiles of one slot, each tile's offsets cover its rows' neighbours."""
    N, K = nbr.shape
    M = src.shape[0]
    real = lay.rows < M
    assert torch.equal(torch.sort(lay.rows[real].long()).values, torch.arange(M, device=src.device))
    assert torch.equal(lay.parents[real].long(), src.long()[lay.rows[real].long()] // 8)
    assert torch.equal((lay.parents < N), real)
    tile_slot = lay.slots.long().repeat_interleave(bm)
    assert torch.equal(tile_slot[real], src.long()[lay.rows[real].long()] % 8)
    assert lay.num_tiles <= -(-M // bm) + 7
    for t in range(lay.num_tiles):
        rows = lay.parents[t * bm:(t + 1) * bm]
        rows = rows[rows < N].long()
        need = (nbr[rows] < N).any(0).nonzero().view(-1).int() if rows.numel() else rows.new_zeros(0).int()
        c = int(lay.counts[t])
        assert torch.equal(lay.offsets[t, :c].cpu(), need.cpu()), t
        assert sorted(lay.offsets[t].tolist()) == list(range(K))


@pytest.mark.parametrize("bm", [16, 32])
def test_child_tile_layout_covers_every_child_once(bm):
    x = random_sparse((9, 8, 10), [250, 120], 4)
    nm = neighbour_map(x)
    src = _children(x.num_voxels, seed=bm)
    lay = conv_triton.child_tile_layout(nm.nbr, None, src, bm)
    _check_child_layout(nm.nbr, src, lay, bm)
    with pytest.raises(ValueError, match="K <= 27"):
        conv_triton.child_tile_layout(torch.zeros(4, 125, dtype=torch.int32), None, src[:2], bm)


def test_torch_paths_equal_full_conv_and_add():
    """Off the Triton kernel the two functions are the full conv gathered / conv + broadcast add."""
    x = random_sparse((8, 8, 8), [200], 8)
    w, b = torch.randn(8 * 4, 3, 3, 3, 8) / 10, torch.randn(8 * 4)
    src = _children(x.num_voxels, seed=3)
    got = conv.submanifold_conv3d_children(x, w, b, src)
    full = submanifold_conv3d(x, w, b).feats.view(-1, 4)
    assert torch.equal(got, full[src.long()])
    w2, b2 = torch.randn(6, 3, 3, 3, 8) / 10, torch.randn(6)
    table, index = torch.randn(50, 2), torch.randint(0, 50, (x.num_voxels,))
    got2 = conv.submanifold_conv3d_skip(x, w2, b2, table, index)
    want = submanifold_conv3d(x, w2, b2).feats + table[index].repeat_interleave(3, 1)
    assert torch.allclose(got2, want, atol=1e-6)
    with pytest.raises(ValueError, match="blocks"):
        conv.submanifold_conv3d_children(x, w[:30], b[:30], src)


def test_decoder_block_paths_agree_on_cpu():
    """A C2S block gives the same output with ``children_only`` on and off (PyTorch paths: equal)."""
    torch.manual_seed(0)
    block = shape_mod.SparseResBlockC2S3d(32, 16).eval()
    x = random_sparse((6, 6, 6), [60], 32)
    with torch.no_grad():
        new, sub_new = block(SparseTensor(x.feats, x.coords, x.spatial_shape))
        block.children_only = False
        old, sub_old = block(SparseTensor(x.feats, x.coords, x.spatial_shape))
    assert torch.equal(new.coords, old.coords) and torch.equal(sub_new, sub_old)
    assert torch.allclose(new.feats, old.feats, atol=1e-6)


@interpreter
def test_child_tile_flags_kernel_in_the_interpreter():
    x = random_sparse((9, 8, 10), [250, 120], 4)
    nm = neighbour_map(x)
    src = _children(x.num_voxels, seed=5)
    want = conv_triton.child_tile_layout(nm.nbr, None, src, 16)
    got = conv_triton.child_tile_layout(nm.nbr, conv_triton.pattern_bits(nm.nbr), src, 16,
                                        tile_flags=neighbour_triton.child_tile_flags)
    for field in LAYOUT_FIELDS:
        assert torch.equal(getattr(got, field), getattr(want, field)), field


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype, ci, co", [(torch.float16, 64, 32), (torch.float16, 256, 128),
                                           (torch.bfloat16, 128, 64), (torch.float32, 64, 32)])
def test_cuda_children_conv_matches_full_conv(dtype, ci, co):
    x = random_sparse((24, 20, 22), [3000, 1500], ci).to("cuda").to(dtype)
    w = (torch.randn(8 * co, 3, 3, 3, ci, device="cuda") / (27 * ci) ** 0.5).to(dtype)
    b = torch.randn(8 * co, device="cuda").to(dtype)
    src = _children(x.num_voxels, seed=ci, device="cuda")
    nm = neighbour_map(x)
    cfg = conv_triton.kernel_config(ci, co, dtype, "child")
    lay = conv_triton.child_tile_layout(nm.nbr, nm._derived.get("bits"), src, cfg.BM,
                                        tile_flags=neighbour_triton.child_tile_flags)
    _check_child_layout(nm.nbr, src, lay, cfg.BM)
    poison = torch.full((src.shape[0], co), float("nan"), device="cuda", dtype=dtype)
    del poison  # the caching allocator hands this block to the output next: every row must be written
    with torch.no_grad():
        out = conv_triton.conv_children_implicit_gemm(x.feats, nm.nbr, lay, w, b, src.shape[0], 8, cfg)
        ref = _full_blocks(x, w, b, src)
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        assert torch.isfinite(out).all()
        assert ((out.float() - ref).abs().max() / ref.abs().max()).item() <= tol
        full = conv_triton.conv_implicit_gemm(x.feats, nm.tile_layout(128), w, b).view(-1, co)[src.long()]
        assert ((out.float() - full.float()).abs().max() / ref.abs().max()).item() <= tol
        if dtype != torch.float32:  # the dispatching function takes the kernel
            assert torch.equal(conv.submanifold_conv3d_children(x, w, b, src), out)


def test_config_rule_gives_child_and_skip_launches_four_warps_four_stages():
    """The H100 sweep of the 1024 decoder's convs (session 9): C2S child and skip launches were fastest with
    4 warps / 4 stages at every size, plain convs with 8 / 3; tiles (BM, BN, BK) are the same in every form,
    so the tile layouts built for plain convs serve the others."""
    for dtype in (torch.float16, torch.bfloat16):
        plain = conv_triton.kernel_config(512, 256, dtype)
        for form in ("child", "skip"):
            cfg = conv_triton.kernel_config(512, 256, dtype, form)
            assert (cfg.num_warps, cfg.num_stages) == (4, 4) and (cfg.BM, cfg.BN, cfg.BK) == (plain.BM, plain.BN, plain.BK)
        assert (plain.num_warps, plain.num_stages) == (8, 3)
    assert conv_triton.kernel_config(512, 256, torch.float32, "child") == conv_triton.kernel_config(512, 256, torch.float32)
    with conv_triton.use_config_rule("uniform"):  # the benchmarks' baseline: every form as before
        assert conv_triton.kernel_config(512, 256, torch.float16, "skip") == plain
    with pytest.raises(ValueError, match="unknown conv form 'full'"):
        conv_triton.kernel_config(64, 64, torch.float16, "full")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype, co, c", [(torch.float16, 64, 16), (torch.float16, 256, 64), (torch.bfloat16, 128, 32)])
def test_cuda_conv_skip_epilogue_matches_conv_plus_add(dtype, co, c):
    x = random_sparse((24, 20, 22), [3000, 1500], co).to("cuda").to(dtype)
    w = (torch.randn(co, 3, 3, 3, co, device="cuda") / (27 * co) ** 0.5).to(dtype)
    b = torch.randn(co, device="cuda").to(dtype)
    table = torch.randn(2 * x.num_voxels, c, device="cuda").to(dtype)
    index = torch.randint(0, table.shape[0], (x.num_voxels,), device="cuda", dtype=torch.int32)
    with torch.no_grad():
        out = conv.submanifold_conv3d_skip(x, w, b, table, index)
        ref = submanifold_conv3d(x.to(torch.float32), w.float(), b.float(), 1, "csr").feats
        ref = ref + table.float()[index.long()].repeat_interleave(co // c, 1)
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert out.dtype == dtype and ((out.float() - ref).abs().max() / ref.abs().max()).item() <= tol


@cuda
@pytest.mark.cuda
def test_cuda_decoder_children_only_matches_the_earlier_path():
    """The fp16 decoder with the C2S kernels and without them: same coords, outputs within rounding."""
    import test_decoder_fused as tdf
    import test_trellis2_decoders as dec

    model = tdf._cuda_decoder(torch.float16)
    coords = dec.sdf_to_flexible_dual_grid(dec.sphere_sdf(radius=0.3), 16)[0]
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1).cuda()
    feats = torch.randn(len(coords), 32, device="cuda")
    head, subs = model(SparseTensor(feats, coords, (16, 16, 16)), return_subs=True)
    for m in model.modules():
        if isinstance(m, shape_mod.SparseResBlockC2S3d):
            m.children_only = False
    ref, ref_subs = model(SparseTensor(feats, coords, (16, 16, 16)), return_subs=True)
    assert torch.equal(subs[0].coords, ref_subs[0].coords)
    for a, b in zip(subs, ref_subs):  # a logit next to zero may flip a child: compare up to there
        if not torch.equal(a.coords, b.coords):
            break
        assert dec.rel_err(a.feats, b.feats) <= 1e-2
    if torch.equal(head.coords, ref.coords):
        assert dec.rel_err(head.feats, ref.feats) <= 1e-2
    assert torch.isfinite(head.feats).all()


def test_failing_kernel_launch_falls_back_to_pytorch(monkeypatch, caplog):
    """A kernel that fails to launch (compiler/driver) is logged once; the result comes from PyTorch."""
    x = random_sparse((8, 8, 8), [150], 8)
    w, b = torch.randn(8 * 4, 3, 3, 3, 8) / 10, torch.randn(8 * 4)
    src = _children(x.num_voxels, seed=4)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    failed: list = []
    monkeypatch.setattr(conv, "_implicit_failed", failed)
    monkeypatch.setattr(conv, "implicit_kernel_ok", lambda *a: not failed)
    monkeypatch.setattr(conv_triton, "conv_children_implicit_gemm", broken)
    monkeypatch.setattr(conv_triton, "conv_implicit_gemm", broken)
    with caplog.at_level("WARNING"):
        got = conv.submanifold_conv3d_children(x, w, b, src)
    assert len(failed) == 1 and "no compiler here" in caplog.text
    assert torch.equal(got, submanifold_conv3d(x, w, b).feats.view(-1, 4)[src.long()])
    table, index = torch.randn(20, 4), torch.randint(0, 20, (x.num_voxels,))
    got2 = conv.submanifold_conv3d_skip(x, w[:8], b[:8], table, index)  # the flag is set: no second launch
    assert len(failed) == 1
    assert torch.allclose(got2, submanifold_conv3d(x, w[:8], b[:8]).feats + table[index].repeat_interleave(2, 1))


@cuda
@pytest.mark.cuda
def test_cuda_wide_config_rule_gives_the_same_convs():
    """The ``wide`` rule (BN 256) in all three forms against the fp32 full conv."""
    x = random_sparse((24, 20, 22), [3000, 1500], 256).to("cuda").to(torch.float16)
    w = (torch.randn(8 * 256, 3, 3, 3, 256, device="cuda") / (27 * 256) ** 0.5).half()
    b = torch.randn(8 * 256, device="cuda").half()
    src = _children(x.num_voxels, seed=9, device="cuda")
    table = torch.randn(2 * x.num_voxels, 64, device="cuda").half()
    index = torch.randint(0, table.shape[0], (x.num_voxels,), device="cuda", dtype=torch.int32)
    with torch.no_grad(), conv_triton.use_config_rule("wide"):
        assert conv_triton.kernel_config(256, 256, torch.float16).BN == 256
        child = conv.submanifold_conv3d_children(x, w, b, src)
        plain = submanifold_conv3d(x, w[:256], b[:256], 1, "implicit").feats
        skip = conv.submanifold_conv3d_skip(x, w[:256], b[:256], table, index)
    ref_child = _full_blocks(x, w, b, src)
    ref_plain = submanifold_conv3d(x.to(torch.float32), w[:256].float(), b[:256].float(), 1, "csr").feats
    ref_skip = ref_plain + table.float()[index.long()].repeat_interleave(4, 1)
    for out, ref in ((child, ref_child), (plain, ref_plain), (skip, ref_skip)):
        assert ((out.float() - ref).abs().max() / ref.abs().max()).item() <= 2e-3
