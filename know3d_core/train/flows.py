"""The TRELLIS.2 flow tasks: ``know3d`` (Know3D branch + backbone LoRA, base frozen) and ``trellis2``
(plain fine-tuning, LoRA or full), one stage at a time: ``ss`` (structure flow, dense
``[B, 8, 16, 16, 16]``), ``shape512`` / ``shape1024`` (shape flows, sparse tokens on the 32^3 / 64^3
grid, batched by token budget).

A sample is one front/back pair of an asset: the target is the asset's latent, the image condition
the DINOv3 tokens of the pair's front view (as ``know3d generate`` computes them), and for ``know3d``
the pair's knowledge (``features.KnowledgeSource``). Conditions are dropped for CFG training: the
image condition per sample with ``p_uncond`` (zeros, the sampler's negative condition), the
knowledge per micro-batch with ``p_uncond_knowledge`` (the model then runs with the branch off,
``knowledge=None``, as at inference without knowledge).

Outputs (``RUN/export/``): ``know3d``: ``know3d.safetensors``, a Know3D delta file for every flow of
the base folder: the trained stage's branch + LoRA, the other stages' from ``--init`` (an earlier
stage's file) or, where no stage was trained yet, a fresh branch and LoRA, which add exactly zero;
``trellis2``: ``TRELLIS.2/``, a copy of the base folder (files linked) with the trained flow's
weights replaced (LoRA merged, stored in the original dtypes).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import layout as L
from ..errors import UsageError
from ..fileio import atomic_write_bytes
from ..plan import DINO_IMAGE, MMDIT_HIDDEN, VAE_LATENT
from .config import SOURCE_KIND, TrainConfig
from .dataset import DatasetIndex, Pair, open_view, read_tensors
from .engine import DistInfo, Task, checkpoint_blocks
from .features import ConditionSource, FeatureCache, KnowledgeSource, KnowledgeSpec, knowledge_dtype, qwen_transformer_config
from .flow_matching import drop_mask, interpolate, noise_like, per_row, sample_t, velocity_target

__all__ = ["STAGE_MODELS", "FlowSamples", "FlowLoss", "FlowTask", "KNOW3D_FILE", "TRELLIS2_FOLDER", "fill_knowledge_cache"]

STAGE_MODELS = {"ss": "sparse_structure_flow_model", "shape512": "shape_slat_flow_model_512",
                "shape1024": "shape_slat_flow_model_1024"}
STAGE_COND_RESOLUTION = {"ss": 512, "shape512": 512, "shape1024": 1024}
STAGE_T_SCHEDULE = {"ss": "logit_normal", "shape512": "uniform", "shape1024": "uniform"}
STAGE_GRID = {"shape512": 32, "shape1024": 64}
TRAIN_SETS = (L.SET_3D, L.SET_3D_PERTURBED)
KNOW3D_FILE = "know3d.safetensors"
# Back-view sampling / knowledge noise seed per pair: a function of the pair alone (not of --seed), so a
# knowledge cache is the same whichever run fills it.
KNOWLEDGE_SEED = 0
TRELLIS2_FOLDER = "TRELLIS.2"


class FlowSamples(torch.utils.data.Dataset):
    """Pair i -> ``{"pair", "front" (PIL RGBA), "back" (PIL or None), latent tensors}`` (no models:
    runs in DataLoader workers)."""

    def __init__(self, index: DatasetIndex, stage: str, with_back: bool):
        self.pairs = index.pairs
        self.stage = stage
        self.with_back = with_back

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        out = {"pair": pair, "front": open_view(pair.view("front")),
               "back": open_view(pair.view("back")) if self.with_back else None}
        if self.stage == "ss":
            out["latent"], = read_tensors(os.path.join(pair.folder, L.SS_LATENT_FILE), [L.KEY_LATENT])
        else:
            res = 512 if self.stage == "shape512" else 1024
            out["coords"], out["feats"] = read_tensors(os.path.join(pair.folder, L.shape_latent_file(res)),
                                                       [L.KEY_COORDS, L.KEY_FEATS])
        return out


def collate_flow(samples: List[dict]) -> dict:
    out = {k: [s[k] for s in samples] for k in ("pair", "front", "back")}
    out["pairs"] = out.pop("pair")
    if "latent" in samples[0]:
        out["latent"] = torch.stack([s["latent"].float() for s in samples])
    else:
        out["coords"] = [s["coords"] for s in samples]
        out["feats"] = [s["feats"] for s in samples]
    return out


class FlowLoss(nn.Module):
    """``forward(x_t, t, cond, target, knowledge)`` -> MSE of the velocity (see ``flow_matching``)."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, x_t, t: torch.Tensor, cond: torch.Tensor, target, knowledge: Optional[torch.Tensor] = None):
        from ..knowledge import has_branch, prepare_knowledge

        ctx = prepare_knowledge(self.flow, knowledge) if knowledge is not None else None
        pred = self.flow(x_t, t * 1000, cond, knowledge=ctx)
        pred = getattr(pred, "feats", pred)
        target = getattr(target, "feats", target)
        loss = F.mse_loss(pred.float(), target.float())
        if knowledge is None and has_branch(self.flow):
            # the branch sat out this micro-batch: zero gradients keep every process's DDP buckets equal
            loss = loss + 0.0 * sum(p.sum() for n, p in self.flow.named_parameters()
                                    if p.requires_grad and "knowledge_" in n)
        return loss


