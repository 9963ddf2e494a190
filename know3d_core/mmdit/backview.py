"""Headless back view: Qwen-Image-Edit-2511 (+ Know3D back-view LoRA) with diffusers components
and our sampling loop; optional hidden-state capture and early exit.

:class:`QwenEditBackView` is the one back-view orchestration: ``Know3DPipeline.back_view`` (the
CLI) calls it, and the parity test against diffusers' ``QwenImageEditPlusPipeline`` runs it. With
``place(device, offload=True)`` each network stays on the CPU and visits ``device`` only while it
runs (text encoder once for both prompts, then VAE, then transformer, then VAE); with ``pin_host``
on CUDA from pinned host copies (``device_visits``: one copy in, nothing copied back).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .capture import CaptureSpec, MMDiTKnowledge
from .loading import QwenEditComponents, load_qwen_edit, require_zero_cond_t
from .lora import LoraReport, merge_lora
from .packing import (CONDITION_IMAGE_AREA, PATCH, VAE_IMAGE_AREA, VAE_SCALE_FACTOR, denormalize_latents,
                      dimensions_for_area, normalize_latents, pack_latents, unpack_latents)
from .prompt import DEFAULT_NEGATIVE_PROMPT, BackViewPrompt, encode_prompt
from .sampler import EditPlusInputs, EditPlusSampler, SampleResult, Trajectory
from .schedule import flow_match_sigmas

DEFAULT_STEPS = 40        # Qwen-Image-Edit-2511 model card
DEFAULT_TRUE_CFG = 4.0


def _image_processor(vae_scale_factor: int):
    from diffusers.image_processor import VaeImageProcessor
    return VaeImageProcessor(vae_scale_factor=vae_scale_factor * PATCH)


def output_size(image, vae_scale_factor: int = VAE_SCALE_FACTOR, area: int = 1024 * 1024) -> tuple[int, int]:
    """(height, width) of the back view: the input's aspect ratio at ~``area`` pixels, multiple of 16."""
    w, h = dimensions_for_area(area, image.size[0] / image.size[1])
    m = vae_scale_factor * PATCH
    return h // m * m, w // m * m


def condition_images(images, vae_scale_factor: int = VAE_SCALE_FACTOR, area: int = CONDITION_IMAGE_AREA):
    """The Qwen2.5-VL copies of the input images (PIL), each resized to ~``area`` pixels."""
    proc = _image_processor(vae_scale_factor)
    out = []
    for img in images:
        w, h = dimensions_for_area(area, img.size[0] / img.size[1])
        out.append(proc.resize(img, h, w))
    return out


def vae_images(images, vae_scale_factor: int = VAE_SCALE_FACTOR, area: int = VAE_IMAGE_AREA) -> list[torch.Tensor]:
    """The VAE copies of the input images: [1, 3, 1, H, W] in [-1, 1] at ~``area`` pixels."""
    proc = _image_processor(vae_scale_factor)
    out = []
    for img in images:
        w, h = dimensions_for_area(area, img.size[0] / img.size[1])
        out.append(proc.preprocess(img, h, w).unsqueeze(2))
    return out


