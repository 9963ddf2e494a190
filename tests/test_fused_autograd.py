"""Training through the fused kernels (issue 19 item 8).

- CPU: the dispatch rule (:mod:`know3d_core.sparse.kernel_dispatch`) and its guard: a kernel without
  a backward never runs on a tensor that requires grad (the wrapper takes the PyTorch path; the raw
  kernel entry points raise).
- Triton's CPU interpreter (``TRITON_INTERPRET=1`` with Triton installed; skipped otherwise): the
  backward kernels against fp64 autograd of the reference op chain.
- CUDA (marked ``cuda``): forward + backward of tiny structure and shape flows with the fused kernels
  against the PyTorch path: every parameter gets a gradient and each one matches; the sparse conv's
  backward against the PyTorch ``gather`` algorithm.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from know3d_core.sparse import SparseTensor, conv, conv_triton, neighbour_map, submanifold_conv3d
from know3d_core.sparse.kernel_dispatch import check_no_grad, grad_needed, use_kernel
from know3d_core.trellis2.modules import fused, fused_norm
from know3d_core.trellis2.modules.rope import apply_rope, rope_phases
from know3d_core.trellis2.slat_flow import SLatFlowModel
from know3d_core.trellis2.sparse_structure_flow import SparseStructureFlowModel
from know3d_core.trellis2.tiny import random_state_dict, tiny_flow_args

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and fused.triton is not None), reason="needs CUDA + Triton")
interpreter = pytest.mark.skipif(
    fused.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton and TRITON_INTERPRET=1 (kernels on CPU tensors)",
)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- dispatch rule (CPU)
def test_use_kernel_decision_table():
    leaf = torch.zeros(3, requires_grad=True)
    const = torch.zeros(3)
    assert not use_kernel(False, True, const)  # device cannot run it: always the PyTorch path
    assert use_kernel(True, False, const, None)  # nothing needs a gradient
    assert not use_kernel(True, False, const, leaf)  # no backward + grad needed: PyTorch path
    assert use_kernel(True, True, const, leaf)  # the kernel has a backward
    with torch.no_grad():
        assert use_kernel(True, False, leaf)  # autograd not recording
    assert grad_needed(None, leaf) and not grad_needed(None, const)


def test_check_no_grad_raises_only_when_a_gradient_is_needed():
    leaf = torch.zeros(3, requires_grad=True)
    check_no_grad("k", torch.zeros(3), None)
    with torch.no_grad():
        check_no_grad("k", leaf)
    with pytest.raises(RuntimeError, match="k: this Triton kernel has no backward pass"):
        check_no_grad("k", torch.zeros(3), leaf)


def test_layer_norm_act_takes_the_torch_path_when_grad_is_needed(monkeypatch):
    """With the device check forced on, an input that requires grad still goes to the PyTorch ops
    (the raw kernel would raise); the gradients are those of the reference op chain."""
    monkeypatch.setattr(fused_norm, "fused_enabled", lambda x: True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 12, generator=gen, requires_grad=True)
    w = torch.randn(12, generator=gen, requires_grad=True)
    b = torch.randn(12, generator=gen, requires_grad=True)
    out = fused_norm.layer_norm_act(x, w, b, 1e-6, silu=True)
    ref = F.silu(F.layer_norm(x, (12,), w, b, 1e-6))
    g = torch.randn(7, 12, generator=gen)
    got = torch.autograd.grad((out * g).sum(), (x, w, b))
    want = torch.autograd.grad((ref * g).sum(), (x, w, b))
    assert all(_rel(a, e) < 1e-6 for a, e in zip(got, want))
    if fused_norm.triton is not None:
        with pytest.raises(RuntimeError, match="no backward pass"):
            fused_norm.layer_norm_act_triton(x, w, b, 1e-6, True, None, torch.empty(7, 12))


# ----------------------------------------------------------------------------- backward kernels
def _grads(outs, refs, inputs, gen):
    weights = [torch.randn(r.shape, generator=gen, dtype=r.dtype, device=r.device) for r in refs]
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), inputs)
    want = torch.autograd.grad(sum((r * w).sum() for r, w in zip(refs, weights)), inputs)
    return [_rel(a, e) for a, e in zip(got, want)]


def _check_residual_ln(device, dtype, tol, rows=(1777, 2001, 1223), C=48):
    """Packed rows in 3 groups (boundaries inside the backward's row blocks), gate, z and a second
    affine LayerNorm; then an equal-groups batch without gate; then the gated residual alone."""
    gen = torch.Generator(device=device).manual_seed(0)

    def t(*shape):
        return (torch.randn(*shape, generator=gen, device=device) * 0.7 + 0.2).to(dtype).requires_grad_(True)

    N = sum(rows)
    gi = torch.repeat_interleave(torch.arange(3, device=device), torch.tensor(rows, device=device))
    x, y, z = t(1, N, C), t(1, N, C), t(1, N, C)
    gate, mul, add = t(3, C), t(3, C), t(3, C)
    w2, b2 = t(C).float().detach().requires_grad_(), t(C).float().detach().requires_grad_()
    outs = fused.residual_layer_norm_modulate(x, y, gate, mul, add, 1e-6, 1.0, gi, z=z, second=(w2, b2))
    xr = x.double() + y.double() * gate.double()[gi][None] + z.double()
    ln = F.layer_norm(xr, (C,), eps=1e-6)
    refs = (xr, ln * (1 + mul.double()[gi][None]) + add.double()[gi][None], ln * w2.double() + b2.double())
    errs = _grads(outs, refs, (x, y, z, gate, mul, add, w2, b2), gen)
    assert max(errs) <= tol, errs

    xb, yb = t(3, 1001, C), t(3, 1001, C)
    outs = fused.residual_layer_norm_modulate(xb, yb, None, mul, add, 1e-6, 1.0)
    xr = xb.double() + yb.double()
    refs = (xr, F.layer_norm(xr, (C,), eps=1e-6) * (1 + mul.double()[:, None]) + add.double()[:, None])
    errs = _grads(outs, refs, (xb, yb, mul, add), gen)
    assert max(errs) <= tol, errs
    out = fused.gated_residual(xb, yb, gate)
    errs = _grads([out], [xb.double() + yb.double() * gate.double()[:, None]], (xb, yb, gate), gen)
    assert max(errs) <= tol, errs


def _check_qk(device, dtype, tol, H=2, D=16, L=1500):
    gen = torch.Generator(device=device).manual_seed(1)
    qkv = (torch.randn(2, L, 3 * H * D, generator=gen, device=device)).to(dtype).requires_grad_(True)
    ga = (torch.randn(H, D, generator=gen, device=device)).requires_grad_(True)
    gb = (torch.randn(H, D, generator=gen, device=device)).requires_grad_(True)
    rope = rope_phases(torch.randint(0, 16, (L, 3), generator=gen, device=device), D)
    q, k, _ = qkv.reshape(2, L, 3, H, D).unbind(2)  # strided views, as the attention passes them
    eps = 1e-24 / D
    outs = fused.qk_norm_rope_pair(q, k, ga, gb, rope, eps)

    def ref(x, g):
        return apply_rope(F.rms_norm(x.double(), (D,), eps=eps) * g.double(), rope.to(torch.complex128))

    errs = _grads(outs, (ref(q, ga), ref(k, gb)), (qkv, ga, gb), gen)
    assert max(errs) <= tol, errs
    out = fused.qk_norm_rope(q, ga, None, eps)  # norm only, one tensor
    errs = _grads([out], [F.rms_norm(q.double(), (D,), eps=eps) * ga.double()], (qkv, ga), gen)
    assert max(errs) <= tol, errs


@interpreter
def test_backward_kernels_match_fp64_in_the_interpreter():
    _check_residual_ln("cpu", torch.float32, 1e-5, rows=(70, 91, 60), C=8)
    _check_qk("cpu", torch.float32, 1e-5, H=1, D=8, L=60)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_backward_kernels_match_fp64_on_cuda(dtype, tol):
    _check_residual_ln("cuda", dtype, tol)
    _check_qk("cuda", dtype, tol)


# ----------------------------------------------------------------------------- sparse conv
def _conv_case(device, dtype, Ci=32, Co=48, n=3000, res=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randperm(res ** 3, generator=gen)[:n].sort().values
    xyz = torch.stack([flat // res ** 2, (flat // res) % res, flat % res], 1)
    coords = torch.cat([torch.zeros(n, 1, dtype=torch.long), xyz], 1).int().to(device)
    feats = torch.randn(n, Ci, generator=gen).to(device, dtype).requires_grad_(True)
    w = (torch.randn(Co, 3, 3, 3, Ci, generator=gen) * 0.05).to(device, dtype).requires_grad_(True)
    b = torch.randn(Co, generator=gen).to(device, dtype).requires_grad_(True)
    return SparseTensor(feats, coords, (res, res, res)), w, b


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_sparse_conv_backward_matches_gather_path(dtype, tol):
    x, w, b = _conv_case("cuda", dtype)
    out = submanifold_conv3d(x, w, b, algo="implicit").feats
    assert out.grad_fn is not None
    x64 = x.replace(x.feats.double())
    ref = submanifold_conv3d(x64, w.double(), b.double(), algo="gather").feats
    gen = torch.Generator(device="cuda").manual_seed(3)
    errs = _grads([out], [ref], (x.feats, w, b), gen)
    assert max(errs) <= tol, errs
    with pytest.raises(RuntimeError, match="no backward pass"):
        nm = neighbour_map(x)
        cfg = conv_triton.kernel_config(32, 48, dtype)
        conv_triton.conv_implicit_gemm(x.feats, nm.tile_layout(cfg.BM), w, b, cfg)


# ----------------------------------------------------------------------------- whole flows
def _flow_grads(model, run, fused_on: bool):
    model.zero_grad(set_to_none=True)
    with fused.use_fused_kernels(fused_on):
        out = run(model)
        loss = (out.float() ** 2).mean()
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _check_flow(make, run, dtype):
    """Fused vs PyTorch path, every parameter. fp32: the two agree to 1e-4 (relative, per
    parameter). bf16: each path is compared with the fp32 model's gradients (same weights) and the
    fused path's error may be at most twice the PyTorch path's (plus 1e-2: both round to bf16)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = make(dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    loss_ref, ref = _flow_grads(model, run, False)
    loss, got = _flow_grads(model, run, True)
    missing = [n for n, g in got.items() if g is None]
    assert not missing, f"{len(missing)} of {len(got)} parameters got no gradient: {missing[:5]}"
    assert all(g is not None for g in ref.values())
    if dtype == "float32":
        assert _rel(loss, loss_ref) <= 1e-5
        errs = {n: _rel(got[n], ref[n]) for n in got}
        worst = max(errs, key=errs.get)
        assert errs[worst] <= 1e-4, (worst, errs[worst])
        return
    _, exact = _flow_grads(make("float32"), run, False)
    worse = {n: (_rel(got[n], exact[n]), _rel(ref[n], exact[n])) for n in got}
    bad = {n: e for n, e in worse.items() if e[0] > 2 * e[1] + 1e-2}
    assert not bad, list(bad.items())[:5]


def _structure_flow(dtype):
    model = SparseStructureFlowModel(**tiny_flow_args("ss", resolution=8))
    model.load_state_dict(random_state_dict(model, 0))
    return model.convert_to(dtype).cuda()


def _shape_flow(dtype):
    model = SLatFlowModel(**tiny_flow_args("shape512", cond_channels=16))
    model.load_state_dict(random_state_dict(model, 1))
    return model.convert_to(dtype).cuda()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_structure_flow_gradients_match_pytorch_path(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 8, 8, 8, 8, generator=gen, device="cuda")
    t = torch.tensor([700.0, 200.0], device="cuda")
    cond = torch.randn(2, 9, 32, generator=gen, device="cuda")
    _check_flow(_structure_flow, lambda m: m(x, t, cond), dtype)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shape_flow_gradients_match_pytorch_path_on_a_ragged_batch(dtype):
    gen = torch.Generator().manual_seed(2)
    coords = []
    for b, n in enumerate((70, 45)):
        flat = torch.randperm(32 ** 3, generator=gen)[:n].sort().values
        xyz = torch.stack([flat // 1024, (flat // 32) % 32, flat % 32], 1)
        coords.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    coords = torch.cat(coords).int().cuda()
    feats = torch.randn(115, 32, generator=gen).cuda()
    t = torch.tensor([900.0, 100.0], device="cuda")
    cond = torch.randn(2, 5, 16, generator=gen).cuda()
    _check_flow(_shape_flow, lambda m: m(SparseTensor(feats, coords, (32, 32, 32)), t, cond).feats, dtype)


def test_kernel_switch_scopes_its_setting_and_restores_it_after_an_error():
    """Each kernel family's switch (fused kernels, fused MLP, neighbour maps): ``use`` changes it inside
    the block only, also when the block raises; ``set`` changes it for the process."""
    from know3d_core.sparse.kernel_dispatch import KernelSwitch

    switch = KernelSwitch(True)
    with switch.use(False):
        assert switch.enabled is False
        with switch.use(True):
            assert switch.enabled is True
        assert switch.enabled is False
    assert switch.enabled is True
    with pytest.raises(RuntimeError):
        with switch.use(False):
            raise RuntimeError("inside the block")
    assert switch.enabled is True
    switch.set(0)
    assert switch.enabled is False
