"""Names shared by the node families: custom socket types and the menu category."""
from ._io import IO

CATEGORY = "Know3D"

# Custom socket types (links between nodes are checked by these names).
KNOW3D_MODEL = IO.Custom("KNOW3D_MODEL")            # TRELLIS.2 geometry networks (+ Know3D branch), managed
KNOW3D_CONDITION = IO.Custom("KNOW3D_CONDITION")    # preprocessed front image + DINOv3 features
KNOW3D_STRUCTURE = IO.Custom("KNOW3D_STRUCTURE")    # sparse structure: occupied voxel coords + occupancy grid
KNOW3D_KNOWLEDGE = IO.Custom("KNOW3D_KNOWLEDGE")    # knowledge_kinds.Knowledge (kind, tensor, provenance)
KNOW3D_TRAJECTORY = IO.Custom("KNOW3D_TRAJECTORY")  # back-view sampling trajectory (sigmas + latents + model inputs)

CUSTOM_TYPES = tuple(t.io_type for t in (KNOW3D_MODEL, KNOW3D_CONDITION, KNOW3D_STRUCTURE, KNOW3D_KNOWLEDGE,
                                         KNOW3D_TRAJECTORY))

SEED_MAX = 0xFFFFFFFFFFFFFFFF
