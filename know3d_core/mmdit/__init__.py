"""MMDiT side of Know3D: back-view prompting, sampling trajectory, hidden states at a noise level.

Host-independent core (``capture``, ``schedule``, ``prompt``, ``packing``) plus two host adapters:
diffusers forward hooks (``diffusers_hooks``) and a ComfyUI ``double_block`` patch
(``comfy_patch``, no comfy import). ``backview`` runs the whole back view headless with diffusers.
Heavy imports (diffusers, transformers) happen inside the functions that need them.
"""
from .capture import (DEFAULT_LAYER_FRACTIONS, DEFAULT_SIGMA, CaptureSpec, HiddenStateCollector,
                      MMDiTKnowledge, default_layers, slice_target_rows)
from .comfy_patch import CaptureComplete, ComfyQwenCapture, cond_rows_from_cond_or_uncond
from .diffusers_hooks import capture_block_outputs, transformer_blocks
from .lora import LoraError, LoraReport, merge_lora
from .packing import pack_latents, token_grid, unpack_latents
from .prompt import (DEFAULT_CAMERA_PROMPT, DEFAULT_PROMPT_TEMPLATE, BackViewPrompt, back_view_prompt,
                     edit_plus_text, encode_prompt)
from .sampler import EditPlusInputs, EditPlusSampler, SampleResult, Trajectory, TrajectoryStep
from .schedule import (QWEN_IMAGE_SCHEDULER_CONFIG, StepChoice, comfy_simple_flow_sigmas, flow_match_sigmas,
                       nearest_step, qwen_shift_mu)

__all__ = [
    "DEFAULT_LAYER_FRACTIONS", "DEFAULT_SIGMA", "CaptureSpec", "HiddenStateCollector", "MMDiTKnowledge",
    "default_layers", "slice_target_rows", "CaptureComplete", "ComfyQwenCapture",
    "cond_rows_from_cond_or_uncond", "capture_block_outputs", "transformer_blocks", "LoraError",
    "LoraReport", "merge_lora", "pack_latents", "token_grid", "unpack_latents", "DEFAULT_CAMERA_PROMPT",
    "DEFAULT_PROMPT_TEMPLATE", "BackViewPrompt", "back_view_prompt", "edit_plus_text", "encode_prompt",
    "EditPlusInputs", "EditPlusSampler", "SampleResult", "Trajectory", "TrajectoryStep",
    "QWEN_IMAGE_SCHEDULER_CONFIG", "StepChoice", "comfy_simple_flow_sigmas", "flow_match_sigmas",
    "nearest_step", "qwen_shift_mu",
]
