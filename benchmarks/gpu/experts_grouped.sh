#!/usr/bin/env bash
# Grouped-GEMM MoE experts on one H200 (~2.5 min): correctness and the one-layer peak at 26B-A4B's real expert
# shapes, then 26B-A4B QLoRA + expert LoRA at 2K timed with the grouped path and with the per-expert loop, both in
# one process (same geometry, same random weights seed, built once per path).
#   OUT=/some/dir bash benchmarks/gpu/experts_grouped.sh
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 60 python3 -m pytest -q -s -p no:cacheprovider --tb=short -rfE -m gpu tests/adapt/test_experts_grouped_gpu.py \
  > "$OUT/tests_experts_grouped.log" 2>&1
echo "grouped experts tests rc=$?"; grep -E "one 26B-A4B expert layer|passed|failed|Error" "$OUT/tests_experts_grouped.log" \
  | cut -c1-400
timeout 100 python3 -m slimtune bench --json "$OUT/bench_experts_grouped.jsonl" --attention slimtune \
  --geometry 26b-a4b --mode qlora --seq 2048 --finetune-experts --steps 4 --experts-impl grouped,loop 2>&1 \
  | grep -E '^\{"probe": "slimtune"|Error' | cut -c1-400
