"""Front-image preprocessing and DINOv3 features (tiny random DINOv3 written at test time)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from know3d_core.conditioning.dinov3 import (
    DINOV3_SOURCE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinoV3FeatureExtractor,
    config_from_state_dict,
    get_cond,
    num_feature_tokens,
    prepare_pixels,
)
from know3d_core.conditioning.preprocess import (
    foreground_bbox,
    pil_to_tensor,
    preprocess_image,
    preprocess_image_tensor,
)


# ----------------------------------------------------------------------------------- images
def rgba_with_box(w, h, box, color=(200, 100, 50), alpha=255, seed=0):
    """Random-RGB RGBA image, transparent except the inclusive box (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((h, w, 4), np.uint8)
    arr[:, :, :3] = rng.integers(0, 256, (h, w, 3))
    x0, y0, x1, y1 = box
    arr[y0:y1 + 1, x0:x1 + 1, :3] = color
    arr[y0:y1 + 1, x0:x1 + 1, 3] = alpha
    return Image.fromarray(arr, "RGBA")


def expected_crop(arr, box):
    """Independent square crop with zero padding, premultiplied (box side = max extent, even)."""
    x0, y0, x1, y1 = box
    size = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2  # integer centres in the tests that use this
    left, top = cx - size // 2, cy - size // 2
    h, w = arr.shape[:2]
    pad = np.zeros((size, size, 4), np.uint8)
    for yy in range(size):
        for xx in range(size):
            sy, sx = top + yy, left + xx
            if 0 <= sy < h and 0 <= sx < w:
                pad[yy, xx] = arr[sy, sx]
    f = pad.astype(np.float32) / 255
    return (f[:, :, :3] * f[:, :, 3:4] * 255).astype(np.uint8)


def crop_side(box):
    """Side of the reference crop: box cx +- max_extent // 2, both ends rounded the same way."""
    x0, y0, x1, y1 = box
    return 2 * (max(x1 - x0, y1 - y0) // 2)


def test_preprocess_crops_square_and_premultiplies():
    box = (10, 20, 30, 60)  # w extent 20, h extent 40, centre (20, 40)
    img = rgba_with_box(80, 90, box)
    arr = np.asarray(img).copy()
    arr[25, 15, 3] = 128  # a half-transparent pixel inside: premultiplied
    img = Image.fromarray(arr, "RGBA")
    out = preprocess_image(img)
    assert out.mode == "RGB" and out.size == (40, 40)
    np.testing.assert_array_equal(np.asarray(out), expected_crop(arr, box))
    assert np.asarray(out)[25 - 20, 15 - 0].tolist() == [int(c * (128 / 255)) for c in (200, 100, 50)]


def test_preprocess_pads_out_of_range_with_zeros():
    box = (0, 0, 9, 39)  # at the corner: the square extends left of the image
    img = rgba_with_box(50, 50, box, seed=1)
    out = np.asarray(preprocess_image(img))
    side = crop_side(box)
    assert out.shape == (side, side, 3) and side == 38  # max extent 39 is odd: PIL's box is 38 wide
    # columns left of x = 0 are zeros; the object columns (x 0..9) are the colour
    left = round((0 + 9) / 2 - 39 // 2)
    assert left < 0
    assert (out[:, :-left] == 0).all()
    assert (out[:, -left:-left + 10] == (200, 100, 50)).all()
    assert (out[:, -left + 10:] == 0).all()


def test_preprocess_downscales_long_side_to_1024():
    big = rgba_with_box(2048, 1024, (500, 300, 899, 699), seed=2)  # 400 x 400 object
    out = preprocess_image(big)
    # after the 0.5 LANCZOS downscale the object spans ~200 px (edges soften to alpha ~0.5)
    assert abs(out.size[0] - 199) <= 2 and out.size[0] == out.size[1]
    assert preprocess_image(big, max_size=4096).size == (crop_side((500, 300, 899, 699)),) * 2


def test_alpha_threshold_is_strictly_above_0_8():
    alpha = np.zeros((5, 5), np.uint8)
    alpha[1, 1] = 204  # == 0.8 * 255: not foreground
    alpha[3, 2] = 205
    alpha[2, 4] = 205
    assert foreground_bbox(alpha) == (2, 2, 4, 3)


def test_mask_and_tensor_inputs_match_rgba():
    box = (12, 8, 40, 30)
    rgba = rgba_with_box(64, 48, box, seed=3)
    ref = np.asarray(preprocess_image(rgba))
    arr = np.asarray(rgba)
    rgb = Image.fromarray(arr[:, :, :3], "RGB")
    mask_pil = Image.fromarray(arr[:, :, 3], "L")
    mask_t = torch.from_numpy(arr[:, :, 3].astype(np.float32) / 255)
    rgba_t = torch.from_numpy(arr.astype(np.float32) / 255)
    np.testing.assert_array_equal(np.asarray(preprocess_image(rgb, mask_pil)), ref)
    np.testing.assert_array_equal(np.asarray(preprocess_image(rgb, mask_t)), ref)
    np.testing.assert_array_equal(np.asarray(preprocess_image(rgba_t)), ref)
    np.testing.assert_array_equal(np.asarray(preprocess_image(rgba_t[None], mask_t[None])), ref)
    np.testing.assert_array_equal(np.asarray(preprocess_image(rgba_t[..., :3], mask_t)), ref)
    t = preprocess_image_tensor(rgba)
    assert t.dtype == torch.float32 and t.shape == (*ref.shape[:2], 3)
    torch.testing.assert_close(t, torch.from_numpy(ref.astype(np.float32) / 255))
    torch.testing.assert_close(pil_to_tensor(Image.fromarray(ref)), t)


def test_explicit_mask_overrides_own_alpha():
    rgba = rgba_with_box(40, 40, (5, 5, 15, 15), seed=4)
    mask = np.zeros((40, 40), np.uint8)
    mask[20:35, 10:30] = 255
    out = preprocess_image(rgba, Image.fromarray(mask, "L"))
    assert out.size == (crop_side((10, 20, 29, 34)),) * 2
    own = np.asarray(rgba).copy()
    own[:, :, 3] = mask
    np.testing.assert_array_equal(np.asarray(out), np.asarray(preprocess_image(Image.fromarray(own, "RGBA"))))


def test_assume_foreground_uses_whole_frame():
    rng = np.random.default_rng(5)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8), "RGB")
    with pytest.raises(ValueError, match="no mask was given"):
        preprocess_image(rgb)
    out = preprocess_image(rgb, assume_foreground=True)
    assert out.size == (crop_side((0, 0, 49, 29)),) * 2 == (48, 48)
    a = np.asarray(out)
    assert (a[:4] == 0).all() and (a[-5:] == 0).all()  # black above and below the 30-row frame
    top = round(14.5 - 24)
    np.testing.assert_array_equal(a[-top:-top + 30, :], np.asarray(rgb)[:, round(24.5 - 24):round(24.5 - 24) + 48])


@pytest.mark.parametrize("case,match", [
    ("opaque_rgba", "no mask was given"),
    ("transparent", "foreground mask is empty"),
    ("empty_mask", "foreground mask is empty"),
    ("mode", "unsupported image mode 'I;16'"),
    ("mask_size", "mask size"),
    ("batch", "batch size 2"),
    ("channels", "3 \\(RGB\\) or 4 \\(RGBA\\)"),
    ("int_tensor", "float tensor"),
    ("nan", "NaN"),
    ("tiny", "too small"),
])
def test_bad_inputs_raise_value_error(case, match):
    rgb = Image.new("RGB", (20, 20), (10, 20, 30))
    args = {
        "opaque_rgba": (Image.new("RGBA", (20, 20), (1, 2, 3, 255)),),
        "transparent": (Image.new("RGBA", (20, 20), (1, 2, 3, 0)),),
        "empty_mask": (rgb, torch.zeros(20, 20)),
        "mode": (Image.new("I;16", (20, 20)),),
        "mask_size": (rgb, torch.ones(10, 20)),
        "batch": (torch.rand(2, 20, 20, 4),),
        "channels": (torch.rand(20, 20, 2),),
        "int_tensor": (torch.zeros(20, 20, 3, dtype=torch.uint8),),
        "nan": (torch.full((20, 20, 4), float("nan")),),
        "tiny": (rgba_with_box(20, 20, (5, 5, 5, 5)),),
    }[case]
    with pytest.raises(ValueError, match=match):
        preprocess_image(*args)


# ----------------------------------------------------------------------------------- DINOv3
TINY_CFG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_register_tokens=4, patch_size=16, image_size=64, rope_theta=100.0, layer_norm_eps=1e-5,
)


