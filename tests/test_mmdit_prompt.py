"""Back-view prompt assembly and Edit-Plus prompt encoding (tiny Qwen2.5-VL + real processor class)."""
import pytest
import torch

from know3d_core.mmdit import (DEFAULT_CAMERA_PROMPT, BackViewPrompt, back_view_prompt, edit_plus_text,
                               encode_prompt)
from know3d_core.mmdit.backview import condition_images

from test_mmdit_common import JOINT_DIM, random_image, tiny_text_stack


def test_back_view_prompt_template_and_empty_description():
    assert back_view_prompt("a hollow backrest with three slats") == \
        f"{DEFAULT_CAMERA_PROMPT} a hollow backrest with three slats"
    assert back_view_prompt("") == DEFAULT_CAMERA_PROMPT == back_view_prompt("   ")
    assert back_view_prompt("zip", camera_prompt="Show the back.", template="{description} | {camera}") == \
        "zip | Show the back."
    meta = {"camera_prompt": "Turn around.", "prompt_template": "{camera}\n{description}"}
    p = BackViewPrompt.from_metadata(meta)
    assert p.build("a zipper") == "Turn around.\na zipper" and p.build() == "Turn around."
    assert BackViewPrompt.from_metadata(meta, camera_prompt="User cam.").build("x") == "User cam.\nx"


def test_edit_plus_text_layout():
    t = edit_plus_text("hello", 2)
    assert t.startswith("<|im_start|>system\n") and t.endswith("<|im_start|>assistant\n")
    assert "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: " \
           "<|vision_start|><|image_pad|><|vision_end|>hello<|im_end|>" in t
    assert "Picture" not in edit_plus_text("x", 0)


@pytest.fixture(scope="module")
def text_stack():
    return tiny_text_stack()


def test_encode_prompt_equals_diffusers(text_stack):
    from diffusers import QwenImageEditPlusPipeline
    te, proc = text_stack
    imgs = condition_images([random_image(80, 64, 1), random_image(64, 64, 2)])
    pipe = QwenImageEditPlusPipeline(scheduler=None, vae=None, text_encoder=te, tokenizer=proc.tokenizer,
                                     processor=proc, transformer=None)
    prompts = [back_view_prompt("a zipper and two straps"), " "]
    singles = []
    for p in prompts:
        theirs, their_mask = pipe._get_qwen_prompt_embeds(p, imgs, device=torch.device("cpu"))
        ours, mask = encode_prompt(te, proc, imgs, p)
        assert ours.shape[-1] == JOINT_DIM and ours.shape[1] == mask.shape[1]
        assert torch.equal(ours, theirs) and torch.equal(mask, their_mask)
        singles.append(ours[0])
    # a batch of two prompts: right-padded, each row equal to its own encoding
    both, mask = encode_prompt(te, proc, imgs, prompts)
    for row, single in enumerate(singles):
        n = single.shape[0]
        assert int(mask[row].sum()) == n
        assert torch.allclose(both[row, :n], single, atol=1e-5)
        assert both[row, n:].abs().sum() == 0


def test_encode_prompt_rows_are_last_hidden_layer_after_the_prefix(text_stack):
    te, proc = text_stack
    imgs = condition_images([random_image(64, 64, 3)])
    emb, mask = encode_prompt(te, proc, imgs, "hi", drop_tokens=10)
    inputs = proc(text=[edit_plus_text("hi", 1)], images=imgs, padding=True, return_tensors="pt")
    with torch.no_grad():
        full = te(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")},
                  output_hidden_states=True).hidden_states[-1]
    assert torch.equal(emb[0], full[0, 10:]) and bool(mask.all())
    with pytest.raises(ValueError, match="nothing is left"):
        encode_prompt(te, proc, imgs, "hi", drop_tokens=10_000)
