"""Frozen-network features of each pair, computed once and cached: the DINOv3 image condition and
the Know3D knowledge.

Knowledge sources (``know3d train know3d --knowledge-source``):

- ``trajectory`` (default, the paper's): the back view of the pair's front image is sampled with
  Qwen-Image-Edit-2511 (+ the back-view LoRAs given) exactly as ``know3d generate`` does it
  (``Know3DPipeline.back_view``: same prompt building, schedule, true CFG, capture at the step nearest
  ``sigma``, early exit), with a per-pair seed; the captured hidden states are the knowledge.
- ``gt_latent`` (cheaper, our documented alternative): the ground-truth back view is VAE-encoded at
  the back-view size, noised to ``sigma`` with a per-pair noise, and one conditional forward at that
  sigma is captured (``EditPlusSampler.capture_from_trajectory``).
- ``latent`` (the ablation's): the back view is sampled through every step as ``know3d generate
  --variant latent`` does; the denoised latent, patchified like the MMDiT input, is the knowledge
  (``vae_latent``, D = 16 * 2 * 2).
- ``image`` (the ablation's): as ``latent``, then the back view is VAE-decoded and its DINOv3 tokens at
  ``pipeline.DINO_IMAGE_RESOLUTION`` are the knowledge (``dino_image``, D = DINOv3 width), as
  ``know3d generate --variant image`` makes them.

The prompt is the camera prompt plus the pair's first annotation. Each pair's tensor goes to
``CACHE/<pair key>.safetensors`` (one file per pair: processes and machines can fill a shared cache
side by side); ``CACHE/cache.json`` states what the files hold, and a cache made for another layer
set, sigma, width or source is refused (exit code 2) instead of silently mixed.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from ..errors import UsageError
from ..plan import DINO_IMAGE, MMDIT_HIDDEN, VAE_LATENT
from .config import SOURCE_KIND
from .dataset import Pair, open_view, pair_seed

__all__ = ["FeatureCache", "KnowledgeSpec", "ConditionSource", "KnowledgeSource", "qwen_transformer_config",
           "knowledge_dtype"]

CACHE_SPEC = "cache.json"
TENSOR_KEY = "tensor"


class FeatureCache:
    """Per-pair tensors on disk (``folder``; None: memory only) behind an in-memory LRU of at most
    ``memory_bytes``.

    Tensors are stored in the dtype they were computed in (bf16 knowledge on CUDA: 4096 tokens x 3
    layers x 3072 = 75 MB a pair) and handed out as float32, a value computed now and one read back
    later being the same numbers (resumed runs see what uninterrupted ones saw).
    """

    def __init__(self, folder: Optional[str], spec: Dict[str, Any], memory_bytes: int = 2 << 30):
        self.folder = folder
        self.spec = spec
        self.memory: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.memory_bytes = int(memory_bytes)
        self._held = 0
        if folder is None:
            return
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, CACHE_SPEC)
        want = json.loads(json.dumps(spec))
        if os.path.isfile(path):
            with open(path, "r", encoding="utf-8") as f:
                have = json.load(f)
            if have != want:
                diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                raise UsageError(
                    f"cache {folder} holds other features ("
                    + ", ".join(f"{k}: cache {have.get(k)!r} vs run {want.get(k)!r}" for k in diff[:4])
                    + "); point --knowledge-cache at another folder or run with the cache's settings")
        else:
            from ..fileio import atomic_write_bytes

            atomic_write_bytes(path, json.dumps(spec, indent=1, sort_keys=True).encode())

    def _file(self, key: str) -> str:
        return os.path.join(self.folder, f"{key}.safetensors")

    def forget(self) -> None:
        """Empty the in-memory LRU."""
        self.memory.clear()
        self._held = 0

    def get(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The float32 tensor of ``key`` (memory, then disk, then ``compute()``, stored on the way)."""
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key].float()
        value = None
        if self.folder is not None and os.path.isfile(self._file(key)):
            value = load_file(self._file(key))[TENSOR_KEY]
        if value is None:
            value = compute().detach().to("cpu").contiguous()
            if self.folder is not None:
                tmp = self._file(key) + f".tmp{os.getpid()}"
                save_file({TENSOR_KEY: value}, tmp, metadata={"spec": json.dumps(self.spec, sort_keys=True)})
                os.replace(tmp, self._file(key))
        size = value.numel() * value.element_size()
        if size <= self.memory_bytes:
            self.memory[key] = value
            self._held += size
            while self._held > self.memory_bytes:
                _, old = self.memory.popitem(last=False)
                self._held -= old.numel() * old.element_size()
        return value.float()


