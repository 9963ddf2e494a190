"""Write tests/data/golden_ulip2/: outputs of the reference ULIP-2 model (PointBERT point encoder,
projection, OpenCLIP ViT image tower) on tiny random weights, for the parity tests in CI
(tests/test_eval_ulip2.py).

    python benchmarks/make_ulip2_goldens.py --ulip-src DIR --site DIR [--out DIR]

``--ulip-src``: a ULIP checkout (salesforce/ULIP f194ddb); ``--site``: a folder holding ``timm``
(1.0.31) and ``open_clip`` (3.3.0) (see make_uni3d_goldens.py). Runs, unmodified on the CPU, ULIP's
``models.ULIP_models.ULIP2_WITH_OPENCLIP`` (``encode_pc``, ``encode_image``) around
``models.pointbert.point_encoder.PointTransformer_Colored`` (tiny: width 32, 2 blocks, 2 heads, 16
groups of 8 points, patch features 24) and open_clip's ``CLIP`` with a tiny ViT (width 32, 2 layers,
head width 16, patch 14, 28 px; embed 1280 as ULIP-2's projection requires). Replaced, and nothing
else: pointnet2's CUDA FPS by the same greedy algorithm in torch, and torchvision (see
make_uni3d_goldens.py); ``knn_cuda`` (its KNN a no-op constructor), ``models.pointnet2.pointnet2``, ``data.dataset_3d``,
``models.losses`` (imported by the model files, unused on this path): empty modules; ``easydict.EasyDict``:
a dict with attribute access (what the class reads from it).

It also builds the released sizes (ULIP-2 PointBERT, OpenCLIP ViT-bigG-14) and checks that our modules
have exactly their keys and shapes (``config.json`` lists them).

The weights are saved as ULIP's training saves a DDP model, ``{"state_dict": {"module.<key>": ...}}``
(fp16, tensors only: the real file also holds ``args``, which tensors-only loading refuses), with
every key of the reference model, its ``open_clip_model.*`` included.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types
from argparse import Namespace

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_uni3d_goldens import _half, install_stand_ins, point_cloud, random_weights  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "golden_ulip2")
SEED = 13
POINTBERT = dict(trans_dim=32, depth=2, drop_path_rate=0.0, cls_dim=40, num_heads=2, group_size=8, num_group=16,
                 encoder_dims=24)
VISION = dict(image_size=28, layers=2, width=32, head_width=16, mlp_ratio=4.0, patch_size=14)
TEXT = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
EMBED = 1280


class _EasyDict(dict):
    __getattr__ = dict.__getitem__


def install_ulip(src: str) -> None:
    for name in ("knn_cuda", "models.pointnet2", "models.pointnet2.pointnet2", "data", "data.dataset_3d"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["knn_cuda"].KNN = lambda **kw: None  # dvae.py builds one at import; unused
    sys.modules["models.pointnet2.pointnet2"].Pointnet2_Ssg = None
    import numpy

    dataset = sys.modules["data.dataset_3d"]  # ULIP_models.py gets torch and np through its `import *`
    dataset.torch, dataset.np = torch, numpy
    sys.modules["easydict"].EasyDict = _EasyDict
    sys.modules["models"].__path__ = [os.path.join(src, "models")]


def reference():
    from open_clip.model import CLIP

    from models.pointbert.point_encoder import PointTransformer_Colored
    from models.ULIP_models import ULIP2_WITH_OPENCLIP

    clip = CLIP(EMBED, VISION, TEXT).eval()
    point = PointTransformer_Colored(Namespace(**POINTBERT), args=None)
    return ULIP2_WITH_OPENCLIP(point_encoder=point, open_clip_model=clip, pc_feat_dims=2 * POINTBERT["trans_dim"]).eval()


FULL = dict(trans_dim=384, depth=18, drop_path_rate=0.1, cls_dim=40, num_heads=6, group_size=32, num_group=512,
            encoder_dims=256)  # ULIP_2_PointBERT_10k_colored_pointclouds.yaml


def check_full_sizes():
    """The released sizes' layouts (ULIP-2 PointBERT on the CPU, ViT-bigG-14 on the meta device) against
    our modules, key by key and shape by shape: {model: parameter count of ours}."""
    import open_clip
    from open_clip.model import CLIP

    from models.pointbert.point_encoder import PointTransformer_Colored
    from models.ULIP_models import ULIP2_WITH_OPENCLIP

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from know3d_core.eval.clip_vit import ClipViT
    from know3d_core.eval.ulip2 import Ulip2, Ulip2Config, _unused
    from know3d_core.eval.weights import check_state

    ref = ULIP2_WITH_OPENCLIP(point_encoder=PointTransformer_Colored(Namespace(**FULL), args=None), open_clip_model=None,
                              pc_feat_dims=2 * FULL["trans_dim"])  # the meta device cannot run its drop-path schedule
    ours = Ulip2(Ulip2Config.from_state(ref.state_dict()))
    check_state(ours, ref.state_dict(), "ULIP-2", "the reference layout", unused=_unused)
    with open(os.path.join(os.path.dirname(open_clip.__file__), "model_configs", "ViT-bigG-14.json")) as f:
        cfg = json.load(f)
    with torch.device("meta"):
        sd = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).state_dict()
        vit = ClipViT.from_state(sd, "visual.")
    check_state(vit, sd, "ViT-bigG-14", "the reference layout", prefix="visual.")
    return {"ulip2/pointbert": sum(v.numel() for v in ours.parameters()),
            "open_clip/ViT-bigG-14 visual": sum(v.numel() for v in vit.parameters())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ulip-src", required=True, help="ULIP checkout (f194ddb)")
    p.add_argument("--site", required=True, help="folder with timm and open_clip")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    install_stand_ins(args.site, args.ulip_src)
    install_ulip(args.ulip_src)
    os.makedirs(args.out, exist_ok=True)
    model = reference()
    weights = random_weights(model, SEED)
    model.load_state_dict(weights, strict=True)
    xyz, rgb = point_cloud(SEED)
    pixels = torch.randn(2, 3, VISION["image_size"], VISION["image_size"], generator=torch.Generator().manual_seed(SEED))
    save_file({"xyz": xyz, "rgb": rgb, "pc_embed": model.encode_pc(torch.cat((xyz, rgb), dim=-1)).contiguous(),
               "pixels": pixels, "image_embed": model.encode_image(pixels).contiguous()},
              os.path.join(args.out, "ulip2_io.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in _half(weights).items()}},
               os.path.join(args.out, "ulip2_pointbert_tiny.pt"))
    full = check_full_sizes()
    with open(os.path.join(args.out, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"full_size_layouts_match (parameters)": full, "pointbert": POINTBERT, "vision": VISION, "text": TEXT, "embed": EMBED, "weight_seed": SEED,
                   "ulip": "salesforce/ULIP f194ddb", "timm": "1.0.31", "open_clip": "3.3.0"}, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
