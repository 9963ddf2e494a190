"""Trellis2GeometryPipeline.from_comfy_files: ComfyUI's single files give the official folder's mesh."""
import os

import torch
from safetensors.torch import load_file, save_file

from know3d_core.demo_models import write_demo_models, write_demo_trellis2
from know3d_core.trellis2.comfy_files import load_comfy_model_set  # noqa: F401  (import check)
from know3d_core.geometry_pipeline import Trellis2GeometryPipeline

# Comfy-Org repack prefixes (see know3d_core/trellis2/comfy_files.py for how they were established).
FLOW_PREFIX = {"sparse_structure_flow_model": "structure_model.", "shape_slat_flow_model_512": "img2shape_512.",
               "shape_slat_flow_model_1024": "img2shape."}
VAE_PREFIX = {"sparse_structure_decoder": "struct_dec.", "shape_slat_decoder": "shape_dec."}


def _ckpt_stem(folder, key):
    import json

    with open(os.path.join(folder, "pipeline.json")) as f:
        rel = json.load(f)["args"]["models"][key]
    stem = os.path.join(folder, rel)
    if not os.path.exists(stem + ".safetensors"):  # the TRELLIS v1 decoder reference resolves into ckpts/
        stem = os.path.join(folder, "ckpts", os.path.basename(rel))
    return stem + ".safetensors"


def _write_comfy_files(folder, out):
    flows = {p + k: v for key, p in FLOW_PREFIX.items() for k, v in load_file(_ckpt_stem(folder, key)).items()}
    vae = {p + k: v for key, p in VAE_PREFIX.items() for k, v in load_file(_ckpt_stem(folder, key)).items()}
    diffusion, vae_file = os.path.join(out, "trellis_2_bf16.safetensors"), os.path.join(out, "trellis_2_shape_vae.safetensors")
    save_file(flows, diffusion)
    save_file(vae, vae_file)
    return diffusion, vae_file


def test_from_comfy_files_equals_the_official_folder_end_to_end(tmp_path):
    torch.set_num_threads(1)
    paths = write_demo_models(str(tmp_path / "models"), seed=0)
    # the official 16^3 structure latent: it is not stored in the weights, so the single files imply it
    write_demo_trellis2(paths.trellis2, seed=0, ss_resolution=16)
    diffusion, vae = _write_comfy_files(paths.trellis2, str(tmp_path))
    settings = dict(pipeline_type="512", seed=3, ss_params={"steps": 2}, shape_params={"steps": 2})
    image = _front_image()
    official = Trellis2GeometryPipeline.from_pretrained(paths.trellis2, device="cpu", dinov3=paths.dinov3)
    comfy = Trellis2GeometryPipeline.from_comfy_files(
        diffusion, vae, device="cpu", dinov3=paths.dinov3,
        pipeline_config=os.path.join(paths.trellis2, "pipeline.json"))
    a, b = official.run(image, **settings), comfy.run(image, **settings)
    assert torch.equal(a.coords, b.coords)
    assert a.mesh.num_faces > 0
    assert torch.equal(a.mesh.vertices, b.mesh.vertices) and torch.equal(a.mesh.faces, b.mesh.faces)


def _front_image():
    from PIL import Image

    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    for x in range(16, 48):
        for y in range(12, 52):
            img.putpixel((x, y), (200, 120 + x, 80 + y, 255))
    return img
