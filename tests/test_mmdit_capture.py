"""Hidden-state capture: hooks vs. block-by-block outputs, target slicing, cond rows, ComfyUI patch."""
import pytest
import torch

from know3d_core.mmdit import (CaptureComplete, CaptureSpec, ComfyQwenCapture, HiddenStateCollector,
                               capture_block_outputs, cond_rows_from_cond_or_uncond, default_layers,
                               slice_target_rows)
from know3d_core.mmdit.capture import MMDiTKnowledge

from test_mmdit_common import JOINT_DIM, blockwise_image_streams, tiny_transformer


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(num_layers=4)


def _inputs(target=(2, 3), refs=((2, 2),), batch=1, txt=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = target[0] * target[1] + sum(h * w for h, w in refs)
    hidden = torch.randn(batch, n, 64, generator=g)
    embeds = torch.randn(batch, txt, JOINT_DIM, generator=g)
    img_shapes = [[(1, *target)] + [(1, *r) for r in refs]] * batch
    return hidden, embeds, img_shapes, target[0] * target[1]


def _forward(model, hidden, embeds, img_shapes, t=0.6):
    ts = torch.full((hidden.shape[0],), t)
    return model(hidden_states=hidden, timestep=ts, encoder_hidden_states=embeds, encoder_hidden_states_mask=None,
                 img_shapes=img_shapes, return_dict=False)[0]


@pytest.mark.parametrize("refs", [((2, 2),), ((2, 2), (3, 2))], ids=["one_ref", "two_refs"])
def test_hooks_equal_blockwise_outputs_and_slice_target(model, refs):
    hidden, embeds, shapes, n_target = _inputs(refs=refs)
    outs, final = blockwise_image_streams(model, hidden, embeds, torch.full((1,), 0.6), shapes)
    col = HiddenStateCollector([0, 2, 3])
    with capture_block_outputs(model, col, n_target):
        out = _forward(model, hidden, embeds, shapes)
    # the block-by-block run reproduces the model, so its per-block outputs are the reference
    assert torch.equal(out, final)
    n_all = hidden.shape[1]
    assert outs[0].shape[1] == n_all and n_target < n_all
    for i in (0, 2, 3):
        assert col.state(i).shape == (1, n_target, 32)
        assert torch.equal(col.state(i), outs[i][:, :n_target])
    cat = col.concatenated()
    assert cat.shape == (1, n_target, 3 * 32)
    assert torch.equal(cat[..., 32:64], outs[2][:, :n_target])
    assert not any(b._forward_hooks for b in model.transformer_blocks)


def test_cond_rows_in_shared_batch(model):
    hidden, embeds, shapes, n_target = _inputs(batch=2, seed=3)
    hidden[1] = hidden[0]   # same latent, two prompts: row 0 uncond, row 1 cond (ComfyUI order)
    outs, _ = blockwise_image_streams(model, hidden, embeds, torch.full((2,), 0.6), shapes)
    col = HiddenStateCollector([1, 3])
    with capture_block_outputs(model, col, n_target, cond_rows=[1]):
        _forward(model, hidden, embeds, shapes)
    for i in (1, 3):
        assert col.state(i).shape[0] == 1
        assert torch.equal(col.state(i), outs[i][1:2, :n_target])
        assert not torch.allclose(col.state(i), outs[i][0:1, :n_target])
    # and it equals a cond-only forward of the same row
    solo = HiddenStateCollector([1, 3])
    with capture_block_outputs(model, solo, n_target):
        _forward(model, hidden[1:2], embeds[1:2], shapes[:1])
    assert torch.allclose(solo.concatenated(), col.concatenated(), atol=1e-5)


def test_capture_is_a_compact_copy():
    img = torch.randn(3, 40, 8)
    got = slice_target_rows(img, 24, [2])
    assert torch.equal(got, img[2:3, :24])
    assert got.untyped_storage().nbytes() == got.numel() * got.element_size()
    assert got.untyped_storage().data_ptr() != img.untyped_storage().data_ptr()
    full = slice_target_rows(img, 24, None)
    assert full.untyped_storage().nbytes() == full.numel() * full.element_size()
    with pytest.raises(ValueError):
        slice_target_rows(img, 41)


def test_hooks_removed_on_exception(model):
    hidden, embeds, shapes, n_target = _inputs()

    class Boom(HiddenStateCollector):
        def collect(self, *a, **k):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with capture_block_outputs(model, Boom([1]), n_target):
            _forward(model, hidden, embeds, shapes)
    assert not any(b._forward_hooks for b in model.transformer_blocks)
    with pytest.raises(KeyError):
        with capture_block_outputs(model, HiddenStateCollector([0]), n_target):
            raise KeyError("outside the forward")
    assert not any(b._forward_hooks for b in model.transformer_blocks)
    with pytest.raises(ValueError, match="out of range"):
        with capture_block_outputs(model, HiddenStateCollector([4]), n_target):
            pass


def test_default_layers_and_spec_precedence():
    assert default_layers(60) == (20, 30, 40)
    assert CaptureSpec().sigma == 0.25 and CaptureSpec().resolve_layers(60) == (20, 30, 40)
    meta = {"layers": [10, 50], "sigma": 0.5}
    assert CaptureSpec.from_metadata(meta) == CaptureSpec(layers=(10, 50), sigma=0.5)
    assert CaptureSpec.from_metadata(meta, sigma=0.85).sigma == 0.85
    assert CaptureSpec.from_metadata(meta, layers=[3]).layers == (3,)
    assert CaptureSpec.from_metadata(None) == CaptureSpec()
    with pytest.raises(ValueError):
        CaptureSpec(layers=(60,)).resolve_layers(60)
    with pytest.raises(ValueError):
        CaptureSpec(branch="uncond")
    with pytest.raises(ValueError):
        CaptureSpec(sigma=1.5)


def test_cond_rows_from_cond_or_uncond():
    assert cond_rows_from_cond_or_uncond([1, 0], 2) == [1]
    assert cond_rows_from_cond_or_uncond([0, 1], 4) == [0, 1]
    assert cond_rows_from_cond_or_uncond([1, 0], 6) == [3, 4, 5]
    assert cond_rows_from_cond_or_uncond([1], 2) == []
    assert cond_rows_from_cond_or_uncond(None, 2) == [0, 1]


def _comfy_like_forward(model, patch, hidden, embeds, shapes, sigma, sample_sigmas, cond_or_uncond, n_ref, x):
    """Drive the blocks the way ComfyUI's Qwen-Image model does and call the double_block patch."""
    outs, _ = blockwise_image_streams(model, hidden, embeds, torch.full((hidden.shape[0],), sigma), shapes)
    opts = {"sigmas": torch.tensor([sigma]), "sample_sigmas": sample_sigmas, "cond_or_uncond": cond_or_uncond,
            "reference_image_num_tokens": n_ref, "total_blocks": len(outs), "block_type": "double"}
    for i, img in enumerate(outs):
        opts["block_index"] = i
        args = {"img": img, "txt": None, "x": x, "block_index": i, "transformer_options": opts}
        assert patch(args) is args
    return outs


def test_comfy_patch_captures_cond_rows_at_nearest_sigma(model):
    hidden, embeds, shapes, n_target = _inputs(batch=2, refs=((2, 2), (1, 2)), seed=5)
    x = torch.zeros(1, 16, 1, 4, 6)               # target latent 4x6 -> 2x3 tokens
    sample = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.0])
    patch = ComfyQwenCapture(CaptureSpec(layers=(1, 2), sigma=0.5))
    for s in sample[:-1].tolist():
        outs = _comfy_like_forward(model, patch, hidden, embeds, shapes, s, sample, [1, 0], [4, 2], x)
        if abs(s - 0.55) < 1e-6:
            expected = torch.cat([outs[1][1:2, :n_target], outs[2][1:2, :n_target]], dim=-1)
    k = patch.knowledge()
    assert isinstance(k, MMDiTKnowledge)
    assert torch.equal(k.hidden, expected)
    assert k.step_index == 2 and abs(k.sigma - 0.55) < 1e-6 and k.sigma_requested == 0.5
    assert k.token_grid == (2, 3) and k.resolution == (32, 48) and k.layers == (1, 2)


def test_comfy_patch_skips_uncond_only_calls_and_can_stop(model):
    hidden, embeds, shapes, n_target = _inputs(batch=1, seed=6)
    x = torch.zeros(1, 16, 1, 4, 6)
    sample = torch.tensor([1.0, 0.25, 0.0])
    patch = ComfyQwenCapture(CaptureSpec(layers=(0, 3), sigma=0.25), stop_when_complete=True)
    _comfy_like_forward(model, patch, hidden, embeds, shapes, 0.25, sample, [1], [4], x)   # uncond alone
    assert not patch.complete
    with pytest.raises(CaptureComplete):
        _comfy_like_forward(model, patch, hidden, embeds, shapes, 0.25, sample, [0], [4], x)
    assert patch.complete and patch.knowledge().hidden.shape == (1, n_target, 64)
    with pytest.raises(RuntimeError, match="no capture"):
        ComfyQwenCapture().knowledge()
