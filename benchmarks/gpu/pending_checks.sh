#!/usr/bin/env bash
# What has not run on a GPU yet (end of session 4), in order of what it unblocks; one H200 unless noted.
#   OUT=/some/dir bash benchmarks/gpu/pending_checks.sh
# 1. Issue 5: the longest QLoRA context the planner now fits in 8 GiB (53,248 with recomputed norms; the 66,560
#    run measured 9.91 GiB, which is what the estimate was corrected with).
# 2. Issue 6: E2B QLoRA 8K with graphs + compiled layers + chunked recomputed norms + tiled MLP (<= 4.5 GiB and
#    >= 15,000 tok/s in one configuration?); session 4's run of it ended without output.
# 3. Issue 10: the attention sweep (new backward variants: correct on the H200, not yet timed).
# 4. Issue 9: 31B QLoRA beside Unsloth from one pre-quantized checkpoint (~17 GB on disk, several minutes).
# 5. The compiled-layers GPU test (needs > 100 s).
# 6. (nvidia-h200-x2, a separate call) issue 9's scale-out: E4B and 31B QLoRA 8K on 1 vs 2 GPUs (DDP), 26B-A4B
#    LoRA 16-bit with FSDP2 on 2 GPUs, each with the planner's per-GPU prediction beside the measured peak:
#    python3 benchmarks/gpu/scaleout.py --geometry e4b --random-weights --nproc 1,2 --seq 8192 --steps 8 --json $OUT/s.jsonl
#    python3 benchmarks/gpu/scaleout.py --geometry 31b --random-weights --nproc 1,2 --seq 8192 --steps 6 --json $OUT/s.jsonl
#    python3 benchmarks/gpu/scaleout.py --geometry 26b-a4b --random-weights --mode lora16 --distributed fsdp \
#      --nproc 2 --seq 2048 --steps 6 --json $OUT/s.jsonl
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ANCHOR_OUT=$OUT
B="python3 -m slimtune bench --attention slimtune --json $OUT/ours.jsonl"
show() { grep -E '"probe": "slimtune"|^memory|rror' | cut -c1-460; }
timeout 120 $B --geometry e2b --mode qlora --seq 53248 --steps 3 --max-memory 8GiB --recompute-norms 2>&1 | show
timeout 150 $B --geometry e2b --mode qlora --seq 8192 --cuda-graphs --compile --recompute-norms --mlp-chunk-size 2048 \
  > "$OUT/all_switches_8k.log" 2>&1; echo "8K all switches rc=$?"; show < "$OUT/all_switches_8k.log"; tail -3 "$OUT/all_switches_8k.log"
timeout 200 python3 benchmarks/kernels/bench_flash_attention.py --sweep-only --workers 8 --budget-s 185 \
  --json "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1; grep best_per_kernel "$OUT/sweep.log" | cut -c1-600
timeout 240 python3 benchmarks/gpu/prequantized_checkpoint.py --geometry 31b --out /tmp/g31b --no-tokenizer
timeout 60 $B --geometry 31b --mode qlora --seq 2048 2>&1 | show
# Unsloth's Triton cache from session 4's E2B run (carry .anchors): saves compile time for E2B shapes only
[ -f .anchors/unsloth_cache.tgz ] && tar xzf .anchors/unsloth_cache.tgz -C /
TRITON_CACHE_DIR=/tmp/ind/triton TORCHINDUCTOR_CACHE_DIR=/tmp/ind \
  timeout 400 python3 benchmarks/gpu/anchors_geometry.py --checkpoint /tmp/g31b --probe unsloth --runs qlora:2048 2>&1 \
  | grep '"probe"'
# 7. Issue 6's final table: E4B with both anchors in one call (HF needs ~2 min, Unsloth ~6), then ours:
#    python3 benchmarks/gpu/anchors_geometry.py --geometry e4b --probe hf --runs qlora:2048,qlora:8192,lora16:2048
#    python3 benchmarks/gpu/anchors_geometry.py --geometry e4b --probe unsloth --runs qlora:2048,qlora:8192,lora16:2048
timeout 240 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/train/test_gpu_paths.py > "$OUT/tests_compiled.log" 2>&1
echo "compiled rc=$?"; tail -3 "$OUT/tests_compiled.log" | cut -c1-300
