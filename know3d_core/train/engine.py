"""The training engine: one code path from one CPU process to many GPUs on many nodes.

Launch with ``torchrun`` (``torchrun --nproc_per_node 8 -m know3d_core.cli train ...``): the
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables it sets select the process group (NCCL on CUDA,
gloo on the CPU); a plain ``know3d train`` is a world of one. Trainable parameters are wrapped in
DDP, or sharded with FSDP2 (``torch.distributed.fsdp.fully_shard`` per block, ``--fsdp``) when the
model does not fit one card.

A step: ``grad_accum`` micro-batches per process (DDP synchronises on the last one only), each loss
scaled by ``1 / grad_accum`` so the update averages the micro-batch losses of all processes; then
the loss is checked finite on every process (a NaN/inf stops the run with a message and leaves the
last good checkpoint in place), gradients are clipped, AdamW steps, the scheduler steps and the EMA
(fp32 copies of the trainables) follows.

Determinism: the noise, times and condition dropout of micro-batch ``g`` come from a generator
seeded by (seed, g) (``dataset.micro_generator``), the data order from (seed, epoch); checkpoints
hold the trainables, optimiser, scheduler, EMA, every process's RNG states and the data position.
On the CPU a resumed run equals an uninterrupted one bit for bit, and N processes equal one
process with N-fold accumulation (up to the order of the gradient all-reduce sum).

Checkpoints: ``RUN/checkpoints/step_XXXXXXX/`` (``state.pt`` + ``rng_<rank>.pt``), published by
renaming a finished temporary folder, with ``RUN/checkpoints/latest`` naming the newest; the
``keep_checkpoints`` newest are kept.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import UsageError
from ..fileio import atomic_write_bytes
from .config import TrainConfig
from .dataset import MicroBatchPlan, RankBatchSampler, micro_generator
from .logs import RunLogger

__all__ = ["DistInfo", "TrainingDiverged", "Task", "EMA", "init_distributed", "pick_device", "train", "checkpoint_blocks",
           "CHECKPOINT_DIR", "latest_checkpoint"]

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.pt"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf."""


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


class Task:
    """What a training task provides to the engine (see ``flows.FlowTask``, ``backview.BackViewTask``).

    Attributes set by :meth:`setup`: ``module`` (an ``nn.Module`` whose ``forward(**inputs)`` returns
    the scalar loss of one micro-batch; wrapped in DDP/FSDP), ``dataset`` (map-style, picklable,
    deterministic: item i -> a sample dict), ``tokens`` (per-sample token counts for the batching).
    """

    name = "task"
    module: nn.Module
    dataset: Any
    tokens: List[int]

    def setup(self, cfg: TrainConfig, info: DistInfo) -> None:
        raise NotImplementedError

    def trainable(self) -> Dict[str, nn.Parameter]:
        """Trainable parameters by stable name (checkpoint keys; order = optimiser order)."""
        raise NotImplementedError

    @staticmethod
    def collate(samples: List[dict]) -> dict:
        raise NotImplementedError

    def prepare(self, batch: dict, generator: torch.Generator) -> Dict[str, Any]:
        """A collated micro-batch -> the module's keyword inputs on the device (all random draws
        from ``generator``, in a fixed order)."""
        raise NotImplementedError

    def enable_grad_checkpointing(self) -> None:
        raise NotImplementedError

    def fsdp_units(self) -> List[nn.Module]:
        """Sub-modules to shard one by one with ``--fsdp`` (before the root)."""
        return []

    def batch_size_of(self, batch: dict) -> int:
        return len(batch["pairs"])

    def export(self, folder: str, values: Dict[str, torch.Tensor], step: int) -> List[str]:
        """Write the trained result (``values``: trainables by name, model or EMA) into ``folder``."""
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        return {"task": self.name}

    def validate(self, step: int) -> Optional[str]:
        """Write a validation sheet for ``step`` (main process only); None when the task has none."""
        return None


