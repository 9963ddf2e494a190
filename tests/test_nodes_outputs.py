"""The small core modules the nodes use: safe output files, mesh decimation, LoRA sniffing."""
import math
import os

import pytest
import torch

from _nodes_helpers import icosphere
from know3d_core.lora_sniff import describe_lora, looks_like_qwen_image, lora_modules
from know3d_core.mesh import Mesh, merge_duplicate_vertices
from know3d_core.mesh.decimate import decimate
from know3d_core.mesh.primitives import box
from know3d_core.outputs import UnsafeSaveName, _publish, next_counter, split_save_name, write_new_file


@pytest.mark.parametrize("name,expected", [
    ("mesh", ("", "mesh")),
    ("know3d/chair", ("know3d", "chair")),
    ("a/./b//c", ("a/b", "c")),
    ("win\\style", ("win", "style")),
])
def test_split_save_name(name, expected):
    assert split_save_name(name) == expected


@pytest.mark.parametrize("name", ["", "  ", "/abs", "\\abs", "C:\\x", "..", "../x", "a/../../x", "a/..", "x/", "a\0b"])
def test_split_save_name_refuses(name):
    with pytest.raises(UnsafeSaveName):
        split_save_name(name)


def test_write_new_file_counts_up_and_never_overwrites(tmp_path):
    (tmp_path / "m_00007_.glb").write_bytes(b"old")
    (tmp_path / "other_00042_.glb").write_bytes(b"x")
    (tmp_path / "m_notanumber_.glb").write_bytes(b"x")
    assert next_counter(str(tmp_path), "m") == 8
    saved = write_new_file(str(tmp_path), "m", "obj", b"new")
    assert saved.filename == "m_00008_.obj" and saved.subfolder == ""
    assert (tmp_path / "m_00008_.obj").read_bytes() == b"new"
    assert (tmp_path / "m_00007_.glb").read_bytes() == b"old"
    # Publishing onto an existing name fails instead of replacing it.
    tmp = tmp_path / "t.tmp"
    tmp.write_bytes(b"intruder")
    assert _publish(str(tmp), str(tmp_path / "m_00007_.glb")) is False
    assert (tmp_path / "m_00007_.glb").read_bytes() == b"old"
    # No temp file is left behind.
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp") and f != "t.tmp"]


def test_write_new_file_makes_sub_folders(tmp_path):
    saved = write_new_file(str(tmp_path), "a/b/c", "STL", b"1")
    assert saved.path == str(tmp_path / "a" / "b" / "c_00001_.stl") and saved.subfolder == "a/b"


def _sphere_mesh(sub=4):
    v, f = icosphere(sub, radius=0.4)
    return Mesh(v, f)


def test_decimate_meets_target_and_keeps_the_shape():
    mesh = _sphere_mesh()
    target = mesh.num_faces // 8
    small = decimate(mesh, target)
    small.validate()
    assert 0 < small.num_faces <= target
    # Area and volume of a sphere of radius 0.4 (the icosphere is within 1% of both).
    assert small.area() == pytest.approx(4 * math.pi * 0.4 ** 2, rel=0.1)
    assert small.signed_volume() == pytest.approx(4 / 3 * math.pi * 0.4 ** 3, rel=0.15)
    assert decimate(mesh, mesh.num_faces) is mesh


def test_decimate_keeps_flat_faces_and_sharp_corners():
    # A box whose faces are split into 8 x 8 quads: edge collapse on coplanar vertices costs nothing,
    # so 12 triangles (two per side) give back the exact box: its corners, volume and closedness.
    mesh = merge_duplicate_vertices(box((0.5, 0.4, 0.3), splits=8), 1e-9)
    small = decimate(mesh, 12)
    small.validate()
    assert small.num_faces == 12 and small.num_vertices == 8
    assert small.signed_volume() == pytest.approx(0.5 * 0.4 * 0.3, rel=1e-6)
    assert torch.equal(small.vertices.min(0).values, mesh.vertices.min(0).values)
    assert torch.equal(small.vertices.max(0).values, mesh.vertices.max(0).values)


QWEN_KEYS = ["diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight",
             "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight",
             "diffusion_model.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight"]
FLUX_KEYS = ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
             "lora_unet_double_blocks_0_img_attn_qkv.alpha"]
SDXL_KEYS = ["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"]


def test_lora_sniff():
    assert lora_modules(QWEN_KEYS) == {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.img_mlp.net.0.proj"}
    assert looks_like_qwen_image(QWEN_KEYS) and not looks_like_qwen_image(FLUX_KEYS)
    assert describe_lora(QWEN_KEYS).startswith("a Qwen-Image LoRA (2 modules")
    assert describe_lora(FLUX_KEYS).startswith("a Flux LoRA (1 module,")
    assert describe_lora(SDXL_KEYS).startswith("a SD 1.x / SDXL UNet LoRA")
    assert describe_lora(["model.layers.0.weight"]).startswith("not a LoRA")
    assert describe_lora([]) == "an empty file (no tensors)"
