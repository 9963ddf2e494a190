"""ComfyUI host adapter: a ``double_block`` patch callable (no ComfyUI import).

ComfyUI's Qwen-Image model calls every ``transformer_options["patches"]["double_block"]`` entry
after each block with ``{"img", "txt", "x", "block_index", "transformer_options"}`` and uses the
returned ``img``/``txt``. ``img`` is ``[B, N_target + sum(reference_image_num_tokens), C]``; the
batch is made of ``len(cond_or_uncond)`` equal chunks, 0 = positive (cond), 1 = negative; the
current noise level is ``transformer_options["sigmas"]`` and the full schedule
``transformer_options["sample_sigmas"]``. Register with
``model.clone().set_model_double_block_patch(ComfyQwenCapture(spec))``.
"""
from __future__ import annotations

import math

import torch

from .capture import CaptureSpec, HiddenStateCollector, MMDiTKnowledge
from .schedule import StepChoice, nearest_step


class CaptureComplete(Exception):
    """Raised by the patch (when ``stop_when_complete``) once every layer is captured, to end
    sampling early. The node that runs the sampler catches it; ComfyUI's sampler cleans its
    patches in ``finally`` blocks."""


def cond_rows_from_cond_or_uncond(cond_or_uncond, batch_rows: int) -> list[int]:
    """Batch rows of the positive (cond) chunks: ``cond_or_uncond`` lists one 0/1 per chunk."""
    if not cond_or_uncond:
        return list(range(batch_rows))
    chunks = len(cond_or_uncond)
    if batch_rows % chunks:
        raise ValueError(f"batch of {batch_rows} rows does not split into {chunks} cond/uncond chunks")
    per = batch_rows // chunks
    return [k * per + j for k, c in enumerate(cond_or_uncond) if int(c) == 0 for j in range(per)]


def _first_float(v) -> float:
    if torch.is_tensor(v):
        return float(v.flatten()[0].item())
    if isinstance(v, (list, tuple)):
        return float(v[0])
    return float(v)


class ComfyQwenCapture:
    """Collect cond-branch target-token states at the step nearest ``spec.sigma``.

    The step is chosen from ``sample_sigmas`` on the first call; without a schedule in the
    options, the first call whose sigma is within ``sigma_tolerance`` of ``spec.sigma`` is used.
    Returns the patch arguments unchanged.
    """

    def __init__(self, spec: CaptureSpec | None = None, *, model_name: str = "comfyui:qwen_image",
                 vae_scale_factor: int = 8, store_device=None, stop_when_complete: bool = False,
                 sigma_tolerance: float = 1e-4):
        self.spec = spec or CaptureSpec()
        self.model_name = model_name
        self.vae_scale_factor = vae_scale_factor
        self.store_device = store_device
        self.stop_when_complete = stop_when_complete
        self.sigma_tolerance = sigma_tolerance
        self.collector: HiddenStateCollector | None = None
        self.choice: StepChoice | None = None
        self._latent_hw: tuple[int, int] | None = None
        self._n_target: int | None = None
        self._last_block = -1
        self._at_step: bool | None = None   # decision for the current forward (one host sync per forward)

    def reset(self) -> None:
        self.collector = None
        self.choice = None
        self._latent_hw = None
        self._n_target = None
        self._last_block = -1
        self._at_step = None

    def _target_sigma(self, opts: dict) -> float:
        if self.choice is None:
            sched = opts.get("sample_sigmas")
            if sched is not None:
                self.choice = nearest_step(sched, self.spec.sigma)
            else:
                return self.spec.sigma
        return self.choice.sigma

    def _at_capture_step(self, opts: dict) -> bool:
        cur = opts.get("sigmas")
        if cur is None:
            return False
        cur = _first_float(cur)
        target = self._target_sigma(opts)
        if not math.isclose(cur, target, rel_tol=self.sigma_tolerance, abs_tol=self.sigma_tolerance):
            return False
        if self.choice is None:
            self.choice = StepChoice(index=-1, sigma=cur, sigma_requested=self.spec.sigma, num_steps=-1)
        return True

    def __call__(self, args: dict) -> dict:
        opts = args.get("transformer_options", {})
        block_index = int(args["block_index"])
        img = args["img"]
        if block_index <= self._last_block:   # blocks run in increasing order: a new forward began
            self._at_step = None
        self._last_block = block_index
        if self.collector is None:
            total = int(opts.get("total_blocks", 0)) or None
            layers = self.spec.resolve_layers(total) if total else self.spec.layers
            if layers is None:
                raise ValueError("transformer_options has no total_blocks; give CaptureSpec.layers")
            self.collector = HiddenStateCollector(layers, store_device=self.store_device)
        if self.collector.complete or not self.collector.wants(block_index):
            return args
        if self._at_step is None:
            self._at_step = self._at_capture_step(opts)
        if not self._at_step:
            return args
        rows = cond_rows_from_cond_or_uncond(opts.get("cond_or_uncond"), img.shape[0])
        if not rows:
            return args
        n_target = img.shape[1] - int(sum(opts.get("reference_image_num_tokens", []) or []))
        self.collector.collect(block_index, img, n_target, rows)
        self._n_target = n_target
        x = args.get("x")
        if x is not None:
            self._latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
        if self.stop_when_complete and self.collector.complete:
            raise CaptureComplete()
        return args

    @property
    def complete(self) -> bool:
        return self.collector is not None and self.collector.complete

    def knowledge(self) -> MMDiTKnowledge:
        """The captured states as ``MMDiTKnowledge``; raises if the capture step never ran."""
        if self.collector is None or self.choice is None:
            raise RuntimeError(f"no capture happened: no model call ran at sigma ~{self.spec.sigma}")
        hidden = self.collector.concatenated()
        if self._latent_hw is not None:
            gh, gw = (self._latent_hw[0] + 1) // 2, (self._latent_hw[1] + 1) // 2
        else:
            gh, gw = self._n_target, 1
        f = self.vae_scale_factor
        return MMDiTKnowledge(
            hidden=hidden, layers=self.collector.layers, sigma=self.choice.sigma,
            sigma_requested=self.choice.sigma_requested,
            step_index=self.choice.index if self.choice.index >= 0 else None,
            num_steps=self.choice.num_steps if self.choice.num_steps >= 0 else None,
            token_grid=(gh, gw), resolution=(gh * 2 * f, gw * 2 * f), model_name=self.model_name,
            width=hidden.shape[-1] // len(self.collector.layers),
        )
