#!/usr/bin/env bash
# Session 4, call 2 (one H200): the fixed recomputed-norms GPU test; issue 6's 8K row with every memory switch that
# a graph can capture (graphs + compiled layers + recomputed norms + tiled MLP 2048: planned <= 4.5 GiB); issue 5's
# E2B 32K calibration and longest 8 GiB contexts (planner defaults: 53,248; with recomputed norms: 67,584); the
# training loop's captured path on the tiny demo model.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
T="-q -p no:cacheprovider --tb=short -rfE -m gpu"
timeout 60 python3 -m pytest $T tests/memory/test_memory_switches_gpu.py -k recomputed > "$OUT/tests.log" 2>&1
echo "recompute test rc=$?"; tail -4 "$OUT/tests.log" | cut -c1-300
B="python3 -m slimtune bench --geometry e2b --attention slimtune --json $OUT/ours.jsonl"
show() { grep -E '"probe": "slimtune"|^memory|predicted|rror' | cut -c1-420; }
timeout 130 $B --mode qlora --seq 8192 --cuda-graphs --compile --recompute-norms --mlp-chunk-size 2048 2>&1 | show
timeout 55 $B --mode qlora --seq 32768 --steps 3 2>&1 | show
timeout 95 $B --mode qlora --seq 53248 --steps 3 --max-memory 8GiB 2>&1 | show
timeout 125 $B --mode qlora --seq 67584 --steps 3 --max-memory 8GiB --recompute-norms 2>&1 | show
python3 -m slimtune tiny-model /tmp/tm --variant e2b --size demo >/dev/null 2>&1
for extra in "--cuda-graphs --recompute-norms"; do
  timeout 60 python3 -m slimtune train --model /tmp/tm --data slimtune/data/default_data.jsonl --output /tmp/run-g \
    --max-steps 40 --lr 1e-3 --load-in-4bit --packing --max-seq-length 256 --grad-accum 1 --eval-fraction 0.1 \
    --eval-steps 20 $extra > "$OUT/train_loop.log" 2>&1; echo "train loop ($extra) rc=$?"
  grep -aE "step +(1|20|40)/|eval|rror|predicted" "$OUT/train_loop.log" | tail -6 | cut -c1-250
done
