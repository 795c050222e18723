#!/usr/bin/env bash
# GPU calls of < 10 minutes each. A, B, C and C2 ran in session 6, H, I and G in session 7 (BENCHMARKS.md); still to
# run, most important first (session 8 ran J, K, D2 and D; session 9 L, O and U26; session 10 P, Q, R, S, M;
# session 11 T, X, Y, N, W2, Y2; session 12 B2, N2, V, Z, E): E2 (two GPUs) or B3 (one), K1 (attention), F.
#   OUT=/some/dir bash benchmarks/gpu/pending_checks.sh A      (carry .gpu-site and .anchors)
# A (one H200, ~9.5 min): issue 6's E2B rows in ONE call with Unsloth: Unsloth QLoRA 2K/8K first (its ~330 s of
#   load + compile overlap our untimed GPU tests), then ours alone: 2K graphs, LoRA 16-bit 2K graphs, and the 8K
#   config that met both 8K bars in session 5 (graphs + compiled layers + tiled MLP 2048: 4.34 GiB, 15.8K tok/s),
#   with a 2-step profile of the 2K graphs step (issue 6's post-graph breakdown).
# B (one H200, ~9 min): issue 6's E4B rows, Unsloth (QLoRA 2K/8K, LoRA 16-bit 2K) then ours, with a profile of
#   our 2K graphed step.
# C (one H200, ~8 min): issue 6's 32K rows (Unsloth E2B QLoRA; ours E2B QLoRA + LoRA 16-bit; C2: E4B), Unsloth's
#   E2B LoRA 16-bit 2K beside ours, and the post-graph profile of our E2B 2K QLoRA step.
# I (one H200, ~9 min): issue 6's E2B rows with BOTH anchors in one call (session 6 had Unsloth, session 3 HF+PEFT):
#   Unsloth QLoRA 2K/8K, then HF+PEFT QLoRA 2K/8K and LoRA 16-bit 2K/8K, then ours, each alone on the card.
# H (one H200, ~7 min): the fused RMSNorm kernels (slimtune/kernels/rms_norm.py, session 6, never run on a GPU):
#   their GPU tests, the micro-benchmark, and E2B QLoRA steps with and without --recompute-norms (which now runs
#   them), and the attention's fallback to smaller launch shapes on a real OutOfResources. Predicted (written before any measurement): graphed 2K 158.7 ms -> ~135 ms/step (~15,000 tok/s; the
#   norms' unfused passes are ~25 ms of the 152 ms GPU time); eager 2K (CPU-bound) 25-35 % faster (42 % fewer
#   launching ops); 8K graphs+compile+MLP 2048: 13,958 tok/s with the torch norm -> about the 15.8K of no
#   recompute, at session 5's 4.18 GiB.
# G (one H200, ~9.5 min): the LoRA 16-bit rows Unsloth never finished in B and C (its bf16 run came last and its
#   compile outlived the slot): Unsloth E2B LoRA 16-bit 2K/8K alone first, then ours; then issue 10's attention
#   table with the graphed fwd+bwd time beside the eager one (T <= 32K).
# J (one H200, ~5 min): session 7's eager entry points (autograd.Functions instead of the custom ops' dispatch): all
#   attention and RMSNorm GPU tests (the session-7 run of them was cut by its time limit), then the A/B of the two
#   entry points alternating in one process (benchmarks/gpu/eager_host_profile.py), then the eager and graphed 2K
#   bench rows, and the RMSNorm micro-benchmark with its new graphed (device-time) column. Predicted before measuring: eager fwd+bwd host time −150 to −250 ms of ~600–780 (the custom ops'
#   dispatch measured 153 ms in backend_impl plus ~100 ms in their autograd nodes), graphed step unchanged.
#   Last, --checkpoint-layers 17 and 0 (session 7; predicted from the graphed 2K profile, whose forward recompute
#   is ~1/3 of the matmul, attention-forward, elementwise and dequantize time: ~33 ms of 116): k=17 ~100 ms/step
#   (~20,500 tok/s) at the estimate's 8.1 GiB; k=0 ~83 ms (~24,700 tok/s) at 11.4 GiB.
# D2 (one H200, ~9 min): issue 6's 26B-A4B beside Unsloth: one pre-quantized checkpoint (NF4 attention/MLP; the
#   3-D experts stay bf16 as transformers loads them, ~48 GB), Unsloth QLoRA 2K on it, ours with expert LoRA.
# D (one H200, ~9 min): issue 9's 31B QLoRA beside Unsloth from one pre-quantized checkpoint (~17 GB).
# E (nvidia-h200-x2, ~9 min): issue 9's scale-out with the per-GPU prediction beside rank 0's measured peak.
# F (one H200, ~9 min): issue 5's anchor at 8 GiB: Unsloth's E2B QLoRA at 4K/5K/6K (its limit lies between 2K,
#   7.19 GiB, and 8K, 9.20 GiB; ours: 49,920 tokens in 7.91 GiB).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
python3 -c "import torch, transformers, triton, peft; print(torch.__version__, transformers.__version__, triton.__version__, peft.__version__)" | tee "$OUT/env.txt"
case "${1:?which call: A B C C2 I H G J K L O P Q R U26 M N D D2 E E2 B3 F T X Y W2 Y2 B2 N2 V W Z}" in
J)
  timeout 240 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/kernels/test_flash_attention_gpu.py \
    tests/kernels/test_rms_norm_kernel.py tests/kernels/test_flash_attention_fit.py 2>&1 | tail -3
  timeout 120 python3 benchmarks/gpu/eager_host_profile.py --rounds 4 2>&1 | grep -E "host|rror"
  timeout 40 $B --geometry e2b --mode qlora --seq 2048 2>&1 | show
  timeout 40 $B --geometry e2b --mode qlora --seq 2048 --cuda-graphs 2>&1 | show
  timeout 120 python3 benchmarks/kernels/bench_rms_norm.py --json "$OUT/rms_norm.json" 2>&1 | grep -E '^[{#]'
  for k in 17 0; do timeout 40 $B --geometry e2b --mode qlora --seq 2048 --cuda-graphs --checkpoint-layers $k 2>&1 | show; done ;;
