"""Micro-benchmark of the fused RMSNorm (slimtune.kernels.rms_norm) against transformers' Gemma4RMSNorm.

GPU mode (default): forward + backward of one norm on Gemma 4's shapes (E2B hidden 1,536 and E4B 2,560 rows; the
per-head q_norm at head_dim 256 and 512) for 2K and 8K tokens: transformers eager, transformers under
torch.compile, and ours. Reports ms eager and inside one CUDA graph (``graphed_ms``: the device time, as training
with --cuda-graphs sees it; eager timings of one norm are host-bound at these sizes: session 7 measured 0.3-0.9 ms
for every shape), effective GB/s from the graphed time (the bytes a fused norm must move: x and y forward, dy, x
and dx backward, in the activation dtype) and its share of the H200's measured ~4.3 TB/s.

``--host-ops`` (CPU, no GPU needed): the launch-count proxy behind the eager-step claim. It builds E2B's real layer
structure (35 layers, KV sharing, per-layer inputs) with tiny widths, runs one LoRA forward+backward with
checkpointing, and counts the aten ops dispatched (views and allocations apart), with transformers' norms and with
the fused ones (run under TRITON_INTERPRET=1 so the kernels run on CPU; each norm call then adds one launch).

Usage:
    python benchmarks/kernels/bench_rms_norm.py [--json out.json]             # GPU
    TRITON_INTERPRET=1 python benchmarks/kernels/bench_rms_norm.py --host-ops  # CPU
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HBM_TBPS = 4.3
SHAPES = [("e2b hidden", 1, 1536), ("e4b hidden", 1, 2560), ("q_norm hd256 x8", 8, 256), ("q_norm hd512 x8", 8, 512)]
NOT_LAUNCHES = {"aten.view", "aten.detach", "aten.t", "aten.as_strided", "aten.reshape", "aten.unsqueeze",
                "aten.slice", "aten.expand", "aten.transpose", "aten.squeeze", "aten._unsafe_view", "aten.permute",
                "aten.select", "aten.alias", "aten.split", "aten.unbind", "aten.empty", "aten.empty_like",
                "aten.empty_strided", "aten.split_with_sizes", "aten.chunk", "aten.narrow"}


def gpu_table(seqs=(2048, 8192)) -> list[dict]:
    from triton.testing import do_bench, do_bench_cudagraph
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

    from slimtune.kernels.rms_norm import rms_norm

    rows = []
    for name, heads, width in SHAPES:
        norm = Gemma4RMSNorm(width, eps=1e-6).to("cuda", torch.bfloat16).requires_grad_(False)
        compiled = torch.compile(norm, dynamic=True)  # one compile per width, whatever the token count
        for t in seqs:
            x = torch.randn(t, heads, width, device="cuda", dtype=torch.bfloat16).requires_grad_()
            dy = torch.randn_like(x)
            providers = {"transformers": norm, "transformers+compile": compiled,
                         "slimtune": lambda v, w=norm.weight: rms_norm(v, w, 1e-6)}
            moved = 5 * x.numel() * x.element_size()
            for provider, fn in providers.items():
                def step(fn=fn):
                    return torch.autograd.grad(fn(x), x, dy)

                ms = do_bench(step, warmup=25, rep=100, return_mode="median")
                try:
                    graphed = do_bench_cudagraph(step, rep=100, return_mode="median")
                except Exception as exc:  # noqa: BLE001 - a provider that cannot be captured keeps its eager row
                    print(f"# {provider} {name} {t}: not capturable ({type(exc).__name__}: {exc})"[:300], flush=True)
                    graphed = None
                gbs = moved / (graphed or ms) / 1e6
                rows.append({"shape": name, "tokens": t, "width": width, "heads": heads, "provider": provider,
                             "ms": round(ms, 4), "graphed_ms": None if graphed is None else round(graphed, 4),
                             "GBps": round(gbs, 1), "pct_hbm": round(100 * gbs / 1e3 / HBM_TBPS, 1)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def host_ops(recompute_norms: bool) -> collections.Counter:
    """aten ops dispatched by one LoRA forward+backward of E2B's layer structure with tiny widths (CPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import Gemma4TextConfig

    import slimtune.bench.random_model as rm
    from slimtune.adapt.attention import enable_slimtune_attention
    from slimtune.adapt.inject import add_lora
    from slimtune.models.geometry import real_text_config_kwargs
    from slimtune.train.run import apply_layer_switches
    from slimtune.train.step import accumulate_gradients

    kw = real_text_config_kwargs("e2b")
    kw.update(hidden_size=64, intermediate_size=128, head_dim=32, global_head_dim=64, vocab_size=1024,
              hidden_size_per_layer_input=16, vocab_size_per_layer_input=1024)
    build_config = rm.build_config
    rm.build_config = lambda *a, **k: Gemma4TextConfig(**kw)
    try:
        model = rm.build_random_model("e2b", mode="lora16", device="cpu")
    finally:
        rm.build_config = build_config
    enable_slimtune_attention(model)
    add_lora(model, r=16, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    apply_layer_switches(model, mlp_chunk_size=0, recompute_norms=recompute_norms, compile_layers=False,
                         loss_chunk_size=0, gradient_checkpointing=True, activation_offload=False)
    model.train()
    ids = torch.randint(3, 1024, (1, 64))
    batch = {"input_ids": ids, "targets": torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    accumulate_gradients(model, [batch], device=torch.device("cpu"), dtype=torch.bfloat16)  # warm-up
    counter = Count()
    with counter:
        accumulate_gradients(model, [batch], device=torch.device("cpu"), dtype=torch.bfloat16)
    return counter.ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host-ops", action="store_true", help="CPU launch-count proxy (run with TRITON_INTERPRET=1)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.host_ops:
        result = {}
        for fused in (False, True):
            ops = host_ops(fused)
            launches = sum(v for k, v in ops.items() if k not in NOT_LAUNCHES)
            result["fused" if fused else "transformers"] = {"dispatched": sum(ops.values()), "launching": launches}
            print(("fused norms  " if fused else "transformers "), json.dumps(result["fused" if fused else
                                                                                  "transformers"]), flush=True)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the GPU table needs CUDA (use --host-ops on CPU)")
        result = gpu_table()
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
