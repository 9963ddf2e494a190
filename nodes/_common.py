"""Names shared by the node families: custom socket types and the menu category."""

CATEGORY = "Know3D"

# Custom socket types (any Python object flows between V1 nodes; links are checked by name).
KNOW3D_MODEL = "KNOW3D_MODEL"            # TRELLIS.2 geometry networks (+ Know3D branch), managed
KNOW3D_CONDITION = "KNOW3D_CONDITION"    # preprocessed front image + DINOv3 features
KNOW3D_STRUCTURE = "KNOW3D_STRUCTURE"    # sparse structure: occupied voxel coords + occupancy grid
KNOW3D_KNOWLEDGE = "KNOW3D_KNOWLEDGE"    # knowledge_kinds.Knowledge (kind, tensor, provenance)
KNOW3D_TRAJECTORY = "KNOW3D_TRAJECTORY"  # back-view sampling trajectory (sigmas + latents + model inputs)

CUSTOM_TYPES = (KNOW3D_MODEL, KNOW3D_CONDITION, KNOW3D_STRUCTURE, KNOW3D_KNOWLEDGE, KNOW3D_TRAJECTORY)

SEED_MAX = 0xFFFFFFFFFFFFFFFF