K)  # after J: --checkpoint-layers with graphs (J found graphs reset it to all layers), and J's eager A/B again
  timeout 120 python3 benchmarks/gpu/eager_host_profile.py --rounds 8 2>&1 | grep -E "host|rror"
  for k in 17 8 0; do timeout 45 $B --geometry e2b --mode qlora --seq 2048 --cuda-graphs --checkpoint-layers $k 2>&1 | show; done
  python3 -c "import json,sys; [print(r['options']['checkpoint_layers'], r['peak_gib'], r.get('predicted_gib'), r['tok_s']) for r in map(json.loads, open(sys.argv[1]))]" "$OUT/ours.jsonl" ;;
L)  # session 8's open GPU checks: cuda_graphs auto end to end, and why activation offload costs 0.55 s/step on 31B
  timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/train/test_auto_graphs.py \
    tests/train/test_cuda_graph.py 2>&1 | tail -2
  timeout 90 $B --geometry 31b --mode qlora --seq 2048 --activation-offload --steps-profile 2 2>&1 \
    | tee "$OUT/ours_31b_offload.log" | show
  timeout 60 $B --geometry 31b --mode qlora --seq 2048 --optimizer adamw8bit 2>&1 | show
  timeout 60 $B --geometry 31b --mode qlora --seq 2048 --cuda-graphs --checkpoint-layers 30 2>&1 | show
  # the kernels' GPU tests again: session 8's review left the registered ops as their only entry point
  timeout 170 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/kernels/test_flash_attention_gpu.py \
    tests/kernels/test_rms_norm_kernel.py tests/kernels/test_flash_attention_fit.py 2>&1 | tail -3 ;;
O)  # after L: the fixed auto-graphs GPU test, then 31B with and without activation offload profiled with the host
    # calls that block (L: offload wall 1,595 ms/step vs 922 ms of GPU work), then the kernels' GPU tests (L's 170 s
    # were too short)
  timeout 90 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/train/test_auto_graphs.py \
    tests/bench/test_bench_profile.py 2>&1 | tail -2
  for o in "" "--activation-offload"; do timeout 90 $B --geometry 31b --mode qlora --seq 2048 $o --steps-profile 2 \
    2>&1 | tee -a "$OUT/ours_31b_profiles.log" | grep -vE "Warning|warn|^ *from|^ *\"\"\"" | grep -E "probe|profile|  " | cut -c1-160; done
  timeout 250 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/kernels/test_flash_attention_gpu.py \
    tests/kernels/test_rms_norm_kernel.py tests/kernels/test_flash_attention_fit.py 2>&1 | tail -3 ;;
P)  # session 9: graph buckets for unpacked runs (their GPU test: captured buckets replayed in mixed order equal
    # eager), MoE steps captured (the grouped experts path never syncs; 26B-A4B eager was host-bound: GPU busy
    # 410 of 1,332 ms/step) and 8-bit AdamW without bitsandbytes' per-parameter device syncs (531 per 26B step).
    # Predicted before measuring: 26B QLoRA + expert LoRA 2K graphed ~0.45-0.5 s/step (~4,000-4,500 tok/s, vs
    # eager 1,768 and Unsloth's 3,133 on bf16 experts), peak +0.5-1.5 GiB over eager's 22.08; adamw8bit eager
    # 26B ~1.5-2.5 % faster than before (the syncs' own host time) and 31B likewise.
  timeout 180 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/train/test_auto_graphs.py \
    tests/train/test_optimizer.py tests/bench/test_bench_profile.py tests/train/test_graph_buckets.py 2>&1 | tail -3
  timeout 150 $B --geometry 26b-a4b --mode qlora --seq 2048 --finetune-experts --steps 6 --cuda-graphs \
    --steps-profile 2 2>&1 | tee "$OUT/ours_26b_graphs.log" | grep -E '"probe"|^profile|^  [a-z]' | cut -c1-300
  timeout 90 $B --geometry 26b-a4b --mode qlora --seq 2048 --finetune-experts --steps 6 --optimizer adamw8bit \
    --steps-profile 2 2>&1 | grep -E '"probe"|^profile|x[0-9]+ +cuda' | cut -c1-300
  timeout 60 $B --geometry 26b-a4b --mode lora16 --seq 2048 --finetune-experts --steps 6 --cuda-graphs 2>&1 | show ;;
Q)  # after P passes: the unpacked default path end to end (real CLI runs on samples of every length up to 2K):
    # eager vs captured length buckets vs packed. Predicted before measuring: eager ~3-4K real tok/s (host-bound,
    # like the bench's 3.4-5K), buckets ~10-14K (graph speed less ~15-25 % bucket padding), packed ~15-17K.
  timeout 420 python3 benchmarks/gpu/unpacked_run.py --model random:e2b --seq 2048 --steps 60 \
    --json "$OUT/unpacked.jsonl" 2>&1 | cut -c1-400 ;;
