"""The small-scale Know3D experiment: does injected knowledge control the hidden back?

Procedural objects (``data.synthetic``: objects of one seed share their front, the back carries one
of K named features) go through the real parts of the pack:

1. ``know3d data synth`` + ``know3d data prepare`` (mesh, render, annotate steps) for the training
   seeds and, separately, for held-out seeds (the evaluation fronts);
2. structure latents by the *experiment codec* (below) instead of the SS VAE;
3. ``train backview``: the back-view LoRA on the MMDiT (used by every later back view);
4. ``train trellis2 --stage ss --full``: the plain structure flow trained on the set: the base;
   ``train know3d --stage ss`` on that base, one run per knowledge source / capture sigma;
5. generation through ``Know3DPipeline`` (back view by Qwen-Image-Edit, capture, injection, the
   structure flow), for every held-out front with each of the K descriptions, per variant;
6. ``know3d eval`` (:func:`know3d_core.eval.run.run_eval`) on the 64^3 occupancies, plus the
   prompt-swap accuracy: the generated structure is classified as the feature whose ground truth it
   matches best by back-half IoU; ``none`` cannot depend on the prompt, so it scores 1/K.

Rows: ``hidden`` (trajectory knowledge, the paper's), ``hidden_gt`` (trained on one forward on the
ground-truth back latent noised to sigma; inference as always from the trajectory), ``latent`` (the
denoised back-view latent, ``--knowledge-source latent``), ``image`` (DINOv3 features of the decoded
back view, ``--knowledge-source image``; the experiment's DINOv3 and Qwen VAE are the same tiny
random modules as everywhere else), ``multiview`` (the decoded back view as a second image of the
base), ``none`` (the base alone), and the capture sigma sweep of ``hidden``.

Experiment codec. The networks are small and random-initialised (nothing is downloaded), so the
TRELLIS SS VAE would be random too, and its decoder cannot invert its encoder. The experiment
therefore uses an exact codec of the same shapes: the surface occupancy at ``2R`` (R = the flow's
latent grid) is cut into 2x2x2 blocks, whose 8 bits become the 8 latent channels (values -1 / +1):
``[8, R, R, R]``, TRELLIS's structure-latent shape. Its decoder (in place of the SS decoder) maps
a latent back to 64^3 logits. Everything else is the pack's real code.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..data import layout as L

__all__ = ["ExperimentConfig", "SMOKE", "encode_occupancy", "decode_latent", "CodecDecoder", "run_experiment",
           "ROWS", "ROW_SOURCES", "SIGMA_ROW", "check_row", "front_pairs_dataset"]

# (row, pipeline variant at generation, know3d train --knowledge-source or None: no Know3D training)
_ROW_TABLE = (("hidden", "hidden", "trajectory"), ("hidden_gt", "hidden", "gt_latent"), ("latent", "latent", "latent"),
              ("image", "image", "image"), ("multiview", "multiview", None), ("none", "none", None))
ROWS = tuple(row for row, _, _ in _ROW_TABLE)
ROW_SOURCES = {row: (variant, source) for row, variant, source in _ROW_TABLE}
SIGMAS = (0.85, 0.5, 0.25, 0.1)
SIGMA_ROW = "hidden_sigma"  # a row of the capture-sigma sweep: ``hidden_sigma0.5`` (``hidden`` at sigma 0.5)


def check_row(name: str) -> bool:
    """A row name ``--rows`` accepts: one of :data:`ROWS` or ``hidden_sigma<s>`` with s in (0, 1)."""
    if name in ROWS:
        return True
    if name.startswith(SIGMA_ROW):
        try:
            return 0.0 < float(name[len(SIGMA_ROW):]) < 1.0
        except ValueError:
            return False
    return False


@dataclass
class ExperimentConfig:
    out: str
    train_seeds: int = 6
    val_seeds: int = 2
    val_first_seed: int = 1000
    features: Tuple[str, ...] = ("flat_back", "handle", "slats", "shelf")
    render_size: int = 64
    latent_grid: int = 8                 # R: structure latent [8, R, R, R]; occupancy grid 2R
    model_channels: int = 32
    num_blocks: int = 1
    num_heads: int = 2
    backview_steps: int = 20             # 0: no back-view LoRA (the MMDiT as initialised)
    base_steps: int = 20
    know3d_steps: int = 20
    batch_size: int = 4
    lr: float = 1e-4
    lora_rank: int = 4
    back_steps: int = 4
    back_size: Tuple[int, int] = (32, 32)
    vae_image_area: int = 32 * 32
    sample_steps: int = 4
    sigma: float = 0.25
    sigmas: Tuple[float, ...] = ()       # the sweep (empty: only ``sigma``)
    rows: Tuple[str, ...] = ROWS
    device: str = "cpu"
    seed: int = 0
    num_workers: int = 0
    eval_points: int = 2048
    progress: bool = False
    time_budget: float = 0.0             # seconds; rows that would end later (as long as the last such row) are skipped
    # The random MMDiT's text values are scaled by this on top of demo_models.DEMO_TEXT_GAIN (100): a
    # trained Qwen-Image-Edit's back view follows its description; a random one barely does. Measured
    # on the CPU (64x64 back view, sigma 0.25, 4 seeds): the knowledge changes by 3.5% between two
    # descriptions and 21% between two noise seeds at 1; 3.8% and 12% at 4.
    text_gain: float = 1.0
    # Know3D rows train on the pairs whose front view lies within this many degrees of azimuth of the
    # objects' front (the generator's azimuth 0, the view every row is evaluated from); None: every pair.
    # The data toolkit pairs every 3d-set view with the opposite one, and from azimuth 90 or 135 the
    # back feature is in the image condition: there the knowledge adds nothing to learn from.
    know3d_front_azimuth: Optional[float] = None
    know3d_batch_size: Optional[int] = None  # Know3D rows' batch (default batch_size)
    # back-view noise seeds per training pair (``train know3d --knowledge-seeds``): with one, the branch
    # can learn each pair's noise (8^3, 32 pairs, 800 steps: 13/16 training generations right with the
    # training knowledge, 6/16 with a new seed, chance on held-out fronts)
    knowledge_seeds: int = 1
    fit_steps: bool = True               # with time_budget: size the steps to it; False: keep them, only skip rows
    extra: Dict[str, Any] = field(default_factory=dict)


# The CPU smoke run CI does (minutes): every stage runs, numbers mean nothing at this size.
SMOKE = dict(train_seeds=2, val_seeds=1, features=("flat_back", "handle"), render_size=32, latent_grid=4,
             backview_steps=2, base_steps=2, know3d_steps=2, batch_size=2, back_steps=2, sample_steps=2, eval_points=256,
             rows=ROWS, sigmas=(), know3d_front_azimuth=30.0)


# ----------------------------------------------------------------------------------- codec
def encode_occupancy(occ: torch.Tensor) -> torch.Tensor:
    """``[2R, 2R, 2R]`` bool -> latent ``[8, R, R, R]`` float in {-1, +1}: channel ``4a + 2b + c`` holds
    voxel ``(2i + a, 2j + b, 2k + c)``."""
    r2 = occ.shape[0]
    r = r2 // 2
    x = occ.float().view(r, 2, r, 2, r, 2).permute(1, 3, 5, 0, 2, 4).reshape(8, r, r, r)
    return x * 2 - 1


def decode_latent(z: torch.Tensor) -> torch.Tensor:
    """Latent ``[B, 8, R, R, R]`` -> occupancy ``[B, 2R, 2R, 2R]`` bool (channel > 0), inverse of
    :func:`encode_occupancy`."""
    b, _, r = z.shape[0], z.shape[1], z.shape[2]
    x = (z > 0).view(b, 2, 2, 2, r, r, r).permute(0, 4, 1, 5, 2, 6, 3)
    return x.reshape(b, 2 * r, 2 * r, 2 * r)


class CodecDecoder(nn.Module):
    """Stands in for the SS decoder: latent ``[B, 8, R, R, R]`` -> logits ``[B, 1, 64, 64, 64]`` (+1 / -1)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # .to(device) / dtype bookkeeping

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        occ = decode_latent(z.float())
        up = 64 // occ.shape[1]
        logits = occ.float() * 2 - 1
        logits = logits.repeat_interleave(up, 1).repeat_interleave(up, 2).repeat_interleave(up, 3)
        return logits.unsqueeze(1)

    def convert_to(self, dtype):  # the pipeline casts decoders; the codec has no weights
        return self


