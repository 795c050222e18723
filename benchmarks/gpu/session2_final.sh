#!/usr/bin/env bash
# Session 2, final call: GPU tests, then ours and the anchors (Unsloth, HF+PEFT) in the same call on one card.
set -uo pipefail
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ANCHOR_OUT=$OUT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, triton, peft; print(torch.__version__, transformers.__version__, triton.__version__, peft.__version__)"
timeout 125 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests/kernels \
  tests/train/test_gpu_paths.py tests/memory/test_memory_switches_gpu.py tests/train/test_gpu_multimodal.py \
  > $OUT/gpu_tests.log 2>&1; grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.log | cut -c1-300 | head -20
B="python3 -m slimtune bench --geometry e2b --attention slimtune --json $OUT/ours.jsonl"
show() { grep '"probe"' | cut -c1-330; }
timeout 70 $B --mode qlora,lora16 --seq 2048,8192 2>&1 | show
timeout 30 $B --mode qlora --seq 8192 --activation-offload 2>&1 | show
timeout 40 $B --mode qlora --seq 2048 --multimodal 2>&1 | show
ANCHOR_RUNS=3 timeout 185 python3 .anchors/probe_unsloth.py 2>&1 | show
timeout 65 python3 .anchors/probe_hf_baseline.py qlora 2>&1 | show
PYTHONPATH=$PWD timeout 55 python3 .anchors/probe_hf_baseline.py lora 2>&1 | show
