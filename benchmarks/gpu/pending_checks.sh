#!/usr/bin/env bash
# What has not run on a GPU yet (end of session 4), as calls of < 10 minutes each, most important first.
#   OUT=/some/dir bash benchmarks/gpu/pending_checks.sh A      (carry .gpu-site and .anchors)
# A (one H200, ~8 min): issue 5's longest 8 GiB context as now planned (53,248 tokens with recomputed norms; the
#   66,560 run measured 9.91 GiB, which corrected the estimate); issue 6's 8K row with every capturable switch
#   (graphs + compiled layers + chunked recomputed norms + tiled MLP 2048: <= 4.5 GiB and >= 15,000 tok/s?), whose
#   session-4 run ended without output; the compiled-layers GPU test (> 100 s).
# B (one H200, ~8 min): issue 10's attention sweep (the new backward variants are correct on the H200, untimed);
#   issue 6's E4B rows for ours and HF+PEFT.
# C (one H200, ~9 min): issue 9's 31B QLoRA beside Unsloth from one pre-quantized checkpoint (~17 GB).
# D (one H200, ~9 min): issue 6's E4B rows for Unsloth (its compile alone takes ~5 min).
# E (nvidia-h200-x2, ~9 min): issue 9's scale-out with the per-GPU prediction beside rank 0's measured peak.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ANCHOR_OUT=$OUT
B="python3 -m slimtune bench --attention slimtune --json $OUT/ours.jsonl"
show() { grep -E '"probe": "(slimtune|scaleout|unsloth|hf_[a-z0-9_]*)"|^memory|rror' | cut -c1-460; }
unsloth_cache() {  # Unsloth's Triton cache from session 4's E2B run: saves compile time for E2B shapes only
  [ -f .anchors/unsloth_cache.tgz ] && tar xzf .anchors/unsloth_cache.tgz -C /
  export TRITON_CACHE_DIR=/tmp/ind/triton TORCHINDUCTOR_CACHE_DIR=/tmp/ind
}
case "${1:?which call: A B C D E}" in
A)
  timeout 120 $B --geometry e2b --mode qlora --seq 53248 --steps 3 --max-memory 8GiB --recompute-norms 2>&1 | show
  timeout 150 $B --geometry e2b --mode qlora --seq 8192 --cuda-graphs --compile --recompute-norms \
    --mlp-chunk-size 2048 > "$OUT/all_switches_8k.log" 2>&1; echo "8K all switches rc=$?"
  show < "$OUT/all_switches_8k.log"; tail -3 "$OUT/all_switches_8k.log" | cut -c1-300
  timeout 240 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/train/test_gpu_paths.py \
    > "$OUT/tests_compiled.log" 2>&1; echo "compiled rc=$?"; tail -3 "$OUT/tests_compiled.log" | cut -c1-300 ;;
B)
  timeout 330 bash benchmarks/kernels/attention_device_run.sh "$OUT" --sweep-only > "$OUT/attention.log" 2>&1
  echo "attention rc=$?"; grep best_per_kernel "$OUT/attention.log" | cut -c1-800
  timeout 70 $B --geometry e4b --mode qlora,lora16 --seq 2048,8192 --cuda-graphs 2>&1 | show
  timeout 150 python3 benchmarks/gpu/anchors_geometry.py --geometry e4b --probe hf \
    --runs qlora:2048,qlora:8192,lora16:2048 2>&1 | show ;;
C)
  timeout 240 python3 benchmarks/gpu/prequantized_checkpoint.py --geometry 31b --out /tmp/g31b --no-tokenizer
  timeout 60 $B --geometry 31b --mode qlora --seq 2048 2>&1 | show
  unsloth_cache
  timeout 280 python3 benchmarks/gpu/anchors_geometry.py --checkpoint /tmp/g31b --probe unsloth \
    --runs qlora:2048 2>&1 | show ;;
D)
  unsloth_cache
  timeout 540 python3 benchmarks/gpu/anchors_geometry.py --geometry e4b --probe unsloth \
    --runs qlora:2048,qlora:8192,lora16:2048 2>&1 | show ;;
E)
  S="python3 benchmarks/gpu/scaleout.py --random-weights --json $OUT/scaleout.jsonl"
  timeout 200 $S --geometry e4b --nproc 1,2 --seq 8192 --steps 8 2>&1 | show
  timeout 200 $S --geometry 31b --nproc 1,2 --seq 8192 --steps 6 2>&1 | show
  timeout 150 $S --geometry 26b-a4b --mode lora16 --distributed fsdp --nproc 2 --seq 2048 --steps 6 2>&1 | show ;;
*) echo "unknown call $1: A B C D E"; exit 2 ;;
esac
