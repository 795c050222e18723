#!/usr/bin/env bash
# Session 3, call 1: GPU tests not run since session 2's last changes (streaming loader on CUDA, flash attention
# after the single-path refactor, compiled path after the mask fix), planner calibration on E4B and at 32K,
# 31B QLoRA at 2K, the longest context in 8 GiB, and a kernel-level profile of the 2K QLoRA step.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, triton, bitsandbytes as b; print(torch.__version__, transformers.__version__, triton.__version__, b.__version__)"
T="-q -p no:cacheprovider --continue-on-collection-errors --tb=short -rfE"
timeout 170 python3 -m pytest $T -n 6 -m gpu tests/kernels tests/memory/test_memory_switches_gpu.py \
  tests/train/test_gpu_multimodal.py tests/models/test_stream_load_gpu.py > "$OUT/tests_gpu.log" 2>&1
echo "gpu tests rc=$?"; tail -15 "$OUT/tests_gpu.log" | cut -c1-400
timeout 100 python3 -m pytest $T -m gpu tests/train/test_gpu_paths.py > "$OUT/tests_compiled.log" 2>&1
echo "compiled tests rc=$?"; tail -15 "$OUT/tests_compiled.log" | cut -c1-400
J=$OUT/bench.jsonl
b() { local t=$1; shift; timeout "$t" python3 -m slimtune bench --json "$J" "$@" 2>&1 | grep -E '^\{"probe": "slimtune"|memory|Error' | cut -c1-420; }
b 150 --geometry e4b --mode qlora --seq 2048,8192,32768 --attention slimtune
b 50 --geometry e2b --mode qlora --seq 32768 --attention slimtune
b 80 --geometry e2b --mode qlora --seq 53248 --steps 3 --attention slimtune --max-memory 8GiB
echo done
