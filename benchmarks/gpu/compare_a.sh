#!/usr/bin/env bash
# GPU call A: GPU correctness tests, our benchmark variants, then the HF+PEFT(+bnb) anchors — one card, one run.
set -uo pipefail
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ANCHOR_OUT=$OUT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 150 python3 -m pytest -q -x -m gpu tests/train/test_gpu_paths.py tests/kernels 2>&1 | tail -4
B="python3 -m slimtune bench --geometry e2b --json $OUT/ours.jsonl"
timeout 120 $B --mode qlora,lora16 --seq 2048,8192 --attention slimtune 2>&1 | grep '"probe"'
timeout 200 $B --mode qlora,lora16 --seq 2048,8192 --attention slimtune --compile 2>&1 | grep '"probe"'
timeout 240 python3 .anchors/probe_hf_baseline.py lora qlora 2>&1 | grep '"probe"' | cut -c1-400
