"""Mesh type, clean-up, export (GLB/OBJ/PLY/STL) and normal-map renders. Pure torch + trimesh."""
from .cleanup import (
    clean_mesh,
    face_components,
    merge_duplicate_vertices,
    orient_faces,
    postprocess_mesh,
    remove_degenerate_faces,
    remove_floaters,
    remove_unreferenced_vertices,
)
from .export import FORMATS, mesh_bytes, save_mesh, y_up_to_z_up, z_up_to_y_up
from .render import VIEWS, rasterize, render_normals
from .types import Mesh

__all__ = [
    "Mesh",
    "clean_mesh",
    "face_components",
    "merge_duplicate_vertices",
    "orient_faces",
    "postprocess_mesh",
    "remove_degenerate_faces",
    "remove_floaters",
    "remove_unreferenced_vertices",
    "FORMATS",
    "mesh_bytes",
    "save_mesh",
    "y_up_to_z_up",
    "z_up_to_y_up",
    "VIEWS",
    "rasterize",
    "render_normals",
]