R)  # does a run fit the card it is meant for? `--card-gib` caps the allocator (cached blocks and graph pools too) at
    # a smaller card's size. auto's HEADROOM (captures only when the prediction is <= 75 % of the card) is a guess;
    # these rows say whether 31B / 26B-A4B graphs fit a 24 GB card (predicted ~21 GiB) and E2B's an 8 GB one, and
    # whether compiled layers speed up the eager 26B-A4B step a 24 GB card would run (host-bound: GPU busy 31 %).
    # Predicted before measuring: every eager row fits; E2B graphs at 8 GiB fit; 31B graphs at 22.5 GiB uncertain;
    # 26B compiled eager 10-25 % faster than 2,465 tok/s (fewer launches in the norms and elementwise work).
  for g in "e2b --seq 2048 --card-gib 8 --cuda-graphs" "31b --seq 2048 --card-gib 22.5" \
      "31b --seq 2048 --card-gib 22.5 --cuda-graphs" \
      "26b-a4b --seq 2048 --card-gib 22.5 --finetune-experts --optimizer adamw8bit" \
      "26b-a4b --seq 2048 --card-gib 22.5 --finetune-experts --cuda-graphs"; do
    timeout 80 $B --mode qlora --steps 6 --geometry $g 2>&1 | show; done
  timeout 140 $B --mode qlora --steps 6 --geometry 26b-a4b --seq 2048 --finetune-experts --compile 2>&1 | show ;;
S)  # after P, Q and R (session 10): R's 31B rows ran out of memory while the bench built its random weights (the
    # tied lm_head was drawn as a second 262K-row table, through a 5.25 GiB float32 temporary; fixed), so again;
    # Q's packed row stayed eager (the planner could not read `random:e2b`; fixed), and auto now captures unpacked
    # runs too: the default path end to end. Predicted before measuring: 31B eager fits 22.5 GiB (20.5 measured
    # uncapped); 31B graphs do not (26B's graphs did not: 22.15 GiB peak uncapped); auto ~ Q's buckets (7.9K real
    # tok/s over the second half, captures included); packed ~15-17K.
  timeout 60 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/train/test_auto_graphs.py 2>&1 | tail -2
  for g in "31b --seq 2048 --card-gib 22.5" "31b --seq 2048 --card-gib 22.5 --cuda-graphs"; do
    timeout 90 $B --mode qlora --steps 6 --geometry $g 2>&1 | show; done
  timeout 300 python3 benchmarks/gpu/unpacked_run.py --model random:e2b --seq 2048 --steps 60 --variants auto,packed \
    --json "$OUT/unpacked.jsonl" 2>&1 | cut -c1-400 ;;
T)  # after S: the training loop's peak now starts at its first step (GPU test), the MoE capture test S's limit cut,
    # and the unpacked default (auto buckets) over a longer run, where the buckets' first captures weigh less.
    # Predicted before measuring: both tests pass; auto over 300 steps ~11-13K real tok/s (S's median step, 0.118 s
    # for 1,530 tokens, is ~13K), peak ~3.2 GiB.
  timeout 240 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/train/test_memory_switches.py \
    tests/train/test_auto_graphs.py tests/train/test_graph_buckets.py 2>&1 | tail -3  # buckets: 1 warm-up after the 1st
  timeout 240 python3 benchmarks/gpu/unpacked_run.py --model random:e2b --seq 2048 --steps 300 --variants auto \
    --json "$OUT/unpacked.jsonl" 2>&1 | cut -c1-400
  # where today's default graphed E2B step goes (the last breakdown predates the fused norms): the next levers
  timeout 60 $B --geometry e2b --mode qlora --seq 2048 --cuda-graphs --steps-profile 2 2>&1 \
    | grep -E '"probe"|^profile|^  [a-z]|^ +[0-9.]+ ms' | cut -c1-200 ;;
Z)  # issue 6's final table, its last gap: E4B LoRA 16-bit 32K, Unsloth alone first, then HF+PEFT (no .gpu-site),
    # then ours. Predicted before measuring: ours ~24 GiB / ~8,000 tok/s (s6 C2, torch norms: 25.19 / 7,117);
    # Unsloth ~35 GiB / ~3,000; HF out of memory or far slower.
  ( unsloth_cache; timeout 330 python3 benchmarks/gpu/anchors_geometry.py --geometry e4b --probe unsloth \
      --runs lora16:32768 > "$OUT/unsloth_e4b_lora16_32k.log" 2>&1 ); show < "$OUT/unsloth_e4b_lora16_32k.log"
  PYTHONPATH=$PWD timeout 100 python3 benchmarks/gpu/anchors_geometry.py --geometry e4b --probe hf \
    --runs lora16:32768 2>&1 | show
  timeout 150 $B --geometry e4b --mode lora16 --seq 32768 2>&1 | show ;;
U26)  # Unsloth alone on the 26B-A4B checkpoint (D2's Unsloth run did not finish in 280 s)
  timeout 150 python3 benchmarks/gpu/prequantized_checkpoint.py --geometry 26b-a4b --out /tmp/g26b --no-tokenizer
  unsloth_cache
  timeout 420 python3 benchmarks/gpu/anchors_geometry.py --checkpoint /tmp/g26b --probe unsloth \
    --runs qlora:2048 > "$OUT/u26.log" 2>&1; echo "rc=$?"; show < "$OUT/u26.log"; tail -3 "$OUT/u26.log" | cut -c1-300 ;;
M)  # issue 6's E4B rows with both anchors in one call (QLoRA 2K/8K; HF+PEFT QLoRA 2K), ours after them
  ts start
  ( unsloth_cache; timeout 300 python3 benchmarks/gpu/anchors_geometry.py --geometry e4b --probe unsloth \
      --runs qlora:2048,qlora:8192 > "$OUT/unsloth_e4b.log" 2>&1; ts unsloth_end ) &
  UP=$!; wait $UP; show < "$OUT/unsloth_e4b.log"
  timeout 90 python3 benchmarks/gpu/anchors_geometry.py --geometry e4b --probe hf --runs qlora:2048 2>&1 | show
  ts ours_start  # (HF+PEFT's LoRA 16-bit row moved to N: the timeouts here must sum to < 600 s)
  timeout 50 $B --geometry e4b --mode qlora,lora16 --seq 2048 --cuda-graphs 2>&1 | show
  timeout 130 $B --geometry e4b --mode qlora --seq 8192 --cuda-graphs --compile 2>&1 | show ;;
