#!/usr/bin/env bash
# Session 2, call 2: every GPU test, then the E2B benchmark with the fused LoRA node, eager and compiled, and the
# memory switches one by one at 8K.
set -uo pipefail
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tee $OUT/gpu_tests.log | grep -E "passed|failed|FAILED|Error" | head -20
B="python3 -m slimtune bench --geometry e2b --attention slimtune --json $OUT/bench.jsonl"
show() { grep '"probe"' | cut -c1-420; }
timeout 100 $B --mode qlora,lora16 --seq 2048,8192 2>&1 | show
timeout 150 $B --mode qlora --seq 2048,8192 --compile 2>&1 | tee $OUT/compile.log | show
timeout 50 $B --mode qlora --seq 8192 --activation-offload 2>&1 | show
timeout 50 $B --mode qlora --seq 8192 --mlp-chunk-size 2048 2>&1 | show
timeout 50 $B --mode qlora --seq 8192 --activation-offload --mlp-chunk-size 2048 --optimizer adamw8bit 2>&1 | show
tail -5 $OUT/compile.log | cut -c1-300
