"""Benchmark: chunked linear cross-entropy vs full-logits reference (speed and peak memory, forward + backward).

Runs on CUDA only. For each token count it times ``loss.backward()`` of

- ``reference``: ``linear_cross_entropy_reference`` (full fp32 logits, plain autograd),
- ``hf-style``: what transformers runs for Gemma 4 (logits and softcap in bf16, upcast to fp32 for the loss),
- ``slimtune``: ``linear_cross_entropy`` with the Triton elementwise kernel (default chunk size, then every size in
  ``--chunk-sizes``),
- ``slimtune-torch``: the same op with the pure-torch elementwise path (what runs without Triton),

with a frozen bf16 weight (the tied embedding) and a hidden state that needs a gradient, and reports the peak
memory each adds on top of its inputs.

Usage::

    python benchmarks/kernels/bench_linear_cross_entropy.py --json runs/bench_lce.json
    python benchmarks/kernels/bench_linear_cross_entropy.py --tokens 8192 --chunk-sizes 256 512 1024 2048
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from slimtune.kernels import linear_cross_entropy as lce  # noqa: E402
from slimtune.kernels import softcap_cross_entropy_triton as triton_ce  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="token counts T to run")
    parser.add_argument("--hidden", type=int, default=1536, help="hidden size H (Gemma 4 E2B: 1536)")
    parser.add_argument("--vocab", type=int, default=262_144, help="vocabulary size V")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--softcap", type=float, default=30.0, help="final logit softcap; <= 0 disables it")
    parser.add_argument("--ignore-frac", type=float, default=0.0, help="fraction of labels set to ignore_index")
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[], help="extra chunk sizes to sweep")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--skip-reference", action="store_true", help="do not run the full-logits reference")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    return parser.parse_args()


def _measure(fn, hidden, weight, labels, warmup: int, iters: int) -> dict:
    """Median fwd+bwd time (ms) and peak extra memory (MiB) of ``fn(...).backward()``; 'OOM' on out of memory."""
    try:
        for _ in range(warmup):
            fn(hidden, weight, labels).backward()
            hidden.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(hidden, weight, labels).backward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
            hidden.grad = None
        peak = torch.cuda.max_memory_allocated() - base
        return {"ms": statistics.median(times), "peak_mib": peak / 2**20}
    except torch.OutOfMemoryError:
        hidden.grad = None
        torch.cuda.empty_cache()
        return {"ms": None, "peak_mib": None, "error": "OOM"}


def _providers(args: argparse.Namespace, vocab: int):
    softcap = args.softcap if args.softcap > 0 else None

    def ours(backend: str, chunk_size: int | None):
        def fn(hidden, weight, labels):
            lce.ELEMENTWISE_BACKEND = backend
            try:
                return lce.linear_cross_entropy(hidden, weight, labels, softcap=softcap, chunk_size=chunk_size)
            finally:
                lce.ELEMENTWISE_BACKEND = "auto"

        return fn

    def hf_style(hidden, weight, labels):
        # What transformers' Gemma 4 does: logits and softcap in the model dtype, upcast to fp32 for the loss.
        logits = hidden @ weight.T
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")

    default_chunk = lce.default_chunk_size(vocab, "cuda")
    if not args.skip_reference:
        yield "reference", None, lambda h, w, y: lce.linear_cross_entropy_reference(h, w, y, softcap=softcap)
        yield "hf-style", None, hf_style
    if triton_ce.TRITON_AVAILABLE:
        for chunk in [default_chunk] + [c for c in args.chunk_sizes if c != default_chunk]:
            yield "slimtune", chunk, ours("triton", chunk)
    yield "slimtune-torch", default_chunk, ours("torch", default_chunk)


def main() -> int:
    args = _parse_args()
    if not torch.cuda.is_available():
        print("bench_linear_cross_entropy needs a CUDA device; none found.", file=sys.stderr)
        return 2
    dtype, H, V = DTYPES[args.dtype], args.hidden, args.vocab
    torch.manual_seed(0)
    weight = (torch.randn(V, H, device="cuda") / H**0.5 * 20).to(dtype)  # logits std ~20: softcap is non-linear
    results = []
    for T in args.tokens:
        hidden = torch.randn(T, H, device="cuda").to(dtype).requires_grad_(True)
        labels = torch.randint(0, V, (T,), device="cuda")
        labels[torch.rand(T, device="cuda") < args.ignore_frac] = -100
        kept = int((labels != -100).sum())
        for name, chunk, fn in _providers(args, V):
            row = {"provider": name, "tokens": T, "kept_tokens": kept, "chunk_size": chunk}
            row.update(_measure(fn, hidden, weight, labels, args.warmup, args.iters))
            if row["ms"]:
                row["tflops"] = 2 * (2 * kept * V * H) / (row["ms"] * 1e-3) / 1e12  # logits + grad_hidden matmuls
                row["tokens_per_s"] = T / (row["ms"] * 1e-3)
            results.append(row)
        del hidden, labels

    header = f"{'provider':<16}{'T':>7}{'kept':>7}{'chunk':>7}{'fwd+bwd ms':>12}{'peak MiB':>11}{'TFLOP/s':>9}"
    print(f"{torch.cuda.get_device_name()} | {args.dtype} H={H} V={V} softcap={args.softcap}")
    print(header)
    print("-" * len(header))
    for r in results:
        ms = f"{r['ms']:.2f}" if r["ms"] else r.get("error", "-")
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] else "-"
        tflops = f"{r['tflops']:.0f}" if r.get("tflops") else "-"
        chunk = str(r["chunk_size"] or "-")
        print(f"{r['provider']:<16}{r['tokens']:>7}{r['kept_tokens']:>7}{chunk:>7}{ms:>12}{peak:>11}{tflops:>9}")

    if args.json is not None:
        meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": getattr(triton_ce.triton, "__version__", None),
            "python": platform.python_version(),
            "dtype": args.dtype,
            "hidden": H,
            "vocab": V,
            "softcap": args.softcap,
            "ignore_frac": args.ignore_frac,
            "iters": args.iters,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
