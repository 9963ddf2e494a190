"""Fused Triton kernels of the flow DiT blocks: same function as the PyTorch path (CUDA tests),
and the switch that keeps every CPU run on the PyTorch ops."""
import pytest
import torch
import torch.nn.functional as F

from know3d_core.sparse import SparseTensor
from know3d_core.trellis2.modules import fused
from know3d_core.trellis2.modules.attention import TokenLayout
from know3d_core.trellis2.modules.blocks import FeedForwardNet, ModulatedTransformerCrossBlock
from know3d_core.trellis2.modules.rope import apply_rope, rope_phases
from know3d_core.trellis2.loading import load_state_dict_strict

import test_trellis2_flows as flows

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and fused.triton is not None), reason="needs CUDA + Triton")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_cpu_never_takes_the_fused_path():
    x = torch.randn(2, 3)
    assert not fused.fused_enabled(x)
    with fused.use_fused_kernels(False):
        assert not fused._switch.enabled
        with fused.use_fused_kernels(True):
            assert fused._switch.enabled
        assert not fused._switch.enabled
    assert fused._switch.enabled


def _block(C=128, H=2, ctx=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    blk = ModulatedTransformerCrossBlock(C, ctx, H, mlp_ratio=2.5, use_rope=True, qk_rms_norm=True,
                                         qk_rms_norm_cross=True, share_mod=True)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
    return blk


def _run(blk, on, **kw):
    with torch.no_grad(), fused.use_fused_kernels(on):
        return blk(**kw)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_block_fused_matches_pytorch_path(dtype, tol):
    """Dense batch (shared RoPE table) and packed ragged batch, with a knowledge branch installed."""
    torch.backends.cuda.matmul.allow_tf32 = False
    C, H = 128, 2
    blk = _block(C, H).cuda()
    for m in blk.modules():
        if isinstance(m, torch.nn.Linear):
            m.to(dtype)
    seen = []

    def branch(x, ctx):
        seen.append(x)
        return 0.1 * torch.tanh(x) * ctx

    blk.knowledge_attn = branch
    B, L = 2, 37
    x = torch.randn(B, L, C, device="cuda").to(dtype)
    mod = torch.randn(B, 6 * C, device="cuda").to(dtype)
    ctx = torch.randn(B, 11, 48, device="cuda").to(dtype)
    rope = rope_phases(torch.randint(0, 32, (L, 3), device="cuda"), C // H)
    a = _run(blk, False, x=x, mod=mod, context=ctx, rope=rope, knowledge_ctx=0.5)
    b = _run(blk, True, x=x, mod=mod, context=ctx, rope=rope, knowledge_ctx=0.5)
    assert b.dtype == dtype and _rel(b, a) <= tol
    assert len(seen) == 2 and _rel(seen[1], seen[0]) <= tol  # the hook saw the same block input
    lens = [23, 14]
    layout = TokenLayout(torch.tensor(lens, device="cuda"), lens,
                         torch.repeat_interleave(torch.arange(2, device="cuda"), torch.tensor(lens, device="cuda")))
    xp = torch.randn(1, sum(lens), C, device="cuda").to(dtype)
    rp = rope_phases(torch.randint(0, 32, (1, sum(lens), 3), device="cuda"), C // H)
    a = _run(blk, False, x=xp, mod=mod, context=ctx, rope=rp, layout=layout)
    b = _run(blk, True, x=xp, mod=mod, context=ctx, rope=rp, layout=layout)
    assert _rel(b, a) <= tol


@cuda
@pytest.mark.cuda
def test_kernels_match_fp64_references():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 50, 1536, device="cuda", generator=gen) * 3 + 1
    mul, add = torch.randn(3, 1536, device="cuda", generator=gen), torch.randn(3, 1536, device="cuda", generator=gen)
    ref = F.layer_norm(x.double(), (1536,), eps=1e-6) * (1 + mul.double()[:, None]) + add.double()[:, None]
    assert _rel(fused.layer_norm_modulate(x, mul, add, 1e-6), ref) <= 1e-6
    w, b = mul[0], add[0]
    ref = F.layer_norm(x.double(), (1536,), w.double(), b.double(), eps=1e-6)
    assert _rel(fused.layer_norm_modulate(x, w, b, 1e-6, offset=0.0), ref) <= 1e-6
    gi = torch.randint(0, 3, (150,), device="cuda")
    ref = F.layer_norm(x.double(), (1536,), eps=1e-6).view(150, -1) * (1 + mul.double()[gi]) + add.double()[gi]
    assert _rel(fused.layer_norm_modulate(x, mul, add, 1e-6, group_index=gi).view(150, -1), ref) <= 1e-6

    y = torch.randn(3, 50, 1536, device="cuda", generator=gen)
    xr = x.double() + y.double() * mul.double()[:, None]
    x_new, h = fused.residual_layer_norm_modulate(x, y, mul, w, b, 1e-6, 0.0)
    assert _rel(x_new, xr) <= 1e-6
    assert _rel(h, F.layer_norm(xr, (1536,), w.double(), b.double(), eps=1e-6)) <= 1e-6
    x_new, h = fused.residual_layer_norm_modulate(x, y, None, mul, add, 1e-6)
    ref = F.layer_norm(x.double() + y.double(), (1536,), eps=1e-6) * (1 + mul.double()[:, None]) + add.double()[:, None]
    assert _rel(h, ref) <= 1e-6
    z = torch.randn(3, 50, 1536, device="cuda", generator=gen)
    w2, b2 = torch.randn(1536, device="cuda", generator=gen), torch.randn(1536, device="cuda", generator=gen)
    x_new, h, h2 = fused.residual_layer_norm_modulate(x, y, mul, w, b, 1e-6, 0.0, z=z, second=(w2, b2))
    xr = x.double() + y.double() * mul.double()[:, None] + z.double()
    assert _rel(x_new, xr) <= 1e-6
    assert _rel(h, F.layer_norm(xr, (1536,), w.double(), b.double(), eps=1e-6)) <= 1e-6
    assert _rel(h2, F.layer_norm(xr, (1536,), w2.double(), b2.double(), eps=1e-6)) <= 1e-6
    xb, yb = x.bfloat16(), y.bfloat16()  # a zero z changes nothing, bit for bit
    assert torch.equal(fused.residual_layer_norm_modulate(xb, yb, None, w, b, 1e-6, z=torch.zeros_like(yb))[1],
                       fused.residual_layer_norm_modulate(xb, yb, None, w, b, 1e-6)[1])
    xr = x.double().view(150, -1) + y.double().view(150, -1) * add.double()[gi]
    assert _rel(fused.gated_residual(x.view(1, 150, -1), y.view(1, 150, -1), add, gi).view(150, -1), xr) <= 1e-6

    qkv = torch.randn(2, 40, 3, 12, 128, device="cuda", generator=gen)
    gamma = torch.rand(12, 128, device="cuda", generator=gen) + 0.5
    rope = rope_phases(torch.randint(0, 64, (40, 3), device="cuda"), 128)
    for q, r in ((qkv[:, :, 0], rope), (qkv[:, :, 1], None)):
        normed = F.rms_norm(q.double(), (128,), eps=1e-26) * gamma.double()
        ref = normed if r is None else apply_rope(normed, r).double()
        got = fused.qk_norm_rope(q, gamma, r, 1e-26)
        assert got.is_contiguous() and _rel(got, ref) <= 1e-6


@cuda
@pytest.mark.cuda
def test_mlp_gelu_epilogue_is_tanh_gelu():
    ff = FeedForwardNet(256, 4.0).cuda().to(torch.bfloat16)
    x = torch.randn(3, 70, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fast = ff(x)
        ref = ff.mlp[2](F.gelu(F.linear(x.float(), ff.mlp[0].weight.float(), ff.mlp[0].bias.float()), approximate="tanh")
                        .to(torch.bfloat16))
        exact_gelu = ff.mlp[2](F.gelu(F.linear(x.float(), ff.mlp[0].weight.float(), ff.mlp[0].bias.float()))
                               .to(torch.bfloat16))
    assert _rel(fast, ref) <= 1e-2
    assert _rel(fast, ref) < _rel(exact_gelu, ref)  # closer to tanh-GELU than to erf-GELU


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_golden_parity_on_cuda_with_fused_kernels(dtype):
    """The reference golden outputs, recomputed on the GPU through the fused blocks."""
    torch.backends.cuda.matmul.allow_tf32 = False
    for name in ("ss_flow", "slat_flow"):
        cls, cfg, weights, io = flows._golden(name)
        model = load_state_dict_strict(cls(**cfg, dtype=dtype), weights, f"{name}_weights.safetensors").cuda()
        with torch.no_grad():
            if name == "ss_flow":
                out = model(io["x"].cuda(), io["t"].cuda(), io["cond"].cuda())
            else:
                out = model(SparseTensor(io["feats"].cuda(), io["coords"].cuda(), (8, 8, 8)),
                            io["t"].cuda(), io["cond"].cuda()).feats
        flows._check_golden(out.cpu(), io, dtype)