# ------------------------------------------------------------------------------ distributed
def pick_device(cfg: TrainConfig) -> torch.device:
    """``--device`` (``cuda`` means this process's ``LOCAL_RANK``), else cuda:LOCAL_RANK when available."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)
    else:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
        torch.cuda.set_device(device)
    return device


def init_distributed(cfg: TrainConfig) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (a world of one without)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def _all_reduce(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t)
    return t


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ pieces
class EMA:
    """Exponential moving average of the trainables (fp32): ``e <- rate e + (1 - rate) p``."""

    def __init__(self, params: Dict[str, nn.Parameter], rate: float):
        self.rate = float(rate)
        self.values = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: Dict[str, nn.Parameter]) -> None:
        keys = list(self.values)
        torch._foreach_lerp_([self.values[k] for k in keys], [params[k].detach().float() for k in keys],
                             1.0 - self.rate)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.values.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for k, v in self.values.items():
            v.copy_(state[k])


def checkpoint_blocks(blocks) -> None:
    """Gradient checkpointing: each block's activations are recomputed in the backward pass
    (non-reentrant ``torch.utils.checkpoint``; the state-dict keys stay unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        forward = block.forward

        def run(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = run


def _autocast(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _fused_switch(cfg: TrainConfig):
    """The fused Triton kernels (CUDA; they have backward passes) on, unless ``--no-fused-kernels``."""
    from ..trellis2.modules.fused import use_fused_kernels

    return use_fused_kernels(bool(cfg.fused_kernels))


def _lr_lambda(warmup: int):
    def f(step: int) -> float:
        return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)
    return f


def _wrap(task: Task, cfg: TrainConfig, info: DistInfo) -> nn.Module:
    module = task.module
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        if not info.distributed:
            raise UsageError("--fsdp shards over several processes: launch with torchrun --nproc_per_node N")
        for unit in task.fsdp_units():
            fully_shard(unit)
        fully_shard(module)
        return module
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=None, broadcast_buffers=False)
    return module


def _no_sync(wrapped: nn.Module, last: bool):
    if last or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def _full_values(params: Dict[str, nn.Parameter]) -> Dict[str, torch.Tensor]:
    """Trainables as full CPU tensors (FSDP2 DTensors gathered; a collective on every rank)."""
    out = {}
    for k, p in params.items():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[k] = t.to("cpu", copy=True)
    return out


# ------------------------------------------------------------------------------ checkpoints
def _checkpoint_root(out: str) -> str:
    return os.path.join(out, CHECKPOINT_DIR)


def latest_checkpoint(out: str) -> Optional[str]:
    """Folder of the newest complete checkpoint of run ``out`` (None when there is none)."""
    root = _checkpoint_root(out)
    try:
        with open(os.path.join(root, LATEST), "r", encoding="utf-8") as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    path = os.path.join(root, name)
    return path if os.path.isfile(os.path.join(path, STATE_FILE)) else None


def _save_checkpoint(out: str, step: int, state: Dict[str, Any], info: DistInfo, keep: int) -> str:
    root = _checkpoint_root(out)
    name = f"step_{step:07d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}")
    if info.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(info)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_{info.rank}.pt"))
    if info.is_main:
        torch.save(state, os.path.join(tmp, STATE_FILE))
    _barrier(info)
    if info.is_main:
        for f in os.listdir(tmp):
            with open(os.path.join(tmp, f), "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_bytes(os.path.join(root, LATEST), name.encode())
        done = sorted(d for d in os.listdir(root) if d.startswith("step_"))
        for old in done[:-max(1, keep)]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier(info)
    return final


# ------------------------------------------------------------------------------ the loop
def _check_run_folder(cfg: TrainConfig) -> Optional[str]:
    """The checkpoint to resume from (None: a fresh run); UsageError when --resume and a fresh
    folder disagree with what is there."""
    found = latest_checkpoint(cfg.out)
    if cfg.resume and found is None:
        raise UsageError(f"--resume: {cfg.out} has no checkpoint ({CHECKPOINT_DIR}/{LATEST}); start without --resume")
    if not cfg.resume and found is not None:
        raise UsageError(f"--out {cfg.out} already holds a run ({found}); pass --resume to continue it "
                         "or choose another --out")
    return found


def _load_state(path: str, cfg: TrainConfig, info: DistInfo, micro_per_step: int) -> Dict[str, Any]:
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
    saved, now = state["config"], cfg.resume_view()
    changed = sorted(k for k in now if saved.get(k) != now[k])
    if changed:
        raise UsageError(f"--resume: {path} was trained with other settings ("
                         + ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed[:4])
                         + "); resume with the same settings or start a new --out")
    if state["micro_per_step"] != micro_per_step:
        raise UsageError(f"--resume: {path} ran {state['micro_per_step']} micro-batches per step "
                         f"(--grad-accum x processes), this launch {micro_per_step}; keep the global batch")
    rng = os.path.join(path, f"rng_{info.rank}.pt")
    if os.path.isfile(rng):
        state["rng"] = torch.load(rng, map_location="cpu", weights_only=False)
    return state


