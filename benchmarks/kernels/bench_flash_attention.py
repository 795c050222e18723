"""Micro-benchmark of slimtune's training attention (forward + backward) on Gemma 4 shapes; CUDA only.

Providers: ``slimtune`` (Triton kernels), ``flex`` (compiled flex_attention: BLOCK 32×32, num_stages=1 for head_dim 512,
default blocks for head_dim 256 with a sliding block mask), ``sdpa_math`` (T ≤ 8K only: O(T²) memory).
Shapes: E2B full layer (batch 1, 8 q / 1 kv heads, head_dim 512, causal) at 2K/8K/32K (+128K for slimtune) and a
sliding layer (window 512, head_dim 256, 8 q / 1 kv) at 8K/32K. FLOPs count the visible (query, key) pairs:
4·B·H·D·pairs for the forward (T²/2 pairs when causal), ×3.5 for forward + backward.

``--sweep`` / ``--sweep-only``: for every candidate KernelConfig in ``SWEEP`` (the defaults first, then the variants:
fused delta in dQ, split dV/dK kernels) it first checks fwd+bwd against the fp64 reference on a small shape (a wrong
candidate is reported as "WRONG" and never picked), then times the kernel alone at 8K (hd512 full causal; hd256
window 512), then fwd+bwd with the defaults and with the best kernel per kind (8K, and 32K for hd512). One JSON line
per result, a final ``"event": "best_per_kernel"`` line; hard time budget ``--budget-s`` (compilation included;
candidates are compiled first in ``--workers`` parallel processes, ``--workers 0`` when the cache is already warm).
``--sweep`` then runs the main table with the best configs; ``--sweep-only`` stops after the sweep.

Usage::

    python benchmarks/kernels/bench_flash_attention.py --json out.json [--sweep] [--providers slimtune,flex]
    python benchmarks/kernels/bench_flash_attention.py --sweep-only --budget-s 185 --json sweep.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from slimtune.kernels import flash_attention as fa
from slimtune.kernels.flash_attention import KernelConfig, causal_attention_flops

DEVICE, DTYPE = "cuda", torch.bfloat16  # (a CPU smoke test of the sweep logic swaps these for the interpreter)
CHECK_T = 777  # sequence length of each candidate's correctness check (odd: partial blocks)
PEAK_TFLOPS = 790.0  # measured bf16 matmul rate of the H200 (shared/reference/gpu-facts.md)

C = KernelConfig
# Candidates per head_dim and kernel; the first of each list is the current default for the swept shape (_CONFIGS in
# flash_attention_configs.py, or _WINDOWED for head_dim 256, which is swept with a window). KernelConfig fields:
# (block_m, block_n, warps, stages, transposed, scratch, variant, max_split). dq variant 1 = delta fused into dQ,
# 3 = that + V loaded before K (BLOCK_N 64 fits at hd512); dkdv variant 1 = separate dV and dK kernels (transposed
# accumulators), 2 = the single kernel with constexpr row strides; max_split 1 = no head split (no fp32 partials, no
# sum launch). dq variant 5 (hd512 default): the stored backward on full layers, timed by bench_stored_bwd.py; its
# dQ kernel timed alone here is variant 1's. Offline resources and predictions: ATTENTION_NOTES.md.
SWEEP = {
    512: {
        "fwd": [C(64, 32, 8, 2, False, 2)],
        "dq": [C(64, 32, 8, 1, False, 2, 5), C(64, 32, 8, 1, False, 2), C(64, 64, 8, 1, False, 2, 3)],
        "dkdv": [C(64, 32, 8, 1, True, 2), C(64, 64, 8, 1, True, 2, 1), C(64, 32, 8, 1, True, 2, 1),
                 C(32, 64, 8, 2, True, 2, 1), C(32, 64, 8, 1, True, 2, 1)],
    },
    256: {
        "fwd": [C(128, 64, 8, 2), C(128, 32, 8, 3)],
        "dq": [C(128, 32, 8, 2), C(128, 32, 8, 2, False, 0, 1), C(128, 64, 8, 1, False, 0, 3)],
        "dkdv": [C(64, 64, 8, 2, True, 2, 2, 1), C(64, 64, 8, 2, True, 2), C(64, 64, 8, 2, True, 2, 0, 1),
                 C(64, 64, 8, 2, True, 2, 1),
                 C(64, 64, 8, 2, True, 2, 1, 1), C(128, 64, 8, 1, True, 2, 1), C(64, 128, 8, 1, True, 2, 1)],
    },
}
SWEEP_WINDOW = {512: None, 256: 512}
SHAPES = [  # (name, head_dim, window, seqs)
    ("full_hd512", 512, None, [2048, 8192, 32768, 131072]),
    ("sliding512_hd256", 256, 512, [8192, 32768]),
]


def _inputs(t: int, d: int, hq: int = 8, hk: int = 1, dtype=None, seed: int = 0):
    dtype = dtype or DTYPE
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    # transformers' layout: (B, T, H, D) storage viewed as (B, H, T, D)
    q = torch.randn(1, t, hq, d, device=DEVICE, dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(1, t, hk, d, device=DEVICE, dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(1, t, hk, d, device=DEVICE, dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
    return q, k, v


def _kernel_args(t, d, window):
    q, k, v = _inputs(t, d)
    dstart = torch.zeros((1, t), dtype=torch.int32, device=DEVICE)
    dend = torch.full((1, t), t, dtype=torch.int32, device=DEVICE)
    w = window if window is not None else t + 1
    return q.detach(), k.detach(), v.detach(), dstart, dend, w


def _run_kernel(kind: str, cfg: KernelConfig, t: int, d: int, window):
    """One launch of a single kernel (used for compiling and timing); dO in the token-major layout autograd gives."""
    q, k, v, dstart, dend, w = _kernel_args(t, d, window)
    o, lse = fa._forward(q, k, v, 1.0, w, dstart, None, fa._config(d, "fwd", None))
    do = torch.randn_like(o)  # same (B, T, H, D) storage as o
    delta = fa._bwd_delta(o, do)
    if kind == "fwd":
        return lambda: fa._forward(q, k, v, 1.0, w, dstart, None, cfg)
    if kind == "dq":  # every dq time includes δ: variant 1 computes it inside, the others launch _bwd_delta first
        if cfg.variant & 1:
            return lambda: fa._bwd_dq(do, q, k, v, o, lse, delta, 1.0, w, dstart, None, cfg)
        return lambda: fa._bwd_dq(do, q, k, v, o, lse, fa._bwd_delta(o, do), 1.0, w, dstart, None, cfg)
    return lambda: fa._bwd_dkdv(do, q, k, v, lse, delta, 1.0, w, dstart, dend, None, cfg)


def _compile_job(job):
    kind, cfg, d, window = job
    try:
        _run_kernel(kind, cfg, 512, d, window)()
        if kind == "dkdv":  # also the no-split specialisation (bf16 outputs) that long sequences (32K) take
            _run_kernel(kind, cfg._replace(max_split=1), 512, d, window)()
        torch.cuda.synchronize()
        return job, "ok"
    except Exception as e:  # noqa: BLE001 - report any compile/launch failure of a candidate and continue
        return job, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def compile_in_parallel(jobs, workers: int):
    """Compile kernels in worker processes so the Triton cache is warm before timing."""
    ctx = mp.get_context("spawn")
    failed = {}
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for job, status in pool.map(_compile_job, jobs):
            if status != "ok":
                failed[job] = status
                print(f"compile failed {job[0]} hd{job[2]} {tuple(job[1])}: {status}", flush=True)
    return failed


def _time(fn, long: bool) -> float:
    if not long:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[1]


def _jobs():
    return [(kind, cfg, d, SWEEP_WINDOW[d]) for d, kinds in SWEEP.items() for kind, cfgs in kinds.items()
            for cfg in cfgs]


def check_candidate(kind: str, cfg: KernelConfig, d: int, window) -> float:
    """Max relative error (out, dq, dk, dv) of fwd+bwd with ``cfg`` for ``kind`` against the fp64 reference, on a
    small odd-length shape with packed documents (incl. a 1-token one), GQA 8:1 and the layer's window. Same layouts
    as the timed shapes, so the check compiles nothing extra."""
    from slimtune.kernels.attention_reference import attention_reference

    t = CHECK_T
    q, k, v = _inputs(t, d, seed=7)
    ids = [0] * (t // 3) + [1] + [2] * (t - t // 3 - 1)
    doc_ids = torch.tensor([ids], device=DEVICE)
    out = fa.flash_attention(q, k, v, scale=1.0, window=window, doc_ids=doc_ids, _configs={kind: cfg})
    do = torch.randn(1, t, 8, d, device=DEVICE, dtype=q.dtype).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = attention_reference(*ref_in, scale=1.0, window=window, doc_ids=doc_ids)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    errs = []
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        if not torch.isfinite(got).all():
            return float("inf")
        errs.append(((got.double() - want).norm() / want.norm().clamp_min(1e-6)).item())
    return max(errs)


def sweep(t: int, workers: int, budget_s: float, t0: float, long_seq: int = 32768):
    """Check, then time every SWEEP candidate kernel alone at ``t``; then fwd+bwd with the defaults and with the best
    per kernel. One JSON line per result; candidates failing the check are reported and never picked. Stops timing
    (reporting what it skipped) once ``budget_s`` seconds have passed since ``t0``."""
    failed = compile_in_parallel(_jobs(), workers) if workers > 0 else {}
    units = {"fwd": 2, "dq": 3, "dkdv": 4}  # matmuls of each kernel, in units of one QKᵀ over the visible pairs
    best: dict[int, dict[str, tuple[KernelConfig, float]]] = {}
    default_ms: dict[tuple[int, str], float] = {}
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    for d, kinds in SWEEP.items():
        window = SWEEP_WINDOW[d]
        base = causal_attention_flops(1, 8, t, d, window) / 2.0
        for kind, cfgs in kinds.items():
            for i, cfg in enumerate(cfgs):
                row = {"event": "candidate", "head_dim": d, "window": window, "seq": t, "kind": kind,
                       "config": list(cfg), "default": i == 0}
                if (kind, cfg, d, window) in failed:
                    emit({**row, "status": "compile_failed", "error": failed[(kind, cfg, d, window)]})
                    continue
                if time.monotonic() - t0 > budget_s:
                    emit({**row, "status": "skipped_budget"})
                    continue
                try:
                    err = check_candidate(kind, cfg, d, window)
                    if not err <= 2e-2:
                        emit({**row, "status": "WRONG", "max_rel_err": err})
                        continue
                    ms = _time(_run_kernel(kind, cfg, t, d, window), long=False)
                except Exception as e:  # noqa: BLE001 - report a failing candidate and go on
                    emit({**row, "status": "error", "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                emit({**row, "status": "ok", "max_rel_err": err, "ms": ms, "tflops": units[kind] * base / ms / 1e9})
                if i == 0:
                    default_ms[(d, kind)] = ms
                if kind not in best.setdefault(d, {}) or ms < best[d][kind][1]:
                    best[d][kind] = (cfg, ms)
    chosen = {d: {k: c for k, (c, _) in v.items()} for d, v in best.items()}
    for name, d, window, _ in SHAPES:
        seqs = [t] + ([long_seq] if d == 512 and long_seq else [])
        for seq in seqs:
            for label, cfgs in (("default", None), ("best", chosen.get(d))):
                if time.monotonic() - t0 > budget_s:
                    emit({"event": "fwd_bwd", "shape": name, "seq": seq, "which": label, "status": "skipped_budget"})
                    continue
                try:
                    r = bench_row("slimtune", name, d, window, seq, cfgs)
                except Exception as e:  # noqa: BLE001
                    emit({"event": "fwd_bwd", "shape": name, "seq": seq, "which": label, "status": "error",
                          "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                emit({"event": "fwd_bwd", "which": label, "status": "ok", **r})
    summary = {str(d): {k: {"config": list(c), "ms": ms, "default_ms": default_ms.get((d, k)),
                            "speedup_vs_default": (default_ms[(d, k)] / ms) if (d, k) in default_ms else None}
                        for k, (c, ms) in v.items()} for d, v in best.items()}
    print(json.dumps({"event": "best_per_kernel", "seq": t, "best": summary,
                      "elapsed_s": round(time.monotonic() - t0, 1)}), flush=True)
    return chosen, rows


def _attn_call(provider: str, d: int, window, t: int, configs):
    if provider == "slimtune":
        return lambda q, k, v: fa.flash_attention(q, k, v, scale=1.0, window=window, _configs=configs)
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, qi, ki):
            visible = qi >= ki
            return visible & (qi - ki < window) if window is not None else visible

        block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=t, KV_LEN=t, device="cuda")
        opts = None
        if d == 512:
            opts = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_M1": 32, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 32,
                    "num_stages": 1}
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, scale=1.0, enable_gqa=True,
                                        kernel_options=opts)
    if provider == "sdpa_math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        mask = None
        if window is not None:
            i = torch.arange(t, device="cuda")
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)

        def call(q, k, v):
            with sdpa_kernel(SDPBackend.MATH):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=mask is None, scale=1.0, enable_gqa=True)
        return call
    raise ValueError(provider)


def graphed_ms(call, q, k, v, do, long: bool) -> float:
    """fwd+bwd captured as one CUDA graph and replayed: the GPU time alone, as `--cuda-graphs` training runs it.

    Triton's Python launcher costs ~20-40 µs per launch on the CPU; short kernels (the sliding layers) wait for it in
    eager timing, so both figures are reported.
    """
    inputs = tuple(x.detach().requires_grad_() for x in (q, k, v))

    def grads():
        return torch.autograd.grad(call(*inputs), inputs, do)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, allocator) outside the capture
        for _ in range(2):
            grads()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads()
    return _time(graph.replay, long)


def bench_row(provider, name, d, window, t, configs):
    q, k, v = _inputs(t, d)
    call = _attn_call(provider, d, window, t, configs)
    # dO in the (B, T, H, D) layout autograd hands back through the caller's transpose (as in training)
    do = torch.randn(1, t, q.shape[1], d, device=DEVICE, dtype=q.dtype).transpose(1, 2)

    def step():
        out = call(q, k, v)
        out.backward(do)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    long = t >= 32768
    ms = _time(step, long)
    with torch.no_grad():
        fwd_ms = _time(lambda: call(q, k, v), long)
    g_ms = graphed_ms(call, q, k, v, do, long) if provider == "slimtune" and DEVICE == "cuda" else None
    flops = 3.5 * causal_attention_flops(1, 8, t, d, window)
    tf = flops / ms / 1e9
    return {"provider": provider, "shape": name, "seq": t, "head_dim": d, "window": window, "ms": ms, "fwd_ms": fwd_ms,
            "graphed_ms": g_ms, "graphed_tflops": flops / g_ms / 1e9 if g_ms else None,
            "tflops": tf, "pct_peak": 100 * tf / PEAK_TFLOPS, "peak_mem_gib": peak,
            "configs": {k: list(v) for k, v in (configs or {}).items()}}


def profile_step(name, d, window, t, configs) -> None:
    """Kernel-level CUDA times of three fwd+bwd steps (where the time goes beyond the attention kernels)."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = _inputs(t, d)
    do = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    call = _attn_call("slimtune", d, window, t, configs)
    for _ in range(2):
        call(q, k, v).backward(do)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            call(q, k, v).backward(do)
        torch.cuda.synchronize()
    print(f"--- profile {name} T={t} (3 steps) ---")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write raw results here")
    ap.add_argument("--providers", default="slimtune,flex,sdpa_math")
    ap.add_argument("--sweep", action="store_true", help="time kernel configurations first and use the best")
    ap.add_argument("--sweep-only", action="store_true",
                    help="only the sweep: check + time each candidate kernel, fwd+bwd default vs best, JSON lines")
    ap.add_argument("--budget-s", type=float, default=185.0,
                    help="hard time budget of the sweep in seconds from start (compilation included)")
    ap.add_argument("--workers", type=int, default=8, help="parallel compile processes for --sweep")
    ap.add_argument("--max-seq", type=int, default=131072)
    ap.add_argument("--other-seqs", default="2048,8192,32768",
                    help="sequence lengths at which flex/sdpa_math run (sdpa_math never above 8192)")
    ap.add_argument("--compile-only", action="store_true", help="only compile the --sweep candidates (warm cache)")
    ap.add_argument("--profile", action="store_true", help="print the CUDA kernel times of one fwd+bwd per shape")
    args = ap.parse_args()
    t_start = time.monotonic()
    if not torch.cuda.is_available():
        raise SystemExit("bench_flash_attention needs CUDA")
    import triton

    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
                "torch": torch.__version__, "triton": triton.__version__}
    print(meta, flush=True)
    if args.compile_only:
        compile_in_parallel(_jobs(), args.workers)
        return
    chosen: dict[int, dict[str, KernelConfig]] = {}
    sweep_rows = []
    if args.sweep or args.sweep_only:
        chosen, sweep_rows = sweep(8192, args.workers, args.budget_s, t_start,
                                   long_seq=32768 if args.max_seq >= 32768 else 0)
        if args.sweep_only:
            if args.json:
                args.json.write_text(json.dumps({"meta": meta, "sweep": sweep_rows}, indent=1))
            return
        print("best configs:", {d: {k: tuple(c) for k, c in v.items()} for d, v in chosen.items()}, flush=True)
    if args.profile:
        for name, d, window, _ in SHAPES:
            profile_step(name, d, window, 8192, chosen.get(d))
    rows = []
    providers = args.providers.split(",")
    for name, d, window, seqs in SHAPES:
        for t in seqs:
            if t > args.max_seq:
                continue
            for provider in providers:
                if provider != "slimtune" and str(t) not in args.other_seqs.split(","):
                    continue
                if provider == "sdpa_math" and t > 8192:
                    continue
                try:
                    row = bench_row(provider, name, d, window, t, chosen.get(d) if provider == "slimtune" else None)
                except Exception as e:  # noqa: BLE001 - one failing provider must not stop the table
                    print(f"{provider} {name} T={t} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    rows.append({"provider": provider, "shape": name, "seq": t, "error": str(e)[:500]})
                    continue
                rows.append(row)
                graphed = f"  graphed {row['graphed_ms']:9.3f} ms" if row["graphed_ms"] else ""
                print(f"{provider:10s} {name:18s} T={t:6d}  fwd+bwd {row['ms']:9.3f} ms  fwd {row['fwd_ms']:8.3f} ms"
                      f"  {row['tflops']:6.1f} TFLOP/s ({row['pct_peak']:4.1f}%)  peak {row['peak_mem_gib']:.2f} GiB"
                      f"{graphed}", flush=True)
    print("\n| provider | shape | T | fwd+bwd ms | graphed ms | fwd ms | TFLOP/s | % of 790 | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['provider']} | {r['shape']} | {r['seq']} | error | | | | | |")
        else:
            graphed = f"{r['graphed_ms']:.3f}" if r["graphed_ms"] else "–"
            print(f"| {r['provider']} | {r['shape']} | {r['seq']} | {r['ms']:.3f} | {graphed} | {r['fwd_ms']:.3f} | "
                  f"{r['tflops']:.1f} | {r['pct_peak']:.1f} | {r['peak_mem_gib']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "sweep": sweep_rows}, indent=1))


if __name__ == "__main__":
    main()
