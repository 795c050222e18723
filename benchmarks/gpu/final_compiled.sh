#!/usr/bin/env bash
# Our best configuration: slimtune attention (graph break around it) + regionally compiled decoder layers.
set -uo pipefail
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 130 python3 -m slimtune bench --geometry e2b --json $OUT/ours.jsonl --mode qlora,lora16 --seq 2048,8192 \
  --attention slimtune --compile > $OUT/compiled.log 2>&1
grep '"probe": "slimtune"' $OUT/compiled.log | cut -c1-300 || grep -v Warning $OUT/compiled.log | tail -4
