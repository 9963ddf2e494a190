"""Mesh nodes: Save Mesh (GLB / OBJ / PLY / STL under output/) and Render Normals."""
from __future__ import annotations

import json

import torch

from . import _host
from ._common import CATEGORY
from ._io import IO
from ..know3d_core.mesh import FORMATS, Mesh, mesh_bytes, postprocess_mesh, render_normals, y_up_to_z_up
from ..know3d_core.outputs import write_new_file

VIEW_ORDER = ("front", "back", "left", "right")
BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0), "gray": (0.5, 0.5, 0.5)}
FLOATER_FRACTION = 0.01  # default share of the faces below which a piece is a floater (Save Mesh, Texture)


def core_mesh_to_meshes(mesh) -> list[Mesh]:
    """Core MESH (Y-up, batched, maybe padded) -> our Z-up meshes, one per batch item."""
    out = []
    for v, f in _host.mesh_items(mesh):
        z_up = torch.from_numpy(y_up_to_z_up(v.detach().cpu().double().numpy())).float()
        out.append(Mesh(z_up, f.detach().cpu().long()))
    return out


def file_metadata(mesh, prompt, extra_pnginfo, fmt: str) -> dict:
    """What goes into the file: Know3D generation info (seed, back description, ...) and, like
    core SaveGLB, the workflow's prompt graph. STL has 80 header bytes: generation info only."""
    meta = {}
    info = dict(getattr(mesh, "know3d_metadata", None) or {})
    if info:
        meta["know3d"] = info
    if fmt == "stl" or _host.disable_metadata():
        return meta
    if prompt is not None:
        meta["prompt"] = json.dumps(prompt)
    for key, value in (extra_pnginfo or {}).items():
        meta[key] = json.dumps(value)
    return meta


def mesh_texture_kind(mesh) -> str:
    """``"pbr"`` (core fields uvs + texture), ``"vertex"`` (vertex_colors) or ``""`` (no texture)."""
    if getattr(mesh, "uvs", None) is not None and getattr(mesh, "texture", None) is not None:
        return "pbr"
    return "vertex" if getattr(mesh, "vertex_colors", None) is not None else ""


def _to_u8(x: torch.Tensor):
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _item(t: torch.Tensor, i: int, count) -> torch.Tensor:
    return t[i, : int(count[i])] if count is not None else t[i]


def textured_glb(mesh, i: int, item: Mesh, kind: str, meta: dict) -> bytes:
    """GLB of batch item ``i`` of a textured core MESH (``item``: its Z-up geometry): a glTF PBR material
    from uvs + texture (+ metallic_roughness, + Know3D's alpha) or vertex colours."""
    from ..know3d_core.mesh.texture import TexturedMesh, textured_glb_bytes, vertex_rgba_glb_bytes

    counts = getattr(mesh, "vertex_counts", None)
    if kind == "vertex":
        colors = _item(mesh.vertex_colors, i, counts).float().cpu()
        if colors.shape[-1] == 3:
            colors = torch.cat([colors, torch.ones_like(colors[:, :1])], -1)
        return vertex_rgba_glb_bytes(item, colors, meta)
    base = mesh.texture[i].float().cpu().clamp(0, 1)
    alpha = getattr(mesh, "know3d_alpha", None)
    alpha = alpha[i].float().cpu() if alpha is not None else torch.ones_like(base[..., :1])
    mr = getattr(mesh, "metallic_roughness", None)
    # glTF defaults without a map: roughness 1, metallic 0 (G, B)
    mr = mr[i].float().cpu() if mr is not None else torch.tensor([0.0, 1.0, 0.0]).expand_as(base)
    textured = TexturedMesh(item.vertices, item.faces, _item(mesh.uvs, i, counts).float().cpu(),
                            _to_u8(torch.cat([base, alpha], -1)), _to_u8(mr), {})
    return textured_glb_bytes(textured, meta)


