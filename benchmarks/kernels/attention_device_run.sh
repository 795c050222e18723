#!/usr/bin/env bash
# One device call: environment, GPU tests of the attention kernels (parallel), then the benchmark.
#
# Sweep of the backward variants (what the lead runs; ~2-3 min, prints JSON lines, results under $OUT):
#   bash benchmarks/kernels/attention_device_run.sh $OUT --sweep-only
# = GPU tests (-m gpu, both variants) alongside a parallel compile of every sweep candidate (each ≤ 150 s), then
#   bench_flash_attention.py --sweep-only --workers 0 --budget-s ${SWEEP_BUDGET:-150} (its own hard budget).
#   Output: $OUT/tests.log, $OUT/compile.log, $OUT/bench.log (one JSON line per candidate + "best_per_kernel"),
#   $OUT/bench.json.
# Full table (older use): bash benchmarks/kernels/attention_device_run.sh OUT_DIR [--sweep] [bench args]
set -u -o pipefail
OUT=${1:?out dir}; shift
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/env.txt"
python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)" | tee -a "$OUT/env.txt"
if [ -z "${SKIP_SWEEP_COMPILE:-}" ]; then
  timeout 150 python3 benchmarks/kernels/bench_flash_attention.py --compile-only --workers 6 > "$OUT/compile.log" 2>&1 &
else
  true &
fi
CP=$!
timeout 150 python3 -m pytest -q -n 8 -m gpu -p no:cacheprovider tests/kernels/test_flash_attention_gpu.py > "$OUT/tests.log" 2>&1
echo "pytest rc=$?"; tail -25 "$OUT/tests.log"
wait $CP; echo "compile rc=$?"; grep -i "fail" "$OUT/compile.log" | head
EXTRA=()
case " $* " in *" --sweep-only "*) EXTRA=(--workers 0 --budget-s "${SWEEP_BUDGET:-150}");; esac
timeout ${BENCH_TIMEOUT:-170} python3 benchmarks/kernels/bench_flash_attention.py --json "$OUT/bench.json" ${EXTRA[@]+"${EXTRA[@]}"} "$@" 2>&1 | tee "$OUT/bench.log"
echo "bench rc=$?"
