"""Issue 16 row 'a 100 kB prompt': the back-view prompt's limit comes from Qwen-Image-Edit (1024 prompt
tokens, diffusers' cap; lowered by the text encoder's max_position_embeddings) and is checked with the
tokenizer alone, before any network runs; the encoder refuses it too instead of failing in the RoPE."""
import json
import os

import pytest
from PIL import Image

from know3d_core.mmdit.backview import condition_images
from know3d_core.mmdit.loading import load_processor, load_text_encoder
from know3d_core.mmdit.prompt import (EDIT_PLUS_DROP_TOKENS, MAX_PROMPT_TOKENS, BackViewPrompt, PromptTooLong,
                                      check_prompt_length, encode_prompt, max_prompt_tokens, prompt_tokens)

from _pipeline_helpers import full_demo


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return full_demo(tmp_path_factory).qwen


@pytest.fixture(scope="module")
def processor(qwen):
    return load_processor(qwen)


@pytest.fixture(scope="module")
def images():
    return condition_images([Image.new("RGB", (518, 518), (90, 60, 30))])


def test_token_count_is_what_the_encoder_returns(qwen, processor, images):
    te = load_text_encoder(qwen)
    text = BackViewPrompt().build("three slats")
    embeds, mask = encode_prompt(te, processor, images, text)
    assert prompt_tokens(processor, images, text) == embeds.shape[1] == int(mask.sum())


def test_limit_from_diffusers_and_the_text_encoder(qwen):
    with open(os.path.join(qwen, "text_encoder", "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert max_prompt_tokens(cfg) == MAX_PROMPT_TOKENS == 1024  # the tiny config allows 128000 positions
    cfg["text_config"]["max_position_embeddings"] = 300
    assert max_prompt_tokens(cfg) == 300
    assert max_prompt_tokens({"max_position_embeddings": 512}) == 512 and max_prompt_tokens(None) == 1024


def test_100kB_description_is_refused_with_the_room_left(processor, images):
    prompt = BackViewPrompt()
    base = check_prompt_length(processor, images, prompt, "")  # camera prompt + template + image
    with pytest.raises(PromptTooLong) as e:
        check_prompt_length(processor, images, prompt, "x" * 100_000)
    # the demo's tokenizer reads one token per character: 100000 description tokens, plus one space
    assert e.value.tokens == base + 100_001 and e.value.limit == 1024 and e.value.description_tokens == 100_000
    room = 100_000 - (e.value.tokens - 1024)
    assert f"shorten the description to at most {room} tokens" in str(e.value)
    fits = "y" * room
    assert check_prompt_length(processor, images, prompt, fits) == 1024
    with pytest.raises(PromptTooLong):
        check_prompt_length(processor, images, prompt, fits + "y")


def test_encoder_refuses_before_its_forward(qwen, processor, images, monkeypatch):
    te = load_text_encoder(qwen)
    calls = []
    monkeypatch.setattr(type(te), "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(PromptTooLong, match="by at least"):
        encode_prompt(te, processor, images, "z" * (MAX_PROMPT_TOKENS + EDIT_PLUS_DROP_TOKENS))
    assert calls == []
