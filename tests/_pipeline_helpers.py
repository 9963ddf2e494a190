"""Shared builders for tests/test_pipeline_*.py (no tests here).

The demo model set is written once per test session (under pytest's base temp folder) and loaded
once per test module.
"""
import os

import torch

from know3d_core.demo_models import (DemoPaths, write_demo_dinov3, write_demo_models,
                                     write_demo_trellis2)

FAST = {"steps": 3}  # sampler overrides that keep the tiny runs short


def _paths(root) -> DemoPaths:
    root = os.fspath(root)
    return DemoPaths(
        root=root, trellis2=os.path.join(root, "TRELLIS.2-4B"),
        dinov3=os.path.join(root, "dinov3-vitl16-pretrain-lvd1689m"),
        qwen=os.path.join(root, "Qwen-Image-Edit-2511"),
        backview_lora=os.path.join(root, "know3d_backview_lora.safetensors"),
        know3d=os.path.join(root, "know3d.safetensors"), image=os.path.join(root, "front.png"))


def geometry_demo(tmp_path_factory) -> DemoPaths:
    """TRELLIS.2 + DINOv3 + the Know3D file of the demo set (no Qwen), written once per session."""
    full = tmp_path_factory.getbasetemp() / "know3d_demo_full"
    if (full / "README.txt").exists():
        return _paths(full)
    root = tmp_path_factory.getbasetemp() / "know3d_demo_geometry"
    paths = _paths(root)
    if not (root / "done").exists():
        from know3d_core.demo_models import write_demo_image, write_demo_know3d

        write_demo_trellis2(paths.trellis2)
        write_demo_dinov3(paths.dinov3)
        write_demo_know3d(paths.know3d, paths.trellis2)
        write_demo_image(paths.image)
        (root / "done").write_text("ok")
    return paths


def full_demo(tmp_path_factory) -> DemoPaths:
    """The whole demo set, written once per session."""
    root = tmp_path_factory.getbasetemp() / "know3d_demo_full"
    if not (root / "README.txt").exists():
        write_demo_models(root)
    return _paths(root)


def mesh_equal(a, b) -> bool:
    return torch.equal(a.vertices, b.vertices) and torch.equal(a.faces, b.faces)


def hidden_knowledge(dim: int = 64, tokens: int = 16, seed: int = 0, layers=(1, 2), sigma: float = 0.25):
    """Random ``mmdit_hidden`` knowledge fitting the demo Know3D file (D = 2 layers x 32)."""
    from know3d_core.knowledge import mmdit_hidden_knowledge

    g = torch.Generator().manual_seed(seed)
    return mmdit_hidden_knowledge(torch.randn(1, tokens, dim, generator=g), layers, sigma, (64, 64),
                                  model="test")


def one_thread():
    """Generator for a module fixture: run with one intra-op thread, restore afterwards. The tiny
    pipeline is made of many small ops where a second OpenMP thread costs more than it gives
    (3x slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cpu_geometry(tmp_path_factory):
    """``(Trellis2GeometryPipeline on the CPU in float32, demo paths)`` of the geometry demo set."""
    from know3d_core.geometry_pipeline import Trellis2GeometryPipeline

    demo = geometry_demo(tmp_path_factory)
    return Trellis2GeometryPipeline.from_pretrained(demo.trellis2, device="cpu", dtype="float32"), demo


def tiny_geometry_bench_rows(tmp_path, *flags: str) -> list:
    """Rows of ``benchmarks/bench_geometry.py --tiny`` (512 type, no offload) run with ``flags``."""
    import json
    import sys

    bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    import bench_geometry

    out = tmp_path / "geometry.json"
    assert bench_geometry.main(["--tiny", *flags, "--types", "512", "--offload", "off", "--out", str(out)]) == 0
    return json.loads(out.read_text())["rows"]
