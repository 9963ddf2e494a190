"""Folders for the image-to-shape similarity tests of ``know3d eval`` (Uni3D, ULIP-2)."""
import json
import os

import torch


def _png(path, colour):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    im.paste(colour, (8, 4, 32, 36))
    im.save(path)
    return path


def eval_folders(tmp_path):
    """gt/{a, b} (meshes; b has a dataset-style cameras.json + views/000.png front render);
    pred/{a, b} = the ground-truth meshes, a with record.json inputs.image; stage1/a: occupancy only
    (and the same record)."""
    from know3d_core.data import layout as L
    from know3d_core.eval import geometry as G
    from know3d_core.mesh.primitives import icosphere, uv_torus
    from safetensors.torch import save_file

    shapes = {"a": icosphere(2, 0.3), "b": uv_torus(0.3, 0.1, 24, 12)}
    for root in ("gt", "pred"):
        for name, m in shapes.items():
            folder = tmp_path / root / name
            folder.mkdir(parents=True)
            v, f = torch.as_tensor(m.vertices).float(), torch.as_tensor(m.faces).int()
            save_file({L.KEY_VERTICES: v, L.KEY_FACES: f}, str(folder / L.MESH_FILE))
    image_a = _png(str(tmp_path / "inputs" / "a.png"), (200, 40, 40, 255))
    with open(tmp_path / "pred" / "a" / "record.json", "w") as fh:
        json.dump({"inputs": {"image": image_a}}, fh)
    image_b = _png(str(tmp_path / "gt" / "b" / L.view_file(0)), (40, 40, 200, 255))
    with open(tmp_path / "gt" / "b" / L.CAMERAS_FILE, "w") as fh:
        json.dump({"views": [{"file": L.view_file(0), "set": L.SET_BACKVIEW, "ring": 0, "azimuth": 0.0}]}, fh)
    (tmp_path / "stage1" / "a").mkdir(parents=True)
    m = shapes["a"]
    occ = G.surface_voxels(torch.as_tensor(m.vertices).float(), torch.as_tensor(m.faces).long(), 64)
    save_file({L.KEY_OCCUPANCY: occ}, str(tmp_path / "stage1" / "a" / L.OCCUPANCY_FILE))
    with open(tmp_path / "stage1" / "a" / "record.json", "w") as fh:
        json.dump({"inputs": {"image": image_a}}, fh)
    return image_a, image_b
