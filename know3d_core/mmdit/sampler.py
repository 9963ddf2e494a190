"""Our Edit-Plus sampling loop over a diffusers ``QwenImageTransformer2DModel``.

Flow-matching Euler (``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v``) on the Qwen-Image schedule,
true CFG as two separate forwards (cond first, then uncond) with the guided velocity rescaled to
the cond velocity's per-token norm, Edit-Plus packing (target tokens first, reference latents
after them every step, output sliced back to the target), and 2511's ``zero_cond_t`` handled by
the transformer itself. The arithmetic follows diffusers' ``QwenImageEditPlusPipeline`` op for op,
so on the same inputs the latents are identical.

The loop records a trajectory (sigma and latent before each step): the hidden states at any
recorded sigma come from one extra cond forward (``capture_from_trajectory``). With
``early_exit`` the loop stops right after the cond forward of the capture step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..sampling.flow_euler import Cancelled
from .capture import CaptureSpec, HiddenStateCollector, MMDiTKnowledge
from .diffusers_hooks import capture_block_outputs, transformer_blocks
from .packing import PATCH, VAE_SCALE_FACTOR
from .schedule import StepChoice, nearest_step


@dataclass
class EditPlusInputs:
    """Everything but the noisy latent that the MMDiT sees, fixed over the sampling run.

    prompt_embeds: [B, T, D] (D = joint_attention_dim); prompt_mask: [B, T] (1 = valid) or None.
    negative_embeds / negative_mask: the same for the CFG negative prompt (None disables CFG).
    ref_latents: [B, N_ref, 4*z] packed, normalised reference latents concatenated in input order,
    or None. ref_grids: token grid (h, w) of each reference. target_grid: (H/16, W/16).
    """
    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor | None
    target_grid: tuple[int, int]
    negative_embeds: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None
    ref_latents: torch.Tensor | None = None
    ref_grids: list[tuple[int, int]] = field(default_factory=list)
    vae_scale_factor: int = VAE_SCALE_FACTOR

    def __post_init__(self):
        n_ref = sum(h * w for h, w in self.ref_grids)
        have = 0 if self.ref_latents is None else self.ref_latents.shape[1]
        if n_ref != have:
            raise ValueError(f"ref_grids {self.ref_grids} give {n_ref} tokens, ref_latents has {have}")

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def n_target(self) -> int:
        return self.target_grid[0] * self.target_grid[1]

    @property
    def resolution(self) -> tuple[int, int]:
        f = self.vae_scale_factor * PATCH
        return self.target_grid[0] * f, self.target_grid[1] * f

    def img_shapes(self) -> list[list[tuple[int, int, int]]]:
        one = [(1, *self.target_grid)] + [(1, h, w) for h, w in self.ref_grids]
        return [one] * self.batch_size


@dataclass
class TrajectoryStep:
    """The model input of one sampler step: the latent at ``sigma`` before step ``index`` runs.

    ``latent`` is in the host's model space: packed ``[B, N_target, 4*z]`` here (diffusers), ComfyUI's
    ``[B, C, 1, h, w]`` in the nodes' trajectory.
    """

    index: int
    sigma: float
    latent: torch.Tensor


@dataclass
class Trajectory:
    """Sigma and latent before every step that ran; ``sigmas`` is the whole schedule (+ final 0)."""
    sigmas: torch.Tensor
    steps: list[TrajectoryStep] = field(default_factory=list)

    def nearest(self, sigma: float) -> tuple[TrajectoryStep, StepChoice]:
        if not self.steps:
            raise ValueError("empty trajectory")
        choice = nearest_step([s.sigma for s in self.steps], sigma)
        return self.steps[choice.index], choice


@dataclass
class SampleResult:
    latents: torch.Tensor           # packed [B, N_target, 4*z]: final, or at the capture step on early exit
    trajectory: Trajectory | None
    knowledge: MMDiTKnowledge | None
    steps_run: int                  # steps whose cond forward ran
    forwards: int                   # transformer forwards run
    exited_early: bool
    capture_step: StepChoice | None = None


def _normalize_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    # diffusers drops an all-valid mask so attention runs without one; do the same.
    if mask is not None and bool(mask.all()):
        return None
    return mask


class EditPlusSampler:
    """Sampling loop and hidden-state capture over one Qwen-Image MMDiT."""

    def __init__(self, transformer: torch.nn.Module, model_name: str = "Qwen-Image-Edit-2511"):
        self.transformer = transformer
        self.model_name = model_name
        self.num_blocks = len(transformer_blocks(transformer))

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                 mask: torch.Tensor | None, inputs: EditPlusInputs) -> torch.Tensor:
        """One forward: latents [B, N_target, 4z], t [] float32 (sigma*1000) -> v [B, N_target, 4z]."""
        x = latents if inputs.ref_latents is None else torch.cat([latents, inputs.ref_latents], dim=1)
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        out = self.transformer(hidden_states=x, timestep=timestep / 1000, encoder_hidden_states=embeds,
                               encoder_hidden_states_mask=mask, img_shapes=inputs.img_shapes(),
                               return_dict=False)[0]
        return out[:, : latents.shape[1]]

    def _knowledge(self, collector: HiddenStateCollector, choice: StepChoice,
                   inputs: EditPlusInputs) -> MMDiTKnowledge:
        hidden = collector.concatenated()
        return MMDiTKnowledge(hidden=hidden, layers=collector.layers, sigma=choice.sigma,
                              sigma_requested=choice.sigma_requested, step_index=choice.index,
                              num_steps=choice.num_steps, token_grid=tuple(inputs.target_grid),
                              resolution=inputs.resolution, model_name=self.model_name,
                              width=hidden.shape[-1] // len(collector.layers))

    @torch.no_grad()
    def sample(self, inputs: EditPlusInputs, latents: torch.Tensor, sigmas: torch.Tensor, *,
               true_cfg_scale: float = 4.0, capture: CaptureSpec | None = None, early_exit: bool = False,
               record_trajectory: bool = True, trajectory_device=None, store_device=None,
               callback: Callable[[int, float, torch.Tensor], None] | None = None,
               progress: Callable[[int, int], None] | None = None,
               cancel: Callable[[], bool] | None = None) -> SampleResult:
        """Denoise ``latents`` [B, N_target, 4z] (pure noise at sigmas[0]) along ``sigmas`` [N+1].

        capture: hidden states to take from the cond forward of the step nearest ``capture.sigma``.
        early_exit: stop after that forward (needs ``capture``); the remaining steps, the uncond
        forward of the capture step and the decode are skipped.
        callback(i, sigma_i, latents_after_step) runs after every completed Euler step.
        progress(step, total) runs once per step that runs a forward, step = 1..total, where
        total = capture step + 1 with early exit, else the schedule length.
        cancel() is polled before every step; True raises ``know3d_core.sampling.Cancelled``.
        """
        if early_exit and capture is None:
            raise ValueError("early_exit needs a capture spec (the sigma to stop at)")
        if latents.shape[1] != inputs.n_target:
            raise ValueError(f"latents have {latents.shape[1]} tokens, target grid {inputs.target_grid} "
                             f"has {inputs.n_target}")
        device = latents.device
        sig = sigmas.to(device=device, dtype=torch.float32)
        timesteps = sig[:-1] * 1000
        n_steps = timesteps.shape[0]
        do_cfg = true_cfg_scale > 1 and inputs.negative_embeds is not None
        pos_mask = _normalize_mask(inputs.prompt_mask)
        neg_mask = _normalize_mask(inputs.negative_mask)
        sched = [float(v) for v in sigmas.tolist()]

        choice, collector = None, None
        if capture is not None:
            choice = nearest_step(sched, capture.sigma)
            collector = HiddenStateCollector(capture.resolve_layers(self.num_blocks), store_device)
        traj = Trajectory(sigmas=sigmas.detach().to("cpu", torch.float32)) if record_trajectory else None
        forwards = 0
        total = choice.index + 1 if early_exit else n_steps
        for i in range(n_steps):
            if cancel is not None and cancel():
                raise Cancelled(f"back-view sampling cancelled before step {i + 1} of {total}")
            if traj is not None:
                saved = latents if trajectory_device is None else latents.to(trajectory_device)
                traj.steps.append(TrajectoryStep(index=i, sigma=sched[i], latent=saved))
            t = timesteps[i]
            if choice is not None and i == choice.index:
                with capture_block_outputs(self.transformer, collector, inputs.n_target):
                    v = self.velocity(latents, t, inputs.prompt_embeds, pos_mask, inputs)
            else:
                v = self.velocity(latents, t, inputs.prompt_embeds, pos_mask, inputs)
            forwards += 1
            if early_exit and choice is not None and i == choice.index:
                if progress is not None:
                    progress(i + 1, total)
                return SampleResult(latents=latents, trajectory=traj,
                                    knowledge=self._knowledge(collector, choice, inputs), steps_run=i + 1,
                                    forwards=forwards, exited_early=True, capture_step=choice)
            if do_cfg:
                v_neg = self.velocity(latents, t, inputs.negative_embeds, neg_mask, inputs)
                forwards += 1
                comb = v_neg + true_cfg_scale * (v - v_neg)
                cond_norm = torch.norm(v, dim=-1, keepdim=True)
                comb_norm = torch.norm(comb, dim=-1, keepdim=True)
                v = comb * (cond_norm / comb_norm)
            dt = sig[i + 1] - sig[i]
            latents = (latents.to(torch.float32) + dt * v).to(v.dtype)
            if callback is not None:
                callback(i, sched[i], latents)
            if progress is not None:
                progress(i + 1, total)
        knowledge = self._knowledge(collector, choice, inputs) if collector is not None else None
        return SampleResult(latents=latents, trajectory=traj, knowledge=knowledge, steps_run=n_steps,
                            forwards=forwards, exited_early=False, capture_step=choice)

    @torch.no_grad()
    def capture_from_trajectory(self, trajectory: Trajectory, inputs: EditPlusInputs,
                                capture: CaptureSpec, store_device=None) -> MMDiTKnowledge:
        """Hidden states at the recorded step nearest ``capture.sigma``: one cond forward."""
        step, choice = trajectory.nearest(capture.sigma)
        choice = StepChoice(index=step.index, sigma=step.sigma, sigma_requested=choice.sigma_requested,
                            num_steps=len(trajectory.sigmas) - 1)
        latents = step.latent
        device = next(self.transformer.parameters()).device
        latents = latents.to(device)
        t = torch.tensor(step.sigma, dtype=torch.float32, device=device) * 1000
        collector = HiddenStateCollector(capture.resolve_layers(self.num_blocks), store_device)
        with capture_block_outputs(self.transformer, collector, inputs.n_target):
            self.velocity(latents, t, inputs.prompt_embeds, _normalize_mask(inputs.prompt_mask), inputs)
        return self._knowledge(collector, choice, inputs)
