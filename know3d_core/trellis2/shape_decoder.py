"""TRELLIS.2 shape SLat decoder (checkpoint ``shape_dec_next_dc_f16c32_fp16``).

``FlexiDualGridVaeDecoder``: a sparse conv U-Net "up" path. Shape SLat ``[N, 32]`` on the token
grid (32^3 / 64^3 / 96^3) -> ``from_latent`` -> 5 levels of ConvNeXt blocks, the first four ending
in a channel-to-space block that predicts which of each voxel's 8 children exist (x16 in total)
-> LayerNorm -> ``output_layer`` -> per-voxel head ``[N', 7]`` on the mesh grid (512 / 1024 /
1536): dual-vertex offset logits (3), edge-crossing logits (3), quad-split logit (1), decoded into
a flexible dual grid and a mesh by :mod:`.ovoxel`.

Module names follow the official checkpoint: ``from_latent``, ``blocks.L.j.{conv, norm, mlp.0,
mlp.2}``, C2S at ``blocks.L.{num_blocks[L]}.{norm1, conv1, conv2, to_subdiv}``, ``output_layer``.
Sparse conv weights are ``[Co, 3, 3, 3, Ci]``. With ``use_fp16`` the convs and linears inside
``blocks`` are fp16 while LayerNorms compute in fp32 and ``from_latent`` / ``output_layer`` stay
fp32, as in the official model.

Inference only (``forward``/``upsample`` run under ``no_grad``). Memory: levels run one after
another and every intermediate (features, neighbour maps held in a
tensor's cache) is dropped as soon as the next level exists; the ConvNeXt tail (LayerNorm, MLP,
residual) runs as one Triton pass on CUDA at C = 128 / 256 (:mod:`.modules.fused_mlp`: the hidden
layer stays on chip; H100: session6/NOTES.md) and otherwise, like the head, in row chunks, so the
peak is set by the last channel-to-space block. The fp32 LayerNorms (+ SiLU)
run as one pass each (:func:`.modules.fused_norm.layer_norm_act`: a Triton kernel on CUDA, fp32
statistics, one rounding), in place where the input is not needed again; the C2S block normalises
its children straight out of ``conv1``'s output (fused gather) and adds the skip rows in chunks.
"""
from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..mesh.types import Mesh
from ..sparse import NeighbourMap, SparseLinear, SparseTensor, SubMConv3d, channel_to_spatial, child_bits
from ..sparse.child_maps import inherit_child_map
from ..sparse.conv import add_repeated_rows_, submanifold_conv3d_children, submanifold_conv3d_skip
from ..sparse.kernel_dispatch import KernelWarmup
from .modules.fused import fused_enabled
from .modules.fused_mlp import convnext_mlp_, fc2_kernel_ok, mlp_kernel_ok
from .modules.fused_norm import head_kernel_ok, layer_norm_act, layer_norm_linear_triton
from .ovoxel import flexible_dual_grid_to_mesh

__all__ = [
    "FlexiDualGridVaeDecoder",
    "SparseConvNeXtBlock3d",
    "SparseResBlockC2S3d",
    "decode_head",
    "TINY_ARGS",
]

# Tiny config with the real structure (5 levels, 4 subdivisions, no blocks at the last level).
TINY_ARGS = {
    "resolution": 128,
    "model_channels": [32, 16, 16, 8, 8],
    "latent_channels": 32,
    "num_blocks": [1, 1, 1, 1, 0],
    "block_type": ["SparseConvNeXtBlock3d"] * 5,
    "up_block_type": ["SparseResBlockC2S3d"] * 4,
    "block_args": [{}] * 5,
    "use_fp16": True,
}

DEFAULT_CHUNK_ROWS = 1 << 18
HEAD_EPS = 1e-5  # the head's non-affine LayerNorm (the reference's)
PRECOMPILE_THREADS = 8
_log = logging.getLogger(__name__)


