"""know3d_core: the host-independent Know3D library (never imports ComfyUI).

Layering is one-way: ``sparse`` -> ``trellis2`` / ``knowledge`` / ``mmdit`` -> ``pipeline``.
Imports inside the package are relative, so it works both as a top-level package (pip install)
and as a sub-package of the ComfyUI node pack.
"""
__version__ = "0.1.0"
