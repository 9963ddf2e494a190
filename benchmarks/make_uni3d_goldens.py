"""Write tests/data/golden_uni3d/: outputs of the reference Uni3D point encoder and of OpenCLIP's
EVA image tower on tiny random weights, for the parity tests in CI (tests/test_eval_uni3d.py).

    python benchmarks/make_uni3d_goldens.py --uni3d-src DIR --site DIR [--out DIR]

``--uni3d-src``: a Uni3D checkout (baaivision/Uni3D 64e03c3); ``--site``: a folder holding the
packages ``timm`` (1.0.31) and ``open_clip`` (3.3.0), e.g. ``pip install --no-deps --target DIR timm
open_clip_torch ftfy wcwidth``. Runs, unmodified on the CPU: Uni3D's ``models.point_encoder.PointcloudEncoder``
wrapped in ``models.uni3d.Uni3D`` around ``timm.create_model(<eva variant>, ...)`` (tiny widths and
depth; three block layouts: EVA02-B/L's split qkv + SwiGLU + MLP norm, EVA02-Ti/S's fused qkv + packed
GLU, EVA-g's fused qkv + GELU MLP), and ``open_clip``'s ``CustomTextCLIP.encode_image`` around its
``TimmModel`` of ``eva02_enormous_patch14_clip_224`` (tiny). What they import but this path does not
run or cannot load here is replaced, and nothing else:

* ``pointnet2_ops.pointnet2_utils`` (CUDA): ``furthest_point_sample`` -> greedy farthest-point
  sampling from index 0 (the kernel's algorithm), ``gather_operation`` -> ``torch.gather``;
* ``easydict``: an empty module (imported, unused); ``models.losses`` (training losses, imported by
  ``models/uni3d.py``, unused here): an empty module;
* ``torchvision`` (timm / open_clip import it for data transforms): a stand-in whose attributes are
  dummies (no model code touches it);
* ``timm.create_model`` inside ``open_clip.timm_model``: the same call with tiny widths added
  (open_clip passes no size arguments to timm).

It also builds the released sizes (Uni3D-Ti/S/B/L/g, OpenCLIP EVA02-E-14-plus) on the meta device and
checks that our modules have exactly their keys and shapes (``config.json`` lists them).

Weights are written as the official files are laid out: Uni3D ``{"module": state_dict}`` (.pt,
tensors only, fp16) with every key the reference model has (``logit_scale``, the unused EVA image
tensors included); OpenCLIP a flat state dict (.bin) with the text tower's keys.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import math
import os
import sys
import types
from argparse import Namespace

import torch
from safetensors.torch import save_file

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "golden_uni3d")
SEED = 11
# Tiny sizes: transformer width 32 (2 heads), 2 blocks, patch encoder 24, CLIP width 16, 16 groups of 8.
POINT = dict(pc_feat_dim=32, embed_dim=16, group_size=8, num_group=16, pc_encoder_dim=24, patch_dropout=0.0)
NPOINTS = 96
TIMM_TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=28)
VARIANTS = {  # name -> timm model whose layout the tiny model copies
    "eva02_base": "eva02_base_patch14_448",     # split q/k/v, SwiGLU fc1_g/fc1_x + mlp.norm, fc_norm
    "eva02_tiny": "eva02_tiny_patch14_224",     # fused qkv + q/v bias, packed GLU fc1, fc_norm
    "eva_giant": "eva_giant_patch14_560",       # fused qkv + q/v bias, GELU fc1/fc2, fc_norm
}
CLIP_TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=28)
CLIP_EMBED = 16


class _StubMeta(type):
    def __getattr__(cls, name):
        return "stub." + name  # distinct values: timm keys dicts on InterpolationMode members


class _Stub(metaclass=_StubMeta):
    def __init__(self, *a, **k):
        pass


class _StubModule(types.ModuleType):
    __path__ = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__version__ = "0.0"
        return m

    def exec_module(self, module):
        pass


def _greedy_fps(xyz: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, N, 3] -> [B, count]`` int32: pointnet2's furthest_point_sample (start 0, argmax of the
    running minimum squared distance)."""
    out = torch.zeros(xyz.shape[0], count, dtype=torch.int32)
    for b, pts in enumerate(xyz):
        dist = torch.full((pts.shape[0],), 1e10)
        cur = 0
        for i in range(count):
            out[b, i] = cur
            dist = torch.minimum(dist, (pts - pts[cur]).square().sum(1))
            cur = int(torch.argmax(dist))
    return out


