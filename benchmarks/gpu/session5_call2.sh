#!/usr/bin/env bash
# Session 5, call 2 (one H200): issue 6's 8K row with compiled layers + CUDA graphs and a tiled MLP only (the
# all-switch run measured 4.18 GiB but 13,958 tok/s), issue 5's longest 8 GiB context just under the 53,248-token
# plan (which measured 8.31 GiB), then the rewritten fast-path GPU tests (fp32 tight; bf16 vs an fp32 reference).
#   OUT=/some/dir bash benchmarks/gpu/session5_call2.sh      (carry .gpu-site)
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
for chunk in 4096 2048; do
  stamp "8K graphs+compile mlp $chunk"
  timeout 150 $B --geometry e2b --mode qlora --seq 8192 --cuda-graphs --compile --mlp-chunk-size $chunk 2>&1 | show
done
stamp "50K in 8 GiB"
timeout 90 $B --geometry e2b --mode qlora --seq 50176 --steps 3 --max-memory 8GiB --recompute-norms 2>&1 | show
stamp "fast-path tests"; X=""; python3 -c "import xdist" 2>/dev/null && X="-n 4"
timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short $X -k cuda tests/train/test_fast_paths.py \
  > "$OUT/tests_fast_paths.log" 2>&1; echo "tests rc=$?"; grep -E "Error|passed|failed" "$OUT/tests_fast_paths.log" | tail -6
stamp done
