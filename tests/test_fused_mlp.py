"""The shape decoder's fused ConvNeXt tail (know3d_core/trellis2/modules/fused_mlp.py).

Three layers of checks, each against an fp64 recomputation or the PyTorch path:
- always (CPU): the PyTorch path of ``convnext_mlp_`` (what CPU runs) and the argument checks;
- Triton's CPU interpreter (``TRITON_INTERPRET=1`` with Triton installed; skipped otherwise, e.g. in
  CI): the kernel itself (several row tiles, a partial last tile, in place, strided rows) and the
  golden shape decoder with every ConvNeXt block through the kernel;
- CUDA (``-m cuda``): kernel vs PyTorch path at the decoder's widths in fp16/bf16, every
  configuration the benchmark sweeps, and the dispatch (the ConvNeXt block launches the kernel).
"""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from know3d_core.sparse import SparseTensor
from know3d_core.trellis2 import shape_decoder as shape_mod
from know3d_core.trellis2.modules import fused, fused_mlp
from know3d_core.trellis2.modules.fused_mlp import (
    Fc2Config,
    MlpConfig,
    convnext_mlp_,
    convnext_mlp_chunks_,
    convnext_mlp_triton,
    silu_linear_residual_triton,
)

import test_trellis2_decoders as dec

interpreter = pytest.mark.skipif(
    fused_mlp.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton and TRITON_INTERPRET=1 (kernel on CPU tensors)",
)
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and fused_mlp.triton is not None),
                          reason="needs CUDA + Triton")

def make_block(C, dtype=torch.float32, device="cpu", seed=0):
    """LayerNorm, fc1, fc2 of a ConvNeXt block with non-trivial affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    norm, fc1, fc2 = nn.LayerNorm(C, eps=1e-6), nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(C, generator=gen))
        norm.bias.copy_(0.3 * torch.randn(C, generator=gen))
        for lin in (fc1, fc2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / lin.in_features ** 0.5)
            lin.bias.copy_(0.3 * torch.randn(lin.bias.shape, generator=gen))
    mods = norm.to(device), fc1.to(device, dtype), fc2.to(device, dtype)
    for m in mods:
        m.requires_grad_(False)  # inference, as in the decoder's forward (the kernel has no backward)
    return mods


def inputs(rows, C, dtype, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, C, generator=gen) * 2 + torch.randn(C, generator=gen)).to(device, dtype)
    x = torch.randn(rows, C, generator=gen).to(device, dtype)
    return h, x


def reference(h, x, norm, fc1, fc2):
    """fp64 ``x + fc2(silu(fc1(LayerNorm(h))))``."""
    a = F.layer_norm(h.double(), h.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)
    z = F.silu(F.linear(a, fc1.weight.double(), fc1.bias.double()))
    return x.double() + F.linear(z, fc2.weight.double(), fc2.bias.double())


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------- PyTorch path (CPU)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_torch_path_matches_fp64_in_place(dtype, tol):
    norm, fc1, fc2 = make_block(32, dtype)
    h, x = inputs(70, 32, dtype)
    ref = reference(h, x, norm, fc1, fc2)
    out = convnext_mlp_(h, norm, fc1, fc2, x, chunk_rows=16)  # several chunks
    assert out is h and out.dtype == dtype
    assert rel(out, ref) <= tol


def test_residual_shape_mismatch_is_an_error():
    norm, fc1, fc2 = make_block(16)
    with pytest.raises(ValueError, match="residual"):
        convnext_mlp_(torch.zeros(4, 16), norm, fc1, fc2, torch.zeros(5, 16))


def test_kernel_not_taken_on_cpu_or_with_grad():
    h = torch.zeros(4, 64, dtype=torch.float16)
    assert not fused_mlp.mlp_kernel_ok(h)


@pytest.mark.parametrize("form", ["tail", "fc2"])
def test_failing_kernel_launch_falls_back_to_pytorch(monkeypatch, caplog, form):
    """A kernel that fails to launch (compiler/driver) is logged; the result comes from the PyTorch ops
    and no kernel is tried again in this process."""
    norm, fc1, fc2 = make_block(32)
    h, x = inputs(20, 32, torch.float32)
    ref = convnext_mlp_(h.clone(), norm, fc1, fc2, x)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fused_mlp, "_failed", [])
    monkeypatch.setattr(fused_mlp, "fused_enabled", lambda t: True)
    monkeypatch.setattr(fused_mlp._switch, "enabled", True)
    monkeypatch.setattr(fused_mlp, "_KERNEL_DTYPES", (torch.float32,))
    monkeypatch.setattr(fused_mlp, "MLP_CONFIGS", {32: MlpConfig(16, 32, 4, 2)} if form == "tail" else {})
    monkeypatch.setattr(fused_mlp, "FC2_CONFIGS", {32: Fc2Config(16, 32, 32, 4, 2)} if form == "fc2" else {})
    monkeypatch.setattr(fused_mlp, "convnext_mlp_triton", broken)
    monkeypatch.setattr(fused_mlp, "silu_linear_residual_triton", broken)
    with caplog.at_level("WARNING"):
        got = convnext_mlp_(h.clone(), norm, fc1, fc2, x)
        again = convnext_mlp_(h.clone(), norm, fc1, fc2, x)
    assert calls == [1] and len(fused_mlp._failed) == 1 and "no compiler here" in caplog.text
    assert torch.equal(got, ref) and torch.equal(again, ref)


# ----------------------------------------------------------------------------- Triton interpreter
@interpreter
@pytest.mark.parametrize("C,cfg", [(16, MlpConfig(16, 16, 4, 2)), (32, MlpConfig(32, 64, 4, 2)),
                                   (64, MlpConfig(16, 32, 4, 3))])
def test_kernel_matches_fp64_in_the_interpreter(C, cfg):
    norm, fc1, fc2 = make_block(C, torch.float16, seed=C)
    h, x = inputs(3 * cfg.BM + 5, C, torch.float16)  # a partial last tile
    ref = reference(h, x, norm, fc1, fc2)
    plain = convnext_mlp_(h.clone(), norm, fc1, fc2, x)
    out = convnext_mlp_triton(h, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
                              x, h, cfg)  # in place
    assert rel(out, ref) <= 1e-3
    assert rel(out, ref) <= rel(plain, ref) + 1e-4  # rounds less often than the PyTorch ops
    torch.testing.assert_close(out.float(), plain.float(), rtol=1e-2, atol=1e-2)


@interpreter
def test_kernel_reads_strided_rows_in_the_interpreter():
    norm, fc1, fc2 = make_block(32, torch.float16)
    h, x = inputs(40, 64, torch.float16)  # column halves: row strides 64
    h, x = h[:, :32], x[:, 32:]
    ref = reference(h, x, norm, fc1, fc2)
    out = torch.empty(40, 32, dtype=torch.float16)
    convnext_mlp_triton(h, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias, x, out,
                        MlpConfig(16, 32, 4, 2))
    assert rel(out, ref) <= 1e-3


@interpreter
def test_silu_gemm_matches_fp64_in_the_interpreter():
    """fc2 with SiLU on load and bias + residual in the epilogue: several row and column tiles, a partial
    last row tile, out aliasing the residual."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(37, 64, generator=gen).to(torch.float16)
    w = (torch.randn(32, 64, generator=gen) / 8).to(torch.float16)
    b = torch.randn(32, generator=gen).to(torch.float16)
    x = torch.randn(37, 32, generator=gen).to(torch.float16)
    ref = x.double() + F.linear(F.silu(a.float()).half().double(), w.double(), b.double())
    out = silu_linear_residual_triton(a, w, b, x.clone(), x, Fc2Config(16, 16, 32, 4, 2))
    assert out is x
    assert rel(out, ref) <= 1e-3


