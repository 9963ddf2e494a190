"""Back-view prompt assembly and Qwen-Image-Edit-Plus prompt encoding with Qwen2.5-VL.

Know3D (paper §3.1) conditions the back-view LoRA on ``c = p_cam + p_desc``: a FIXED prompt that
describes the camera rotation, plus a component description of the back that was dropped with
some probability during training (so an empty description gives the unconditioned back view).
The paper does not print its camera prompt; DEFAULT_CAMERA_PROMPT is OUR ASSUMPTION, and a Know3D
checkpoint's metadata (``camera_prompt``, ``prompt_template``) or the user overrides it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_CAMERA_PROMPT = "Rotate the camera 180 degrees around the object to show its back view."
DEFAULT_PROMPT_TEMPLATE = "{camera} {description}"

# Qwen-Image-Edit-Plus (2509/2511) chat template; the first EDIT_PLUS_DROP_TOKENS tokens of the
# encoded sequence (the system prefix through "<|im_start|>user\n") are dropped. 64 is the count
# with the real Qwen2.5 tokenizer (diffusers and ComfyUI both drop exactly these).
EDIT_PLUS_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
    "objects, background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining consistency "
    "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_PLUS_DROP_TOKENS = 64
IMAGE_PLACEHOLDER = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
DEFAULT_NEGATIVE_PROMPT = " "
# The longest prompt sequence Qwen-Image-Edit's MMDiT is given: diffusers' QwenImageEditPlusPipeline
# refuses max_sequence_length > 1024 (its tokenizer_max_length). Counted as the MMDiT sees it: the
# encoded chat after the EDIT_PLUS_DROP_TOKENS prefix, the condition images' vision tokens included.
# Longer prompts are refused (PromptTooLong), never truncated. The text encoder's own limit
# (max_position_embeddings, 128000 for Qwen2.5-VL-7B) lowers it further if smaller.
MAX_PROMPT_TOKENS = 1024


class PromptTooLong(ValueError):
    """The back-view prompt is longer than the MMDiT reads; ``tokens`` / ``limit`` / ``description_tokens``."""

    def __init__(self, tokens: int, limit: int, description_tokens: int | None = None):
        self.tokens, self.limit, self.description_tokens = tokens, limit, description_tokens
        what = ("" if description_tokens is None else
                f" (the description {description_tokens}, plus the camera prompt, the template and the image)")
        fix = (f"shorten the description by at least {tokens - limit} tokens" if description_tokens is None else
               f"shorten the description to at most {max(0, description_tokens - (tokens - limit))} tokens")
        super().__init__(f"the back-view prompt is {tokens} tokens{what}; Qwen-Image-Edit reads at most "
                         f"{limit}: {fix}")


def max_prompt_tokens(text_encoder_config: dict | None = None) -> int:
    """:data:`MAX_PROMPT_TOKENS`, or the text encoder's ``max_position_embeddings`` if smaller
    (``text_encoder_config``: its config.json as a dict, ``text_config`` read when present)."""
    cfg = text_encoder_config or {}
    text = cfg.get("text_config") or cfg
    positions = text.get("max_position_embeddings", cfg.get("max_position_embeddings"))
    return min(MAX_PROMPT_TOKENS, int(positions)) if positions else MAX_PROMPT_TOKENS


def prompt_tokens(processor, images, text: str, drop_tokens: int = EDIT_PLUS_DROP_TOKENS) -> int:
    """How many prompt tokens the MMDiT reads for ``text`` with the condition ``images`` (what
    :func:`encode_prompt` returns; tokenizer and image processor only, no network)."""
    chat = edit_plus_text(text, len(images or []))
    inputs = processor(text=[chat], images=list(images) if images else None, return_tensors="pt")
    return int(inputs["attention_mask"].sum()) - drop_tokens


def check_prompt_length(processor, images, prompt: "BackViewPrompt", description: str,
                        limit: int = MAX_PROMPT_TOKENS) -> int:
    """Tokens of the back-view prompt for ``description``; raises :class:`PromptTooLong` over ``limit``."""
    n = prompt_tokens(processor, images, prompt.build(description))
    if n > limit:
        desc = (description or "").strip()
        tokenizer = getattr(processor, "tokenizer", processor)  # a processor, or a bare tokenizer
        raise PromptTooLong(n, limit, len(tokenizer(desc)["input_ids"]) if desc else 0)
    return n


@dataclass(frozen=True)
class BackViewPrompt:
    """How the back-view prompt is built: ``template.format(camera=..., description=...)``."""
    camera_prompt: str = DEFAULT_CAMERA_PROMPT
    template: str = DEFAULT_PROMPT_TEMPLATE

    @classmethod
    def from_metadata(cls, metadata: dict | None, camera_prompt: str | None = None,
                      template: str | None = None) -> "BackViewPrompt":
        """Explicit argument > checkpoint metadata (``camera_prompt``, ``prompt_template``) > default."""
        meta = metadata or {}
        return cls(camera_prompt=camera_prompt if camera_prompt is not None
                   else meta.get("camera_prompt", DEFAULT_CAMERA_PROMPT),
                   template=template if template is not None
                   else meta.get("prompt_template", DEFAULT_PROMPT_TEMPLATE))

    def build(self, description: str = "") -> str:
        """The full prompt; an empty/blank description yields the camera prompt alone."""
        desc = (description or "").strip()
        if not desc:
            return self.camera_prompt.strip()
        return self.template.format(camera=self.camera_prompt, description=desc).strip()


def back_view_prompt(description: str = "", camera_prompt: str | None = None,
                     template: str | None = None) -> str:
    """Camera-rotation prompt + back-view description (see ``BackViewPrompt``)."""
    return BackViewPrompt.from_metadata(None, camera_prompt, template).build(description)


def edit_plus_text(prompt: str, num_images: int) -> str:
    """The chat text that Qwen2.5-VL reads: template around ``Picture k: <image>`` x n + prompt."""
    pics = "".join(IMAGE_PLACEHOLDER.format(k + 1) for k in range(num_images))
    return EDIT_PLUS_TEMPLATE.format(pics + prompt)


@torch.no_grad()
def encode_prompt(text_encoder, processor, images, text: str | list[str],
                  drop_tokens: int = EDIT_PLUS_DROP_TOKENS, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Edit-Plus prompt embeddings from Qwen2.5-VL's last hidden layer.

    text_encoder: ``Qwen2_5_VLForConditionalGeneration``; processor: a Qwen2-VL/2.5-VL processor
    (tokenizer + image processor); images: the condition images (PIL, ~384x384 area, see
    ``backview.condition_images``) shared by every prompt, or None/[] for text only.
    Returns: (prompt_embeds [B, T, D], mask [B, T] long, 1 = valid, right-padded).
    """
    texts = [text] if isinstance(text, str) else list(text)
    images = list(images) if images else []
    device = torch.device(device) if device is not None else next(text_encoder.parameters()).device
    chat = [edit_plus_text(t, len(images)) for t in texts]
    # the processor pairs images with placeholders across the whole batch: repeat them per prompt
    inputs = processor(text=chat, images=images * len(chat) or None, padding=True, return_tensors="pt").to(device)
    limit = max_prompt_tokens(text_encoder.config.to_dict())
    longest = int(inputs["attention_mask"].sum(dim=1).max()) - drop_tokens
    if longest > limit:  # before the forward: diffusers' RoPE table would fail with a shape error
        raise PromptTooLong(longest, limit)
    out = text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                       output_hidden_states=True)
    hidden = out.hidden_states[-1]
    valid = inputs["attention_mask"].bool()
    per_item = [h[m][drop_tokens:] for h, m in zip(hidden, valid)]
    if any(e.shape[0] == 0 for e in per_item):
        raise ValueError(f"a prompt encodes to <= {drop_tokens} tokens; nothing is left after "
                         "dropping the template prefix (wrong processor/template?)")
    t_max = max(e.shape[0] for e in per_item)
    embeds = torch.stack([torch.cat([e, e.new_zeros(t_max - e.shape[0], e.shape[1])]) for e in per_item])
    mask = torch.stack([torch.cat([torch.ones(e.shape[0], dtype=torch.long, device=e.device),
                                   torch.zeros(t_max - e.shape[0], dtype=torch.long, device=e.device)])
                        for e in per_item])
    return embeds.to(dtype=dtype or text_encoder.dtype), mask