N)  # Unsloth's E4B LoRA 16-bit alone (its bf16 run never finished after other runs), HF+PEFT's 2K and 8K, then
    # ours at both (issue 6's final table: E4B LoRA 16-bit 2K/8K have no anchor yet)
  ( unsloth_cache; timeout 420 python3 benchmarks/gpu/anchors_geometry.py --geometry e4b --probe unsloth \
      --runs lora16:2048 > "$OUT/unsloth_e4b_lora16.log" 2>&1 ) ; show < "$OUT/unsloth_e4b_lora16.log"
  PYTHONPATH=$PWD timeout 90 python3 benchmarks/gpu/anchors_geometry.py --geometry e4b --probe hf \
    --runs lora16:2048,lora16:8192 2>&1 | show  # no .gpu-site: its torchao 0.15 breaks peft
  timeout 60 $B --geometry e4b --mode lora16 --seq 2048,8192 --cuda-graphs 2>&1 | show ;;
X)  # after T: MoE tokens routed to the experts and summed back with gathers instead of atomic scatter-adds
    # (index_add_ forward, index_put_ backward): the experts' GPU tests, then 26B-A4B graphed with a profile.
    # The routing weights are applied in the same pass (one batched (1 x k)(k x H) product per token) instead of
    # promoting the rows to fp32 first (a float BinaryFunctor, 11.7 ms / 60 calls, plus a cast back).
    # Predicted before measuring: tests pass; index kernels 22 ms -> ~3 ms and the fp32 multiply gone: ~408 -> ~380
    # ms GPU time, ~4,974 -> ~5,300 tok/s; peak unchanged or lower (22.15 GiB; no (T·k, H) fp32 copy).
  timeout 240 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/adapt/test_experts_grouped_gpu.py \
    tests/adapt/test_experts_capture.py tests/train/test_auto_graphs.py -k "experts or moe" 2>&1 | tail -3
  timeout 150 $B --geometry 26b-a4b --mode qlora --seq 2048 --finetune-experts --steps 6 --cuda-graphs \
    --steps-profile 2 2>&1 | tee "$OUT/ours_26b_graphs.log" | grep -E '"probe"|^profile|^  [a-z]|index' | cut -c1-300 ;;
Y)  # after X: CUDA graphs with 8-bit AdamW (forward + backward replayed, the 8-bit update eager after them): its GPU
    # test, then the two big models on a 24 GB card's allocator. Predicted before measuring: 26B-A4B expert LoRA
    # ~19.5-20 GiB (planner 19.94; eager 8-bit 19.33) at ~4,500-4,900 tok/s (graphed torch AdamW 4,974; eager 8-bit
    # 1,667-2,227); 31B ~20 GiB at ~2,100 (graphed torch AdamW 2,149 at 20.52); both fit 22.5 GiB.
  timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/train/test_graph_eager_update.py \
    2>&1 | tail -2
  for g in "26b-a4b --finetune-experts" "31b"; do
    timeout 150 $B --mode qlora --steps 6 --seq 2048 --card-gib 22.5 --cuda-graphs --optimizer adamw8bit \
      --geometry $g 2>&1 | show; done
  # session 10's graphed 26B-A4B reserved 26.7 GiB for a 22.15 GiB peak and did not fit the 22.5 cap: is that the
  # allocator's fragmentation? Expandable segments map one growing range instead of fixed blocks. Predicted: a
  # coin flip whether it then fits; if it does, slimtune's CLI could set it before CUDA starts.
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 150 $B --mode qlora --steps 6 --seq 2048 \
    --card-gib 22.5 --cuda-graphs --geometry 26b-a4b --finetune-experts 2>&1 | show ;;
W2)  # session 11, the last device minutes: W plus V's HF cell, all E2B 32K (Unsloth's E2B Triton cache is carried).
    # Predicted before measuring: ours LoRA 16-bit ~15 GiB / ~12,000 (s7: 15.08 / 12,010); Unsloth ~25 GiB / ~3,500;
    # HF+PEFT out of memory at both (its 8K took 42 GiB at LoRA 16-bit and 121 GiB at QLoRA).
  ( unsloth_cache; timeout 290 python3 benchmarks/gpu/anchors_geometry.py --geometry e2b --probe unsloth \
      --runs lora16:32768 > "$OUT/unsloth_e2b_lora16_32k.log" 2>&1 ); show < "$OUT/unsloth_e2b_lora16_32k.log"
  PYTHONPATH=$PWD timeout 60 python3 benchmarks/gpu/anchors_geometry.py --geometry e2b --probe hf \
    --runs lora16:32768 2>&1 | show
  timeout 60 python3 benchmarks/gpu/anchors_geometry.py --geometry e2b --probe hf --runs qlora:32768 2>&1 | show
  timeout 120 $B --geometry e2b --mode lora16 --seq 32768 2>&1 | show ;;
Y2)  # after Y (session 11): 31B with graphs and 8-bit AdamW ran out of memory at capture under the 22.5 GiB cap, with
    # 20.08 GiB allocated and 1.95 GiB reserved but unallocated (the allocator cannot release cached blocks while a
    # capture is under way; torch.cuda.graph empties the cache before, but split segments pinned by the gradients
    # and 8-bit states made during the warm-up stay). Expandable segments map free pages back. Predicted before
    # measuring: fits, peak ~20.3 GiB, reserved under 22.5, ~2,100 tok/s.
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 200 $B --mode qlora --steps 6 --seq 2048 \
    --card-gib 22.5 --cuda-graphs --optimizer adamw8bit --geometry 31b 2>&1 | show
  # run after it as its own call (session 11's last device minutes): does the allocator setting cost E2B speed?
  # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 100 $B --geometry e2b --mode qlora --seq 2048 --cuda-graphs
  # timeout 60 $B --geometry e2b --mode qlora --seq 2048 --cuda-graphs
  ;;
