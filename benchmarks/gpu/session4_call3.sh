#!/usr/bin/env bash
# Session 4, call 3 (one H200, the last of the session's device time):
# 1. correctness in parallel (untimed): recomputed norms (fp32-referenced, now chunked), grouped MoE experts, the
#    attention kernels after the backward restructuring (defaults + variants), the training loop's captured path;
# 2. issue 5: the longest QLoRA context the planner fits in 8 GiB with recomputed norms (66,560), measured;
# 3. issue 9: 26B-A4B QLoRA + expert LoRA at 2K with grouped experts and 8-bit AdamW (target <= 20 GiB);
# 4. issue 6: E2B QLoRA 8K with graphs + compiled layers + recomputed (chunked) norms + tiled MLP 2048.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
T="-q -p no:cacheprovider --tb=short -rfE -m gpu"
python3 -m slimtune tiny-model /tmp/tm --variant e2b --size demo >/dev/null 2>&1
(timeout 110 python3 -m pytest $T -n 6 tests/kernels/test_flash_attention.py > "$OUT/t_attn.log" 2>&1; echo "attention rc=$?" >> "$OUT/t_attn.log") &
(timeout 110 python3 -m pytest $T -s tests/adapt/test_experts_grouped_gpu.py > "$OUT/t_moe.log" 2>&1; echo "moe rc=$?" >> "$OUT/t_moe.log") &
(timeout 110 python3 -m pytest $T tests/memory/test_memory_switches_gpu.py -k recomputed > "$OUT/t_norm.log" 2>&1; echo "norms rc=$?" >> "$OUT/t_norm.log") &
(timeout 110 python3 -m slimtune train --model /tmp/tm --text-only --data slimtune/data/default_data.jsonl --output /tmp/run-g \
   --max-steps 40 --lr 1e-3 --load-in-4bit --packing --max-seq-length 256 --grad-accum 2 --eval-fraction 0.1 \
   --eval-steps 20 --cuda-graphs --recompute-norms > "$OUT/t_loop.log" 2>&1; echo "loop rc=$?" >> "$OUT/t_loop.log") &
wait
for f in attn moe norm; do tail -6 "$OUT/t_$f.log" | grep -E "passed|failed|rc=|FAILED|Error" | cut -c1-300; done
grep -E "one 26B-A4B expert layer" "$OUT/t_moe.log" | cut -c1-300
grep -aE "step +(1|10|20)/|eval loss|rror|rc=" "$OUT/t_loop.log" | tail -6 | cut -c1-250
B="python3 -m slimtune bench --attention slimtune --json $OUT/ours.jsonl"
show() { grep -E '"probe": "slimtune"|^memory|rror' | cut -c1-460; }
timeout 115 $B --geometry e2b --mode qlora --seq 66560 --steps 3 --max-memory 8GiB --recompute-norms 2>&1 | show
timeout 110 $B --geometry 26b-a4b --mode qlora --seq 2048 --steps 4 --finetune-experts --optimizer adamw8bit \
  --experts-impl grouped 2>&1 | show
timeout 115 $B --geometry e2b --mode qlora --seq 8192 --cuda-graphs --compile --recompute-norms --mlp-chunk-size 2048 2>&1 | show
