"""Profile our LoRA/QLoRA step on random E2B weights: where GPU time goes and how busy the GPU is.

Usage (GPU): python benchmarks/gpu/profile_step.py --mode qlora --seq 2048 [--compile] [--attention slimtune]
Prints the top CUDA kernels by total time and the ratio of GPU busy time to wall time.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from slimtune.adapt.inject import add_lora, trainable_parameters
from slimtune.bench.random_model import build_random_model
from slimtune.bench.run import bench_batch
from slimtune.train.step import accumulate_gradients, clip_and_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="qlora")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--rows", type=int, default=22)
    a = ap.parse_args()
    dev = torch.device("cuda")
    model = build_random_model("e2b", mode=a.mode, device=dev)
    if a.attention != "sdpa":
        from slimtune.adapt.attention import enable_slimtune_attention

        enable_slimtune_attention(model)
    add_lora(model, r=16, alpha=16)
    if a.compile:
        from slimtune.adapt.compile import compile_decoder_layers

        compile_decoder_layers(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cpu_batch = bench_batch(model, a.seq, multimodal=False, gen=torch.Generator().manual_seed(0))

    def step():
        accumulate_gradients(model, [cpu_batch], device=dev, dtype=torch.bfloat16)
        clip_and_step(params, opt, sched, max_grad_norm=0.0)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 2
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) / 2
    print(f"== {a.mode} seq {a.seq} compile={a.compile} attention={a.attention}: wall/step {wall*1e3:.1f} ms, "
          f"GPU busy/step {gpu_us/1e3:.1f} ms ({100*gpu_us/1e3/(wall*1e3):.0f}%), tok/s {a.seq/wall:.0f}")
    print(events.table(sort_by="self_device_time_total", row_limit=a.rows, max_name_column_width=60))
    n_ops = sum(e.count for e in events if not e.is_user_annotation and e.device_type.name == "CPU") / 2
    print(f"CPU-side ops per step: {n_ops:.0f}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=60))
    if a.compile:
        from torch._dynamo.utils import counters

        print("graph breaks:", dict(counters["graph_break"]))


if __name__ == "__main__":
    main()
