"""Gradients of the trained paths against the plain path (tiny flows, CPU, fp32).

- LoRA: with ``B = 0`` the LoRA model computes the plain model's loss exactly, and since
  ``y = x (W + s B A)^T``, ``dL/dB = s (dL/dW) A^T`` and ``dL/dA = s B^T (dL/dW) = 0``: checked
  against the plain model's weight gradient.
- Know3D branch: its zero-initialised output layer adds exactly nothing (same loss as plain); its
  gradients match central finite differences of the loss along a random direction (fp32, 1%).
- A micro-batch without knowledge gives the branch zero (not missing) gradients.
"""
import copy

import pytest
import torch

from know3d_core.knowledge import init_lora, install_branch
from know3d_core.trellis2.tiny import random_state_dict, tiny_flow_args
from know3d_core.trellis2.loading import get_model_class
from know3d_core.train.flows import FlowLoss


def _flow(seed=0):
    args = tiny_flow_args("ss", model_channels=32, num_blocks=2, num_heads=2, cond_channels=16, resolution=4)
    model = get_model_class("SparseStructureFlowModel")(**{**args, "dtype": "float32"})
    model.load_state_dict(random_state_dict(model, seed))
    return model.train()


def _inputs(seed=1, knowledge_dim=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 4, 4, 4, generator=g)
    out = {"x_t": x, "t": torch.tensor([0.3, 0.8]), "cond": torch.randn(2, 5, 16, generator=g),
           "target": torch.randn(2, 8, 4, 4, 4, generator=g)}
    if knowledge_dim:
        out["knowledge"] = torch.randn(2, 6, knowledge_dim, generator=g)
    return out


def test_lora_gradients_follow_the_plain_weight_gradient():
    plain = _flow()
    lora = copy.deepcopy(plain)
    init_lora(lora, rank=3, alpha=6.0, generator=torch.Generator().manual_seed(5))  # scale 2
    inputs = _inputs()
    loss_plain = FlowLoss(plain)(**inputs)
    loss_lora = FlowLoss(lora)(**inputs)
    assert torch.equal(loss_plain, loss_lora)  # B = 0: the hook adds an exact zero
    loss_plain.backward()
    loss_lora.backward()
    checked = 0
    for name, module in lora.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        grad_w = dict(plain.named_modules())[name].weight.grad
        a = module.lora_A.weight
        expect_b = module.lora_scale * grad_w @ a.detach().T
        torch.testing.assert_close(module.lora_B.weight.grad, expect_b, rtol=1e-4, atol=1e-7)
        assert torch.count_nonzero(module.lora_A.weight.grad) == 0
        checked += 1
    assert checked == 14  # 7 layers x 2 blocks


def _branch_model():
    model = _flow()
    install_branch(model, 12, kind="mmdit_hidden", mmdit_layers=[1, 2], sigma=0.25)
    return model


def test_zero_initialised_branch_adds_nothing():
    plain, branch = _flow(), _branch_model()
    inputs = _inputs(knowledge_dim=12)
    with torch.no_grad():
        a = FlowLoss(plain)(**{k: v for k, v in inputs.items() if k != "knowledge"})
        b = FlowLoss(branch)(**inputs)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["knowledge_proj.linear.weight", "blocks.1.knowledge_attn.to_q.weight",
                                  "blocks.0.knowledge_attn.to_out.weight"])
def test_branch_gradients_match_finite_differences(name):
    model = _branch_model()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking branch: non-zero output layers
        for n, p in model.named_parameters():
            if "knowledge_attn.to_out" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    inputs = _inputs(knowledge_dim=12)
    param = dict(model.named_parameters())[name]
    loss = FlowLoss(model)(**inputs)
    (grad,) = torch.autograd.grad(loss, param)
    direction = torch.randn(param.shape, generator=g)
    eps = 3e-3  # fp32 (the norms compute in fp32): central differences, O(eps^2) truncation
    with torch.no_grad():
        param += eps * direction
    up = FlowLoss(model)(**inputs).detach()  # with grad on: no knowledge-context reuse between calls
    with torch.no_grad():
        param -= 2 * eps * direction
    down = FlowLoss(model)(**inputs).detach()
    numeric = (up - down) / (2 * eps)
    analytic = (grad * direction).sum()
    assert abs(float(analytic)) > 1e-4
    torch.testing.assert_close(analytic, numeric, rtol=1e-2, atol=1e-5)


def test_micro_batch_without_knowledge_gives_the_branch_zero_gradients():
    model = _branch_model()
    init_lora(model, rank=2)
    inputs = _inputs()
    FlowLoss(model)(**inputs).backward()
    branch = {n: p for n, p in model.named_parameters() if "knowledge_" in n}
    assert branch and all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in branch.values())
    assert any(torch.count_nonzero(p.grad) for n, p in model.named_parameters() if "lora_B" in n)
