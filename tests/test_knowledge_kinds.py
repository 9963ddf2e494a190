"""Knowledge kinds: shapes, provenance, constructors, and the adapter from the mmdit capture."""
import pytest
import torch

from know3d_core.knowledge import (
    INJECTED_KINDS, KINDS, Knowledge, KnowledgeMismatchError, check_knowledge, dino_image_knowledge,
    from_mmdit_capture, mmdit_hidden_knowledge, multi_view_knowledge, pack_latent, vae_latent_knowledge,
)
from know3d_core.knowledge.kinds import SIGMA_TOLERANCE


def test_mmdit_hidden_concatenates_layers_on_channels_in_order():
    states = [torch.full((2, 6, 5), float(i)) for i in range(3)]
    k = mmdit_hidden_knowledge(states, layers=[20, 30, 40], sigma=0.25, resolution=(48, 32))
    assert k.kind == "mmdit_hidden" and k.tensor.shape == (2, 6, 15) and k.dim == 15 and k.num_tokens == 6
    assert torch.equal(k.tensor[..., 5:10], states[1])
    assert k.provenance == {"layers": [20, 30, 40], "sigma": 0.25, "resolution": [48, 32],
                            "model": "Qwen-Image-Edit-2511"}
    with pytest.raises(ValueError, match="2 hidden-state tensors for 3 layers"):
        mmdit_hidden_knowledge(states[:2], [1, 2, 3], 0.25, (16, 16))
    with pytest.raises(ValueError, match="not a multiple of its 2 layers"):
        mmdit_hidden_knowledge(torch.zeros(1, 4, 15), [1, 2], 0.25, (16, 16))


def test_pack_latent_matches_the_mmdit_packing_and_inverts():
    from know3d_core.mmdit.packing import pack_latents, unpack_latents

    z = torch.randn(2, 16, 1, 6, 4)
    packed = pack_latent(z)
    assert packed.shape == (2, 6, 64)  # (6/2)*(4/2) tokens of 16 channels x 2x2 patch
    assert torch.equal(packed, pack_latents(z))
    assert torch.equal(unpack_latents(packed, 6, 4), z)
    # token (row 1, col 0) holds channel c's 2x2 patch at latent rows 2-3, cols 0-1, order (c, dy, dx)
    assert torch.equal(packed[0, 2, 4:8], z[0, 1, 0, 2:4, 0:2].reshape(-1))
    with pytest.raises(ValueError, match="not divisible"):
        pack_latent(torch.zeros(1, 16, 5, 4))


def test_vae_latent_and_dino_and_multi_view_constructors():
    v = vae_latent_knowledge(torch.randn(1, 16, 8, 8), resolution=(64, 64))
    assert v.tensor.shape == (1, 16, 64) and v.provenance["patch_size"] == 2  # (8/2)^2 tokens, 16*2*2 ch
    d = dino_image_knowledge(torch.randn(1, 1029, 1024), resolution=512)
    assert d.dim == 1024 and d.provenance["resolution"] == 512
    mv = multi_view_knowledge(torch.rand(1, 40, 30, 3))
    assert not mv.injected and mv.provenance["resolution"] == [40, 30]
    with pytest.raises(ValueError, match="no dim"):
        mv.dim
    assert multi_view_knowledge(torch.rand(1, 8, 8, 3), mode="concat").provenance["mode"] == "concat"
    with pytest.raises(ValueError, match="multi_view mode 'mix'"):
        multi_view_knowledge(torch.rand(1, 8, 8, 3), mode="mix")
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\|4\]"):
        multi_view_knowledge(torch.rand(1, 3, 40, 30))
    assert set(INJECTED_KINDS) | {"multi_view"} == set(KINDS)


def test_knowledge_validation_errors():
    with pytest.raises(ValueError, match="unknown knowledge kind 'clip'"):
        Knowledge("clip", torch.zeros(1, 2, 3), {})
    with pytest.raises(ValueError, match=r"must be \[B, N, D\]"):
        Knowledge("dino_image", torch.zeros(2, 3), {"resolution": 1, "model": "m"})
    with pytest.raises(ValueError, match=r"provenance lacks \['sigma'\]"):
        Knowledge("mmdit_hidden", torch.zeros(1, 2, 4), {"layers": [1], "resolution": [1, 1], "model": "m"})
    with pytest.raises(TypeError, match="needs a torch.Tensor"):
        Knowledge("dino_image", [[1.0]], {"resolution": 1, "model": "m"})


def test_to_keeps_kind_and_provenance():
    k = dino_image_knowledge(torch.randn(1, 3, 8), 512, extra_key=1)
    h = k.to(torch.float64)
    assert h.tensor.dtype == torch.float64 and h.kind == k.kind and h.provenance == k.provenance


def test_check_knowledge_sigma_tolerance_and_raw_tensors():
    k = mmdit_hidden_knowledge(torch.zeros(1, 4, 8), [3, 5], 0.25 + SIGMA_TOLERANCE / 2, (16, 16))
    check_knowledge(k, "mmdit_hidden", 8, [3, 5], 0.25)
    bad = mmdit_hidden_knowledge(torch.zeros(1, 4, 8), [3, 5], 0.25 + 2 * SIGMA_TOLERANCE, (16, 16))
    with pytest.raises(KnowledgeMismatchError, match="origin X was trained on MMDiT hidden states captured at sigma 0.25"):
        check_knowledge(bad, "mmdit_hidden", 8, [3, 5], 0.25, origin="origin X")
    check_knowledge(torch.zeros(2, 3, 8), "mmdit_hidden", 8)  # raw tensors: only D is known
    with pytest.raises(KnowledgeMismatchError, match=r"got \(2, 3, 9\)"):
        check_knowledge(torch.zeros(2, 3, 9), "mmdit_hidden", 8)


def test_from_mmdit_capture_reads_the_mmdit_record():
    from know3d_core.mmdit.capture import MMDiTKnowledge

    rec = MMDiTKnowledge(hidden=torch.randn(1, 6, 2 * 16), layers=(4, 9), sigma=0.2625, sigma_requested=0.25,
                         step_index=30, num_steps=40, token_grid=(2, 3), resolution=(32, 48),
                         model_name="tiny-qwen", width=16)
    k = from_mmdit_capture(rec)
    assert k.kind == "mmdit_hidden" and k.tensor is rec.hidden
    assert k.provenance["layers"] == [4, 9] and k.provenance["sigma"] == 0.25
    assert k.provenance["sigma_actual"] == 0.2625 and k.provenance["model"] == "tiny-qwen"
    check_knowledge(k, "mmdit_hidden", 32, [4, 9], 0.25)
