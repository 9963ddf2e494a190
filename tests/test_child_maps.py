"""A subdivision's neighbour map derived from its parents' map equals the hashed build on the children.

The reference for every case is :func:`conv._build_neighbour_map_torch` on the children's coords (the
build the conv uses without the derivation); the children come from :func:`spatial._subdivide`, the
op the decoders' channel-to-space blocks use. The Triton kernel runs on CUDA (marked ``cuda``) and in
Triton's CPU interpreter (``TRITON_INTERPRET=1``).
"""
import os

import pytest
import torch

from know3d_core.sparse import SparseTensor, child_maps, conv, neighbour_triton, spatial
from know3d_core.trellis2 import shape_decoder as shape_mod

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and neighbour_triton.triton is not None),
                          reason="needs CUDA + Triton")
interpreter = pytest.mark.skipif(
    neighbour_triton.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton and TRITON_INTERPRET=1 (kernels on CPU tensors)",
)


def _parents(batch: int, res: int, n: int, seed: int) -> torch.Tensor:
    """``[batch * n, 4]`` int32: n distinct voxels per batch item on a res^3 grid (edges included),
    sorted as the decoders' coords are."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batch):
        flat = torch.randperm(res ** 3, generator=gen)[:n].sort().values
        out.append(torch.stack([torch.full_like(flat, b), flat // res ** 2, (flat // res) % res, flat % res], 1))
    return torch.cat(out).int()


def _case(batch, res, n, density, seed, device="cpu"):
    """Parents with their map cached, a random subdivision mask (some parents childless), the
    children and their ``src`` rows, and the hashed map of the children's coords."""
    coords = _parents(batch, res, n, seed).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(coords.shape[0], 8, generator=gen) < density
    mask[::5] = False
    mask = mask.to(device)
    parent = SparseTensor(torch.zeros(coords.shape[0], 1, device=device), coords, (res,) * 3)
    conv.neighbour_map(parent)
    with neighbour_triton.use_triton_children(False):
        _, fine_coords, src, _ = spatial._subdivide(parent, mask)
    want = conv._build_neighbour_map_torch(fine_coords, (2 * res,) * 3, 3, 1, conv.DEFAULT_TABLE_BYTES)
    return parent, mask, fine_coords, src, want


CASES = [
    (2, 10, 300, 0.5, 0),  # two batch items, a third of the grid occupied
    (1, 4, 64, 1.0, 1),  # every voxel and every child: all 27 neighbours inside, the grid's faces
    (3, 16, 200, 0.3, 2),  # sparse
    (1, 7, 343, 0.7, 3),  # the whole grid of an odd size
]


@pytest.mark.parametrize("batch,res,n,density,seed", CASES)
def test_derived_map_equals_the_hashed_build(batch, res, n, density, seed):
    parent, _, _, src, want = _case(batch, res, n, density, seed)
    nbr, bits = child_maps.child_neighbour_map(conv.neighbour_map(parent).nbr, src)
    assert bits is None  # the PyTorch path, as the PyTorch build
    assert torch.equal(nbr, want)
    assert (want < want.shape[0]).float().mean() > 0.05  # the cases do have neighbours to find


def test_derived_map_in_small_chunks_and_with_int32_rows(monkeypatch):
    parent, _, _, src, want = _case(2, 10, 300, 0.5, 4)
    monkeypatch.setattr(child_maps, "CHUNK_ROWS", 7)  # row chunks that split parents' children
    assert torch.equal(child_maps.child_neighbour_map(conv.neighbour_map(parent).nbr, src.int())[0], want)


def test_no_children():
    parent, mask, _, _, _ = _case(1, 6, 50, 0.5, 5)
    nbr, _ = child_maps.child_neighbour_map(conv.neighbour_map(parent).nbr, torch.zeros(0, dtype=torch.long))
    assert nbr.shape == (0, 27)


def test_inherit_caches_the_map_only_when_it_can():
    parent, mask, fine_coords, src, want = _case(1, 8, 200, 0.5, 6)
    key = conv.neighbour_map_key(3, 1)
    fine = spatial.channel_to_spatial(parent.replace(torch.zeros(parent.num_voxels, 8)), mask)
    with child_maps.use_child_maps(False):
        assert not child_maps.inherit_child_map(parent, fine, src) and key not in fine.cache
    assert child_maps.inherit_child_map(parent, fine, src)
    assert torch.equal(fine.cache[key].nbr, want)
    assert torch.equal(conv.neighbour_map(fine).nbr, want)  # the conv finds it
    assert not child_maps.inherit_child_map(parent, fine, src)  # already there
    bare = SparseTensor(parent.feats, parent.coords, parent.spatial_shape)  # no parent map cached
    assert not child_maps.inherit_child_map(bare, fine.replace(fine.feats, fine.coords.clone()), src)
    with pytest.raises(ValueError, match="source rows"):
        child_maps.inherit_child_map(parent, SparseTensor(fine.feats, fine.coords, fine.spatial_shape), src[1:])