def _knowledge_folder(cfg: TrainConfig) -> Optional[str]:
    """``--knowledge-cache`` (default RUN/cache/knowledge; ``off``: computed every time, memory only)."""
    if cfg.knowledge_cache == "off":
        return None
    return cfg.knowledge_cache or os.path.join(cfg.out, "cache", "knowledge")


def _models_folder(cfg: TrainConfig):
    from ..trellis2.loading import read_pipeline_config

    if not cfg.models:
        raise UsageError("--models: the TRELLIS.2 folder (pipeline.json + ckpts/) is required")
    if not os.path.isfile(os.path.join(cfg.models, "pipeline.json")):
        raise UsageError(f"--models {cfg.models}: no pipeline.json (the official TRELLIS.2-4B folder layout)")
    try:
        return read_pipeline_config(cfg.models)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"--models {cfg.models}: {exc}") from None


def _flow_stem(config, key: str) -> str:
    from ..trellis2.loading import resolve_checkpoint

    if key not in config.models:
        raise UsageError(f"--models {config.folder}: pipeline.json has no {key}")
    try:
        return resolve_checkpoint(config.folder, config.models[key], key)
    except FileNotFoundError as exc:
        raise UsageError(" ".join(str(exc).split())) from None


class FlowTask(Task):
    """``know3d`` (``branch=True``) or ``trellis2`` on one flow stage."""

    def __init__(self, branch: bool):
        self.branch = branch
        self.name = "know3d" if branch else "trellis2"
        self.knowledge: Optional[KnowledgeSource] = None
        self.init_ckpt = None

    # ------------------------------------------------------------------ setup (checks first)
    def setup(self, cfg: TrainConfig, info: DistInfo) -> None:
        from ..trellis2.loading import read_model_json

        if cfg.stage not in STAGE_MODELS:
            raise UsageError(f"--stage {cfg.stage!r}: use one of {', '.join(STAGE_MODELS)}")
        self.cfg, self.info, self.device = cfg, info, info.device
        self.key = STAGE_MODELS[cfg.stage]
        self.index = DatasetIndex.load(cfg.data, "train", TRAIN_SETS)
        config = _models_folder(cfg)
        self.config = config
        self.stem = _flow_stem(config, self.key)
        _, args = read_model_json(self.stem + ".json")
        self.index.check_views()
        hint = "re-run 'know3d data prepare' (encode step) with the encoders of this TRELLIS.2 model"
        if cfg.stage == "ss":
            r, c = int(args["resolution"]), int(args["in_channels"])
            sizes = self.index.check_latents(L.SS_LATENT_FILE, {L.KEY_LATENT: (c, r, r, r)}, hint)
            self.tokens = [1 for _ in self.index.pairs]  # dense: --batch-size alone sizes a micro-batch
        else:
            res = 512 if cfg.stage == "shape512" else 1024
            sizes = self.index.check_latents(
                L.shape_latent_file(res), {L.KEY_COORDS: (None, 3), L.KEY_FEATS: (None, int(args["in_channels"]))}, hint)
            self.tokens = [sizes[p.sha256] for p in self.index.pairs]
        cache_root = os.path.join(cfg.out, "cache")
        if self.branch:
            spec = self._knowledge_spec(cfg, self.device)
            folder = _knowledge_folder(cfg)
            knowledge_cache = FeatureCache(folder, spec.cache_spec(), memory_bytes=(2 << 30) if folder else 0)
        self.dino_path = self._dino_path(cfg, config)
        # everything checkable is checked: now the weights
        self.flow = self._load_flow(cfg)
        self.geometry = self._geometry(cfg, config)
        res = STAGE_COND_RESOLUTION[cfg.stage]
        self.cond = ConditionSource(self.geometry, res, FeatureCache(
            os.path.join(cache_root, f"cond_{res}"), {"dinov3": os.path.abspath(self.dino_path), "resolution": res}))
        if self.branch:
            self.knowledge = KnowledgeSource(spec, self.geometry, knowledge_cache, cfg.qwen, KNOWLEDGE_SEED, self.device)
            self.spec = spec
            self._install(cfg, spec)
        else:
            self._install_plain(cfg)
        self.module = FlowLoss(self.flow)
        self.dataset = FlowSamples(self.index, cfg.stage, with_back=self.branch and self.spec.source == "gt_latent")

    def _knowledge_spec(self, cfg: TrainConfig, device: torch.device) -> KnowledgeSpec:
        from ..knowledge import Know3DFormatError, read_know3d
        from ..mmdit.capture import DEFAULT_SIGMA

        if cfg.knowledge_source not in SOURCE_KIND:
            raise UsageError(f"--knowledge-source {cfg.knowledge_source!r}: use one of {', '.join(SOURCE_KIND)}")
        kind = SOURCE_KIND[cfg.knowledge_source]
        hidden = kind == MMDIT_HIDDEN
        if not hidden:
            for flag, value in (("--sigma", cfg.sigma), ("--layers", cfg.layers)):
                if value is not None:
                    raise UsageError(f"{flag} applies to MMDiT hidden-state knowledge (trajectory, gt_latent); "
                                     f"--knowledge-source {cfg.knowledge_source} makes {kind} knowledge: drop {flag}")
        layers, sigma = cfg.layers, cfg.sigma
        if cfg.init:
            try:
                self.init_ckpt = read_know3d(cfg.init)
            except (Know3DFormatError, FileNotFoundError) as exc:
                raise UsageError(f"--init: {exc}") from None
            s = self.init_ckpt.spec
            if s.knowledge_kind != kind:
                raise UsageError(f"--init {cfg.init} was trained for {s.describe()} knowledge; --knowledge-source "
                                 f"{cfg.knowledge_source} makes {kind} knowledge")
            if hidden:
                for what, mine, theirs in (("--layers", layers, s.mmdit_layers), ("--sigma", sigma, s.sigma)):
                    if mine is not None and list(mine if isinstance(mine, tuple) else [mine]) != \
                            list(theirs if isinstance(theirs, list) else [theirs]):
                        raise UsageError(f"{what} {mine} differs from --init {cfg.init} ({theirs}); drop {what}")
                layers, sigma = tuple(s.mmdit_layers), s.sigma
            if s.lora_rank and s.lora_rank != cfg.lora_rank:
                raise UsageError(f"--lora-rank {cfg.lora_rank} differs from --init {cfg.init} (rank {s.lora_rank})")
        if cfg.qwen:
            width, layers, model = self._knowledge_width(cfg, kind, layers)
        else:
            folder = _knowledge_folder(cfg)
            cached = os.path.join(folder, "cache.json") if folder else ""
            if not os.path.isfile(cached):
                raise UsageError("--qwen is required to compute the knowledge (or a --knowledge-cache made earlier)")
            with open(cached, "r", encoding="utf-8") as f:
                have = json.load(f)
            width, model = int(have["width"]), have["model"]
            layers = (tuple(layers) if layers is not None else tuple(have["layers"])) if hidden else ()
        dim = width * len(layers) if hidden else width
        if self.init_ckpt is not None and self.init_ckpt.spec.knowledge_dim != dim:
            raise UsageError(f"--init {cfg.init} expects knowledge of D={self.init_ckpt.spec.knowledge_dim}, the "
                             f"--knowledge-source {cfg.knowledge_source} models give D={dim}")
        for lora in cfg.backview_loras:
            if not os.path.isfile(lora):
                raise UsageError(f"--backview-lora {lora}: no such file")
        return KnowledgeSpec(
            source=cfg.knowledge_source, layers=tuple(int(i) for i in layers),
            sigma=float(DEFAULT_SIGMA if sigma is None else sigma) if hidden else None, width=width,
            back_size=tuple(cfg.back_size or (1024, 1024)), back_steps=int(cfg.back_steps),
            true_cfg_scale=float(cfg.true_cfg_scale), model=model, loras=tuple(cfg.backview_loras),
            vae_image_area=cfg.vae_image_area, dtype=knowledge_dtype(cfg.precision, torch.device(device).type))

    def _knowledge_width(self, cfg: TrainConfig, kind: str, layers):
        """``(width, layers, model name)`` of ``kind`` knowledge from the model folders' configs: the
        MMDiT width per captured layer (hidden), the packed VAE latent's channels (latent), the DINOv3
        width (image)."""
        from ..mmdit.capture import default_layers

        qc = qwen_transformer_config(cfg.qwen)
        model = os.path.basename(os.path.normpath(cfg.qwen))
        if kind == VAE_LATENT:
            return int(qc["in_channels"]), (), model  # the MMDiT input is the packed latent: C * p * p
        if kind == DINO_IMAGE:
            path = cfg.dinov3 or self._dino_path(cfg, _models_folder(cfg))
            try:
                with open(os.path.join(path, "config.json"), "r", encoding="utf-8") as f:
                    return int(json.load(f)["hidden_size"]), (), model
            except (OSError, ValueError, KeyError) as exc:
                raise UsageError(f"--dinov3 {path}: no readable config.json with hidden_size ({exc})") from None
        width = int(qc["num_attention_heads"]) * int(qc["attention_head_dim"])
        layers = tuple(layers) if layers is not None else default_layers(int(qc["num_layers"]))
        bad = [i for i in layers if not 0 <= i < int(qc["num_layers"])]
        if bad:
            raise UsageError(f"--layers {list(layers)}: {bad} out of range for {cfg.qwen} ({qc['num_layers']} blocks)")
        return width, layers, model

    def _load_flow(self, cfg: TrainConfig) -> nn.Module:
        from ..trellis2.loading import load_model

        try:
            flow = load_model(self.stem, dtype=torch.float32, device=self.device)
        except Exception as exc:  # noqa: BLE001 - a base checkpoint that does not load is a bad input
            raise UsageError(f"--models: {self.key} does not load: {' '.join(str(exc).split())}") from None
        flow.requires_grad_(False)
        return flow.train()

    @staticmethod
    def _dino_path(cfg: TrainConfig, config) -> str:
        from ..geometry_pipeline import _find_dinov3

        path = cfg.dinov3 or _find_dinov3(cfg.models, config)
        if path is None or not os.path.exists(path):
            raise UsageError(f"DINOv3 not found in or beside {cfg.models}: pass --dinov3 DIR")
        return path

    def _geometry(self, cfg: TrainConfig, config):
        from ..conditioning import DinoV3FeatureExtractor
        from ..geometry_pipeline import Trellis2GeometryPipeline

        path = self.dino_path
        extractor = DinoV3FeatureExtractor.from_pretrained(path, device=self.device)
        return Trellis2GeometryPipeline({}, config, extractor, device=self.device)

    def _install(self, cfg: TrainConfig, spec: KnowledgeSpec) -> None:
        from ..knowledge import Know3DFormatError, LoRAError, apply_know3d, init_lora, install_branch

        if self.init_ckpt is not None and self.key in self.init_ckpt.tensors:
            try:
                apply_know3d({self.key: self.flow}, self.init_ckpt, merge=False)
            except (Know3DFormatError, LoRAError) as exc:
                raise UsageError(f"--init: {' '.join(str(exc).split())}") from None
            self.flow.knowledge_proj.out_dtype = torch.float32
            self.flow.convert_to(torch.float32)
        else:
            install_branch(self.flow, spec.dim, **spec.branch_kwargs())
            init_lora(self.flow, cfg.lora_rank, cfg.lora_alpha, generator=torch.Generator().manual_seed(cfg.seed))
        self.flow.requires_grad_(False)
        for name, p in self.flow.named_parameters():
            if "knowledge_" in name or ".lora_" in name:
                p.requires_grad_(True)
        self.flow.to(self.device)

    def _install_plain(self, cfg: TrainConfig) -> None:
        from ..knowledge import init_lora

        if cfg.full:
            self.flow.requires_grad_(True)
            return
        init_lora(self.flow, cfg.lora_rank, cfg.lora_alpha, generator=torch.Generator().manual_seed(cfg.seed))
        self.flow.requires_grad_(False)
        for name, p in self.flow.named_parameters():
            if ".lora_" in name:
                p.requires_grad_(True)
        self.flow.to(self.device)

    # ------------------------------------------------------------------ engine hooks
    def trainable(self) -> Dict[str, nn.Parameter]:
        return {n: p for n, p in self.flow.named_parameters() if p.requires_grad}

    collate = staticmethod(collate_flow)

    def enable_grad_checkpointing(self) -> None:
        checkpoint_blocks(self.flow.blocks)

    def fsdp_units(self) -> List[nn.Module]:
        return list(self.flow.blocks)

    def prepare(self, batch: dict, generator: torch.Generator) -> Dict[str, Any]:
        from ..sparse import SparseTensor

        pairs: List[Pair] = batch["pairs"]
        B = len(pairs)
        t = sample_t(B, STAGE_T_SCHEDULE[self.cfg.stage], generator)
        if self.cfg.stage == "ss":
            x0 = batch["latent"].to(self.device)
            eps = noise_like(x0, generator)
            tt = t.to(self.device).view(B, *([1] * (x0.dim() - 1)))
            x_t, target = interpolate(x0, eps, tt), velocity_target(x0, eps)
        else:
            grid = STAGE_GRID[self.cfg.stage]
            coords = torch.cat([torch.cat([torch.full((c.shape[0], 1), b, dtype=torch.int32), c.int()], 1)
                                for b, c in enumerate(batch["coords"])]).to(self.device)
            feats = torch.cat([f.float() for f in batch["feats"]]).to(self.device)
            x0 = SparseTensor(feats, coords, (grid,) * 3, batch_size=B)
            eps = noise_like(feats, generator)
            tt = per_row(t, coords[:, 0], self.device)
            x_t = x0.replace(interpolate(feats, eps, tt))
            target = x0.replace(velocity_target(feats, eps))
        cond = torch.stack([self.cond(p, f) for p, f in zip(pairs, batch["front"])]).to(self.device)
        drop = drop_mask(B, self.cfg.p_uncond, generator).to(self.device)
        cond = torch.where(drop.view(B, 1, 1), torch.zeros_like(cond), cond)
        inputs = {"x_t": x_t, "t": t.to(self.device), "cond": cond, "target": target}
        if self.branch:
            if not bool(drop_mask(1, self.cfg.p_uncond_knowledge, generator)[0]):
                n = int(self.cfg.knowledge_seeds)  # which back-view noise seed of each pair (one: no draw)
                draws = torch.randint(n, (B,), generator=generator).tolist() if n > 1 else [0] * B
                inputs["knowledge"] = torch.stack(
                    [self.knowledge(p, f, b, d) for p, f, b, d in zip(pairs, batch["front"], batch["back"], draws)]
                ).to(self.device)
        return inputs

    def describe(self) -> Dict[str, Any]:
        d = {"task": self.name, "stage": self.cfg.stage, "model": self.key, "dataset_hash": self.index.digest,
             "dataset": self.index.root, "pairs": len(self.index.pairs)}
        if self.branch:
            d["knowledge"] = self.spec.cache_spec()
        return d

    # ------------------------------------------------------------------ export
    def export(self, folder: str, values: Dict[str, torch.Tensor], step: int) -> List[str]:
        os.makedirs(folder, exist_ok=True)
        if any(hasattr(p, "full_tensor") for p in self.trainable().values()):
            return self._export_unsharded(folder, values, step)
        with _swapped(self.trainable(), values):
            if self.branch:
                return [self._export_know3d(folder, step)]
            return [self._export_trellis2(folder)]

    def _export_unsharded(self, folder: str, values: Dict[str, torch.Tensor], step: int) -> List[str]:
        """FSDP2 shards the live flow: export from a fresh copy holding the gathered ``values``."""
        sharded = self.flow
        try:
            self.flow = self._load_flow(self.cfg)
            if self.branch:
                self._install(self.cfg, self.spec)
            else:
                self._install_plain(self.cfg)
            with torch.no_grad():
                for name, p in self.trainable().items():
                    p.copy_(values[name])
            return [self._export_know3d(folder, step) if self.branch else self._export_trellis2(folder)]
        finally:
            self.flow = sharded

    def _training_record(self, step: int) -> List[Dict[str, Any]]:
        previous = []
        if self.init_ckpt is not None:
            from safetensors import safe_open

            with safe_open(self.init_ckpt.path, framework="pt") as f:
                previous = json.loads((f.metadata() or {}).get("training", "[]"))
        record = {**self.describe(), "steps": step, "lr": self.cfg.lr, "knowledge_seeds": int(self.cfg.knowledge_seeds),
                  "global_batch": self.cfg.batch_size * self.cfg.grad_accum * self.info.world,
                  "lora_rank": self.cfg.lora_rank}
        record.pop("dataset", None)
        return previous + [record]

    def companion_flows(self, names: List[str]) -> Dict[str, nn.Module]:
        """The other flows, loaded from the base folder (fp32, on the device; cached): for ``know3d``
        with ``--init``'s branch and LoRA where it has them, else a fresh branch and LoRA that add
        exactly zero (zero output layer, B = 0)."""
        from ..knowledge import apply_know3d, init_lora, install_branch
        from ..trellis2.loading import load_model

        cache = self.__dict__.setdefault("_companions", {})
        for name in names:
            if name in cache:
                continue
            other = load_model(_flow_stem(self.config, name), dtype=torch.float32, device=self.device)
            if self.branch and self.init_ckpt is not None and name in self.init_ckpt.tensors:
                apply_know3d({name: other}, self.init_ckpt, merge=False)
            elif self.branch:
                install_branch(other, self.spec.dim, **self.spec.branch_kwargs())
                init_lora(other, self.cfg.lora_rank, self.cfg.lora_alpha,
                          generator=torch.Generator().manual_seed(self.cfg.seed))
            cache[name] = other.eval()
        return {n: cache[n] for n in names}

    def validate(self, step: int) -> Optional[str]:
        """The validation sheet (``--val-every``); None when off."""
        if not self.cfg.val_every:
            return None
        from .validation import ValidationSheet

        if getattr(self, "_sheet", None) is None:
            self._sheet = ValidationSheet(self, self.cfg.val_pairs, self.cfg.val_steps)
        return self._sheet(step, self.cfg.out)

    def _export_know3d(self, folder: str, step: int) -> str:
        from ..knowledge import MODEL_NAMES, save_know3d

        models = self.companion_flows([n for n in MODEL_NAMES if n != self.key and n in self.config.models])
        models[self.key] = self.flow
        models = {n: models[n] for n in MODEL_NAMES if n in models}
        path = os.path.join(folder, KNOW3D_FILE)
        tmp = os.path.join(folder, f".tmp-{KNOW3D_FILE}")
        save_know3d(tmp, models, content="delta", mmdit_model=self.spec.model,
                    extra_metadata={"training": json.dumps(self._training_record(step))})
        os.replace(tmp, path)
        return path

    def _export_trellis2(self, folder: str) -> str:
        from safetensors import safe_open
        from safetensors.torch import save_file

        from ..knowledge.checkpoint import _merged_state_dict
        from ..trellis2.loading import resolve_checkpoint

        out = os.path.join(folder, TRELLIS2_FOLDER)
        tmp = os.path.join(folder, f".tmp-{TRELLIS2_FOLDER}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "ckpts"))
        shutil.copy2(os.path.join(self.config.folder, "pipeline.json"), os.path.join(tmp, "pipeline.json"))
        for key, ref in self.config.models.items():
            try:
                stem = resolve_checkpoint(self.config.folder, ref, key)
            except FileNotFoundError:
                continue  # a model the base folder lacks too (e.g. texture): same as the original
            dst = os.path.join(tmp, "ckpts", os.path.basename(stem))
            shutil.copy2(stem + ".json", dst + ".json")
            if key == self.key:
                with safe_open(stem + ".safetensors", framework="pt") as f:
                    dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
                merged = _merged_state_dict(self.flow)
                save_file({k: v.detach().cpu().to(_DTYPES.get(dtypes.get(k), v.dtype)).contiguous()
                           for k, v in merged.items()}, dst + ".safetensors")
            else:
                _link_or_copy(stem + ".safetensors", dst + ".safetensors")
        dino = getattr(self, "dino_path", None)
        if dino and os.path.isdir(dino):
            os.symlink(os.path.abspath(dino), os.path.join(tmp, os.path.basename(os.path.normpath(dino))))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        atomic_write_bytes(os.path.join(out, "TRAINED.json"), json.dumps(self.describe(), indent=1).encode())
        return out


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class _swapped:
    """Temporarily load ``values`` into ``params`` (export of the EMA or gathered weights)."""

    def __init__(self, params: Dict[str, nn.Parameter], values: Dict[str, torch.Tensor]):
        self.params, self.values = params, values

    def __enter__(self):
        self.saved = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.values[k])

    def __exit__(self, *exc):
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.saved[k])
        return False