B2)  # after session 11: slimtune now imports with expandable segments (slimtune/utils/cuda_alloc.py) and auto's
    # headroom is peak + max(1.5 GiB, 7 %) <= usable memory (free + own, read on the device). Checks: the bucketed
    # graphs (several graphs, one pool) under expandable segments, and auto's usable-memory reading on a real GPU.
    # The training loop now reads each captured step's loss after launching the next (slimtune/train/
    # step_readback.py): the host's batch work and graph launch overlap the GPU (T's profile: 14 of 126 ms idle).
    # Predicted before measuring: tests pass; unpacked auto 15-16K real tok/s (T, synchronous: 14,394), its log
    # "auto: on"; packed auto ~17.5-18.5K (S, synchronous: 17,018; GPU busy 111 ms for 1,981 real tokens ~17.8K).
  timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/train/test_graph_buckets.py \
    tests/train/test_auto_graphs.py tests/train/test_graph_eager_update.py tests/train/test_step_readback.py \
    2>&1 | tail -3
  timeout 240 python3 benchmarks/gpu/unpacked_run.py --model random:e2b --seq 2048 --steps 300 \
    --variants auto,packed --json "$OUT/unpacked.jsonl" 2>&1 | cut -c1-400
  # compiled layers on top of graphs at 2K, never measured since the fused norms (s5: 19,665 when graphs alone
  # gave ~13K). Predicted: 19-21K (graphs alone today: 17,500), +0.1 GiB. If so, compile belongs in auto's choice.
  timeout 100 $B --geometry e2b --mode qlora --seq 2048 --cuda-graphs --compile 2>&1 | show ;;
N2)  # Unsloth's E4B LoRA 16-bit 8K alone (the final table's last Unsloth cell at 8K), ours after it
    # Predicted before measuring (session 12): Unsloth ~18 GiB / ~8,000 tok/s (its E4B LoRA16 2K: 15.48 / 5,572);
    # ours graphed ~12.9 GiB / ~12,500 (N, eager: 12.83 / 12,515; graphs help less at 8K).
  ( unsloth_cache; timeout 420 python3 benchmarks/gpu/anchors_geometry.py --geometry e4b --probe unsloth \
      --runs lora16:8192 > "$OUT/unsloth_e4b_lora16_8k.log" 2>&1 ) ; show < "$OUT/unsloth_e4b_lora16_8k.log"
  timeout 60 $B --geometry e4b --mode lora16 --seq 8192 --cuda-graphs 2>&1 | show ;;
V)  # issue 6's final table, 32K cells with Unsloth in the call (only ours measured so far): E4B QLoRA 32K, then
    # E2B QLoRA 32K for HF+PEFT (never run; its 8K took 121 GiB, so an out-of-memory record is expected).
    # Predicted before measuring: Unsloth E4B QLoRA 32K ~24 GiB / ~2,900 tok/s; ours ~19.5 GiB / ~7,400
    # (s6 C2: 19.70 / 7,076 with torch norms); HF out of memory.
  ( unsloth_cache; timeout 330 python3 benchmarks/gpu/anchors_geometry.py --geometry e4b --probe unsloth \
      --runs qlora:32768 > "$OUT/unsloth_e4b_32k.log" 2>&1 ); show < "$OUT/unsloth_e4b_32k.log"
  # (session 12: HF+PEFT's E2B QLoRA 32K already ran out of memory in session 11's W2, so it is not rerun here)
  timeout 120 $B --geometry e4b --mode qlora --seq 32768 2>&1 | show ;;
W)  # issue 6's final table, LoRA 16-bit 32K: Unsloth E2B alone, HF+PEFT (no .gpu-site: its torchao breaks peft),
    # then ours. Predicted before measuring: ours ~15 GiB / ~12,000 (s7: 15.08 / 12,010); Unsloth ~25 GiB /
    # ~3,500; HF out of memory (8K took 42 GiB).
  ( unsloth_cache; timeout 330 python3 benchmarks/gpu/anchors_geometry.py --geometry e2b --probe unsloth \
      --runs lora16:32768 > "$OUT/unsloth_e2b_lora16_32k.log" 2>&1 ); show < "$OUT/unsloth_e2b_lora16_32k.log"
  PYTHONPATH=$PWD timeout 90 python3 benchmarks/gpu/anchors_geometry.py --geometry e2b --probe hf \
    --runs lora16:32768 2>&1 | show
  timeout 120 $B --geometry e2b --mode lora16 --seq 32768 2>&1 | show ;;
A)
  ts start
  ( unsloth_cache; ANCHOR_RUNS=2 timeout 360 python3 .anchors/probe_unsloth.py 2>&1 \
      | while IFS= read -r l; do echo "$(date +%s.%N) $l"; done > "$OUT/unsloth.log"; ts unsloth_end ) &
  UP=$!
  timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/train/test_cuda_graph.py \
    tests/memory/test_memory_switches_gpu.py > "$OUT/tests.log" 2>&1; echo "gpu tests rc=$?"; tail -2 "$OUT/tests.log"
  ts tests_end
  wait $UP; grep -E '"probe"' "$OUT/unsloth.log" | cut -c1-400
  ts ours_start
  timeout 60 $B --geometry e2b --mode qlora --seq 2048 --cuda-graphs --steps-profile 2 > "$OUT/ours_2k.log" 2>&1
  show < "$OUT/ours_2k.log"
  timeout 25 $B --geometry e2b --mode lora16 --seq 2048 --cuda-graphs 2>&1 | show
  timeout 120 $B --geometry e2b --mode qlora --seq 8192 --cuda-graphs --compile --mlp-chunk-size 2048 2>&1 | show
  ts end ;;
