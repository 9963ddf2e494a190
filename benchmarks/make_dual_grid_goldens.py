"""Write tests/data/golden_dual_grid/reference_dual_grids.safetensors: the reference converter's
output (benchmarks/ovoxel_reference.py) on small analytic meshes, for the parity test in CI.

    python benchmarks/make_dual_grid_goldens.py --src TRELLIS.2/o-voxel --eigen libeigen3-dev_3.4.0-4_all.deb \
        [--out tests/data/golden_dual_grid/reference_dual_grids.safetensors] [--check]

Per case ``NAME``: ``NAME.vertices`` ``[V, 3]`` float32, ``NAME.faces`` ``[F, 3]`` int32,
``NAME.resolution`` (int64 scalar), the reference output sorted by (x, y, z): ``NAME.coords``
int32, ``NAME.dual`` float32 (the toolkit's ``dual * R - coords``), ``NAME.intersected`` uint8,
and ``NAME.dual_permuted``: the reference's dual vertices for the same mesh with its faces in
another order (same voxels), i.e. the spread of its own float32 rounding.
``--check`` compares a fresh run with an existing file instead of writing it (bit-exact).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ovoxel_reference as ref  # noqa: E402

from know3d_core.mesh import Mesh  # noqa: E402
from know3d_core.mesh.primitives import box, icosphere, uv_torus  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "golden_dual_grid",
                           "reference_dual_grids.safetensors")


def open_cap() -> Mesh:
    """Upper part of a sphere (an open mesh: boundary edges) plus two zero-area faces."""
    s = icosphere(3, 0.35, (0.02, 0.01, -0.05))
    centroid_z = s.vertices[s.faces].mean(1)[:, 2]
    faces = s.faces[centroid_z > -0.1]
    degenerate = torch.tensor([[0, 0, 1], [5, 5, 5]])
    return Mesh(s.vertices, torch.cat([faces, degenerate]))


def cases():
    """name -> (mesh, resolution). Small enough for CI; every pass of the converter is used."""
    return {
        "sphere": (icosphere(4, 0.4, (0.013, -0.021, 0.007)), 48),  # 48: a voxel size that is not a power of 2
        "torus": (uv_torus(0.3, 0.12, 48, 24, (0.004, 0.009, -0.011)), 64),
        "box": (box((0.5, 0.4, 0.3), (0.011, 0.003, -0.02), splits=4), 32),  # unshared face borders: boundary edges
        "plate": (box((0.6, 0.5, 0.05), (0.0, 0.01, 0.007), splits=3), 64),
        "open_cap": (open_cap(), 32),
    }


def run_case(ext, mesh: Mesh, res: int):
    coords, dual, inter = ref.reference_dual_grid(ext, mesh.vertices, mesh.faces, res)
    coords, dual, inter = ref.sort_by_coords(coords, dual, inter, resolution=res)
    perm = torch.randperm(mesh.num_faces, generator=torch.Generator().manual_seed(1))
    c2, d2, i2 = ref.reference_dual_grid(ext, mesh.vertices, mesh.faces[perm], res)
    c2, d2, i2 = ref.sort_by_coords(c2, d2, i2, resolution=res)
    if not (torch.equal(coords, c2) and torch.equal(inter, i2)):
        raise RuntimeError("the reference's voxel set depends on the face order (not expected)")
    return {
        "vertices": mesh.vertices.float().contiguous(),
        "faces": mesh.faces.int().contiguous(),
        "resolution": torch.tensor(res, dtype=torch.int64),
        "coords": coords.int().contiguous(),
        "dual": ref.toolkit_relative(coords, dual, res).contiguous(),
        "intersected": inter.to(torch.uint8).contiguous(),
        "dual_permuted": ref.toolkit_relative(c2, d2, res).contiguous(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="TRELLIS.2's o-voxel folder (src/convert/*.cpp, api.h)")
    p.add_argument("--eigen", required=True, help="Eigen include dir or libeigen3-dev .deb")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = p.parse_args(argv)
    ext = ref.build(args.src, args.eigen)
    tensors = {}
    for name, (mesh, res) in cases().items():
        for key, value in run_case(ext, mesh, res).items():
            tensors[f"{name}.{key}"] = value
        print(f"{name}: res {res}, {mesh.num_faces} faces, {tensors[name + '.coords'].shape[0]} voxels")
    if args.check:
        old = load_file(args.out)
        same = old.keys() == tensors.keys() and all(torch.equal(old[k], tensors[k]) for k in old)
        print("goldens reproduced bit for bit" if same else "goldens DIFFER from " + args.out)
        return 0 if same else 1
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    save_file(tensors, tmp)
    os.replace(tmp, args.out)
    print("wrote", args.out, os.path.getsize(args.out), "bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
