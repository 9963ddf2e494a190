"""Small cards: the memory-plan table (card size -> plan) and the Qwen networks under fp8 storage
(diffusers' layer-wise casting) and block offloading (diffusers' group offloading), on the CPU."""
import math

import pytest
import torch

from know3d_core.mmdit import CaptureSpec
from know3d_core.mmdit.backview import QwenEditBackView
from know3d_core.mmdit.loading import QwenEditComponents
from know3d_core.mmdit.memory import apply_memory_plan
from know3d_core.mmdit.schedule import QWEN_IMAGE_SCHEDULER_CONFIG
from know3d_core.plan import (FP8_STORAGE, GIB, MEMORY_PLANS, QWEN_MMDIT_BLOCKS, QWEN_MMDIT_PARAMS,
                              VRAM_HEADROOM_GIB, vram_plan)

from test_mmdit_common import random_image, tiny_text_stack, tiny_transformer, tiny_vae


# ------------------------------------------------------------------------------- plan table
@pytest.mark.parametrize("gib, name, pinned", [
    (141, "resident", "resident"), (80, "resident", "resident"),  # bf16 MMDiT 38 + TE 15.4 + TRELLIS.2 7.5 GiB
    (48, "offload", "offload"),                # one bf16 network at a time: the MMDiT's 38 GiB
    (40, "fp8_blocks", "fp8"), (24, "fp8_blocks", "fp8"),  # fp8 MMDiT whole (19 GiB): with pinned copies only
    (16, "fp8_blocks", "fp8_blocks"), (12, "fp8_blocks", "fp8_blocks"),  # the fp8 TE (7.7 GiB) visits whole
    (8, "fp8_blocks_all", "fp8_blocks_all"),   # TRELLIS.2's offloaded peak (3.2 GiB) is the largest
])
def test_card_size_picks_the_fastest_plan_that_fits(gib, name, pinned):
    """The fastest plan that fits; ``fp8`` (the whole fp8 MMDiT visits) only with pinned host copies: from
    pageable memory it was slower than block streaming on the H100 (37.0 against 20.2 s, 24 GiB)."""
    order = list(MEMORY_PLANS)
    for pin_host, want in ((False, name), (True, pinned)):
        plan = vram_plan(gib, pin_host=pin_host)
        assert plan.name == want and plan.needs_gib() <= gib
        earlier = [MEMORY_PLANS[n] for n in order[:order.index(want)]]
        assert all(p.needs_gib() > gib or (p.pinned_only and not pin_host) for p in earlier)
    assert [p.name for p in MEMORY_PLANS.values() if p.pinned_only] == ["fp8"]
    assert [p.name for p in MEMORY_PLANS.values() if p.pins_by_default] == ["fp8_blocks", "fp8_blocks_all"]


def test_card_below_the_smallest_plan_is_refused():
    with pytest.raises(ValueError, match=r"6 GiB is below the smallest plan \(fp8_blocks_all"):
        vram_plan(6)


def test_plan_estimates_follow_the_parameter_counts():
    fp8 = MEMORY_PLANS["fp8"]
    assert fp8.weight_peak_bytes() == QWEN_MMDIT_PARAMS            # 1 byte per fp8 weight
    assert MEMORY_PLANS["offload"].weight_peak_bytes() == 2 * QWEN_MMDIT_PARAMS
    assert fp8.needs_gib() == pytest.approx(QWEN_MMDIT_PARAMS / GIB + VRAM_HEADROOM_GIB)
    for plan in MEMORY_PLANS.values():  # either all resident, or nothing of the Qwen side is
        resident = [plan.mmdit_placement == "resident", plan.text_encoder_placement == "resident"]
        assert all(resident) != plan.geometry_offload and (all(resident) or not any(resident))
        assert plan.as_record()["name"] == plan.name and plan.name in plan.describe()