B)
  ts start
  ( unsloth_cache; timeout 380 python3 benchmarks/gpu/anchors_geometry.py --geometry e4b --probe unsloth \
      --runs qlora:2048,qlora:8192,lora16:2048 > "$OUT/unsloth_e4b.log" 2>&1; ts unsloth_end ) &
  UP=$!
  timeout 60 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/bench/test_bench_profile.py \
    > "$OUT/tests.log" 2>&1; echo "gpu tests rc=$?"; tail -2 "$OUT/tests.log"
  wait $UP; show < "$OUT/unsloth_e4b.log"
  ts ours_start
  timeout 50 $B --geometry e4b --mode qlora --seq 2048 --cuda-graphs --steps-profile 2 2>&1 | tee "$OUT/ours_e4b_2k.log" | show
  timeout 40 $B --geometry e4b --mode lora16 --seq 2048 --cuda-graphs 2>&1 | show
  timeout 150 $B --geometry e4b --mode qlora --seq 8192 --cuda-graphs --compile 2>&1 | show
  ts end ;;
C)
  ts start
  ( unsloth_cache; timeout 300 python3 benchmarks/gpu/anchors_geometry.py --geometry e2b \
      --probe unsloth --runs qlora:32768,lora16:2048 > "$OUT/unsloth_e2b.log" 2>&1; ts unsloth_end ) &
  UP=$!
  wait $UP; show < "$OUT/unsloth_e2b.log"
  ts ours_start
  timeout 40 $B --geometry e2b --mode lora16 --seq 2048 --cuda-graphs 2>&1 | show
  timeout 100 $B --geometry e2b --mode qlora,lora16 --seq 32768 2>&1 | show
  timeout 60 $B --geometry e2b --mode qlora --seq 2048 --cuda-graphs --steps-profile 2 2>&1 | tee "$OUT/ours_2k.log" | show
  ts end ;;
C2)  # E4B's 32K rows (did not fit in C's device time)
  timeout 120 $B --geometry e4b --mode qlora,lora16 --seq 32768 2>&1 | show ;;
D)
  timeout 240 python3 benchmarks/gpu/prequantized_checkpoint.py --geometry 31b --out /tmp/g31b --no-tokenizer
  timeout 60 $B --geometry 31b --mode qlora --seq 2048 2>&1 | show
  unsloth_cache
  timeout 280 python3 benchmarks/gpu/anchors_geometry.py --checkpoint /tmp/g31b --probe unsloth \
    --runs qlora:2048 2>&1 | show ;;
G)
  ts start
  ( unsloth_cache; timeout 330 python3 benchmarks/gpu/anchors_geometry.py --geometry e2b --probe unsloth \
      --runs lora16:2048,lora16:8192 > "$OUT/unsloth_lora16.log" 2>&1; ts unsloth_end ) &
  UP=$!
  # the fused RMSNorm's GPU tests overlap Unsloth's load + compile; nothing of ours is timed then
  timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/kernels/test_rms_norm_kernel.py \
    tests/memory/test_memory_switches_gpu.py -k "norm" > "$OUT/tests.log" 2>&1
  echo "gpu tests rc=$?"; tail -2 "$OUT/tests.log"
  wait $UP; show < "$OUT/unsloth_lora16.log"
  ts ours_start
  timeout 60 $B --geometry e2b --mode lora16 --seq 2048,8192 --cuda-graphs --recompute-norms 2>&1 | show
  timeout 140 python3 benchmarks/kernels/bench_flash_attention.py --providers slimtune --max-seq 32768 \
    --json "$OUT/attention.json" 2>&1 | grep -E "^slimtune|^\|" ;;
I)
  ts start
  ( unsloth_cache; ANCHOR_RUNS=2 timeout 260 python3 .anchors/probe_unsloth.py > "$OUT/unsloth.log" 2>&1 ) &
  UP=$!
  # the fused RMSNorm's GPU tests (fixed after H) overlap Unsloth's load + compile; nothing of ours is timed then
  PYTHONPATH=$PWD timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu \
    tests/kernels/test_rms_norm_kernel.py tests/memory/test_memory_switches_gpu.py -k "norm" > "$OUT/tests.log" 2>&1
  echo "gpu tests rc=$?"; tail -2 "$OUT/tests.log"
  wait $UP; show < "$OUT/unsloth.log"
  ts hf_start
  timeout 70 python3 .anchors/probe_hf_baseline.py qlora 2>&1 | show
  PYTHONPATH=$PWD timeout 60 python3 .anchors/probe_hf_baseline.py lora 2>&1 | show  # no .gpu-site: its torchao 0.15 breaks peft
  ts ours_start
  timeout 40 $B --geometry e2b --mode qlora --seq 2048 --cuda-graphs 2>&1 | show
  timeout 40 $B --geometry e2b --mode qlora --seq 2048 --cuda-graphs --recompute-norms 2>&1 | show
  timeout 50 $B --geometry e2b --mode lora16 --seq 2048,8192 --cuda-graphs --recompute-norms 2>&1 | show
  timeout 130 $B --geometry e2b --mode qlora --seq 8192 --cuda-graphs --compile --mlp-chunk-size 2048 \
    --recompute-norms 2>&1 | show
  ts end ;;
H)
  timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/kernels/test_rms_norm_kernel.py \
    tests/kernels/test_flash_attention_fit.py tests/memory/test_memory_switches_gpu.py -k "norm or real_gpu" \
    2>&1 | tail -4
  timeout 120 python3 benchmarks/kernels/bench_rms_norm.py --json "$OUT/rms_norm.json" 2>&1 | grep '^{'
  timeout 60 $B --geometry e2b --mode qlora --seq 2048 --cuda-graphs 2>&1 | show
  timeout 60 $B --geometry e2b --mode qlora --seq 2048 --cuda-graphs --recompute-norms --steps-profile 2 2>&1 \
    | tee "$OUT/ours_2k_norms.log" | show
  timeout 40 $B --geometry e2b --mode qlora --seq 2048 2>&1 | show
  timeout 40 $B --geometry e2b --mode qlora --seq 2048 --recompute-norms 2>&1 | show
  timeout 150 $B --geometry e2b --mode qlora --seq 8192 --cuda-graphs --compile --mlp-chunk-size 2048 \
    --recompute-norms 2>&1 | show ;;
