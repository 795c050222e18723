#!/usr/bin/env bash
# Session 3, call 2: CUDA-graph training steps on the H200 (test, then E2B QLoRA/LoRA16 eager vs graphed in one
# call), 31B QLoRA at 2K, and graphs + compiled layers.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
T="-q -p no:cacheprovider --tb=short -rfE"
timeout 120 python3 -m pytest $T -m gpu tests/train/test_cuda_graph.py tests/kernels/test_linear_cross_entropy.py > "$OUT/tests_graph.log" 2>&1
echo "graph tests rc=$?"; grep -E "passed|failed|Error|error" "$OUT/tests_graph.log" | tail -12 | cut -c1-600
J=$OUT/bench.jsonl
b() { local t=$1; shift; timeout "$t" python3 -m slimtune bench --json "$J" "$@" > "$OUT/last.log" 2>&1; echo "rc=$?";
      grep -E '^\{"probe": "slimtune"' "$OUT/last.log" | python3 -c '
import json,sys
for l in sys.stdin:
    r=json.loads(l); o=r.get("options",{})
    print(r["variant"], r["mode"], r["seq"], "graphs" if o.get("cuda_graphs") else "eager", "compile" if o.get("compile_layers") else "",
          r.get("peak_gib"), r.get("tok_s"), r.get("step_times_s", ""), r.get("error","")[:300])'
      grep -E "Error|error" "$OUT/last.log" | grep -v Warning | tail -4 | cut -c1-400; }
b 80 --geometry e2b --mode qlora --seq 2048,8192 --attention slimtune
b 120 --geometry e2b --mode qlora --seq 2048,8192 --attention slimtune --cuda-graphs
b 90 --geometry e2b --mode lora16 --seq 2048,8192 --attention slimtune --cuda-graphs
b 150 --geometry e2b --mode qlora --seq 2048 --attention slimtune --cuda-graphs --compile
echo done
