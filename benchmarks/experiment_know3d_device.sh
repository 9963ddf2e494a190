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
. "$(dirname "$0")/_experiment_device_common.sh"
prepare_experiment "$@"  # the size flags given (--latent-grid, --model-channels ...) shape the models it writes
left=$(( ${STOP_AT:-400} - SECONDS ))
echo "setup took ${SECONDS} s; the experiment gets at most ${left} s" | tee -a "$LOG"
timeout -s INT -k 10 "$left" "$PY" benchmarks/experiment_know3d.py --out "$W" --device "${DEVICE:-cuda}" "$@" 2>&1 \
  | grep --line-buffered -v "Loading weights\|Writing model shards" | tee -a "$LOG"
rc=$?
pack_results
echo "script ${SECONDS} s, experiment rc ${rc}; $(ls -la "$D/results.tgz" 2>&1)" | tee -a "$LOG"
exit $rc
