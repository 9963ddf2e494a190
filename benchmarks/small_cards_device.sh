#!/usr/bin/env bash
# Issue 22's measurement as one device call (H100/H200): first the CUDA tests of the pinned visits
# (tests/test_device_visits.py, ~20 s; if they fail, the benchmark runs with KNOW3D_PIN_HOST=0 and says so),
# then bench_small_cards.py at full size with random weights (TRELLIS.2 warm-up, then 24 GiB, uncapped,
# 16 GiB in one process); wall time about BUDGET_S + 50 s.
#
# Here, first: the device image lacks diffusers, so fetch its wheel (no deps) into .whl_cards/:
#   echo /.whl_cards/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl_cards diffusers==0.42.1
# Then the device call: command `bash benchmarks/small_cards_device.sh [BUDGET_S]`, carry [".whl_cards"].
# Results: $OUT/small_cards.json (rewritten after every run) and $OUT/small_cards.log; copy them to
# benchmarks/results/small_cards/ and fill the README's "Small cards" table from them.
set -o pipefail
budget=${1:-180}
shift  # further arguments go to the benchmark: `OUT=/tmp/sc bash $0 60 --tiny` checks this file on the CPU
log="$OUT/small_cards.log"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_cards .whl_cards/diffusers-*.whl \
  || { echo "wheel install failed: see the header of $0"; exit 3; }
export PYTHONPATH=/tmp/site_cards PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$log"
if ! timeout -k 5 40 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_device_visits.py -rs 2>&1 | tail -30 >> "$log"; then
  echo "pinned-visit CUDA tests FAILED: benchmark with KNOW3D_PIN_HOST=0 (pageable .to() moves)" | tee -a "$log"
  export KNOW3D_PIN_HOST=0
fi
timeout -k 5 $((budget + 10)) python3 benchmarks/bench_small_cards.py --budget "$budget" \
  --out "$OUT/small_cards.json" "$@" 2>&1 | tee -a "$log"
