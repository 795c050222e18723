#!/usr/bin/env bash
# Last GPU call of the session: our benchmark variants, each with its error tail shown if it fails.
set -uo pipefail
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
B="python3 -m slimtune bench --geometry e2b --json $OUT/ours.jsonl"
run() { local name=$1 t=$2; shift 2; timeout $t $B "$@" > $OUT/$name.log 2>&1; grep '"probe": "slimtune"' $OUT/$name.log | cut -c1-300 || true
        grep -q '"probe": "slimtune"' $OUT/$name.log || grep -v Warning $OUT/$name.log | tail -4 | cut -c1-400; }
run attn 110 --mode qlora,lora16 --seq 2048,8192 --attention slimtune
run compile_sdpa 80 --mode qlora --seq 2048 --compile
run compile_attn 80 --mode qlora --seq 2048,8192 --attention slimtune --compile