def qwen_transformer_config(folder: str) -> Dict[str, Any]:
    """``transformer/config.json`` of a diffusers Qwen-Image folder (UsageError when absent)."""
    path = os.path.join(folder, "transformer", "config.json")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--qwen {folder}: no transformer/config.json (a diffusers Qwen-Image-Edit-2511 folder)") from None
    except ValueError as exc:
        raise UsageError(f"{path}: unreadable JSON ({exc})") from None


def knowledge_dtype(precision: str, device_type: str) -> str:
    """The dtype the back-view networks run in to make a run's knowledge: bf16 on CUDA unless the run
    is fp32 (``--precision fp32``), fp32 on the CPU. Inference makes knowledge in its own dtype
    (``know3d generate --dtype``, bf16 by default), so a bf16 run matches default generation and an fp32
    run matches fp32 generation (the experiment's): the branch is not trained on one rounding of the
    hidden states and used on another."""
    return "bfloat16" if device_type == "cuda" and precision != "fp32" else "float32"


@dataclass(frozen=True)
class KnowledgeSpec:
    """What the knowledge of a run is: its ``source`` (``config.SOURCE_KIND`` gives the kind) and, for
    ``mmdit_hidden``, ``layers``, ``sigma`` and ``width`` per layer; for ``vae_latent`` / ``dino_image``
    ``layers`` is empty, ``sigma`` None and ``width`` the whole D."""

    source: str
    layers: Tuple[int, ...]
    sigma: Optional[float]
    width: int
    back_size: Tuple[int, int]
    back_steps: int
    true_cfg_scale: float
    model: str
    loras: Tuple[str, ...] = ()
    vae_image_area: Optional[int] = None
    dtype: str = "float32"  # of the back-view networks (``knowledge_dtype``); part of the cache spec

    @property
    def kind(self) -> str:
        return SOURCE_KIND[self.source]

    @property
    def hidden(self) -> bool:
        """MMDiT hidden states (layers and sigma apply)."""
        return self.kind == MMDIT_HIDDEN

    @property
    def dim(self) -> int:
        return self.width * len(self.layers) if self.hidden else self.width

    @property
    def variant(self) -> str:
        """The ``Know3DPipeline`` variant whose back-view stage this knowledge comes from."""
        return {MMDIT_HIDDEN: "hidden", VAE_LATENT: "latent", DINO_IMAGE: "image"}[self.kind]

    def branch_kwargs(self) -> Dict[str, Any]:
        """``install_branch`` keywords: what the branch is for."""
        if self.hidden:
            return dict(kind=self.kind, mmdit_layers=list(self.layers), sigma=self.sigma)
        return dict(kind=self.kind)

    def wrap(self, tensor: torch.Tensor):
        """A cached ``[B, N, D]`` tensor as the ``knowledge.Knowledge`` inference would make."""
        from ..knowledge import dino_image_knowledge, mmdit_hidden_knowledge, vae_latent_knowledge
        from ..pipeline import DINO_IMAGE_RESOLUTION

        if self.hidden:
            return mmdit_hidden_knowledge(tensor, self.layers, self.sigma, self.back_size, model=self.model)
        if self.kind == VAE_LATENT:
            return vae_latent_knowledge(tensor, self.back_size, model=f"{self.model} VAE")
        return dino_image_knowledge(tensor, DINO_IMAGE_RESOLUTION)

    def cache_spec(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update(kind=self.kind, dim=self.dim, layers=list(self.layers), back_size=list(self.back_size),
                 loras=[os.path.basename(p) for p in self.loras])
        if self.source == "gt_latent":  # neither the sampling steps nor CFG enter a single forward
            d.pop("back_steps")
            d.pop("true_cfg_scale")
        return d


class ConditionSource:
    """DINOv3 tokens ``[T, C]`` of a pair's preprocessed front view at ``resolution`` px."""

    def __init__(self, geometry, resolution: int, cache: FeatureCache):
        self.geometry = geometry
        self.resolution = int(resolution)
        self.cache = cache

    def front(self, pair: Pair):
        return self.geometry.preprocess(open_view(pair.view("front")))

    def __call__(self, pair: Pair, front_rgba=None) -> torch.Tensor:
        def compute():
            img = self.geometry.preprocess(front_rgba if front_rgba is not None else open_view(pair.view("front")))
            return self.geometry.get_cond([img], self.resolution)["cond"][0]
        return self.cache.get(pair.key, compute)


class KnowledgeSource:
    """Knowledge ``[N, D]`` of a pair (see the module docstring); Qwen loads on the first cache miss."""

    def __init__(self, spec: KnowledgeSpec, geometry, cache: FeatureCache, qwen: Optional[str], seed: int,
                 device: torch.device):
        self.spec = spec
        self.geometry = geometry
        self.cache = cache
        self.qwen = qwen
        self.seed = int(seed)
        self.device = device
        self._pipe = None

    def pipeline(self):
        if self._pipe is None:
            if self.qwen is None:
                raise UsageError("knowledge of a pair is not in the cache and --qwen is not given: pass --qwen "
                                 "(Qwen-Image-Edit-2511 folder) or a complete --knowledge-cache")
            from ..pipeline import Know3DPipeline

            dtype = getattr(torch, self.spec.dtype)
            backview = Know3DPipeline._load_backview(self.qwen, dtype, self.device, list(self.spec.loras),
                                                      self.spec.vae_image_area)
            self._pipe = Know3DPipeline(self.geometry, backview)
        return self._pipe

    @staticmethod
    def description(pair: Pair) -> str:
        return pair.annotations[0] if pair.annotations else ""

    @staticmethod
    def key(pair: Pair, draw: int = 0) -> str:
        """Cache key of draw ``draw`` (back-view noise seed index) of ``pair``: draw 0 is the pair's key."""
        return pair.key if draw == 0 else f"{pair.key}_k{draw}"

    def __call__(self, pair: Pair, front_rgba=None, back_rgba=None, draw: int = 0) -> torch.Tensor:
        """Knowledge ``[N, D]`` of ``pair`` under its ``draw``-th back-view noise seed (``--knowledge-seeds``)."""
        return self.cache.get(self.key(pair, draw), lambda: self._compute(pair, front_rgba, back_rgba, draw))

    @torch.no_grad()
    def _compute(self, pair: Pair, front_rgba=None, back_rgba=None, draw: int = 0) -> torch.Tensor:
        from ..knowledge import from_mmdit_capture

        pipe = self.pipeline()
        front = pipe.preprocess(front_rgba if front_rgba is not None else open_view(pair.view("front")))
        seed = pair_seed(self.seed + draw, pair.key)
        if self.spec.source == "gt_latent":
            back = pipe.preprocess(back_rgba if back_rgba is not None else open_view(pair.view("back")))
            return from_mmdit_capture(self._gt_latent_capture(pipe, front, back, seed, self.description(pair))).tensor[0]
        hidden = self.spec.hidden
        stage = pipe.back_view(front, self.description(pair), self.spec.variant, seed=seed, steps=self.spec.back_steps,
                               sigma=self.spec.sigma if hidden else None, layers=list(self.spec.layers) if hidden else None,
                               size=self.spec.back_size, true_cfg_scale=self.spec.true_cfg_scale)
        return pipe.make_knowledge(stage, self.spec.variant).tensor[0]

    def _gt_latent_capture(self, pipe, front, back, seed: int, description: str):
        """One cond forward on the GT back latent noised to sigma: ``x = (1 - s) x0 + s eps``."""
        from ..mmdit import CaptureSpec
        from ..mmdit.backview import _image_processor, encode_reference_latents
        from ..mmdit.sampler import Trajectory, TrajectoryStep

        bv = pipe.backview
        h, w = self.spec.back_size
        embeds, mask = bv.encode([front], bv.prompt.build(description))
        inputs = bv.prepare([front], embeds, mask, None, None, h, w)
        pixels = _image_processor(bv.vae_scale_factor).preprocess(back, h, w).unsqueeze(2)
        x0, _ = encode_reference_latents(bv.c.vae, [pixels])
        gen = torch.Generator().manual_seed(seed)
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device, x0.dtype)
        sigma = float(self.spec.sigma)
        noisy = ((1 - sigma) * x0.float() + sigma * eps.float()).to(x0.dtype)
        traj = Trajectory(sigmas=torch.tensor([sigma, 0.0]), steps=[TrajectoryStep(0, sigma, noisy)])
        return bv.sampler.capture_from_trajectory(traj, inputs, CaptureSpec(layers=self.spec.layers, sigma=sigma))