D2)
  timeout 200 python3 benchmarks/gpu/prequantized_checkpoint.py --geometry 26b-a4b --out /tmp/g26b --no-tokenizer
  timeout 80 $B --geometry 26b-a4b --mode qlora --seq 2048 --finetune-experts --steps 6 2>&1 | show
  unsloth_cache
  timeout 280 python3 benchmarks/gpu/anchors_geometry.py --checkpoint /tmp/g26b --probe unsloth \
    --runs qlora:2048 2>&1 | show ;;
E)  # Predicted before measuring (session 12, first time NCCL runs it): 2 GPUs give 1.8-1.95x the tokens/s of one for
    # E4B and 31B QLoRA 8K (DDP: only the LoRA gradients, 35 M / ~60 M values, cross NVLink), with rank 0's peak
    # within 0.3 GiB of the 1-GPU peak and of the per-GPU prediction; 26B-A4B LoRA 16-bit under FSDP2 fits 2 GPUs.
    # Session 12 had 494 s of device time when the 2-GPU kind was lent: E4B, then 26B FSDP2, then 31B, tighter limits.
  S="python3 benchmarks/gpu/scaleout.py --random-weights --json $OUT/scaleout.jsonl"
  timeout 170 $S --geometry e4b --nproc 1,2 --seq 8192 --steps 8 2>&1 | show
  timeout 130 $S --geometry 26b-a4b --mode lora16 --distributed fsdp --nproc 2 --seq 2048 --steps 6 2>&1 | show
  timeout 120 $S --geometry 31b --nproc 1,2 --seq 8192 --steps 6 2>&1 | show ;;
E2)  # (nvidia-h200-x2) after session 12's E: eager DDP gave E4B QLoRA 8K only 1.34x one graphed GPU (12,603 ->
    # 16,897; each step ~0.3 s longer, 31B the same 0.3 s: 1.85x). Captured steps now run under DDP (no DDP
    # wrapper; the graph all-reduces one flat fp32 gradient buffer through NCCL; slimtune/train/cuda_graph.py).
    # Predicted before measuring: the 2-GPU tests pass (auto captures under --nproc 2; losses = one GPU on the
    # same global batches); E4B QLoRA 8K on 2 GPUs 1.9-1.97x one GPU (~24,000-24,800 tok/s), rank 0's peak
    # = one GPU's + ~0.13 GiB (the flat buffer); 31B QLoRA 8K 1.9-1.97x (~4,400-4,570; eager DDP: 4,285).
    # The eager A/B (--no-cuda-graphs on 1 and 2 GPUs) says how much of E's 0.3 s was DDP and how much eager steps.
    # Predicted: eager E4B 1 GPU ~9,500-11,000 tok/s, eager DDP on 2 ~1.7-1.8x that (E: 16,897).
  timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/train/test_ddp_graphs_gpu.py \
    tests/train/test_cuda_graph.py tests/train/test_graph_buckets.py tests/train/test_step_readback.py 2>&1 | tail -3
  S="python3 benchmarks/gpu/scaleout.py --random-weights --json $OUT/scaleout.jsonl"
  timeout 170 $S --geometry e4b --nproc 1,2 --seq 8192 --steps 8 2>&1 | show
  timeout 120 $S --geometry e4b --nproc 1,2 --seq 8192 --steps 8 --extra=--no-cuda-graphs 2>&1 | show
  timeout 100 $S --geometry 31b --nproc 2 --seq 8192 --steps 6 2>&1 | show ;;  # its 1 GPU: E, 2,320 tok/s
B3)  # (one H200) if only one GPU is lent: session 12's DDP-capture change must leave one-GPU steps as they were.
    # Predicted: the graph tests pass; E2B QLoRA 2K graphed ~17,500 tok/s at 3.1 GiB (B2: 19,202 with --compile).
  timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/train/test_cuda_graph.py \
    tests/train/test_graph_buckets.py tests/train/test_step_readback.py tests/train/test_auto_graphs.py 2>&1 | tail -3
  timeout 60 $B --geometry e2b --mode qlora --seq 2048 --cuda-graphs 2>&1 | show
  # Should auto compile long sequences? The last graphs-alone E2B QLoRA 8K record (5.30 GiB / 14,066 tok/s) predates
  # the fused norms; graphs + compile gave 4.93 / 19,852. Predicted: graphs alone 15-17K at ~5.3 GiB, with compile
  # 19-20K at ~4.9 GiB (its first step ~60-70 s, B2). A gain of >= 20 % at 8K repays compiling within ~400 steps.
  for c in "" "--compile"; do timeout 100 $B --geometry e2b --mode qlora --seq 8192 --cuda-graphs $c 2>&1 | show; done ;;
K1)  # (one H200) issue 10: the stored backward (slimtune/kernels/flash_attention_stored_bwd.py, session 13). The dQ
    # kernel also writes P and dS per chunk of ~1,088 rows; dK, dV are products over them, no dK/dV flash kernel.
    # Offline sm90 compile: dQ+store main loop 507 instructions (default 391), same 66 HGMMA, no spills in it; the
    # products' loop 144 instructions per 4 HGMMA 64x128x16, no spills. Predicted before measuring: the GPU tests
    # pass (stored variant with NaN-poisoned buffers); E2B full layer fwd+bwd 8K 7.0-8.0 ms (default 10.97),
    # 32K 115-130 ms (default ~170), 2K 0.95-1.1 ms (1.14); peak +0.3 GiB at 8K, +1.3 GiB at 32K.
  timeout 200 python3 -m pytest -q -n 8 -m gpu -p no:cacheprovider tests/kernels/test_flash_attention_gpu.py \
    > "$OUT/tests.log" 2>&1; tail -12 "$OUT/tests.log"
  timeout 330 python3 benchmarks/kernels/bench_stored_bwd.py 2>&1 | tee "$OUT/stored_bwd.log" | cut -c1-600 ;;
