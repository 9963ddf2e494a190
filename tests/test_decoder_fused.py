"""Fused LayerNorm(+SiLU) of the shape decoder (know3d_core/trellis2/modules/fused_norm.py).

Three layers of checks, each against an fp64 recomputation or the PyTorch path:
- always (CPU): the PyTorch path of ``layer_norm_act`` (what CPU runs) and the argument checks;
- Triton's CPU interpreter (``TRITON_INTERPRET=1`` with Triton installed; skipped otherwise, e.g. in
  CI): the kernel itself, and the golden shape decoder run through the kernel;
- CUDA (``-m cuda`` on a GPU machine): kernel vs PyTorch path, decoder blocks and a whole decoder
  with the fused kernels on vs off.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from know3d_core.sparse import SparseTensor
from know3d_core.trellis2 import shape_decoder as shape_mod
from know3d_core.trellis2.modules import fused, fused_mlp, fused_norm
from know3d_core.trellis2.modules.fused_norm import layer_norm_act

import test_trellis2_decoders as dec

interpreter = pytest.mark.skipif(
    fused_norm.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton and TRITON_INTERPRET=1 (kernel on CPU tensors)",
)
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and fused_norm.triton is not None),
                          reason="needs CUDA + Triton")

# Output rounding of each dtype (relative), plus fp32 accumulation differences for fp32.
TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 2e-6}


def reference(x, weight, bias, eps, silu, index=None):
    """fp64 LayerNorm (+ SiLU) of the selected rows."""
    src = x.double() if index is None else x.double()[index.long()]
    y = F.layer_norm(src, src.shape[-1:], None if weight is None else weight.double(),
                     None if bias is None else bias.double(), eps)
    return F.silu(y) if silu else y


def inputs(rows, C, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, C, generator=gen) * 3 + torch.randn(C, generator=gen)).to(dtype)
    w = 1 + 0.5 * torch.randn(C, generator=gen)
    b = 0.5 * torch.randn(C, generator=gen)
    return x.to(device), w.to(device), b.to(device)


def assert_rounded_close(out, ref, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- PyTorch path (CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("affine,silu", [(False, False), (True, False), (False, True), (True, True)])
def test_torch_path_matches_fp64(dtype, affine, silu, monkeypatch):
    monkeypatch.setattr(fused_norm, "TORCH_CHUNK_ROWS", 16)  # several chunks
    x, w, b = inputs(50, 24, dtype)
    w, b = (w, b) if affine else (None, None)
    assert_rounded_close(layer_norm_act(x, w, b, 1e-6, silu), reference(x, w, b, 1e-6, silu), dtype)
    index = torch.randint(0, 50, (70,), dtype=torch.int32)
    out = layer_norm_act(x, w, b, 1e-6, silu, index=index)
    assert out.shape == (70, 24)
    assert_rounded_close(out, reference(x, w, b, 1e-6, silu, index), dtype)
    inplace = x.clone()
    assert layer_norm_act(inplace, w, b, 1e-6, silu, out=inplace) is inplace
    assert_rounded_close(inplace, reference(x, w, b, 1e-6, silu), dtype)


def test_torch_path_rounds_like_layer_norm32_then_silu():
    """CPU keeps the reference rounding: LayerNorm rounded to the input dtype, then SiLU in it."""
    x, w, b = inputs(40, 32, torch.float16)
    expected = F.silu(F.layer_norm(x.float(), (32,), w, b, 1e-6).to(torch.float16))
    assert torch.equal(layer_norm_act(x, w, b, 1e-6, True), expected)
    head = layer_norm_act(x, eps=1e-5, out_dtype=torch.float32)
    assert head.dtype == torch.float32 and torch.equal(head, F.layer_norm(x.float(), (32,), None, None, 1e-5))


def test_cpu_tensors_never_launch_the_kernel(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("kernel launched for a CPU tensor")

    monkeypatch.setattr(fused_norm, "layer_norm_act_triton", fail)
    x, w, b = inputs(8, 16, torch.float32)
    layer_norm_act(x, w, b, 1e-6, True)


def test_argument_checks():
    x, w, b = inputs(8, 16, torch.float32)
    with pytest.raises(ValueError, match="weight and bias"):
        layer_norm_act(x, w, None)
    with pytest.raises(ValueError, match=r"must be \[16\]"):
        layer_norm_act(x, w[:8], b[:8])
    with pytest.raises(ValueError, match="out must be"):
        layer_norm_act(x, out=torch.empty(4, 16))
    with pytest.raises(ValueError, match="alias x only without an index"):
        layer_norm_act(x, index=torch.arange(8), out=x)
    with pytest.raises(ValueError, match="index must be"):
        layer_norm_act(x, index=torch.zeros(3))


# ----------------------------------------------------------------------------- Triton interpreter
@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("C", [8, 100, 1024])
def test_kernel_matches_fp64_in_the_interpreter(dtype, C):
    x, w, b = inputs(37, C, dtype, seed=C)
    index = torch.randint(0, 37, (45,), generator=torch.Generator().manual_seed(1))
    for affine in (False, True):
        ww, bb = (w, b) if affine else (None, None)
        for silu in (False, True):
            out = torch.full((45, C), float("nan"), dtype=dtype)
            fused_norm.layer_norm_act_triton(x, ww, bb, 1e-6, silu, index.to(torch.int32), out)
            assert_rounded_close(out, reference(x, ww, bb, 1e-6, silu, index), dtype)
        inplace = x.clone()
        fused_norm.layer_norm_act_triton(inplace, ww, bb, 1e-6, False, None, inplace)
        assert_rounded_close(inplace, reference(x, ww, bb, 1e-6, False), dtype)


@interpreter
def test_kernel_reads_strided_rows_and_writes_fp32_in_the_interpreter():
    x, _, _ = inputs(20, 96, torch.float16)
    view = x[:, 16:80]  # row stride 96, channels contiguous
    out = torch.empty(20, 64, dtype=torch.float32)
    fused_norm.layer_norm_act_triton(view, None, None, 1e-5, False, None, out)
    assert_rounded_close(out, reference(view, None, None, 1e-5, False), torch.float32)
    empty = torch.empty(0, 64, dtype=torch.float16)
    assert fused_norm.layer_norm_act_triton(x[:0, :64], None, None, 1e-5, True, None, empty) is empty


@interpreter
def test_golden_decoder_through_the_kernel_in_the_interpreter(monkeypatch):
    """Every decoder norm through the kernel (CPU tensors, interpreted): still the golden output."""
    model, io = dec.golden_shape_decoder()
    launches = []
    kernel = fused_norm.layer_norm_act_triton

    def counted(*args):
        launches.append(args[0].shape)
        return kernel(*args)

    monkeypatch.setattr(fused_norm, "fused_enabled", lambda x: True)
    monkeypatch.setattr(fused_norm, "layer_norm_act_triton", counted)
    head, subs = model(dec.slat_from(io), return_subs=True)
    assert len(launches) == 4 + 4 + 4 + 1  # ConvNeXt norms, C2S norm1 and norm2, head
    assert torch.equal(head.coords, io["out_coords"])
    assert dec.rel_err(head.feats, io["out_feats"]) <= 1e-5
    for i, sub in enumerate(subs):
        assert dec.rel_err(sub.feats, io[f"subdiv_logits_{i}"]) <= 1e-5


# ----------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C", [64, 128, 256, 512, 1024])
def test_kernel_matches_torch_path_on_cuda(dtype, C):
    x, w, b = inputs(20000, C, dtype, "cuda", seed=C)
    index = torch.randint(0, 20000, (30000,), device="cuda")
    for silu in (False, True):
        out = layer_norm_act(x, w, b, 1e-6, silu, index=index)
        assert_rounded_close(out, reference(x, w, b, 1e-6, silu, index), dtype)
        with fused.use_fused_kernels(False):
            plain = layer_norm_act(x, w, b, 1e-6, silu, index=index)
        # the PyTorch path rounds twice (LN, then SiLU): one extra rounding step apart at most
        torch.testing.assert_close(out.float(), plain.float(), rtol=3 * TOL[dtype], atol=3 * TOL[dtype])
    inplace = x.clone()
    layer_norm_act(inplace, None, None, 1e-6, out=inplace)
    assert_rounded_close(inplace, reference(x, None, None, 1e-6, False), dtype)


def _cuda_decoder(dtype):
    torch.manual_seed(0)
    # widths 512 (the ConvNeXt tail's fc2 GEMM), 128 and 64 (the fused tail): every MLP kernel form
    model = shape_mod.FlexiDualGridVaeDecoder(**dict(shape_mod.TINY_ARGS, model_channels=[512, 128, 128, 64, 64],
                                                      use_fp16=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    model = model.cuda()
    model.convert_to(dtype)
    return model


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decoder_fused_matches_unfused_on_cuda(dtype):
    model = _cuda_decoder(dtype)
    coords = dec.sdf_to_flexible_dual_grid(dec.sphere_sdf(radius=0.3), 16)[0]
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1).cuda()
    x = SparseTensor(torch.randn(len(coords), 32, device="cuda"), coords, (16, 16, 16))
    with fused.use_fused_kernels(False):
        ref, ref_subs = model(SparseTensor(x.feats, x.coords, x.spatial_shape), return_subs=True)
    with fused_mlp.use_fused_mlp(True):  # the MLP kernels too (whatever the default)
        head, subs = model(SparseTensor(x.feats, x.coords, x.spatial_shape), return_subs=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.equal(subs[0].coords, ref_subs[0].coords)
    for a, b in zip(subs, ref_subs):  # a logit next to zero may flip a child: compare up to there
        if not torch.equal(a.coords, b.coords):
            break
        assert dec.rel_err(a.feats, b.feats) <= tol
    if torch.equal(head.coords, ref.coords):
        assert dec.rel_err(head.feats, ref.feats) <= tol
    else:
        assert abs(head.coords.shape[0] - ref.coords.shape[0]) <= 0.02 * ref.coords.shape[0]
    assert head.feats.dtype == torch.float32 and torch.isfinite(head.feats).all()


# ----------------------------------------------------------------------------- kernel precompile
def test_precompile_runs_nothing_off_cuda():
    model = shape_mod.FlexiDualGridVaeDecoder(**shape_mod.TINY_ARGS)
    assert model._kernel_jobs(torch.device("cpu")) == []
    assert model.precompile_kernels(torch.device("cpu")) == 0


_PRECOMPILE_SCRIPT = """
import glob, os, sys
import torch
import test_decoder_fused as tdf
import test_trellis2_decoders as dec
from know3d_core.sparse import SparseTensor

