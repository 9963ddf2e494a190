# Sourced (not run) by experiment_know3d_device.sh and experiment_know3d_parallel.sh: the steps both device
# calls share. Reads RESULTS (else OUT), PY, WORK, NO_WHEELS, INPUTS; sets D (results folder), LOG (emptied),
# PY, W (the work folder).
set -o pipefail
D="${RESULTS:-$OUT}"
mkdir -p "$D"
LOG="$D/log"
PY="${PY:-python3}"
W="${WORK:-/tmp/exp}"
: > "$LOG"

# prepare_experiment [size flags]: the wheels (unless NO_WHEELS), the work folder from INPUTS (default
# .expdata/exp; a missing folder is made there, which needs OpenGL), the random models written there (its
# transformers/diffusers; the ones made here are the fallback), then the machine and library versions.
prepare_experiment() {
  if [ -z "$NO_WHEELS" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_exp/*.whl \
      || { echo "wheel install failed" | tee -a "$LOG"; exit 3; }
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONUNBUFFERED=1
  local inputs="${INPUTS:-.expdata/exp}"
  rm -rf "$W" && if [ -d "$inputs" ]; then cp -r "$inputs" "$W"; else mkdir -p "$W"; fi
  "$PY" benchmarks/experiment_know3d.py --out "$W" --prepare-only "$@" 2>&1 | tail -3 | tee -a "$LOG" \
    || { echo "writing the models failed there: using the ones made here" | tee -a "$LOG"; rm -rf "$W/models"; cp -r .expdata/models_cpu "$W/models"; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
  "$PY" -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)" 2>&1 | tee -a "$LOG"
}

# pack_results: the table into the log, and results.tgz (experiment.md/.json, prompts.png, eval/, the runs'
# training metrics, the generated occupancies) into D.
pack_results() {
  [ -f "$W/experiment.md" ] && { echo "--- table (experiment.md)"; cat "$W/experiment.md"; } | tee -a "$LOG"
  (cd "$W" && tar czf "$D/results.tgz" --ignore-failed-read experiment.md experiment.json prompts.png eval/eval.png \
     eval/eval.json eval/eval.csv runs/*/metrics.csv pred 2>/dev/null)
}
