"""ComfyUI's Qwen single files in the CLI: tiny random networks written by the test in ComfyUI's layouts
(real safetensors: bf16, plain fp8_e4m3fn, fp8mixed with ``weight_scale`` + ``comfy_quant``, older
scaled fp8 with ``scaled_fp8`` + ``scale_weight``), loaded into diffusers / transformers and compared
with the bf16 networks they were written from."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from know3d_core.mmdit.comfy_files import ComfyFileError, load_comfy_text_encoder, load_comfy_transformer
from know3d_core.plan import COMFY_INDEX_TIMESTEP_ZERO, COMFY_QWEN_TE_RENAMES

from test_mmdit_common import JOINT_DIM, tiny_text_stack, tiny_transformer
from test_mmdit_memory import _linears_in_series

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value


def _quantised(name, w):
    """ComfyUI's per-tensor scaling (QUANTIZATION.md): scale = absmax / 448, q = fp8(w / scale)."""
    scale = (w.float().abs().max() / FP8_MAX).clamp(min=1e-12)
    return (w.float() / scale).to(FP8), scale.reshape(())


def _comfy_sd(sd, fmt, prefix=""):
    """``sd`` (bf16) in ComfyUI's layout ``fmt``: bf16 | fp8_e4m3fn | fp8mixed | scaled_fp8 (2-D weights
    of the blocks / layers quantised, the rest bf16)."""
    out = {}
    for k, v in sd.items():
        quant = fmt != "bf16" and k.endswith(".weight") and v.dim() == 2 and ("blocks." in k or "layers." in k)
        if not quant:
            out[prefix + k] = v.to(torch.bfloat16)
            continue
        layer = prefix + k[:-len("weight")]
        if fmt == "fp8_e4m3fn":
            out[prefix + k] = v.to(FP8)
            continue
        q, scale = _quantised(k, v)
        out[prefix + k] = q
        if fmt == "fp8mixed":
            out[layer + "weight_scale"] = scale
            out[layer + "comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                      dtype=torch.uint8)
        else:
            out[layer + "scale_weight"] = scale
            out[layer + "scale_input"] = torch.ones(())
    if fmt == "scaled_fp8":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out


def _forward(model):
    g = torch.Generator().manual_seed(3)
    target, refs = (2, 3), (2, 2)
    hidden = torch.randn(1, 6 + 4, 64, generator=g).to(torch.bfloat16)
    embeds = torch.randn(1, 5, JOINT_DIM, generator=g).to(torch.bfloat16)
    return model(hidden_states=hidden, timestep=torch.full((1,), 0.6), encoder_hidden_states=embeds,
                 encoder_hidden_states_mask=None, img_shapes=[[(1, *target), (1, *refs)]], return_dict=False)[0].float()


@pytest.fixture(scope="module")
def reference():
    model = tiny_transformer(num_layers=3).to(torch.bfloat16)
    return model, {k: v.clone() for k, v in model.state_dict().items()}, dict(model.config)


def _write(tmp_path, sd, name="qwen_image_edit_2511_fp8mixed.safetensors", metadata=None):
    path = str(tmp_path / name)
    save_file(sd, path, metadata=metadata)
    return path


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_bf16_file_with_prefix_and_2511_marker_loads_exactly(reference, tmp_path):
    model, sd, config = reference
    comfy = _comfy_sd(sd, "bf16", "model.diffusion_model.")
    comfy["model.diffusion_model." + COMFY_INDEX_TIMESTEP_ZERO] = torch.tensor([])
    loaded = load_comfy_transformer(_write(tmp_path, comfy), config, torch.bfloat16)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    assert torch.equal(_forward(loaded), _forward(model))


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8mixed", "scaled_fp8"])
def test_fp8_files_match_the_bf16_forward_within_the_fp8_tolerance(reference, tmp_path, fmt):
    """Forward of the MMDiT loaded from an fp8 file against the bf16 model it was written from.

    Derivation: every quantised weight is within 2^-4 of itself (3 mantissa bits; ComfyUI's scale puts
    the largest at 448, so the subnormals, below 2^-6 * scale, only hold weights under 3.5e-5 of the
    largest); Linear outputs then err by at most 2^-4 relatively, independent errors through k Linears
    in series add in quadrature: sqrt(k) * 2^-4 with k = 18 to the last block + the output projection.
    Unscaled ``fp8_e4m3fn`` stores the tiny weights (|w| < 0.18) partly as subnormals: same bound, as the
    absolute error there (2^-10) is below 2^-4 of the typical weight. The error must exceed bf16's own
    rounding (2^-9): the weights really went through fp8."""
    model, sd, config = reference
    comfy = _comfy_sd(sd, fmt)
    comfy[COMFY_INDEX_TIMESTEP_ZERO] = torch.tensor([])
    loaded = load_comfy_transformer(_write(tmp_path, comfy), config, torch.bfloat16)
    rel = _rel(_forward(loaded), _forward(model))
    bound = math.sqrt(_linears_in_series(3) + 1) * 2 ** -4
    assert 2 ** -9 < rel <= bound, f"{fmt}: relative error {rel:.4f}, bound {bound:.4f}"
    q = sd["transformer_blocks.1.attn.to_q.weight"].float()
    assert (loaded.state_dict()["transformer_blocks.1.attn.to_q.weight"].float() - q).abs().max() \
        <= 2 ** -4 * q.abs().max() + 2 ** -10  # one weight: within half an fp8 step at the largest


def test_strict_keys_and_markers(reference, tmp_path):
    model, sd, config = reference
    comfy = _comfy_sd(sd, "fp8mixed")
    comfy.pop("transformer_blocks.2.img_mlp.net.2.weight")
    comfy[COMFY_INDEX_TIMESTEP_ZERO] = torch.tensor([])
    with pytest.raises(ComfyFileError, match=r"fp8mixed\.safetensors: not a Qwen-Image MMDiT.*img_mlp\.net\.2"):
        load_comfy_transformer(_write(tmp_path, comfy), config, torch.bfloat16)
    with pytest.raises(ComfyFileError, match=r"is not Qwen-Image-Edit-2511.*zero_cond_t=True"):
        load_comfy_transformer(_write(tmp_path, _comfy_sd(sd, "bf16"), "plain.safetensors"), config)
    nvfp4 = _comfy_sd(sd, "bf16")
    layers = {"transformer_blocks.0.attn.to_q": {"format": "nvfp4"}}
    with pytest.raises(ComfyFileError, match=r"to_q is quantised as 'nvfp4'"):
        load_comfy_transformer(_write(tmp_path, nvfp4, "nvfp4.safetensors",
                                      {"_quantization_metadata": json.dumps({"layers": layers})}), config)


def _comfy_te_names(sd):
    """transformers' Qwen2.5-VL keys -> the original names ComfyUI's files use (the renames reversed)."""
    back = {new: old for old, new in COMFY_QWEN_TE_RENAMES if old != new}
    out = {}
    for k, v in sd.items():
        new = next(k.replace(n, o, 1) for n, o in list(back.items()) + [(k, k)] if k.startswith(n))
        out[new] = v
    return out


def _last_hidden(te):
    ids = torch.tensor([[5, 9, 13, 20, 7, 3]])
    return te(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[-1].float()


def test_scaled_fp8_text_encoder_without_lm_head(tmp_path):
    """ComfyUI's ``qwen_2.5_vl_7b_fp8_scaled`` layout (original key names, ``scaled_fp8`` + ``scale_weight``,
    no LM head) -> transformers' model; last hidden state within sqrt(k) * 2^-4 of bf16, k = 2 Linears in
    series per attention + MLP of each of the 2 layers (q/k/v, o, gate/up, down): k = 8."""
    te, _ = tiny_text_stack()
    te = te.to(torch.bfloat16)
    folder = tmp_path / "text_encoder"
    te.config.save_pretrained(folder)
    sd = {k: v for k, v in te.state_dict().items() if k != "lm_head.weight"}
    comfy = _comfy_sd(_comfy_te_names(sd), "scaled_fp8")
    assert "model.layers.0.self_attn.q_proj.scale_weight" in comfy and "visual.blocks.0.attn.qkv.weight" in comfy
    loaded = load_comfy_text_encoder(_write(tmp_path, comfy, "qwen_2.5_vl_7b_fp8_scaled.safetensors"), str(folder),
                                     torch.bfloat16)
    emb = loaded.state_dict()["model.language_model.embed_tokens.weight"]
    assert torch.equal(emb, sd["model.language_model.embed_tokens.weight"])
    assert torch.equal(loaded.state_dict()["lm_head.weight"], emb)  # tied: logits are never read
    rel = _rel(_last_hidden(loaded), _last_hidden(te))
    assert 2 ** -9 < rel <= math.sqrt(8) * 2 ** -4, rel


def test_comfy_file_loads_fp8_as_read(reference, tmp_path):
    """``storage=fp8``: each dequantised weight is cast to fp8 as it is read; same weights as loading in
    bf16 and storing fp8 after (``mmdit.memory.store_weights``)."""
    from know3d_core.mmdit.memory import store_weights

    model, sd, config = reference
    comfy = _comfy_sd(sd, "fp8mixed", "model.diffusion_model.")
    comfy["model.diffusion_model." + COMFY_INDEX_TIMESTEP_ZERO] = torch.tensor([])
    path = _write(tmp_path, comfy)
    after = load_comfy_transformer(path, config, torch.bfloat16)
    store_weights(after, "float8_e4m3fn", torch.bfloat16)
    read = load_comfy_transformer(path, config, torch.bfloat16, storage="float8_e4m3fn")
    assert read.transformer_blocks[1].img_mlp.net[2].weight.dtype == FP8
    assert all(v.dtype == after.state_dict()[k].dtype and torch.equal(v.float(), after.state_dict()[k].float())
               for k, v in read.state_dict().items())
    assert torch.equal(_forward(read), _forward(after))


_COMFY_KEYS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.ops
from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
from comfy.text_encoders.llama import Qwen25_7BVLI
ops = comfy.ops.disable_weight_init
nets = {"mmdit": QwenImageTransformer2DModel(device="meta", dtype=torch.bfloat16, operations=ops),
        "te": Qwen25_7BVLI({}, dtype=torch.bfloat16, device="meta", operations=ops)}
print(json.dumps({n: {k: list(v.shape) for k, v in m.state_dict().items()} for n, m in nets.items()}))
"""


def test_rules_match_comfyui_host_classes_at_full_size():
    """ComfyUI's own Qwen-Image MMDiT and Qwen2.5-VL-7B text encoder (its classes at their default, full
    size, built on the meta device in ComfyUI's venv): every MMDiT key and shape is diffusers', and every
    text-encoder key renamed by ``plan.COMFY_QWEN_TE_RENAMES`` is transformers' with its shape; ComfyUI's
    encoder has no LM head, the one transformers key left (tied on load)."""
    import subprocess

    from _comfy_server import COMFYUI_DIR, COMFYUI_PYTHON, _skip_reason

    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from know3d_core.plan import comfy_qwen_te_key

    proc = subprocess.run([COMFYUI_PYTHON, "-c", _COMFY_KEYS, COMFYUI_DIR], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    comfy = json.loads(proc.stdout.strip().splitlines()[-1])
    # Qwen/Qwen-Image-Edit-2511 transformer/ and text_encoder/ config.json
    te_config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064,
                         rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31]), tie_word_embeddings=False)
    with torch.device("meta"):
        ours = {"mmdit": QwenImageTransformer2DModel(zero_cond_t=True).state_dict(),
                "te": Qwen2_5_VLForConditionalGeneration(te_config).state_dict()}
    assert {k: list(v.shape) for k, v in ours["mmdit"].items()} == comfy["mmdit"]
    renamed = {comfy_qwen_te_key(k): v for k, v in comfy["te"].items()}
    te = {k: list(v.shape) for k, v in ours["te"].items()}
    assert set(te) - set(renamed) == {"lm_head.weight"}
    assert renamed == {k: v for k, v in te.items() if k != "lm_head.weight"}
