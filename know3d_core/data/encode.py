"""``encode`` step of ``know3d data prepare``: dual grids -> shape latents, occupancy -> SS latent.

As TRELLIS.2's data toolkit (``encode_shape_latent.py``, ``encode_ss_latent.py``) and trainers read them:

* shape latent: the dual grid as the toolkit stores it (dual vertices ``uint8(255 * dual) / 255``)
  -> ``FlexiDualGridVaeEncoder`` (checkpoint ``shape_enc_next_dc_f16c32_fp16``) -> posterior mean
  ``[M, 32]`` on the token grid (``coords // 16``) -> ``(z - mean) / std`` with the
  ``shape_slat_normalization`` of the TRELLIS.2 folder's ``pipeline.json`` (the values of the
  reference's shape-flow config, which its ``SLat`` dataset applies on load);
* SS latent: the 64^3 occupancy (the 1024 shape latent's tokens when 1024 is prepared, else
  ``occupancy_64.safetensors`` of the voxelize step) -> ``SparseStructureEncoder``
  (``ss_enc_conv3d_16l8_fp16``) -> posterior mean ``[8, 16, 16, 16]``, stored as is: the reference's
  structure-flow config has no normalisation (``normalization=None`` in its dataset).

The encoders are found from the TRELLIS.2-4B folder given to prepare (``--trellis2``; the SS encoder
in a sibling ``TRELLIS-image-large`` folder or in ``ckpts/``), loaded strictly, once per run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from . import layout

__all__ = ["Encoders", "load_encoders", "toolkit_dual", "encode_shape", "encode_ss", "prepare_step"]


@dataclass
class Encoders:
    """Both encoders on one device with the shape-latent normalisation (``mean``, ``std`` ``[32]``)."""

    shape: torch.nn.Module
    ss: torch.nn.Module
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.mean.device


def load_encoders(folder: str, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> Encoders:
    """Load both encoders for a TRELLIS.2-4B ``folder`` (strict). ``dtype`` None: the checkpoints'
    fp16 body on CUDA, fp32 elsewhere (fp16 matmuls are slow on CPUs)."""
    from ..trellis2 import shape_encoder, sparse_structure_encoder
    from ..trellis2.loading import load_model, read_pipeline_config, resolve_checkpoint

    dev = torch.device(device)
    if dtype is None and dev.type != "cuda":
        dtype = torch.float32
    mean, std = read_pipeline_config(folder).normalization("shape_slat_normalization")
    shape = load_model(resolve_checkpoint(folder, shape_encoder.CHECKPOINT_REFERENCE, "shape encoder"), dtype, dev)
    ss = load_model(resolve_checkpoint(folder, sparse_structure_encoder.CHECKPOINT_REFERENCE, "SS encoder"), dtype, dev)
    return Encoders(shape, ss, mean.to(dev), std.to(dev))


def toolkit_dual(dual_vertices: torch.Tensor) -> torch.Tensor:
    """Dual vertices as the reference encoder sees them: stored as ``uint8(255 * clamp(dual, 0, 1))``
    (truncation, ``dual_grid.py``) and read back ``/ 255`` (``encode_shape_latent.py``)."""
    return (dual_vertices.clamp(0, 1) * 255).to(torch.uint8).float() / 255


@torch.no_grad()
def encode_shape(enc: Encoders, coords: torch.Tensor, dual_vertices: torch.Tensor, intersected: torch.Tensor,
                 resolution: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One dual grid -> (token coords ``[M, 3]`` int32, normalised latent ``[M, 32]`` float32), CPU."""
    z = enc.shape.encode(coords, toolkit_dual(dual_vertices), intersected, resolution)
    feats = (z.feats.float() - enc.mean) / enc.std
    return z.coords[:, 1:].int().cpu(), feats.cpu()


@torch.no_grad()
def encode_ss(enc: Encoders, occupancy: torch.Tensor) -> torch.Tensor:
    """Occupancy ``[64, 64, 64]`` bool -> SS latent ``[8, 16, 16, 16]`` float32 (CPU, not normalised)."""
    x = occupancy.to(enc.device, torch.float32)[None, None]
    return enc.ss(x)[0].float().cpu()


def _encoders(ctx) -> Encoders:
    from .steps import StepSkipped

    enc = ctx.cache.get("encoders")
    if enc is None:
        folder = ctx.options.trellis2
        if not folder:
            raise StepSkipped("no TRELLIS.2 folder given (--trellis2 DIR with ckpts/shape_enc_next_dc_f16c32_fp16 "
                              "and TRELLIS-image-large's ss_enc_conv3d_16l8_fp16)")
        enc = ctx.cache["encoders"] = load_encoders(folder, ctx.options.device)
    return enc


def prepare_step(ctx) -> Dict:
    """Write ``shape_latent_<res>`` for every prepared resolution and ``ss_latent``; returns the token
    counts for the record (``{"tokens": {"256": M, ...}}``)."""
    from safetensors.torch import load_file

    from .voxelize import read_dual_grid

    enc = _encoders(ctx)
    tokens, occupancy = {}, None
    for res in sorted(ctx.options.resolutions):
        path = ctx.path(layout.dual_grid_file(res))
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: run the voxelize step first (--only voxelize,encode)")
        coords, feats = encode_shape(enc, *read_dual_grid(path), res)
        ctx.write_tensors(layout.shape_latent_file(res), {layout.KEY_COORDS: coords, layout.KEY_FEATS: feats})
        tokens[str(res)] = coords.shape[0]
        if res == 16 * layout.OCCUPANCY_RESOLUTION:  # the reference's source of the structure input
            occupancy = torch.zeros((layout.OCCUPANCY_RESOLUTION,) * 3, dtype=torch.bool)
            occupancy[coords[:, 0].long(), coords[:, 1].long(), coords[:, 2].long()] = True
    if occupancy is None:
        occupancy = load_file(ctx.path(layout.OCCUPANCY_FILE))[layout.KEY_OCCUPANCY].bool()
    ctx.write_tensors(layout.SS_LATENT_FILE, {layout.KEY_LATENT: encode_ss(enc, occupancy)})
    return {"tokens": tokens}
