"""Back-view annotations: the answer parser, retry-then-record, imports, and tiny Qwen2.5-VL end to end."""
import json
import os

import pytest

from know3d_core.data import annotate, layout, prepare as prep
from know3d_core.errors import UsageError

# Answers in the shapes Qwen2.5-VL-7B-Instruct gives to PROMPT (bullets, numbered with a heading and
# markdown, JSON in a fence, one line with separators, duplicates) and the lists they must give.
ANSWERS = [
    ("- a curved wooden handle in the middle\n- three vertical slats\n- a flat base plate",
     ["a curved wooden handle in the middle", "three vertical slats", "a flat base plate"]),
    ("The back view shows:\n1. A large rectangular opening in the backrest.\n2. **Two metal legs** at the bottom.\n"
     "3. A small logo plate.",
     ["A large rectangular opening in the backrest", "Two metal legs at the bottom", "A small logo plate"]),
    ('```json\n["a round knob", "a cable port near the bottom"]\n```', ["a round knob", "a cable port near the bottom"]),
    ("a flat back panel, a base plate and two screws", ["a flat back panel", "a base plate", "two screws"]),
    ("Components visible: a zipper pocket; two shoulder straps; a mesh side pocket",
     ["a zipper pocket", "two shoulder straps", "a mesh side pocket"]),
    ("* A handle\n* a handle\n* Ventilation grille", ["A handle", "Ventilation grille"]),
]
MALFORMED = ["", "   ", "I'm sorry, I cannot determine the components from this image.", "v P q ` ^ 7 t Y O 1",
             "The back shows:"]


@pytest.mark.parametrize("text,expected", ANSWERS)
def test_parse_components(text, expected):
    assert annotate.parse_components(text) == expected


@pytest.mark.parametrize("text", MALFORMED)
def test_parse_components_rejects(text):
    with pytest.raises(annotate.MalformedAnswer):
        annotate.parse_components(text)


def test_retry_once_then_record():
    answers = iter(["Sorry, I can't tell.", "- a hinge\n- a latch"])
    prompts = []

    def ask(prompt):
        prompts.append(prompt)
        return next(answers)

    out = annotate.annotate_with_retry(ask, None)
    assert out == {"annotations": ["a hinge", "a latch"], "raw": "- a hinge\n- a latch", "error": None}
    assert prompts == [annotate.PROMPT, annotate.RETRY_PROMPT]
    out = annotate.annotate_with_retry(lambda p: "", None)
    assert out["annotations"] == [] and out["error"].startswith("malformed answer twice")


def test_chat_text_has_one_image_slot():
    text = annotate.chat_text("hello")
    assert text.count("<|image_pad|>") == 1 and text.endswith("<|im_start|>assistant\n")


def test_import_jsonl_and_csv(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_text(json.dumps({"file": "sub/chair.glb", "feature": "slats", "annotations": ["three slats"]}) + "\n"
                  + json.dumps({"sha256": "ab" * 32, "annotations": ["x"], "back": "views/006.png"}) + "\n")
    t = annotate.load_annotation_source(str(jl))
    assert annotate.lookup(t, "/data/sub/chair.glb", "00")["annotations"] == ["three slats"]
    assert annotate.lookup(t, "/elsewhere/y.glb", "ab" * 32)["per_back"] == {"views/006.png": ["x"]}
    csv_path = tmp_path / "a.csv"
    csv_path.write_text('file,annotations,feature\nchair.glb,"a handle; a hole",handle\nlamp.glb,"[""a shade""]",\n')
    t = annotate.load_annotation_source(str(csv_path))
    assert t["chair.glb"]["annotations"] == ["a handle", "a hole"] and t["chair.glb"]["feature"] == "handle"
    assert t["lamp.glb"]["annotations"] == ["a shade"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(UsageError, match="line 1"):
        annotate.load_annotation_source(str(bad))


def _tiny_qwen(folder):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from know3d_core import demo_models as D

    tok, vocab = D.char_tokenizer()
    cfg = D.tiny_qwen25vl_config(vocab, D.QWEN_TRANSFORMER["joint_attention_dim"])
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).eval().save_pretrained(os.path.join(folder, "text_encoder"))
    proc = os.path.join(folder, "processor")
    tok.save_pretrained(proc)
    D._image_processor_class()(min_pixels=56 * 56, max_pixels=56 * 56).save_pretrained(proc)
    return folder


def test_annotator_needs_a_language_head(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    d = tmp_path / "enc"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    save_file({"model.embed_tokens.weight": np.zeros((2, 2), np.float32)}, str(d / "model.safetensors"))
    with pytest.raises(UsageError, match="no language head"):
        annotate.resolve_annotator_dirs(str(d))
    with pytest.raises(UsageError, match="not a folder"):
        annotate.resolve_annotator_dirs(str(tmp_path / "missing"))


@pytest.mark.slow
def test_tiny_qwen_annotates_a_prepared_dataset(tmp_path):
    """Real transformers Qwen2.5-VL (tiny, random): every pair's back view is asked twice (random
    text is malformed) and the raw answer is recorded; the step completes."""
    pytest.importorskip("moderngl")
    from know3d_core.data import synthetic

    inp = tmp_path / "in"
    synthetic.write_glb(synthetic.make_asset(0, "handle"), str(inp / "a.glb"))
    out = str(tmp_path / "ds")
    opts = prep.PrepareOptions(input=str(inp), out=out, render_size=32, progress=False, steps=("mesh", "render"))
    prep.prepare(opts, log=lambda m: None)
    qwen = _tiny_qwen(str(tmp_path / "qwen"))
    opts = prep.PrepareOptions(input=None, out=out, steps=("annotate",), force=("annotate",), progress=False,
                               annotator=qwen, annotate_max_new_tokens=2, annotate_sets=("backview",))
    counts = prep.prepare_dataset(opts)
    assert counts["ok"] == 1
    rec = prep.read_records(out)[0]
    assert "annotate" in rec["steps"] and rec["annotation_source"] == "qwen2.5-vl"
    with open(os.path.join(layout.asset_dir(out, rec["sha256"]), layout.PAIRS_FILE)) as f:
        pairs = json.load(f)
    failed = [p for p in pairs if "annotation_error" in p]
    assert rec["annotation_failures"] == len(failed)
    assert all("annotation_error" not in p for p in pairs if p["set"] != "backview")
    for p in pairs:
        assert isinstance(p["annotations"], list)
        if "annotation_error" in p:
            assert p["annotations"] == [] and isinstance(p["annotation_error"]["raw"], str)
