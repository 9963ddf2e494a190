"""Picture: one object textured with the front image only, and with the back view as the texture
flow's second image condition (issue 23): the PBR voxels' base colour seen from the front and the
back, and where the two differ.

Runs the real texture stage on the tiny random demo models (CPU, ~30 s): ``sample_tex_slat`` without
and with ``back_cond`` (same seed and noise), then ``decode_textured``. The shape latent is a chair
built from the demo image's silhouette (its voxels at the 32^3 latent grid, random features), since
the demo's random structure flow gives scattered voxels, not an object. The back image is the demo
image recoloured (blue), standing in for the Qwen back view. The views are splats of the texture
decoder's voxels (orthographic, nearest voxel per pixel). With random weights the colours are noise:
the picture shows that the back view reaches the texture flow (the colours move, the geometry does
not), not that the back's colours follow the back image; that needs TRELLIS.2's trained texture flow.
``back_view.json`` says how much each side moved.

    python benchmarks/texture_back_view.py --out benchmarks/results/texture_back_view
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from know3d_core.demo_models import write_demo_dinov3, write_demo_image, write_demo_trellis2  # noqa: E402
from know3d_core.geometry_pipeline import Trellis2GeometryPipeline  # noqa: E402
from know3d_core.mesh.render import camera_basis  # noqa: E402
from know3d_core.sparse import SparseTensor  # noqa: E402

FAST = {"steps": 4}
VIEWS = ("front", "back")


def recoloured(image: Image.Image) -> Image.Image:
    """The demo image with its RGB channels reversed (brown -> blue), alpha kept."""
    arr = np.asarray(image.convert("RGBA")).copy()
    arr[..., :3] = arr[..., 2::-1]
    return Image.fromarray(arr, "RGBA")


def splat(voxels, view: str, tile: int) -> torch.Tensor:
    """Base colour of the PBR voxels seen from ``view`` (orthographic, the cameras of
    ``render.render_normals``, the box [-0.5, 0.5]^3 filling the tile), nearest voxel per pixel;
    white where none. ``[tile, tile, 3]``."""
    p = (voxels.coords.float() + 0.5) / voxels.resolution - 0.5
    cam = p @ camera_basis(view).T
    col = ((cam[:, 0] + 0.5) * tile).long().clamp(0, tile - 1)
    row = ((0.5 - cam[:, 1]) * tile).long().clamp(0, tile - 1)
    pix = row * tile + col
    depth = torch.full((tile * tile,), float("-inf")).scatter_reduce(0, pix, cam[:, 2], "amax")
    front = cam[:, 2] == depth[pix]
    rgb = voxels.channel(voxels.attrs.float(), "base_color").clamp(0, 1)
    image = torch.ones(tile * tile, 3)
    image[pix[front]] = rgb[front]
    return image.view(tile, tile, 3)


def chair_coords(image: Image.Image, grid: int = 32) -> torch.Tensor:
    """``[N, 4]`` int32 shape-latent voxels (batch 0) of a chair built from the demo image's silhouette
    (image columns -> X, rows -> Z): a backrest slab at the back (+Y), a deep seat, four legs."""
    alpha = np.asarray(image.convert("RGBA"))[..., 3] > 0
    c = torch.stack(torch.meshgrid(*[torch.arange(grid)] * 3, indexing="ij"), -1).reshape(-1, 3)
    p = (c.float() + 0.5) / grid - 0.5
    h, w = alpha.shape
    col = ((p[:, 0] + 0.5) * w).long().clamp(0, w - 1)
    row = ((0.5 - p[:, 2]) * h).long().clamp(0, h - 1)
    inside = torch.from_numpy(alpha)[row, col]
    seat = (row >= 140 * h // 256) & (row < 160 * h // 256)
    legs = row >= 160 * h // 256
    y = p[:, 1]
    back_slab = (y > 0.06) & (y < 0.16)
    keep = inside & torch.where(seat, (y > -0.25) & (y < 0.16),
                                torch.where(legs, back_slab | ((y > -0.25) & (y < -0.15)), back_slab))
    cells = c[keep]
    return torch.cat([torch.zeros_like(cells[:, :1]), cells], 1).int()


def textured_views(pipe, slat, cond, back_cond, seed: int, tile: int):
    """One texture stage on ``slat`` (front condition, optional back condition):
    ``({view: splat}, texture latent, decoded raw mesh)``."""
    tex = pipe.sample_tex_slat(slat, cond, "512", back_cond=back_cond, generator=torch.Generator().manual_seed(seed),
                               params=FAST)
    [(mesh, voxels)] = pipe.decode_textured(slat, tex, 512)
    return {v: splat(voxels, v, tile) for v in VIEWS}, tex, mesh, voxels


def on_white(image: Image.Image, tile: int) -> Image.Image:
    rgba = image.convert("RGBA").resize((tile, tile))
    out = Image.new("RGB", (tile, tile), "white")
    out.paste(rgba, mask=rgba.split()[3])
    return out


def sheet(rows, tile: int) -> Image.Image:
    """The experiment's picture style: a label column, one line per row, one column per view."""
    label_w, head = 110, 14
    cols = ["condition", *VIEWS]
    out = Image.new("RGB", (label_w + tile * len(cols), head + tile * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for j, c in enumerate(cols):
        draw.text((label_w + j * tile + 2, 1), c, fill="black")
    for i, (label, conds, renders) in enumerate(rows):
        draw.text((2, head + i * tile + tile // 2), label, fill="black")
        cond = Image.new("RGB", (tile, tile), "white")
        for k, im in enumerate(conds):  # one or two condition images side by side
            small = on_white(im, tile // len(conds))
            cond.paste(small, (k * tile // len(conds), (tile - small.height) // 2))
        out.paste(cond, (label_w, head + i * tile))
        for j, v in enumerate(VIEWS):
            arr = (renders[v].numpy().clip(0, 1) * 255).round().astype("uint8")
            out.paste(Image.fromarray(arr), (label_w + (j + 1) * tile, head + i * tile))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--tile", type=int, default=192)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        trellis2, dinov3, path = (os.path.join(tmp, n) for n in ("trellis2", "dinov3", "image.png"))
        write_demo_trellis2(trellis2)
        write_demo_dinov3(dinov3)
        write_demo_image(path)
        pipe = Trellis2GeometryPipeline.from_pretrained(trellis2, device="cpu", dtype="float32",
                                                        pipeline_types=["512"], texture=True, dinov3=dinov3)
        image = Image.open(path)
        back = recoloured(image)
        front, back_img = pipe.preprocess(image), pipe.preprocess(back)
        cond, back_cond = pipe.get_cond(front, 512), pipe.get_cond(back_img, 512)
        coords = chair_coords(image)
        feats = torch.randn(coords.shape[0], 32, generator=torch.Generator().manual_seed(args.seed))
        slat = SparseTensor(feats, coords, (32, 32, 32))
        front_only, tex_a, mesh_a, vox_a = textured_views(pipe, slat, cond, None, args.seed, args.tile)
        with_back, tex_b, mesh_b, vox_b = textured_views(pipe, slat, cond, back_cond, args.seed, args.tile)
    same_shape = (torch.equal(mesh_a.vertices, mesh_b.vertices) and torch.equal(mesh_a.faces, mesh_b.faces)
                  and torch.equal(vox_a.coords, vox_b.coords))
    moved = {}
    for v in VIEWS:  # mean |change| of the base colour over the voxels seen from each side
        a, b = front_only[v], with_back[v]
        fg = (a != 1).any(-1)
        moved[v] = round(float((a - b).abs()[fg].mean()), 4)
    diff = {v: (1 - (front_only[v] - with_back[v]).abs().amax(-1, keepdim=True).expand(-1, -1, 3) * 2).clamp(0, 1)
            for v in VIEWS}
    facts = {"same_geometry": same_shape,
             "tex_latent_mean_abs_change": round(float((tex_a.feats - tex_b.feats).abs().mean()), 4),
             "base_colour_mean_abs_change_by_side": moved, "shape_latent_voxels": int(coords.shape[0]),
             "pbr_voxels": int(vox_a.coords.shape[0]), "seed": args.seed,
             "models": "tiny random demo models (know3d_core.demo_models), CPU float32, 4 steps a stage"}
    os.makedirs(args.out, exist_ok=True)
    rows = [("front image only", [image], front_only), ("front + back view", [image, back], with_back),
            ("|difference|", [], diff)]
    buf = io.BytesIO()
    sheet(rows, args.tile).save(buf, format="PNG", optimize=True)
    with open(os.path.join(args.out, "back_view.png"), "wb") as f:
        f.write(buf.getvalue())
    with open(os.path.join(args.out, "back_view.json"), "w", encoding="utf-8") as f:
        json.dump(facts, f, indent=1)
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
