"""How long ``know3d models`` takes on a real-size TRELLIS.2-4B folder (issue 16: under 2 s).

Writes the official layout (pipeline.json + ckpts/*.json + *.safetensors) and DINOv3 ViT-L/16 with
the real configs, keys, shapes and storage dtypes (flows BF16, shape decoder F16, structure decoder
F16 with F32 first/last layers, DINOv3 F32): each file has its real header and its real size, ~10 GB
in all, but its data region is a hole (a sparse file of zeros), since the check reads headers only
(``tests/test_validate_models.py`` asserts that). Then times, each in a fresh process:

* ``python -c "import know3d_core.model_check"``: the interpreter and the import (the floor);
* the imports the shape stage needs (torch, the network modules, transformers' DINOv3);
* ``know3d models --variant none``: finding the files, reading the headers, building every network on
  the meta device and comparing (``model_shapes``), printing the report;
* the same in-process, split into the file stage and the shape stage (warm imports).

``python benchmarks/bench_model_check.py [--folder DIR] [--out results.json]`` (CPU only).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from _common import SHAPE_DECODER_FULL, SS_DECODER_FULL, write_json  # noqa: E402

_DTYPE_NAMES = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16", "torch.complex64": "C64"}
_SIZES = {"F32": 4, "BF16": 2, "F16": 2, "C64": 8}


def _write_sparse_safetensors(path: str, entries) -> int:
    """A valid safetensors file of ``entries`` = [(key, dtype, shape)] whose data is a hole; its size."""
    header, offset = {}, 0
    for key, dtype, shape in entries:
        n = _SIZES[dtype]
        for s in shape:
            n *= int(s)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def _entries(model, stored):
    """[(key, stored dtype, shape)] of a meta model; ``stored(key, dtype name)`` picks the file dtype."""
    return [(k, stored(k, _DTYPE_NAMES[str(v.dtype)]), tuple(v.shape)) for k, v in model.state_dict().items()]


def write_real_size_folder(folder: str) -> dict:
    """The real-size TRELLIS.2-4B folder (+ DINOv3 beside it); returns {file: bytes}."""
    from know3d_core.conditioning.dinov3 import DINOV3_VITL16_CONFIG, _transformers_classes
    from know3d_core.trellis2.loading import FULL_SIZE_FLOW_CONFIGS, build_model
    from know3d_core.trellis2.tiny import OFFICIAL_MODEL_REFERENCES

    import torch

    ckpts = os.path.join(folder, "TRELLIS.2-4B", "ckpts")
    os.makedirs(ckpts, exist_ok=True)
    with open(os.path.join(folder, "TRELLIS.2-4B", "pipeline.json"), "w", encoding="utf-8") as f:
        json.dump({"name": "Trellis2ImageTo3DPipeline", "args": {"models": OFFICIAL_MODEL_REFERENCES}}, f)
    configs = {key: FULL_SIZE_FLOW_CONFIGS[key] for key in
               ("sparse_structure_flow_model", "shape_slat_flow_model_512", "shape_slat_flow_model_1024")}
    configs["sparse_structure_decoder"] = ("SparseStructureDecoder", SS_DECODER_FULL)
    configs["shape_slat_decoder"] = ("FlexiDualGridVaeDecoder", SHAPE_DECODER_FULL)
    sizes = {}
    for key, (name, args) in configs.items():
        model = build_model(name, args, device="meta", empty=True)
        if "flow" in key:
            stored = lambda k, d: "BF16"  # noqa: E731  (all BF16, research/trellis2.md section 5)
        elif key == "shape_slat_decoder":
            stored = lambda k, d: "F16"  # noqa: E731
        else:
            stored = lambda k, d: "F32" if k.startswith(("input_layer.", "out_layer.")) else "F16"  # noqa: E731
        stem = os.path.join(ckpts, OFFICIAL_MODEL_REFERENCES[key].split("/")[-1])
        with open(stem + ".json", "w", encoding="utf-8") as f:
            json.dump({"name": name, "args": args}, f)
        sizes[os.path.basename(stem)] = _write_sparse_safetensors(stem + ".safetensors", _entries(model, stored))
    config_cls, model_cls = _transformers_classes()
    dino = os.path.join(folder, "dinov3-vitl16-pretrain-lvd1689m")
    os.makedirs(dino, exist_ok=True)
    with torch.device("meta"):
        model = model_cls(config_cls.from_dict(dict(DINOV3_VITL16_CONFIG)))
    with open(os.path.join(dino, "config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(DINOV3_VITL16_CONFIG), f)
    sizes["dinov3"] = _write_sparse_safetensors(os.path.join(dino, "model.safetensors"),
                                                _entries(model, lambda k, d: "F32"))
    return sizes


def _process_seconds(code: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", help="where to write the real-size folder (default: a temporary one, deleted)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="JSON results")
    args = p.parse_args()
    folder = args.folder or tempfile.mkdtemp(prefix="know3d-realsize-")
    try:
        sizes = write_real_size_folder(folder)
        models = os.path.join(folder, "TRELLIS.2-4B")
        floor = _process_seconds("import know3d_core.model_check", args.repeats)
        imports = _process_seconds("import torch, know3d_core.model_shapes, know3d_core.trellis2.loading; "
                                   "from transformers import DINOv3ViTModel", args.repeats)
        cli = _process_seconds(
            f"import sys; from know3d_core.cli import main; sys.exit(main(['models', '--models', {models!r}, "
            "'--variant', 'none']))", args.repeats)

        from know3d_core.model_check import check_models
        from know3d_core.model_shapes import check_shapes

        check_shapes(check_models(models, None, "none", shapes=False))  # warm the imports
        t0 = time.perf_counter()
        check = check_models(models, None, "none", shapes=False)
        t1 = time.perf_counter()
        check_shapes(check)
        t2 = time.perf_counter()
        assert check.ok, check.format()
        from know3d_core.safetensors_header import read_safetensors_header

        n_keys = sum(len(read_safetensors_header(os.path.join(d, n)).tensors) for d, _, names in os.walk(folder)
                     for n in names if n.endswith(".safetensors"))
        result = {
            "what": "know3d models --variant none on a real-size TRELLIS.2-4B folder + DINOv3 ViT-L/16 "
                    "(real headers and file sizes, sparse data)",
            "device": "CPU only (no GPU used); " + os.uname().machine + f", {os.cpu_count()} cores",
            "file_bytes": sizes, "total_gb": round(sum(sizes.values()) / 1e9, 2), "header_keys": n_keys,
            "process_import_floor_s": round(floor, 3), "process_imports_torch_transformers_s": round(imports, 3),
            "process_know3d_models_s": round(cli, 3),
            "in_process_files_s": round(t1 - t0, 3), "in_process_shapes_s": round(t2 - t1, 3),
        }
        print(json.dumps(result, indent=1))
        write_json(args.out, result)
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
