"""What both Qwen loaders need (the diffusers folder in ``loading``, ComfyUI's single files in
``comfy_files``): the diffusers version check and the meta-device rebuild of non-state tensors."""
from __future__ import annotations

import inspect

import torch

MIN_DIFFUSERS_FOR_ZERO_COND_T = "0.37.0"


def diffusers_supports_zero_cond_t() -> bool:
    from diffusers import QwenImageTransformer2DModel
    return "zero_cond_t" in inspect.signature(QwenImageTransformer2DModel.__init__).parameters


def require_zero_cond_t() -> None:
    """Raise if the installed diffusers cannot run Qwen-Image-Edit-2511 (``zero_cond_t``)."""
    if not diffusers_supports_zero_cond_t():
        import diffusers
        raise RuntimeError(
            f"Qwen-Image-Edit-2511 needs diffusers >= {MIN_DIFFUSERS_FOR_ZERO_COND_T} "
            f"(QwenImageTransformer2DModel(zero_cond_t=...)); installed: {diffusers.__version__}. "
            "Older versions silently ignore the flag and give wrong results.")


def rebuild_meta_attributes(model: torch.nn.Module) -> None:
    """Re-create plain tensor attributes left on the meta device by a meta-device init.

    diffusers' QwenEmbedRope keeps its RoPE tables as plain (complex) tensor attributes, not
    buffers; they are rebuilt from the module's own constructor arguments.
    """
    for name, mod in model.named_modules():
        bad = [k for k, v in vars(mod).items() if torch.is_tensor(v) and v.is_meta]
        if not bad:
            continue
        if all(hasattr(mod, a) for a in ("theta", "axes_dim", "scale_rope")):
            fresh = type(mod)(theta=mod.theta, axes_dim=list(mod.axes_dim), scale_rope=mod.scale_rope)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], fresh)
        else:
            raise RuntimeError(f"{type(mod).__name__} ({name}) keeps tensors {bad} outside its state dict; "
                               "cannot initialise it on the meta device")
