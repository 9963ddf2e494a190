"""Common skeleton of the two TRELLIS.2 flow DiTs (constructor arguments, precision, embedders, head).

Precision follows the reference: only the ``nn.Linear`` layers inside ``blocks`` take the model
dtype (bf16 in the official checkpoints); ``input_layer``, ``t_embedder``, ``adaLN_modulation``,
``out_layer``, every norm, RMS gamma and ``modulation`` stay fp32. Activations are cast to the block
dtype before the blocks and back to fp32 for the head.
"""
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, ContextManager, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...plan import dtype_name
from ...sparse.kernel_dispatch import KernelSwitch, KernelWarmup
from .blocks import ModulatedTransformerCrossBlock
from .fused import fused_enabled, gated_residual, layer_norm_modulate, residual_layer_norm_modulate
from .attention import _pow2
from .rope import rope_phases
from .embedder import TimestepEmbedder

__all__ = ["FlowDiT", "parse_dtype", "set_block_precompile", "use_block_precompile", "BLOCK_PRECOMPILE_BY_DEFAULT"]
_log = logging.getLogger(__name__)

# The first forward compiling the blocks' kernels side by side first (without a started warm-up): off.
# Measured on an H100 (session 9, benchmarks/probe_first_calls.py --mode first): the structure flow's first
# call 2.65 s against 3.97 s with an empty Triton cache, but the pipeline's default warm-up at load does
# better over the whole sequence (5.56 against 6.69 s). Off, the first forward compiles each kernel as it
# reaches it.
BLOCK_PRECOMPILE_BY_DEFAULT = False
_block_precompile = KernelSwitch(BLOCK_PRECOMPILE_BY_DEFAULT)


def set_block_precompile(enabled: bool) -> None:
    """Switch the flows' side-by-side precompile at the first forward on or off for the process."""
    _block_precompile.set(enabled)


def use_block_precompile(enabled: bool) -> ContextManager[None]:
    """Context manager: :func:`set_block_precompile` inside the block only."""
    return _block_precompile.use(enabled)

def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """``'bfloat16'``/``'bf16'``/``torch.bfloat16`` ... -> torch dtype (fp32, bf16 or fp16; names as
    ``plan.dtype_name`` reads them)."""
    return getattr(torch, dtype_name(dtype))


