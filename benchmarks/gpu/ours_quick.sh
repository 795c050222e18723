#!/usr/bin/env bash
# GPU smoke run: our benchmark on E2B text (QLoRA and LoRA 16-bit at 2K/8K) + the GPU kernel tests.
set -uo pipefail
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
timeout 240 python3 -m slimtune bench --geometry e2b --mode qlora,lora16 --seq 2048,8192 --json $OUT/ours.jsonl 2>&1 | grep -v Warning
timeout 120 python3 -m pytest -q -x -m gpu tests/kernels/test_linear_cross_entropy.py 2>&1 | tail -15
