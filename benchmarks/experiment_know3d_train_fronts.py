"""Prompt-swap accuracy of a finished `know3d experiment` row on its *training* fronts (issue 20).

    python benchmarks/experiment_know3d_train_fronts.py --out DIR --row hidden [--fronts 4]

Held-out fronts at chance can mean "did not generalise" or "did not learn": this generates the first
``--fronts`` training fronts under every description (the run's sizes, from DIR/experiment.json) and
scores them like the held-out ones; the ground truths are the training assets' codec latents decoded.
Prints one JSON line (accuracy, prompt effect, the ground truths' prompt effect, classifications).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    from safetensors.torch import load_file, save_file

    from know3d_core.data import layout as L
    from know3d_core.eval.experiment import (ROW_SOURCES, ExperimentConfig, _model_paths, _pipeline, assets_by_seed,
                                             decode_latent, generate, occupancy_64, prompt_effect, prompt_swap_accuracy)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="a finished know3d experiment folder")
    ap.add_argument("--row", default="hidden")
    ap.add_argument("--fronts", type=int, default=4)
    args = ap.parse_args()
    with open(os.path.join(args.out, "experiment.json"), encoding="utf-8") as f:
        result = json.load(f)
    known = {k: v for k, v in result["config"].items() if k in ExperimentConfig.__dataclass_fields__}
    cfg = ExperimentConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in known.items()})
    row = next(r for r in result["table"] if r["row"] == args.row)
    train = assets_by_seed(os.path.join(args.out, "data_train"))
    train = {s: train[s] for s in sorted(train)[:args.fronts]}
    gt = os.path.join(args.out, "gt_train")
    for seed, by_feature in train.items():
        for feature, asset in by_feature.items():
            item = os.path.join(gt, f"{seed:04d}_{feature}")
            os.makedirs(item, exist_ok=True)
            z = load_file(os.path.join(asset, L.SS_LATENT_FILE))[L.KEY_LATENT]
            save_file({L.KEY_OCCUPANCY: occupancy_64(decode_latent(z[None])[0]).contiguous()},
                      os.path.join(item, L.OCCUPANCY_FILE))
    source = ROW_SOURCES.get(args.row, ("hidden", "trajectory"))[1]
    know3d = os.path.join(args.out, "runs", args.row, "export", "know3d.safetensors") if source else None
    pipe = _pipeline(cfg, os.path.join(args.out, "runs", "base", "export", "TRELLIS.2"),
                     _model_paths(os.path.join(args.out, "models")), know3d)
    pred = os.path.join(args.out, f"pred_train_{args.row}")
    generate(cfg, pipe, row["variant"], train, pred, row["sigma"])
    acc, rows = prompt_swap_accuracy(pred, gt, cfg.features)
    print(json.dumps({"row": args.row, "train_fronts": len(train), "prompt_swap_accuracy": acc,
                      "prompt_effect": prompt_effect(pred, cfg.features), "gt_prompt_effect": prompt_effect(gt, cfg.features),
                      "classified": [[r["prompted"], r["classified"]] for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
