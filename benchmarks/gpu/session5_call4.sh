#!/usr/bin/env bash
# Session 5, call 4 (one H200, the session's last ~10 min): issue 5's 49,920-token 8 GiB run again with room for
# its ~18 s steps (call 3's 90 s slot ended after the plan), then issue 10's attention-backward sweep.
#   OUT=/some/dir bash benchmarks/gpu/session5_call4.sh      (carry .gpu-site)
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
stamp "longest in 8 GiB"
timeout 170 python3 -m slimtune bench --attention slimtune --json "$OUT/ours.jsonl" --geometry e2b --mode qlora \
  --seq 49920 --steps 3 --max-memory 8GiB --recompute-norms 2>&1 | grep -E '"probe"|^memory|rror' | cut -c1-400
stamp "attention sweep"
SWEEP_BUDGET=120 BENCH_TIMEOUT=140 timeout 300 bash benchmarks/kernels/attention_device_run.sh "$OUT" --sweep-only \
  > "$OUT/attention.log" 2>&1; echo "attention rc=$?"
grep -E "pytest rc|passed|failed|best_per_kernel" "$OUT/attention.log" | cut -c1-1500
stamp done