@interpreter
def test_chunked_tail_with_the_silu_gemm_in_the_interpreter():
    """The wide-C path (LayerNorm, cuBLAS fc1, fc2 kernel) in row chunks: close to fp64 and to the PyTorch ops."""
    norm, fc1, fc2 = make_block(32, torch.float16, seed=5)
    h, x = inputs(45, 32, torch.float16)
    ref = reference(h, x, norm, fc1, fc2)
    plain = convnext_mlp_chunks_(h.clone(), norm, fc1, fc2, x, chunk_rows=16)
    out = convnext_mlp_chunks_(h, norm, fc1, fc2, x, chunk_rows=16, fc2_cfg=Fc2Config(16, 32, 64, 4, 2))
    assert out is h and rel(out, ref) <= 1e-3
    torch.testing.assert_close(out.float(), plain.float(), rtol=1e-2, atol=1e-2)


def test_bad_hidden_slice_is_an_error():
    if fused_mlp.triton is None:
        pytest.skip("needs Triton")
    norm, fc1, fc2 = make_block(32, torch.float16)
    h, x = inputs(8, 32, torch.float16)
    with pytest.raises(ValueError, match="H %"):
        convnext_mlp_triton(h, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
                            x, h, MlpConfig(16, 96, 4, 2))


@interpreter
def test_golden_decoder_through_the_kernel_in_the_interpreter(monkeypatch):
    """Every ConvNeXt block of the golden decoder through a kernel (fp32 CPU tensors, interpreted): the
    fused tail at widths 8 and 16, the fc2 GEMM at 32; still the golden output."""
    model, io = dec.golden_shape_decoder()
    launches = []
    kernel = fused_mlp.convnext_mlp_triton

    def counted(h, *args):
        launches.append(tuple(h.shape))
        return kernel(h, *args)

    monkeypatch.setattr(fused_mlp, "fused_enabled", lambda t: True)
    monkeypatch.setattr(fused_mlp._switch, "enabled", True)
    monkeypatch.setattr(fused_mlp, "_KERNEL_DTYPES", (torch.float32,))
    monkeypatch.setattr(fused_mlp, "MLP_CONFIGS", {c: MlpConfig(16, 32, 4, 2) for c in (8, 16)})
    monkeypatch.setattr(fused_mlp, "FC2_CONFIGS", {32: Fc2Config(16, 32, 32, 4, 2)})  # the first level's block
    monkeypatch.setattr(fused_mlp, "convnext_mlp_triton", counted)
    gemm = fused_mlp.silu_linear_residual_triton
    monkeypatch.setattr(fused_mlp, "silu_linear_residual_triton", lambda a, *r: launches.append(a.shape) or gemm(a, *r))
    head, subs = model(dec.slat_from(io), return_subs=True)
    assert len(launches) == 4 and not fused_mlp._failed  # the four ConvNeXt blocks: three fused tails, one fc2
    assert (launches[0][1], sum(1 for s in launches if s[1] == 128)) == (128, 1)  # fc2's input [N, 4 * 32] first
    assert torch.equal(head.coords, io["out_coords"])
    assert dec.rel_err(head.feats, io["out_feats"]) <= 1e-5
    for i, sub in enumerate(subs):
        assert dec.rel_err(sub.feats, io[f"subdiv_logits_{i}"]) <= 1e-5