def tiny_model(cfg=TINY_CFG):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(**cfg)
    config._attn_implementation = "sdpa"
    model = DINOv3ViTModel(config).eval()
    with torch.no_grad():  # make every parameter matter, incl. the final norm we must NOT use
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.norm.weight.mul_(3.0).add_(0.5)
    return model


def test_num_feature_tokens_official():
    # official DINOv3 ViT-L/16: 1 CLS + 4 registers + (side / 16)^2 patches -> 5 + 32^2, 5 + 64^2
    assert num_feature_tokens(512) == 1029 == 1 + 4 + (512 // 16) ** 2
    assert num_feature_tokens(1024) == 4101 == 1 + 4 + (1024 // 16) ** 2


def test_features_token_count_and_nonaffine_norm():
    ext = DinoV3FeatureExtractor(tiny_model(), image_size=64)
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (50, 70, 3), dtype=np.uint8)) for i in range(2)]
    feats = ext(imgs)
    assert feats.shape == (2, num_feature_tokens(64, 16, 4), 32) and feats.dtype == torch.float32
    assert ext(imgs[0], image_size=32).shape == (1, num_feature_tokens(32), 32)
    torch.testing.assert_close(feats.mean(-1), torch.zeros(2, 21), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.std(-1, unbiased=False), torch.ones(2, 21), atol=1e-3, rtol=0)


