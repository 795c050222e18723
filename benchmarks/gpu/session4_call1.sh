#!/usr/bin/env bash
# Session 4, call 1 (one H200): Unsloth's E2B QLoRA 2K/8K anchor and ours in one call. Unsloth starts first; while
# it loads and compiles (> 200 s before its first timed step, seen in session 3) GPU 0 also runs our untimed GPU
# correctness tests. Timestamps of both are logged so an overlap with Unsloth's timed steps would show. Then ours,
# alone on the card. Unsloth's compile caches come back (tgz, if < 16 MB) for a later call.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ANCHOR_OUT=$OUT
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, transformers, triton, peft; print(torch.__version__, transformers.__version__, triton.__version__, peft.__version__)" | tee -a "$OUT/env.txt"
ts() { echo "$1 $(date +%s.%N)" | tee -a "$OUT/times.txt"; }
ts start
( export TORCHINDUCTOR_CACHE_DIR=/tmp/ind TRITON_CACHE_DIR=/tmp/ind/triton
  ANCHOR_RUNS=${UNSLOTH_RUNS:-2} timeout ${UNSLOTH_S:-370} python3 .anchors/probe_unsloth.py 2>&1 \
    | while IFS= read -r l; do echo "$(date +%s.%N) $l"; done > "$OUT/unsloth.log"
  ts unsloth_end
  tar czf /tmp/uc.tgz -C / tmp/ind $(ls -d unsloth_compiled_cache 2>/dev/null) 2>/dev/null
  [ "$(stat -c %s /tmp/uc.tgz)" -lt 16000000 ] && cp /tmp/uc.tgz "$OUT/unsloth_cache.tgz" ) &
UP=$!
T="-q -p no:cacheprovider --tb=short -rfE -m gpu"
timeout 150 python3 -m pytest $T tests/train/test_cuda_graph.py tests/memory/test_memory_switches_gpu.py \
  tests/adapt/test_experts_nf4_gpu.py > "$OUT/tests.log" 2>&1; echo "gpu tests rc=$?"; tail -12 "$OUT/tests.log" | cut -c1-300
ts tests_end
wait $UP; echo "--- unsloth"; grep -E '"probe"|rc=' "$OUT/unsloth.log" | cut -c1-400; tail -3 "$OUT/unsloth.log" | cut -c1-300
B="python3 -m slimtune bench --geometry e2b --attention slimtune --json $OUT/ours.jsonl"
show() { grep '"probe"' | cut -c1-330; }
ts ours_start
timeout 45 $B --mode qlora --seq 2048,8192 --cuda-graphs 2>&1 | show
timeout 25 $B --mode lora16 --seq 2048 --cuda-graphs 2>&1 | show
timeout 115 $B --mode qlora --seq 8192 --cuda-graphs --compile 2>&1 | show
ts end; ls -la "$OUT"
