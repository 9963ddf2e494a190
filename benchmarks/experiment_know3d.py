"""The small-scale Know3D experiment (issue 20): ``know3d experiment`` with the sizes of the GPU run.

    python benchmarks/experiment_know3d.py --out /tmp/exp --smoke            # CPU check (minutes)
    python benchmarks/experiment_know3d.py --out $OUT/exp --device cuda      # the README's run
    python benchmarks/experiment_know3d.py --out DIR --device cuda --train-seeds 24 ...  (any `know3d experiment` flag)

Without --smoke, the defaults below are the GPU run of the README (sizes, seed); every flag of
``know3d experiment --help`` overrides them. Library: know3d_core/eval/experiment.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from know3d_core.cli import main  # noqa: E402

# The README's GPU run (see "Train your own Know3D", evaluation).
GPU_RUN = ["--train-seeds", "8", "--val-seeds", "4", "--latent-grid", "16", "--model-channels", "128",
           "--num-blocks", "4", "--num-heads", "4", "--backview-steps", "150", "--base-steps", "300",
           "--know3d-steps", "300", "--batch-size", "8", "--lr", "3e-4", "--back-steps", "6", "--sample-steps", "10",
           "--render-size", "64", "--sigmas", "0.85,0.5,0.25,0.1", "--num-workers", "4", "--time-budget", "240"]


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--smoke" not in argv:
        given = {a for a in argv if a.startswith("--")}
        defaults = []
        for i in range(0, len(GPU_RUN), 2):
            if GPU_RUN[i] not in given:
                defaults += GPU_RUN[i:i + 2]
        argv = argv + defaults
    sys.exit(main(["experiment"] + argv))