def fill_knowledge_cache(cfg: TrainConfig) -> Dict[str, int]:
    """``know3d train knowledge``: compute every pair's knowledge into the cache and exit.

    Under torchrun each process takes every ``WORLD_SIZE``-th pair from its ``RANK`` (no process
    group is needed: the per-pair files do not collide), so many GPUs or machines sharing the
    folder fill one cache. Returns ``{"pairs", "computed", "cached"}`` of this process.
    """
    from tqdm.auto import tqdm

    from ..geometry_pipeline import Trellis2GeometryPipeline
    from .engine import pick_device

    task = FlowTask(branch=True)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    index = DatasetIndex.load(cfg.data, "train", TRAIN_SETS)
    index.check_views()
    config = _models_folder(cfg)
    device = pick_device(cfg)
    spec = task._knowledge_spec(cfg, device)
    if _knowledge_folder(cfg) is None:
        raise UsageError("know3d train knowledge fills a cache: give --knowledge-cache DIR (not 'off')")
    cache = FeatureCache(_knowledge_folder(cfg), spec.cache_spec())
    extractor = None
    if spec.kind == DINO_IMAGE:  # the image source encodes the decoded back view with DINOv3
        from ..conditioning import DinoV3FeatureExtractor

        extractor = DinoV3FeatureExtractor.from_pretrained(task._dino_path(cfg, config), device=device)
    geometry = Trellis2GeometryPipeline({}, config, extractor, device=device)
    source = KnowledgeSource(spec, geometry, cache, cfg.qwen, KNOWLEDGE_SEED, device)
    mine = index.pairs[rank::world]
    draws = range(int(cfg.knowledge_seeds))
    done = sum(os.path.isfile(cache._file(KnowledgeSource.key(p, d))) for p in mine for d in draws)
    for pair in tqdm(mine, desc=f"knowledge {rank + 1}/{world}", disable=not cfg.progress):
        for d in draws:
            source(pair, draw=d)
        cache.forget()
    total = len(mine) * len(draws)
    return {"pairs": len(mine), "seeds": len(draws), "computed": total - done, "cached": done}