class Know3DSaveMesh(IO.ComfyNode):
    @classmethod
    def define_schema(cls):
        return IO.Schema(
            node_id="Know3DSaveMesh",
            display_name="Save Mesh",
            category=f"{CATEGORY}/mesh",
            description=(
                "Save a mesh under ComfyUI's output folder as GLB, OBJ, PLY or STL, named "
                "<prefix>_00001_.<ext> with a counter that never overwrites. The seed and prompt go into "
                "the file where the format allows (GLB extras, OBJ/PLY comments, STL header). Optional "
                "floater removal and face-count reduction. A textured mesh (Know3D Texture, core bake nodes) "
                "is written as GLB with its PBR material or vertex colours, its faces kept. Wire model_file "
                "into core 'Preview 3D' to view it."
            ),
            is_output_node=True,
            inputs=[
                IO.Mesh.Input("mesh", tooltip="Mesh to save (core MESH, Y-up): from Know3D Geometry or any core 3D node."),
                IO.String.Input("filename_prefix", default="know3d/mesh",
                                tooltip="Relative name under output/: optional sub-folder + base name. Absolute paths and '..' are refused."),
                IO.Combo.Input("format", options=list(FORMATS), default="glb",
                               tooltip="File format. GLB keeps metadata and shows in 3D viewers; STL is written Z-up for slicers."),
                IO.Boolean.Input("remove_floaters", default=True,
                                 tooltip="Remove small disconnected pieces (below floater_fraction of the faces). The largest piece is always kept."),
                IO.Float.Input("floater_fraction", default=FLOATER_FRACTION, min=0.0, max=0.5, step=0.001,
                               tooltip="Pieces with fewer than this fraction of all faces count as floaters."),
                IO.Int.Input("target_faces", default=0, min=0, max=50_000_000, step=1000,
                             tooltip="Reduce the mesh to at most this many faces (the same decimation as the know3d command). 0 keeps every face."),
            ],
            outputs=[IO.String.Output("model_file", display_name="model_file",
                                      tooltip="Path of the first saved file, relative to the output folder (for core Preview 3D).")],
        )

    @classmethod
    def execute(cls, mesh, filename_prefix, format, remove_floaters=True, floater_fraction=FLOATER_FRACTION,
                target_faces=0) -> IO.NodeOutput:
        fmt = str(format).lower()
        if fmt not in FORMATS:
            raise ValueError(f"Know3D Save Mesh: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
        output_dir = _host.output_directory()
        hidden = cls.hidden
        meta = file_metadata(mesh, getattr(hidden, "prompt", None), getattr(hidden, "extra_pnginfo", None), fmt)
        # Serialise every item first: a failure then leaves no file at all.
        textured = mesh_texture_kind(mesh)
        if textured and int(target_faces):
            raise ValueError("Know3D Save Mesh: this mesh is textured (its maps fit its faces); set target_faces to 0 "
                             "and reduce the faces in Know3D Texture (face_budget)")
        blobs = []
        for i, item in enumerate(core_mesh_to_meshes(mesh)):
            if item.num_faces == 0:
                raise ValueError(f"Know3D Save Mesh: mesh {i} of the batch has no faces; nothing to save")
            item.validate()
            if textured and fmt == "glb":
                blobs.append(textured_glb(mesh, i, item, textured, meta))
                continue
            if not textured:  # a textured mesh keeps its faces (its UVs / colours are per vertex)
                item = postprocess_mesh(item, float(floater_fraction) if remove_floaters else 0.0, int(target_faces))
            blobs.append(mesh_bytes(item, fmt, meta))
        results = []
        for data in blobs:
            saved = write_new_file(output_dir, filename_prefix, fmt, data)
            results.append({"filename": saved.filename, "subfolder": saved.subfolder, "type": "output"})
        first = results[0]
        rel = f"{first['subfolder']}/{first['filename']}" if first["subfolder"] else first["filename"]
        return IO.NodeOutput(rel, ui={"3d": results})


class Know3DRenderNormals(IO.ComfyNode):
    @classmethod
    def define_schema(cls):
        return IO.Schema(
            node_id="Know3DRenderNormals",
            display_name="Render Normals",
            category=f"{CATEGORY}/mesh",
            description=(
                "Render a mesh's normal maps from the front, back, left and right (orthographic, pure "
                "torch, CPU or GPU) as an IMAGE batch: compare back sides at a glance, also headless. "
                "For a batch of meshes the four views of each mesh follow each other."
            ),
            inputs=[
                IO.Mesh.Input("mesh", tooltip="Mesh to render (core MESH, Y-up)."),
                IO.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Side of each square render in pixels."),
                IO.Float.Input("extent", default=0.55, min=0.05, max=10.0, step=0.01,
                               tooltip="Half-width of the view in model units (0.5 frames TRELLIS.2's unit cube exactly)."),
                IO.Combo.Input("background", options=list(BACKGROUNDS), default="black", tooltip="Colour of empty pixels."),
            ],
            outputs=[IO.Image.Output("normals", display_name="normals",
                                     tooltip="Normal maps [4 x meshes, H, W, 3]: front, back, left, right per mesh; colour = 0.5 * camera-space normal + 0.5.")],
        )

    @classmethod
    def execute(cls, mesh, resolution, extent, background="black") -> IO.NodeOutput:
        device = _host.torch_device()
        images = []
        for item in core_mesh_to_meshes(mesh):
            _host.check_interrupted()
            img = render_normals(item.to(device), views=VIEW_ORDER, size=int(resolution), extent=float(extent),
                                 background=BACKGROUNDS[background])
            images.append(img.to(_host.intermediate_device(), torch.float32))
        return IO.NodeOutput(torch.cat(images, dim=0))


NODES = (Know3DSaveMesh, Know3DRenderNormals)
