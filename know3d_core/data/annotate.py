"""Back-view annotations: short descriptions of the components visible in the back view (paper Fig. 2).

Two sources, per asset:

* imported: a JSONL or CSV file (``--annotations``; by default ``INPUT/annotations.jsonl`` when it
  exists, as ``synthetic.write_dataset_folder`` writes it). One row per asset, keyed by ``file``
  (path relative to the input folder, or the file name) or ``sha256``; ``annotations`` a list of
  strings (CSV: a JSON list or ``;``-separated); optional ``feature``; optional ``back`` (a view file
  such as ``views/006.png``) to annotate one pair only. Rows without ``back`` apply to every pair.
* Qwen2.5-VL through transformers (``--annotator DIR``): each pair's back view is shown with
  :data:`PROMPT`; the answer is parsed into a list by :func:`parse_components`. A malformed answer is
  retried once with :data:`RETRY_PROMPT`; if that fails too, the pair keeps no annotations and the raw
  answer is recorded in ``pairs.json`` (``annotation_error``).

``DIR`` is either a Qwen2.5-VL-Instruct folder (``Qwen/Qwen2.5-VL-7B-Instruct``) or a
Qwen-Image-Edit-2511 folder, whose ``text_encoder/`` is Qwen2.5-VL-7B-Instruct's full model (used
only if it holds the language head ``lm_head.weight``) with the tokenizer in ``processor/``.
"""
from __future__ import annotations

import csv
import json
import os
import re
from typing import Any, Callable, Dict, List, Optional

from ..errors import UsageError
from . import layout

__all__ = ["PROMPT", "RETRY_PROMPT", "MalformedAnswer", "parse_components", "chat_text", "QwenAnnotator",
           "annotate_with_retry", "load_annotation_source", "lookup", "prepare_step", "resolve_annotator_dirs"]

PROMPT = (
    "This image shows the back of a 3D object on a transparent background. List the distinct components "
    "or features visible on its back, one per line, each line starting with '- ' and holding a short noun "
    "phrase (at most 12 words) that says the part's shape and position, e.g. '- a curved handle in the "
    "middle'. List only what is visible; no other text."
)
RETRY_PROMPT = (
    "Answer only with a list: one visible component of this object's back per line, each line starting "
    "with '- ', at most 12 words per line, nothing else."
)
MAX_WORDS = 20
MAX_ITEMS = 12


class MalformedAnswer(ValueError):
    """The model's answer holds no list of component descriptions."""


_BULLET = re.compile(r"^\s*(?:[-*\u2022\u2013\u00b7]|\d{1,2}[.)]|\(\d{1,2}\)|[a-z][.)])\s+", re.IGNORECASE)
_REFUSAL = re.compile(r"^\s*(?:i\b|i'm\b|sorry\b|as an ai\b|unfortunately\b|there is no\b|there are no\b|no visible\b)",
                      re.IGNORECASE)
