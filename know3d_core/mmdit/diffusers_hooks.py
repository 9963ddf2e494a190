"""Diffusers host adapter: forward hooks on ``QwenImageTransformer2DModel.transformer_blocks``.

Each block is called with keyword arguments and returns ``(encoder_hidden_states, hidden_states)``
= (text stream, image stream); the image stream is ``[target | ref_1 | ref_2 ...]``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .capture import HiddenStateCollector


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The dual-stream block list of a Qwen-Image MMDiT (diffusers and ComfyUI both name it so)."""
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `transformer_blocks` ModuleList; "
                        "expected a Qwen-Image MMDiT")
    return blocks


def _image_stream(output) -> torch.Tensor:
    if not (isinstance(output, (tuple, list)) and len(output) == 2):
        raise TypeError("a Qwen-Image block must return (text_stream, image_stream); got "
                        f"{type(output).__name__}")
    return output[1]


@contextmanager
def capture_block_outputs(model: torch.nn.Module, collector: HiddenStateCollector, n_target: int,
                          cond_rows=None) -> Iterator[HiddenStateCollector]:
    """Install forward hooks on the collector's layers for the duration of the ``with`` block.

    Every forward run inside the block feeds ``collector.collect(i, image_stream, n_target,
    cond_rows)``. Hooks are removed on every exit path, exceptions included.
    """
    blocks = transformer_blocks(model)
    bad = [i for i in collector.layers if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"capture layers {bad} out of range for {len(blocks)} blocks")
    handles = []
    try:
        for i in collector.layers:
            def hook(module, args, kwargs, output, _i=i):
                collector.collect(_i, _image_stream(output), n_target, cond_rows)
            handles.append(blocks[i].register_forward_hook(hook, with_kwargs=True))
        yield collector
    finally:
        for h in handles:
            h.remove()