# ----------------------------------------------------------------------------- CUDA
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,C", [(torch.float16, 64), (torch.float16, 128), (torch.float16, 256),
                                     (torch.float16, 512), (torch.float16, 1024), (torch.bfloat16, 128),
                                     (torch.bfloat16, 512)])
def test_kernel_matches_torch_path_on_cuda(dtype, C):
    """The default configuration and (fp16) every one the benchmark sweeps, fused tail or fc2 GEMM:
    close to fp64 and to the PyTorch ops."""
    norm, fc1, fc2 = make_block(C, dtype, "cuda", seed=C)
    h, x = inputs(20011 if C < 1024 else 5003, C, dtype, "cuda")
    ref = reference(h, x, norm, fc1, fc2)
    with fused.use_fused_kernels(False):
        plain = convnext_mlp_(h.clone(), norm, fc1, fc2, x)
    plain_err = rel(plain, ref)
    assert plain_err <= TOL[dtype]
    cfgs = [t[C] for t in (fused_mlp.MLP_CONFIGS, fused_mlp.FC2_CONFIGS) if C in t]
    if dtype == torch.float16:  # the benchmark's sweep runs fp16
        cfgs += list(fused_mlp.SWEEP_CONFIGS.get(C, ()))
    for cfg in cfgs:
        if isinstance(cfg, Fc2Config):
            out = convnext_mlp_chunks_(h.clone(), norm, fc1, fc2, x, fc2_cfg=cfg)
        else:
            out = convnext_mlp_triton(h.clone(), norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias,
                                      fc2.weight, fc2.bias, x, h.clone(), cfg)
        assert not fused_mlp._failed, (cfg, fused_mlp._failed)  # the fc2 form falls back quietly: not here
        assert rel(out, ref) <= max(plain_err, TOL[dtype] / 4), cfg
        torch.testing.assert_close(out.float(), plain.float(), rtol=4 * TOL[dtype], atol=4 * TOL[dtype])


@cuda
@pytest.mark.cuda
def test_convnext_block_launches_the_kernel_on_cuda(monkeypatch):
    """A ConvNeXt block at a configured width takes the kernel; output close to the unfused block."""
    block = shape_mod.SparseConvNeXtBlock3d(128).cuda()
    for m in (block.conv, block.mlp):
        m.to(torch.float16)
    coords = dec.sdf_to_flexible_dual_grid(dec.sphere_sdf(radius=0.3), 32)[0]
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1).cuda()
    x = SparseTensor(torch.randn(len(coords), 128, device="cuda", dtype=torch.float16), coords, (32, 32, 32))
    with torch.no_grad(), fused.use_fused_kernels(False):
        ref = block(x).feats
    launches = []
    kernel = fused_mlp.convnext_mlp_triton
    monkeypatch.setattr(fused_mlp, "convnext_mlp_triton", lambda *a: launches.append(1) or kernel(*a))
    with torch.no_grad(), fused_mlp.use_fused_mlp(True):
        out = block(x).feats
    assert launches == [1] and not fused_mlp._failed
    assert dec.rel_err(out, ref) <= 2e-3
