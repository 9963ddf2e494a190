"""LoRA key families merged into the tiny MMDiT equal a hand-merged weight; wrong LoRAs fail."""
import json

import pytest
import torch
from safetensors.torch import save_file

from know3d_core.mmdit import LoraError, merge_lora

from test_mmdit_common import tiny_transformer

RANK = 4


def _pair(module, seed):
    w = dict(module.named_parameters())["weight"]
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(RANK, w.shape[1], generator=g) * 0.1
    up = torch.randn(w.shape[0], RANK, generator=g) * 0.1
    return down, up


def _expected(model, modules, pairs, scales, strength):
    named = dict(model.named_modules())
    return {m: named[m].weight.detach().double() + strength * scales[m] * (up.double() @ down.double())
            for m, (down, up) in zip(modules, pairs)}


CASES = {
    # family: (key builder, alpha source)
    "diffusers": (lambda m: f"transformer.{m}", ".lora_A.weight", ".lora_B.weight", "metadata"),
    "bare": (lambda m: m, ".lora_A.default.weight", ".lora_B.default.weight", None),
    "comfyui": (lambda m: f"diffusion_model.{m}", ".lora_A.weight", ".lora_B.weight", "tensor"),
    "kohya": (lambda m: "lora_unet_" + m.replace(".", "_"), ".lora_down.weight", ".lora_up.weight", "tensor"),
}
MODULES = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_out.0",
           "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.1.img_mlp.net.0.proj"]


@pytest.mark.parametrize("family", list(CASES))
def test_each_family_merges_to_hand_merged_weight(tmp_path, family):
    model = tiny_transformer(num_layers=2)
    name, a_suf, b_suf, alpha_src = CASES[family]
    pairs = [_pair(dict(model.named_modules())[m], i) for i, m in enumerate(MODULES)]
    sd, metadata, scales = {}, None, {}
    for i, (m, (down, up)) in enumerate(zip(MODULES, pairs)):
        sd[name(m) + a_suf], sd[name(m) + b_suf] = down, up
        if alpha_src == "tensor":
            alpha = float(2 + i)
            sd[name(m) + ".alpha"] = torch.tensor(alpha)
            scales[m] = alpha / RANK
        elif alpha_src == "metadata":
            scales[m] = 16 / RANK if m.endswith("to_out.0") else 8 / RANK
        else:
            scales[m] = 1.0
    if alpha_src == "metadata":   # what diffusers' save_lora_weights writes for the transformer
        metadata = {"lora_adapter_metadata": json.dumps(
            {"transformer.r": RANK, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"to_out.0": 16}})}
    path = str(tmp_path / f"{family}.safetensors")
    save_file(sd, path, metadata=metadata)
    expected = _expected(model, MODULES, pairs, scales, 0.7)
    original = {m: dict(model.named_modules())[m].weight.detach().double().clone() for m in MODULES}
    untouched = model.transformer_blocks[1].attn.to_q.weight.detach().clone()
    report = merge_lora(model, path, strength=0.7)
    assert report.family == family and sorted(report.modules) == sorted(MODULES)
    named = dict(model.named_modules())
    for m in MODULES:
        assert torch.allclose(named[m].weight.double(), expected[m], atol=1e-6, rtol=0)
        assert (named[m].weight.double() - original[m]).abs().max() > 1e-3   # the merge did change it
    assert torch.equal(model.transformer_blocks[1].attn.to_q.weight, untouched)


def _save(tmp_path, sd, name="lora.safetensors"):
    path = str(tmp_path / name)
    save_file(sd, path)
    return path


def test_lora_for_another_architecture_fails_naming_file(tmp_path):
    model = tiny_transformer(num_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flux = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, 32),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, RANK)}
    path = _save(tmp_path, flux, "flux_lora.safetensors")
    with pytest.raises(LoraError, match=r"flux_lora\.safetensors.*1 of 1 LoRA modules.*0 matched"):
        merge_lora(model, path)
    # partly matching: nothing is merged
    down, up = _pair(model.transformer_blocks[0].attn.to_q, 0)
    mixed = {**flux, "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": down,
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": up}
    with pytest.raises(LoraError, match=r"1 of 2 LoRA modules.*1 matched"):
        merge_lora(model, _save(tmp_path, mixed, "mixed.safetensors"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_wrong_shapes_and_unknown_keys_fail(tmp_path):
    model = tiny_transformer(num_layers=2)
    big = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, 3072),
           "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, RANK)}
    with pytest.raises(LoraError, match=r"big\.safetensors.*does not fit"):
        merge_lora(model, _save(tmp_path, big, "big.safetensors"))
    lokr = {"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": torch.zeros(2, 2)}
    with pytest.raises(LoraError, match="not supported"):
        merge_lora(model, _save(tmp_path, lokr, "lokr.safetensors"))
    half = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, 32)}
    with pytest.raises(LoraError, match="lacks its up"):
        merge_lora(model, _save(tmp_path, half, "half.safetensors"))
    with pytest.raises(LoraError, match="not found"):
        merge_lora(model, str(tmp_path / "missing.safetensors"))
