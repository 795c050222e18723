#!/usr/bin/env bash
# Session 2, call 1: GPU tests, CLI training on CUDA with the GPU defaults, and a profile of where the step goes.
set -uo pipefail
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -15
python3 -m slimtune tiny-model /tmp/tm --variant e2b --size demo >/dev/null
for dt in bfloat16 float16; do
  timeout 90 python3 -m slimtune train --model /tmp/tm --data slimtune/data/default_data.jsonl --output /tmp/run-$dt \
    --max-steps 40 --lr 1e-3 --load-in-4bit --dtype $dt 2>&1 | grep -E "step +(1|40)/|Error|error" | tail -4
done
timeout 100 python3 benchmarks/gpu/profile_step.py --mode qlora --seq 2048 --attention slimtune --rows 25 2>&1 | grep -v Warn | cut -c1-200
timeout 120 python3 benchmarks/gpu/profile_step.py --mode qlora --seq 8192 --attention slimtune --rows 25 2>&1 | grep -v Warn | cut -c1-200
timeout 120 python3 benchmarks/gpu/profile_step.py --mode qlora --seq 2048 --attention slimtune --compile --rows 15 2>&1 | grep -v Warn | cut -c1-200
