"""Where an eager training step's host time goes (GPU box).

    python benchmarks/gpu/eager_host_profile.py [--seq 2048] [--rounds 4] [--profile]

Builds E2B QLoRA on random weights (as `slimtune bench`), then times eager forward+backward steps: host time (until
the last launch returns) and wall time (until the GPU is done), medians of ``--rounds``. ``--profile`` adds cProfile
(by own time) and torch.profiler (CPU self time) tables. (Sessions 7-8 also used it for an A/B of two kernel entry
points, BENCHMARKS.md "Session 8"; that finding removed the second entry point.)
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

from slimtune.adapt.attention import enable_slimtune_attention
from slimtune.adapt.inject import add_lora
from slimtune.bench.random_model import build_random_model
from slimtune.bench.run import bench_batch
from slimtune.train.run import apply_layer_switches
from slimtune.train.step import accumulate_gradients


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cuda")
    model = build_random_model("e2b", mode="qlora", device=dev, offload_ple=True)
    enable_slimtune_attention(model)
    add_lora(model, r=16, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    apply_layer_switches(model, recompute_norms=True, gradient_checkpointing=True)
    model.train()
    batch = bench_batch(model, a.seq, multimodal=False, gen=torch.Generator().manual_seed(0))

    def step() -> tuple[float, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        accumulate_gradients(model, [batch], device=dev, dtype=torch.bfloat16)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return t1 - t0, time.perf_counter() - t0

    step(), step()  # warm-up: first-use checks, Triton compiles
    times = [step() for _ in range(a.rounds)]
    host, wall = statistics.median(x[0] for x in times), statistics.median(x[1] for x in times)
    print(f"host {1e3 * host:7.1f} ms  wall {1e3 * wall:7.1f} ms  ({a.seq / wall:,.0f} tok/s fwd+bwd)")
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

        with profile(activities=[ProfilerActivity.CPU]) as p:
            step()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