def _count_builds(monkeypatch):
    calls = []
    build = conv._build_neighbour_map

    def counting(coords, *args, **kwargs):
        calls.append(coords.shape[0])
        return build(coords, *args, **kwargs)

    monkeypatch.setattr(conv, "_build_neighbour_map", counting)
    return calls


def _tiny_decoder(device="cpu", dtype=None):
    """A 3-level decoder (fp32; ``dtype``: its blocks cast as the pipeline casts them) and a 2-item input."""
    torch.manual_seed(0)
    model = shape_mod.FlexiDualGridVaeDecoder(resolution=32, model_channels=[32, 16, 8], latent_channels=4,
                                              num_blocks=[1, 1, 1], block_type=["SparseConvNeXtBlock3d"] * 3,
                                              up_block_type=["SparseResBlockC2S3d"] * 2, use_fp16=False)
    for level in model.blocks:  # children on about half the slots
        for block in level:
            if isinstance(block, shape_mod.SparseResBlockC2S3d):
                torch.nn.init.normal_(block.to_subdiv.weight, std=0.5)
                torch.nn.init.zeros_(block.to_subdiv.bias)
    model = model.to(device)
    if dtype is not None:
        model.convert_to(dtype)
    coords = _parents(2, 8, 150, 7).to(device)
    feats = torch.randn(coords.shape[0], 4).to(device)
    return model, SparseTensor(feats, coords, (8, 8, 8), cache={"batch_size": 2})


def test_decoder_hashes_once_and_gives_the_same_output(monkeypatch):
    """With derived maps the decoder hashes only its input's coords (each later level inherits its
    map); the output equals the run that hashes every level, bit for bit."""
    model, x = _tiny_decoder()
    with child_maps.use_child_maps(False):
        calls = _count_builds(monkeypatch)
        want = model(x)
        assert len(calls) == 3  # the input level and both subdivisions
    calls.clear()
    got = model(x)
    assert calls == [x.num_voxels]
    assert want.num_voxels > 4 * x.num_voxels  # the subdivisions did make children
    assert torch.equal(got.coords, want.coords) and torch.equal(got.feats, want.feats)


@interpreter
@pytest.mark.parametrize("src_dtype", [torch.int32, torch.int64])
def test_triton_kernel_matches_in_the_interpreter(src_dtype):
    for batch, res, n, density, seed in CASES:
        parent, _, _, src, want = _case(batch, res, n, density, seed)
        parent_nbr = conv.neighbour_map(parent).nbr
        nbr, bits = neighbour_triton.child_map_triton(parent_nbr, src.to(src_dtype),
                                                      child_maps._child_rows(src, parent_nbr.shape[0]))
        assert torch.equal(nbr, want)
        assert torch.equal(bits, ((want < want.shape[0]).int() << torch.arange(27).int()).sum(1).int())


def test_triton_kernel_is_off_by_default():
    assert neighbour_triton.CHILD_MAPS_BY_DEFAULT is False  # until its CUDA test and decoder A/B have run
    assert child_maps.CHILD_MAPS_BY_DEFAULT is True  # the PyTorch gathers, tested here


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("batch,res,n,density,seed", CASES + [(2, 64, 40000, 0.5, 8)])
def test_triton_kernel_matches_on_cuda(batch, res, n, density, seed):
    parent, _, _, src, want = _case(batch, res, n, density, seed, "cuda")
    with neighbour_triton.use_triton_child_maps(True):
        nbr, bits = child_maps.child_neighbour_map(conv.neighbour_map(parent).nbr, src.int())
    assert torch.equal(nbr, want)
    assert torch.equal(bits, ((want < want.shape[0]).int() << torch.arange(27, device="cuda").int()).sum(1).int())


@cuda
@pytest.mark.cuda
def test_decoder_on_cuda_is_the_same_with_derived_maps():
    model, x = _tiny_decoder("cuda", torch.float16)
    want = model(SparseTensor(x.feats, x.coords, x.spatial_shape, batch_size=2))
    with neighbour_triton.use_triton_child_maps(True):
        got = model(SparseTensor(x.feats, x.coords, x.spatial_shape, batch_size=2))
    assert torch.equal(got.coords, want.coords) and torch.equal(got.feats, want.feats)


def test_map_bench_has_the_child_map_row(tmp_path):
    """``bench_neighbour_map.py --parts map`` (the GPU A/B that decides ``neighbour_triton.CHILD_MAPS_BY_DEFAULT``)
    on the CPU: its child-map row compares the derived map with the hashed one and finds them equal."""
    import json
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_neighbour_map

    out = tmp_path / "maps.json"
    assert bench_neighbour_map.main(["--tiny", "--parts", "map", "--out", str(out)]) == 0
    rows = {r["case"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["child map"]["equal"] is True and rows["child map"]["voxels"] > rows["child map"]["parents"]
