"""Backbone LoRA on the TRELLIS.2 flow models: merged == unmerged, fp32 merge of bf16 weights, errors."""
import pytest
import torch

from _knowledge_helpers import knowledge_tensor, sparse_input, ss_inputs, tiny_slat, tiny_ss, with_branch
from know3d_core.knowledge import (
    DEFAULT_LORA_TARGETS, LoRAError, attach_lora, detach_lora, init_lora, lora_state_dict, merge_attached_lora,
    merge_lora,
)
from know3d_core.knowledge.lora import lora_factors_from_state_dict, lora_target_names
from know3d_core.sparse import SparseLinear


def _random_factors(model, rank=4, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for name in lora_target_names(model):
        o, i = mods[name].weight.shape
        out[name] = (torch.randn(rank, i, generator=g) / i ** 0.5, std * torch.randn(o, rank, generator=g) / rank ** 0.5)
    return out


def test_default_targets_are_attention_and_mlp_of_every_block():
    model = tiny_ss()
    names = lora_target_names(model)
    assert len(names) == len(DEFAULT_LORA_TARGETS) * len(model.blocks)
    assert "blocks.0.self_attn.to_qkv" in names and "blocks.1.mlp.mlp.2" in names
    assert not any(n.startswith(("input_layer", "out_layer", "t_embedder", "adaLN")) for n in names)
    with_branch(model)
    assert not any("knowledge_attn" in n for n in lora_target_names(model))


@pytest.mark.parametrize("stage", ["ss", "shape"])
def test_merged_equals_unmerged_fp32(stage):
    make = tiny_ss if stage == "ss" else tiny_slat
    unmerged, merged, plain = make(), make(), make()
    for m in (unmerged, merged):
        with_branch(m, seed=2)
    with_branch(plain, seed=2)
    factors = _random_factors(unmerged)
    attach_lora(unmerged, factors, alpha=8.0)
    merge_lora(merged, factors, alpha=8.0)
    if stage == "ss":
        x, t, cond = ss_inputs(batch=2)
        run = lambda m: m(x, t, cond, knowledge=knowledge_tensor())  # noqa: E731
    else:
        x = sparse_input([21, 30])
        t, cond = torch.full((2,), 400.0), torch.randn(2, 5, 32)
        run = lambda m: m(x, t, cond, knowledge=knowledge_tensor()).feats  # noqa: E731
    with torch.no_grad():
        a, b, p = run(unmerged), run(merged), run(plain)
    assert (a - b).abs().max() <= 1e-5
    assert (a - p).abs().max() > 1e-2  # the LoRA does something


def test_attached_lora_shows_in_state_dict_under_file_names_and_merges_in_place():
    model = tiny_ss()
    ref = tiny_ss()
    factors = _random_factors(model, seed=1)
    attach_lora(model, factors, alpha=2.0)
    sd = model.state_dict()
    assert "blocks.0.self_attn.to_qkv.lora_A.weight" in sd and "blocks.1.mlp.mlp.0.lora_B.weight" in sd
    saved, alpha = lora_state_dict(model)
    assert alpha == 2.0 and set(lora_factors_from_state_dict(saved)) == set(factors)
    x, t, cond = ss_inputs()
    with torch.no_grad():
        before = model(x, t, cond)
        assert merge_attached_lora(model) == len(factors)
        after = model(x, t, cond)
    assert not any("lora_" in k for k in model.state_dict())
    assert (before - after).abs().max() <= 1e-5
    merge_lora(ref, factors, alpha=2.0)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_detach_restores_plain_weights_exactly():
    model, plain = tiny_ss(), tiny_ss()
    attach_lora(model, _random_factors(model), alpha=4.0)
    x, t, cond = ss_inputs()
    with torch.no_grad():
        assert not torch.equal(model(x, t, cond), plain(x, t, cond))
        detach_lora(model)
        assert torch.equal(model(x, t, cond), plain(x, t, cond))


def test_init_lora_starts_as_identity_and_is_trainable():
    model, plain = tiny_ss(), tiny_ss()
    names = init_lora(model, rank=4)
    x, t, cond = ss_inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), plain(x, t, cond))
    trainable = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(trainable) == 2 * len(names)


