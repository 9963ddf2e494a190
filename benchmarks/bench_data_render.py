"""Render step of ``know3d data prepare`` on one large textured asset: where the time goes.

Builds a UV sphere of about ``--faces`` triangles with a base-colour texture (GLB), then times
``load_asset`` (read + checks + normalisation), the renderer's start, the upload, the 28 views of the
camera plan (draw + MSAA resolve + read-back) and the PNG writes, per size. Run on the GPU machine
(EGL on the NVIDIA driver) and on a CPU machine (Mesa llvmpipe)::

    python benchmarks/bench_data_render.py --faces 200000 --sizes 512,1024 --out /tmp/bench
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def uv_sphere_glb(path: str, faces: int) -> int:
    import trimesh
    from PIL import Image

    n = max(8, int(math.sqrt(faces / 2)))
    theta, phi = np.meshgrid(np.linspace(0, np.pi, n + 1), np.linspace(0, 2 * np.pi, n + 1), indexing="ij")
    v = np.stack([np.sin(theta) * np.cos(phi), np.cos(theta), np.sin(theta) * np.sin(phi)], -1).reshape(-1, 3) * 0.5
    uv = np.stack([phi / (2 * np.pi), 1 - theta / np.pi], -1).reshape(-1, 2)
    idx = np.arange((n + 1) * (n + 1)).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    f = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    yy, xx = np.mgrid[0:1024, 0:1024]
    tex = np.stack([(xx // 64 % 2) * 200 + 40, (yy // 64 % 2) * 200 + 40, np.full_like(xx, 120)], -1).astype(np.uint8)
    mat = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(tex), metallicFactor=0.2, roughnessFactor=0.5)
    mesh = trimesh.Trimesh(v, f, visual=trimesh.visual.TextureVisuals(uv=uv, material=mat), process=False)
    mesh.export(path)
    return len(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=int, default=200_000)
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--out", required=True)
    ap.add_argument("--views", help="folder for the PNGs (default: --out)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from know3d_core.data import render
    from know3d_core.data.assets import load_asset

    glb = os.path.join(args.out, "sphere.glb")
    n_faces = uv_sphere_glb(glb, args.faces)
    result = {"faces": n_faces}
    t = time.perf_counter()
    asset = load_asset(glb)
    result["load_asset_s"] = time.perf_counter() - t
    views = render.plan_views(0)
    for size in (int(s) for s in args.sizes.split(",")):
        r = {}
        t = time.perf_counter()
        gl = render.GLRenderer(size)
        r["renderer"] = gl.renderer_name
        r["start_s"] = time.perf_counter() - t
        t = time.perf_counter()
        gl.load(asset)
        gl.ctx.finish()
        r["upload_s"] = time.perf_counter() - t
        gl.render(np.asarray(views[0]["c2w"]), views[0]["fov"])  # shader compile / first draw
        t = time.perf_counter()
        images = [gl.render(np.asarray(v["c2w"]), v["fov"]) for v in views]
        r["render_28_views_s"] = time.perf_counter() - t
        from PIL import Image

        folder = os.path.join(args.views or args.out, f"views_{size}")
        os.makedirs(folder, exist_ok=True)
        t = time.perf_counter()
        for i, img in enumerate(images):
            Image.fromarray(img, "RGBA").save(os.path.join(folder, f"{i:03d}.png"))
        r["png_write_28_s"] = time.perf_counter() - t
        r["coverage_view0"] = float((images[0][..., 3] > 0).mean())
        t = time.perf_counter()
        render.render_asset(gl, asset, views, os.path.join(args.views or args.out, f"asset_{size}"))
        r["render_asset_total_s"] = time.perf_counter() - t  # upload + 28 views + threaded PNG writes
        gl.release()
        result[str(size)] = r
        print(size, json.dumps(r), flush=True)
    print(json.dumps(result, indent=1))
    with open(os.path.join(args.out, "bench_data_render.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