def test_mmdit_parameter_count_matches_the_real_config():
    """The estimate's 20.4B counts the block weight matrices of the real Qwen-Image config (24 heads x 128,
    text width 3584), one block built on the meta device (nothing allocated) times 60 blocks. Biases,
    norms and the text/image input projections (3584 x 3072 + ...) add 0.23%: within 0.5%."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        m = QwenImageTransformer2DModel(num_layers=1, attention_head_dim=128, num_attention_heads=24,
                                        joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
    block = [p for n, p in m.named_parameters() if n.startswith("transformer_blocks.0.")]
    matrices = sum(p.numel() for p in block if p.dim() == 2)
    assert QWEN_MMDIT_BLOCKS * matrices == QWEN_MMDIT_PARAMS
    outside = sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in block)
    total = QWEN_MMDIT_BLOCKS * sum(p.numel() for p in block) + outside
    assert total == pytest.approx(QWEN_MMDIT_PARAMS, rel=5e-3)


def test_pipeline_applies_the_plan_instead_of_offload():
    from types import SimpleNamespace

    from know3d_core.pipeline import Know3DPipeline

    bv = _backview()
    pipe = Know3DPipeline(SimpleNamespace(device=torch.device("cpu")), bv, offload=False,
                          memory_plan=MEMORY_PLANS["fp8_blocks"])
    assert pipe.offload and bv.offload and pipe.memory_plan.name == "fp8_blocks"
    assert pipe.placement == {"transformer": "fp8, block_level", "text_encoder": "fp8, model"}
    assert len(bv.hooked) == 1 and bv.hooked[0] is bv.c.transformer


# ------------------------------------------------------------------------------- fp8 under a plan
def _backview(text_stack=True):
    te, proc = tiny_text_stack() if text_stack else (None, None)
    c = QwenEditComponents(transformer=tiny_transformer(num_layers=3).to(torch.bfloat16),
                           vae=tiny_vae().to(torch.bfloat16), text_encoder=te.to(torch.bfloat16),
                           processor=proc, scheduler_config=dict(QWEN_IMAGE_SCHEDULER_CONFIG), model_name="tiny")
    bv = QwenEditBackView(c)
    bv.vae_image_area = 64 * 64
    return bv


def _hidden(bv):
    res = bv([random_image(80, 64, seed=4)], "two straps", steps=4, height=64, width=64,
             generator=torch.Generator().manual_seed(1), capture=CaptureSpec(sigma=0.5, layers=(0, 2)),
             early_exit=True, decode=False)
    return res.knowledge.hidden.float()


def _linears_in_series(n_blocks: int) -> int:
    """Linear layers one captured value passes through, in series (the depth errors accumulate over):
    timestep MLP (2) + the input projection (1), then per block the modulation (1), q/k/v (1), the
    output projection (1) and the MLP (2)."""
    return 3 + 5 * n_blocks


@pytest.fixture(scope="module")
def bf16_and_fp8():
    ref = _backview()
    ref.place("cpu")
    ref_hidden = _hidden(ref)
    bv = _backview()
    how = apply_memory_plan(bv, MEMORY_PLANS["fp8_blocks_all"], "cpu", torch.bfloat16)
    return ref_hidden, bv, how, _hidden(bv)


def test_plan_stores_fp8_and_hooks_the_blocks(bf16_and_fp8):
    _, bv, how, _ = bf16_and_fp8
    assert how == {"transformer": "fp8, block_level", "text_encoder": "fp8, leaf_level"}
    fp8 = getattr(torch, FP8_STORAGE)
    for net, blocks in ((bv.c.transformer, "transformer_blocks."), (bv.c.text_encoder, ".layers.")):
        linear = [m.weight.dtype for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and blocks in n]
        assert linear and set(linear) == {fp8}   # the blocks' weights stay fp8 between forwards
        assert all(p.device.type == "cpu" for p in net.parameters())
    assert bv.dtype == torch.bfloat16 and len(bv.hooked) == 2


def test_fp8_hidden_states_within_the_derived_tolerance(bf16_and_fp8):
    """Relative error of the captured hidden states, fp8 storage against bf16 storage (same bf16 compute).

    Derivation: e4m3 keeps 3 mantissa bits, so round-to-nearest changes a weight by at most 2^-4 of
    itself (below 2^-6, the subnormals, by at most 2^-10 absolutely: smaller than 2^-4 of the typical
    tiny weight, ~0.1). A Linear output is a sum of such perturbed products, so its relative error is at
    most 2^-4 (errors of one sign); through k Linears in series the independent errors add in quadrature:
    sqrt(k) * 2^-4. The deepest captured layer (block 2) sits behind k = 3 + 5 * 3 = 18 Linears: the bound
    is sqrt(18) / 16 = 0.265. The error must also exceed bf16's own rounding (2^-9): fp8 did happen."""
    ref, _, _, fp8 = bf16_and_fp8
    assert fp8.shape == ref.shape
    rel = ((fp8 - ref).norm() / ref.norm()).item()
    bound = math.sqrt(_linears_in_series(3)) * 2 ** -4
    assert 2 ** -9 < rel <= bound, f"relative error {rel:.4f}, bound {bound:.4f}"
    print(f"fp8 vs bf16 hidden states: relative error {rel:.4f} (bound {bound:.3f})")


