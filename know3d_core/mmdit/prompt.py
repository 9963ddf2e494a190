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