_FENCE = re.compile(r"```(?:json|text|markdown)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def _clean(item: str) -> str:
    item = re.sub(r"\*\*|__|`", "", item)
    item = re.sub(r"^\s*(?:component|feature|part)\s*\d*\s*:\s*", "", item, flags=re.IGNORECASE)
    item = item.strip().strip('"\'').strip()
    item = re.sub(r"[.;,]+$", "", item).strip()
    return " ".join(item.split())


def _from_json(text: str) -> Optional[List[str]]:
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(text[start:end + 1])
    except ValueError:
        return None
    if not isinstance(data, list):
        return None
    out = []
    for x in data:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            out.append(" ".join(str(v) for v in x.values() if isinstance(v, str)))
    return out


def parse_components(text: str) -> List[str]:
    """A model's answer -> component descriptions (unique, in order). Accepts bullet or numbered
    lists (with a heading line), a JSON list (also in a code fence), or one line of items separated
    by ';' or ','. Raises :class:`MalformedAnswer` when none is found."""
    if not isinstance(text, str) or not text.strip():
        raise MalformedAnswer("empty answer")
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    items = _from_json(body)
    if items is None:
        lines = [ln for ln in body.splitlines() if ln.strip()]
        bulleted = [_BULLET.sub("", ln, count=1) for ln in lines if _BULLET.match(ln)]
        if bulleted:
            items = bulleted
        elif _REFUSAL.match(body):
            items = []
        elif len(lines) == 1 and not lines[0].rstrip().endswith(":"):
            line = re.sub(r"^.*?:\s*", "", lines[0]) if ":" in lines[0] else lines[0]
            items = re.split(r"\s*;\s*|\s*,\s*(?:and\s+)?|\s+and\s+(?=(?:a|an|the|two|three|four)\s)", line)
        else:
            items = [ln for ln in lines if not ln.rstrip().endswith(":")]
    out, seen = [], set()
    for item in items:
        c = _clean(item)
        if _REFUSAL.match(c):
            continue
        if not c or len(c.split()) > MAX_WORDS or not re.search(r"[a-zA-Z]{2}", c):
            continue
        if c.lower() not in seen:
            seen.add(c.lower())
            out.append(c)
    if not out:
        raise MalformedAnswer(f"no list of components in the answer: {' '.join(text.split())[:120]!r}")
    return out[:MAX_ITEMS]


def annotate_with_retry(ask: Callable[[str], str], image) -> Dict[str, Any]:
    """``ask(prompt) -> answer`` for one image; parse, retry once. Returns ``{annotations, raw, error}``."""
    raw = ask(PROMPT)
    try:
        return {"annotations": parse_components(raw), "raw": raw, "error": None}
    except MalformedAnswer:
        pass
    raw2 = ask(RETRY_PROMPT)
    try:
        return {"annotations": parse_components(raw2), "raw": raw2, "error": None}
    except MalformedAnswer as e:
        return {"annotations": [], "raw": raw2, "error": f"malformed answer twice: {e}"}


# --------------------------------------------------------------------------------- Qwen2.5-VL
def chat_text(prompt: str) -> str:
    """Qwen2.5-VL's chat format for one image and one user turn, ending where the assistant answers."""
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n")


def resolve_annotator_dirs(folder: str) -> tuple:
    """(model folder, processor folder) of a Qwen2.5-VL-Instruct or Qwen-Image-Edit folder (UsageError)."""
    if not os.path.isdir(folder):
        raise UsageError(f"--annotator {folder}: not a folder (give Qwen2.5-VL-7B-Instruct or Qwen-Image-Edit-2511)")
    if os.path.isdir(os.path.join(folder, "text_encoder")):
        model_dir = os.path.join(folder, "text_encoder")
        proc_dir = os.path.join(folder, "processor") if os.path.isdir(os.path.join(folder, "processor")) else folder
    else:
        model_dir = proc_dir = folder
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UsageError(f"--annotator {folder}: no config.json in {model_dir}")
    if not _has_lm_head(model_dir):
        raise UsageError(f"--annotator {folder}: {model_dir} has no language head (lm_head.weight); "
                         "use Qwen/Qwen2.5-VL-7B-Instruct instead")
    return model_dir, proc_dir


def _has_lm_head(model_dir: str) -> bool:
    with open(os.path.join(model_dir, "config.json"), "r", encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("tie_word_embeddings") or (cfg.get("text_config") or {}).get("tie_word_embeddings"):
        return True
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, "r", encoding="utf-8") as f:
            return any(k.endswith("lm_head.weight") for k in json.load(f).get("weight_map", {}))
    from safetensors import safe_open

    files = [n for n in os.listdir(model_dir) if n.endswith(".safetensors")]
    for n in files:
        with safe_open(os.path.join(model_dir, n), "np") as f:
            if any(k.endswith("lm_head.weight") for k in f.keys()):
                return True
    return False


def _load_processor(folder: str, proc_dir: str):
    """Qwen-Image-Edit's ``processor/`` through the pipeline's loader (no torchvision needed), else
    transformers' AutoProcessor of a Qwen2.5-VL-Instruct folder."""
    if proc_dir == os.path.join(folder, "processor"):
        from ..pipeline import load_processor

        return load_processor(folder)
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(proc_dir)
    except Exception as e:  # transformers' message rarely names the cause
        raise UsageError(f"--annotator {folder}: could not load the Qwen2.5-VL processor ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:160]}); transformers >= 5 needs torchvision for it") from e


class QwenAnnotator:
    """Qwen2.5-VL (transformers) answering :data:`PROMPT` for RGBA renders (composited on white)."""

    def __init__(self, folder: str, device: str = "cpu", dtype: Optional[str] = None, max_new_tokens: int = 96):
        """``folder``: see :func:`resolve_annotator_dirs`; ``dtype`` a torch dtype name (default bf16 on CUDA)."""
        import torch
        from transformers import Qwen2_5_VLForConditionalGeneration

        model_dir, proc_dir = resolve_annotator_dirs(folder)
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
        self.processor = _load_processor(folder, proc_dir)
        self.device, self.max_new_tokens = device, int(max_new_tokens)

    @staticmethod
    def _rgb(image):
        from PIL import Image

        if image.mode == "RGBA":
            bg = Image.new("RGBA", image.size, (255, 255, 255, 255))
            bg.alpha_composite(image)
            image = bg
        return image.convert("RGB")

    def ask(self, image, prompt: str) -> str:
        import torch

        inputs = self.processor(text=[chat_text(prompt)], images=[self._rgb(image)], return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new, skip_special_tokens=True)[0]

    def annotate(self, image) -> Dict[str, Any]:
        return annotate_with_retry(lambda p: self.ask(image, p), image)


# ------------------------------------------------------------------------------ imported
def _parse_list(value: Any) -> List[str]:
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    text = str(value or "").strip()
    if text.startswith("["):
        return [str(v).strip() for v in json.loads(text) if str(v).strip()]
    return [s.strip() for s in text.split(";") if s.strip()]


def _read_rows(path: str) -> List[Dict[str, Any]]:
    if path.lower().endswith(".csv"):
        with open(path, "r", encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    rows = []
    with open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise UsageError(f"--annotations {path}: line {n} is not JSON") from None
    return rows


def load_annotation_source(path: Optional[str], input_dir: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """Imported annotations keyed by ``file`` (as given), its basename and ``sha256``:
    ``{key: {"feature": str|None, "annotations": [...], "per_back": {view file: [...]}}}``."""
    if path is None and input_dir is not None and os.path.isfile(os.path.join(input_dir, "annotations.jsonl")):
        path = os.path.join(input_dir, "annotations.jsonl")
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise UsageError(f"--annotations {path}: file not found (JSONL or CSV, see know3d data annotate --help)")
    table: Dict[str, Dict[str, Any]] = {}
    for n, row in enumerate(_read_rows(path), 1):
        keys = [k for k in (row.get("file"), row.get("sha256")) if k]
        if not keys:
            raise UsageError(f"--annotations {path}: row {n} has neither 'file' nor 'sha256'")
        keys += [os.path.basename(str(row["file"]))] if row.get("file") else []
        try:
            items = _parse_list(row.get("annotations"))
        except ValueError:
            raise UsageError(f"--annotations {path}: row {n}: 'annotations' is not a list") from None
        entry = table.setdefault(str(keys[0]), {"feature": None, "annotations": [], "per_back": {}})
        if row.get("feature"):
            entry["feature"] = str(row["feature"])
        if row.get("back"):
            entry["per_back"][str(row["back"])] = items
        else:
            entry["annotations"] = items
        for k in keys[1:]:
            table[str(k)] = entry
    return table


def lookup(table: Dict[str, Dict[str, Any]], path: str, sha256: str) -> Optional[Dict[str, Any]]:
    return table.get(sha256) or table.get(path) or table.get(os.path.basename(path))


# ------------------------------------------------------------------------------ the step
def prepare_step(ctx) -> Dict[str, Any]:
    """Fill ``pairs.json`` annotations from the imported table or the Qwen annotator (the pairs of
    ``options.annotate_sets``, default every set)."""
    from PIL import Image

    from .steps import StepSkipped

    if not os.path.isfile(ctx.path(layout.PAIRS_FILE)):
        raise StepSkipped(f"no {layout.PAIRS_FILE} yet: run the render step first")
    pairs = ctx.read_json(layout.PAIRS_FILE)
    meta = ctx.cache.get("meta") or {}
    if meta.get("annotations") or meta.get("per_back"):
        for p in pairs:
            p["annotations"] = list(meta.get("per_back", {}).get(p["back"], meta.get("annotations", [])))
            p.pop("annotation_error", None)
        ctx.write_json(layout.PAIRS_FILE, pairs)
        return {"annotation_source": "imported", "annotation_failures": 0}
    if not ctx.options.annotator:
        raise StepSkipped("no annotations: pass --annotations FILE or --annotator QWEN_DIR")
    annotator = ctx.cache.get("annotator")
    if annotator is None:
        annotator = ctx.cache["annotator"] = QwenAnnotator(
            ctx.options.annotator, device=ctx.options.device,
            max_new_tokens=ctx.options.annotate_max_new_tokens)
    sets = tuple(ctx.options.annotate_sets)
    failures = 0
    for p in pairs:
        if p["set"] not in sets:
            continue
        with Image.open(ctx.path(p["back"])) as im:
            result = annotator.annotate(im.convert("RGBA"))
        p["annotations"] = result["annotations"]
        if result["error"]:
            failures += 1
            p["annotation_error"] = {"error": result["error"], "raw": result["raw"][:500]}
        else:
            p.pop("annotation_error", None)
    ctx.write_json(layout.PAIRS_FILE, pairs)
    return {"annotation_source": "qwen2.5-vl", "annotation_failures": failures}
