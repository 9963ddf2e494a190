#!/usr/bin/env bash
# One device call for issues 19.8 / 21: CUDA tests, flow training step, neighbour maps + decoder.
# usage: bash benchmarks/kernels_device_run.sh [steps...]   (steps: tests train maps first c2s decoder convs
# first2); logs to $OUT
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
steps=${*:-tests train maps}
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for s in $steps; do
  echo "=== $s $(date +%T)"
  case $s in
    tests) timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_fused_autograd.py \
             tests/test_neighbour_triton.py tests/test_trellis2_fused.py tests/test_sparse_conv.py \
             tests/test_decoder_fused.py tests/test_knowledge_branch.py 2>&1 | tee $OUT/cuda_tests.log ;;
    tests2) timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_neighbour_triton.py \
             tests/test_decoder_fused.py tests/test_sparse_conv.py tests/test_trellis2_decoders.py 2>&1 | tee $OUT/cuda_tests2.log ;;
    tests3) timeout 90 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_neighbour_triton.py \
             tests/test_decoder_fused.py -k "triton or precompile or unfused" 2>&1 | tee $OUT/cuda_tests3.log ;;
    train) timeout 200 python3 benchmarks/bench_flow_training.py --profile "ss B=2,shape N=16k" --out $OUT/train.json 2>&1 | tee $OUT/train.log ;;
    maps) timeout 200 python3 benchmarks/bench_neighbour_map.py --profile --sweep --warmup 2 --repeats 5 --out $OUT/maps.json 2>&1 | tee $OUT/maps.log ;;
    first) for run in cold warm; do TRITON_CACHE_DIR=/tmp/tcold timeout 60 python3 benchmarks/bench_shape_decoder.py \
             --cases shape_1024 --dtypes float16 --warmup 0 --repeats 1 --out $OUT/first_$run.json 2>&1 | tail -3 | tee -a $OUT/first.log; done ;;
    c2s) timeout 75 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_c2s_conv.py tests/test_neighbour_triton.py \
             tests/test_decoder_fused.py 2>&1 | tee $OUT/cuda_tests_c2s.log ;;
    decoder) timeout 85 python3 benchmarks/bench_neighbour_map.py --profile --sweep --warmup 2 --repeats 5 --out $OUT/maps.json \
             2>&1 | tee $OUT/maps.log ;;
    convs) timeout 70 python3 benchmarks/bench_decoder_convs.py --out $OUT/convs.json 2>&1 | tee $OUT/convs.log ;;
    first2) timeout 150 python3 benchmarks/perf_report.py --parts first --out $OUT/first.json 2>&1 | tee $OUT/first.log ;;
  esac
done
echo "=== done $(date +%T)"