def train(task: Task, cfg: TrainConfig) -> Dict[str, Any]:
    """Run ``task`` with ``cfg`` (see the module docstring). Returns a summary
    ``{"step", "loss", "exported": [files], "checkpoint"}``; raises ``UsageError`` on bad input
    (before training where it can be known then) and :class:`TrainingDiverged` on NaN/inf."""
    info = init_distributed(cfg)
    try:
        return _train(task, cfg, info)
    finally:
        if info.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(task: Task, cfg: TrainConfig, info: DistInfo) -> Dict[str, Any]:
    if cfg.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {cfg.steps}")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise UsageError("--batch-size and --grad-accum must be >= 1")
    resume_from = _check_run_folder(cfg)
    if cfg.fsdp and resume_from:
        raise UsageError("--resume of an --fsdp run is not supported yet; resume it without --fsdp (the "
                         "checkpoints hold full tensors) or start a new --out")
    seed_everything(cfg.seed + info.rank)
    task.setup(cfg, info)
    params = task.trainable()
    if not params:
        raise UsageError(f"task {task.name}: nothing to train")
    micro_per_step = cfg.global_micro_batches(info.world)
    state = _load_state(resume_from, cfg, info, micro_per_step) if resume_from else None
    if state is not None:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state["trainable"][k])
    if cfg.grad_checkpointing:
        task.enable_grad_checkpointing()
    wrapped = _wrap(task, cfg, info)
    params = task.trainable()  # FSDP2 replaces parameters by sharded ones
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps))
    ema = EMA(_full_values(params) if cfg.fsdp else params, cfg.ema_rate)
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ema.load_state_dict(state["ema"])
        if "rng" in state:
            _set_rng_state(state["rng"])
        start = int(state["step"])
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + int(cfg.stop_after))
    plan = MicroBatchPlan(task.tokens, cfg.batch_size, cfg.max_tokens, cfg.seed)
    sampler = RankBatchSampler(plan, info.rank, info.world, cfg.grad_accum, start, end)
    loader = torch.utils.data.DataLoader(task.dataset, batch_sampler=sampler, collate_fn=task.collate,
                                         num_workers=cfg.num_workers)
    logger = RunLogger(cfg.out, info.is_main, start, cfg.steps, cfg.progress)
    last_ckpt = resume_from
    summary: Dict[str, Any] = {"step": start, "loss": None, "exported": [], "checkpoint": last_ckpt}
    batches: Iterator[dict] = iter(loader)
    wrapped.train()
    try:
        with _fused_switch(cfg):
            for step in range(start, end):
                t0 = time.perf_counter()
                loss_sum, samples = _step(task, cfg, info, wrapped, batches, sampler, step, plan)
                stats = torch.tensor([loss_sum, float(samples)], dtype=torch.float64, device=info.device)
                _all_reduce(stats, info)
                mean_loss = float(stats[0]) / micro_per_step
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(
                        f"the loss is {mean_loss} at step {step + 1}: training stopped; "
                        + (f"the last good checkpoint {last_ckpt} is kept" if last_ckpt else "no checkpoint was written yet")
                        + " (lower --lr, or check the data for non-finite latents)")
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm))
                if not math.isfinite(norm):
                    raise TrainingDiverged(f"the gradient norm is {norm} at step {step + 1}: training stopped; "
                                           f"the last good checkpoint {last_ckpt} is kept")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                ema.update(_full_values(params) if cfg.fsdp else params)
                done = step + 1
                elapsed = time.perf_counter() - t0
                logger.log(done, mean_loss, optimizer.param_groups[0]["lr"], norm, float(stats[1]) / elapsed,
                           every=cfg.log_every)
                summary.update(step=done, loss=mean_loss)
                if info.is_main and cfg.val_every and (done % cfg.val_every == 0 or done == cfg.steps):
                    with _autocast(cfg, info.device):
                        summary["validation"] = task.validate(done)
                if done % cfg.checkpoint_every == 0 or done == end:
                    last_ckpt = _save_checkpoint(cfg.out, done, _state(cfg, done, params, optimizer, scheduler,
                                                                       ema, micro_per_step, task, wrapped),
                                                 info, cfg.keep_checkpoints)
                    summary["checkpoint"] = last_ckpt
                    logger.plot()  # RUN/loss.png follows the checkpoints
    except torch.OutOfMemoryError:
        raise UsageError(f"out of memory at step {summary['step'] + 1} (--batch-size {cfg.batch_size}, --max-tokens "
                         f"{cfg.max_tokens}): lower them, add --grad-checkpointing, or shard with --fsdp") from None
    finally:
        logger.close()
        del batches
    if summary["step"] == cfg.steps:
        values = ema.state_dict() if cfg.export_weights == "ema" else _full_values(params)
        if info.is_main:
            summary["exported"] = task.export(os.path.join(cfg.out, "export"), values, cfg.steps)
            logger.plot()
        _barrier(info)
    return summary


def _step(task, cfg, info, wrapped, batches, sampler, step, plan):
    """One optimiser step's forward/backward over ``grad_accum`` micro-batches of this process."""
    loss_sum, samples = 0.0, 0
    for a in range(cfg.grad_accum):
        batch = next(batches)
        g = sampler.global_index(step, a)
        inputs = task.prepare(batch, micro_generator(cfg.seed, g))
        with _no_sync(wrapped, a == cfg.grad_accum - 1):
            with _autocast(cfg, info.device):
                loss = wrapped(**inputs)
            (loss / cfg.grad_accum).backward()
        loss_sum += float(loss.detach())
        samples += task.batch_size_of(batch)
    return loss_sum, samples


def _optimizer_state(optimizer, wrapped, cfg) -> Dict[str, Any]:
    """AdamW state; with FSDP2 gathered to full tensors (a collective: every rank calls it)."""
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(wrapped, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def _state(cfg, step, params, optimizer, scheduler, ema, micro_per_step, task, wrapped) -> Dict[str, Any]:
    return {
        "step": step,
        "config": cfg.resume_view(),
        "micro_per_step": micro_per_step,
        "trainable": _full_values(params),
        "optimizer": _optimizer_state(optimizer, wrapped, cfg),
        "scheduler": scheduler.state_dict(),
        "ema": ema.state_dict(),
        "data_position": step * micro_per_step,
        "task": task.describe(),
    }
