"""Asset folders for the data tests: synthetic GLBs plus one deliberately broken file per reason."""
from __future__ import annotations

import json
import os
import struct


from know3d_core.data import synthetic

# file name -> the reason prepare must record for it (max_faces = MAX_FACES)
BROKEN = {
    "broken_empty.glb": "empty",
    "broken_nan.obj": "nan_vertices",
    "broken_points.ply": "no_faces",
    "broken_flat.obj": "zero_extent",
    "broken_missing_texture.gltf": "missing_texture",
    "broken_bad_texture.glb": "bad_texture",
    "broken_big.obj": "too_many_faces",
    "broken_garbage.glb": "unreadable",
}
MAX_FACES = 5000
SEEDS = (0, 1)
FEATURES = ("flat_back", "handle", "slats")


def _obj(vertices, faces) -> str:
    lines = [f"v {x} {y} {z}" for x, y, z in vertices] + [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    return "\n".join(lines) + "\n"


def _glb_json_bin(glb: bytes):
    json_len = struct.unpack_from("<I", glb, 12)[0]
    gltf = json.loads(glb[20:20 + json_len])
    bin_len = struct.unpack_from("<I", glb, 20 + json_len)[0]
    return gltf, glb[28 + json_len: 28 + json_len + bin_len]


def write_broken(folder: str) -> None:
    """One file per entry of BROKEN."""
    p = lambda n: os.path.join(folder, n)  # noqa: E731
    open(p("broken_empty.glb"), "wb").close()
    tri = [(0, 0, 0), (1, 0, 0), (0, 1, 0)]
    with open(p("broken_nan.obj"), "w") as f:
        f.write(_obj([(0, 0, 0), (float("nan"), 0, 0), (0, 1, 0)], [(0, 1, 2)]))
    with open(p("broken_flat.obj"), "w") as f:
        f.write(_obj([(0.3, 0.3, 0.3)] * 3, [(0, 1, 2)]))
    with open(p("broken_points.ply"), "w") as f:
        f.write("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
                "end_header\n" + "".join(f"{x} {y} {z}\n" for x, y, z in tri))
    # a 2 x N strip over the face limit
    n = MAX_FACES // 2 + 2
    verts = [(i, j, 0.0) for i in range(n + 1) for j in range(2)]
    faces = [f for i in range(n) for f in ((2 * i, 2 * i + 2, 2 * i + 1), (2 * i + 1, 2 * i + 2, 2 * i + 3))]
    with open(p("broken_big.obj"), "w") as f:
        f.write(_obj(verts, faces))
    glb = synthetic.glb_bytes(synthetic.make_asset(7, "handle"))
    k = glb.find(b"\x89PNG")
    bad = bytearray(glb)
    bad[k:k + 32] = b"\x00" * 32  # the embedded texture no longer decodes
    with open(p("broken_bad_texture.glb"), "wb") as f:
        f.write(bytes(bad))
    gltf, bin_chunk = _glb_json_bin(glb)
    gltf["buffers"] = [{"byteLength": len(bin_chunk), "uri": "broken_missing_texture.bin"}]
    gltf["images"] = [{"uri": "no_such_texture.png"}]
    with open(p("broken_missing_texture.gltf"), "w") as f:
        json.dump(gltf, f)
    with open(p("broken_missing_texture.bin"), "wb") as f:
        f.write(bin_chunk)
    with open(p("broken_garbage.glb"), "wb") as f:
        f.write(b"glTF" + b"\xff" * 40)


def write_asset_folder(folder: str) -> list:
    """Synthetic assets (SEEDS x FEATURES, with annotations.jsonl) and the BROKEN files."""
    paths = synthetic.write_dataset_folder(folder, SEEDS, FEATURES)
    write_broken(folder)
    return paths


def tree(root: str) -> dict:
    """{relative path: bytes} of every file under root, asset records without their time stamp."""
    out = {}
    for base, dirs, files in os.walk(root):
        for n in files:
            path = os.path.join(base, n)
            rel = os.path.relpath(path, root)
            with open(path, "rb") as f:
                data = f.read()
            if n == "asset.json":
                rec = json.loads(data)
                rec.pop("created", None)
                data = json.dumps(rec, sort_keys=True).encode()
            out[rel] = data
    return out
