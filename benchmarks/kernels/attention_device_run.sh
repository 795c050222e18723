#!/usr/bin/env bash
# One device call: environment, GPU tests of the attention kernels (parallel), then the benchmark with a config sweep.
# Usage (on the GPU machine, from the repo root): bash benchmarks/kernels/attention_device_run.sh OUT_DIR [bench args]
set -u -o pipefail
OUT=${1:?out dir}; shift
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/env.txt"
python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)" | tee -a "$OUT/env.txt"
if [ -z "${SKIP_SWEEP_COMPILE:-}" ]; then
  timeout 170 python3 benchmarks/kernels/bench_flash_attention.py --compile-only --workers 6 > "$OUT/compile.log" 2>&1 &
else
  true &
fi
CP=$!
timeout 170 python3 -m pytest -q -n 8 -m gpu -p no:cacheprovider tests/kernels/test_flash_attention.py > "$OUT/tests.log" 2>&1
echo "pytest rc=$?"; tail -25 "$OUT/tests.log"
wait $CP; echo "compile rc=$?"; grep -i "fail" "$OUT/compile.log" | head
timeout ${BENCH_TIMEOUT:-120} python3 benchmarks/kernels/bench_flash_attention.py --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
echo "bench rc=$?"
