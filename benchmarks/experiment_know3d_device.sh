#!/usr/bin/env bash
# The README's GPU run of the small-scale Know3D experiment (issue 20) as one device call (H100/H200).
#
# Here, first (CPU; the renders need OpenGL, which the GPU machine lacks without carried EGL debs):
#   python benchmarks/experiment_know3d.py --out .expdata/exp --prepare-only   # datasets and models
#   mv .expdata/exp/models .expdata/models_cpu     # models are written there; these are the fallback
#   pip download (no deps, cp312 manylinux) diffusers==0.42.1 fpsample==0.3.3 into .whl_exp/
# Then the device call: command `bash benchmarks/experiment_know3d_device.sh`, carry [".whl_exp", ".expdata"].
# Everything lands in $OUT: log, experiment.md/.json, prompts.png, eval.png and run.tgz (eval files,
# training metrics, generated occupancies).
set -o pipefail
W=/tmp/exp
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_exp/*.whl \
  || { echo "wheel install failed" | tee "$OUT/log"; exit 3; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
rm -rf "$W" && cp -r .expdata/exp "$W"
# the random models are written there (its transformers/diffusers); models written here are the fallback
python3 benchmarks/experiment_know3d.py --out "$W" --prepare-only 2>&1 | tail -3 | tee -a "$OUT/log" \
  || { echo "writing the models failed there: using the ones made here" | tee -a "$OUT/log"; rm -rf "$W/models"; cp -r .expdata/models_cpu "$W/models"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/log"
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)" 2>&1 | tee -a "$OUT/log"
python3 benchmarks/experiment_know3d.py --out "$W" --device cuda "$@" 2>&1 | grep --line-buffered -v "Loading weights\|Writing model shards" | tee -a "$OUT/log"
rc=$?
cp "$W"/experiment.md "$W"/experiment.json "$W"/prompts.png "$OUT"/ 2>/dev/null
cp "$W"/eval/eval.png "$OUT"/ 2>/dev/null
(cd "$W" && tar czf "$OUT/run.tgz" --ignore-failed-read eval/eval.json eval/eval.csv runs/*/metrics.csv pred 2>/dev/null)
ls -la "$OUT" | tee -a "$OUT/log"
exit $rc
