"""Training settings shared by every task (torch-free: the command line builds them).

Defaults follow TRELLIS.2's released trainers (research/training.md): AdamW lr 1e-4, weight decay
0.01, betas (0.9, 0.95), eps 1e-8; EMA rate 0.9999; bf16 autocast; ``max_tokens`` 8192 per
micro-batch for the sparse shape flows; ``p_uncond`` 0.1 (image-condition dropout). Gradient clipping
uses a fixed max norm of 1.0 (the reference clips adaptively at the 95th percentile of recent norms,
capped at 1.0; a fixed cap is the simpler, deterministic choice).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

from ..plan import DINO_IMAGE, MMDIT_HIDDEN, VAE_LATENT

__all__ = ["TrainConfig", "TASKS", "STAGES", "KNOWLEDGE_SOURCES", "SOURCE_KIND", "RESUME_KEYS"]

TASKS = ("know3d", "trellis2", "backview", "knowledge")
STAGES = ("ss", "shape512", "shape1024")
# --knowledge-source -> the knowledge kind it makes (the paper's ablation rows): ``trajectory`` and
# ``gt_latent`` capture MMDiT hidden states; ``latent`` is the fully denoised back-view latent,
# ``image`` the DINOv3 features of the decoded back view (the pipeline's ``latent`` / ``image`` variants).
SOURCE_KIND = {"trajectory": MMDIT_HIDDEN, "gt_latent": MMDIT_HIDDEN, "latent": VAE_LATENT, "image": DINO_IMAGE}
KNOWLEDGE_SOURCES = tuple(SOURCE_KIND)

# Settings that must not change between an interrupted run and its resume (the rest may: log
# cadence, workers, checkpoint cadence, the step at which this invocation stops).
RESUME_KEYS = (
    "task", "stage", "seed", "lr", "weight_decay", "betas", "eps", "batch_size", "max_tokens", "grad_accum",
    "ema_rate", "grad_clip", "p_uncond", "p_uncond_knowledge", "lora_rank", "lora_alpha", "full", "warmup_steps",
    "knowledge_source", "sigma", "layers", "p_description", "steps", "vae_image_area", "knowledge_seeds",
)


@dataclass
class TrainConfig:
    """Every setting of one training run (see ``know3d train --help`` for each one's meaning).

    ``batch_size`` is the micro-batch (samples per forward per process); the global batch per
    optimiser step is ``batch_size * grad_accum * world_size`` (for the sparse shape flows each
    micro-batch also stops at ``max_tokens`` voxel tokens).
    """

    task: str
    data: str
    out: str
    models: Optional[str] = None          # TRELLIS.2 folder (know3d, trellis2)
    qwen: Optional[str] = None            # Qwen-Image-Edit-2511 diffusers folder (know3d trajectory, backview)
    dinov3: Optional[str] = None
    stage: str = "ss"
    steps: int = 1000
    stop_after: Optional[int] = None      # stop this invocation after this many steps (checkpoint, exit 0)
    batch_size: int = 2
    max_tokens: int = 8192
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    ema_rate: float = 0.9999
    grad_clip: float = 1.0
    p_uncond: float = 0.1
    p_uncond_knowledge: float = 0.1
    seed: int = 0
    device: Optional[str] = None          # default: cuda:LOCAL_RANK when available, else cpu
    precision: str = "auto"               # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    grad_checkpointing: bool = False
    fsdp: bool = False
    fused_kernels: bool = True            # CUDA: the fused Triton kernels (with their backward passes)
    num_workers: int = 2
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    val_every: int = 0                    # steps between validation sheets (flow tasks; 0: off)
    val_pairs: int = 4
    val_steps: int = 12                   # sampler steps per stage of the validation meshes
    resume: bool = False
    progress: bool = True
    export_weights: str = "model"         # model | ema
    # know3d / trellis2
    lora_rank: int = 64
    lora_alpha: Optional[float] = None    # default: the rank (scale 1)
    full: bool = False                    # trellis2: full fine-tuning instead of LoRA
    init: Optional[str] = None            # know3d: a Know3D checkpoint to continue from (earlier stage)
    knowledge_source: str = "trajectory"
    knowledge_cache: Optional[str] = None
    knowledge_seeds: int = 1              # back-view noise seeds per pair; a draw picks one each time a pair is used
    sigma: Optional[float] = None
    layers: Optional[Tuple[int, ...]] = None
    back_steps: int = 40
    back_size: Optional[Tuple[int, int]] = None
    true_cfg_scale: float = 4.0
    vae_image_area: Optional[int] = None  # VAE copy of the front image (default: generation's 1024^2)
    backview_loras: Tuple[str, ...] = ()
    # backview
    p_description: float = 0.5
    image_size: Optional[Tuple[int, int]] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        if self.back_size is not None:
            self.back_size = tuple(int(i) for i in self.back_size)
        if self.image_size is not None:
            self.image_size = tuple(int(i) for i in self.image_size)
        self.backview_loras = tuple(self.backview_loras)

    def global_micro_batches(self, world_size: int) -> int:
        """Micro-batches per optimiser step over all processes."""
        return self.grad_accum * world_size

    def to_json(self) -> Dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def resume_view(self) -> Dict[str, Any]:
        """The settings a resume must keep (JSON-normalised)."""
        data = self.to_json()
        return {k: data[k] for k in RESUME_KEYS}

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