class FlowDiT(nn.Module):
    """Shared constructor and helpers of ``SparseStructureFlowModel`` and ``SLatFlowModel``.

    Constructor arguments are those of the official checkpoint JSON ``args``. ``use_checkpoint``
    and ``initialization`` only matter for training and are accepted and ignored; an unknown
    argument raises ``TypeError`` naming it.
    """

    supports_empty_init = True  # no state outside the state dict: loaders may build it on "meta"

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        model_channels: int,
        cond_channels: int,
        out_channels: int,
        num_blocks: int,
        num_heads: Optional[int] = None,
        num_head_channels: Optional[int] = 64,
        mlp_ratio: float = 4,
        pe_mode: str = "ape",
        rope_freq: Sequence[float] = (1.0, 10000.0),
        dtype: Union[str, torch.dtype] = "float32",
        use_checkpoint: bool = False,
        share_mod: bool = False,
        initialization: str = "vanilla",
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
    ):
        super().__init__()
        if pe_mode != "rope":
            raise ValueError(
                f"pe_mode {pe_mode!r} is not implemented: every TRELLIS.2 flow checkpoint uses 'rope'"
            )
        self.config = dict(
            resolution=resolution, in_channels=in_channels, model_channels=model_channels,
            cond_channels=cond_channels, out_channels=out_channels, num_blocks=num_blocks,
            num_heads=num_heads, num_head_channels=num_head_channels, mlp_ratio=mlp_ratio,
            pe_mode=pe_mode, rope_freq=list(rope_freq), dtype=str(dtype).replace("torch.", ""),
            share_mod=share_mod, qk_rms_norm=qk_rms_norm, qk_rms_norm_cross=qk_rms_norm_cross,
        )
        self.resolution = resolution
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.cond_channels = cond_channels
        self.out_channels = out_channels
        self.num_blocks = num_blocks
        self.num_heads = num_heads or model_channels // num_head_channels
        self.head_dim = model_channels // self.num_heads
        self.mlp_ratio = mlp_ratio
        self.pe_mode = pe_mode
        self.rope_freq = tuple(float(f) for f in rope_freq)
        self.share_mod = share_mod
        self.qk_rms_norm = qk_rms_norm
        self.qk_rms_norm_cross = qk_rms_norm_cross

        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.blocks = nn.ModuleList([
            ModulatedTransformerCrossBlock(
                model_channels, cond_channels, num_heads=self.num_heads, mlp_ratio=mlp_ratio,
                use_rope=True, qk_rms_norm=qk_rms_norm, qk_rms_norm_cross=qk_rms_norm_cross,
                share_mod=share_mod,
            )
            for _ in range(num_blocks)
        ])
        self.out_layer = nn.Linear(model_channels, out_channels)
        # Know3D injection point (docs/internals.md): set by knowledge.install_branch.
        self.knowledge_proj: Optional[nn.Module] = None
        self.dtype = torch.float32
        self.convert_to(parse_dtype(dtype))
        self._warmup = KernelWarmup()  # (device, dtype) -> Triton kernels of the blocks run once

    # ------------------------------------------------------------------ kernel warm-up
    def start_kernel_precompile(self, device: Optional[torch.device] = None) -> bool:
        """Start the warm-up in the background (call when the flow is loaded on its device): the
        blocks' fused calls side by side, then one small forward (:meth:`_warmup_inputs`, no grad).
        Triton's start and the kernels' compiles or cache loads, cuBLAS's and the attention's first
        calls then overlap whatever runs before the first real forward, which joins it (re-raising an
        error it hit). True if started. Nothing runs where the fused kernels do not (off CUDA,
        Triton missing or switched off)."""
        device = torch.device(device) if device is not None else self.device
        return self._warmup.start(KernelWarmup.key(device, self.dtype), lambda: self._warm_kernels(device))

    def _warm_kernels(self, device: torch.device) -> bool:
        """The warm-up itself, where the fused kernels run: each fused call of a block once on 16
        tokens, side by side (an empty kernel cache: the compiles overlap), then one forward on
        :meth:`_warmup_inputs` (whatever those missed, cuBLAS, the attention's plans)."""
        if not self._precompile_blocks(device):
            return False
        with torch.no_grad(), torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self(*self._warmup_inputs(device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return True

    def _precompile_blocks(self, device: torch.device) -> bool:
        """:meth:`_kernel_jobs` side by side (thread pool); False (nothing run) where the fused kernels
        do not run. A failing job is logged and left to the forward."""
        if not fused_enabled(torch.empty(0, device=device, dtype=self.dtype)):
            return False
        on_cuda = device.type == "cuda"

        def run(job):
            with torch.no_grad(), torch.cuda.device(device) if on_cuda else contextlib.nullcontext():
                job()

        jobs = self._kernel_jobs(device)
        with ThreadPoolExecutor(len(jobs)) as pool:
            for fut in [pool.submit(run, job) for job in jobs]:
                try:
                    fut.result()
                except Exception as exc:  # noqa: BLE001 - an optimisation only; the forward reports
                    _log.info("flow kernel warm-up: %s: %s (the forward compiles it)", type(exc).__name__, exc)
        return True

    def _kernel_jobs(self, device: torch.device) -> List[Callable[[], Any]]:
        """One call per fused call of a block's forward (the four residual/LayerNorm/modulation forms,
        the self and cross q/k norm + RoPE), through block 0 on 16 zero tokens of the block dtype."""
        block, L = self.blocks[0], 16
        x = torch.zeros(1, L, self.model_channels, device=device, dtype=self.dtype)
        mod = torch.zeros(1, self.model_channels, device=device, dtype=self.dtype)
        ctx = torch.zeros(1, L, self.cond_channels, device=device, dtype=self.dtype)
        rope = rope_phases(torch.zeros(L, 3, device=device), self.head_dim, self.rope_freq)
        n2 = block.norm2
        jobs: List[Callable[[], Any]] = [
            lambda: layer_norm_modulate(x, mod, mod, n2.eps, 1.0, None),
            lambda: residual_layer_norm_modulate(x, x, mod, n2.weight, n2.bias, n2.eps, 0.0, None),
            lambda: residual_layer_norm_modulate(x, x, None, mod, mod, n2.eps, 1.0, None),
            lambda: gated_residual(x, x, mod, None),
        ]
        if _pow2(self.head_dim // 2):  # the fused q/k path's condition (MultiHeadAttention.forward)
            jobs += [lambda: block.self_attn._qkv_fused(x, None, rope),
                     lambda: block.cross_attn._qkv_fused(x, ctx, None)]
        return jobs

    def _warmup_inputs(self, device: torch.device) -> Tuple[Any, torch.Tensor, torch.Tensor]:
        """``(x, t, cond)`` of a small forward that launches the blocks' kernels."""
        raise NotImplementedError

    def _ensure_kernels(self, device: torch.device) -> None:
        """Top of the forward: join a background warm-up of this device and dtype if one was
        started; without one, with :func:`set_block_precompile` on, compile the blocks' kernels side by
        side here (:meth:`_precompile_blocks`, not the warm-up forward); else nothing (the forward
        compiles each kernel as it reaches it)."""
        on = _block_precompile.enabled
        self._warmup.ensure(KernelWarmup.key(device, self.dtype), lambda: on and self._precompile_blocks(device))

    def _warmup_cond(self, device: torch.device, batch: int = 1, tokens: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(t [batch], cond [batch, tokens, cond_channels])`` zeros for :meth:`_warmup_inputs`."""
        return torch.zeros(batch, device=device), torch.zeros(batch, tokens, self.cond_channels, device=device)

    @property
    def device(self) -> torch.device:
        return self.input_layer.weight.device

    def convert_to(self, dtype: Union[str, torch.dtype]) -> "FlowDiT":
        """Cast the ``nn.Linear`` layers inside ``blocks`` to ``dtype`` (the block compute dtype)."""
        self.dtype = parse_dtype(dtype)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                for p in module.parameters():
                    p.data = p.data.to(self.dtype)
        return self

    def _time_modulation(self, t: Union[torch.Tensor, float], batch_size: int) -> torch.Tensor:
        """t ``[B]`` (or scalar), on the reference scale (``1000 * t``) -> mod ``[B, 6C]`` (or ``[B, C]``)
        in the block dtype."""
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        if t.dim() == 0:
            t = t.expand(batch_size)
        if t.shape != (batch_size,):
            raise ValueError(f"t must have shape [{batch_size}] (one time per sample), got {tuple(t.shape)}")
        mod = self.t_embedder(t)
        if self.share_mod:
            mod = self.adaLN_modulation(mod)
        return mod.to(self.dtype)

    def _check_cond(self, cond: torch.Tensor, batch_size: int) -> torch.Tensor:
        """cond ``[B, Lc, cond_channels]`` -> block dtype."""
        if cond.dim() != 3 or cond.shape[0] != batch_size or cond.shape[2] != self.cond_channels:
            raise ValueError(
                f"cond must have shape [{batch_size}, L, {self.cond_channels}], got {tuple(cond.shape)}"
            )
        return cond.to(self.dtype)

    def _knowledge_context(self, knowledge: Any) -> Any:
        """``knowledge_proj(knowledge)`` once per forward (None when no knowledge is given)."""
        if knowledge is None:
            return None
        if self.knowledge_proj is None:
            raise ValueError(
                "knowledge was given but this model has no knowledge branch: install one with "
                "know3d_core.knowledge.install_branch(model, ...) or pass knowledge=None"
            )
        return self.knowledge_proj(knowledge)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm (no affine, eps 1e-5) and ``out_layer`` in fp32: ``[.., C] -> [.., out]``."""
        h = h.float()
        return self.out_layer(F.layer_norm(h, h.shape[-1:]))
