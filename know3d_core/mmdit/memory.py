"""Small cards: the Qwen networks under a :class:`know3d_core.plan.MemoryPlan`, with what diffusers provides.

* fp8 storage: diffusers' layer-wise casting keeps every Linear/Conv weight in float8 e4m3 and casts it
  to the compute dtype (bf16) just for its own forward; norms and embeddings stay in the compute dtype.
* ``blocks`` placement: diffusers' group offloading keeps the network on the CPU; the MMDiT's blocks
  (``block_level``, one block per group) and the text encoder's layers (``leaf_level``: it has no
  top-level block list) visit the device while they run, the next one prefetched on a side CUDA
  stream (``use_stream``, CUDA only; on the CPU the hooks move nothing).

Networks of the ``model`` placement visit the device whole (``QwenEditBackView.use``), with
``pin_host`` on CUDA from pinned host copies (``know3d_core.device_visits``: diffusers' ``ModuleGroup``;
one copy in per visit, none back); the text encoder visits once per back view, for both prompts.
"""
from __future__ import annotations

import torch

from ..plan import FP8_STORAGE, PLACEMENTS, MemoryPlan

__all__ = ["store_weights", "load_dtypes", "offload_blocks", "apply_memory_plan"]

STORAGE_ATTRIBUTE = "_know3d_weight_storage"  # set on a network whose weights store_weights re-stored


def store_weights(module: torch.nn.Module, storage: str | None, compute_dtype: torch.dtype) -> None:
    """Keep ``module``'s weights in ``storage`` (None: as they are; :data:`FP8_STORAGE`: float8 e4m3),
    computing in ``compute_dtype`` (diffusers' layer-wise casting hooks)."""
    if storage is None or getattr(module, STORAGE_ATTRIBUTE, None) == storage:  # none, or already (at load)
        return
    if storage != FP8_STORAGE:
        raise ValueError(f"unknown weight storage {storage!r}; use None or {FP8_STORAGE!r}")
    fp8 = getattr(torch, FP8_STORAGE)
    if hasattr(module, "enable_layerwise_casting"):  # a diffusers model: its own skip list
        module.enable_layerwise_casting(storage_dtype=fp8, compute_dtype=compute_dtype)
    else:
        from diffusers.hooks import apply_layerwise_casting
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        apply_layerwise_casting(module, storage_dtype=fp8, compute_dtype=compute_dtype,
                                skip_modules_pattern=DEFAULT_SKIP_MODULES_PATTERN)
    setattr(module, STORAGE_ATTRIBUTE, storage)


def load_dtypes(meta_model: torch.nn.Module, storage: str | None, compute_dtype: torch.dtype) -> dict:
    """``{state-dict key: dtype to load it in}`` for a model built on the meta device, its casting hooks
    installed first (:func:`store_weights`): the stored weights go straight to fp8 as they are read,
    so the host never holds the whole network in the compute dtype."""
    store_weights(meta_model, storage, compute_dtype)
    fp8 = getattr(torch, FP8_STORAGE)
    return {k: (fp8 if v.dtype == fp8 else compute_dtype) for k, v in meta_model.state_dict().items()}


def offload_blocks(module: torch.nn.Module, device: torch.device, pin_host: bool = False) -> tuple[str, int]:
    """Group offloading of ``module`` (on the CPU) onto ``device``: ``block_level`` when it has
    ``transformer_blocks`` (the MMDiT), else ``leaf_level``; prefetch on a side stream on CUDA (diffusers
    then pins each weight). With ``pin_host`` the weights are pinned first in chunk buffers
    (``device_visits.pin_in_chunks``: diffusers keeps tensors already pinned, instead of one power-of-two
    pinned allocation per tensor). Returns (the offload type used, bytes pinned here)."""
    from diffusers.hooks import apply_group_offloading

    from ..device_visits import pin_in_chunks

    device = torch.device(device)
    cuda = device.type == "cuda"
    pinned = pin_in_chunks(module)[1] if cuda and pin_host and torch.cuda.is_available() else 0
    level = "block_level" if isinstance(getattr(module, "transformer_blocks", None), torch.nn.ModuleList) \
        else "leaf_level"
    apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"), offload_type=level,
                           num_blocks_per_group=1 if level == "block_level" else None, non_blocking=cuda,
                           use_stream=cuda)
    return level, pinned


def apply_memory_plan(backview, plan: MemoryPlan, device, compute_dtype: torch.dtype, pin_host: bool = False) -> dict:
    """Put a ``QwenEditBackView``'s networks where ``plan`` says, storing weights as it says; with
    ``pin_host`` the offloaded ones move from pinned host copies (``device_visits``).

    Layer-wise casting comes first (group offloading then moves the fp8 weights), and the networks
    the hooks manage are excluded from the back view's own placement. Returns ``{network: how}``
    for the log and the record.
    """
    c = backview.c
    nets = {"transformer": (c.transformer, plan.mmdit_storage, plan.mmdit_placement),
            "text_encoder": (c.text_encoder, plan.text_encoder_storage, plan.text_encoder_placement)}
    for name, (module, storage, placement) in nets.items():
        if placement not in PLACEMENTS:
            raise ValueError(f"plan {plan.name}: unknown placement {placement!r} for {name}")
        if module is not None:
            store_weights(module, storage, compute_dtype)
    backview.compute_dtype = compute_dtype
    hooked = [m for m, _, placement in nets.values() if m is not None and placement == "blocks"]
    backview.place(device, offload=plan.geometry_offload, hooked=hooked, pin_host=pin_host)
    done = {}
    for name, (module, storage, placement) in nets.items():
        if module is None:
            continue
        how = placement
        if placement == "blocks":
            how, backview.block_pins[id(module)] = offload_blocks(module, device, pin_host)
        pinned = backview.pinned_bytes(module)
        if pinned:
            how += f" (pinned host copy {pinned / 2 ** 30:.1f} GiB)"
        done[name] = f"{'fp8' if storage == FP8_STORAGE else str(compute_dtype).replace('torch.', '')}, {how}"
    return done
