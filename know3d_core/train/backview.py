"""The ``backview`` task: a LoRA on Qwen-Image-Edit-2511's MMDiT that turns a front view into the
object's back view (paper §3.1.2), and exports of the pairs for other trainers.

Conditioning is our Edit-Plus sampler's (``mmdit.sampler.EditPlusSampler.velocity``): the prompt
is encoded by Qwen2.5-VL together with the front image (``QwenEditBackView.encode``), the front
image's VAE latent follows the target tokens as the reference, and the MMDiT sees ``sigma`` as its
timestep. Frozen VAE and text encoder; their outputs are cached per pair (and per prompt variant).

Flow matching (Qwen-Image's, ``sigma_min = 0``): ``x_s = (1 - s) x_0 + s eps``, target ``eps - x_0``,
``s ~ sigmoid(N(0, 1))`` (SD3's logit-normal, which diffusers' Qwen-Image trainer also uses);
``x_0`` is the normalised, packed VAE latent of the ground-truth back view.

Stochastic prompting (paper §3.1.2): the prompt is always the fixed camera-rotation prompt
(``mmdit.prompt.DEFAULT_CAMERA_PROMPT``); with probability ``p_description`` (default 0.5, any value
in [0, 1]; 0 trains the camera prompt alone, 1 always adds a description) one of the pair's
annotations, drawn uniformly, is appended as at inference (``BackViewPrompt.build``). The paper does
not print p; 0.5 keeps both uses (with and without a description) equally trained.

LoRA (``peft``): rank 64 by default on every attention linear of every block (image and text
streams: ``to_q/k/v``, ``to_out.0``, ``add_q/k/v_proj``, ``to_add_out``). Saved with diffusers'
key names ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` and alpha = rank (a different
alpha is folded into B), so our loader (``mmdit.lora``), ComfyUI's LoraLoader and diffusers'
``load_lora_weights`` read the same scale without any ``alpha`` tensor.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import layout as L
from ..errors import UsageError
from .config import TrainConfig
from .dataset import DatasetIndex, Pair, open_view
from .engine import DistInfo, Task
from .features import FeatureCache, qwen_transformer_config
from .flow_matching import sample_t

__all__ = ["BackViewTask", "BackViewLoss", "LORA_TARGETS", "BACKVIEW_LORA_FILE", "lora_file_tensors",
           "export_pairs", "PAIR_FORMATS"]

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
BACKVIEW_LORA_FILE = "backview_lora.safetensors"
PAIR_FORMATS = ("diffsynth", "musubi")


class BackViewSamples(torch.utils.data.Dataset):
    def __init__(self, index: DatasetIndex):
        self.pairs = index.pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        return {"pair": pair, "front": open_view(pair.view("front")), "back": open_view(pair.view("back"))}


def collate_backview(samples: List[dict]) -> dict:
    return {"pairs": [s["pair"] for s in samples], "front": [s["front"] for s in samples],
            "back": [s["back"] for s in samples]}


class BackViewLoss(nn.Module):
    """``forward(x_s, sigma, target, inputs)`` -> MSE of the velocity through ``EditPlusSampler.velocity``."""

    def __init__(self, transformer: nn.Module, model_name: str):
        super().__init__()
        from ..mmdit.sampler import EditPlusSampler

        self.transformer = transformer
        self._sampler = EditPlusSampler(transformer, model_name)

    def forward(self, x_s: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor, inputs: Any) -> torch.Tensor:
        v = self._sampler.velocity(x_s, sigma * 1000, inputs.prompt_embeds, inputs.prompt_mask, inputs)
        return F.mse_loss(v.float(), target.float())


def _prompt(pair: Pair, choice: int) -> str:
    from ..mmdit.prompt import BackViewPrompt

    return BackViewPrompt().build(pair.annotations[choice] if choice >= 0 else "")


class BackViewTask(Task):
    name = "backview"

    def setup(self, cfg: TrainConfig, info: DistInfo) -> None:
        self.cfg, self.info, self.device = cfg, info, info.device
        self.index = DatasetIndex.load(cfg.data, "train", (L.SET_BACKVIEW,))
        self.index.check_views()
        if not cfg.qwen:
            raise UsageError("--qwen: the Qwen-Image-Edit-2511 folder (diffusers layout) is required")
        qc = qwen_transformer_config(cfg.qwen)
        self.size = tuple(cfg.image_size or (1024, 1024))
        self.tokens = [1 for _ in self.index.pairs]
        from ..pipeline import Know3DPipeline

        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.bv = Know3DPipeline._load_backview(cfg.qwen, dtype, self.device, [], cfg.vae_image_area)
        except FileNotFoundError as exc:
            raise UsageError(f"--qwen {cfg.qwen}: {exc}") from None
        transformer = self.bv.c.transformer
        transformer.requires_grad_(False)
        for m in (self.bv.c.vae, self.bv.c.text_encoder):
            m.requires_grad_(False)
        self._add_lora(transformer, cfg)
        self.model_name = self.bv.c.model_name
        self.module = BackViewLoss(transformer, self.model_name)
        self.dataset = BackViewSamples(self.index)
        cache = os.path.join(cfg.out, "cache")
        area = cfg.vae_image_area
        self.embeds = FeatureCache(os.path.join(cache, "prompts"), {"qwen": self.model_name})
        self.refs = FeatureCache(os.path.join(cache, "reference"), {"qwen": self.model_name, "vae_image_area": area})
        self.targets = FeatureCache(os.path.join(cache, "targets"), {"qwen": self.model_name, "size": list(self.size)})
        self.width = int(qc["num_attention_heads"]) * int(qc["attention_head_dim"])

    def _add_lora(self, transformer: nn.Module, cfg: TrainConfig) -> None:
        from peft import LoraConfig

        torch.manual_seed(cfg.seed)  # peft draws A from the global RNG: the same init on every rank
        transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                           target_modules=list(LORA_TARGETS), init_lora_weights=True))
        transformer.train()

    def trainable(self) -> Dict[str, nn.Parameter]:
        return {n: p for n, p in self.module.transformer.named_parameters() if p.requires_grad}

    collate = staticmethod(collate_backview)

    def enable_grad_checkpointing(self) -> None:
        self.module.transformer.enable_gradient_checkpointing()

    def fsdp_units(self) -> List[nn.Module]:
        return list(self.module.transformer.transformer_blocks)

    # ------------------------------------------------------------------ features
    def _front(self, rgba):
        from ..conditioning import preprocess_image

        return preprocess_image(rgba)

    @torch.no_grad()
    def _embeds(self, pair: Pair, choice: int, front) -> torch.Tensor:
        def compute():
            return self.bv.encode([front], _prompt(pair, choice))[0][0]
        return self.embeds.get(f"{pair.key}_{choice}", compute)

    @torch.no_grad()
    def _reference(self, pair: Pair, front) -> torch.Tensor:
        from ..mmdit.backview import encode_reference_latents, vae_images

        def compute():
            imgs = vae_images([front], self.bv.vae_scale_factor, self.bv.vae_image_area)
            return encode_reference_latents(self.bv.c.vae, imgs)[0][0]
        return self.refs.get(pair.key, compute)

    @torch.no_grad()
    def _target(self, pair: Pair, back_rgba) -> torch.Tensor:
        from ..mmdit.backview import _image_processor, encode_reference_latents

        def compute():
            h, w = self.size
            pixels = _image_processor(self.bv.vae_scale_factor).preprocess(self._front(back_rgba), h, w).unsqueeze(2)
            return encode_reference_latents(self.bv.c.vae, [pixels])[0][0]
        return self.targets.get(pair.key, compute)

    def prepare(self, batch: dict, generator: torch.Generator) -> Dict[str, Any]:
        from ..mmdit.packing import PATCH, dimensions_for_area
        from ..mmdit.sampler import EditPlusInputs

        pairs: List[Pair] = batch["pairs"]
        B = len(pairs)
        sigma = sample_t(B, "logit_normal", generator, mean=0.0, std=1.0)
        use = torch.rand(B, generator=generator) < self.cfg.p_description
        pick = torch.rand(B, generator=generator)
        fronts = [self._front(f) for f in batch["front"]]
        choices = [int(p * len(pr.annotations)) if u and pr.annotations else -1
                   for u, p, pr in zip(use.tolist(), pick.tolist(), pairs)]
        embeds = [self._embeds(pr, c, f) for pr, c, f in zip(pairs, choices, fronts)]
        t_max = max(e.shape[0] for e in embeds)
        mask = torch.zeros(B, t_max, dtype=torch.long)
        padded = torch.zeros(B, t_max, embeds[0].shape[1])
        for i, e in enumerate(embeds):
            padded[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = 1
        refs = torch.stack([self._reference(pr, f) for pr, f in zip(pairs, fronts)])
        x0 = torch.stack([self._target(pr, b) for pr, b in zip(pairs, batch["back"])])
        eps = torch.randn(x0.shape, generator=generator)
        s = sigma.view(B, 1, 1)
        dtype = next(self.module.transformer.parameters()).dtype
        dev = self.device
        m = self.bv.vae_scale_factor * PATCH
        ref_w, ref_h = dimensions_for_area(self.bv.vae_image_area, 1.0)  # preprocessed fronts are square
        inputs = EditPlusInputs(
            prompt_embeds=padded.to(dev, dtype), prompt_mask=None if bool(mask.all()) else mask.to(dev),
            target_grid=(self.size[0] // m, self.size[1] // m), ref_latents=refs.to(dev, dtype),
            ref_grids=[(ref_h // m, ref_w // m)], vae_scale_factor=self.bv.vae_scale_factor)
        return {"x_s": ((1 - s) * x0 + s * eps).to(dev, dtype), "sigma": sigma.to(dev),
                "target": (eps - x0).to(dev), "inputs": inputs}

    def describe(self) -> Dict[str, Any]:
        return {"task": self.name, "dataset_hash": self.index.digest, "pairs": len(self.index.pairs),
                "qwen": self.model_name, "image_size": list(self.size), "p_description": self.cfg.p_description}

    # ------------------------------------------------------------------ export
    def export(self, folder: str, values: Dict[str, torch.Tensor], step: int) -> List[str]:
        from safetensors.torch import save_file

        from ..mmdit.prompt import DEFAULT_CAMERA_PROMPT, DEFAULT_PROMPT_TEMPLATE

        os.makedirs(folder, exist_ok=True)
        alpha = float(self.cfg.lora_alpha or self.cfg.lora_rank)
        tensors = lora_file_tensors(values, alpha / self.cfg.lora_rank)
        meta = {
            "lora_adapter_metadata": json.dumps({"r": self.cfg.lora_rank, "lora_alpha": self.cfg.lora_rank,
                                                 "target_modules": list(LORA_TARGETS)}),
            "camera_prompt": DEFAULT_CAMERA_PROMPT, "prompt_template": DEFAULT_PROMPT_TEMPLATE,
            "training": json.dumps([{**self.describe(), "steps": step, "lr": self.cfg.lr, "lora_rank": self.cfg.lora_rank}]),
        }
        path = os.path.join(folder, BACKVIEW_LORA_FILE)
        tmp = os.path.join(folder, f".tmp-{BACKVIEW_LORA_FILE}")
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
        return [path]


def lora_file_tensors(values: Dict[str, torch.Tensor], scale: float) -> Dict[str, torch.Tensor]:
    """peft parameter names (``transformer_blocks.0.attn.to_q.lora_A.default.weight``) -> diffusers
    LoRA keys (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``); ``scale`` = alpha / rank
    is folded into B so that every loader applies scale 1."""
    out = {}
    for name, value in values.items():
        key = "transformer." + name.replace(".default.", ".")
        v = value.detach().float().cpu()
        if ".lora_B." in key and scale != 1.0:
            v = v * scale
        out[key] = v.contiguous()
    return out


# ------------------------------------------------------------------------------ pair exports
def export_pairs(data: str, out: str, fmt: str, seed: int = 0) -> str:
    """Write the back-view pairs for DiffSynth-Studio (``metadata.json``: ``[{prompt, image, edit_image}]``,
    paths relative to OUT: train with ``--dataset_base_path OUT --data_file_keys image,edit_image``) or
    musubi-tuner (``metadata.jsonl``: ``{image_path, control_path, caption}``, absolute paths).

    Images are the preprocessed crops the trainer uses (front = control / edit image, back = target).
    A static file cannot draw prompts at random, so each pair appears once with the camera prompt
    alone and once per annotation (the camera prompt plus that annotation). Returns the metadata path.
    """
    from ..conditioning import preprocess_image
    from ..fileio import atomic_write_bytes

    if fmt not in PAIR_FORMATS:
        raise UsageError(f"--format {fmt!r}: use one of {', '.join(PAIR_FORMATS)}")
    index = DatasetIndex.load(data, "train", (L.SET_BACKVIEW,))
    index.check_views()
    images = os.path.join(out, "images")
    os.makedirs(images, exist_ok=True)
    rows = []
    for pair in index.pairs:
        paths = {}
        for which in ("front", "back"):
            rel = f"images/{pair.key}_{which}.png"
            preprocess_image(open_view(pair.view(which))).save(os.path.join(out, rel))
            paths[which] = rel
        for choice in range(-1, len(pair.annotations)):
            prompt = _prompt(pair, choice)
            if fmt == "diffsynth":
                rows.append({"prompt": prompt, "image": paths["back"], "edit_image": paths["front"]})
            else:
                rows.append({"image_path": os.path.abspath(os.path.join(out, paths["back"])),
                             "control_path": os.path.abspath(os.path.join(out, paths["front"])), "caption": prompt})
    if fmt == "diffsynth":
        path, text = os.path.join(out, "metadata.json"), json.dumps(rows, indent=1, ensure_ascii=False)
    else:
        path, text = os.path.join(out, "metadata.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