def variants():
    root = os.environ["TRITON_CACHE_DIR"]
    return sorted(p for p in glob.glob(os.path.join(root, "*", "*.json"))
                  if not os.path.basename(p).startswith("__grp__"))

from know3d_core.sparse import neighbour_triton
from know3d_core.trellis2.modules import fused_mlp, fused_norm
fused_mlp.set_fused_mlp(True)  # cover the MLP kernels too (whatever the default)
neighbour_triton.set_triton_children(True)  # and the children, head and child-map kernels (off by default)
fused_norm.set_fused_head(True)
neighbour_triton.set_triton_child_maps(True)
model = tdf._cuda_decoder(torch.float16)
ran = model.precompile_kernels()
compiled = variants()
coords = dec.sdf_to_flexible_dual_grid(dec.sphere_sdf(radius=0.3), 16)[0]
coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1).cuda()
feats = torch.randn(len(coords), 32, device="cuda")
# the batch size known, as the pipeline's decode and upsample stages give it (the map build's int32-key path)
model(SparseTensor(feats, coords, (16, 16, 16), batch_size=1))
model.upsample(SparseTensor(feats, coords, (16, 16, 16), batch_size=1), 4)
torch.cuda.synchronize()
print("ran", ran, "compiled", len(compiled), "after forward", len(variants()))
assert ran > 0 and compiled, (ran, compiled)
assert variants() == compiled, sorted(set(variants()) - set(compiled))
"""


@cuda
@pytest.mark.cuda
def test_precompile_covers_every_kernel_the_forward_launches(tmp_path):
    """In a fresh process with an empty kernel cache, the forward and upsample after
    ``precompile_kernels`` compile nothing new (every variant was covered)."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"),
               PYTHONPATH=os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _PRECOMPILE_SCRIPT], env=env, cwd=here,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


