"""``cuda_graphs: auto`` (the default): capture each step as a CUDA graph whenever that is safe and pays.

Why a default: eager steps launch ~20K kernels from Python, so at short sequences the GPU waits on the host (an
H200 ran E2B QLoRA at 2K tokens 3.5-5x faster captured; BENCHMARKS.md). A user who never reads about the switch
should still get the fast path when nothing speaks against it.

When auto turns graphs on — all of these, else it stays eager and says why:

* a CUDA device; one process, or data parallelism with whole models (DDP: the graph sums the gradients over ranks
  itself), not FSDP2's sharded steps;
* packed or not: packed batches are one shape; unpacked ones capture one step per length bucket
  (slimtune.train.graph_buckets; H200, E2B QLoRA on samples of every length up to 2K: ~4x the eager run's real
  tokens per second, same peak, same losses; BENCHMARKS.md session 10);
* what the captured step cannot do is off: lora_dropout 0, activation_offload off, bf16 (fp16's loss scaler
  syncs with the host), a text-only model (media inputs change shape) whose MoE blocks, if any, are slimtune's
  grouped ones on a Hopper GPU (other routing reads sizes on the host);
* any optimizer: torch's fused AdamW steps inside the graph; 8-bit AdamW steps eagerly after the replayed forward
  and backward (H200, 26B-A4B expert LoRA at 2K capped to a 24 GB card: 19.73 GiB, 5,012 tok/s against the eager
  8-bit step's 1,667-2,227; BENCHMARKS.md session 11);
* memory headroom: the planner's peak with graphs plus a margin (``margin_gib``) fits the memory this process can
  use. A graph keeps its own memory pool for the whole run, and while a capture is under way the allocator cannot
  hand cached blocks back, so a run whose peak is near the card's limit stays eager rather than risk running out of
  memory at capture. The margin comes from an H200 capped to a 24 GB card's 22.5 GiB (BENCHMARKS.md, sessions 10
  and 11): predictions of 19.9 and 20.6 GiB captured and trained (reserved 20.9 and 21.5 GiB), 22.7 ran out of
  memory at capture.

``cuda_graphs: true`` forces graphs (and refuses a setting that clashes); ``false`` never captures.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from slimtune.train.config import TrainConfig
from slimtune.train.cuda_graph import graph_step_problems

MARGIN_GIB, MARGIN_SHARE = 1.5, 0.07
"""Auto captures only when the predicted peak plus max(MARGIN_GIB, MARGIN_SHARE of it) fits the usable memory."""


def margin_gib(peak_gib: float) -> float:
    """Room kept beside the predicted peak: the graph pool's and the allocator's rounding grow with the step."""
    return max(MARGIN_GIB, MARGIN_SHARE * peak_gib)


def usable_gib(device: torch.device) -> float:
    """GiB this process can allocate on `device`: what is free plus what it already holds, within its memory
    fraction (torch.cuda.set_per_process_memory_fraction caps the allocator, e.g. to emulate a smaller card). The
    CUDA context, a display and other processes are not ours to use, so the card's size alone overstates it."""
    free, _ = torch.cuda.mem_get_info(device)
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _d: 1.0)(device)
    return min(free + torch.cuda.memory_reserved(device), fraction * total) / 2**30


def config_blockers(cfg: TrainConfig, *, cuda: bool, sharded: bool) -> list[str]:
    """Reasons in the settings alone (no model needed) why auto stays eager; empty when none. `sharded`: FSDP2
    across several processes."""
    reasons = []
    if not cuda:
        reasons.append("no CUDA device")
    if sharded:
        reasons.append("FSDP2 shards the model (its gradient reduce-scatter is not captured; DDP steps are)")
    if cfg.lora_dropout:
        reasons.append("lora_dropout > 0 (recomputation would draw new dropout masks)")
    if cfg.activation_offload is True:
        reasons.append("activation_offload is on")
    if cfg.dtype in ("float16", "fp16", "float32", "fp32"):
        reasons.append(f"dtype {cfg.dtype} (a captured step needs bfloat16)")
    return reasons


def predicted_peak_gib(cfg: TrainConfig) -> float | None:
    """The planner's per-GPU peak for cfg with graphs on (None when the model's config cannot be read)."""
    from slimtune.memory.train_plan import plan_for_config  # noqa: PLC0415

    try:
        return plan_for_config(dataclasses.replace(cfg, cuda_graphs=True, max_memory=None), world_size=1).predicted_gib
    except Exception:  # noqa: BLE001 - any failure to predict only means auto stays eager (and says so)
        return None


def decide(cfg: TrainConfig, model: nn.Module, *, dtype: torch.dtype, device: torch.device,
           sharded: bool, peak_gib=predicted_peak_gib) -> tuple[bool, str]:
    """(capture?, why) for ``cuda_graphs: auto``. `peak_gib(cfg)` is the planner's prediction (a parameter so
    tests can give one); the usable memory is read from `device`."""
    reasons = (config_blockers(cfg, cuda=device.type == "cuda", sharded=sharded)
               or graph_step_problems(model, dtype=dtype, capture=False, device=device)
               or ([f"the model runs in {dtype} (a captured step needs bfloat16)"] if dtype != torch.bfloat16 else []))
    if reasons:
        return False, "; ".join(reasons)
    peak = peak_gib(cfg)
    if peak is None:
        return False, "no memory prediction for this model, so no headroom check"
    usable, margin = usable_gib(device), margin_gib(peak)
    if peak + margin > usable:
        return False, (f"predicted peak {peak:.1f} GiB plus a {margin:.1f} GiB margin is over the {usable:.1f} GiB "
                       "this process can use (a graph's memory pool cannot be handed back; --cuda-graphs forces it)")
    shapes = "packed fixed-shape batches" if cfg.packing else "one captured step per length bucket"
    return True, f"{shapes}, predicted peak {peak:.1f} of {usable:.1f} GiB usable"