def install_stand_ins(site: str, uni3d_src: str) -> None:
    sys.meta_path.insert(0, _TorchvisionStandIn())
    utils = types.ModuleType("pointnet2_ops.pointnet2_utils")
    utils.furthest_point_sample = _greedy_fps
    utils.gather_operation = lambda feats, idx: torch.gather(feats, 2, idx.long().unsqueeze(1).expand(-1, feats.shape[1], -1))
    pkg = types.ModuleType("pointnet2_ops")
    pkg.pointnet2_utils = utils
    sys.modules.update({"pointnet2_ops": pkg, "pointnet2_ops.pointnet2_utils": utils,
                        "easydict": types.ModuleType("easydict")})
    sys.modules["easydict"].EasyDict = dict
    models = types.ModuleType("models")  # Uni3D's package without its __init__ (none needed)
    models.__path__ = [os.path.join(uni3d_src, "models")]
    sys.modules["models"] = models
    sys.modules["models.losses"] = types.ModuleType("models.losses")
    sys.path.insert(0, site)


def random_weights(model: torch.nn.Module, seed: int):
    """Every tensor from a seeded normal (zero-initialised layers are used too): matrices N(0, 1/fan_in),
    1-d weights 1 + 0.2 N, biases / tokens 0.2 N, BatchNorm running variances in [0.5, 1.5];
    rounded to fp16-representable values (run in float32, stored as fp16)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[key] = value.clone()
            continue
        if leaf == "running_var":
            v = 0.5 + torch.rand(value.shape, generator=gen)
        elif value.dim() >= 2 and leaf not in ("cls_token", "cls_pos", "pos_embed"):
            v = torch.randn(value.shape, generator=gen) / math.sqrt(value.numel() // value.shape[0])
        elif leaf in ("bias", "q_bias", "v_bias", "running_mean", "cls_token", "cls_pos", "pos_embed", "logit_scale") \
                or leaf.endswith("_bias"):
            v = 0.2 * torch.randn(value.shape, generator=gen)
        else:
            v = 1 + 0.2 * torch.randn(value.shape, generator=gen)
        out[key] = v.half().float()
    return out


def _half(state):
    """Stored as fp16 (DeepSpeed's fp16 checkpoints; the values are fp16-exact), counters as they are."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def point_cloud(seed: int):
    """Two clouds ``[2, NPOINTS, 3]`` (a noisy sphere, a box's surface), coloured ``[2, NPOINTS, 3]``."""
    gen = torch.Generator().manual_seed(seed)
    sphere = torch.nn.functional.normalize(torch.randn(NPOINTS, 3, generator=gen), dim=1)
    box = torch.rand(NPOINTS, 3, generator=gen) * 2 - 1
    axis = torch.randint(0, 3, (NPOINTS,), generator=gen)
    box[torch.arange(NPOINTS), axis] = torch.sign(box[torch.arange(NPOINTS), axis])
    xyz = torch.stack([sphere * 0.9, box * torch.tensor([0.5, 0.8, 0.3])])
    return xyz, torch.rand(2, NPOINTS, 3, generator=gen)


def uni3d_reference(variant: str):
    import timm
    from models.point_encoder import PointcloudEncoder
    from models.uni3d import Uni3D

    transformer = timm.create_model(VARIANTS[variant], pretrained=False, **TIMM_TINY)
    return Uni3D(PointcloudEncoder(transformer, Namespace(**POINT))).eval()


def clip_reference():
    import open_clip.timm_model as tm
    from open_clip.model import CustomTextCLIP

    real = tm.timm.create_model

    def tiny(name, **kw):
        return real(name, **{**kw, **CLIP_TINY})

    tm.timm.create_model = tiny
    try:
        vision = dict(image_size=CLIP_TINY["img_size"], timm_model_name="eva02_enormous_patch14_clip_224",
                      timm_model_pretrained=False, timm_pool="token", timm_proj=None)
        text = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
        return CustomTextCLIP(CLIP_EMBED, vision, text).eval()
    finally:
        tm.timm.create_model = real


FULL_SIZES = {"eva02_tiny_patch14_224": 192, "eva02_small_patch14_224": 384, "eva02_base_patch14_448": 768,
              "eva02_large_patch14_448": 1024, "eva_giant_patch14_560": 1408}  # Uni3D-Ti/S/B/L/g (inference.sh)


def check_full_sizes():
    """The released sizes' state-dict layouts (reference classes built on the meta device) against
    our modules, key by key and shape by shape: {model: parameter count of ours}."""
    import json as _json

    import open_clip
    import timm
    from models.point_encoder import PointcloudEncoder
    from models.uni3d import Uni3D as RefUni3D
    from open_clip.model import CustomTextCLIP

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from know3d_core.eval.eva import EvaImageTower
    from know3d_core.eval.uni3d import UNUSED, ClipImageTower, Uni3D, Uni3DConfig
    from know3d_core.eval.weights import check_state

    out = {}
    args = dict(embed_dim=1024, group_size=64, num_group=512, pc_encoder_dim=512, patch_dropout=0.0)
    for name, width in FULL_SIZES.items():
        with torch.device("meta"):
            sd = RefUni3D(PointcloudEncoder(timm.create_model(name, pretrained=False),
                                            Namespace(pc_feat_dim=width, **args))).state_dict()
            ours = Uni3D(Uni3DConfig.from_state(sd))
        check_state(ours, sd, name, "the reference layout", unused=UNUSED.__contains__)
        out[f"uni3d/{name}"] = sum(v.numel() for v in ours.parameters())
    path = os.path.join(os.path.dirname(open_clip.__file__), "model_configs", "EVA02-E-14-plus.json")
    with open(path) as f:
        cfg = _json.load(f)
    with torch.device("meta"):
        sd = CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).state_dict()
        tower = ClipImageTower(EvaImageTower.from_state(sd, "visual.trunk.", 16, post_norm=True))
    check_state(tower, sd, "EVA02-E-14-plus", "the reference layout", prefix="visual.")
    out["open_clip/EVA02-E-14-plus visual"] = sum(v.numel() for v in tower.parameters())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--uni3d-src", required=True, help="Uni3D checkout (64e03c3)")
    p.add_argument("--site", required=True, help="folder with timm and open_clip")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    install_stand_ins(args.site, args.uni3d_src)
    os.makedirs(args.out, exist_ok=True)
    xyz, rgb = point_cloud(SEED)
    io = {"xyz": xyz, "rgb": rgb}
    for i, variant in enumerate(VARIANTS):
        model = uni3d_reference(variant)
        weights = random_weights(model, SEED + i)
        model.load_state_dict(weights, strict=True)
        io[f"embed_{variant}"] = model.encode_pc(torch.cat((xyz, rgb), dim=-1)).contiguous()
        torch.save({"module": _half(weights)}, os.path.join(args.out, f"uni3d_{variant}.pt"))
    save_file(io, os.path.join(args.out, "uni3d_io.safetensors"))

    clip = clip_reference()
    weights = random_weights(clip, SEED + 10)
    clip.load_state_dict(weights, strict=True)
    pixels = torch.randn(2, 3, CLIP_TINY["img_size"], CLIP_TINY["img_size"], generator=torch.Generator().manual_seed(SEED))
    torch.save(_half(weights), os.path.join(args.out, "open_clip_eva_tiny.bin"))
    save_file({"pixels": pixels, "embed": clip.encode_image(pixels).contiguous()},
              os.path.join(args.out, "clip_io.safetensors"))
    full = check_full_sizes()
    with open(os.path.join(args.out, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"full_size_layouts_match (parameters)": full, "point_encoder": POINT, "npoints": NPOINTS, "timm_tiny": TIMM_TINY, "variants": VARIANTS,
                   "clip_tiny": CLIP_TINY, "clip_embed": CLIP_EMBED, "weight_seed": SEED,
                   "uni3d": "baaivision/Uni3D 64e03c3", "timm": "1.0.31", "open_clip": "3.3.0"}, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