def occupancy_64(occ: torch.Tensor) -> torch.Tensor:
    """Nearest upsampling of a ``[G, G, G]`` grid (G divides 64) to ``[64, 64, 64]``."""
    up = 64 // occ.shape[0]
    return occ.repeat_interleave(up, 0).repeat_interleave(up, 1).repeat_interleave(up, 2)


# ----------------------------------------------------------------------------------- data
def _say(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_dataset(cfg: ExperimentConfig, folder: str, seeds: Sequence[int], occupancy: bool = True) -> str:
    """Synth -> prepare (mesh, render, annotate) -> codec latents (and, with ``occupancy``, the 64^3
    occupancies the evaluation reads); every asset in the ``train`` split (the experiment splits by
    seed, not by hash). Returns the dataset folder."""
    from ..data.prepare import PrepareOptions, prepare
    from ..data.synthetic import write_dataset_folder
    from ..fileio import atomic_write_bytes
    from .geometry import surface_voxels
    from safetensors.torch import load_file, save_file

    assets = folder + "_assets"
    write_dataset_folder(assets, seeds, cfg.features)
    prepare(PrepareOptions(input=assets, out=folder, steps=("mesh", "render", "annotate"),
                           render_size=cfg.render_size, progress=False), log=lambda m: None)
    rows = []
    with open(L.manifest_path(folder), "r", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    for row in rows:
        if row["status"] != L.STATUS_OK:
            raise RuntimeError(f"experiment: asset {row['source']} failed to prepare: {row.get('error')}")
        d = L.asset_dir(folder, row["sha256"])
        mesh = load_file(os.path.join(d, L.MESH_FILE))
        occ = surface_voxels(mesh[L.KEY_VERTICES].float(), mesh[L.KEY_FACES].long(), 2 * cfg.latent_grid)
        save_file({L.KEY_LATENT: encode_occupancy(occ).contiguous()}, os.path.join(d, L.SS_LATENT_FILE))
        if occupancy:
            save_file({L.KEY_OCCUPANCY: occupancy_64(occ).contiguous()}, os.path.join(d, L.OCCUPANCY_FILE))
        row["split"] = "train"
    atomic_write_bytes(L.manifest_path(folder), "".join(json.dumps(r) + "\n" for r in rows).encode())
    return folder


def assets_by_seed(folder: str) -> Dict[int, Dict[str, str]]:
    """``{seed: {feature: asset folder}}`` of an experiment dataset (from asset.json source names)."""
    out: Dict[int, Dict[str, str]] = {}
    root = L.assets_root(folder)
    for sha in sorted(os.listdir(root)):
        with open(os.path.join(root, sha, L.ASSET_RECORD), "r", encoding="utf-8") as f:
            rec = json.load(f)
        seed = int(os.path.basename(rec["source"]).split("_")[1])
        out.setdefault(seed, {})[rec["feature"]] = os.path.join(root, sha)
    return out


# ----------------------------------------------------------------------------------- models
def _model_paths(folder: str) -> Dict[str, str]:
    return {"trellis2": os.path.join(folder, "TRELLIS.2"), "dinov3": os.path.join(folder, "dinov3"),
            "qwen": os.path.join(folder, "Qwen-Image-Edit")}


def write_models(cfg: ExperimentConfig, folder: str) -> Dict[str, str]:
    """Random-initialised TRELLIS.2 (structure flow of ``latent_grid``), DINOv3 and Qwen-Image-Edit."""
    from ..demo_models import DINO_CONFIG, write_demo_dinov3, write_demo_qwen
    from ..trellis2.loading import read_pipeline_config, resolve_checkpoint
    from ..trellis2.tiny import write_tiny_trellis2

    paths = _model_paths(folder)
    write_tiny_trellis2(paths["trellis2"], seed=cfg.seed, model_channels=cfg.model_channels,
                        num_blocks=cfg.num_blocks, num_heads=cfg.num_heads, cond_channels=DINO_CONFIG["hidden_size"])
    config = read_pipeline_config(paths["trellis2"])
    stem = resolve_checkpoint(paths["trellis2"], config.models["sparse_structure_flow_model"])
    with open(stem + ".json", "r", encoding="utf-8") as f:
        doc = json.load(f)
    doc["args"]["resolution"] = cfg.latent_grid
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(doc, f)
    write_demo_dinov3(paths["dinov3"], seed=cfg.seed)
    write_demo_qwen(paths["qwen"], seed=cfg.seed)
    if cfg.text_gain != 1.0:
        _scale_text_values(paths["qwen"], cfg.text_gain)
    return paths


def _scale_text_values(qwen: str, gain: float) -> None:
    """Multiply the tiny MMDiT's text values (``attn.add_v_proj``) by ``gain`` on top of the demo's
    ``DEMO_TEXT_GAIN``: how much the random MMDiT listens to its prompt (see ``ExperimentConfig.text_gain``)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(qwen, "transformer", "diffusion_pytorch_model.safetensors")
    sd = load_file(path)
    for k in sd:
        if ".attn.add_v_proj." in k:
            sd[k] = sd[k] * gain
    save_file(sd, path, metadata={"format": "pt"})


def _train_config(cfg: ExperimentConfig, **kw):
    from ..train.config import TrainConfig

    base = dict(stage="ss", batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device=cfg.device,
                precision="fp32", num_workers=cfg.num_workers, checkpoint_every=10 ** 9, log_every=10 ** 9,
                progress=cfg.progress, lora_rank=cfg.lora_rank, ema_rate=0.999)
    base.update(kw)
    return TrainConfig(**base)


def train_base(cfg: ExperimentConfig, data: str, models: Dict[str, str], out: str) -> str:
    """Plain full training of the structure flow on the set; returns the exported TRELLIS.2 folder."""
    from ..train.engine import train
    from ..train.flows import TRELLIS2_FOLDER, FlowTask

    done = os.path.join(out, "export", TRELLIS2_FOLDER)
    if _finished(out, done):
        return done
    tc = _train_config(cfg, task="trellis2", data=data, out=out, models=models["trellis2"], dinov3=models["dinov3"],
                       steps=cfg.base_steps, full=True)
    train(FlowTask(branch=False), tc)
    return _mark_finished(out, done)


FINISHED = "FINISHED"  # written into a run folder once its export exists: a later call reuses the run


def _finished(out: str, export: str) -> bool:
    return os.path.isfile(os.path.join(out, FINISHED)) and os.path.exists(export)


def _mark_finished(out: str, export: str) -> str:
    with open(os.path.join(out, FINISHED), "w", encoding="utf-8") as f:
        f.write(export + "\n")
    return export


def train_backview(cfg: ExperimentConfig, data: str, models: Dict[str, str], out: str) -> str:
    """The back-view LoRA on the MMDiT (front view + description -> back view); returns its file."""
    from ..train.backview import BACKVIEW_LORA_FILE, BackViewTask
    from ..train.engine import train

    done = os.path.join(out, "export", BACKVIEW_LORA_FILE)
    if _finished(out, done):
        return done
    tc = _train_config(cfg, task="backview", data=data, out=out, qwen=models["qwen"], steps=cfg.backview_steps,
                       image_size=tuple(cfg.back_size), vae_image_area=cfg.vae_image_area)
    train(BackViewTask(), tc)
    return _mark_finished(out, done)


def train_know3d(cfg: ExperimentConfig, data: str, base: str, models: Dict[str, str], out: str, source: str,
                 sigma: float, loras: Sequence[str] = ()) -> str:
    """Know3D branch + LoRA on the base structure flow; returns the exported know3d.safetensors."""
    from ..train.engine import train
    from ..train.flows import KNOW3D_FILE, FlowTask

    tc = _train_config(cfg, task="know3d", data=data, out=out, models=base, dinov3=models["dinov3"],
                       qwen=models["qwen"], steps=cfg.know3d_steps, batch_size=cfg.know3d_batch_size or cfg.batch_size,
                       knowledge_source=source, sigma=sigma, knowledge_seeds=cfg.knowledge_seeds,
                       back_steps=cfg.back_steps, back_size=tuple(cfg.back_size), vae_image_area=cfg.vae_image_area,
                       backview_loras=tuple(loras))
    done = os.path.join(out, "export", KNOW3D_FILE)
    if _finished(out, done):
        return done
    shutil.rmtree(out, ignore_errors=True)  # an unfinished run of an earlier call: start it again
    train(FlowTask(branch=True), tc)
    return _mark_finished(out, done)


# ----------------------------------------------------------------------------------- generation
def _pipeline(cfg: ExperimentConfig, base: str, models: Dict[str, str], know3d: Optional[str],
              loras: Sequence[str] = ()):
    from ..pipeline import Know3DPipeline
    from ..plan import SS_DECODER

    pipe = Know3DPipeline.from_pretrained(base, qwen=models["qwen"], know3d=know3d, dinov3=models["dinov3"],
                                          backview_loras=tuple(loras),
                                          device=cfg.device, dtype=torch.float32, pipeline_types=("512",),
                                          vae_image_area=cfg.vae_image_area)
    pipe.geometry.models[SS_DECODER] = CodecDecoder().to(pipe.device)
    return pipe


def generate(cfg: ExperimentConfig, pipe, variant: str, val: Dict[int, Dict[str, str]], out: str,
             sigma: Optional[float]) -> None:
    """For every held-out front and every description: the structure's 64^3 occupancy into
    ``out/<seed>_<prompted feature>/`` with ``record.json`` naming its ground truth."""
    from PIL import Image
    from safetensors.torch import save_file

    from ..data.synthetic import ANNOTATIONS
    from .geometry import coords_to_grid

    os.makedirs(out, exist_ok=True)
    for seed, by_feature in sorted(val.items()):
        # one front per seed: the azimuth-0 view of the 3d set (identical for every feature of the seed)
        any_asset = by_feature[cfg.features[0]]
        front_file = _front_view(any_asset)
        with Image.open(front_file) as im:
            front = pipe.preprocess(im.convert("RGBA"))
        cond = pipe.geometry.get_cond([front], 512)
        for k, feature in enumerate(cfg.features):
            gen_seed = cfg.seed * 1000 + seed
            knowledge = None
            if variant != "none":
                stage = pipe.back_view(front, ANNOTATIONS[feature][0], variant, seed=gen_seed, steps=cfg.back_steps,
                                       sigma=sigma, size=tuple(cfg.back_size))
                knowledge = pipe.make_knowledge(stage, variant, "512")
            captured = dict(getattr(knowledge, "provenance", None) or {})
            coords = pipe.geometry.sample_sparse_structure(cond, knowledge, resolution=64, seed=gen_seed,
                                                           params={"steps": cfg.sample_steps})
            occ = coords_to_grid(coords[:, 1:], 64)
            item = os.path.join(out, f"{seed:04d}_{feature}")
            os.makedirs(item, exist_ok=True)
            save_file({L.KEY_OCCUPANCY: occ.cpu().contiguous()}, os.path.join(item, L.OCCUPANCY_FILE))
            with open(os.path.join(item, "record.json"), "w", encoding="utf-8") as f:
                json.dump({"gt": f"{seed:04d}_{feature}", "seed": seed, "feature": feature,
                           "prompt": ANNOTATIONS[feature][0], "variant": variant, "sigma": sigma,
                           "sigma_actual": captured.get("sigma_actual"), "capture_step": captured.get("step_index")}, f)


def captured_sigma(pred_dir: str) -> Optional[float]:
    """The schedule sigma the row's knowledge was captured at (a requested sigma snaps to the nearest
    back-view step), from the first generation's ``record.json``; None for rows without a capture."""
    items = sorted(e for e in os.listdir(pred_dir) if os.path.isfile(os.path.join(pred_dir, e, "record.json")))
    if not items:
        return None
    with open(os.path.join(pred_dir, items[0], "record.json"), encoding="utf-8") as f:
        return json.load(f).get("sigma_actual")


def same_capture_as(meta: Dict[str, Dict[str, Any]], row: str) -> Optional[str]:
    """An earlier row whose knowledge was captured at the same schedule step as ``row``'s although it
    asked for another sigma (with few back-view steps two sweep sigmas can snap to one step: the two
    rows then measure the same knowledge, not two noise levels); None when there is none."""
    mine = meta[row]
    if mine.get("sigma_actual") is None:
        return None
    for other, m in meta.items():
        if other != row and m.get("sigma_actual") == mine["sigma_actual"] and m.get("sigma") != mine.get("sigma"):
            return other
    return None


PROBE_FILE = "knowledge_probe.json"  # in a row's pred folder
PROBE_NOISES = 4  # back-view noise seeds per (front, prompt) in the knowledge probe


@torch.no_grad()
def knowledge_probe(cfg: ExperimentConfig, pipe, variant: str, val: Dict[int, Dict[str, str]],
                    sigma: Optional[float], noises: int = PROBE_NOISES) -> Dict[str, float]:
    """Does the knowledge itself carry the prompt? For every held-out front, the knowledge tensor
    ``[N, D]`` of each of the K descriptions under ``noises`` back-view seeds; a nearest-centroid
    classifier (centroid per description over the other seeds of the same front, leave one seed out)
    names the description. Returns ``accuracy`` (1/K: the prompt is not recoverable), ``prompt_diff``
    (mean relative distance between two descriptions, same seed) and ``noise_diff`` (two seeds, same
    description). Independent of the structure flow: it separates "the knowledge does not depend on the
    text" from "the branch does not use it"."""
    import itertools

    from PIL import Image

    from ..data.synthetic import ANNOTATIONS

    check = pipe.geometry.check_knowledge
    pipe.geometry.check_knowledge = lambda *a, **k: None  # the base may carry no branch (multiview, probes)
    try:
        know: Dict[Tuple[int, str, int], torch.Tensor] = {}
        for seed, by_feature in sorted(val.items()):
            with Image.open(_front_view(by_feature[cfg.features[0]])) as im:
                front = pipe.preprocess(im.convert("RGBA"))
            for feature in cfg.features:
                for n in range(noises):
                    stage = pipe.back_view(front, ANNOTATIONS[feature][0], variant, seed=cfg.seed * 1000 + seed + 7919 * n,
                                           steps=cfg.back_steps, sigma=sigma, size=tuple(cfg.back_size))
                    k = pipe.make_knowledge(stage, variant)
                    know[(seed, feature, n)] = getattr(k, "tensor", k).flatten().float().cpu()
    finally:
        pipe.geometry.check_knowledge = check

    def rel(a, b):
        return float((know[a] - know[b]).norm() / know[a].norm().clamp_min(1e-12))

    fs, seeds = cfg.features, sorted(val)
    correct = total = 0
    for s in seeds:
        for n in range(noises):
            cents = {f: torch.stack([know[(s, f, m)] for m in range(noises) if m != n]).mean(0) for f in fs}
            for f in fs:
                best = min(fs, key=lambda g: float((know[(s, f, n)] - cents[g]).norm()))  # first minimum in order
                correct += best == f
                total += 1
    pd = [rel((s, a, 0), (s, b, 0)) for s in seeds for a, b in itertools.combinations(fs, 2)]
    nd = [rel((s, f, 0), (s, f, 1)) for s in seeds for f in fs]
    return {"accuracy": correct / total, "prompt_diff": sum(pd) / len(pd), "noise_diff": sum(nd) / len(nd),
            "noises": noises}


def _front_view(asset: str) -> str:
    with open(os.path.join(asset, L.CAMERAS_FILE), "r", encoding="utf-8") as f:
        views = json.load(f)["views"]
    best = min((v for v in views if v["set"] == L.SET_3D), key=lambda v: abs(((v["azimuth"] + 180) % 360) - 180))
    return os.path.join(asset, best["file"])


def write_gt(cfg: ExperimentConfig, val: Dict[int, Dict[str, str]], out: str) -> None:
    """Ground-truth items ``out/<seed>_<feature>/occupancy_64.safetensors`` (the codec's occupancy)."""
    for seed, by_feature in val.items():
        for feature, asset in by_feature.items():
            item = os.path.join(out, f"{seed:04d}_{feature}")
            os.makedirs(item, exist_ok=True)
            shutil.copy2(os.path.join(asset, L.OCCUPANCY_FILE), os.path.join(item, L.OCCUPANCY_FILE))


# ----------------------------------------------------------------------------------- scoring
def prompt_swap_accuracy(pred_dir: str, gt_dir: str, features: Sequence[str]) -> Tuple[float, List[Dict[str, Any]]]:
    """Share of generations whose best match among the K ground truths of their front is the
    prompted feature. The match is the IoU within the front's *feature region*: the back-half voxels
    where the K ground truths disagree (occupied in some, not all). The body they share is left out:
    over the whole back half, the body's IoU outweighs the feature's, and a bigger ground truth wins
    whatever came out. Ties (e.g. identical back halves) count as wrong unless the prompted feature
    is the first of the tied ones in ``features`` order."""
    from safetensors.torch import load_file

    from .geometry import back_half_grid, voxel_iou

    back = back_half_grid(64)
    gts: Dict[int, Dict[str, torch.Tensor]] = {}
    rows = []
    for name in sorted(os.listdir(pred_dir)):
        rec_path = os.path.join(pred_dir, name, "record.json")
        if not os.path.isfile(rec_path):
            continue
        with open(rec_path, "r", encoding="utf-8") as f:
            rec = json.load(f)
        pred = load_file(os.path.join(pred_dir, name, L.OCCUPANCY_FILE))[L.KEY_OCCUPANCY].bool()
        if rec["seed"] not in gts:
            gts[rec["seed"]] = {f: load_file(os.path.join(gt_dir, f"{rec['seed']:04d}_{f}", L.OCCUPANCY_FILE))[
                L.KEY_OCCUPANCY].bool() for f in features}
        mine = gts[rec["seed"]]
        stack = torch.stack([mine[f] for f in features])
        region = back & stack.any(0) & ~stack.all(0)
        ious = {f: voxel_iou(pred, mine[f], region) for f in features}
        best = max(features, key=lambda f: ious[f])  # first maximum in features order
        rows.append({"item": name, "prompted": rec["feature"], "classified": best, "correct": best == rec["feature"],
                     "ious": ious})
    acc = sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")
    return acc, rows


def prompt_effect(pred_dir: str, features: Sequence[str]) -> float:
    """How much the description changes the back: 1 - the mean back-half IoU between the K
    generations of one front (same seed, different descriptions), averaged over fronts. 0 when the
    output ignores the prompt (``none`` by construction); the ground truths' own value says how far
    apart the K backs are."""
    import itertools

    from safetensors.torch import load_file

    from .geometry import back_half_grid, voxel_iou

    back = back_half_grid(64)
    seeds = sorted({name.split("_", 1)[0] for name in os.listdir(pred_dir) if os.path.isdir(os.path.join(pred_dir, name))})
    values = []
    for seed in seeds:
        occ = [load_file(os.path.join(pred_dir, f"{seed}_{f}", L.OCCUPANCY_FILE))[L.KEY_OCCUPANCY].bool() for f in features]
        values += [1.0 - voxel_iou(a, b, back) for a, b in itertools.combinations(occ, 2)]
    return sum(values) / len(values) if values else float("nan")


# ----------------------------------------------------------------------------------- run
def _variants(cfg: ExperimentConfig) -> List[Tuple[str, str, Optional[str], Optional[float]]]:
    """``[(row name, variant, training source or None, sigma)]`` in run and table order: ``cfg.rows``
    (sweep rows ``hidden_sigma<s>`` among them run where they are named), then the rest of
    ``cfg.sigmas``."""
    out = []
    for row in cfg.rows:
        if row in ROW_SOURCES:
            variant, source = ROW_SOURCES[row]
            out.append((row, variant, source, cfg.sigma if variant == "hidden" else None))
        else:
            s = float(row[len(SIGMA_ROW):])
            out.append((f"{SIGMA_ROW}{s:g}", "hidden", "trajectory", s))
    named = {v[0] for v in out}
    for s in cfg.sigmas:
        if (s != cfg.sigma or "hidden" not in cfg.rows) and f"{SIGMA_ROW}{s:g}" not in named:
            out.append((f"{SIGMA_ROW}{s:g}", "hidden", "trajectory", float(s)))
    return out


# Shares of the time budget (``--time-budget``) when one is given: the base training, then the Know3D
# trainings together (of what is left after the base); the rest is the knowledge, generation and probes.
BASE_SHARE = 0.3
TRAIN_SHARE = 0.45
CALIBRATION_STEPS = 20


def seconds_per_step(cfg: ExperimentConfig, data: str, models: Dict[str, str], out: str) -> float:
    """Mean seconds of one structure-flow training step at this size, from a short plain training
    into ``out``: one epoch (it fills the condition cache: 5-8x slower steps, paid once) and then
    ``CALIBRATION_STEPS`` steps, whose mean is returned (the mean, not the median: the budget pays
    the occasional slow step too; on one H100 the median of a window inside the first epoch sized a
    base at 26.9 ms a step that then took 42)."""
    from ..train.dataset import DatasetIndex
    from ..train.engine import train
    from ..train.flows import TRAIN_SETS, FlowTask
    from ..train.logs import METRICS_FILE, read_metrics

    epoch = -(-len(DatasetIndex.load(data, "train", TRAIN_SETS).pairs) // cfg.batch_size)
    shutil.rmtree(out, ignore_errors=True)
    tc = _train_config(cfg, task="trellis2", data=data, out=out, models=models["trellis2"], dinov3=models["dinov3"],
                       steps=epoch + CALIBRATION_STEPS, full=True, log_every=1)
    train(FlowTask(branch=False), tc)
    rows = read_metrics(os.path.join(out, METRICS_FILE))[epoch:]
    return sum(cfg.batch_size / max(r["samples_per_s"], 1e-9) for r in rows) / len(rows)


def steps_for_budget(most: int, share_seconds: float, runs: int, per_step: float) -> int:
    """Steps of each of ``runs`` trainings that together take ``share_seconds`` at ``per_step``
    seconds a step (at most ``most``, at least 1)."""
    return max(1, min(int(most), int(share_seconds / (max(runs, 1) * per_step))))


def run_experiment(cfg: ExperimentConfig) -> Dict[str, Any]:
    """The whole experiment into ``cfg.out``; returns (and writes ``experiment.json``) the table.

    Resumable: trainings and generations finished by an earlier call into the same ``out`` (a
    ``FINISHED`` file beside their output) are reused, so a call after a failed row redoes only
    what is missing. Change a size and the inputs are rebuilt (``inputs.json``), but runs are
    reused by folder: use a fresh ``out`` for other training settings."""
    from .evaluate import EvalSettings
    from .run import run_eval

    t0 = time.perf_counter()
    out = os.path.abspath(cfg.out)
    os.makedirs(out, exist_ok=True)
    times: Dict[str, float] = {}

    def lap(name: str, start: float) -> None:
        times[name] = round(time.perf_counter() - start, 2)
        _say(f"{name}: {times[name]} s")

    s = time.perf_counter()
    models = prepare_inputs(cfg, out)
    train_data, val_data = os.path.join(out, "data_train"), os.path.join(out, "data_val")
    val = assets_by_seed(val_data)
    gt_dir = os.path.join(out, "gt")
    write_gt(cfg, val, gt_dir)
    lap("data", s)

    loras: Tuple[str, ...] = ()
    if cfg.backview_steps:
        s = time.perf_counter()
        loras = (train_backview(cfg, train_data, models, os.path.join(out, "runs", "backview")),)
        lap("train_backview", s)

    know3d_data = train_data
    if cfg.know3d_front_azimuth is not None:
        know3d_data = front_pairs_dataset(train_data, os.path.join(out, "data_train_front"), cfg.know3d_front_azimuth)

    per_step = None
    if cfg.time_budget and cfg.fit_steps and not _finished(os.path.join(out, "runs", "base"), os.path.join(out, "runs", "base", "export")):
        # size the trainings to the budget from the measured speed (a reused base needs no sizing)
        s = time.perf_counter()
        per_step = seconds_per_step(cfg, train_data, models, os.path.join(out, "runs", "calibrate"))
        lap("calibrate", s)
        base_steps = steps_for_budget(cfg.base_steps, BASE_SHARE * cfg.time_budget, 1, per_step)
        if base_steps != cfg.base_steps:
            _say(f"base steps {cfg.base_steps} -> {base_steps} ({per_step * 1000:.1f} ms a step; the time budget)")
            cfg = replace(cfg, base_steps=base_steps)

    s = time.perf_counter()
    base = train_base(cfg, train_data, models, os.path.join(out, "runs", "base"))
    lap("train_base", s)
    if per_step is not None:
        trained = sum(source is not None for _, _, source, _ in _variants(cfg))
        left = cfg.time_budget - (time.perf_counter() - t0)
        steps = steps_for_budget(cfg.know3d_steps, TRAIN_SHARE * left, trained, per_step)
        if steps != cfg.know3d_steps:
            _say(f"know3d steps {cfg.know3d_steps} -> {steps} (each of {trained} trained rows; the time budget)")
            cfg = replace(cfg, know3d_steps=steps)

    preds: Dict[str, str] = {}
    meta: Dict[str, Dict[str, Any]] = {}
    failed: Dict[str, str] = {}
    last: Dict[bool, float] = {}  # seconds of the last trained / untrained row: the next one's estimate
    aggs: Dict[str, Dict[str, Any]] = {}  # each finished row's run_eval aggregate (the partial tables)
    variants = _variants(cfg)
    for i, (row, variant, source, sigma) in enumerate(variants):
        s = time.perf_counter()
        if cfg.time_budget and s - t0 + last.get(source is not None, 0.0) > cfg.time_budget:
            failed[row] = f"skipped: it would end after the time budget of {cfg.time_budget:g} s"
            _say(f"row {row} skipped (time budget)")
            continue
        try:
            know3d = None
            if source is not None:
                know3d = train_know3d(cfg, know3d_data, base, models, os.path.join(out, "runs", row), source, sigma,
                                      loras)
            pred = os.path.join(out, "pred", row)
            if not _finished(pred, pred):
                shutil.rmtree(pred, ignore_errors=True)
                pipe = _pipeline(cfg, base, models, know3d, loras)
                generate(cfg, pipe, variant, val, pred, sigma)
                probe = knowledge_probe(cfg, pipe, variant, val, sigma) if variant != "none" else None
                with open(os.path.join(pred, PROBE_FILE), "w", encoding="utf-8") as f:
                    json.dump(probe, f)
                del pipe
                _mark_finished(pred, pred)
        except Exception as exc:  # noqa: BLE001 - one failing row must not hide the others
            if cfg.extra.get("strict"):
                raise
            failed[row] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
            _say(f"row {row} FAILED: {failed[row]}")
            continue
        preds[row] = pred
        with open(os.path.join(pred, PROBE_FILE), "r", encoding="utf-8") as f:
            meta[row] = {"variant": variant, "train_source": source, "sigma": sigma, "knowledge_probe": json.load(f)}
        meta[row]["sigma_actual"] = captured_sigma(pred) if sigma is not None else None
        twin = same_capture_as(meta, row)
        if twin:
            meta[row]["same_capture_as"] = twin
            _say(f"row {row}: sigma {sigma:g} was captured at {meta[row]['sigma_actual']:.3f}, the same back-view step "
                 f"as row {twin} (sigma {meta[twin]['sigma']:g}): more back-view steps separate them")
        lap(f"row {row}", s)
        last[source is not None] = times[f"row {row}"]
        # the table so far, after every row: a run cut short still leaves its finished rows
        part = run_eval({row: pred}, gt_dir, os.path.join(out, "eval_partial", row),
                        EvalSettings(points=cfg.eval_points, device="cpu"), progress=False, plot=False)
        aggs[row] = part["aggregate"][row]
        pending = {v[0]: "pending: the run stopped before this row" for v in variants[i + 1:]}
        _write_result(out, _result(cfg, preds, meta, aggs, gt_dir, {**failed, **pending}, times, t0, partial=True))
        write_prompt_sheet(os.path.join(out, "prompts.png"), preds, gt_dir, val, cfg)

    s = time.perf_counter()
    settings = EvalSettings(points=cfg.eval_points, device="cpu")  # small point sets: fpsample on the CPU is fastest
    import importlib.util

    report = run_eval(preds, gt_dir, os.path.join(out, "eval"), settings, progress=cfg.progress,
                      plot=importlib.util.find_spec("matplotlib") is not None)
    shutil.rmtree(os.path.join(out, "eval_partial"), ignore_errors=True)
    lap("eval", s)
    result = _result(cfg, preds, meta, report["aggregate"], gt_dir, failed, times, t0)
    _write_result(out, result)
    write_prompt_sheet(os.path.join(out, "prompts.png"), preds, gt_dir, val, cfg)
    return result


def _result(cfg: ExperimentConfig, preds: Dict[str, str], meta: Dict[str, Dict[str, Any]],
            aggregate: Dict[str, Dict[str, Any]], gt_dir: str, failed: Dict[str, str], times: Dict[str, float],
            t0: float, partial: bool = False) -> Dict[str, Any]:
    """The experiment's result (``experiment.json``) from the rows' predictions and their ``run_eval``
    aggregates (row -> metric -> stats); ``partial``: written while rows are still to come."""
    table = []
    for row in preds:
        acc, detail = prompt_swap_accuracy(preds[row], gt_dir, cfg.features)
        agg = aggregate[row]
        table.append({"row": row, **meta[row], "back_iou_64": agg["iou_64_back"]["mean"],
                      "iou_64": agg["iou_64"]["mean"], "chamfer": agg["chamfer"]["mean"],
                      "chamfer_back": agg["chamfer_back"]["mean"], "prompt_swap_accuracy": acc,
                      "prompt_effect": prompt_effect(preds[row], cfg.features),
                      "n": agg["iou_64"]["n"], "classified": detail})
    return {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "chance": 1.0 / len(cfg.features), "gt_prompt_effect": prompt_effect(gt_dir, cfg.features),
            "not_run": {k: (v if v.startswith(("skipped", "pending")) else f"failed: {v}") for k, v in failed.items()},
            "device": _device_name(cfg.device), "seconds": round(time.perf_counter() - t0, 1), "times": dict(times),
            "partial": partial, "table": table}


def _write_result(out: str, result: Dict[str, Any]) -> None:
    from .report import write_json

    write_json(os.path.join(out, "experiment.json"), result)
    _write_table(os.path.join(out, "experiment.md"), result)


def front_pairs_dataset(src: str, dst: str, max_azimuth: float) -> str:
    """A copy of experiment dataset ``src`` in ``dst`` (files linked) whose pairs are those of the 3d sets
    with a front view within ``max_azimuth`` degrees of azimuth 0 (the objects' front). Returns ``dst``."""
    from ..fileio import atomic_write_bytes

    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(L.assets_root(dst))
    shutil.copy2(L.manifest_path(src), L.manifest_path(dst))
    kept = 0
    for sha in sorted(os.listdir(L.assets_root(src))):
        a, b = os.path.join(L.assets_root(src), sha), os.path.join(L.assets_root(dst), sha)
        os.makedirs(b)
        for name in os.listdir(a):
            if name != L.PAIRS_FILE:
                os.symlink(os.path.abspath(os.path.join(a, name)), os.path.join(b, name))
        with open(os.path.join(a, L.CAMERAS_FILE), "r", encoding="utf-8") as f:
            azimuth = {v["file"]: float(v["azimuth"]) for v in json.load(f)["views"]}
        with open(os.path.join(a, L.PAIRS_FILE), "r", encoding="utf-8") as f:
            pairs = json.load(f)
        keep = [p for p in pairs if p["set"] != L.SET_BACKVIEW and abs((azimuth[p["front"]] + 180) % 360 - 180) <= max_azimuth]
        if not keep:
            raise RuntimeError(f"experiment: {a} has no 3d pair with a front within {max_azimuth:g} degrees of azimuth 0")
        kept += len(keep)
        atomic_write_bytes(os.path.join(b, L.PAIRS_FILE), json.dumps(keep).encode())
    _say(f"Know3D rows train on {kept} front pairs (front view within {max_azimuth:g} degrees of azimuth 0)")
    return dst


def prepare_inputs(cfg: ExperimentConfig, out: str) -> Dict[str, str]:
    """Models and both datasets in ``out`` (models/, data_train/, data_val/); folders already there
    from an earlier call with the same settings (``inputs.json``) are kept, so the CPU-side part
    (procedural assets, OpenGL renders) can be made on one machine and the rest run on another."""
    from ..fileio import atomic_write_bytes

    os.makedirs(out, exist_ok=True)
    keys = ("train_seeds", "val_seeds", "val_first_seed", "features", "render_size", "latent_grid",
            "model_channels", "num_blocks", "num_heads", "seed", "text_gain")
    want = json.loads(json.dumps({k: getattr(cfg, k) for k in keys}))
    stamp = os.path.join(out, "inputs.json")
    if os.path.isfile(stamp):
        with open(stamp, "r", encoding="utf-8") as f:
            if json.load(f) == want:  # datasets kept; models (seconds to write) are written where missing
                paths = _model_paths(os.path.join(out, "models"))
                if not all(os.path.isdir(p) for p in paths.values()):
                    shutil.rmtree(os.path.join(out, "models"), ignore_errors=True)
                    paths = write_models(cfg, os.path.join(out, "models"))
                return paths
    for name in ("models", "data_train", "data_train_assets", "data_val", "data_val_assets"):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    models = write_models(cfg, os.path.join(out, "models"))
    make_dataset(cfg, os.path.join(out, "data_train"), range(cfg.train_seeds), occupancy=False)
    make_dataset(cfg, os.path.join(out, "data_val"), range(cfg.val_first_seed, cfg.val_first_seed + cfg.val_seeds))
    atomic_write_bytes(stamp, json.dumps(want).encode())
    return models


def _device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def format_table(result: Dict[str, Any]) -> str:
    """Markdown table of the rows (means over the held-out items) and the rows not run."""
    lines = ["| row | knowledge (training source, sigma) | back-half IoU 64^3 | IoU 64^3 | CD | back-half CD | "
             "prompt-swap accuracy | prompt effect | prompt from knowledge |", "|---|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    for r in result["table"]:
        src = "-" if r["train_source"] is None else r["train_source"] + ("" if r["sigma"] is None else f", {r['sigma']:g}")
        if r.get("sigma_actual") is not None and r["sigma"] is not None and f"{r['sigma_actual']:.3f}" != f"{r['sigma']:.3f}":
            src += f" (captured at {r['sigma_actual']:.3f}" + (f", as {r['same_capture_as']}" if r.get("same_capture_as") else "") + ")"
        probe = (r.get("knowledge_probe") or {}).get("accuracy")
        lines.append(f"| {r['row']} | {src} | {f(r['back_iou_64'])} | {f(r['iou_64'])} | {f(r['chamfer'])} | "
                     f"{f(r['chamfer_back'])} | {f(r['prompt_swap_accuracy'])} | {f(r.get('prompt_effect'))} | {f(probe)} |")
    for k, why in result["not_run"].items():
        lines.append(f"| {k} | not run: {why} | | | | | | | |")
    if result.get("partial"):
        lines.append("\n(partial: rows still running)")
    lines.append(f"\nchance (prompt swap) = 1/K = {result['chance']:.3f}; prompt effect of the ground truths "
                 f"(how far apart the K backs are) = {f(result.get('gt_prompt_effect'))}; prompt from knowledge: "
                 f"nearest-centroid accuracy of the description from the knowledge tensor alone "
                 f"({PROBE_NOISES} back-view seeds per front and description, leave one seed out; chance 1/K)")
    return "\n".join(lines)


def _write_table(path: str, result: Dict[str, Any]) -> None:
    from ..fileio import atomic_write_bytes

    atomic_write_bytes(path, (format_table(result) + "\n").encode())


def write_prompt_sheet(path: str, preds: Dict[str, str], gt_dir: str, val, cfg: ExperimentConfig,
                       rows: Optional[Sequence[str]] = None, tile: int = 96) -> Optional[str]:
    """Normal renders of the first held-out object under all K prompts, seen from the right side (the
    back features stick out behind the body there; from straight behind, axis-aligned voxel faces
    all share one normal colour): one line per row (ground truth first), one column per feature.
    The front faces left in each tile."""
    from PIL import Image, ImageDraw
    from safetensors.torch import load_file

    from ..fileio import atomic_write_bytes
    from .evaluate import Shape
    from .run import picture

    seed = sorted(val)[0]
    rows = ["gt", *preds] if rows is None else rows  # default: the ground truth, then every row run
    shown = [r for r in rows if r == "gt" or r in preds]
    label_w = 100
    sheet = Image.new("RGB", (label_w + tile * len(cfg.features), 14 + tile * len(shown)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, feature in enumerate(cfg.features):
        draw.text((label_w + j * tile + 2, 1), feature[:14], fill="black")
    for i, row in enumerate(shown):
        draw.text((2, 14 + i * tile + tile // 2), row[:16], fill="black")
        for j, feature in enumerate(cfg.features):
            folder = os.path.join(gt_dir if row == "gt" else preds[row], f"{seed:04d}_{feature}")
            occ = load_file(os.path.join(folder, L.OCCUPANCY_FILE))[L.KEY_OCCUPANCY].bool()
            arr = picture(Shape(occupancy=occ), tile, view="right")
            im = Image.fromarray((arr.clip(0, 1) * 255).round().astype("uint8"))
            sheet.paste(im, (label_w + j * tile, 14 + i * tile))
    import io

    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return atomic_write_bytes(path, buf.getvalue())
