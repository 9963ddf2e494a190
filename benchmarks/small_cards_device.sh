#!/usr/bin/env bash
# Issue 22's measurement as one device call (H100/H200): first the CUDA test of the pinned visits' mechanism
# (tests/test_device_visits.py -k pinned_visit, ~12 s on the H200, at most 30; it passing or timing out, the
# benchmark runs with --pin-host; failing, without, and says so; the whole-pipeline CUDA test is left to
# the full CUDA suite), then
# bench_small_cards.py at full size with random weights (TRELLIS.2 warm-up, then 24 GiB, uncapped, 16 GiB in
# one process, each generating twice where the budget allows); wall time at most BUDGET_S + 45 s.
#
# Here, first: the device image lacks diffusers, so fetch its wheel (no deps) into .whl_cards/:
#   echo /.whl_cards/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl_cards diffusers==0.42.1
# Then the device call: command `bash benchmarks/small_cards_device.sh [BUDGET_S]`, carry [".whl_cards"].
# Results: $OUT/small_cards.json (rewritten after every run) and $OUT/small_cards.log; copy them to
# benchmarks/results/small_cards/ and fill the README's "Small cards" table from them.
set -o pipefail
budget=${1:-250}
shift  # further arguments go to the benchmark: `OUT=/tmp/sc bash $0 60 --tiny` checks this file on the CPU
log="$OUT/small_cards.log"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_cards .whl_cards/diffusers-*.whl \
  || { echo "wheel install failed: see the header of $0"; exit 3; }
export PYTHONPATH=/tmp/site_cards PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$log"
timeout -k 2 30 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_device_visits.py -k pinned_visit -rs \
  > /tmp/visits_test.log 2>&1
rc=$?
tail -30 /tmp/visits_test.log >> "$log"
pin=--pin-host
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
  echo "pinned-visit CUDA test timed out (30 s): benchmark with --pin-host anyway" | tee -a "$log"
elif [ $rc -ne 0 ]; then
  echo "pinned-visit CUDA test FAILED (rc $rc): benchmark without --pin-host (pageable .to() moves)" | tee -a "$log"
  pin=
fi
timeout -k 5 $((budget + 10)) python3 benchmarks/bench_small_cards.py --budget "$budget" \
  --out "$OUT/small_cards.json" $pin "$@" 2>&1 | tee -a "$log"