def _norm(x: torch.Tensor, norm: Optional[nn.LayerNorm], silu: bool = False, eps: float = 1e-6,
          index: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``silu?(LayerNorm32(x[index]))`` in x's dtype (affine and eps from ``norm`` if given).

    x ``[M, C]``; index ``[N']`` rows (None: all); ``out`` may be ``x`` (in place, no index).
    """
    if norm is None:
        return layer_norm_act(x, None, None, eps, silu, index, out)
    return layer_norm_act(x, norm.weight, norm.bias, norm.eps, silu, index, out)


def _drop_neighbour_maps(x: SparseTensor) -> None:
    """Remove the neighbour maps (and their tile layouts) from x's shared cache."""
    for key in [k for k, v in x.cache.items() if isinstance(v, NeighbourMap)]:
        del x.cache[key]


def _check_block_args(name: str, args: Dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ValueError(f"{name}: unsupported block_args {unknown} (supported: {list(allowed)})")


class SparseConvNeXtBlock3d(nn.Module):
    """``x + mlp(norm(conv(x)))``: submanifold conv C->C, LayerNorm (affine, eps 1e-6, fp32),
    Linear C->rC, SiLU, Linear rC->C. ``SparseTensor [N, C] -> [N, C]``, same coords.

    ``use_checkpoint`` (a training option in the official configs) is accepted and ignored.
    """

    def __init__(self, channels: int, mlp_ratio: float = 4.0, use_checkpoint: bool = False,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS):
        super().__init__()
        self.channels = channels
        self.chunk_rows = chunk_rows
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.conv = SubMConv3d(channels, channels, 3)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, channels))

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.conv(x).feats  # [N, C], owned here: overwritten in place by the MLP's output
        # one Triton pass on CUDA (fused_mlp); else PyTorch ops in row chunks (L2-sized chunks, 24 MiB
        # of hidden, measured slower: session4/NOTES.md)
        return x.replace(convnext_mlp_(h, self.norm, self.mlp[0], self.mlp[2], x.feats, self.chunk_rows))


class SparseResBlockC2S3d(nn.Module):
    """Residual block that doubles the resolution (channel-to-space) with predicted subdivision.

    ``subdiv = to_subdiv(x)`` (logits ``[N, 8]``, child k exists where > 0);
    ``h = conv1(silu(norm1(x)))`` (Ci -> 8*Co) moved to the children; ``h = conv2(silu(norm2(h)))``;
    output ``h + skip`` where skip is ``x``'s channel block k (``Ci/8`` channels) of each child,
    each channel repeated ``Co / (Ci/8)`` times. ``[N, Ci] -> ([N', Co], subdiv logits [N, 8])``.
    """

    def __init__(self, channels: int, out_channels: int, pred_subdiv: bool = True,
                 use_checkpoint: bool = False):
        super().__init__()
        if channels % 8 or out_channels % (channels // 8):
            raise ValueError(
                f"SparseResBlockC2S3d: need channels % 8 == 0 and out_channels % (channels // 8) == 0, "
                f"got {channels} -> {out_channels}"
            )
        self.channels = channels
        self.out_channels = out_channels
        self.pred_subdiv = pred_subdiv
        self.norm1 = nn.LayerNorm(channels, eps=1e-6)
        self.conv1 = SubMConv3d(channels, out_channels * 8, 3)
        self.conv2 = SubMConv3d(out_channels, out_channels, 3)
        # False: the earlier path (conv1 for all 8 children, skip added after conv2), for A/B runs
        self.children_only = True
        if pred_subdiv:
            self.to_subdiv = SparseLinear(channels, 8)

    def subdivision_logits(self, x: SparseTensor) -> torch.Tensor:
        return self.to_subdiv(x).feats

    def forward(self, x: SparseTensor, subdiv: Optional[torch.Tensor] = None,
                release_input_maps: bool = False) -> Tuple[SparseTensor, torch.Tensor]:
        """``release_input_maps``: drop x's cached neighbour maps once ``conv1`` has run (the
        decoder does; a caller that convolves x again afterwards would rebuild them)."""
        if self.pred_subdiv:
            subdiv = self.subdivision_logits(x)
        if subdiv is None:
            raise ValueError("SparseResBlockC2S3d without to_subdiv needs subdiv logits [N, 8]")
        fine, src = self._children(x, subdiv > 0)
        a = x.replace(_norm(x.feats, self.norm1, silu=True))
        if self.children_only:  # conv1 only for the existing children (about half its FLOPs)
            feats = submanifold_conv3d_children(a, self.conv1.weight, self.conv1.bias, src)  # [N', Co]
            feats = _norm(feats, None, silu=True, out=feats)
        else:
            h = self.conv1(a).feats  # [N, 8*Co]
            feats = _norm(h.view(-1, self.out_channels), None, silu=True, index=src)  # [N', Co]
            del h
        del a
        inherit_child_map(x, fine, src)  # conv2's map from the one conv1 used, before it is released
        if release_input_maps:
            _drop_neighbour_maps(x)
        table = x.feats.reshape(-1, self.channels // 8)  # skip: child row i gets parent block src[i]
        if self.children_only:  # the skip added in conv2's epilogue (one rounding)
            out = submanifold_conv3d_skip(fine.replace(feats), self.conv2.weight, self.conv2.bias, table, src)
        else:
            out = add_repeated_rows_(self.conv2(fine.replace(feats)).feats, table, src, DEFAULT_CHUNK_ROWS)
        return fine.replace(out), subdiv

    @staticmethod
    def _children(x: SparseTensor, mask: torch.Tensor) -> Tuple[SparseTensor, torch.Tensor]:
        """Children of the set mask bits, as :func:`channel_to_spatial` orders them: the fine
        SparseTensor (feats ``[N', 1]`` placeholder) and ``src [N']``, the row of each child in
        the ``[N*8, C]`` view of a channel-to-space input (parent * 8 + k)."""
        n = x.feats.shape[0] * 8
        ids = torch.arange(n, dtype=torch.int32 if n < 2**31 else torch.int64, device=x.device)
        fine = channel_to_spatial(x.replace(ids.view(-1, 8)), mask)
        return fine, fine.feats.view(-1)


_BLOCK_TYPES = {"SparseConvNeXtBlock3d": SparseConvNeXtBlock3d}
_UP_BLOCK_TYPES = {"SparseResBlockC2S3d": SparseResBlockC2S3d}
_BLOCK_ARG_NAMES = {"SparseConvNeXtBlock3d": ("mlp_ratio", "use_checkpoint"), "SparseResBlockC2S3d": ("use_checkpoint",)}


def decode_head(feats: torch.Tensor, voxel_margin: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head ``[N, 7]`` -> dual-vertex offsets ``[N, 3]`` in ``(-m, 1+m)`` voxel units, intersected
    flags ``[N, 3]`` bool, split weights ``[N]`` (softplus)."""
    feats = feats.float()
    vertices = (1 + 2 * voxel_margin) * torch.sigmoid(feats[:, 0:3]) - voxel_margin
    intersected = feats[:, 3:6] > 0
    split = F.softplus(feats[:, 6])
    return vertices, intersected, split


class HalfPrecisionBlocks:
    """The reference's mixed precision for the sparse VAEs: with ``use_fp16`` the convs and linears
    inside ``blocks`` run in fp16; the LayerNorms and the input/output layers stay fp32."""

    dtype: torch.dtype

    @property
    def use_fp16(self) -> bool:
        return self.dtype == torch.float16

    def convert_to(self, dtype: torch.dtype) -> None:
        """Cast the convs and linears inside ``blocks`` to ``dtype`` (LayerNorms stay fp32)."""
        self.dtype = dtype
        for module in self.blocks.modules():
            if isinstance(module, (nn.Linear, SubMConv3d)):
                module.to(dtype)

    def convert_to_fp16(self) -> None:
        self.convert_to(torch.float16)

    def convert_to_fp32(self) -> None:
        self.convert_to(torch.float32)


class FlexiDualGridVaeDecoder(HalfPrecisionBlocks, nn.Module):
    """Shape SLat -> flexible-dual-grid head on a grid 16x finer than the tokens.

    Args mirror the official JSON: ``resolution`` (mesh grid; changed by ``set_resolution``),
    ``model_channels`` / ``num_blocks`` / ``block_type`` per level, ``up_block_type`` per
    subdivision, ``block_args`` per level, ``latent_channels``, ``voxel_margin``, ``use_fp16``.
    """

    supports_empty_init = True

    def __init__(
        self,
        resolution: int,
        model_channels: Sequence[int],
        latent_channels: int,
        num_blocks: Sequence[int],
        block_type: Sequence[str],
        up_block_type: Sequence[str],
        block_args: Optional[Sequence[Dict[str, Any]]] = None,
        voxel_margin: float = 0.5,
        use_fp16: bool = False,
    ):
        super().__init__()
        levels = len(num_blocks)
        block_args = [{} for _ in range(levels)] if block_args is None else [dict(a) for a in block_args]
        if not (len(model_channels) == len(block_type) == len(block_args) == levels and len(up_block_type) == levels - 1):
            raise ValueError(
                "FlexiDualGridVaeDecoder: model_channels, num_blocks, block_type, block_args need one entry "
                "per level and up_block_type one per level but the last"
            )
        self.resolution = resolution
        self.model_channels = list(model_channels)
        self.latent_channels = latent_channels
        self.num_blocks = list(num_blocks)
        self.voxel_margin = voxel_margin
        self.out_channels = 7

        self.from_latent = SparseLinear(latent_channels, self.model_channels[0])
        self.output_layer = SparseLinear(self.model_channels[-1], self.out_channels)
        self.blocks = nn.ModuleList()
        for i in range(levels):
            level = nn.ModuleList()
            for _ in range(self.num_blocks[i]):
                level.append(self._make(block_type[i], _BLOCK_TYPES, block_args[i], self.model_channels[i]))
            if i < levels - 1:
                level.append(self._make(up_block_type[i], _UP_BLOCK_TYPES, block_args[i],
                                        self.model_channels[i], self.model_channels[i + 1]))
            self.blocks.append(level)
        self.dtype = torch.float32
        self.convert_to(torch.float16 if use_fp16 else torch.float32)
        self._warmup = KernelWarmup()  # (device, dtype) -> kernel variants run once (precompile)

    @staticmethod
    def _make(name: str, table: Dict[str, type], args: Dict[str, Any], *channels: int) -> nn.Module:
        if name not in table:
            raise ValueError(f"FlexiDualGridVaeDecoder: unsupported block type {name!r} (supported: {list(table)})")
        _check_block_args(name, args, _BLOCK_ARG_NAMES[name])
        return table[name](*channels, **args)

    # ------------------------------------------------------------------ configuration
    @property
    def num_subdivisions(self) -> int:
        return len(self.blocks) - 1

    def set_resolution(self, resolution: int) -> None:
        """Mesh grid size used by :meth:`to_meshes` (token grid x 16)."""
        self.resolution = int(resolution)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: SparseTensor) -> None:
        if x.feats.dim() != 2 or x.feats.shape[1] != self.latent_channels:
            raise ValueError(
                f"FlexiDualGridVaeDecoder: expected SLat feats [N, {self.latent_channels}], got {tuple(x.feats.shape)}"
            )

    def _from_latent(self, x: SparseTensor) -> SparseTensor:
        """``from_latent`` (fp32) then cast to the body dtype, on a fresh cache: nothing the decoder
        builds (neighbour maps, subdivisions) is attached to the caller's tensor."""
        self._check_input(x)
        w, b = self.from_latent.weight, self.from_latent.bias
        feats = F.linear(x.feats.to(w.dtype), w, b).to(self.dtype)
        batch = {"batch_size": x.cache["batch_size"]} if "batch_size" in x.cache else None
        return SparseTensor(feats, x.coords, x.spatial_shape, cache=batch)

    def _level(self, i: int, h: SparseTensor, subs: Optional[List[SparseTensor]]) -> SparseTensor:
        """Run level ``i`` (its ConvNeXt blocks, then its C2S block if any)."""
        for block in self.blocks[i]:
            if isinstance(block, SparseResBlockC2S3d):
                coarse_coords, coarse_shape = h.coords, h.spatial_shape
                h, logits = block(h, release_input_maps=True)
                if subs is not None:
                    subs.append(SparseTensor(logits, coarse_coords, coarse_shape))  # fresh cache: no maps kept
            else:
                h = block(h)
        return h

    # ------------------------------------------------------------------ kernels
    def _kernel_jobs(self, device: torch.device) -> List[Callable[[], Any]]:
        """One call per Triton kernel variant the forward launches, on tiny inputs (none off the
        fused path): every distinct conv configuration, through the conv modules themselves (same
        algorithm choice), the fused ConvNeXt MLP forms, the map kernels, and the LayerNorm at every
        channel width (the flags are run-time arguments, so one call per width and dtype pair covers
        the C2S and head norms). Longest compiles first (the convs), so that the thread pool's last
        round is short."""
        probe = torch.empty(0, device=device, dtype=self.dtype)
        if device.type != "cuda" or not fused_enabled(probe):
            return []
        from ..sparse import neighbour_triton

        jobs = self._conv_jobs(device) + self._mlp_jobs(device)
        if neighbour_triton.available(probe):  # the map kernels compile in jobs of their own
            jobs.extend(neighbour_triton.warmup_jobs(device))
        for c in sorted(set(self.model_channels)):
            x = torch.zeros(16, c, device=device, dtype=self.dtype)
            w = torch.ones(c, device=device)
            jobs.append(lambda x=x, w=w: layer_norm_act(x, w, w, 1e-6))
        jobs.append(self._head_job(device))
        return jobs

    def _head_job(self, device: torch.device) -> Callable[[], Any]:
        """The head's kernel, as :meth:`_head` takes it (fused LayerNorm + linear, or the LayerNorm)."""
        last = torch.zeros(16, self.model_channels[-1], device=device, dtype=self.dtype)
        w, b = self.output_layer.weight, self.output_layer.bias
        with torch.no_grad():  # as the forward asks (the weights require grad)
            fused = w.dtype == torch.float32 and head_kernel_ok(last, w)
        if fused:
            return lambda: layer_norm_linear_triton(last, w, b, HEAD_EPS)
        return lambda: layer_norm_act(last, eps=HEAD_EPS, out_dtype=w.dtype)

    def _conv_jobs(self, device: torch.device) -> List[Callable[[], Any]]:
        """One launch per distinct (form, configuration, bias) of the body's convs, on a 4^3 block of
        voxels whose map is built with torch ops and whose layouts are built here (not raced for)."""
        from ..sparse import conv as sparse_conv
        from ..sparse import conv_triton
        from ..sparse.conv_triton import kernel_config

        if not sparse_conv.implicit_kernel_ok(torch.zeros(1, 16, device=device, dtype=self.dtype)):
            return []  # the convs run on PyTorch ops here: nothing to compile
        r = torch.arange(4, device=device)
        grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
        coords = torch.cat([torch.zeros(64, 1, dtype=grid.dtype, device=device), grid], 1).int()
        nbr = sparse_conv._build_neighbour_map_torch(coords, (4, 4, 4), 3, 1, sparse_conv.DEFAULT_TABLE_BYTES)
        src = torch.arange(64, device=device, dtype=torch.int32) * 9 % 512  # one child per parent, every slot
        jobs: List[Callable[[], Any]] = []
        seen = set()
        for kind, conv in self._conv_launches():
            if (conv.kernel_size, conv.dilation) != (3, 1):
                raise ValueError(f"shape decoder precompile: 3x3x3 convs expected, got {conv}")
            co = conv.out_channels // 8 if kind == "child" else conv.out_channels
            cfg = kernel_config(conv.in_channels, co, self.dtype, kind)
            key = (kind, cfg, conv.bias is not None)
            if key in seen:
                continue
            seen.add(key)
            feats = torch.zeros(64, conv.in_channels, device=device, dtype=self.dtype)
            if kind == "child":
                lay = conv_triton.child_tile_layout(nbr, None, src, cfg.BM)
                jobs.append(lambda f=feats, c=conv, lay=lay, cfg=cfg: conv_triton.conv_children_implicit_gemm(
                    f, nbr, lay, c.weight, c.bias, 64, 8, cfg))
            else:
                lay = conv_triton.tile_layout(nbr, cfg.BM)
                skip = (torch.zeros(512, co, device=device, dtype=self.dtype), src) if kind == "skip" else None
                jobs.append(lambda f=feats, c=conv, lay=lay, cfg=cfg, skip=skip: conv_triton.conv_implicit_gemm(
                    f, lay, c.weight, c.bias, cfg, skip))
        return jobs

    def _mlp_jobs(self, device: torch.device) -> List[Callable[[], Any]]:
        """A ConvNeXt tail per channel width that takes the fused-tail kernel (one variant per width),
        and one for the first width that takes the fc2 GEMM (one variant serves every width)."""
        blocks = {b.channels: b for level in self.blocks for b in level if isinstance(b, SparseConvNeXtBlock3d)}
        jobs: List[Callable[[], Any]] = []
        fc2_done = False
        for c, block in sorted(blocks.items()):
            h = torch.zeros(16, c, device=device, dtype=self.dtype)
            with torch.no_grad():
                params = list(block.parameters())
                tail, fc2 = mlp_kernel_ok(h, *params), fc2_kernel_ok(h, *params)
            if tail or (fc2 and not fc2_done):
                jobs.append(lambda h=h, b=block: convnext_mlp_(h, b.norm, b.mlp[0], b.mlp[2], torch.zeros_like(h)))
                fc2_done = fc2_done or not tail
        return jobs

    def _conv_launches(self) -> List[Tuple[str, SubMConv3d]]:
        """Each conv of the body with the kernel form the forward launches it in: ``"plain"``,
        ``"child"`` (C2S conv1, existing children only) or ``"skip"`` (C2S conv2 + skip)."""
        out: List[Tuple[str, SubMConv3d]] = []
        for level in self.blocks:
            for block in level:
                if isinstance(block, SparseResBlockC2S3d) and block.children_only:
                    out += [("child", block.conv1), ("skip", block.conv2)]
                else:
                    out += [("plain", m) for m in block.modules() if isinstance(m, SubMConv3d)]
        return out

    def precompile_kernels(self, device: Optional[torch.device] = None, threads: int = PRECOMPILE_THREADS) -> int:
        """Run every Triton kernel variant of the forward once, from a thread pool.

        Where no compiled kernels are on disk yet (a new install, a new Triton), they compile side by
        side: 2.5 s instead of 5.4-5.9 s one after another for the official decoder on the H100
        machine (``benchmarks/probe_parallel_compile.py``); afterwards they only load. Runs by itself
        on the first forward/upsample per device and dtype. Returns the number of variants run (0 off
        CUDA or with the fused kernels off). A failing variant is logged and left to the forward.
        """
        device = torch.device(device) if device is not None else self.from_latent.weight.device
        jobs = self._kernel_jobs(device)
        if not jobs:
            return 0
        on_cuda = device.type == "cuda"

        def run(job):
            with torch.no_grad(), torch.cuda.device(device) if on_cuda else contextlib.nullcontext():
                job()

        with ThreadPoolExecutor(max(1, min(threads, len(jobs)))) as pool:
            for fut in [pool.submit(run, job) for job in jobs]:
                try:
                    fut.result()
                except Exception as exc:  # noqa: BLE001 - an optimisation only; the forward reports
                    _log.info("kernel precompile: %s: %s (the forward compiles it)", type(exc).__name__, exc)
        if on_cuda:
            torch.cuda.synchronize(device)
        return len(jobs)

    def start_kernel_precompile(self, device: Optional[torch.device] = None) -> bool:
        """Start :meth:`precompile_kernels` in the background (call when the decoder is loaded on its
        device): the compiles or cache loads, and Triton's own start, overlap whatever runs before the
        first forward/upsample, which joins it (and re-raises an error it hit). True if started (not
        for a device and dtype already warmed or pending). Off CUDA the thread finds nothing to do."""
        device = torch.device(device) if device is not None else self.from_latent.weight.device
        return self._warmup.start(self._warmup_key(device), lambda: self.precompile_kernels(device))

    def _warmup_key(self, device: torch.device) -> tuple:
        return KernelWarmup.key(device, self.dtype)

    def _ensure_kernels(self, device: torch.device) -> None:
        """Before the first forward/upsample per device and dtype: join the background precompile
        (:meth:`start_kernel_precompile`) or run :meth:`precompile_kernels` here."""
        self._warmup.ensure(self._warmup_key(device), lambda: self.precompile_kernels(device))

    @torch.no_grad()
    def forward(self, x: SparseTensor, return_subs: bool = False):
        """SLat ``x`` (feats ``[N, latent]``, any float dtype) -> head SparseTensor ``[N', 7]`` fp32
        on the grid 16x finer; with ``return_subs`` also the 4 subdivision logit tensors ``[N_l, 8]``
        (on the coarse coords of each C2S block)."""
        self._ensure_kernels(x.feats.device)
        h = self._from_latent(x)
        subs: Optional[List[SparseTensor]] = [] if return_subs else None
        for i in range(len(self.blocks)):
            h = self._level(i, h, subs)
        out = self._head(h)
        return (out, subs) if return_subs else out

    def _head(self, h: SparseTensor) -> SparseTensor:
        """Final non-affine LayerNorm (fp32) and ``output_layer``: one Triton pass where it runs
        (:func:`.modules.fused_norm.layer_norm_linear_triton`), else in row chunks; fresh cache."""
        w, b = self.output_layer.weight, self.output_layer.bias
        if w.dtype == torch.float32 and head_kernel_ok(h.feats, w):
            out = layer_norm_linear_triton(h.feats, w, b, HEAD_EPS)
        else:
            out = torch.empty(h.feats.shape[0], self.out_channels, device=h.device, dtype=w.dtype)
            for start in range(0, h.feats.shape[0], DEFAULT_CHUNK_ROWS):
                z = layer_norm_act(h.feats[start:start + DEFAULT_CHUNK_ROWS], eps=HEAD_EPS, out_dtype=w.dtype)
                torch.addmm(b, z, w.t(), out=out[start:start + DEFAULT_CHUNK_ROWS])
        cache = {"batch_size": h.cache["batch_size"]} if "batch_size" in h.cache else None
        return SparseTensor(out, h.coords, h.spatial_shape, cache=cache)

    @torch.no_grad()
    def upsample(self, x: SparseTensor, upsample_times: int = 4) -> torch.Tensor:
        """Voxel coords ``[N', 4]`` int32 after ``upsample_times`` predicted subdivisions.

        Same coords as the official ``upsample``; the last subdivision only evaluates its
        ``to_subdiv`` (its convs cannot change the coords).
        """
        if not 0 <= upsample_times <= self.num_subdivisions:
            raise ValueError(f"upsample_times must be in [0, {self.num_subdivisions}], got {upsample_times}")
        self._ensure_kernels(x.feats.device)
        h = self._from_latent(x)
        if upsample_times == 0:
            return h.coords
        for i in range(upsample_times - 1):
            h = self._level(i, h, None)
        *convnext, c2s = self.blocks[upsample_times - 1]
        for block in convnext:
            h = block(h)
        mask = c2s.subdivision_logits(h) > 0
        parent, k = mask.nonzero(as_tuple=True)
        coords = h.coords[parent].clone()
        coords[:, 1:] = coords[:, 1:] * 2 + child_bits(coords.device)[k]
        return coords

    # ------------------------------------------------------------------ meshes
    def to_meshes(self, head: SparseTensor, resolution: Optional[int] = None) -> List[Mesh]:
        """Head ``[N, 7]`` -> one raw :class:`Mesh` per batch item (model space, not cleaned)."""
        res = self.resolution if resolution is None else int(resolution)
        vertices, intersected, split = decode_head(head.feats, self.voxel_margin)
        meshes = []
        for rows in head.layout:
            v, f = flexible_dual_grid_to_mesh(
                head.coords[rows, 1:], vertices[rows], intersected[rows], split[rows], res
            )
            meshes.append(Mesh(v, f, {"resolution": res}))
        return meshes

    @torch.no_grad()
    def decode(self, x: SparseTensor, resolution: Optional[int] = None) -> List[Mesh]:
        """SLat -> raw meshes (``forward`` then ``to_meshes``)."""
        return self.to_meshes(self.forward(x), resolution)