# ----------------------------------------------------------------------------- fused head
@pytest.mark.skipif(fused_norm.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs Triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("n,C,O", [(300, 64, 7), (1, 64, 6), (130, 48, 7)])
def test_head_kernel_matches_layer_norm_then_linear_in_the_interpreter(n, C, O):
    _check_head("cpu", n, C, O, torch.float32)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_head_kernel_matches_layer_norm_then_linear_on_cuda(dtype):
    _check_head("cuda", 200_001, 64, 7, dtype)
    _check_head("cuda", 5, 64, 6, dtype)


def _check_head(device, n, C, O, dtype):
    """The decoders' head in one pass equals LayerNorm (fp32, non-affine) then the fp32 linear, up to
    fp32 summation order."""
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, C, generator=gen) * 3 + 1).to(device, dtype)
    w, b = torch.randn(O, C, generator=gen).to(device), torch.randn(O, generator=gen).to(device)
    got = fused_norm.layer_norm_linear_triton(x, w, b, 1e-5)
    want = F.linear(F.layer_norm(x.double(), (C,), eps=1e-5), w.double(), b.double())
    assert got.dtype == torch.float32 and got.shape == (n, O)
    assert (got.double() - want).abs().max() <= 2e-5 * want.abs().max()


def test_head_takes_the_kernel_only_where_it_runs():
    model = shape_mod.FlexiDualGridVaeDecoder(**shape_mod.TINY_ARGS)
    x = torch.zeros(4, model.model_channels[-1])
    assert fused_norm.HEAD_BY_DEFAULT is False  # off until it has run on CUDA
    with fused_norm.use_fused_head(True):
        assert not fused_norm.head_kernel_ok(x, model.output_layer.weight)  # CPU: the PyTorch ops


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decoder_with_children_and_head_kernels_matches_without_on_cuda(dtype):
    """Session 7's kernels (off by default until this has run): the children kernel changes no value
    (same voxels, same subdivision logits bit for bit); the one-pass head differs from LayerNorm +
    addmm by fp32 summation order only."""
    from know3d_core.sparse import neighbour_triton

    model = _cuda_decoder(dtype)
    coords = dec.sdf_to_flexible_dual_grid(dec.sphere_sdf(radius=0.3), 16)[0]
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1).cuda()
    x = SparseTensor(torch.randn(len(coords), 32, device="cuda"), coords, (16, 16, 16))
    with neighbour_triton.use_triton_children(False), fused_norm.use_fused_head(False):
        ref, ref_subs = model(SparseTensor(x.feats, x.coords, x.spatial_shape), return_subs=True)
    with neighbour_triton.use_triton_children(True), fused_norm.use_fused_head(True):
        head, subs = model(SparseTensor(x.feats, x.coords, x.spatial_shape), return_subs=True)
    for a, b in zip(subs, ref_subs):
        assert torch.equal(a.coords, b.coords) and torch.equal(a.feats, b.feats)
    assert torch.equal(head.coords, ref.coords)
    assert (head.feats - ref.feats).abs().max() <= 1e-5 * ref.feats.abs().max()
