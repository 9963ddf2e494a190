#!/usr/bin/env bash
# The README's GPU run of the small-scale Know3D experiment (issue 20) as one device call (H100/H200), one row
# after another: two Know3D rows fit a 420 s call. experiment_know3d_parallel.sh runs the trained rows side by
# side instead (same inputs and carry).
#
# Here, first (CPU; the renders need OpenGL, which the GPU machine lacks without carried EGL debs):
#   python benchmarks/experiment_know3d.py --out .expdata/exp --prepare-only   # datasets and models
#   mv .expdata/exp/models .expdata/models_cpu     # models are written there; these are the fallback
#   pip download (no deps, cp312 manylinux) diffusers==0.42.1 fpsample==0.3.3 into .whl_exp/
# Then the device call: command `bash benchmarks/experiment_know3d_device.sh [experiment flags]`, carry
# [".whl_exp", ".expdata"]; extra flags override benchmarks/experiment_know3d.py's GPU_RUN (e.g. --rows).
# Writes two files into ${RESULTS:-$OUT}: `log` and `results.tgz` (experiment.md/.json, prompts.png, eval/,
# the runs' training metrics, the generated occupancies). The table is rewritten after every row, and the
# experiment is stopped at ${STOP_AT:-400} s of this script, so a run cut short still packs its finished rows.
# CPU check of this exact script (venv python, no wheels, tiny steps):
#   RESULTS=/tmp/expdev PY=.venv/bin/python NO_WHEELS=1 DEVICE=cpu bash benchmarks/experiment_know3d_device.sh \
#       --base-steps 4 --know3d-steps 4 --sample-steps 2 --time-budget 0
set -o pipefail
D="${RESULTS:-$OUT}"
mkdir -p "$D"
LOG="$D/log"
PY="${PY:-python3}"
W="${WORK:-/tmp/exp}"
: > "$LOG"
if [ -z "$NO_WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_exp/*.whl \
    || { echo "wheel install failed" | tee -a "$LOG"; exit 3; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
rm -rf "$W" && cp -r .expdata/exp "$W"
# the random models are written there (its transformers/diffusers); models written here are the fallback
"$PY" benchmarks/experiment_know3d.py --out "$W" --prepare-only 2>&1 | tail -3 | tee -a "$LOG" \
  || { echo "writing the models failed there: using the ones made here" | tee -a "$LOG"; rm -rf "$W/models"; cp -r .expdata/models_cpu "$W/models"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
"$PY" -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)" 2>&1 | tee -a "$LOG"
left=$(( ${STOP_AT:-400} - SECONDS ))
echo "setup took ${SECONDS} s; the experiment gets at most ${left} s" | tee -a "$LOG"
timeout -s INT -k 10 "$left" "$PY" benchmarks/experiment_know3d.py --out "$W" --device "${DEVICE:-cuda}" "$@" 2>&1 \
  | grep --line-buffered -v "Loading weights\|Writing model shards" | tee -a "$LOG"
rc=$?
[ -f "$W/experiment.md" ] && { echo "--- table (experiment.md)"; cat "$W/experiment.md"; } | tee -a "$LOG"
(cd "$W" && tar czf "$D/results.tgz" --ignore-failed-read experiment.md experiment.json prompts.png eval/eval.png \
   eval/eval.json eval/eval.csv runs/*/metrics.csv pred 2>/dev/null)
echo "script ${SECONDS} s, experiment rc ${rc}; $(ls -la "$D/results.tgz" 2>&1)" | tee -a "$LOG"
exit $rc