def test_model_placement_plan_matches_its_fp8_numbers(bf16_and_fp8):
    """``fp8`` (whole networks visit) and ``fp8_blocks_all`` (hooks) store the same fp8 weights: the hidden
    states agree exactly on the CPU (the hooks move nothing there)."""
    _, _, _, hooked = bf16_and_fp8
    bv = _backview()
    how = apply_memory_plan(bv, MEMORY_PLANS["fp8"], "cpu", torch.bfloat16)
    assert how == {"transformer": "fp8, model", "text_encoder": "fp8, model"}
    assert torch.equal(_hidden(bv), hooked)


# ------------------------------------------------------------------------------- fp8 as the weights are read
def test_folder_loads_fp8_as_read_identical_to_storing_after(tmp_path):
    """``load_transformer(storage=fp8)`` (hooks first, each tensor cast as it is read: the host never holds
    the bf16 network) gives the same weights and forward as loading bf16 and storing fp8 after; a later
    ``store_weights`` (the plan) leaves it alone; a LoRA merges into the fp8 weights."""
    from know3d_core.mmdit.loading import load_transformer
    from know3d_core.mmdit.memory import store_weights

    tiny_transformer(num_layers=3).to(torch.bfloat16).save_pretrained(tmp_path / "transformer")
    after = load_transformer(str(tmp_path), torch.bfloat16)
    store_weights(after, FP8_STORAGE, torch.bfloat16)
    read = load_transformer(str(tmp_path), torch.bfloat16, storage=FP8_STORAGE)
    fp8 = getattr(torch, FP8_STORAGE)
    assert read.transformer_blocks[0].attn.to_q.weight.dtype == fp8
    assert {k: v.dtype for k, v in read.state_dict().items()} == {k: v.dtype for k, v in after.state_dict().items()}
    assert all(torch.equal(v.float(), after.state_dict()[k].float()) for k, v in read.state_dict().items())
    store_weights(read, FP8_STORAGE, torch.bfloat16)  # already stored: no second set of hooks
    g = torch.Generator().manual_seed(3)
    hidden, embeds = torch.randn(1, 10, 64, generator=g).bfloat16(), torch.randn(1, 5, 16, generator=g).bfloat16()

    def forward(m):
        return m(hidden_states=hidden, timestep=torch.full((1,), 0.6), encoder_hidden_states=embeds,
                 encoder_hidden_states_mask=None, img_shapes=[[(1, 2, 3), (1, 2, 2)]], return_dict=False)[0]
    assert torch.equal(forward(read), forward(after))
    from know3d_core.mmdit.lora import merge_lora
    from safetensors.torch import save_file

    lora = str(tmp_path / "lora.safetensors")
    save_file({"diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 32, generator=g),
               "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 2, generator=g)}, lora)
    before = read.transformer_blocks[0].attn.to_q.weight.float().clone()
    merge_lora(read, lora, 1.0)
    w = read.transformer_blocks[0].attn.to_q.weight
    assert w.dtype == fp8 and not torch.equal(w.float(), before)
