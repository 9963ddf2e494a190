"""Tiny TRELLIS.2 texture networks added to a tiny official-layout folder (``tiny.write_tiny_trellis2``).

``write_tiny_texture(folder)`` writes the two texture flows (the folder's shape flow config with
in_channels 64: noisy texture latent + shape latent) and the texture decoder
(``tex_decoder.TINY_ARGS``, all F16 like the official file) under their official file names, and
adds them, ``tex_slat_sampler`` (the official settings) and ``tex_slat_normalization`` to
``pipeline.json``.
"""
from __future__ import annotations

import json
import os

import torch

from ..fileio import atomic_write_bytes
from ..plan import OFFICIAL_MODELS, SHAPE_FLOWS, TEX_DECODER, TEX_FLOWS
from .comfy_files import DEFAULT_PIPELINE_CONFIG
from .loading import read_model_json
from .tex_decoder import TINY_ARGS as TEX_DECODER_ARGS
from .tex_decoder import SparseUnetVaeDecoder
from .slat_flow import SLatFlowModel
from .tiny import random_state_dict, write_checkpoint

__all__ = ["write_tiny_texture", "TEX_SAMPLER"]

# pipeline.json "tex_slat_sampler" of microsoft/TRELLIS.2-4B (one table: sampling.OFFICIAL_SAMPLER_PARAMS).
TEX_SAMPLER = DEFAULT_PIPELINE_CONFIG.samplers["tex_slat_sampler"]


def write_tiny_texture(folder: str, seed: int = 0) -> str:
    """Add tiny random texture flows + decoder to the tiny TRELLIS.2 ``folder``. Returns ``folder``."""
    path = os.path.join(folder, "pipeline.json")
    with open(path, "r", encoding="utf-8") as f:
        doc = json.load(f)
    models = doc["args"]["models"]
    for i, size in enumerate(("512", "1024")):
        shape_ref = models[SHAPE_FLOWS[size]].rsplit("/", 1)[-1]
        _, args = read_model_json(os.path.join(folder, "ckpts", shape_ref + ".json"))
        args = {**args, "in_channels": 64, "out_channels": 32}
        model = SLatFlowModel(**args)
        ref = OFFICIAL_MODELS[TEX_FLOWS[size]][0]
        write_checkpoint(os.path.join(folder, "ckpts", ref.rsplit("/", 1)[-1]), "ElasticSLatFlowModel", args,
                         random_state_dict(model, seed * 1000 + 700 + i), torch.bfloat16)
        models[TEX_FLOWS[size]] = ref
    decoder = SparseUnetVaeDecoder(**TEX_DECODER_ARGS)
    ref = OFFICIAL_MODELS[TEX_DECODER][0]
    write_checkpoint(os.path.join(folder, "ckpts", ref.rsplit("/", 1)[-1]), "SparseUnetVaeDecoder", TEX_DECODER_ARGS,
                     random_state_dict(decoder, seed * 1000 + 710), torch.float16)
    models[TEX_DECODER] = ref
    gen = torch.Generator().manual_seed(seed * 1000 + 998)
    doc["args"]["tex_slat_sampler"] = TEX_SAMPLER
    doc["args"]["tex_slat_normalization"] = {"mean": (0.1 * torch.randn(32, generator=gen)).tolist(),
                                             "std": (0.5 + torch.rand(32, generator=gen)).tolist()}
    atomic_write_bytes(path, json.dumps(doc, indent=4).encode("utf-8"))
    return folder
