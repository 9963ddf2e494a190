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

# Back-view flags of a fast `train know3d` on the tiny demo Qwen (64x64 back view, 2 steps).
FAST_QWEN = ("--back-size", "64x64", "--back-steps", "2", "--vae-image-area", "4096")

SS_SHAPE = (8, 4, 4, 4)   # write_tiny_models: 8 channels on a 4^3 grid (the demo set: 8^3)
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
                        shape_tokens=(24, 40), with_shape: bool = True, backview_pairs: int = 0, ss_shape=SS_SHAPE):
    """A dataset in the contract layout; returns the list of asset sha256.

    Latents: every asset's latent is a shared smooth pattern times (1 + 0.1 * its own noise), so a
    flow can learn it in a few dozen steps. Pairs: ``pairs_per_asset`` of set ``3d`` (views 2k, 2k+1)
    and ``backview_pairs`` of set ``backview``, each with two annotations.
    """
    root = os.fspath(root)
    gen = torch.Generator().manual_seed(seed)
    base_ss = torch.randn(ss_shape, generator=gen)
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
        ss = base_ss * (1 + 0.1 * torch.randn(ss_shape, generator=gen))
        save_file({L.KEY_LATENT: ss.contiguous()}, os.path.join(folder, L.SS_LATENT_FILE))
        if with_shape:
            n = int(torch.randint(shape_tokens[0], shape_tokens[1] + 1, (1,), generator=gen))
            flat = torch.randperm(SHAPE_GRID ** 3, generator=gen)[:n].sort().values
            coords = torch.stack([flat // SHAPE_GRID ** 2, (flat // SHAPE_GRID) % SHAPE_GRID, flat % SHAPE_GRID], 1)
            feats = base_shape * (1 + 0.1 * torch.randn(n, 32, generator=gen))
            save_file({L.KEY_COORDS: coords.int().contiguous(), L.KEY_FEATS: feats.contiguous()},
                      os.path.join(folder, L.shape_latent_file(512)))
            # the 1024 stage's tokens: each 32^3 voxel's first child on the 64^3 grid
            save_file({L.KEY_COORDS: (2 * coords).int().contiguous(), L.KEY_FEATS: feats.contiguous()},
                      os.path.join(folder, L.shape_latent_file(1024)))
        rows.append({"sha256": sha, "source": f"asset{a}.glb", "status": L.STATUS_OK, "split": "train",
                     "n_pairs": len(pairs)})
    rows.append({"sha256": "f" * 64, "source": "broken.glb", "status": L.STATUS_FAILED, "split": "train"})
    with open(L.manifest_path(root), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return shas


def write_tiny_models(root, ss_resolution: int = 4) -> str:
    """A TRELLIS.2 folder with one-block, 32-wide flows (structure latent ``ss_resolution``^3) and the
    demo DINOv3 beside it; returns the TRELLIS.2 folder."""
    from know3d_core.demo_models import write_demo_dinov3
    from know3d_core.trellis2.tiny import write_tiny_trellis2

    root = os.fspath(root)
    folder = os.path.join(root, "TRELLIS.2-4B")
    if os.path.isfile(os.path.join(folder, "pipeline.json")):
        return folder
    write_tiny_trellis2(folder, model_channels=32, num_blocks=1, num_heads=2, cond_channels=32, with_decoders=False)
    stem = os.path.join(folder, "ckpts", "ss_flow_img_dit_1_3B_64_bf16.json")
    with open(stem, "r", encoding="utf-8") as f:
        doc = json.load(f)
    doc["args"]["resolution"] = ss_resolution
    with open(stem, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    write_demo_dinov3(os.path.join(root, "dinov3-vitl16-pretrain-lvd1689m"))
    return folder


def train_args(task, data, out, models, *extra, steps=6, stage="ss"):
    """argv of ``know3d train`` with the settings every test shares (CPU, no workers, no bar)."""
    return ["train", task, "--stage", stage, "--data", str(data), "--out", str(out), "--models", str(models),
            "--steps", str(steps), "--device", "cpu", "--num-workers", "0", "--no-progress", "--lora-rank", "4",
            *[str(e) for e in extra]]


def run_cli(argv, capsys=None):
    """``know3d`` in-process: (exit code, stderr text when capsys is given)."""
    from know3d_core.cli import main

    code = main(argv)
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def checkpoint_state(out):
    from know3d_core.train.engine import latest_checkpoint

    path = latest_checkpoint(os.fspath(out))
    return torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
