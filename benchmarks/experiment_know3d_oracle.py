"""Can the Know3D branch learn the back at all? Train it on *oracle* knowledge and score the training fronts (issue 20).

    python benchmarks/experiment_know3d_oracle.py --out DIR [--steps 800] [--lr 1e-3] [--batch-size 16]
        [--front-azimuth 30] [--run oracle]

DIR is a `know3d experiment` folder (its data_train, models and finished runs/base are used). The
knowledge of every training pair is a one-hot of the pair's back feature (16 tokens x the latent
source's D), written into the knowledge cache before `train know3d` starts, so the trainer, the branch
and the sampler are the real ones and only the knowledge is perfect. Then every training front (azimuth
0 view) is generated under each feature's one-hot and scored by prompt-swap accuracy against the
training ground truths. Far below 1: the branch cannot use even a perfect knowledge at this size and
step count; near 1: whatever the real knowledge lacks, the mechanism works. Prints one JSON line.
At 8^3 (4 training fronts, base 2000 steps, 800 steps, batch 16, lr 1e-3): every pair 11/16, front
pairs (--front-azimuth 30) 15/16.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOKENS = 16


def one_hot(features, feature, dim):
    """Oracle knowledge ``[TOKENS, dim]`` of ``feature``: 1 in the feature's channel of every token."""
    import torch

    t = torch.zeros(TOKENS, dim)
    t[:, list(features).index(feature)] = 1.0
    return t


def train_oracle(cfg, data, base, models, out):
    """``train know3d`` (latent source: D = the MMDiT's packed channels) on a cache of one-hot knowledge;
    returns (the exported know3d file, the knowledge spec)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from know3d_core.data import layout as L
    from know3d_core.eval.experiment import _train_config
    from know3d_core.train.dataset import DatasetIndex
    from know3d_core.train.engine import train
    from know3d_core.train.features import FeatureCache
    from know3d_core.train.flows import TRAIN_SETS, FlowTask

    shutil.rmtree(out, ignore_errors=True)
    tc = _train_config(cfg, task="know3d", data=data, out=out, models=base, dinov3=models["dinov3"],
                       qwen=models["qwen"], steps=cfg.know3d_steps, knowledge_source="latent",
                       back_steps=cfg.back_steps, back_size=tuple(cfg.back_size), vae_image_area=cfg.vae_image_area)
    task = FlowTask(branch=True)
    spec = task._knowledge_spec(tc, torch.device(cfg.device))
    cache = FeatureCache(os.path.join(out, "cache", "knowledge"), spec.cache_spec())
    for pair in DatasetIndex.load(data, "train", TRAIN_SETS).pairs:
        with open(os.path.join(pair.folder, L.ASSET_RECORD), "r", encoding="utf-8") as f:
            feature = json.load(f)["feature"]
        save_file({"tensor": one_hot(cfg.features, feature, spec.dim)}, cache._file(pair.key))
    train(task, tc)
    return os.path.join(out, "export", "know3d.safetensors"), spec


def main() -> int:
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from know3d_core.data import layout as L
    from know3d_core.eval.experiment import (ExperimentConfig, _front_view, _model_paths, _pipeline, assets_by_seed,
                                             decode_latent, front_pairs_dataset, occupancy_64, prompt_effect,
                                             prompt_swap_accuracy)
    from know3d_core.eval.geometry import coords_to_grid

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="a know3d experiment folder with a finished runs/base")
    ap.add_argument("--run", default="oracle", help="run folder name under DIR/runs_oracle/")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--front-azimuth", type=float, help="train on the front pairs only (as --know3d-front-azimuth)")
    ap.add_argument("--sample-steps", type=int, default=12)
    args = ap.parse_args()
    with open(os.path.join(args.out, "inputs.json"), encoding="utf-8") as f:
        inputs = json.load(f)
    keys = ("latent_grid", "model_channels", "num_blocks", "num_heads", "seed")
    cfg = ExperimentConfig(out=args.out, features=tuple(inputs["features"]), **{k: inputs[k] for k in keys},
                           know3d_steps=args.steps, lr=args.lr, batch_size=args.batch_size, back_size=(64, 64),
                           sample_steps=args.sample_steps)
    models = _model_paths(os.path.join(args.out, "models"))
    base = os.path.join(args.out, "runs", "base", "export", "TRELLIS.2")
    root = os.path.join(args.out, "runs_oracle", args.run)
    data = os.path.join(args.out, "data_train")
    if args.front_azimuth is not None:
        data = front_pairs_dataset(data, os.path.join(root, "data_front"), args.front_azimuth)
    know3d, spec = train_oracle(cfg, data, base, models, os.path.join(root, "run"))
    pipe = _pipeline(cfg, base, models, know3d)
    gt, pred = os.path.join(root, "gt"), os.path.join(root, "pred")
    for seed, by_feature in sorted(assets_by_seed(os.path.join(args.out, "data_train")).items()):
        with Image.open(_front_view(by_feature[cfg.features[0]])) as im:
            cond = pipe.geometry.get_cond([pipe.preprocess(im.convert("RGBA"))], 512)
        for feature, asset in by_feature.items():
            name = f"{seed:04d}_{feature}"
            z = load_file(os.path.join(asset, L.SS_LATENT_FILE))[L.KEY_LATENT]
            os.makedirs(os.path.join(gt, name), exist_ok=True)
            save_file({L.KEY_OCCUPANCY: occupancy_64(decode_latent(z[None])[0]).contiguous()},
                      os.path.join(gt, name, L.OCCUPANCY_FILE))
            knowledge = spec.wrap(one_hot(cfg.features, feature, spec.dim)[None])
            coords = pipe.geometry.sample_sparse_structure(cond, knowledge, resolution=64, seed=seed,
                                                           params={"steps": cfg.sample_steps})
            os.makedirs(os.path.join(pred, name), exist_ok=True)
            save_file({L.KEY_OCCUPANCY: coords_to_grid(coords[:, 1:], 64).contiguous()},
                      os.path.join(pred, name, L.OCCUPANCY_FILE))
            with open(os.path.join(pred, name, "record.json"), "w", encoding="utf-8") as f:
                json.dump({"seed": seed, "feature": feature}, f)
    acc, rows = prompt_swap_accuracy(pred, gt, cfg.features)
    print(json.dumps({"steps": args.steps, "front_azimuth": args.front_azimuth, "train_front_prompt_swap": acc,
                      "prompt_effect": prompt_effect(pred, cfg.features), "gt_prompt_effect": prompt_effect(gt, cfg.features),
                      "classified": [[r["prompted"], r["classified"]] for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
