"""Know3D knowledge injection into the TRELLIS.2 flow DiTs (paper §3.2.1).

- ``kinds``: :class:`Knowledge` (kind, tensor, provenance) and its four kinds.
- ``branch``: the parallel cross-attention branch, ``install_branch``, ``prepare_knowledge``.
- ``lora``: backbone LoRA, merged at load time or attached unmerged.
- ``checkpoint``: the Know3D file format (delta or merged), ``save_know3d`` / ``apply_know3d`` /
  ``load_know3d_merged``.
- ``multi_view``: the back image as a second image condition of plain TRELLIS.2.
"""
from .branch import (
    KnowledgeContext,
    KnowledgeCrossAttention,
    KnowledgeProjector,
    branch_state_dict,
    has_branch,
    install_branch,
    prepare_knowledge,
    remove_branch,
    require_branch,
)
from .checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    MODEL_NAMES,
    Know3DCheckpoint,
    Know3DFormatError,
    Know3DSpec,
    apply_know3d,
    capture_spec,
    load_know3d_merged,
    read_know3d,
    save_know3d,
)
from .kinds import (
    INJECTED_KINDS,
    KINDS,
    Knowledge,
    KnowledgeMismatchError,
    check_knowledge,
    dino_image_knowledge,
    from_mmdit_capture,
    mmdit_hidden_knowledge,
    multi_view_knowledge,
    pack_latent,
    vae_latent_knowledge,
)
from .lora import (
    DEFAULT_LORA_TARGETS,
    LoRAError,
    attach_lora,
    detach_lora,
    init_lora,
    lora_state_dict,
    merge_attached_lora,
    merge_lora,
)
from .multi_view import MULTI_VIEW_MODES, MultiViewCondition, multi_view_condition, multi_view_model_fn

__all__ = [
    "KnowledgeContext", "KnowledgeCrossAttention", "KnowledgeProjector", "branch_state_dict", "has_branch",
    "install_branch", "prepare_knowledge", "remove_branch", "require_branch",
    "FORMAT", "FORMAT_VERSION", "MODEL_NAMES", "Know3DCheckpoint", "Know3DFormatError", "Know3DSpec",
    "apply_know3d", "capture_spec", "load_know3d_merged", "read_know3d", "save_know3d",
    "INJECTED_KINDS", "KINDS", "Knowledge", "KnowledgeMismatchError", "check_knowledge", "dino_image_knowledge",
    "from_mmdit_capture", "mmdit_hidden_knowledge", "multi_view_knowledge", "pack_latent", "vae_latent_knowledge",
    "DEFAULT_LORA_TARGETS", "LoRAError", "attach_lora", "detach_lora", "init_lora", "lora_state_dict",
    "merge_attached_lora", "merge_lora",
    "MULTI_VIEW_MODES", "MultiViewCondition", "multi_view_condition", "multi_view_model_fn",
]