def test_features_equal_manual_layer_by_layer_and_hf_hidden_states():
    model = tiny_model()
    ext = DinoV3FeatureExtractor(model, image_size=64)
    img = Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    feats = ext(img)

    pixels = prepare_pixels(img, 64)
    with torch.no_grad():
        h = model.embeddings(pixels)
        pos = model.rope_embeddings(pixels)
        layers = model.model.layer if hasattr(model, "model") else model.layer
        for layer in layers:
            h = layer(h, position_embeddings=pos)
        manual = F.layer_norm(h, (32,), eps=1e-5)
        out = model(pixels, output_hidden_states=True)
    torch.testing.assert_close(feats, manual, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(feats, F.layer_norm(out.hidden_states[-1], (32,), eps=1e-5), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(feats, out.last_hidden_state, atol=1e-2)  # the model's affine norm differs
    cond = get_cond(ext, img, 64)
    assert torch.equal(cond["cond"], feats) and torch.equal(cond["neg_cond"], torch.zeros_like(feats))


def test_prepare_pixels_is_lanczos_then_imagenet_normalise():
    rng = np.random.default_rng(8)
    arr = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    got = prepare_pixels(img, 32)
    resized = np.asarray(img.resize((32, 32), Image.Resampling.LANCZOS)).astype(np.float64) / 255
    expected = (resized - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), expected, rtol=1e-5, atol=1e-5)
    as_tensor = torch.from_numpy(arr.astype(np.float32) / 255)
    assert torch.equal(prepare_pixels(as_tensor, 32), got)
    assert torch.equal(prepare_pixels(as_tensor[None].repeat(2, 1, 1, 1), 32)[1], got[0])


def official_layout(model):
    """State dict as the Hugging Face checkpoint names it (``layer.N.*``, no ``model.`` prefix)."""
    return {k.replace("model.layer.", "layer."): v.contiguous() for k, v in model.state_dict().items()}


def test_load_checkpoint_folder(tmp_path):
    model = tiny_model()
    folder = tmp_path / "dinov3"
    folder.mkdir()
    save_file(official_layout(model), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({  # the keys a Hugging Face config.json carries
        **TINY_CFG, "model_type": "dinov3_vit", "architectures": ["DINOv3ViTModel"],
        "torch_dtype": "float32", "transformers_version": "4.56.0.dev0"}))
    loaded = DinoV3FeatureExtractor.from_pretrained(str(folder), image_size=64)
    img = Image.fromarray(np.random.default_rng(9).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    torch.testing.assert_close(loaded(img), DinoV3FeatureExtractor(model, 64)(img), atol=0, rtol=0)


def test_load_single_safetensors_derives_config(tmp_path):
    cfg = dict(TINY_CFG, hidden_size=128, num_attention_heads=2, intermediate_size=96, num_hidden_layers=3)
    model = tiny_model(cfg)
    sd = official_layout(model)
    del sd["embeddings.mask_token"]  # optional: unused at inference
    sd["naf.upsampler.weight"] = torch.zeros(3)  # ComfyUI-bundled extra: ignored
    path = tmp_path / "dinov3-tiny.safetensors"
    save_file(sd, str(path))
    derived = config_from_state_dict(sd)
    assert (derived["hidden_size"], derived["num_hidden_layers"], derived["intermediate_size"],
            derived["num_register_tokens"], derived["num_attention_heads"]) == (
        cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_register_tokens"],
        cfg["num_attention_heads"]) == (128, 3, 96, 4, 2)
    loaded = DinoV3FeatureExtractor.from_pretrained(str(path), image_size=32)
    img = Image.new("RGB", (32, 32), (120, 30, 200))
    torch.testing.assert_close(loaded(img), DinoV3FeatureExtractor(model, 32)(img), atol=0, rtol=0)


def test_missing_files_name_the_file_and_source(tmp_path):
    folder = tmp_path / "dinov3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CFG))
    with pytest.raises(FileNotFoundError, match="model.safetensors") as e:
        DinoV3FeatureExtractor.from_pretrained(str(folder))
    assert DINOV3_SOURCE in str(e.value) and str(folder) in str(e.value)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        DinoV3FeatureExtractor.from_pretrained(str(tmp_path / "nowhere.safetensors"))


def test_strict_loading_reports_bad_keys(tmp_path):
    model = tiny_model()
    sd = official_layout(model)
    sd["layer.0.attention.extra.weight"] = torch.zeros(2)
    del sd["layer.1.norm2.bias"]
    folder = tmp_path / "bad"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(TINY_CFG))
    with pytest.raises(ValueError, match="extra.weight") as e:
        DinoV3FeatureExtractor.from_pretrained(str(folder))
    assert "norm2.bias" in str(e.value) and os.path.join(str(folder), "model.safetensors") in str(e.value)