@torch.no_grad()
def encode_reference_latents(vae, images: list[torch.Tensor], batch_size: int = 1
                             ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """VAE-encode reference images ([1, 3, 1, H, W] each) -> (packed [B, N_ref, 4z], token grids).

    Mode of the latent distribution, per-channel normalised, packed 2x2, concatenated in order.
    """
    packed, grids = [], []
    p = next(vae.parameters())
    for img in images:
        z = vae.encode(img.to(p.device, p.dtype)).latent_dist.mode()
        z = normalize_latents(z, vae.config.latents_mean, vae.config.latents_std)
        grids.append((z.shape[-2] // 2, z.shape[-1] // 2))
        tok = pack_latents(z)
        packed.append(tok.expand(batch_size, -1, -1) if tok.shape[0] == 1 else tok)
    return torch.cat(packed, dim=1), grids


@torch.no_grad()
def decode_latents(vae, tokens: torch.Tensor, height: int, width: int,
                   vae_scale_factor: int = VAE_SCALE_FACTOR) -> torch.Tensor:
    """Packed target latents [B, N, 4z] -> images [B, 3, H, W] in [-1, 1]."""
    z = unpack_latents(tokens, height // vae_scale_factor, width // vae_scale_factor).to(vae.dtype)
    z = denormalize_latents(z, vae.config.latents_mean, vae.config.latents_std)
    return vae.decode(z, return_dict=False)[0][:, :, 0]


@dataclass
class BackViewResult:
    images: list | None                 # PIL back views (None when decode is skipped)
    latents: torch.Tensor               # packed [B, N_target, 4z]
    knowledge: MMDiTKnowledge | None
    trajectory: Trajectory | None
    sample: SampleResult
    inputs: EditPlusInputs
    image_tensor: torch.Tensor | None = None  # the decoded back views [B, H, W, 3] in [0, 1], CPU


class QwenEditBackView:
    """Front image + back description -> back view (and MMDiT knowledge), headless."""

    def __init__(self, components: QwenEditComponents, prompt: BackViewPrompt | None = None,
                 vae_image_area: int = VAE_IMAGE_AREA, condition_image_area: int = CONDITION_IMAGE_AREA):
        if getattr(components.transformer.config, "zero_cond_t", False):
            require_zero_cond_t()
        self.c = components
        self.prompt = prompt or BackViewPrompt()
        self.vae_image_area = vae_image_area
        self.condition_image_area = condition_image_area
        self.sampler = EditPlusSampler(components.transformer, components.model_name)
        vae = components.vae
        self.vae_scale_factor = 2 ** len(vae.temperal_downsample) if vae is not None else VAE_SCALE_FACTOR
        self.loras: list[LoraReport] = []
        self.device: torch.device | None = None  # where the networks run (None: where the transformer is)
        self.offload = False
        self.hooked: list[torch.nn.Module] = []  # placed by diffusers' group-offloading hooks (``mmdit.memory``)
        self.visits: dict = {}  # id(network) -> device_visits.PinnedVisits (offload on CUDA)
        self.block_pins: dict[int, int] = {}  # id(hooked network) -> bytes pinned for its group offloading
        self._visiting: set[int] = set()  # ids of the networks on the device now (outermost ``use`` moves them)
        self.compute_dtype: torch.dtype | None = None  # None: the transformer's parameter dtype

    # ------------------------------------------------------------------ placement
    def networks(self) -> list[torch.nn.Module]:
        return [m for m in (self.c.transformer, self.c.vae, self.c.text_encoder) if m is not None]

    def place(self, device, offload: bool = False, hooked=(), pin_host: bool = False) -> None:
        """Run on ``device``; with ``offload`` the networks live on the CPU and each visits
        ``device`` only while it runs (see :meth:`use`), from pinned host copies with ``pin_host``
        (CUDA). ``hooked`` networks live on the CPU and are left to their group-offloading hooks
        (``mmdit.memory.apply_memory_plan``)."""
        from ..device_visits import visits_for

        self.device, self.offload = torch.device(device), bool(offload)
        self.hooked = list(hooked)
        home = torch.device("cpu") if self.offload else self.device
        for module in self.networks():
            module.to(torch.device("cpu") if self._is_hooked(module) else home)
        self.visits = {}
        if self.offload and pin_host:
            for module in self.networks():
                visits = None if self._is_hooked(module) else visits_for(module, self.device)
                if visits is not None:
                    self.visits[id(module)] = visits

    def pinned_bytes(self, module: torch.nn.Module | None) -> int:
        """Bytes locked for ``module``'s pinned host copy (its visits or its group offloading; 0: it
        moves with ``.to`` or stays put)."""
        visits = self.visits.get(id(module))
        return visits.host_bytes if visits is not None else self.block_pins.get(id(module), 0)

    def _is_hooked(self, module: torch.nn.Module) -> bool:
        return any(module is m for m in self.hooked)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the networks (with fp8 weight storage: the dtype the layers cast to; the
        norms and embeddings keep it)."""
        params = self.c.transformer.parameters()
        return self.compute_dtype or next(p.dtype for p in params if p.dtype.itemsize > 1)

    @property
    def execution_device(self) -> torch.device:
        return self.device if self.device is not None else next(self.c.transformer.parameters()).device

    @contextlib.contextmanager
    def use(self, *modules: torch.nn.Module | None) -> Iterator[None]:
        """Keep ``modules`` on the execution device for the block (a no-op unless offloading); a
        network already there (an enclosing ``use``) stays and moves with the outermost block."""
        mods = [m for m in modules if m is not None and not self._is_hooked(m) and id(m) not in self._visiting]
        if self.offload:
            for m in mods:
                self._arrive(m)
        try:
            yield
        finally:
            if self.offload:
                for m in mods:
                    self._leave(m)
                if self.execution_device.type == "cuda" and torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _arrive(self, module: torch.nn.Module) -> None:
        self._visiting.add(id(module))
        visits = self.visits.get(id(module))
        if visits is not None:
            visits.onload()
        else:
            module.to(self.execution_device)

    def _leave(self, module: torch.nn.Module) -> None:
        visits = self.visits.get(id(module))
        if visits is not None:
            visits.offload()
        else:
            module.to("cpu")
        self._visiting.discard(id(module))

    @classmethod
    def from_folder(cls, folder: str, *, dtype=torch.bfloat16, device="cpu", loras=(),
                    prompt: BackViewPrompt | None = None, **kw) -> "QwenEditBackView":
        """Load a diffusers-format folder; ``loras``: paths or (path, strength), merged at load."""
        obj = cls(load_qwen_edit(folder, dtype=dtype, device=device, **kw), prompt=prompt)
        for item in loras:
            path, strength = (item, 1.0) if isinstance(item, str) else item
            obj.load_lora(path, strength)
        return obj

    def load_lora(self, path: str, strength: float = 1.0) -> LoraReport:
        report = merge_lora(self.c.transformer, path, strength)
        self.loras.append(report)
        return report

    def encode(self, images, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings for ``text`` with the front image(s): ([1, T, D], [1, T]) in the
        transformer's dtype, on the text encoder's device (``prepare`` moves them where the model runs)."""
        if self.c.text_encoder is None or self.c.processor is None:
            raise RuntimeError("no text encoder/processor loaded: the Qwen folder needs text_encoder/ and "
                               "processor/ (or pass prompt_embeds)")
        cond = condition_images(images, self.vae_scale_factor, self.condition_image_area)
        with self.use(self.c.text_encoder):
            return encode_prompt(self.c.text_encoder, self.c.processor, cond, text, dtype=self.dtype,
                                 device=self.execution_device)

    def prepare(self, images, prompt_embeds, prompt_mask=None, negative_embeds=None, negative_mask=None,
                height: int | None = None, width: int | None = None) -> EditPlusInputs:
        """Model inputs: reference latents of ``images`` (PIL list) + prompt embeddings."""
        if height is None or width is None:
            h, w = output_size(images[-1], self.vae_scale_factor)
            height, width = height or h, width or w
        m = self.vae_scale_factor * PATCH
        height, width = height // m * m, width // m * m
        device, dtype = self.execution_device, self.dtype
        b = prompt_embeds.shape[0]
        with self.use(self.c.vae):
            refs, grids = encode_reference_latents(
                self.c.vae, vae_images(images, self.vae_scale_factor, self.vae_image_area), b)
        return EditPlusInputs(
            prompt_embeds=prompt_embeds.to(device, dtype),
            prompt_mask=None if prompt_mask is None else prompt_mask.to(device),
            negative_embeds=None if negative_embeds is None else negative_embeds.to(device, dtype),
            negative_mask=None if negative_mask is None else negative_mask.to(device),
            ref_latents=refs.to(device, dtype), ref_grids=grids,
            target_grid=(height // m, width // m), vae_scale_factor=self.vae_scale_factor)

    def noise(self, inputs: EditPlusInputs, generator: torch.Generator | None = None) -> torch.Tensor:
        """Packed Gaussian latents [B, N_target, 4z], drawn like diffusers' pipeline draws them."""
        from diffusers.utils.torch_utils import randn_tensor
        dtype = self.dtype
        z_dim = self.c.transformer.config.in_channels // (PATCH * PATCH)
        gh, gw = inputs.target_grid
        z = randn_tensor((inputs.batch_size, 1, z_dim, gh * 2, gw * 2), generator=generator,
                         device=self.execution_device, dtype=dtype)
        return pack_latents(z.permute(0, 2, 1, 3, 4))

    @torch.no_grad()
    def __call__(self, images, description: str = "", *, prompt_embeds=None, prompt_mask=None,
                 negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT, negative_embeds=None, negative_mask=None,
                 steps: int = DEFAULT_STEPS, true_cfg_scale: float = DEFAULT_TRUE_CFG, generator=None,
                 latents=None, height=None, width=None, capture: CaptureSpec | None = None,
                 early_exit: bool = False, decode: bool = True, record_trajectory: bool = True,
                 callback=None, progress=None, cancel=None, store_device=None) -> BackViewResult:
        """Generate the back view of ``images`` (PIL front image, or a list: the front image first).

        Either the text encoder builds the prompt ``camera prompt + description`` (and the negative
        prompt), or ``prompt_embeds``/``negative_embeds`` (+ masks) are given. With ``early_exit``
        sampling stops at ``capture.sigma`` and nothing is decoded. ``callback(i, sigma, latents)``,
        ``progress(step, total)`` and ``cancel()`` as in ``EditPlusSampler.sample``; ``store_device``
        receives the captured states.
        """
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        with self.use(self.c.text_encoder if prompt_embeds is None or negative_embeds is None else None):
            if prompt_embeds is None:  # both prompts in one visit of the text encoder
                prompt_embeds, prompt_mask = self.encode(images, self.prompt.build(description))
            if negative_embeds is None and negative_prompt is not None and true_cfg_scale > 1:
                negative_embeds, negative_mask = self.encode(images, negative_prompt)
        inputs = self.prepare(images, prompt_embeds, prompt_mask, negative_embeds, negative_mask, height, width)
        if latents is None:
            latents = self.noise(inputs, generator)
        sigmas = flow_match_sigmas(steps, inputs.n_target, self.c.scheduler_config)
        with self.use(self.c.transformer):
            res = self.sampler.sample(inputs, latents, sigmas, true_cfg_scale=true_cfg_scale, capture=capture,
                                      early_exit=early_exit, record_trajectory=record_trajectory,
                                      callback=callback, progress=progress, cancel=cancel,
                                      store_device=store_device)
        out = BackViewResult(images=None, latents=res.latents, knowledge=res.knowledge, trajectory=res.trajectory,
                             sample=res, inputs=inputs)
        if decode and not res.exited_early:
            with self.use(self.c.vae):
                img = decode_latents(self.c.vae, res.latents, *inputs.resolution, self.vae_scale_factor)
            out.image_tensor = ((img.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()
            out.images = _image_processor(self.vae_scale_factor).postprocess(img, output_type="pil")
        if res.knowledge is not None:
            res.knowledge.extra["loras"] = [r.path for r in self.loras]
        return out