K2)  # after K1: K1's default chunk (17 row blocks = 136 dQ programs on 132 SMs) ran a second, nearly empty wave per
    # chunk: stored 8K 12.39 ms graphed vs default 10.89; 2 and 4 whole waves per chunk gave 8.96 and 8.42 ms. Chunks
    # are now whole waves (floor). Predicted: 8K waves 1 (1,024 rows, 128 programs) 9.0-10.0 ms, 2: ~8.96, 4: ~8.42,
    # 8 (one chunk) 8.0-8.4; 32K waves 1/2/4/8 150/140/133/130 ms (default ~172-178); 2K 0.90-0.95 ms.
  timeout 400 python3 benchmarks/kernels/bench_stored_bwd.py --seqs 2048,8192,32768 --waves 1,2,4,8 \
    --profile-waves 4 2>&1 | tee "$OUT/stored_bwd.log" | cut -c1-420 ;;
K3)  # after K2 (stored 8K: 1/2/4/8 waves 9.41/8.95/8.39/8.38 ms, 32K 139.8/137.2/132.5/129.6; fused 10.91 and 177.5):
    # the stored backward is now the hd512 default, with a buffer budget of 4 × Q clamped to [256 MiB, 1 GiB] (1 wave
    # at 8K and 32K on E2B) and the planner counting its buffers. Predicted: all attention GPU tests pass; default
    # 8K 9.3-9.5 ms, 32K 138-141; 5 GiB budget (4 waves) as K2; E2B QLoRA 8K (the 8K bar's flags) ~16,300-16,500
    # tok/s at 4.2-4.46 GiB (session 7: 16,120 / 4.18); E2B QLoRA 32K defaults ~10,400-10,700 tok/s (session 6:
    # 9,836) at ~14.5-14.8 GiB (13.66 + the 1.1 GiB buffers), the planner within 10 %.
  timeout 150 python3 -m pytest -q -n 8 -m gpu -p no:cacheprovider tests/kernels/test_flash_attention_gpu.py \
    tests/kernels/test_flash_attention_fit.py > "$OUT/tests.log" 2>&1; tail -3 "$OUT/tests.log"
  timeout 150 python3 benchmarks/kernels/bench_stored_bwd.py --seqs 2048,8192,32768 --waves 4 --budget-gib 5 \
    2>&1 | tee "$OUT/stored_bwd.log" | cut -c1-330
  timeout 170 $B --geometry e2b --mode qlora --seq 8192 --cuda-graphs --compile --mlp-chunk-size 2048 2>&1 | show
  timeout 110 $B --geometry e2b --mode qlora --seq 32768 2>&1 | show ;;
K4)  # after K3 (E2B QLoRA 32K defaults with the stored backward: 13,235 tok/s, 12.48 GiB, planner 13.28): the same
    # run with the fused attention backward (budget 0), then the default again, in one call for the A/B. Predicted:
    # fused 11,900-12,300 tok/s (7 full layers × ~38 ms less per step of ~2.5 s) at ~11.4 GiB (1.1 GiB less).
  F="import sys, runpy; import slimtune.kernels.flash_attention_stored_bwd as s; s.BUFFER_BUDGET_BYTES = 0"
  timeout 110 python3 -c "$F; sys.argv = ['slimtune'] + sys.argv[1:]; runpy.run_module('slimtune', run_name='__main__')" \
    bench --attention slimtune --json "$OUT/fused_bwd.jsonl" --geometry e2b --mode qlora --seq 32768 2>&1 | show
  timeout 110 $B --geometry e2b --mode qlora --seq 32768 2>&1 | show ;;
K5)  # the final code of session 13 (products' shared-memory fallback, named dQ launcher): the attention GPU tests
    # and the 8K row again. Predicted: 42 passed; default 9.4-9.6 ms, fused 10.9-11.1.
  timeout 150 python3 -m pytest -q -n 8 -m gpu -p no:cacheprovider tests/kernels/test_flash_attention_gpu.py \
    tests/kernels/test_flash_attention_fit.py > "$OUT/tests.log" 2>&1; tail -3 "$OUT/tests.log"
  timeout 60 python3 benchmarks/kernels/bench_stored_bwd.py --seqs 8192 --waves "" 2>&1 | tee "$OUT/stored_bwd.log" \
    | cut -c1-330 ;;
K6)  # E4B's end-to-end A/B of the stored attention backward (K4 did E2B): QLoRA 32K defaults, fused (budget 0) then
    # stored. Predicted: stored 6-10 % faster than fused (E4B has more non-attention work per token than E2B's +11 %),
    # same peak (session 12 V: 9,086 tok/s, 17.33 GiB).
  F="import sys, runpy; import slimtune.kernels.flash_attention_stored_bwd as s; s.BUFFER_BUDGET_BYTES = 0"
  timeout 120 python3 -c "$F; sys.argv = ['slimtune'] + sys.argv[1:]; runpy.run_module('slimtune', run_name='__main__')" \
    bench --attention slimtune --json "$OUT/fused_bwd.jsonl" --geometry e4b --mode qlora --seq 32768 2>&1 | show
  timeout 120 $B --geometry e4b --mode qlora --seq 32768 2>&1 | show ;;
F)
  unsloth_cache
  timeout 540 python3 benchmarks/gpu/anchors_geometry.py --geometry e2b --probe unsloth \
    --runs qlora:4096,qlora:5120,qlora:6144 2>&1 | show ;;
*) echo "unknown call $1: A B C C2 I H G J D D2 E F"; exit 2 ;;
esac
