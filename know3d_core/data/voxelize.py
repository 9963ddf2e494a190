"""``voxelize`` step of ``know3d data prepare``: normalised mesh -> O-Voxel dual grids + 64^3 occupancy.

Per asset, for each resolution of ``--resolutions`` (256 / 512 / 1024):
``dual_grid_<res>.safetensors`` from :func:`know3d_core.trellis2.mesh_to_dual_grid.mesh_to_flexible_dual_grid`
(the reference converter's computation, weights as TRELLIS.2's ``data_toolkit/dual_grid.py``), and
``occupancy_64.safetensors``: the 64^3 cells holding a voxel of the finest grid
(``coords // (res / 64)``; at 1024 exactly the shape latent's tokens, which is how the reference's
``encode_ss_latent.py`` builds the structure input). File names and keys: :mod:`.layout`.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

from . import layout

__all__ = ["voxelize", "dual_grid_tensors", "read_dual_grid", "prepare_step"]


def voxelize(vertices, faces, resolutions: Iterable[int], device: Optional[str] = None):
    """Mesh (``[V, 3]`` in ``[-0.5, 0.5]^3``, faces ``[F, 3]``; numpy or torch) -> (``{res: DualGrid}``,
    occupancy ``[64, 64, 64]`` bool from the finest grid), all on the CPU."""
    from ..trellis2.mesh_to_dual_grid import mesh_to_flexible_dual_grid, occupancy_from_coords

    v = torch.as_tensor(vertices).float()
    f = torch.as_tensor(faces).long()
    grids = {}
    for res in sorted(set(int(r) for r in resolutions)):
        if res % layout.OCCUPANCY_RESOLUTION:
            raise ValueError(f"voxelize: resolution {res} is not a multiple of {layout.OCCUPANCY_RESOLUTION}")
        g = mesh_to_flexible_dual_grid(v, f, res, device=device)
        g.coords, g.dual_vertices, g.intersected = g.coords.cpu(), g.dual_vertices.cpu(), g.intersected.cpu()
        grids[res] = g
    finest = grids[max(grids)]
    occupancy = occupancy_from_coords(finest.coords, finest.resolution, layout.OCCUPANCY_RESOLUTION)
    return grids, occupancy


def dual_grid_tensors(grid) -> Dict[str, torch.Tensor]:
    """A DualGrid as the dataset stores it (dual vertices clamped to the voxel, as the toolkit does)."""
    return {
        layout.KEY_COORDS: grid.coords.to(torch.int32).contiguous(),
        layout.KEY_DUAL_VERTICES: grid.dual_vertices.clamp(0, 1).float().contiguous(),
        layout.KEY_INTERSECTED: grid.intersected.bool().contiguous(),
    }


def read_dual_grid(path: str):
    """``dual_grid_<res>.safetensors`` -> (coords ``[N, 3]`` int32, dual ``[N, 3]`` float32, intersected ``[N, 3]`` bool)."""
    from safetensors.torch import load_file

    t = load_file(path)
    return t[layout.KEY_COORDS], t[layout.KEY_DUAL_VERTICES], t[layout.KEY_INTERSECTED].bool()


def prepare_step(ctx) -> Dict:
    """Write the dual grids of ``ctx.options.resolutions`` and the 64^3 occupancy; returns the voxel
    counts for the record (``{"voxels": {"256": N, ...}}``)."""
    vertices, faces = ctx.mesh()
    grids, occupancy = voxelize(vertices, faces, ctx.options.resolutions, ctx.options.device)
    for res, grid in grids.items():
        ctx.write_tensors(layout.dual_grid_file(res), dual_grid_tensors(grid))
    ctx.write_tensors(layout.OCCUPANCY_FILE, {layout.KEY_OCCUPANCY: occupancy})
    return {"voxels": {str(res): grid.num_voxels for res, grid in grids.items()}}
