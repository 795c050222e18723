"""Where a benchmark step's GPU time goes: torch.profiler over a few more steps, kernels grouped by what they do.

`slimtune bench --steps-profile N` runs N extra steps (after the timed ones, so the timing is unaffected) under the
profiler and records, per step: wall time, GPU busy time (sum of kernel times; kernels of a CUDA-graph replay are
traced one by one) and the time of each kernel group and of the top kernels. Issue 6 reads these to pick levers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# (group, substrings of the kernel name) in the order they are tried: first match wins. The names are those the
# H200 traces show: our Triton kernels, bitsandbytes, cuBLAS (nvjet/xmma/cutlass), inductor, ATen.
KERNEL_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("_attn_", "flash", "fmha", "attention", "sdpa")),
    ("loss (lm_head + cross-entropy)", ("_softcap_ce", "cross_entropy", "log_softmax", "nll_loss")),
    ("nf4 dequantize", ("dequantize", "kdequant")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "gemv", "matmul", "splitk")),
    ("optimizer", ("adam", "multi_tensor")),
    ("compiled (inductor)", ("triton_poi", "triton_red", "triton_per", "triton_tem", "triton_")),
    ("copies and fills", ("memcpy", "memset", "copy", "fill", "cat_", "index")),
    ("elementwise and reductions", ("elementwise", "reduce", "norm", "softmax")),
)

HOST_SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero")
"""ATen ops that wait for the GPU to hand a value back to Python (listed with the CUDA calls: they block too)."""


def kernel_group(name: str) -> str:
    """The group a CUDA kernel's name belongs to (`other` when none matches)."""
    low = name.lower()
    for group, keys in KERNEL_GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def summarize_kernels(kernels: list[tuple[str, float, int]], steps: int, wall_s: float, top: int = 12) -> dict:
    """Per-step figures from (kernel name, total µs, calls) rows traced over `steps` steps taking `wall_s` each."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    busy_us = sum(us for _, us, _ in kernels) / steps
    groups: dict[str, float] = {}
    for name, us, _ in kernels:
        g = kernel_group(name)
        groups[g] = groups.get(g, 0.0) + us / steps
    share = (lambda us: round(100 * us / busy_us, 1)) if busy_us else (lambda us: 0.0)
    rows = sorted(kernels, key=lambda k: -k[1])[:top]
    return {
        "steps": steps,
        "wall_ms": round(wall_s * 1e3, 2),
        "gpu_busy_ms": round(busy_us / 1e3, 2),
        "gpu_busy_pct": round(100 * busy_us / 1e3 / (wall_s * 1e3), 1) if wall_s > 0 else None,
        "kernels_traced": len(kernels),
        "groups": [{"group": g, "ms": round(us / 1e3, 3), "pct": share(us)}
                   for g, us in sorted(groups.items(), key=lambda kv: -kv[1])],
        "top_kernels": [{"kernel": name[:120], "group": kernel_group(name), "ms": round(us / steps / 1e3, 3),
                         "calls": calls // steps, "pct": share(us / steps)} for name, us, calls in rows],
    }


def profile_steps(step: Callable[[], None], steps: int) -> dict:
    """Run `step` `steps` times under torch.profiler (CPU + CUDA) and summarize the CUDA kernels per step."""
    from torch.autograd import DeviceType  # noqa: PLC0415
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall_s = (time.perf_counter() - t) / steps
    events = prof.key_averages()
    kernels = [(e.key, float(e.self_device_time_total), int(e.count)) for e in events
               if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    summary = summarize_kernels(kernels, steps, wall_s)
    summary["host_calls"] = summarize_host_calls(
        [(e.key, float(e.self_cpu_time_total), int(e.count)) for e in events if e.device_type == DeviceType.CPU],
        steps)
    return summary


def summarize_host_calls(calls: list[tuple[str, float, int]], steps: int, top: int = 8) -> list[dict]:
    """The CUDA runtime/driver calls (and tensor-to-Python syncs) that held the host longest, per step.

    When GPU busy time is far below wall time, these say why: a cudaStreamSynchronize, cudaHostAlloc or cudaFree
    that blocks the host leaves the GPU idle until the next launch.
    """
    rows = [(name, us, n) for name, us, n in calls if name.startswith("cu") or name in HOST_SYNC_OPS]
    return [{"call": name[:80], "ms": round(us / steps / 1e3, 3), "calls": n // steps}
            for name, us, n in sorted(rows, key=lambda r: -r[1])[:top]]



def format_profile(p: dict) -> str:
    """A small text table of a profile_steps() summary (printed by `slimtune bench`)."""
    lines = [f"profile: {p['steps']} steps, wall {p['wall_ms']} ms/step, GPU busy {p['gpu_busy_ms']} ms/step "
             f"({p['gpu_busy_pct']}%), {p['kernels_traced']} distinct kernels"]
    if not p["kernels_traced"]:
        lines.append("  (no CUDA kernels were traced: this profiler build may not see inside CUDA graphs)")
    lines += [f"  {g['group']:<32} {g['ms']:>9.3f} ms  {g['pct']:>5.1f}%" for g in p["groups"]]
    lines += ["  top kernels:"] + [f"  {k['ms']:>9.3f} ms {k['pct']:>5.1f}% x{k['calls']:<5} {k['kernel'][:90]}"
                                  for k in p["top_kernels"]]
    if p.get("host_calls"):
        lines += ["  host time in CUDA calls:"] + [f"  {c['ms']:>9.3f} ms x{c['calls']:<5} {c['call']}"
                                                   for c in p["host_calls"]]
    return "\n".join(lines)
