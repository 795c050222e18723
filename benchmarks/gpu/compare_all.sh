#!/usr/bin/env bash
# One GPU call: our GPU-path correctness test, our benchmark, then the Unsloth and HF+PEFT anchors (same card).
set -uo pipefail
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ANCHOR_OUT=$OUT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 100 python3 -m pytest -q -x -m gpu tests/train/test_gpu_paths.py 2>&1 | tail -3
timeout 160 python3 -m slimtune bench --geometry e2b --json $OUT/ours.jsonl --mode qlora,lora16 --seq 2048,8192 \
  --attention slimtune --compile 2>&1 | grep '"probe"' | cut -c1-330
timeout 200 python3 .anchors/probe_unsloth.py 2>&1 | grep '"probe"' | cut -c1-330
timeout 130 python3 .anchors/probe_hf_baseline.py lora qlora 2>&1 | grep '"probe"' | cut -c1-330
