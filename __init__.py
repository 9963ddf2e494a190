"""ComfyUI entry point of ComfyUI-Know3D.

ComfyUI imports this folder as a package. It must also import in plain Python with no
ComfyUI present (tests do that), so the node modules import ``comfy`` lazily and use a hostless
stand-in of the V3 node API there (nodes/_io.py).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
