#!/usr/bin/env bash
# Memory-planner calibration on one H200: measured peak beside the predicted one (`predicted_gib` in each record).
#
# Runs `slimtune bench` (QLoRA, batch 1, r=16, 6 steps) on E2B and E4B at 2K, 8K and 32K, with training's
# attention (slimtune, O(T)) and with SDPA (the bench default; its dense sliding-window mask grows as T², so
# 32K-SDPA is where that term gets checked). Results go to $OUT/planner_calibration.jsonl; copy it to
# benchmarks/results_gpu<N>_planner.jsonl and tests/memory/test_calibration.py checks every record (within 10%).
# Refit FIXED_OVERHEAD_BYTES / LAYER_WORKING_SET_SCALE in slimtune/memory/estimate.py if a record is off.
#
# Usage (device machine, repository root): OUT=/some/dir bash benchmarks/gpu/planner_calibration.sh
# Each configuration gets its own process and time limit, so one OOM or hang does not cost the rest. All four take
# ~10-15 min; to stay under a 10-minute device call, split them: GEOS=e2b ... then GEOS=e4b ... (SEQS likewise).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
JSON=$OUT/planner_calibration.jsonl

# one line per record: measured vs predicted peak
SHOW='
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    peak, pred = r.get("peak_gib"), r.get("predicted_gib")
    if peak is None:
        print(r.get("variant"), r.get("seq"), str(r.get("error", ""))[:200])
        continue
    err = "%+.1f%%" % (100 * (pred / peak - 1)) if pred else "n/a"
    print("%s %s %6d %8s: measured %.3f GiB, predicted %s GiB (%s)"
          % (r["variant"], r["mode"], r["seq"], r["options"]["attention"], peak, pred, err))'

run() {  # run NAME TIMEOUT_S bench-args...
  local name=$1 t=$2; shift 2
  timeout "$t" python3 -m slimtune bench --json "$JSON" --mode qlora "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep '"probe": "slimtune"' "$OUT/$name.log" | python3 -c "$SHOW"
  [ $rc -eq 0 ] || { echo "$name: exit $rc"; grep -v Warning "$OUT/$name.log" | tail -3 | cut -c1-300; }
}

for geo in ${GEOS:-e2b e4b}; do
  run "${geo}_slimtune" 240 --geometry "$geo" --seq "${SEQS:-2048,8192,32768}" --attention slimtune
  run "${geo}_sdpa" 240 --geometry "$geo" --seq "${SEQS:-2048,8192,32768}" --attention sdpa
done
echo "records: $(wc -l < "$JSON") in $JSON"
