#!/usr/bin/env bash
# Session 4, call 1 (nvidia-h200-x2): Unsloth on GPU 1 for the whole call while GPU 0 runs ours (graphs, + compiled
# layers at 8K) and HF+PEFT, so all three come from one call on one host; then issue 5's 32K calibration and the
# longest 8 GiB context with recomputed norms. Unsloth's compile caches come back (tgz) for a later call.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ANCHOR_OUT=$OUT
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, transformers, triton, peft; print(torch.__version__, transformers.__version__, triton.__version__, peft.__version__)" | tee -a "$OUT/env.txt"
( export CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind TRITON_CACHE_DIR=/tmp/ind/triton
  ANCHOR_RUNS=${UNSLOTH_RUNS:-3} timeout ${UNSLOTH_S:-470} python3 .anchors/probe_unsloth.py > "$OUT/unsloth.log" 2>&1
  echo "unsloth rc=$?" >> "$OUT/unsloth.log"
  tar czf /tmp/uc.tgz -C / tmp/ind $(ls -d unsloth_compiled_cache 2>/dev/null) 2>/dev/null
  [ "$(stat -c %s /tmp/uc.tgz)" -lt 16000000 ] && cp /tmp/uc.tgz "$OUT/unsloth_cache.tgz" ) &
UP=$!
export CUDA_VISIBLE_DEVICES=0
B="python3 -m slimtune bench --geometry e2b --attention slimtune --json $OUT/ours.jsonl"
show() { grep '"probe"' | cut -c1-330; }
timeout 50 $B --mode qlora --seq 2048,8192 --cuda-graphs 2>&1 | show
timeout 25 $B --mode lora16 --seq 2048 --cuda-graphs 2>&1 | show
timeout 120 $B --mode qlora --seq 8192 --cuda-graphs --compile 2>&1 | show
timeout 60 python3 .anchors/probe_hf_baseline.py qlora 2>&1 | show
PYTHONPATH=$PWD timeout 50 python3 .anchors/probe_hf_baseline.py lora 2>&1 | show
echo "--- issue 5: 32K calibration (eager, planner defaults), longest 8 GiB context with recomputed norms"
timeout 60 $B --mode qlora --seq 32768 --steps 3 2>&1 | grep -E '"probe"|^memory|predicted' | cut -c1-330
timeout ${LONG_S:-130} $B --mode qlora --seq 67584 --steps 3 --max-memory 8GiB --recompute-norms 2>&1 \
  | grep -E '"probe"|^memory|predicted|rror' | cut -c1-330
wait $UP; echo "--- unsloth"; grep -E '"probe"|rc=' "$OUT/unsloth.log" | cut -c1-330; ls -la "$OUT"
