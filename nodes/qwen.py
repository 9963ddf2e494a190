"""Qwen-Image-Edit side: back-view LoRA, prompt helper, back-view sampling with a trajectory,
and MMDiT hidden-state extraction. Runs on ComfyUI's own MODEL, sampler and patches."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import _host
from ._common import CATEGORY, KNOW3D_KNOWLEDGE, KNOW3D_MODEL, KNOW3D_TRAJECTORY, SEED_MAX
from ._io import IO
from ..know3d_core.knowledge import capture_spec
from ..know3d_core.lora_sniff import describe_lora, lora_modules
from ..know3d_core.mmdit.comfy_patch import CaptureComplete, ComfyQwenCapture
from ..know3d_core.mmdit.prompt import DEFAULT_CAMERA_PROMPT, DEFAULT_PROMPT_TEMPLATE, BackViewPrompt
from ..know3d_core.mmdit.sampler import TrajectoryStep
from ..know3d_core.mmdit.schedule import nearest_step
from ..know3d_core.knowledge.kinds import from_mmdit_capture

log = logging.getLogger("know3d")
CAT = f"{CATEGORY}/back view"


def _comfy(name: str):
    mod = _host._module(name)
    if mod is None:
        raise _host.HostUnavailable(f"this node runs ComfyUI's {name}; it only works inside ComfyUI")
    return mod


def sampler_names() -> list[str]:
    samplers = _host._module("comfy.samplers") if _host._module("comfy") is not None else None
    return list(samplers.KSampler.SAMPLERS) if samplers is not None else ["euler"]


def scheduler_names() -> list[str]:
    samplers = _host._module("comfy.samplers") if _host._module("comfy") is not None else None
    return list(samplers.KSampler.SCHEDULERS) if samplers is not None else ["simple"]


# ------------------------------------------------------------------------------ LoRA
class Know3DLoadQwenEditLoRA(IO.ComfyNode):
    @classmethod
    def define_schema(cls):
        return IO.Schema(
            node_id="Know3DLoadQwenEditLoRA",
            display_name="Load Qwen-Edit LoRA",
            category=CAT,
            description=(
                "Apply the Know3D back-view LoRA (a file in models/loras) to ComfyUI's own "
                "Qwen-Image-Edit-2511 MODEL, on a clone: bf16, fp8 and GGUF models and other LoRAs keep "
                "working. A LoRA for another architecture, or one whose keys match nothing, is an error."
            ),
            inputs=[
                IO.Model.Input("model", tooltip="Qwen-Image-Edit-2511 from core 'Load Diffusion Model' (any precision)."),
                IO.Combo.Input("lora_name", options=_host.filename_list("loras"),
                               tooltip="The Know3D back-view LoRA in models/loras."),
                IO.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="LoRA strength (1.0 = as trained)."),
            ],
            outputs=[IO.Model.Output("model", tooltip="The Qwen-Image-Edit MODEL with the back-view LoRA patched in.")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> IO.NodeOutput:
        utils, lora, lora_convert = _comfy("comfy.utils"), _comfy("comfy.lora"), _comfy("comfy.lora_convert")
        path = _host.full_path("loras", lora_name, "the Know3D release (back-view LoRA for Qwen-Image-Edit-2511)")
        _check_qwen_model(model, path)
        sd = utils.load_torch_file(path, safe_load=True)
        what = describe_lora(sd.keys())
        key_map = lora.model_lora_keys_unet(model.model, {})
        patches = lora.load_lora(lora_convert.convert_lora(sd), key_map, log_missing=False)
        total = len(lora_modules(sd.keys()))
        if not patches:
            raise ValueError(
                f"Know3D: LoRA {os.path.basename(path)} matches no layer of the Qwen-Image-Edit model; "
                f"it looks like {what}. Use the Know3D back-view LoRA for Qwen-Image-Edit-2511."
            )
        if total and len(patches) < total:
            log.warning("Know3D: LoRA %s: %d of %d modules matched the model (%s)",
                        os.path.basename(path), len(patches), total, what)
        out = model.clone()
        out.add_patches(patches, float(strength))
        return IO.NodeOutput(out)


def _check_qwen_model(model, path: str) -> None:
    base = _host._module("comfy.model_base")
    inner = getattr(model, "model", None)
    qwen = getattr(base, "QwenImage", None) if base is not None else None
    if qwen is not None and not isinstance(inner, qwen):
        raise ValueError(
            f"Know3D: the back-view LoRA {os.path.basename(path)} is for Qwen-Image-Edit-2511, but the MODEL "
            f"is {type(inner).__name__}. Load qwen_image_edit_2511 with core 'Load Diffusion Model'."
        )


# ------------------------------------------------------------------------------ prompt
class Know3DBackViewPrompt(IO.ComfyNode):
    @classmethod
    def define_schema(cls):
        return IO.Schema(
            node_id="Know3DBackViewPrompt",
            display_name="Back-View Prompt",
            category=CAT,
            description=(
                "Build the back-view prompt: the fixed camera-rotation prompt + your description of the "
                "hidden back, through an editable template. Feed it to core TextEncodeQwenImageEditPlus "
                "together with the front image. An empty description gives the unconditioned back view."
            ),
            inputs=[
                IO.String.Input("description", default="", multiline=True,
                                tooltip="What the hidden back looks like, e.g. 'a hollow backrest with three vertical slats'."),
                IO.String.Input("camera_prompt", default=DEFAULT_CAMERA_PROMPT, multiline=True,
                                tooltip="The fixed camera-rotation prompt the back-view LoRA was trained with."),
                IO.String.Input("template", default=DEFAULT_PROMPT_TEMPLATE,
                                tooltip="How the two parts are joined: {camera} and {description} are replaced."),
            ],
            outputs=[IO.String.Output("prompt", tooltip="The full back-view prompt text.")],
        )

    @classmethod
    def execute(cls, description, camera_prompt, template) -> IO.NodeOutput:
        if "{camera}" not in template or "{description}" not in template:
            raise ValueError(f"Know3D Back-View Prompt: template {template!r} must contain {{camera}} and {{description}}")
        return IO.NodeOutput(BackViewPrompt(camera_prompt=camera_prompt, template=template).build(description))


# ------------------------------------------------------------------------------ sampling
@dataclass
class BackViewTrajectory:
    """KNOW3D_TRAJECTORY: the back-view run, enough to re-run the model at any recorded step.

    ``sigmas``: the schedule that ran (ComfyUI sigmas, last entry the end of the run).
    ``steps``: model input before each step (and at the stop sigma on early exit).
    ``positive`` / ``negative``: the CONDITIONING the run used (reference latents included);
    shared, never mutated.
    """
    sigmas: torch.Tensor
    steps: list[TrajectoryStep]
    positive: Any
    negative: Any
    cfg: float
    seed: int
    sampler_name: str
    scheduler: str
    stopped_early: bool
    extra: dict = field(default_factory=dict)

    def nearest(self, sigma: float) -> TrajectoryStep:
        choice = nearest_step([s.sigma for s in self.steps], sigma)
        return self.steps[choice.index]


def make_noise(shape, seed: int) -> torch.Tensor:
    """Gaussian noise from an explicit CPU generator (ComfyUI's noise stream for the same seed)."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), dtype=torch.float32, generator=g, device="cpu")


class Know3DBackViewSample(IO.ComfyNode):
    @classmethod
    def define_schema(cls):
        return IO.Schema(
            node_id="Know3DBackViewSample",
            display_name="Back-View Sample",
            category=CAT,
            description=(
                "Sample the back view with ComfyUI's own sampler (every core sampler, scheduler and model "
                "patch applies) and record the trajectory: the latent the model saw at every step. "
                "stop_at_sigma > 0 stops early at the step nearest that noise level (then the LATENT is "
                "still noisy: use it only for hidden states)."
            ),
            inputs=[
                IO.Model.Input("model", tooltip="Qwen-Image-Edit-2511 with the back-view LoRA (Load Qwen-Edit LoRA)."),
                IO.Conditioning.Input("positive", tooltip="Core TextEncodeQwenImageEditPlus of the back-view prompt with the front image."),
                IO.Conditioning.Input("negative", tooltip="Negative conditioning (TextEncodeQwenImageEditPlus with an empty prompt and the front image)."),
                IO.Latent.Input("latent_image", tooltip="Starting latent, e.g. core VAE Encode of the scaled front image or an empty latent of that size."),
                IO.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Noise seed (explicit generator; same noise as core KSampler for the same seed)."),
                IO.Int.Input("steps", default=40, min=1, max=1000, tooltip="Sampling steps."),
                IO.Float.Input("cfg", default=4.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                IO.Combo.Input("sampler_name", options=sampler_names(), tooltip="Core sampler."),
                IO.Combo.Input("scheduler", options=scheduler_names(), tooltip="Core scheduler."),
                IO.Float.Input("stop_at_sigma", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="0 = run every step. Otherwise stop at the step nearest this noise level (early exit for the hidden-state path)."),
            ],
            outputs=[
                IO.Latent.Output("back_latent", tooltip="The back-view latent, for core VAE Decode (noisy if stopped early)."),
                KNOW3D_TRAJECTORY.Output("trajectory", tooltip="Sigmas and the latent at each step, for Extract MMDiT Hidden States."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                stop_at_sigma=0.0) -> IO.NodeOutput:
        samplers, sample_mod = _comfy("comfy.samplers"), _comfy("comfy.sample")
        latent = sample_mod.fix_empty_latent_channels(
            model, latent_image["samples"], latent_image.get("downscale_ratio_spacial", None))
        noise = make_noise(latent.shape, seed).to(latent.dtype)
        ks = samplers.KSampler(model, steps=int(steps), device=model.load_device, sampler=sampler_name,
                               scheduler=scheduler, denoise=1.0, model_options=model.model_options)
        sigmas = ks.sigmas.detach().float().cpu()
        last = None
        if stop_at_sigma > 0:
            last = nearest_step(sigmas, float(stop_at_sigma)).index
        store = _host.intermediate_device()
        recorded: list[TrajectoryStep] = []
        preview = _preview_callback(model, int(steps) if last is None else max(last, 1))

        def callback(step, x0, x, total_steps):
            recorded.append(TrajectoryStep(int(step), float(sigmas[step]), x.detach().to(store, torch.float32).clone()))
            if preview is not None:
                preview(step, x0, x, total_steps)
            _host.check_interrupted()

        fmt = model.get_model_object("latent_format")
        ms = model.get_model_object("model_sampling")
        with _host.stage("back-view sampling", model.load_device):
            if last == 0:  # stop before the first step: the model input is the noised start latent
                start = fmt.process_in(latent.float()) if torch.count_nonzero(latent) > 0 else latent.float()
                x_last = ms.noise_scaling(sigmas[0], noise, start)
                out = fmt.process_out(ms.inverse_noise_scaling(sigmas[0], x_last))
            else:
                out = ks.sample(noise, positive, negative, cfg=float(cfg), latent_image=latent, last_step=last,
                                callback=callback, disable_pbar=True, seed=int(seed))
                if last is not None:
                    # The sampler returns process_out(x / (1 - sigma)) for flow models: undo both.
                    unscale = ms.inverse_noise_scaling(sigmas[last], torch.ones(()))
                    x_last = fmt.process_in(out.float().cpu()) / unscale
        out = out.to(_host.intermediate_device(), torch.float32)
        stopped = last is not None
        if stopped:
            recorded.append(TrajectoryStep(int(last), float(sigmas[last]), x_last.detach().to(store, torch.float32)))
        trajectory = BackViewTrajectory(
            sigmas=sigmas if last is None else sigmas[: last + 1].clone(), steps=recorded,
            positive=positive, negative=negative, cfg=float(cfg), seed=int(seed), sampler_name=sampler_name,
            scheduler=scheduler, stopped_early=stopped, extra={"steps": int(steps)})
        result = dict(latent_image)
        result.pop("downscale_ratio_spacial", None)
        result.pop("downscale_ratio_temporal", None)
        result["samples"] = out
        return IO.NodeOutput(result, trajectory)


def _preview_callback(model, steps):
    lp = _host._module("latent_preview")
    if lp is None:
        return None
    return lp.prepare_callback(model, steps)


# ------------------------------------------------------------------------------ hidden states
def parse_layers(text: str) -> Optional[tuple[int, ...]]:
    """``"20, 30, 40"`` -> (20, 30, 40); ``"auto"`` / "" -> None."""
    text = (text or "").strip().lower()
    if text in ("", "auto"):
        return None
    try:
        return tuple(int(t) for t in text.replace(";", ",").replace(" ", ",").split(",") if t)
    except ValueError:
        raise ValueError(f"Know3D: layers must be 'auto' or block indices like '20, 30, 40', got {text!r}") from None


def run_one_forward(model, positive, latent: torch.Tensor, sigma: float, patch) -> None:
    """One cond-only model call at ``sigma`` on the model-space ``latent`` through ComfyUI's
    guider (so conds, reference latents and model patches apply), with ``patch`` as a
    double_block patch on a clone. Stops as soon as the patch raises CaptureComplete."""
    samplers = _comfy("comfy.samplers")
    m = model.clone()
    m.set_model_double_block_patch(patch)
    guider = samplers.CFGGuider(m)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)  # cond pass only (cond_or_uncond == [0])

    def one_call(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        s = sigmas[0] * x.new_ones([x.shape[0]])
        try:
            model_k(latent.to(x.device, x.dtype), s, **(extra_args or {}))
        except CaptureComplete:
            pass
        return x

    zeros = torch.zeros_like(latent)
    guider.sample(zeros, zeros, samplers.KSAMPLER(one_call), torch.tensor([float(sigma), 0.0]),
                  disable_pbar=True, seed=0)


class Know3DExtractHiddenStates(IO.ComfyNode):
    @classmethod
    def define_schema(cls):
        return IO.Schema(
            node_id="Know3DExtractHiddenStates",
            display_name="Extract MMDiT Hidden States",
            category=CAT,
            description=(
                "MMDiT knowledge: one extra forward of the back-view model at the recorded latent of the "
                "step nearest sigma, capturing the image-stream output of the chosen blocks (target tokens "
                "only, reference tokens sliced off, cond rows only), concatenated on channels. Layers and "
                "sigma default to the Know3D checkpoint's (connect know3d_model)."
            ),
            inputs=[
                IO.Model.Input("model", tooltip="The same Qwen-Image-Edit MODEL (with LoRA) that Back-View Sample ran."),
                KNOW3D_TRAJECTORY.Input("trajectory", tooltip="From Back-View Sample."),
                IO.Float.Input("sigma", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Noise level to capture at; 0 = the Know3D checkpoint's (else 0.25). The nearest recorded step is used."),
                IO.String.Input("layers", default="auto",
                                tooltip="Block indices, e.g. '20, 30, 40'; 'auto' = the Know3D checkpoint's (else 1/3, 1/2, 2/3 of the depth)."),
                KNOW3D_MODEL.Input("know3d_model", optional=True,
                                  tooltip="Load Know3D Model: its checkpoint's capture layers and sigma become the defaults."),
            ],
            outputs=[KNOW3D_KNOWLEDGE.Output("knowledge", tooltip="mmdit_hidden knowledge [B, N_target, L x 3072] for Sparse Structure and Geometry.")],
        )

    @classmethod
    def execute(cls, model, trajectory, sigma, layers, know3d_model=None) -> IO.NodeOutput:
        spec = capture_spec(getattr(know3d_model, "know3d_spec", None), layers=parse_layers(layers),
                            sigma=float(sigma) if sigma > 0 else None)
        step = trajectory.nearest(spec.sigma)
        capture = ComfyQwenCapture(spec, store_device=_host.intermediate_device(), stop_when_complete=True)
        with _host.stage("hidden-state capture", model.load_device):
            run_one_forward(model, trajectory.positive, step.latent, step.sigma, capture)
        captured = capture.knowledge()
        captured = dataclasses.replace(captured, step_index=step.index, num_steps=len(trajectory.sigmas) - 1)
        return IO.NodeOutput(from_mmdit_capture(captured))


NODES = (Know3DLoadQwenEditLoRA, Know3DBackViewPrompt, Know3DBackViewSample, Know3DExtractHiddenStates)
