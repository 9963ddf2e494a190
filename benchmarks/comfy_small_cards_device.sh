#!/usr/bin/env bash
# Issue 22 part 3 as one device call (H100/H200, about 150-250 s): the know3d_full graph's nodes under
# ComfyUI's model management in-process, capped like a 24 GB card (bench_comfy_small_cards.py).
#
# Here, first: the minimum of ComfyUI to carry (its Python source + the Qwen tokenizer, ~9.5 MiB, and the
# pure-Python part of comfy-kitchen, comfy-aimdo, einops, torchsde, trampoline, ~1 MiB) into .comfy_min/:
#   echo /.comfy_min/ >> .git/info/exclude
#   $COMFYUI_PYTHON benchmarks/bench_comfy_small_cards.py --comfyui $COMFYUI_DIR --make-min .comfy_min \
#       --site $(dirname $COMFYUI_PYTHON)/../lib/python3.11/site-packages
# Then the device call: command `bash benchmarks/comfy_small_cards_device.sh [BUDGET_S]`, carry [".comfy_min"]
# (further arguments go to the script: `... 220 --tiny` checks this file on the CPU with OUT set).
# Results: $OUT/cards/comfy_small_cards.json and $OUT/cards/comfy_small_cards.log; copy them to
# benchmarks/results/small_cards/ and fill the README's "Small cards" section from them.
set -o pipefail
budget=${1:-220}
shift
out="${OUT:?set OUT to the output folder}/cards"
mkdir -p "$out"
[ -f .comfy_min/ComfyUI/comfy/model_management.py ] || { echo ".comfy_min is missing: see the header of $0"; exit 3; }
export PYTHONPATH="$PWD/.comfy_min/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout -k 5 $((budget + 60)) python3 benchmarks/bench_comfy_small_cards.py --comfyui .comfy_min/ComfyUI --card 24 \
  --budget "$budget" --out "$out/comfy_small_cards.json" "$@" 2>&1 | tee "$out/comfy_small_cards.log"
