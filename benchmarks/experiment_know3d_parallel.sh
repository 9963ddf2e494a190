#!/usr/bin/env bash
# The small-scale Know3D experiment (issue 20) with its trained rows side by side on one GPU, as one device call.
#
# At the GPU run's sizes a training step is launch-bound (a few ms of GPU work in a 25-55 ms step), so one
# process leaves the GPU mostly idle and one row after another fits two Know3D rows in a call. Here the base
# and the untrained rows run first in one process (`know3d experiment --rows none,multiview`), then every
# trained row in its own process on its own copy of that work folder (the finished base is reused: the
# experiment skips runs with a FINISHED file), under CUDA MPS when the machine has it so their kernels
# share the GPU instead of time-slicing it; at the end the finished rows are copied back into one folder and
# `know3d experiment` with all rows evaluates them and writes the one table (nothing is retrained there).
# Measured (H200, session 8): four rows side by side under MPS had not finished after 256 s, where one
# `hidden` row alone takes 148 s on an H100: the sharing gain is well under four-fold; give a call two rows.
#
# Command (device, repo root): `bash benchmarks/experiment_know3d_parallel.sh`, carry [".whl_exp", ".expdata"]
# (same inputs as experiment_know3d_device.sh; INPUTS names another folder of them, and a missing one is made
# there, which needs OpenGL). Env: ROWS (the trained rows run in parallel), STOP_AT (script
# seconds at which the parallel rows are stopped; default 500), END_AT (hard end of the final evaluation;
# default 575). A base from an earlier call, unpacked to .expdata/base (runs/base of base.tgz), is reused.
# Writes into ${RESULTS:-$OUT}: log, results.tgz (as the one-process script), base.tgz (the trained base, to
# carry into a later call), exports.tgz (each finished row's run folder without checkpoints, to merge here).
# CPU check (tiny steps): RESULTS=/tmp/expp PY=.venv/bin/python NO_WHEELS=1 DEVICE=cpu STOP_AT=400 END_AT=600 \
#     EXTRA="--base-steps 4 --know3d-steps 4 --sample-steps 2" ROWS=hidden,image bash benchmarks/experiment_know3d_parallel.sh
# (tests/test_eval_experiment.py runs it at the --smoke sizes).
. "$(dirname "$0")/_experiment_device_common.sh"
ROWS="${ROWS:-hidden,image,latent,hidden_gt,hidden_sigma0.85,hidden_sigma0.5,hidden_sigma0.1}"
STOP_AT="${STOP_AT:-500}"
END_AT="${END_AT:-575}"
# shellcheck disable=SC2206
EXTRA_ARGS=(${EXTRA:-})
say() { echo "[parallel $(date -u +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }
EXP=("$PY" benchmarks/experiment_know3d.py --device "${DEVICE:-cuda}" --time-budget 0 "${EXTRA_ARGS[@]}")

prepare_experiment "${EXTRA_ARGS[@]}"
if [ -d .expdata/base ]; then mkdir -p "$W/runs" && cp -r .expdata/base "$W/runs/base" && say "reusing the carried base"; fi

say "base and untrained rows (one process)"
timeout -s INT -k 10 $(( STOP_AT - SECONDS )) "${EXP[@]}" --out "$W" --rows none,multiview 2>&1 \
  | grep --line-buffered -v "Loading weights\|Writing model shards" | tee -a "$LOG"
[ -f "$W/runs/base/FINISHED" ] || { say "the base did not finish: nothing to run in parallel"; exit 4; }
(cd "$W/runs" && tar czf "$D/base.tgz" --exclude='base/checkpoints' base)

MPS=""
if command -v nvidia-cuda-mps-control >/dev/null && [ "${DEVICE:-cuda}" = cuda ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
  mkdir -p /tmp/mps_pipe /tmp/mps_log
  if nvidia-cuda-mps-control -d && "$PY" -c "import torch; torch.zeros(1, device='cuda').sum().item()" 2>>"$LOG"; then
    MPS=1; say "CUDA MPS on"
  else
    echo quit | nvidia-cuda-mps-control 2>/dev/null; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; say "CUDA MPS unavailable: time-sliced"
  fi
fi

pids=()
for row in ${ROWS//,/ }; do
  rm -rf "$W.$row" && cp -r "$W" "$W.$row"
  ( timeout -s INT -k 10 $(( STOP_AT - SECONDS )) "${EXP[@]}" --out "$W.$row" --rows "$row" --num-workers 2 \
      > "$W.$row.log" 2>&1; echo "rc=$?" >> "$W.$row.log" ) &
  pids+=($!)
done
say "started ${#pids[@]} rows: $ROWS"
wait "${pids[@]}"
[ -n "$MPS" ] && echo quit | nvidia-cuda-mps-control
done_rows="none,multiview"
for row in ${ROWS//,/ }; do
  grep -v "Loading weights\|Writing model shards" "$W.$row.log" | grep "experiment\|rc=\|Error\|FAILED" | sed "s/^/  [$row] /" | tee -a "$LOG"
  if [ -f "$W.$row/pred/$row/FINISHED" ]; then
    rm -rf "$W/runs/$row" "$W/pred/$row"
    cp -r "$W.$row/runs/$row" "$W/runs/$row" && cp -r "$W.$row/pred/$row" "$W/pred/$row" && done_rows="$done_rows,$row"
  fi
done
say "finished rows: $done_rows; the table over them"
timeout -s INT -k 5 $(( END_AT - SECONDS )) "${EXP[@]}" --out "$W" --rows "$done_rows" 2>&1 \
  | grep --line-buffered "experiment\|FAILED\|Error" | tee -a "$LOG"
rc=$?
pack_results
(cd "$W/runs" && tar czf "$D/exports.tgz" --exclude='*/checkpoints' --exclude='*/cache' --exclude='*/knowledge*' . 2>/dev/null)
say "done, experiment rc ${rc}; $(ls -la "$D" | tr '\n' ' ')"
exit $rc
