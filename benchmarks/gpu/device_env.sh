# Sourced by the device-call scripts (pending_checks.sh, session5_call*.sh): the environment and helpers they all
# use. Run from the repository root on the GPU box, with .gpu-site (and .anchors for the anchor probes) carried.
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ANCHOR_OUT=$OUT
B="python3 -m slimtune bench --attention slimtune --json $OUT/ours.jsonl"
# one line per result of ours and of the anchors, plus the planner's lines and errors
show() { grep -E '"probe": "(slimtune|scaleout|unsloth|hf_[a-z0-9_]*)"|^memory|rror' | cut -c1-460; }
stamp() { echo "[$(date +%T)] $*"; }
ts() { echo "$1 $(date +%s.%N)" | tee -a "$OUT/times.txt"; }
unsloth_cache() {  # Unsloth's Triton cache from session 4's E2B run: saves compile time for E2B shapes only
  [ -f .anchors/unsloth_cache.tgz ] && tar xzf .anchors/unsloth_cache.tgz -C /
  export TRITON_CACHE_DIR=/tmp/ind/triton TORCHINDUCTOR_CACHE_DIR=/tmp/ind
}
