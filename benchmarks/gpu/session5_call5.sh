#!/usr/bin/env bash
# Session 5, call 5 (one H200, ~4 min): the windowed head_dim-256 dK/dV default (sweep winner) checked against the
# fp64 reference, then its end-to-end effect on E2B QLoRA 8K (graphs + compiled layers + tiled MLP 2048, the
# config that met issue 6's 8K row in call 2) and 2K (graphs).
#   OUT=/some/dir bash benchmarks/gpu/session5_call5.sh      (carry .gpu-site)
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
stamp "attention GPU tests"
timeout 120 python3 -m pytest -q -n 8 -m gpu -p no:cacheprovider --tb=short tests/kernels/test_flash_attention_gpu.py \
  > "$OUT/tests.log" 2>&1; echo "rc=$?"; tail -2 "$OUT/tests.log"
stamp "8K graphs+compile+mlp 2048"
timeout 150 $B --geometry e2b --mode qlora --seq 8192 --cuda-graphs --compile --mlp-chunk-size 2048 2>&1 | show
stamp "2K graphs"
timeout 60 $B --geometry e2b --mode qlora --seq 2048 --cuda-graphs 2>&1 | show
stamp done
