"""``know3d models``: every file a variant needs, where it goes and where it comes from.

Nothing here loads a network: files are found by name and, for safetensors, by their header (key
names, dtypes, metadata; a few kB read), which also catches truncated downloads; then each network
is built from its config on the meta device and compared with the headers (``model_shapes``). The result tells
the user, for each missing or unusable file, the expected name, the folder it goes in and the public
repository and file it comes from; the CLI runs this before any model is loaded.

``--models DIR`` holds TRELLIS.2 in one of two layouts:

* **official** (``microsoft/TRELLIS.2-4B``): ``DIR/pipeline.json`` + ``DIR/ckpts/NAME.json`` and
  ``NAME.safetensors``; the sparse-structure decoder (from ``microsoft/TRELLIS-image-large``) also in
  ``DIR/ckpts`` (or a sibling ``TRELLIS-image-large/ckpts``); DINOv3 as a folder
  ``DIR/dinov3-vitl16-pretrain-lvd1689m`` (config.json + model.safetensors) or ComfyUI's single file.
* **ComfyUI single files** (``Comfy-Org/TRELLIS.2``), directly in ``DIR`` or in its ComfyUI
  sub-folders: ``diffusion_models/trellis_2_bf16.safetensors`` (all flows),
  ``vae/trellis_2_shape_vae_bf16.safetensors`` (structure + shape decoders) and
  ``clip_vision/dino_v3_vit_l.safetensors``. Any file name works: files are recognised by their keys.

Plus, for the injected variants, a Know3D checkpoint (``--know3d FILE``, or the one
``know3d*.safetensors`` / ``know3d/*.safetensors`` in ``DIR`` (else beside it) trained for the
variant's knowledge kind),
and for every variant but ``none`` a diffusers-format Qwen-Image-Edit-2511 folder (``--qwen DIR``)
and optionally the back-view LoRA (``--lora FILE``).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .plan import (
    COMFY_FILES,
    COMFY_QWEN_FILES,
    COMFY_FLOW_PREFIXES,
    COMFY_TRELLIS_REPO,
    COMFY_VAE_PREFIXES,
    DINOV3_FOLDER,
    DINOV3_REPO,
    FLOW_MODELS,
    GEOMETRY_MODELS,
    OFFICIAL_MODELS,
    PIPELINE_TYPES,
    QWEN_REPO,
    SAFETENSORS_FLOAT_DTYPES,
    SHAPE_FLOWS,
    TRELLIS_REPO,
    VARIANT_KINDS,
    VARIANT_TEXT,
    VARIANTS,
    comfy_file_kind,
    comfy_is_512,
    needs_back_view,
    needs_know3d,
    required_models,
    strip_outer_prefix,
    variant_of,
)
from .safetensors_header import SafetensorsInfo, read_safetensors_header

__all__ = [
    "KNOW3D_SOURCE", "LORA_SOURCE", "FileCheck", "ModelCheck", "ModelCheckError", "SafetensorsInfo",
    "read_safetensors_header", "classify_safetensors", "check_models",
]

KNOW3D_SOURCE = ("not published yet (github.com/xishuxishu/Know3D: weights 'coming soon'); "
                 "use --variant multiview or none, which need no Know3D weights")
LORA_SOURCE = "the Know3D back-view LoRA (not published yet); optional"

_COMFY_SUBFOLDERS = ("", "diffusion_models", "unet", "vae", "clip_vision", "trellis2")


# --------------------------------------------------------------------------------------- results
@dataclass
class FileCheck:
    """One file (or folder) the run needs.

    Attributes:
        role: what it is ("shape flow 512").
        name: expected file name (relative names like ``transformer/config.json`` are allowed).
        folder: the folder it goes in.
        source: where it comes from: ``"<public repository>: <file in it>"`` (or a sentence).
        path: where it was found (None: missing).
        problem: found but unusable (truncated, wrong kind, quantised ...).
        optional: a missing optional file is reported but is not an error.
        key: stable id for the loader (``"shape_slat_flow_model_512"``, ``"dinov3"``, ``"qwen"`` ...).
    """

    role: str
    name: str
    folder: str
    source: str
    path: Optional[str] = None
    problem: Optional[str] = None
    optional: bool = False
    key: str = ""

    @property
    def ok(self) -> bool:
        return self.path is not None and self.problem is None

    def lines(self) -> List[str]:
        if self.ok:
            return [f"  ok       {self.role}: {self.path}"]
        if self.problem is not None:
            return [f"  PROBLEM  {self.role}: {self.path or self.name}", f"           {self.problem}"]
        tag = "optional" if self.optional else "MISSING "
        return [
            f"  {tag} {self.role}: {self.name}",
            f"           goes in: {self.folder}",
            f"           from:    {self.source}",
        ]


@dataclass
class ModelCheck:
    """The outcome of :func:`check_models`.

    Attributes:
        layout: ``"official"`` or ``"comfy"`` (the TRELLIS.2 layout found, or expected).
        files: every file checked, in display order.
        notes: extra lines (alternatives, what the variant means).
    """

    variant: str
    resolution: str
    models_dir: str
    qwen_dir: Optional[str]
    layout: str
    files: List[FileCheck] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def problems(self) -> List[FileCheck]:
        """Files that stop a run: missing required ones and unusable ones."""
        return [f for f in self.files if not f.ok and (f.problem is not None or not f.optional)]

    @property
    def ok(self) -> bool:
        return not self.problems

    def path(self, key: str) -> Optional[str]:
        """Where the file with ``key`` was found (None when missing or unusable)."""
        for f in self.files:
            if f.key == key and f.ok:
                return f.path
        return None

    def paths(self) -> Dict[str, str]:
        """``{key: path}`` of every usable file (what a loader needs)."""
        return {f.key: f.path for f in self.files if f.key and f.ok}

    def summary(self) -> str:
        """One line: ``"all 12 files found"`` / ``"3 model files missing or unusable: ..."``."""
        if self.ok:
            return f"all {sum(f.ok for f in self.files)} model files found"
        bad = self.problems
        if len(bad) == 1 and bad[0].problem is not None:
            return f"{bad[0].role} {bad[0].path}: {bad[0].problem}"
        names = ", ".join(f.name for f in bad[:3]) + (", ..." if len(bad) > 3 else "")
        return f"{len(bad)} model file{'s' if len(bad) != 1 else ''} missing or unusable ({names})"

    def format(self, only_problems: bool = False) -> str:
        """The report printed by ``know3d models`` (``only_problems``: just the bad files)."""
        head = (f"variant {self.variant} ({VARIANT_TEXT[self.variant]}), resolution {self.resolution}; "
                f"TRELLIS.2 layout: {self.layout}")
        out = [head]
        for f in self.files:
            if only_problems and (f.ok or (f.optional and f.problem is None)):
                continue
            out.extend(f.lines())
        out.extend(self.notes)
        if not only_problems:
            out.append(self.summary())
        return "\n".join(out)


class ModelCheckError(Exception):
    """Raised by the CLI when the check fails; ``str()`` is the full report."""

    def __init__(self, check: ModelCheck):
        self.check = check
        super().__init__(check.format(only_problems=True))


# --------------------------------------------------------------------------------------- safetensors
def classify_safetensors(info: SafetensorsInfo) -> Optional[str]:
    """``"know3d"``, ``"comfy_flows"``, ``"comfy_vae"``, ``"dinov3"``, ``"lora"`` or None (unknown)."""
    if info.metadata.get("format") == "know3d":
        return "know3d"
    kind = comfy_file_kind(info.tensors)
    if kind in ("flows", "vae"):
        return f"comfy_{kind}"
    keys = list(strip_outer_prefix(list(info.tensors)))
    if any(k.endswith("attention.o_proj.bias") for k in keys) and any("patch_embeddings" in k for k in keys):
        return "dinov3"
    if any(".lora_" in k or "lora_down" in k for k in keys):
        return "lora"
    return None


# --------------------------------------------------------------------------------------- helpers
def _check_weights_file(fc: FileCheck) -> FileCheck:
    """Fill ``fc.problem`` when the found safetensors file is unreadable or truncated."""
    if fc.path and fc.path.endswith(".safetensors"):
        fc.problem = read_safetensors_header(fc.path).problem
    return fc


def _check_json_file(fc: FileCheck) -> FileCheck:
    if fc.path:
        try:
            with open(fc.path, "r", encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError) as e:
            fc.problem = f"not valid JSON ({e}); download it again"
    return fc


def _file(role: str, folder: str, name: str, source: str, key: str = "", optional: bool = False) -> FileCheck:
    path = os.path.join(folder, name)
    fc = FileCheck(role, name, folder, source, path if os.path.isfile(path) else None, optional=optional, key=key)
    return _check_json_file(fc) if name.endswith(".json") else _check_weights_file(fc)


def _hf(repo: str, file: str) -> str:
    return f"huggingface.co/{repo}  file {file}"


def _scan_safetensors(models_dir: str) -> List[Tuple[str, SafetensorsInfo, Optional[str]]]:
    """(path, header, class) of every .safetensors directly in ``models_dir`` or its ComfyUI sub-folders."""
    out, seen = [], set()
    for sub in _COMFY_SUBFOLDERS:
        for path in sorted(glob.glob(os.path.join(models_dir, sub, "*.safetensors"))):
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            info = read_safetensors_header(path)
            out.append((path, info, classify_safetensors(info) if info.problem is None else None))
    return out


# --------------------------------------------------------------------------------------- TRELLIS.2
def _find_pipeline_dir(models_dir: str) -> Optional[str]:
    for d in (models_dir, os.path.join(models_dir, "TRELLIS.2-4B")):
        if os.path.isfile(os.path.join(d, "pipeline.json")):
            return d
    return None


def _official_candidates(folder: str, reference: str) -> List[str]:
    """Stems where a ``pipeline.json`` reference may live (same order as ``trellis2.loading``)."""
    parts = reference.replace("\\", "/").split("/")
    name = parts[-1]
    if os.path.isabs(reference):
        cands = [reference]
    else:
        cands = [os.path.join(folder, *parts)]
        if len(parts) >= 3 and parts[0] != "ckpts":
            rest = parts[2:]
            cands += [os.path.join(folder, *rest),
                      os.path.join(os.path.dirname(os.path.abspath(folder)), parts[1], *rest),
                      os.path.join(folder, parts[1], *rest)]
    cands.append(os.path.join(folder, "ckpts", name))
    return list(dict.fromkeys(os.path.normpath(c) for c in cands))


def _official_checks(folder: str, keys: Sequence[str]) -> List[FileCheck]:
    checks = [_file("TRELLIS.2 pipeline config", folder, "pipeline.json", _hf(TRELLIS_REPO, "pipeline.json"),
                    key="pipeline_json")]
    references = {k: OFFICIAL_MODELS[k][0] for k in keys}
    pj = checks[0]
    if pj.ok:
        with open(pj.path, "r", encoding="utf-8") as f:
            doc = json.load(f)
        listed = doc.get("args", {}).get("models", {}) if isinstance(doc, dict) else {}
        for k in keys:
            if k in listed:
                references[k] = str(listed[k])
            else:
                pj.problem = f"lists no model {k!r}: not a TRELLIS.2-4B pipeline.json; download it again"
    for k in keys:
        ref = references[k]
        _, repo, role = OFFICIAL_MODELS[k]
        name = ref.replace("\\", "/").split("/")[-1]
        stem = next((c for c in _official_candidates(folder, ref)
                     if os.path.isfile(c + ".json") and os.path.isfile(c + ".safetensors")), None)
        target = os.path.dirname(stem) if stem else os.path.join(folder, "ckpts")
        for ext in (".json", ".safetensors"):
            fc = _file(f"{role} ({ext[1:]})", target, name + ext, _hf(repo, f"ckpts/{name}{ext}"),
                       key=k + ("" if ext == ".safetensors" else "_json"))
            checks.append(fc)
    return checks


def _comfy_flow_keys(info: SafetensorsInfo) -> set:
    """Pipeline keys of the flows a ComfyUI diffusion file holds (``is_512`` metadata: its
    ``img2shape.`` weights are the 512 model, as ComfyUI reads it)."""
    keys = list(strip_outer_prefix(list(info.tensors)))
    is_512 = comfy_is_512(info.metadata)
    found = set()
    for prefix, key in COMFY_FLOW_PREFIXES.items():
        if key in GEOMETRY_MODELS and any(k.startswith(prefix) for k in keys):
            found.add(SHAPE_FLOWS["512"] if prefix == "img2shape." and is_512 else key)
    return found


def _comfy_checks(models_dir: str, scanned, keys: Sequence[str]) -> List[FileCheck]:
    """The flows (one or more diffusion files) and the shape VAE (structure + shape decoders)."""
    checks = []
    name, sub, role = COMFY_FILES["flows"]
    fc = FileCheck(role, name, os.path.join(models_dir, sub), _hf(COMFY_TRELLIS_REPO, f"{sub}/{name}"),
                   key="comfy_flows")
    needed = [k for k in keys if k in FLOW_MODELS]
    files = [(p, info, _comfy_flow_keys(info)) for p, info, c in scanned if c == "comfy_flows"]
    usable = [(p, info, ks) for p, info, ks in files if _dtypes_ok(info)]
    if files:
        fc.path = max(files, key=lambda f: (_dtypes_ok(f[1]), len(f[2] & set(needed))))[0]
        covered = set().union(*(ks for _, _, ks in usable)) if usable else set()
        lacking = [k for k in needed if k not in covered]
        quantised = [(p, info) for p, info, ks in files if not _dtypes_ok(info) and ks & set(lacking)]
        if quantised:
            p, info = quantised[0]
            fc.path = p
            fc.problem = (f"quantised weights ({', '.join(sorted(_dtypes(info) - SAFETENSORS_FLOAT_DTYPES))}) are not "
                          f"supported; use the bf16 file {name} from {COMFY_TRELLIS_REPO}")
        elif lacking:
            fc.problem = (f"no ComfyUI diffusion file here holds the {', '.join(lacking)} weights; "
                          f"use {name} from {COMFY_TRELLIS_REPO}")
    checks.append(fc)
    name, sub, role = COMFY_FILES["vae"]
    fc = FileCheck(role, name, os.path.join(models_dir, sub), _hf(COMFY_TRELLIS_REPO, f"{sub}/{name}"),
                   key="comfy_vae")
    found = [(p, info) for p, info, c in scanned if c == "comfy_vae"]
    if found:
        def has(info, prefix):
            return any(k.startswith(prefix) for k in strip_outer_prefix(list(info.tensors)))

        path, info = max(found, key=lambda f: sum(has(f[1], p) for p in COMFY_VAE_PREFIXES))
        fc.path = path
        lacking = [p.rstrip(".") for p in COMFY_VAE_PREFIXES if not has(info, p)]
        if lacking:
            fc.problem = f"lacks the {', '.join(lacking)} weights; use {name} from {COMFY_TRELLIS_REPO}"
        elif not _dtypes_ok(info):
            fc.problem = f"unsupported weight dtypes {sorted(_dtypes(info) - SAFETENSORS_FLOAT_DTYPES)}"
    checks.append(fc)
    return checks


def _dtypes(info: SafetensorsInfo) -> set:
    return {d for d, _ in info.tensors.values()}


def _dtypes_ok(info: SafetensorsInfo) -> bool:
    return _dtypes(info) <= SAFETENSORS_FLOAT_DTYPES


def _dinov3_check(models_dir: str, scanned, dinov3: Optional[str] = None) -> FileCheck:
    if dinov3 is not None:
        return _explicit_dinov3(dinov3)
    folder_cands = [os.path.join(models_dir, DINOV3_FOLDER),
                    os.path.join(os.path.dirname(os.path.abspath(models_dir)), DINOV3_FOLDER),
                    os.path.join(models_dir, "facebook", DINOV3_FOLDER)]
    for d in folder_cands:
        if os.path.isfile(os.path.join(d, "config.json")) and os.path.isfile(os.path.join(d, "model.safetensors")):
            fc = FileCheck("DINOv3 image encoder", "model.safetensors", d, _hf(DINOV3_REPO, "model.safetensors"),
                           path=d, key="dinov3")
            fc.problem = read_safetensors_header(os.path.join(d, "model.safetensors")).problem
            return fc
    single = [p for p, _, c in scanned if c == "dinov3"]
    if single:
        return FileCheck("DINOv3 image encoder", COMFY_FILES["dinov3"][0], os.path.dirname(single[0]),
                         _hf(COMFY_TRELLIS_REPO, "clip_vision/dino_v3_vit_l.safetensors"), path=single[0], key="dinov3")
    return FileCheck(
        "DINOv3 image encoder", "config.json + model.safetensors", folder_cands[0],
        f"{_hf(DINOV3_REPO, 'config.json, model.safetensors')} (gated: accept Meta's licence first); "
        f"or the single file clip_vision/dino_v3_vit_l.safetensors of {COMFY_TRELLIS_REPO} "
        f"into {os.path.join(models_dir, 'clip_vision')}",
        key="dinov3")


def _explicit_dinov3(path: str) -> FileCheck:
    """``--dinov3``: a folder (config.json + model.safetensors) or a single .safetensors file."""
    if os.path.isdir(path):
        fc = FileCheck("DINOv3 image encoder", "config.json + model.safetensors", path,
                       _hf(DINOV3_REPO, "config.json, model.safetensors") + " (gated: accept Meta's licence first)",
                       key="dinov3")
        missing = [n for n in ("config.json", "model.safetensors") if not os.path.isfile(os.path.join(path, n))]
        if missing:
            fc.name = " + ".join(missing)
            return fc
        fc.path = path
        fc.problem = read_safetensors_header(os.path.join(path, "model.safetensors")).problem
        return fc
    return _given_file("DINOv3 image encoder", path, "--dinov3", "dinov3",
                       "not a DINOv3 ViT checkpoint (no attention.o_proj / patch_embeddings keys)")


def _given_file(label: str, path: str, option: str, kind: str, wrong_kind: str) -> FileCheck:
    """A file named on the command line: found, readable, and of the expected kind
    (``classify_safetensors``), else its ``problem`` says which."""
    fc = FileCheck(label, os.path.basename(path), os.path.dirname(os.path.abspath(path)),
                   f"the file given with {option}", key=kind)
    if os.path.isfile(path):
        fc.path = path
        info = read_safetensors_header(path)
        fc.problem = info.problem
        if fc.problem is None and classify_safetensors(info) != kind:
            fc.problem = wrong_kind
    return fc


# --------------------------------------------------------------------------------------- Know3D, Qwen, LoRA
def _know3d_spec(info: SafetensorsInfo) -> Tuple[Optional[str], Optional[List[int]], Optional[float]]:
    meta = info.metadata
    try:
        layers = json.loads(meta.get("mmdit_layers", "null"))
        sigma = json.loads(meta.get("sigma", "null"))
    except ValueError:
        layers, sigma = None, None
    return meta.get("knowledge_kind"), layers, sigma


def _know3d_check(models_dir: str, variant: str, know3d: Optional[str], scanned,
                  sigma: Optional[float], layers: Optional[Sequence[int]]) -> FileCheck:
    kind = VARIANT_KINDS[variant]
    fc = FileCheck(f"Know3D checkpoint ({kind})", f"know3d_{variant}.safetensors (any name)",
                   os.path.join(models_dir, "know3d"), KNOW3D_SOURCE, key="know3d")
    if know3d is not None:
        fc.name, fc.folder = os.path.basename(know3d), os.path.dirname(os.path.abspath(know3d))
        if not os.path.isfile(know3d):
            fc.source = "the file given with --know3d"
            return fc
        candidates = [(know3d, read_safetensors_header(know3d))]
    else:
        parent = os.path.dirname(models_dir)
        paths = sorted(set(glob.glob(os.path.join(models_dir, "know3d*.safetensors"))
                           + glob.glob(os.path.join(models_dir, "know3d", "*.safetensors"))))
        if not paths:  # beside the TRELLIS.2 folder, like a sibling repository folder
            paths = sorted(set(glob.glob(os.path.join(parent, "know3d*.safetensors"))
                               + glob.glob(os.path.join(parent, "know3d", "*.safetensors"))))
        candidates = [(p, read_safetensors_header(p)) for p in paths]
        candidates += [(p, info) for p, info, c in scanned if c == "know3d" and p not in paths]
    if not candidates:
        return fc
    matching = [(p, i) for p, i in candidates if i.problem is None and i.metadata.get("knowledge_kind") == kind]
    if know3d is None and len(matching) > 1:
        fc.path = matching[0][0]
        fc.problem = (f"{len(matching)} Know3D checkpoints for {kind} in {models_dir}: "
                      f"choose one with --know3d FILE ({', '.join(os.path.basename(p) for p, _ in matching)})")
        return fc
    path, info = matching[0] if matching else candidates[0]
    fc.path = path
    if info.problem is not None:
        fc.problem = info.problem
    elif info.metadata.get("format") != "know3d":
        fc.problem = "not a Know3D checkpoint (its safetensors metadata has no format=know3d)"
    elif not matching:
        got = info.metadata.get("knowledge_kind")
        fc.problem = (f"trained for {got} knowledge, but --variant {variant} injects {kind}; use --variant "
                      f"{variant_of(got)} with this file, or a checkpoint trained for {kind}")
    else:
        _, ck_layers, ck_sigma = _know3d_spec(info)
        if sigma is not None and ck_sigma is not None and abs(float(sigma) - float(ck_sigma)) > 1e-6:
            fc.problem = f"trained with hidden states at sigma {ck_sigma}, but --sigma {sigma} was given (leave it out)"
        elif layers is not None and ck_layers is not None and list(layers) != list(ck_layers):
            fc.problem = f"trained on MMDiT layers {ck_layers}, but --layers {list(layers)} was given (leave it out)"
    return fc


def _qwen_weights(folder: str, sub: str, stem: str, role: str, sharded: bool) -> List[FileCheck]:
    """Weights of one component: a single file, or an index and its shards (``sharded``: how the
    public repository stores it, used in the message when nothing is there)."""
    d = os.path.join(folder, sub)
    single = os.path.join(d, f"{stem}.safetensors")
    index = os.path.join(d, f"{stem}.safetensors.index.json")
    if os.path.isfile(single) or not os.path.isfile(index):
        fc = _file(f"{role} weights", d, f"{stem}.safetensors", _hf(QWEN_REPO, f"{sub}/{stem}.safetensors"),
                   key=f"qwen_{sub}")
        if fc.path is None and sharded:
            fc.name = f"{stem}.safetensors.index.json + the shards it lists"
            fc.source = _hf(QWEN_REPO, f"{sub}/{stem}-*.safetensors and {sub}/{stem}.safetensors.index.json")
        return [fc]
    checks = [_file(f"{role} weight index", d, f"{stem}.safetensors.index.json",
                    _hf(QWEN_REPO, f"{sub}/{stem}.safetensors.index.json"), key=f"qwen_{sub}")]
    if checks[0].ok:
        with open(index, "r", encoding="utf-8") as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        for s in shards:
            checks.append(_file(f"{role} shard", d, s, _hf(QWEN_REPO, f"{sub}/{s}")))
    return checks


def _qwen_checks(qwen_dir: Optional[str], files: Dict[str, str]) -> List[FileCheck]:
    """The --qwen folder's files; a component in ``files`` (``mmdit.comfy_files``: ComfyUI's single
    file given with --qwen-transformer / --qwen-text-encoder) is read from there (its config stays)."""
    folder = qwen_dir if qwen_dir else "<the folder given with --qwen>"
    checks: List[FileCheck] = []
    for sub, name, role in (
        ("transformer", "config.json", "Qwen MMDiT config"),
        ("vae", "config.json", "Qwen VAE config"),
        ("text_encoder", "config.json", "Qwen2.5-VL text encoder config"),
        ("scheduler", "scheduler_config.json", "Qwen scheduler config"),
        ("processor", "preprocessor_config.json", "Qwen2.5-VL image processor config"),
    ):
        checks.append(_file(role, os.path.join(folder, sub), name, _hf(QWEN_REPO, f"{sub}/{name}")))
        if sub in files:
            given = files[sub]
            checks.append(FileCheck(f"{COMFY_QWEN_FILES[sub][2]}", os.path.basename(given),
                                    os.path.dirname(os.path.abspath(given)),
                                    f"the file given with --qwen-{sub.replace('_', '-')}",
                                    path=given if os.path.isfile(given) else None, key=f"qwen_{sub}"))
        elif sub == "transformer":
            checks += _qwen_weights(folder, sub, "diffusion_pytorch_model", "Qwen MMDiT", sharded=True)
        elif sub == "vae":
            checks += _qwen_weights(folder, sub, "diffusion_pytorch_model", "Qwen VAE", sharded=False)
        elif sub == "text_encoder":
            checks += _qwen_weights(folder, sub, "model", "Qwen2.5-VL text encoder", sharded=True)
    pdir = os.path.join(folder, "processor")
    tok = next((n for n in ("tokenizer.json", "vocab.json") if os.path.isfile(os.path.join(pdir, n))), None)
    checks.append(FileCheck("Qwen2.5-VL tokenizer", tok or "tokenizer.json", pdir,
                            _hf(QWEN_REPO, "processor/tokenizer.json (+ tokenizer_config.json)"),
                            path=os.path.join(pdir, tok) if tok else None))
    if qwen_dir:
        checks.insert(0, FileCheck("Qwen-Image-Edit-2511 folder (diffusers format)", os.path.basename(
            os.path.normpath(qwen_dir)), os.path.dirname(os.path.abspath(qwen_dir)), _hf(QWEN_REPO, "(whole repo)"),
            path=qwen_dir if os.path.isdir(qwen_dir) else None, key="qwen"))
    return checks


def _lora_check(lora: Optional[str]) -> FileCheck:
    if lora is None:
        return FileCheck("back-view LoRA", "--lora FILE", "(anywhere)", LORA_SOURCE, optional=True, key="lora")
    return _given_file("back-view LoRA", lora, "--lora", "lora",
                       "holds no LoRA factors (lora_A/lora_B or lora_down/lora_up keys)")


# --------------------------------------------------------------------------------------- entry point
def check_models(
    models_dir: str,
    qwen_dir: Optional[str] = None,
    variant: str = "hidden",
    resolution: str = "1024_cascade",
    lora: Optional[str] = None,
    know3d: Optional[str] = None,
    sigma: Optional[float] = None,
    layers: Optional[Sequence[int]] = None,
    dinov3: Optional[str] = None,
    shapes: bool = True,
    qwen_files: Optional[Dict[str, str]] = None,
) -> ModelCheck:
    """Check every file ``variant`` at ``resolution`` needs; never raises for missing files.

    Args:
        models_dir: ``--models`` (TRELLIS.2 official folder or ComfyUI single files, DINOv3, Know3D).
        qwen_dir: ``--qwen`` (diffusers Qwen-Image-Edit-2511 folder); ignored for ``none``.
        lora, know3d, dinov3: explicit files (``--lora``, ``--know3d``, ``--dinov3``).
        sigma, layers: user overrides, checked against the Know3D checkpoint's own values.
        shapes: also build every network from its config on the meta device and compare its keys,
            shapes and dtypes with the safetensors headers (``model_shapes.check_shapes``; no
            weight is read). False: names and headers only.
    """
    if variant not in VARIANT_KINDS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if resolution not in PIPELINE_TYPES:
        raise ValueError(f"unknown resolution {resolution!r}; choose from {', '.join(PIPELINE_TYPES)}")
    models_dir = os.path.abspath(models_dir)
    keys = required_models(resolution)
    scanned = _scan_safetensors(models_dir) if os.path.isdir(models_dir) else []
    pipeline_dir = _find_pipeline_dir(models_dir)
    comfy = any(c in ("comfy_flows", "comfy_vae") for _, _, c in scanned)
    layout = "official" if pipeline_dir or not comfy else "comfy"
    check = ModelCheck(variant, resolution, models_dir, qwen_dir, layout)
    if not os.path.isdir(models_dir):
        check.notes.append(f"  note: --models {models_dir} does not exist")
    if layout == "official":
        check.files += _official_checks(pipeline_dir or models_dir, keys)
        if not pipeline_dir:
            check.notes.append(
                f"  or, instead of the official layout, ComfyUI's single files from {COMFY_TRELLIS_REPO}: "
                + ", ".join(f"{sub}/{n}" for n, sub, _ in COMFY_FILES.values()) + f" (into {models_dir})")
    else:
        check.files += _comfy_checks(models_dir, scanned, keys)
    check.files.append(_dinov3_check(models_dir, scanned, dinov3))
    if needs_know3d(variant):
        check.files.append(_know3d_check(models_dir, variant, know3d, scanned, sigma, layers))
    elif know3d is not None:
        check.notes.append(f"  note: --variant {variant} uses no Know3D weights; --know3d is ignored")
    if needs_back_view(variant):
        check.files += _qwen_checks(qwen_dir, qwen_files or {})
        check.files.append(_lora_check(lora))
    if shapes:
        from .model_shapes import check_shapes

        check_shapes(check)
    return check
