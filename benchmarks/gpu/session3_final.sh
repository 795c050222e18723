#!/usr/bin/env bash
# Session 3, final call: ours (CUDA-graph steps; + compiled layers at 8K) and the anchors (HF+PEFT, Unsloth) in
# one call on one card. Unsloth last with what is left of the call (it needs > 200 s to build and compile).
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ANCHOR_OUT=$OUT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, triton, peft; print(torch.__version__, transformers.__version__, triton.__version__, peft.__version__)"
B="python3 -m slimtune bench --geometry e2b --attention slimtune --json $OUT/ours.jsonl"
show() { grep '"probe"' | cut -c1-330; }
timeout 50 $B --mode qlora --seq 2048,8192 --cuda-graphs 2>&1 | show
timeout 25 $B --mode lora16 --seq 2048 --cuda-graphs 2>&1 | show
timeout 120 $B --mode qlora --seq 8192 --cuda-graphs --compile 2>&1 | show
timeout 60 python3 .anchors/probe_hf_baseline.py qlora 2>&1 | show
PYTHONPATH=$PWD timeout 50 python3 .anchors/probe_hf_baseline.py lora 2>&1 | show
ANCHOR_RUNS=1 timeout ${UNSLOTH_S:-220} python3 .anchors/probe_unsloth.py 2>&1 | tee $OUT/unsloth.log | show
echo done
