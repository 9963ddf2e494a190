"""The reference mesh -> flexible dual grid converter, compiled from a TRELLIS.2 checkout, for parity
goldens and the speed benchmark. Never imported by the package or the tests.

It compiles ``o-voxel/src/convert/flexible_dual_grid.cpp`` (TRELLIS.2 5565d24) with the flags of
``o-voxel/setup.py`` (``-O3 -std=c++17``, Eigen headers) as a torch extension that binds only
``mesh_to_flexible_dual_grid_cpu`` (the rest of ``o_voxel._C`` -- CUDA hash maps, rasteriser --
is not needed), and wraps it the way ``o_voxel.convert.mesh_to_flexible_dual_grid`` does for
``grid_size=R, aabb=[[-0.5]*3, [0.5]*3]``.

    ext = build(src="/path/to/TRELLIS.2/o-voxel", eigen="/path/to/libeigen3-dev_*.deb or include dir")
    coords, dual_abs, intersected = reference_dual_grid(ext, vertices, faces, resolution)
"""
from __future__ import annotations

import glob
import os
import subprocess
import tempfile

import torch

_BINDING = """
#include <torch/extension.h>
#include "api.h"
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("mesh_to_flexible_dual_grid_cpu", &mesh_to_flexible_dual_grid_cpu,
          py::call_guard<py::gil_scoped_release>());
}
"""


def _extract_deb(deb: str, dst: str) -> None:
    """Unpack a .deb's data archive into ``dst`` (an ``ar`` archive holding ``data.tar.*``), in Python:
    no dpkg needed."""
    import io
    import tarfile

    with open(deb, "rb") as f:
        blob = f.read()
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a .deb (ar) archive")
    pos = 8
    while pos < len(blob):
        name = blob[pos:pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48:pos + 58].decode().strip())
        body = blob[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                tar.extractall(dst, filter="data")
            return
        pos += 60 + size + (size % 2)
    raise ValueError(f"{deb} has no data.tar member")


def eigen_include(eigen: str) -> str:
    """An Eigen include dir from a directory holding ``Eigen/`` or a Debian ``libeigen3-dev`` .deb."""
    if os.path.isdir(os.path.join(eigen, "Eigen")):
        return eigen
    debs = [eigen] if eigen.endswith(".deb") else glob.glob(os.path.join(eigen, "libeigen3-dev_*.deb"))
    if not debs:
        raise FileNotFoundError(f"no Eigen headers or libeigen3-dev .deb at {eigen}")
    dst = os.path.join(tempfile.gettempdir(), "ovoxel_ref_eigen")
    if not os.path.isdir(os.path.join(dst, "usr/include/eigen3/Eigen")):
        _extract_deb(debs[0], dst)
    return os.path.join(dst, "usr/include/eigen3")


_SETUP = """
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension
setup(name="ovoxel_fdg_reference", ext_modules=[CppExtension(
    "ovoxel_fdg_reference", ["binding.cpp", {cpp!r}], include_dirs=[{convert!r}, {eigen!r}],
    extra_compile_args=["-O3", "-std=c++17"])], cmdclass={{"build_ext": BuildExtension}})
"""


def build(src: str, eigen: str, verbose: bool = False):
    """Compile the reference converter (setuptools + torch's BuildExtension, as o-voxel's setup.py;
    ninja not required) and import it; ``src`` is TRELLIS.2's ``o-voxel`` folder (or a copy of its
    ``src/convert/{flexible_dual_grid.cpp, api.h}``)."""
    import importlib.util
    import sys

    convert = os.path.abspath(os.path.join(src, "src", "convert"))
    build_dir = os.path.join(tempfile.gettempdir(), "ovoxel_ref_build")
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "binding.cpp"), "w", encoding="utf-8") as f:
        f.write(_BINDING)
    with open(os.path.join(build_dir, "setup.py"), "w", encoding="utf-8") as f:
        f.write(_SETUP.format(cpp=os.path.join(convert, "flexible_dual_grid.cpp"), convert=convert,
                              eigen=eigen_include(eigen)))
    built = glob.glob(os.path.join(build_dir, "ovoxel_fdg_reference*.so"))
    if not built:
        out = None if verbose else subprocess.DEVNULL
        subprocess.check_call([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=build_dir,
                              stdout=out, stderr=None)
        built = glob.glob(os.path.join(build_dir, "ovoxel_fdg_reference*.so"))
    spec = importlib.util.spec_from_file_location("ovoxel_fdg_reference", built[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_dual_grid(ext, vertices: torch.Tensor, faces: torch.Tensor, resolution: int,
                        face_weight: float = 1.0, boundary_weight: float = 0.2,
                        regularization_weight: float = 1e-2):
    """What ``o_voxel.convert.mesh_to_flexible_dual_grid(vertices, faces, grid_size=R,
    aabb=[[-0.5]*3, [0.5]*3], ...)`` returns: coords ``[N, 3]`` int32 (insertion order), absolute
    dual vertices ``[N, 3]`` float32 in ``[0, 1]^3``, intersected ``[N, 3]`` bool."""
    aabb = torch.tensor([[-0.5] * 3, [0.5] * 3], dtype=torch.float32)
    grid_size = torch.tensor([resolution] * 3, dtype=torch.int32)
    voxel_size = (aabb[1] - aabb[0]) / grid_size
    shifted = vertices.float() - aabb[0].reshape(1, 3)
    grid_range = torch.stack([torch.zeros_like(grid_size), grid_size], dim=0).int()
    return ext.mesh_to_flexible_dual_grid_cpu(shifted.contiguous(), faces.int().contiguous(), voxel_size,
                                              grid_range, face_weight, boundary_weight,
                                              regularization_weight, False)


def toolkit_relative(coords: torch.Tensor, dual_abs: torch.Tensor, resolution: int) -> torch.Tensor:
    """The data toolkit's conversion to voxel units relative to the voxel (before its uint8 step):
    ``dual * R - coords`` in float32 (``data_toolkit/dual_grid.py``)."""
    return dual_abs * resolution - coords


def sort_by_coords(coords, *rows, resolution: int):
    """Reorder ``coords`` (and tensors of the same row count) by (x, y, z)."""
    c = coords.long()
    order = torch.argsort((c[:, 0] * resolution + c[:, 1]) * resolution + c[:, 2])
    return (coords[order],) + tuple(t[order] for t in rows)
