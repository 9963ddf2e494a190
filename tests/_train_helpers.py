"""Builders for tests/test_train_*.py (no tests here): a small dataset written directly in the
layout of ``know3d_core.data.layout`` (random-but-structured latents, small RGBA views), so the
trainer is tested without the data pipeline."""
import hashlib
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from know3d_core.data import layout as L

SS_SHAPE = (8, 8, 8, 8)   # the demo structure flow: 8 channels on an 8^3 grid
SHAPE_GRID = 32           # shape512 tokens live on the 32^3 grid


def _view(size: int, seed: int) -> Image.Image:
    """An RGBA view: a coloured ellipse (position/colour from the seed) on transparency."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((size, size, 4), dtype=np.uint8)
    y, x = np.mgrid[0:size, 0:size]
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    rx, ry = rng.uniform(0.15, 0.3, 2) * size
    inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
    arr[inside, :3] = rng.integers(40, 255, 3)
    arr[inside, 3] = 255
    return Image.fromarray(arr, "RGBA")


def write_train_dataset(root, n_assets: int = 4, pairs_per_asset: int = 2, view_size: int = 64, seed: int = 0,
                        shape_tokens=(24, 40), with_shape: bool = True, backview_pairs: int = 0):
    """A dataset in the contract layout; returns the list of asset sha256.

    Latents: every asset's latent is a shared smooth pattern times (1 + 0.1 * its own noise), so a
    flow can learn it in a few dozen steps. Pairs: ``pairs_per_asset`` of set ``3d`` (views 2k, 2k+1)
    and ``backview_pairs`` of set ``backview``, each with two annotations.
    """
    root = os.fspath(root)
    gen = torch.Generator().manual_seed(seed)
    base_ss = torch.randn(SS_SHAPE, generator=gen)
    base_shape = torch.randn(1, 32, generator=gen)
    rows, shas = [], []
    for a in range(n_assets):
        sha = hashlib.sha256(f"asset-{seed}-{a}".encode()).hexdigest()
        shas.append(sha)
        folder = L.asset_dir(root, sha)
        os.makedirs(os.path.join(folder, L.VIEWS_DIR), exist_ok=True)
        pairs = []
        n_views = 2 * (pairs_per_asset + backview_pairs)
        for v in range(n_views):
            _view(view_size, seed * 1000 + a * 50 + v).save(os.path.join(folder, L.view_file(v)))
        for k in range(pairs_per_asset + backview_pairs):
            pairs.append({"front": 2 * k, "back": 2 * k + 1,
                          "set": L.SET_3D if k < pairs_per_asset else L.SET_BACKVIEW,
                          "annotations": [f"back part {a}-{k}", f"handle {k}"]})
        with open(os.path.join(folder, L.PAIRS_FILE), "w", encoding="utf-8") as f:
            json.dump(pairs, f)
        ss = base_ss * (1 + 0.1 * torch.randn(SS_SHAPE, generator=gen))
        save_file({L.KEY_LATENT: ss.contiguous()}, os.path.join(folder, L.SS_LATENT_FILE))
        if with_shape:
            n = int(torch.randint(shape_tokens[0], shape_tokens[1] + 1, (1,), generator=gen))
            flat = torch.randperm(SHAPE_GRID ** 3, generator=gen)[:n].sort().values
            coords = torch.stack([flat // SHAPE_GRID ** 2, (flat // SHAPE_GRID) % SHAPE_GRID, flat % SHAPE_GRID], 1)
            feats = base_shape * (1 + 0.1 * torch.randn(n, 32, generator=gen))
            save_file({L.KEY_COORDS: coords.int().contiguous(), L.KEY_FEATS: feats.contiguous()},
                      os.path.join(folder, L.shape_latent_file(512)))
        rows.append({"sha256": sha, "source": f"asset{a}.glb", "status": L.STATUS_OK, "split": "train",
                     "n_pairs": len(pairs)})
    rows.append({"sha256": "f" * 64, "source": "broken.glb", "status": L.STATUS_FAILED, "split": "train"})
    with open(L.manifest_path(root), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return shas