def test_merge_into_bf16_weights_rounds_once():
    """Merge in fp32 then cast: within half a bf16 ulp of the fp64 truth, and never worse than the
    naive bf16 sum ``W + cast(s B A)`` (two roundings)."""
    model = tiny_ss("bfloat16")
    name = "blocks.0.mlp.mlp.0"
    w0 = dict(model.named_modules())[name].weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, w0.shape[1], generator=g) / w0.shape[1] ** 0.5
    b = 0.02 * torch.randn(w0.shape[0], 8, generator=g)
    merge_lora(model, {name: (a, b)}, alpha=8.0)
    got = dict(model.named_modules())[name].weight.detach()
    assert got.dtype == torch.bfloat16
    truth = w0.double() + b.double() @ a.double()
    naive = w0 + (b @ a).to(torch.bfloat16)
    err_got = (got.double() - truth).abs()
    err_naive = (naive.double() - truth).abs()
    # round-to-nearest in bf16: error <= half the spacing <= eps/2 * |x| (plus fp32 noise of the sum)
    bound = 0.5 * torch.finfo(torch.bfloat16).eps * truth.abs() * 1.001 + 1e-6
    assert (err_got <= bound).all()
    assert err_got.mean() < err_naive.mean()


def test_lora_hook_on_sparse_linear():
    layer = SparseLinear(6, 5)
    x = sparse_input([4, 3], channels=6)
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    ref = x.feats @ (layer.weight + 1.5 * b @ a).T + layer.bias
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Module()])
    model.blocks[0].proj = layer
    attach_lora(model, {"blocks.0.proj": (a, b)}, alpha=3.0)
    out = layer(x)
    assert type(out).__name__ == "SparseTensor" and out.coords is x.coords
    torch.testing.assert_close(out.feats, ref, rtol=1e-5, atol=1e-5)


def test_lora_errors_name_the_layer_and_the_shapes():
    model = tiny_ss()
    factors = _random_factors(model)
    with pytest.raises(LoRAError, match="blocks.9.self_attn.to_qkv.*no such layer"):
        merge_lora(model, {"blocks.9.self_attn.to_qkv": factors["blocks.0.self_attn.to_qkv"]}, 1.0, source="f.safetensors")
    a, b = factors["blocks.0.self_attn.to_qkv"]
    with pytest.raises(LoRAError, match=r"f.safetensors.*A \(4, 63\)"):
        merge_lora(model, {"blocks.0.self_attn.to_qkv": (a[:, :63], b)}, 1.0, source="f.safetensors")
    mixed = {"blocks.0.self_attn.to_qkv": (a, b), "blocks.0.mlp.mlp.0": (factors["blocks.0.mlp.mlp.0"][0][:2],
                                                                         factors["blocks.0.mlp.mlp.0"][1][:, :2])}
    with pytest.raises(LoRAError, match="different ranks"):
        merge_lora(model, mixed, 1.0)
    with pytest.raises(LoRAError, match="not a linear layer"):
        merge_lora(model, {"blocks.0.norm2": (a, b)}, 1.0)
    with pytest.raises(LoRAError, match="only one of"):
        lora_factors_from_state_dict({"blocks.0.x.lora_A.weight": a})
    attach_lora(model, {"blocks.0.self_attn.to_qkv": (a, b)}, 1.0)
    with pytest.raises(LoRAError, match="already attached"):
        attach_lora(model, {"blocks.0.self_attn.to_qkv": (a, b)}, 1.0)


def test_a_failed_merge_changes_nothing():
    model, plain = tiny_ss(), tiny_ss()
    factors = _random_factors(model)
    factors["blocks.1.mlp.mlp.2"] = (factors["blocks.1.mlp.mlp.2"][0][:, :5], factors["blocks.1.mlp.mlp.2"][1])
    with pytest.raises(LoRAError):
        merge_lora(model, factors, 1.0)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
