#!/usr/bin/env bash
# One device call of the perf work: CUDA tests, flow timings, profiles, conv sweeps. Logs to $OUT.
# usage: bash benchmarks/perf_device_run.sh [steps...]   (steps: tests flows profile sweep conv decoder)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
steps=${*:-tests flows profile sweep}
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for s in $steps; do
  echo "=== $s $(date +%T)"
  case $s in
    first) for f in --no-fused ""; do TRITON_CACHE_DIR=$(mktemp -d) timeout 40 python3 benchmarks/bench_trellis2_flows.py --cases "ss B=1" --warmup 1 --repeats 3 $f 2>&1 | tee -a $OUT/perf_first.log; done ;;
    tests) timeout 70 python3 -m pytest -q -x -m cuda -p no:cacheprovider tests/test_sparse_conv.py tests/test_trellis2_fused.py 2>&1 | tee $OUT/perf_tests.log ;;
    flows) timeout 55 python3 benchmarks/bench_trellis2_flows.py --out $OUT/perf_flows.json 2>&1 | tee $OUT/perf_flows.log ;;
    profile) timeout 45 python3 benchmarks/profile_flows.py --cases "ss B=1,ss B=2" --host-check --decoder --out $OUT/perf_profile.json 2>&1 | tee $OUT/perf_profile.log ;;
    sweep) timeout 80 python3 benchmarks/sweep_conv_triton.py --out $OUT/perf_sweep.json 2>&1 | tee $OUT/perf_sweep.log ;;
    conv) timeout 55 python3 benchmarks/bench_sparse_conv.py --algos gather csr implicit --warmup 2 --repeats 5 --out $OUT/perf_conv.json 2>&1 | tee $OUT/perf_conv.log ;;
    decoder) timeout 30 python3 benchmarks/bench_shape_decoder.py --cases shape_1024 --dtypes float16 --out $OUT/perf_decoder.json 2>&1 | tee $OUT/perf_decoder.log ;;
  esac
done
echo "=== done $(date +%T)"
